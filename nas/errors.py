"""The one exception type users see as a message instead of a traceback."""


class NasError(Exception):
    """A problem the user can fix; the message names it and the fix. Entry points print it and exit 2."""
