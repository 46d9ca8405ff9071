"""One home for each default (issue 12): sampling in core/sampling.py, dtype and quant choices in
models/__init__.py (beside DEFAULT_MODEL); every surface reads them from there."""

from __future__ import annotations

import inspect

from streaming_llm.cli import build_parser
from streaming_llm import models as config
from streaming_llm.core import sampling


def _sub(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if getattr(a, "choices", None) and name in a.choices)
    return action.choices[name]


def _default(sub, dest):
    return next(a for a in sub._actions if a.dest == dest)


def test_sampling_defaults_have_one_home():
    from streaming_llm.server import app, serve

    p = sampling.SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (
        sampling.DEFAULT_TEMPERATURE, sampling.DEFAULT_TOP_P, sampling.DEFAULT_TOP_K, sampling.DEFAULT_REPETITION_PENALTY)
    assert (app.Settings("m").temperature, app.Settings("m").top_p) == (p.temperature, p.top_p)
    sig = inspect.signature(serve.build).parameters
    assert (sig["temperature"].default, sig["top_p"].default) == (p.temperature, p.top_p)
    for verb in ("serve", "chat"):
        sub = _sub(verb)
        assert _default(sub, "temperature").default == p.temperature and _default(sub, "top_p").default == p.top_p
    chat = _sub("chat")
    assert _default(chat, "top_k").default == p.top_k
    assert _default(chat, "repetition_penalty").default == p.repetition_penalty


def test_dtype_and_quant_choices_have_one_home():
    from streaming_llm.models import loading, quantize

    assert tuple(loading._DTYPES) == config.DTYPE_CHOICES
    assert quantize.QUANT_MODES == config.QUANT_CHOICES
    for verb in ("ppl", "chat", "serve", "bench", "attention-map"):
        sub = _sub(verb)
        dtype = _default(sub, "dtype")
        assert tuple(dtype.choices) == config.DTYPE_CHOICES and dtype.default == config.DEFAULT_DTYPE
    for verb in ("ppl", "chat", "serve", "bench"):
        assert tuple(_default(_sub(verb), "quant").choices) == config.QUANT_CHOICES
