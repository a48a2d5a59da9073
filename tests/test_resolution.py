"""The sampled resolution floor against the exact one (every changed element counted)."""

import math

import pytest
import torch

from megatron_sharpness.backends.resolution import MIN_CHANGED_SAMPLED, ResolutionHistogram

EXACT = 1 << 40  # a sample at least as large as the tensors: every element counted


def adam_like_step(sizes, lr, seed):
    """θ_t of a trained model's scale and an Adam-like update of lr per element (fp32 masters)."""
    generator = torch.Generator().manual_seed(seed)
    olds = [0.05 * torch.randn(size, generator=generator) for size in sizes]
    news = [old - lr * torch.sign(torch.randn(size, generator=generator)) *
            torch.rand(size, generator=generator) for old, size in zip(olds, sizes)]
    return olds, news


def floors(olds, news, dtype, **kwargs):
    segments = [(old, new, dtype) for old, new in zip(olds, news)]
    return ResolutionHistogram.of_segments(segments, **kwargs).floor()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lr", [1e-6, 1e-4, 1e-2])
def test_sampled_floor_is_the_exact_floor_within_one_bin(dtype, lr):
    # Tensors of awkward and power-of-two sizes (rows a stride could alias with), sampled at 1/31.
    olds, news = adam_like_step([100_003, 1 << 17, 1024 * 64, 7, 33], lr, seed=int(-math.log10(lr)))
    exact = floors(olds, news, dtype, sample_elements=EXACT)
    sampled = floors(olds, news, dtype, sample_elements=10_000)
    assert exact > 0
    assert 2 ** -0.25 <= sampled / exact <= 2 ** 0.25, (sampled, exact)  # a quarter-octave bin


def test_a_step_that_moved_few_elements_is_counted_exactly():
    # 40 changed elements in 1M: no sample of 65536 would see enough of them to place a quantile.
    olds, news = adam_like_step([1 << 20], 1e-2, seed=3)
    new = olds[0].clone()
    changed = torch.randperm(1 << 20, generator=torch.Generator().manual_seed(0))[:40]
    new[changed] = news[0][changed]
    assert floors(olds, [new], torch.bfloat16) == floors(olds, [new], torch.bfloat16, sample_elements=EXACT) > 0
    assert floors(olds, [olds[0].clone()], torch.bfloat16) == 0.0  # nothing changed: no floor at all


def test_sampled_counts_estimate_the_number_of_changed_elements():
    olds, news = adam_like_step([1 << 20], 1e-3, seed=5)
    news[0][: 1 << 19] = olds[0][: 1 << 19]  # half of the elements do not move
    histogram = ResolutionHistogram.of_segments([(olds[0], news[0], torch.bfloat16)], sample_elements=20_000)
    assert histogram.counts.sum().item() == pytest.approx(1 << 19, rel=0.05)
    assert MIN_CHANGED_SAMPLED <= (1 << 19) / 53  # the sample (stride 53) was used, not the exact pass
