"""The real-checkpoint tier: SmolLM2-135M-Instruct (tests/real_checkpoint.py) on the CPU.

Chat masking with the real ChatML tokenizer and with Llama-3 and Mistral layouts; a short LoRA
fine-tune whose reported held-out exact match is what an independent greedy decode finds, that
improves the held-out metrics, and whose saved adapter (and its merged export) gives the run's own
final logits; full fine-tune and QLoRA checkpoints that resume where the uninterrupted run goes.
Every hyperparameter a test depends on is passed as a flag: the defaults may change.
"""

import copy
import json
import random
import shutil
import types

import pytest
import torch

from conftest import read_metrics, write_jsonl
from core.data import tokenize

CONVERSATION = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"},
                {"role": "user", "content": "Now say bye, on two lines."},
                {"role": "assistant", "content": "Bye.\nSee you soon."}]
# Layouts written into copies of the real tokenizer: Llama 3 (a header per turn, <|eot_id|> ends it;
# this tokenizer reads the generation prompt's final "\n\n" as one token alone but as two before the
# content) and Mistral (no generation prompt, the system message inside the first [INST], </s> ends it).
LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
          "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
           "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
           "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
           "{% endif %}{% endfor %}")
# Small, fast settings for a 135M model on 2 cores.
COMMON = ["--seq-len", "64", "--grad-accum", "1", "--warmup-steps", "2", "--lr-schedule", "cosine",
          "--min-lr-ratio", "0.1", "--weight-decay", "0", "--precision", "fp32", "--device", "cpu", "--seed", "0",
          "--log-every", "1"]
LORA = ["--lora", "--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--lr", "1e-3",
        "--micro-batch-size", "8", "--max-steps", "10"]
HELD_OUT = 16


@pytest.fixture(scope="module")
def smol_tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def chat_tokenizer(tok, layout: str):
    """(tokenizer, its end-of-turn token) for a chat layout."""
    if layout == "chatml":  # the checkpoint's own template
        return tok, "<|im_end|>"
    tok = copy.deepcopy(tok)
    if layout == "llama3":
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                              "<|eot_id|>"]})
        tok.chat_template = LLAMA3
        return tok, "<|eot_id|>"
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    tok.chat_template = MISTRAL
    return tok, "</s>"


def trained_runs(tok, sample) -> list[str]:
    """The text of each run of consecutive trained tokens."""
    runs, run = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != -100:
            run.append(token)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


@pytest.mark.parametrize("layout", ["chatml", "llama3", "mistral"])
def test_chat_trains_each_assistant_turns_content_and_end_of_turn(smol_tok, layout):
    tok, end_of_turn = chat_tokenizer(smol_tok, layout)
    s = tokenize({"messages": CONVERSATION}, "chat", "x:1", tok, train_on_inputs=False)
    answers = [m["content"] + end_of_turn for m in CONVERSATION if m["role"] == "assistant"]
    assert trained_runs(tok, s) == answers
    # nothing is dropped from the input (ChatML's newline after <|im_end|> stays, untrained)
    assert tok.decode(s.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # exact match answers the generation prompt and compares with the last trained span
    prompt = tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(s.input_ids[:s.prompt_len]) == prompt
    assert tok.decode(s.input_ids[s.prompt_len:s.response_end]) == answers[-1]


# ---------------------------------------------------------------------------- a LoRA fine-tune


WORDS = "red blue green cat dog sun moon tree fish bird star rock milk rain snow king".split()


def chat_task(rng: random.Random) -> dict:
    """One deterministic task with one right answer: uppercase, reverse or copy a few words."""
    words = rng.sample(WORDS, rng.choice([2, 3]))
    text = " ".join(words)
    question, answer = rng.choice([(f"Uppercase: {text}", text.upper()),
                                   (f"Reverse the words: {text}", " ".join(reversed(words))),
                                   (f"Copy: {text}", text)])
    return {"messages": [{"role": "system", "content": "Reply with the answer only."},
                         {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_tasks(root, n_train: int = 96, n_val: int = HELD_OUT):
    rng = random.Random(0)
    tasks = [chat_task(rng) for _ in range(n_train + n_val)]
    return write_jsonl(root / "train.jsonl", tasks[:n_train]), write_jsonl(root / "val.jsonl", tasks[n_train:])


def logits(model, batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits
    model.train(was_training)
    return out


@pytest.fixture(scope="module")
def lora_run(smollm2, smol_tok, tmp_path_factory):
    """A 10-step LoRA run on the chat tasks; with the logits its in-memory model gives at the end of
    training on a few held-out conversations (taken as train.py hands the model to the export)."""
    import train
    from features import lora

    root = tmp_path_factory.mktemp("lora")
    train_file, val_file = write_tasks(root)
    conversations = [json.loads(line)["messages"] for line in val_file.read_text().splitlines()]
    texts = [smol_tok.apply_chat_template(c, tokenize=False) for c in conversations[:4]]
    batch = dict(smol_tok(texts, padding=True, return_tensors="pt"))
    final, export = {}, lora.export

    def export_after_probing(model, tok, out_dir):
        final["logits"] = logits(model, batch)
        return export(model, tok, out_dir)

    args = ["--model", str(smollm2), "--dataset", str(train_file), "--val-dataset", str(val_file), *COMMON,
            *LORA, "--eval-exact-match", str(HELD_OUT), "--output-dir", str(root / "run")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora, "export", export_after_probing)
        assert train.main(args) == 0
    return types.SimpleNamespace(out=root / "run", conversations=conversations, batch=batch,
                                 final_logits=final["logits"], metrics=read_metrics(root / "run"))


@pytest.fixture(scope="module")
def tuned(lora_run, smollm2):
    """The run's saved adapter, loaded by peft on the saved base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), lora_run.out / "final").eval()


@pytest.mark.slow
def test_lora_fine_tune_improves_held_out_exact_match_and_loss(lora_run):
    before, after = lora_run.metrics[0], lora_run.metrics[-1]
    assert before["step"] == 0 and after["step"] == 10
    assert after["val_loss"] < 0.5 * before["val_loss"]
    assert after["exact_match"] >= before["exact_match"] + 0.25


@pytest.mark.slow
def test_reported_exact_match_is_an_independent_greedy_decode(lora_run, tuned, smol_tok):
    """The adapter as a user runs it: apply_chat_template + generate, text compared with the answer."""
    right = 0
    for messages in lora_run.conversations:
        prompt = smol_tok.apply_chat_template(messages[:-1], add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)
        with torch.no_grad():
            out = tuned.generate(**prompt, max_new_tokens=24, do_sample=False)
        answer = smol_tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        right += answer.strip() == messages[-1]["content"]
    reported = lora_run.metrics[-1]["exact_match"]
    assert reported == right / len(lora_run.conversations)


@pytest.mark.slow
def test_saved_adapter_and_merged_export_give_the_runs_final_logits(lora_run, tuned, tmp_path):
    import export
    from transformers import AutoModelForCausalLM

    # the same fp32 weights through the same forward (bit-identical here; the tolerance allows for
    # another summation order), while the adapter moves these logits by tens
    reloaded = logits(tuned, lora_run.batch)
    torch.testing.assert_close(reloaded, lora_run.final_logits, rtol=0, atol=1e-5)
    assert export.main(["--adapter", str(lora_run.out / "final"), "--out", str(tmp_path / "merged"),
                        "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # W + scale * B A rounded to fp32 once instead of computed apart: logits of magnitude up to ~40
    # move by about 1e-4
    torch.testing.assert_close(logits(merged, lora_run.batch), reloaded, rtol=0, atol=1e-3)
    shutil.rmtree(tmp_path / "merged")  # 0.5 GB, otherwise kept with pytest's last three sessions


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_weights(path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k for k in keys if k.startswith("model.")}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param(["--lr", "1e-4"], id="full"),
                                  pytest.param(["--qlora", "--lora-rank", "8", "--lr", "1e-3"], id="qlora")])
def test_checkpoint_resumes_where_the_uninterrupted_run_goes(smollm2, tmp_path, mode):
    import train

    train_file, _ = write_tasks(tmp_path)
    args = ["--model", str(smollm2), "--dataset", str(train_file), "--val-dataset", "none", *COMMON, *mode,
            "--micro-batch-size", "2", "--max-steps", "4", "--eval-exact-match", "0", "--skip-export"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main([*args, "--output-dir", str(full), "--save-every", "2", "--keep-checkpoints", "0"]) == 0
    # the interrupted run: the same job, whose process died after the step-2 checkpoint
    (cut / "checkpoints").mkdir(parents=True)
    (full / "checkpoints" / "step_00000002").rename(cut / "checkpoints" / "step_00000002")
    weights = checkpoint_weights(cut / "checkpoints" / "step_00000002")
    adapter_only = all(".lora_" in k for k in weights)
    assert adapter_only == ("--qlora" in mode) and weights
    assert train.main([*args, "--output-dir", str(cut), "--resume", "auto"]) == 0

    a = {m["step"]: m for m in read_metrics(full)}
    b = {m["step"]: m for m in read_metrics(cut)}
    assert sorted(b) == [3, 4]
    for step in b:  # bit-exact on CPU: same weights, optimizer moments, schedule, data position and RNG
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert b[step][key] == a[step][key], (step, key)
    shutil.rmtree(full / "checkpoints")  # a full fine-tune's are 1.6 GB each, otherwise kept with pytest's
    shutil.rmtree(cut / "checkpoints")  # last three sessions
