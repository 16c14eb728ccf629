"""The exception every user-facing tunelab failure derives from: the CLI prints its message, no traceback."""


class TunelabError(Exception):
    """A failure whose message already tells the user what went wrong and what to do."""

    exit_code = 2
