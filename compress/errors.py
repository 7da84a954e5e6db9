"""The error type the CLI turns into a one-line message and a non-zero exit code."""


class CompressError(Exception):
    """A problem with the user's input (paths, files, options, models) that they can act on."""


def first_line(e: BaseException) -> str:
    """The first line of an exception from another library, for a one-line error (its type when empty)."""
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__
