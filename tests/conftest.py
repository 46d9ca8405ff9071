import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random llama saved as a model folder, for tests that load a model by path (a module may
    define its own)."""
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama")


@pytest.fixture
def cli(capsys):
    """`streaming-llm ARGV...` run in-process: returns (exit code, stdout, stderr)."""
    from streaming_llm.cli import main

    def run(*argv):
        rc = main(list(argv))
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    return run
