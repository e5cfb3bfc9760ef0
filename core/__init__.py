"""nanotune core: what every run uses (data, model loading, loss, optimizer, distributed setup,
checkpoints, evaluation, logging, faults, defaults and the compatibility matrix). Nothing here
imports from features/."""


class UserError(ValueError):
    """A problem the user can fix (bad flag, bad file, missing package).

    train.py prints it as one line, `error: <message>`, and exits with status 2, so the message
    must name the flag or the file and line, and say the fix.
    """


def count(n: int, noun: str) -> str:
    """A count in the log's words: '1 step', '2,048 steps'."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
