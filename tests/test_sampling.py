"""The sampler's top-p filter against a literal full-sort reference."""

import pytest
import torch

from streaming_llm.core.sampling import Sampler, SamplingParams, nucleus


def sorted_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The rule written the direct way: sort the whole vocabulary, keep the tokens whose
    probability before them sums to less than top_p."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs >= top_p
    out = logits.clone()
    out[order[drop]] = float("-inf")
    return out


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0, 30.0])  # from nearly flat (nucleus of thousands) to peaked
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_keeps_the_same_tokens_as_a_full_sort(scale, top_p):
    g = torch.Generator().manual_seed(int(scale * 100) + int(top_p * 1000))
    logits = torch.randn(5000, generator=g) * scale
    logits[:7] = float("-inf")  # masked tokens (a grammar) are never kept
    got, want = nucleus(logits, top_p), sorted_nucleus(logits, top_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(want)])


def test_nucleus_of_a_flat_distribution_needs_the_whole_vocabulary():
    logits = torch.zeros(1000)
    assert torch.isfinite(nucleus(logits, 0.999)).sum() == 999
    assert torch.isfinite(nucleus(logits, 1.0 - 1e-9)).sum() == 1000


def test_seeded_sampling_with_top_p_stays_in_the_nucleus_and_repeats():
    logits = torch.randn(3000, generator=torch.Generator().manual_seed(3)) * 4
    allowed = set(torch.nonzero(torch.isfinite(sorted_nucleus(logits, 0.5))).flatten().tolist())
    draw = lambda: [Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=11)).sample(logits) for _ in range(20)]
    first = draw()
    assert set(first) <= allowed and first == draw()


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.5),
                                    SamplingParams(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.3, seed=1)])
def test_sampling_leaves_the_callers_logits_as_they_were(params):
    """The sampler copies the logits only where it changes them in place (a repetition penalty,
    a grammar); either way the caller's tensor (a batch's logits row) is never changed."""
    logits = torch.randn(2000, generator=torch.Generator().manual_seed(5)) * 3
    before = logits.clone()
    sampler = Sampler(params)
    picked = [sampler.sample(logits, previous=[int(torch.argmax(logits)), 3, 9]) for _ in range(3)]
    assert torch.equal(logits, before)
    if params.temperature == 0 and params.repetition_penalty == 1.0:
        assert picked == [int(torch.argmax(before))] * 3
