"""The one exception type users see: a single line naming the file or value and what to do."""


class ClipxferError(Exception):
    """A problem with the user's input or environment, reported as one clear message.

    The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """


class ImageDecodeError(ClipxferError):
    """A file could not be turned into an RGB image; ``reason`` is the short why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
