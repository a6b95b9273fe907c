"""Sampling filters against a direct reference, and draws against the exact distribution."""

import math

import numpy as np
import pytest
import torch

from gemmalite.errors import InvalidArgumentError
from gemmalite.sampling import SamplingSettings, filter_logits, gumbel_noise, hash32, sample, sampler_state


def reference_distribution(logits: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
    """The filtered softmax, written the plain way with numpy: what sampling must draw from."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.ones_like(z, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    if top_p < 1:
        cumulative = 0.0
        for i in order:
            if not keep[i]:
                continue
            if cumulative >= top_p:
                keep[i] = False
            cumulative += p[i]
    keep &= z >= z.max() + math.log(min_p) if min_p > 0 else keep
    q = np.exp(z - z.max()) * keep
    return q / q.sum()


CASES = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.7, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0),
    dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=12, top_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_filters_keep_exactly_the_reference_set(case):
    torch.manual_seed(0)
    logits = torch.randn(3, 64) * 2
    state = sampler_state(SamplingSettings(**case, seed=0), 3, "cpu")
    filtered = filter_logits(logits, state)
    for row in range(3):
        expected = reference_distribution(logits[row].numpy(), **case)
        got = torch.softmax(filtered[row].double(), -1).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_draws_follow_the_filtered_softmax(case):
    """Chi-square test of 20000 draws over a 16-token vocab; filtered tokens never appear."""
    from scipy.stats import chisquare

    torch.manual_seed(1)
    logits = torch.randn(16) * 1.5
    draws = 20_000
    state = sampler_state(SamplingSettings(**case, seed=42), draws, "cpu")  # one row per draw
    positions = torch.zeros(draws, dtype=torch.long)
    tokens = sample(logits.expand(draws, 16), state, positions)
    counts = np.bincount(tokens.numpy(), minlength=16)
    expected = reference_distribution(logits.numpy(), **case)
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    result = chisquare(counts[support], expected[support] * draws)
    assert result.pvalue > 1e-3, (counts, expected * draws)


def test_noise_is_uniform_and_independent_of_neighbours():
    keys = hash32(torch.arange(4))
    g = gumbel_noise(keys, torch.tensor([0, 1, 2, 3]), 50_000)
    u = torch.exp(-torch.exp(-g))  # back to uniform
    assert abs(u.mean().item() - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert (hist / hist.sum() - 0.1).abs().max() < 0.01
    rows = g.numpy()
    assert abs(np.corrcoef(rows[0], rows[1])[0, 1]) < 0.02


def test_temperature_zero_rows_are_greedy_inside_a_sampling_batch():
    logits = torch.randn(2, 50)
    state = sampler_state(SamplingSettings(temperature=1.0, seed=3), 2, "cpu")
    state = state._replace(temperature=torch.tensor([0.0, 1.0]))
    assert sample(logits, state, torch.zeros(2, dtype=torch.long))[0] == logits[0].argmax()


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(top_p=0.0),
        dict(top_p=1.01),
        dict(min_p=-0.1),
        dict(min_p=1.5),
        dict(seed="x"),
    ],
)
def test_invalid_settings_are_refused(bad):
    with pytest.raises(InvalidArgumentError):
        SamplingSettings(**bad)
