"""benchmarks/defaults.py's data: conversations whose chat renderings have the lengths asked for, and
the same conversations as the {"text"} records the baseline trains (CPU, the presets' tokenizer)."""

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.defaults import chat_data, rendered  # noqa: E402

TOKENIZER = ROOT / "data" / "tokenizer"


def _lengths(path: Path, tok) -> list[int]:
    texts = [tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
             for line in path.read_text().splitlines()]
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_full_conversations_fill_a_row_exactly(tmp_path):
    from transformers import AutoTokenizer

    path = chat_data(tmp_path / "chats.jsonl", 3, TOKENIZER, tokens=512)
    assert _lengths(path, AutoTokenizer.from_pretrained(TOKENIZER)) == [512, 512, 512]


def test_instruction_lengths_follow_the_instruction_tuning_shape(tmp_path):
    from transformers import AutoTokenizer

    path = chat_data(tmp_path / "chats.jsonl", 400, TOKENIZER, lengths="instruction")
    lengths = _lengths(path, AutoTokenizer.from_pretrained(TOKENIZER))
    assert min(lengths) >= 60 and max(lengths) <= 4096
    assert 170 <= statistics.median(lengths) <= 230  # lognormal, median 200
    assert 240 <= statistics.mean(lengths) <= 320  # a long tail: mean about 275
    assert len(set(lengths)) > 100  # lengths vary: the padded baseline pays for that


def test_the_baseline_gets_the_same_conversations_rendered(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    chats = chat_data(tmp_path / "chats.jsonl", 20, TOKENIZER, lengths="instruction")
    texts = [json.loads(line)["text"] for line in rendered(chats, TOKENIZER).read_text().splitlines()]
    conversations = [json.loads(line)["messages"] for line in chats.read_text().splitlines()]
    assert texts == [tok.apply_chat_template(m, tokenize=False) for m in conversations]


def test_a_template_with_a_long_default_system_prompt_still_gets_an_answer_in_every_chat(tmp_path):
    """SmolLM2's template adds a system prompt of its own: a 64-token chat once lost its whole answer,
    which nanotune rightly refuses as an empty assistant turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.chat_template = "<|im_start|>system\n" + "You are a helpful assistant. " * 6 + "<|im_end|>\n" + \
        tok.chat_template
    tok.save_pretrained(tmp_path / "tok")
    path = chat_data(tmp_path / "chats.jsonl", 200, tmp_path / "tok", lengths="instruction")
    chats = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    assert all(m["content"].strip() for chat in chats for m in chat)
    assert min(_lengths(path, tok)) >= 64  # the lengths asked for, as before
