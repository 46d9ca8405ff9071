"""Loading models (aliases, GGUF, local folders, hub ids) and quantizing their weights.

Importing this package is light (no torch): the command line reads its defaults and choices from here."""

DEFAULT_MODEL = "smollm2-135m-instruct"  # the alias every verb loads by default (see loading.ALIASES)
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPE = "float32"
QUANT_CHOICES = ("auto", "none", "int8", "int4", "bf16")  # auto: int4 for 4-bit GGUF weights, else none
