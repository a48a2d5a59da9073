"""Ground truth for the tests: where a loss first rises along a line, by a dense scan, and how far
apart two tensors lie in bf16 ulps."""

from __future__ import annotations

from typing import Callable

import torch


def first_crossing(loss: Callable[[float], float], baseline: float, low: float, high: float) -> float | None:
    """Smallest s of a geometric scan of [low, high] (41 points) with loss(s) > baseline, refined by
    16 bisections; None where the loss never rises there."""
    previous = 0.0
    for s in [low * (high / low) ** (i / 40) for i in range(41)]:
        if loss(s) > baseline:
            lo, hi = previous, s
            for _ in range(16):
                mid = 0.5 * (lo + hi)
                lo, hi = (lo, mid) if loss(mid) > baseline else (mid, hi)
            return hi
        previous = s
    return None


def ulps_apart(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> float:
    """How many bf16 ulps (the precision local writes keep the step in) x lies from y at most,
    ulps taken at the largest of |x|, |y| and |scale| (θ_{t+1}: a trial point near zero has tiny
    ulps of its own)."""
    largest = torch.maximum(torch.maximum(x.float().abs(), y.float().abs()), scale.float().abs())
    _, exponent = torch.frexp(largest)
    ulp = torch.ldexp(torch.full_like(largest, torch.finfo(torch.bfloat16).eps), exponent - 1)
    return ((x.float() - y.float()).abs() / ulp).max().item() if x.numel() else 0.0
