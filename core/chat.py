"""Chat records: their messages checked and normalized, rendered with the tokenizer's chat template,
and every assistant turn masked in (core/data.py's module docstring says which tokens).

Messages as users export them: {"role", "content"} (content a string, or OpenAI-style text parts,
joined), an assistant's `tool_calls` with the record's `tools` (rendered by the template, trained),
or ShareGPT's {"from", "value"} turns under "conversations".
"""

import json
import os
import re

from core import UserError
from core.records import IGNORE, BadRecord, Sample, encodable

CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "observation": "tool"}  # its "from" -> role


def _check_messages(record, where) -> list[dict]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if messages is None and isinstance(record, dict) and "conversations" in record:
        messages = _from_sharegpt(record["conversations"], where)
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{where}: chat records need a non-empty list 'messages'")
    messages = [_message(m, where, f"messages[{i}]") for i, m in enumerate(messages)]
    system = record.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})  # ShareGPT's / LLaMA-Factory's top-level system
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"{where}: no assistant message, so nothing to train on")
    return messages


def _message(m, where: str, name: str) -> dict:
    """One message as the template takes it. OpenAI-style content, a list of text parts, is joined
    into one string (as templates that take parts render them); an assistant message may carry
    `tool_calls` and no content (an empty or null `tool_calls` is dropped)."""
    if not isinstance(m, dict):
        raise BadRecord(f"{where}: {name} needs a string 'content'")
    m = {k: v for k, v in m.items() if k != "tool_calls" or v}
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(_text_part(part, f"{where}: {name}") for part in content)
    elif content is None and m.get("role") == "assistant" and "tool_calls" in m:
        content = ""
    if not isinstance(content, str):
        raise BadRecord(f"{where}: {name} needs a string 'content'")
    encodable(content, where, f"{name}['content']")
    if m.get("role") not in CHAT_ROLES:
        raise BadRecord(f"{where}: {name} has role {m.get('role')!r}; use one of {CHAT_ROLES}")
    if "tool_calls" in m and not _named_calls(m["tool_calls"]):
        raise BadRecord(f"{where}: {name}['tool_calls'] needs a list of "
                        f'{{"function": {{"name": ..., "arguments": ...}}}}')
    if m.get("weight", 1) not in (0, 1):
        raise BadRecord(f"{where}: {name}['weight'] must be 0 (not trained) or 1, as in OpenAI's format")
    if m["role"] == "assistant" and not content.strip() and "tool_calls" not in m:
        raise BadRecord(f"{where}: {name} is an empty assistant turn; give it content or remove the record")
    calls = {"tool_calls": _parsed_arguments(m["tool_calls"])} if "tool_calls" in m else {}
    return {**m, "content": content, **calls}


def _parsed_arguments(calls: list) -> list:
    """OpenAI's format holds a call's arguments as a JSON string; chat templates write them with
    `tojson`, which would encode that string a second time: decoded here to the object."""
    return [{**call, "function": {**call["function"], "arguments": _decoded(call["function"].get("arguments"))}}
            for call in calls]


def _decoded(arguments):
    """A JSON string as its object; anything else (an object already, or text that is not JSON, which
    the template writes as it is) unchanged."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _from_sharegpt(turns, where: str):
    """ShareGPT's {"from", "value"} turns as messages: human -> user, gpt -> assistant. Turns that
    are messages already ({"role", "content"} under "conversations") are taken as they are."""
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"{where}: ShareGPT records need a non-empty list 'conversations'")
    if all(isinstance(turn, dict) and "role" in turn and "from" not in turn for turn in turns):
        return turns
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise BadRecord(f"{where}: conversations[{i}] has from {speaker!r}; use one of {tuple(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            raise BadRecord(f"{where}: conversations[{i}] needs a string 'value'")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def _text_part(part, where: str) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise BadRecord(f"{where} has a {kind!r} content part; nanotune trains text: "
                    f'use {{"type": "text", "text": ...}} parts or a string')


def _named_calls(calls) -> list[str]:
    """The function names of a message's tool_calls; [] if they are not a list of named calls."""
    try:
        names = [call["function"]["name"] for call in calls]
    except (TypeError, KeyError):
        return []
    return names if names and all(isinstance(n, str) and n for n in names) else []


def special_ids(tok) -> set[int]:
    """Every special token id: the named ones (bos, eos, pad, ...) and the added tokens marked special."""
    return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}


def _trained_len(turn: list[int], special: set[int]) -> int:
    """How many tokens of an assistant turn are trained: through its end-of-turn token (the last
    special token), or all of them when there is none. A special token opening the turn is a role
    header that the generation prompt did not write, not an end of turn."""
    ends = [k for k in range(1, len(turn)) if turn[k] in special]
    return ends[-1] + 1 if ends else len(turn)


def _token_spans(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of a rendered conversation and each token's character span in its text."""
    try:  # the template writes its own special tokens; --seq-len, not model_max_length, is the limit
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError:  # transformers' Python tokenizers keep no offsets
        raise UserError("--dataset-format chat needs a fast (tokenizers) tokenizer to find the assistant "
                        "turns; pass a --tokenizer with a tokenizer.json") from None
    return enc["input_ids"], enc["offset_mapping"]


def tokenize_chat(record, where, tok) -> Sample:
    """Assistant turns are trained (the module docstring says which tokens). A turn's content starts
    where the text of the conversation before it plus the generation prompt ends; it is found by
    character, since a tokenizer may split that boundary differently in context (the prompt alone
    can end in one "\n\n" token that becomes "\n", "\n" before the content). Where the conversation
    does not begin with that prompt (the template renders a turn otherwise once later ones follow), the
    turn is found by difference instead: _body_in."""
    messages, tools = _check_messages(record, where), record.get("tools")
    if isinstance(tools, str):  # hub datasets often store the definitions as a JSON string, as `arguments`
        tools = _decoded(tools)
    if tools is not None and not isinstance(tools, list):
        raise BadRecord(f"{where}: 'tools' needs a list of function definitions")

    def render(msgs, gen_prompt=False) -> str:
        try:
            return tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen_prompt)
        except Exception as e:  # templates raise their own errors (jinja2's raise_exception: "roles must alternate")
            raise BadRecord(f"{where}: the tokenizer's chat template refuses this conversation ({e})") from None

    text, special = render(messages), special_ids(tok)
    ids, spans = _token_spans(tok, text)
    labels, prompt_len, response_end = [IGNORE] * len(ids), 0, None
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight") == 0:  # OpenAI's weight 0: in context, not trained
            continue
        through_turn = render(messages[: i + 1])
        prompt = render(messages[:i], gen_prompt=True) if i else None  # a first turn (a greeting): no prompt
        if prompt is not None and text.startswith(through_turn) and through_turn.startswith(prompt):
            _check_calls_rendered(m, through_turn[len(prompt):], f"{where}: messages[{i}]")
            turn = [k for k, (a, b) in enumerate(spans) if b > len(prompt) and a < len(through_turn)]
            if not turn:
                continue
            start, stop = turn[0], turn[0] + _trained_len(ids[turn[0]:turn[-1] + 1], special)
        else:  # the template renders earlier turns otherwise once later ones follow (Qwen3, Mistral v0.3)
            begin, end = _body_in(text, render([*messages[:i], {"role": "assistant", "content": MARK},
                                                *messages[i + 1:]]), f"{where}: messages[{i}]")
            _check_calls_rendered(m, text[begin:end], f"{where}: messages[{i}]")
            if (found := _body_tokens(ids, spans, text, special, begin, end)) is None:
                continue
            start, stop = found
        labels[start:stop], prompt_len, response_end = ids[start:stop], start, stop
    return Sample(ids, labels, prompt_len, response_end)


MARK = "\ue000nanotune-turn\ue000"  # one assistant turn's body: private-use characters, not whitespace (strip())


def _body_in(text: str, marked: str, where: str) -> tuple[int, int]:
    """Where an assistant turn's body (its content, reasoning and tool calls, as the template renders
    them in the whole conversation) lies in `text`: what differs from the rendering `marked`, in which
    only that turn is MARK."""
    begin = len(os.path.commonprefix([text, marked]))
    tail = min(len(os.path.commonprefix([text[::-1], marked[::-1]])), len(text) - begin, len(marked) - begin)
    if MARK not in marked[begin:len(marked) - tail]:
        raise BadRecord(f"{where}: the tokenizer's chat template renders this turn so that it cannot be found in the "
                        f"conversation; pass another --tokenizer, or --skip-bad-samples to leave the record out")
    return begin, len(text) - tail


def _body_tokens(ids: list[int], spans: list, text: str, special: set[int], begin: int,
                 end: int) -> tuple[int, int] | None:
    """The tokens of the text [begin, end), and after them the end-of-turn token when a special token
    follows with only whitespace between; None for an empty body."""
    body = [k for k, (a, b) in enumerate(spans) if b > begin and a < end]
    if not body:
        return None
    k = body[-1] + 1
    while k < len(ids) and ids[k] not in special and not text[spans[k][0]:spans[k][1]].strip():
        k += 1
    return body[0], (k + 1 if k < len(ids) and ids[k] in special else body[-1] + 1)


def template_drops(records: list, tok, first: int = 100) -> str | None:
    """A line for the log when the chat template leaves out part of an assistant turn's content, which
    is then not trained: reasoning before </think> (DeepSeek-R1-Distill's template drops it from every
    turn, Qwen3's from turns before the last question). Looked for in the first `first` conversations
    (rendering is most of tokenizing's cost, and a cached run tokenizes nothing)."""
    hits, checked = [], 0
    for record, where in records[:first]:
        try:
            messages = _check_messages(record, where)
            text = tok.apply_chat_template(messages, tools=record.get("tools"), tokenize=False)
        except Exception:  # a bad record is refused (or skipped) where it is tokenized
            continue
        checked += 1
        hits += [f"{where} messages[{i}]" for i, m in enumerate(messages)
                 if m["role"] == "assistant" and any(part not in text for part in _parts(m["content"]))]
    if not hits:
        return None
    return (f"the chat template leaves out part of {len(hits)} assistant turns' content in the first {checked} "
            f"conversations (first: {hits[0]}), so that part is not trained; for reasoning before </think>, "
            f"pass a --tokenizer whose template keeps it")


def _parts(content: str) -> list[str]:
    """The text of a turn that a template writes back, maybe reformatted around it: the reasoning and
    the answer apart (Qwen3 rewrites `<think>r</think>a` as `<think>\nr\n</think>\n\na`), each stripped."""
    return [part.strip() for part in re.split(r"</?think>", content) if part.strip()]


def _check_calls_rendered(message: dict, turn: str, where: str) -> None:
    """A template that does not know tool calls renders such a turn without them: refuse the record
    rather than train an empty turn."""
    for name in _named_calls(message.get("tool_calls") or []):
        if name not in turn:
            raise BadRecord(f"{where}: its tool call {name!r} is not in the chat template's rendering (this "
                            f"tokenizer's template drops tool calls); pass a --tokenizer whose template has them")


def end_of_turn_id(tok) -> int | None:
    """The special token that closes an assistant turn in the tokenizer's chat template, the last token a
    chat run trains (ChatML's <|im_end|>, Llama 3's <|eot_id|>); None without a template or such a token."""
    if not getattr(tok, "chat_template", None):
        return None
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    try:
        sample = tokenize_chat(record, "the chat template", tok)
    except (BadRecord, UserError):
        return None
    last = sample.answer[-1] if sample.answer else None
    return last if last in special_ids(tok) else None
