"""Generate nanotune's default synthetic dataset and tokenizer (fully offline, deterministic).

Writes, next to this file:
  train.jsonl, val.jsonl   alpaca-format {"instruction","input","output"}; no val prompt occurs in train
  examples/{alpaca,chat,completion,text}.jsonl   20-line samples of every supported dataset format
  tokenizer/               byte-level BPE (~400 tokens), AutoTokenizer.from_pretrained("data/tokenizer")

Six tiny tasks, each with one verifiable answer: copy / uppercase 3-5 letters, reverse 4 distinct
letters, sort 3-6 digits, count 1-9 letters, add a 2-digit and a 1-digit number. Letters are
space-separated and digits are split one-by-one by the pre-tokenizer, so every payload character is
exactly one token; a ~1M-parameter 4-layer Llama learns most tasks in ~1500 CPU steps.
Tokenizer: pad <|pad|>, bos <|bos|>, eos <|im_end|> (also ends ChatML turns), <|im_start|>; it adds
no special tokens on its own (add bos/eos explicitly).

Rerun (from the repo root):  python data/make_data.py  [--seed 0 --n-train 20000 --n-val 500]
"""
import argparse
import json
import random
import string
from pathlib import Path

DATA = Path(__file__).resolve().parent
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
SYSTEM = "You are a helpful assistant."
PAD, BOS, EOS, IM_START = "<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def letters(r, lo, hi):
    return [r.choice(string.ascii_lowercase) for _ in range(r.randint(lo, hi))]


def t_copy(r):
    s = letters(r, 3, 5)
    return "Copy the letters.", " ".join(s), " ".join(s)

def t_reverse(r):
    s = r.sample(string.ascii_lowercase, 4)
    return "Reverse the letters.", " ".join(s), " ".join(s[::-1])

def t_upper(r):
    s = letters(r, 3, 5)
    return "Convert the letters to uppercase.", " ".join(s), " ".join(s).upper()

def t_sort(r):
    s = [r.choice(string.digits) for _ in range(r.randint(3, 6))]
    return "Sort the digits.", "".join(s), "".join(sorted(s))

def t_count(r):
    s = letters(r, 1, 9)
    return "Count the letters.", " ".join(s), str(len(s))

def t_add(r):
    a, b = r.randint(0, 99), r.randint(0, 9)
    return "Add the two numbers.", f"{a}+{b}", str(a + b)


TASKS = {f.__name__[2:]: f for f in (t_copy, t_reverse, t_upper, t_sort, t_count, t_add)}


def sample(r):
    task = r.choice(list(TASKS))
    ins, inp, out = TASKS[task](r)
    return {"instruction": ins, "input": inp, "output": out}


def prompt_of(ex):
    return (PROMPT if ex["input"] else PROMPT_NO_INPUT).format(**ex)


def make_split(r, n, banned, dedupe=False):
    rows = []
    while len(rows) < n:
        ex = sample(r)
        if prompt_of(ex) not in banned:
            rows.append(ex)
            if dedupe:
                banned.add(prompt_of(ex))
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in rows)


def to_chat(ex):
    user = ex["instruction"] + ("\n\n" + ex["input"] if ex["input"] else "")
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                         {"role": "assistant", "content": ex["output"]}]}


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),  # one token per digit
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, IM_START],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 additional_special_tokens=[IM_START], clean_up_tokenization_spaces=False,
                                 model_max_length=512)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(DATA / "tokenizer")
    return hf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--vocab-size", type=int, default=512)
    a = ap.parse_args()
    r = random.Random(a.seed)
    val_prompts = set()
    val = make_split(r, a.n_val, val_prompts, dedupe=True)  # unique val prompts
    train = make_split(r, a.n_train, val_prompts)  # no val prompt appears in train
    write_jsonl(DATA / "train.jsonl", train)
    write_jsonl(DATA / "val.jsonl", val)

    ex = train[:20]
    write_jsonl(DATA / "examples/alpaca.jsonl", ex)
    write_jsonl(DATA / "examples/chat.jsonl", [to_chat(x) for x in ex])
    write_jsonl(DATA / "examples/completion.jsonl", [{"prompt": prompt_of(x), "completion": x["output"]} for x in ex])
    write_jsonl(DATA / "examples/text.jsonl", [{"text": prompt_of(x) + x["output"]} for x in ex])

    texts = [prompt_of(x) + x["output"] for x in train] + [PROMPT, PROMPT_NO_INPUT, SYSTEM]
    texts += [f"{IM_START}{role}\n" for role in ("system", "user", "assistant")]
    tok = train_tokenizer(texts, a.vocab_size)
    for x in val:  # sanity: exact round trip, one token per payload character
        s = prompt_of(x) + x["output"]
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
        assert len(tok.encode(x["output"], add_special_tokens=False)) == len(x["output"].replace(" ", ""))
    print(f"wrote {len(train)} train / {len(val)} val rows, tokenizer vocab {len(tok)} -> {DATA}")


if __name__ == "__main__":
    main()
