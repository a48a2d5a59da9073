"""The resolution floor: the smallest step multiple s at which the compute-dtype parameters move.

The forward pass reads the parameters in the compute dtype (bf16, fp16 or fp32), while a trial
point θ(s) = θ_t + s·(θ_{t+1} − θ_t) is formed in the fp32 master. For small s most elements round
back to their value at θ_t, and the loss differs from L(θ_t) by rounding alone: a "rise" or "fall"
there says nothing about curvature. For element i the compute-dtype value leaves round(θ_t,i) once
s·d_i crosses the rounding boundary half an ulp away,

    s_i = (round(θ_t,i) ± ulp/2 − θ_t,i) / d_i,   d_i = θ_{t+1},i − θ_t,i ≠ 0,

and the floor is the step multiple at which FLOOR_SHARE of the changed elements have moved. A
histogram of log2(s_i) with quarter-octave bins, summed over the ranks that hold different shards,
gives every rank the same floor (exact integer counts) at one pass over the shard and one
all-reduce of a few kilobytes.
"""

from __future__ import annotations

import torch

FLOOR_SHARE = 0.5
_BINS_PER_OCTAVE = 4
_LOG2_MIN, _LOG2_MAX = -160, 96
_BINS = (_LOG2_MAX - _LOG2_MIN) * _BINS_PER_OCTAVE
_CHUNK = 1 << 22
_MANTISSA_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


class ResolutionHistogram:
    """Counts of the per-element thresholds s_i; add() every (θ_t, θ_{t+1}) pair of this rank, sum
    `counts` over the ranks, then floor()."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(_BINS, dtype=torch.float64, device=device)

    @classmethod
    def of_step(cls, targets, olds, news, device: torch.device | str = "cpu") -> ResolutionHistogram:
        """This rank's histogram for a step: θ_t and θ_{t+1} per master tensor, and the model
        tensor each is copied into (its dtype is the compute dtype)."""
        histogram = cls(device)
        for target, old, new in zip(targets, olds, news):
            histogram.add(old, new, target.dtype)
        return histogram

    @torch.no_grad()
    def add(self, old: torch.Tensor, new: torch.Tensor, compute_dtype: torch.dtype) -> None:
        if compute_dtype not in _MANTISSA_BITS:
            raise TypeError(f"critical sharpness: compute dtype {compute_dtype} is not supported; "
                            f"supported: {', '.join(str(d) for d in _MANTISSA_BITS)}")
        bits = _MANTISSA_BITS[compute_dtype]
        tiny = torch.finfo(compute_dtype).tiny
        old_flat, new_flat = old.reshape(-1), new.reshape(-1)
        for start in range(0, old_flat.numel(), _CHUNK):
            before = old_flat[start:start + _CHUNK].double()
            step = new_flat[start:start + _CHUNK].double() - before
            moved = step != 0
            if not bool(moved.any()):
                continue
            before, step = before[moved], step[moved]
            rounded = before.to(compute_dtype).double()
            _, exponent = torch.frexp(rounded)
            ulp = torch.where(rounded == 0, torch.full_like(rounded, tiny), torch.ldexp(torch.ones_like(rounded), exponent - bits))
            boundary = rounded + torch.sign(step) * 0.5 * ulp
            threshold = ((boundary - before) / step).clamp_min(2.0 ** _LOG2_MIN)
            log2 = torch.log2(threshold).clamp(_LOG2_MIN, _LOG2_MAX - 1e-9)
            self.counts += torch.histc(log2, bins=_BINS, min=_LOG2_MIN, max=_LOG2_MAX).to(self.counts.device)

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
