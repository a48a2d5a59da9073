"""Writing a trial point θ(s) = lerp(θ_t, θ_{t+1}, s) into a model-side tensor."""

from __future__ import annotations

from typing import Callable

import torch

from megatron_sharpness.backends.resolution import SIGNIFICAND_BITS

# Trial points are computed in slices, so that a write needs a bounded temporary instead of a
# second copy of the whole master shard. On a GPU a slice of 16 MiB of fp32 keeps the kernel
# launches few; on the CPU one of 1 MiB stays in the caches: 3–4× faster per element than 16 MiB
# slices (measured, one core).
LERP_CHUNK_ELEMENTS = 1 << 22
CPU_CHUNK_ELEMENTS = 1 << 18


def chunk_elements(device: torch.device) -> int:
    return LERP_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS


def lerp_into(target: torch.Tensor, old: torch.Tensor, new: torch.Tensor, weight: float,
              cast: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """target ← lerp(old, new, weight), cast to target's dtype (by `cast` where the framework
    rounds otherwise than to nearest even) and device. torch.lerp gives old exactly at weight 0
    and new exactly at weight 1."""
    target_flat, old_flat, new_flat = target.view(-1), old.view(-1), new.view(-1)
    chunk = chunk_elements(old_flat.device)
    for start in range(0, old_flat.numel(), chunk):
        end = start + chunk
        values = torch.lerp(old_flat[start:end], new_flat[start:end], weight)
        target_flat[start:end].copy_(values if cast is None else cast(values))


# Significand bits of the low-precision compute dtypes whose rounding makes the loss noisy; fp32
# and wider round below what the loss's own dtype resolves.
NOISY_COMPUTE_BITS = {dtype: SIGNIFICAND_BITS[dtype] for dtype in (torch.bfloat16, torch.float16)}
# Elements per slice of the noise write (its temporaries are a few of these).
_NOISE_CHUNK_ELEMENTS = 1 << 18
_HASH_MULTIPLIER, _SAMPLE_MULTIPLIER = 0x9E3779B1, 0x85EBCA77


@torch.no_grad()
def one_ulp_moved_into(target: torch.Tensor, old: torch.Tensor, new: torch.Tensor, compute_dtype: torch.dtype,
                       sample: int, offset: int = 0) -> None:
    """target ← θ_t in the compute dtype, with every element the step changed (old ≠ new) moved
    one compute-dtype ulp up or down, the direction a hash of its position (offset + index) and
    `sample`: the loss change is a sample of what rounding alone does to a trial point. No random
    generator is touched, and replicas that hold the same tensors move them alike."""
    bits = NOISY_COMPUTE_BITS[compute_dtype]
    target_flat, old_flat, new_flat = target.view(-1), old.view(-1), new.view(-1)
    for start in range(0, old_flat.numel(), _NOISE_CHUNK_ELEMENTS):
        end = min(start + _NOISE_CHUNK_ELEMENTS, old_flat.numel())
        before = old_flat[start:end]
        rounded = before.to(compute_dtype).float()
        _, exponent = torch.frexp(rounded)
        ulp = torch.ldexp(torch.ones_like(rounded), exponent - bits)
        position = torch.arange(offset + start, offset + end, dtype=torch.int64, device=before.device)
        hashed = (position * _HASH_MULTIPLIER + sample * _SAMPLE_MULTIPLIER) & 0xFFFFFFFF
        up = ((hashed >> 16) & 1).bool()
        moved = torch.where(up, rounded + ulp, rounded - ulp)
        target_flat[start:end].copy_(torch.where(new_flat[start:end] != before, moved, rounded))
