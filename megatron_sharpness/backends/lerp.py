"""Writing a trial point θ(s) = lerp(θ_t, θ_{t+1}, s) into a model-side tensor."""

from __future__ import annotations

import torch

# Trial points are computed in slices of at most this many elements, so that a write needs a
# bounded temporary (16 MiB of fp32) instead of a second copy of the whole master shard.
LERP_CHUNK_ELEMENTS = 1 << 22


def lerp_into(target: torch.Tensor, old: torch.Tensor, new: torch.Tensor, weight: float) -> None:
    """target ← lerp(old, new, weight), cast to target's dtype and device. torch.lerp gives old
    exactly at weight 0 and new exactly at weight 1."""
    target_flat, old_flat, new_flat = target.view(-1), old.view(-1), new.view(-1)
    for start in range(0, old_flat.numel(), LERP_CHUNK_ELEMENTS):
        end = start + LERP_CHUNK_ELEMENTS
        target_flat[start:end].copy_(torch.lerp(old_flat[start:end], new_flat[start:end], weight))
