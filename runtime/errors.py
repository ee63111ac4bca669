"""Errors the user can act on.

The command line prints these as one clear message, without a traceback; anything else that
escapes is a bug and keeps its traceback.
"""


class RuntimeToolError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class RebuildOnDevice(RuntimeToolError):
    """An engine that cannot run here: another GPU, another TensorRT, or a damaged file."""


class ManifestError(RuntimeToolError):
    """A bundle whose files do not match its manifest."""


class BackendUnavailable(RuntimeToolError):
    """The requested backend's library (or its GPU) is not present on this machine."""
