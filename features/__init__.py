"""nanotune features: one module per optimization, each switched on by a flag in train.py."""


class UserError(ValueError):
    """A problem the user can fix (bad flag, bad file, missing package).

    train.py prints it as one line, `error: <message>`, and exits with status 2, so the message
    must name the flag or the file and line, and say the fix.
    """
