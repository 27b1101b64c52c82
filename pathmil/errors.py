"""Errors a user can cause and fix.

A :class:`PathmilError` carries one line that names the thing at fault (a slide, a table, a setting) and
the fix. The command line prints that line alone, without a traceback, and exits with status 1; batch
commands record it in their failures table and go on. Any other exception is a bug and keeps its traceback.
"""


class PathmilError(Exception):
    """A problem with the user's input, explained in one line."""


class SlideError(PathmilError):
    """A slide that cannot be opened, read, or tiled."""

    def __init__(self, slide: str, cause: str):
        self.slide = slide
        self.cause = cause
        super().__init__(f"slide {slide}: {cause}")


class UpstreamFailure(PathmilError):
    """An earlier stage failed for this slide; ``stage`` keeps its name for the failures table."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


class UnsafeFileError(PathmilError):
    """A torch file whose pickle would build objects other than tensors and plain data: never loaded."""
