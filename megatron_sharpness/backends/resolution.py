"""The resolution floor: the smallest step multiple s at which the compute-dtype parameters move.

The forward pass reads the parameters in the compute dtype (bf16, fp16 or fp32), while a trial
point θ(s) = θ_t + s·(θ_{t+1} − θ_t) is formed in the fp32 master. For small s most elements round
back to their value at θ_t, and the loss differs from L(θ_t) by rounding alone: a "rise" or "fall"
there says nothing about curvature. For element i the compute-dtype value leaves round(θ_t,i) once
s·d_i crosses the rounding boundary half an ulp away,

    s_i = (round(θ_t,i) ± ulp/2 − θ_t,i) / d_i,   d_i = θ_{t+1},i − θ_t,i ≠ 0,

and the floor is the step multiple at which FLOOR_SHARE of the changed elements have moved. A
histogram of log2(s_i) with quarter-octave bins, summed over the ranks that hold different shards,
gives every rank the same floor at one all-reduce of a few kilobytes.

The histogram is built from a fixed-size systematic sample of each rank's elements (every k-th
element, k prime so that it does not alias with row lengths), each sampled element counting k:
a quantile does not need every element, and the cost stays a few microseconds whatever the model
size. Where the sample holds too few changed elements to place a quantile (a step that moved a few
dozen elements, a group that few elements of the sample fall into), every changed element is
counted instead, in slices: that also answers exactly whether the step changed anything at all.
"""

from __future__ import annotations

from typing import Sequence

import torch

FLOOR_SHARE = 0.5
# Elements per rank the histogram samples, and the changed elements a sample must hold to be used
# (a median from 1024 samples is off by ~3 % in rank: a few hundredths of an octave here).
SAMPLE_ELEMENTS = 1 << 16
MIN_CHANGED_SAMPLED = 1024
SIGNIFICAND_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
_BINS_PER_OCTAVE = 4
_LOG2_MIN, _LOG2_MAX = -160, 96
_BINS = (_LOG2_MAX - _LOG2_MIN) * _BINS_PER_OCTAVE
# Slice of the exact pass over a sparse step: its mask and indices stay a few MiB.
_EXACT_CHUNK = 1 << 20

# (θ_t elements, θ_{t+1} elements, the compute dtype the forward reads them in), flat.
StepElements = tuple[torch.Tensor, torch.Tensor, torch.dtype]


class ResolutionHistogram:
    """Counts of the per-element thresholds s_i; build it with of_step()/of_segments() on every
    rank, sum `counts` over the ranks, then floor()."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(_BINS, dtype=torch.float64, device=device)

    @classmethod
    def of_step(cls, targets, olds, news, device: torch.device | str = "cpu",
                sample_elements: int = SAMPLE_ELEMENTS) -> ResolutionHistogram:
        """This rank's histogram for a step: θ_t and θ_{t+1} per master tensor, and the model
        tensor each is copied into (its dtype is the compute dtype)."""
        segments = [(old.reshape(-1), new.reshape(-1), target.dtype) for target, old, new in zip(targets, olds, news)]
        return cls.of_segments(segments, device, sample_elements)

    @classmethod
    def of_segments(cls, segments: Sequence[StepElements], device: torch.device | str = "cpu",
                    sample_elements: int = SAMPLE_ELEMENTS) -> ResolutionHistogram:
        for _, _, dtype in segments:
            if dtype not in SIGNIFICAND_BITS:
                raise TypeError(f"critical sharpness: compute dtype {dtype} is not supported; "
                                f"supported: {', '.join(str(d) for d in SIGNIFICAND_BITS)}")
        histogram = cls(device)
        total = sum(old.numel() for old, _, _ in segments)
        stride = _prime_at_least(-(-total // sample_elements))
        if stride > 1:
            sampled, offset = [], 0
            for old, new, dtype in segments:
                first = -offset % stride
                sampled.append((old[first::stride], new[first::stride], dtype))
                offset += old.numel()
            changed = sum((new != old).sum() for old, new, _ in sampled)
            if int(changed) >= MIN_CHANGED_SAMPLED:
                for old, new, dtype in sampled:
                    histogram._add(old, new, dtype, weight=stride)
                return histogram
        for old, new, dtype in segments:
            for start in range(0, old.numel(), _EXACT_CHUNK):
                before, after = old[start:start + _EXACT_CHUNK], new[start:start + _EXACT_CHUNK]
                changed = (after != before).nonzero().view(-1)
                if changed.numel():
                    histogram._add(before[changed], after[changed], dtype, weight=1)
        return histogram

    @torch.no_grad()
    def _add(self, old: torch.Tensor, new: torch.Tensor, compute_dtype: torch.dtype, weight: int) -> None:
        bits = SIGNIFICAND_BITS[compute_dtype]
        tiny = torch.finfo(compute_dtype).tiny
        before = old.double()
        step = new.double() - before
        moved = step != 0
        if not bool(moved.any()):
            return
        before, step = before[moved], step[moved]
        rounded = before.to(compute_dtype).double()
        _, exponent = torch.frexp(rounded)
        ulp = torch.where(rounded == 0, torch.full_like(rounded, tiny), torch.ldexp(torch.ones_like(rounded), exponent - bits))
        boundary = rounded + torch.sign(step) * 0.5 * ulp
        threshold = ((boundary - before) / step).clamp_min(2.0 ** _LOG2_MIN)
        log2 = torch.log2(threshold).clamp(_LOG2_MIN, _LOG2_MAX - 1e-9)
        self.counts += weight * torch.histc(log2, bins=_BINS, min=_LOG2_MIN, max=_LOG2_MAX).to(self.counts.device)

    def floor(self, share: float = FLOOR_SHARE) -> float:
        """The upper edge of the bin in which `share` of the changed elements have moved (0.0 when
        nothing changed)."""
        total = float(self.counts.sum())
        if total == 0:
            return 0.0
        cumulative = torch.cumsum(self.counts, 0)
        index = int(torch.searchsorted(cumulative, torch.tensor([share * total], dtype=torch.float64,
                                                                device=cumulative.device)).item())
        return 2.0 ** (_LOG2_MIN + (index + 1) / _BINS_PER_OCTAVE)


def _prime_at_least(n: int) -> int:
    if n <= 2:
        return max(n, 1)
    candidate = n | 1
    while any(candidate % d == 0 for d in range(3, int(candidate ** 0.5) + 1, 2)):
        candidate += 2
    return candidate
