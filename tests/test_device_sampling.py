"""The device sampler must select like model.sampling.Sampler: same greedy ids, same distributions, seeded repeats."""

import numpy as np
import pytest
import torch

from model.sampling import Sampler, SamplingConfig
from runtime.device_sampling import DeviceSampler

V = 50


def crafted_logits(batch=3, seed=0):
    """Random logits with exact ties and strongly negative / positive entries, so every filter has edges to cut."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(batch, V)).astype(np.float32)
    logits[:, 5] = logits[:, 6] = logits[:, 7]          # ties, also at the top-k boundary for some k
    logits[0, 10] = 9.0
    logits[-1, :4] = -8.0
    return logits


HISTORY = [[1, 2, 2, 10], [0, 3], []]


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7])
def test_greedy_matches_the_numpy_sampler(penalty):
    for seed in range(5):
        logits = crafted_logits(seed=seed)
        config = SamplingConfig(temperature=0.0, repetition_penalty=penalty)
        expected = Sampler(config)(logits, HISTORY)
        got = DeviceSampler(config, "cpu")(torch.from_numpy(logits), HISTORY)
        np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, 0, 1.0, 1.0), (0.7, 5, 1.0, 1.0), (1.3, 0, 0.8, 1.0), (0.9, 7, 0.6, 1.2), (1.0, 49, 0.95, 0.8),
    (1.0, 3, 1.0, 1.0), (2.0, 0, 0.05, 1.0)])
def test_filtered_distributions_match_the_numpy_sampler(temperature, top_k, top_p, penalty):
    config = SamplingConfig(temperature, top_k, top_p, penalty)
    reference, device = Sampler(config), DeviceSampler(config, "cpu")
    logits = crafted_logits(seed=3)
    expected = reference.probabilities(reference.penalized(logits, HISTORY))
    device.observe(HISTORY, V)
    got = device.probabilities(device.penalized(torch.from_numpy(logits))).double().numpy()
    np.testing.assert_allclose(got, expected, atol=2e-6)
    np.testing.assert_array_equal(got > 0, expected > 0)   # the same tokens survive the filters


def test_seeded_draws_repeat_and_follow_the_distribution():
    config = SamplingConfig(temperature=0.8, top_k=10, top_p=0.9, seed=7)
    logits = torch.from_numpy(crafted_logits()[1:2]).expand(20000, V).contiguous()
    a, b = DeviceSampler(config, "cpu")(logits), DeviceSampler(config, "cpu")(logits)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = DeviceSampler(SamplingConfig(temperature=0.8, top_k=10, top_p=0.9, seed=8), "cpu")(logits)
    assert (other != a).any()
    sampler = Sampler(config)
    probs = sampler.probabilities(sampler.penalized(logits[:1].numpy(), None))[0]
    freq = np.bincount(a.numpy(), minlength=V) / len(a)
    assert np.abs(freq - probs).max() < 0.015
    assert freq[probs == 0].sum() == 0


def test_history_is_read_incrementally():
    config = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    device = DeviceSampler(config, "cpu")
    history = [[1, 2]]
    logits = torch.zeros(1, V)
    device(logits, history)
    history[0] += [2, 30]
    device(logits, history)
    assert device.seen[0].nonzero().flatten().tolist() == [1, 2, 30]
