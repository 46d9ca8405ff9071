"""`python -m streaming_llm` runs the `streaming-llm` command."""

import sys

from .cli import main

sys.exit(main())
