"""What a data record becomes, and how a bad one is reported: shared by the formats (core/data.py)
and the chat format (core/chat.py)."""

import dataclasses

from core import UserError

IGNORE = -100  # the label of a token that is not trained (torch's cross_entropy ignore_index)
Record = tuple[dict, str]  # (the record, where it came from: "file:line")


class BadRecord(UserError):
    """One malformed record, named by file and line: stops the run, or is skipped with --skip-bad-samples."""


@dataclasses.dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (not shifted); IGNORE = not trained
    prompt_len: int  # tokens before the last trained response (the exact-match prompt)
    response_end: int | None = None  # where that response's trained span ends; None: at the end of input_ids

    @property
    def prompted(self) -> bool:
        """Has a prompt and an answer to it (pretrain text has neither)."""
        return 0 < self.prompt_len < len(self.input_ids)

    @property
    def answer(self) -> list[int]:
        """The last trained response's span: the reference exact match scores."""
        return self.input_ids[self.prompt_len:self.response_end]


def encodable(text: str, where: str, what: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer encodes; name them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord(f"{where}: {what} holds invalid Unicode (a lone surrogate at character {e.start}); "
                        f"fix the string") from None
    return text
