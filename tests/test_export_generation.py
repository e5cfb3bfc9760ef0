"""The exported model stops generating where a chat run taught it to: at the chat template's end-of-turn
token, also when the tokenizer's eos is another token (a base model: Llama 3.1's <|end_of_text|> beside
<|eot_id|>, Qwen2.5's <|endoftext|> beside <|im_end|>)."""

import json
import shutil

import pytest

from conftest import ROOT, run_train, write_jsonl


@pytest.fixture
def base_tokenizer(tmp_path):
    """The embedded ChatML tokenizer with an eos that is not its template's <|im_end|>."""
    out = tmp_path / "tokenizer"
    shutil.copytree(ROOT / "data" / "tokenizer", out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|bos|>"}))
    return out


def _stops(path) -> list[int]:
    from transformers import GenerationConfig

    ids = GenerationConfig.from_pretrained(path).eos_token_id
    return [ids] if isinstance(ids, int) else list(ids)


@pytest.mark.parametrize("adapter", [False, True])
def test_the_final_model_stops_at_the_chat_templates_end_of_turn(tmp_path, base_tokenizer, adapter):
    from transformers import AutoTokenizer

    from features.lora import merge_and_save

    tok = AutoTokenizer.from_pretrained(base_tokenizer)
    eos, end_of_turn = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert eos != end_of_turn
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"ping {i}"}, {"role": "assistant", "content": f"pong {i}"}]}
        for i in range(40)])
    out = tmp_path / "run"
    assert run_train(out, "--tokenizer", str(base_tokenizer), "--dataset", str(chats), "--val-dataset", "none",
                     "--max-steps", "1", "--micro-batch-size", "4", *(["--lora"] if adapter else [])) == 0
    assert _stops(out / "final") == [eos, end_of_turn]  # the adapter's: GenerationConfig.from_pretrained(final)
    if adapter:  # and the merged model's
        merged = merge_and_save("tiny-llama", out / "final", tmp_path / "merged")
        assert _stops(merged) == [eos, end_of_turn]
