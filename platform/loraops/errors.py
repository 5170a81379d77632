"""The one error type that the CLI reports as a message (exit code 2) instead of a traceback."""


class LoraopsError(Exception):
    """A problem the user can fix: bad input, a missing file, an unknown name. The message says which."""
