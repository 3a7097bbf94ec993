"""Errors meant for people: each names the value that was wrong and what to do instead."""


class ModelpressError(ValueError):
    """Bad input from the user (a path, a format name, a group size, a file's contents).

    The CLI prints these as one line and exits non-zero; library callers can catch them as ValueError.
    """
