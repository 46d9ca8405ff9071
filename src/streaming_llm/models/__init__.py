"""Loading models (aliases, GGUF, local folders, hub ids) and quantizing their weights.

Importing this package is light (no torch): the command line reads `DEFAULT_MODEL` from here."""

DEFAULT_MODEL = "smollm2-135m-instruct"  # the alias every verb loads by default (see loading.ALIASES)
