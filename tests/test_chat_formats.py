"""Chat records as users export them (core/chat.py): content as OpenAI-style text parts, assistant
tool calls with their tool results, ShareGPT turns. The presets' tokenizer; a small tool-aware
ChatML template stands in for a model whose template renders tool calls (their arguments with `tojson`,
as Qwen2.5's, Llama 3.1's and Mistral's do)."""

import copy
import json

import pytest

from core import UserError
from core.data import tokenize

TOOL_CHATML = (  # ChatML that renders `tools`, an assistant's `tool_calls` and `tool` results
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>{{ c['function']['name'] }}"
    "({{ c['function']['arguments'] | tojson }})</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def trained(tok, sample) -> str:
    return tok.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != -100])


@pytest.fixture
def tool_tok(tok):
    tool_tok = copy.deepcopy(tok)
    tool_tok.chat_template = TOOL_CHATML
    return tool_tok


def test_text_parts_train_exactly_as_the_string(tok):
    as_string = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "It is 5."}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Add 2 "}, {"type": "text", "text": "and 3."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "It is 5."}]}]
    a, b = (tokenize({"messages": m}, "chat", "x:1", tok, False) for m in (as_string, as_parts))
    assert (a.input_ids, a.labels, a.prompt_len) == (b.input_ids, b.labels, b.prompt_len)


def test_an_image_part_is_a_one_line_error_naming_the_line(tok):
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}
    with pytest.raises(UserError, match=r"chats\.jsonl:4: messages\[0\] has a 'image_url' content part; "
                                        r"nanotune trains text"):
        tokenize({"messages": [image, {"role": "assistant", "content": "a cat"}]}, "chat", "chats.jsonl:4", tok,
                 False)


def test_tool_calls_are_trained_and_tool_results_are_not(tool_tok):
    messages = [{"role": "user", "content": "Weather in Lima?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "18 C, cloudy"},
                {"role": "assistant", "content": "18 C and cloudy."}]
    s = tokenize({"messages": messages, "tools": TOOLS}, "chat", "x:1", tool_tok, False)
    text = trained(tool_tok, s)
    assert '<tool_call>get_weather({"city": "Lima"})</tool_call>' in text and "18 C and cloudy." in text
    assert "18 C, cloudy" not in text and "Weather in Lima?" not in text and "Tools:" not in text
    assert "Tools: get_weather" in tool_tok.decode(s.input_ids)  # the tools reach the template
    as_string = tokenize({"messages": messages, "tools": json.dumps(TOOLS)}, "chat", "x:1", tool_tok, False)
    assert as_string == s  # tools stored as a JSON string (as many hub datasets do) read as the list


def test_a_template_without_tool_calls_is_refused_not_trained_empty(tok):
    messages = [{"role": "user", "content": "Weather in Lima?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]}]
    with pytest.raises(UserError, match=r"x:2: messages\[1\]: its tool call 'get_weather' is not in the chat "
                                        r"template's rendering .* pass a --tokenizer"):
        tokenize({"messages": messages}, "chat", "x:2", tok, False)


@pytest.mark.parametrize("empty", [None, []])
def test_an_empty_tool_calls_field_is_no_tool_call(tok, empty):
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with_field = [plain[0], {**plain[1], "tool_calls": empty}]
    a, b = (tokenize({"messages": m}, "chat", "x:1", tok, False) for m in (plain, with_field))
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


@pytest.mark.parametrize("calls", [[{"name": "f"}], "get_weather", [{"function": {"name": ""}}]])
def test_malformed_tool_calls_are_one_line_errors(tok, calls):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": calls}]
    with pytest.raises(UserError, match=r"x:3: messages\[1\]\['tool_calls'\] needs a list of"):
        tokenize({"messages": messages}, "chat", "x:3", tok, False)


def test_sharegpt_conversations_train_as_the_same_messages(tok, tmp_path):
    from conftest import write_jsonl
    from core.data import DataConfig, load_splits

    turns = [("system", "Be brief."), ("human", "Add 2 and 3."), ("gpt", "5"), ("human", "And 4 more?"), ("gpt", "9")]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    sharegpt = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    messages = {"messages": [{"role": roles[f], "content": v} for f, v in turns]}
    a, b = (tokenize(r, "chat", "x:1", tok, False) for r in (messages, sharegpt))
    assert (a.input_ids, a.labels, a.prompt_len) == (b.input_ids, b.labels, b.prompt_len)
    c = tokenize({"conversations": messages["messages"]}, "chat", "x:1", tok, False)  # role/content turns
    assert (a.input_ids, a.labels) == (c.input_ids, c.labels)
    write_jsonl(tmp_path / "train.jsonl", [sharegpt] * 4)  # --dataset-format auto finds it
    train, _ = load_splits(DataConfig(dataset=str(tmp_path / "train.jsonl"), val_dataset="none"), tok)
    assert [s.input_ids for s in train.samples] == [a.input_ids] * 4


@pytest.mark.parametrize("turn, message", [
    ({"from": "bot", "value": "x"}, r"conversations\[1\] has from 'bot'; use one of"),
    ({"from": "gpt", "value": None}, r"conversations\[1\] needs a string 'value'"),
])
def test_malformed_sharegpt_turns_are_one_line_errors(tok, turn, message):
    with pytest.raises(UserError, match=r"x:5: " + message):
        tokenize({"conversations": [{"from": "human", "value": "q"}, turn]}, "chat", "x:5", tok, False)


# Templates that render an earlier turn otherwise once later turns follow, as their models publish them:
# Qwen3 (a think block on the last turn only), DeepSeek-R1-Distill (a generation prompt that opens
# <think>), Mistral v0.3 (the system message inside the last user turn).
FAMILIES = {
    "qwen3": ["<think>", "</think>", "<tool_call>", "</tool_call>"],
    "r1distill": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
    "mistral_v03": ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"],
}
END_OF_TURN = {"qwen3": "<|im_end|>", "r1distill": "<｜end▁of▁sentence｜>", "mistral_v03": "</s>"}


def family_tokenizer(tok, family: str):
    """The presets' tokenizer with a family's special tokens and published chat template."""
    from pathlib import Path

    family_tok = copy.deepcopy(tok)
    family_tok.add_special_tokens({"additional_special_tokens": FAMILIES[family]})
    if family == "mistral_v03":  # its template writes the tokenizer's own bos and eos
        family_tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    family_tok.chat_template = (Path(__file__).parent / "chat_templates" / f"{family}.jinja").read_text()
    return family_tok


@pytest.mark.parametrize("family", FAMILIES)
def test_templates_that_rewrite_earlier_turns_train_each_turn_as_the_conversation_renders_it(tok, family):
    family_tok = family_tokenizer(tok, family)
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"},
                {"role": "user", "content": "Now bye."}, {"role": "assistant", "content": "Bye now."}]
    s = tokenize({"messages": messages}, "chat", "x:1", family_tok, False)
    text, eot = trained(family_tok, s), END_OF_TURN[family]
    assert f"Hi there!{eot}" in text and f"Bye now.{eot}" in text  # both turns, each through its end of turn
    assert not any(words in text for words in ("Be terse", "Say hi", "Now bye", "User", "INST", "im_start"))
    assert family_tok.decode(s.answer).endswith(f"Bye now.{eot}")  # exact match scores the last answer


@pytest.mark.parametrize("family", [None, *FAMILIES])
def test_a_conversation_that_opens_with_the_assistant_trains_its_greeting(tok, family):
    """Support logs often open with the bot's greeting; there is no prompt before it to render."""
    family_tok = family_tokenizer(tok, family) if family else tok
    messages = [{"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "Reset my password."}, {"role": "assistant", "content": "Done."}]
    try:
        s = tokenize({"messages": messages}, "chat", "x:1", family_tok, False)
    except UserError as e:  # a template that requires a user turn first says so, in one line naming the record
        assert family and str(e).startswith("x:1: the tokenizer's chat template refuses this conversation"), e
        return
    text = trained(family_tok, s)
    assert "Hello, how can I help?" in text and "Done." in text and "Reset my password" not in text


def test_an_empty_assistant_turn_is_a_bad_record(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]
    with pytest.raises(UserError, match=r"x:3: messages\[1\] is an empty assistant turn"):
        tokenize({"messages": messages}, "chat", "x:3", tok, False)


def test_reasoning_a_template_leaves_out_is_said_not_lost_silently(tok):
    """DeepSeek-R1-Distill's template drops the text before </think> from every turn, Qwen3's from the turns
    before the last question (and keeps the last turn's, reformatted): the log says so."""
    from core.chat import template_drops

    def chat(*turns):
        return {"messages": [{"role": role, "content": c} for role, c in zip(["user", "assistant"] * 2, turns)]}

    one = [(chat("2+2?", "<think>Adding two and two.</think>4"), "x:1")]
    two = [(chat("2+2?", "<think>Adding two and two.</think>4", "3+3?", "<think>Three and three.</think>6"), "x:2")]
    r1, qwen3 = family_tokenizer(tok, "r1distill"), family_tokenizer(tok, "qwen3")
    assert "leaves out part of 1 assistant turns' content in the first 1 conversations (first: x:1 messages[1])" \
        in template_drops(one, r1)
    assert template_drops(one, qwen3) is None  # the last turn's reasoning is trained
    assert "(first: x:2 messages[1])" in template_drops(two, qwen3)
    assert template_drops(two, tok) is None  # a template that writes content as it is


def test_openai_weight_0_turns_stay_untrained_and_a_top_level_system_is_kept(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "BAD ANSWER", "weight": 0},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "good answer", "weight": 1}]
    s = tokenize({"messages": messages, "system": "You are a pirate."}, "chat", "x:1", tok, False)
    assert "good answer" in trained(tok, s) and "BAD ANSWER" not in trained(tok, s)
    assert "You are a pirate." in tok.decode(s.input_ids)  # ShareGPT's / LLaMA-Factory's top-level system
    with pytest.raises(UserError, match=r"messages\[1\]\['weight'\] must be 0"):
        tokenize({"messages": [messages[0], {**messages[1], "weight": 0.5}]}, "chat", "x:2", tok, False)
