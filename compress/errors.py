"""The error type the CLI turns into a one-line message and a non-zero exit code."""


class CompressError(Exception):
    """A problem with the user's input (paths, files, options, models) that they can act on."""
