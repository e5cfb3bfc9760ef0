"""Chat records as users export them (core/chat.py): content as OpenAI-style text parts, assistant
tool calls with their tool results, ShareGPT turns. The presets' tokenizer; a small tool-aware
ChatML template stands in for a model whose template renders tool calls."""

import copy

import pytest

from core import UserError
from core.data import tokenize

TOOL_CHATML = (  # ChatML that renders `tools`, an assistant's `tool_calls` and `tool` results
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>{{ c['function']['name'] }}"
    "({{ c['function']['arguments'] }})</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
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
    train, _ = load_splits(DataConfig(dataset=str(tmp_path / "train.jsonl"), val_dataset="none"), tok, seed=0)
    assert [s.input_ids for s in train.samples] == [a.input_ids] * 4


@pytest.mark.parametrize("turn, message", [
    ({"from": "bot", "value": "x"}, r"conversations\[1\] has from 'bot'; use one of"),
    ({"from": "gpt", "value": None}, r"conversations\[1\] needs a string 'value'"),
])
def test_malformed_sharegpt_turns_are_one_line_errors(tok, turn, message):
    with pytest.raises(UserError, match=r"x:5: " + message):
        tokenize({"conversations": [{"from": "human", "value": "q"}, turn]}, "chat", "x:5", tok, False)
