"""RNG state the probe's forwards must neither consume nor depend on.

Besides torch's CPU and CUDA generators, Megatron-style models draw dropout (and TP weight init)
from named generator states that a "CUDA RNG tracker" swaps in and out of the device generator:
megatron-core's, Megatron-DeepSpeed's copy of it (the same module path) and DeepSpeed's
activation-checkpointing tracker. Those states live outside torch's generators, so capturing
torch's alone leaves the tracker advanced by every probe forward (training differs afterwards)
and gives each trial point different dropout masks.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

# Modules that hold a global tracker in `_CUDA_RNG_STATE_TRACKER`. Only modules already imported
# are looked at: a framework that was never imported cannot have drawn from its tracker.
TRACKER_MODULES = (
    "megatron.core.tensor_parallel.random",  # megatron-core, Megatron-LM, Megatron-DeepSpeed
    "deepspeed.runtime.activation_checkpointing.checkpointing",  # DeepSpeed (also used by Megatron-DeepSpeed)
)


def rng_trackers() -> list[Any]:
    """The distinct trackers of the imported frameworks that hold at least one named state."""
    trackers: list[Any] = []
    for name in TRACKER_MODULES:
        tracker = getattr(sys.modules.get(name), "_CUDA_RNG_STATE_TRACKER", None)
        if tracker is None or any(tracker is seen for seen in trackers):
            continue
        if tracker.get_states():
            trackers.append(tracker)
    return trackers


def _copy_state(state: Any) -> Any:
    # Tracker states are generator-state tensors, or torch.Generator objects where megatron-core
    # keeps CUDA-graph-safe states; a fork advances them, so each restore hands out fresh copies.
    if isinstance(state, torch.Generator):
        return state.clone_state()
    return state.clone()


class RngState:
    """torch's CPU and (if initialized) CUDA generators, plus every tracker's named states.
    Restoring before every trial forward gives each trial point the same dropout masks; restoring
    at the end leaves training's streams as if no probe had run."""

    def __init__(self, cpu: torch.Tensor, cuda: list[torch.Tensor] | None,
                 trackers: list[tuple[Any, dict[str, Any]]]):
        self.cpu, self.cuda, self.trackers = cpu, cuda, trackers

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        trackers = [(tracker, {name: _copy_state(state) for name, state in tracker.get_states().items()})
                    for tracker in rng_trackers()]
        return cls(torch.get_rng_state(), cuda, trackers)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        for tracker, states in self.trackers:
            # set_states keeps the dict it is given and forks write into it: never hand out ours.
            tracker.set_states({name: _copy_state(state) for name, state in states.items()})
