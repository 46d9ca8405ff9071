"""Error types shared by every layer.

`UserError` marks an expected failure caused by the user's input or environment (unknown model,
missing file, bad flag value, unsupported architecture). Front ends print its message without a
traceback and exit non-zero (the CLI) or answer 4xx (the server). Anything else is a bug.
"""


class UserError(Exception):
    """An expected failure with a message meant for the user."""


class ModelLoadError(UserError):
    """The model could not be found or loaded."""


class UnsupportedModelError(UserError):
    """The model cannot be streamed exactly (e.g. no rotary position embedding)."""
