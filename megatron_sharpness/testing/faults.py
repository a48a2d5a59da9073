"""Fault injection for the multi-process tests: one rank raises torch.OutOfMemoryError at a chosen
probe forward (or returns NaN there, a transient fault of one rank's forward), or while the probe
snapshots θ_t, as a real OOM would."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist


class InjectedFault:
    """spec "RANK:STEP:CALL[:nan]": on global rank RANK, the CALL-th (1-based) loss computation of
    the probe during optimizer step STEP raises torch.OutOfMemoryError, or with ":nan" returns its
    result with every float tensor in it turned to NaN. None: never."""

    def __init__(self, spec: str | None):
        self.rank = self.step = self.call = None
        self.nan = False
        if spec is not None:
            rank, step, call, *kind = spec.split(":")
            if kind not in ([], ["nan"]):
                raise ValueError(f"fault spec {spec!r}: allowed RANK:STEP:CALL or RANK:STEP:CALL:nan")
            self.rank, self.step, self.call, self.nan = int(rank), int(step), int(call), kind == ["nan"]
        self.current_step: int | None = None
        self.calls = 0

    def at_step(self, step: int) -> None:
        self.current_step, self.calls = step, 0

    def check(self) -> bool:
        """Counts a loss computation; raises where this fault says, or says to poison it."""
        if self.rank is None or self.current_step != self.step or dist.get_rank() != self.rank:
            return False
        self.calls += 1
        if self.calls != self.call:
            return False
        if self.nan:
            return True
        raise torch.OutOfMemoryError(f"injected on rank {self.rank} at probe loss {self.call} of step {self.step}")

    def wrap(self, loss: Callable) -> Callable:
        """loss, raising (or turning NaN) where this fault says."""
        def checked(*args, **kwargs):
            poisoned = self.check()
            result = loss(*args, **kwargs)
            return _nan_in(result) if poisoned else result

        return checked


def _nan_in(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value * math.nan
    if isinstance(value, (tuple, list)):
        return type(value)(_nan_in(item) for item in value)
    if isinstance(value, dict):
        return {key: _nan_in(item) for key, item in value.items()}
    return value


@contextlib.contextmanager
def clone_runs_out_of_memory(active: bool) -> Iterator[None]:
    """While active, Tensor.clone raises torch.OutOfMemoryError (a θ_t snapshot that does not fit)."""
    if not active:
        yield
        return
    original = torch.Tensor.clone

    def failing(*args, **kwargs):
        raise torch.OutOfMemoryError("injected: no memory for the θ_t snapshot")

    torch.Tensor.clone = failing
    try:
        yield
    finally:
        torch.Tensor.clone = original


def snapshot_runs_out_of_memory(backend: Any, spec: str | None, current_step: Callable[[], int]) -> None:
    """spec "RANK:STEP": on global rank RANK, backend.snapshot() of optimizer step STEP (as
    current_step() tells it) runs out of memory while cloning θ_t. None: never."""
    if spec is None:
        return
    rank, step = (int(part) for part in spec.split(":"))
    snapshot = backend.snapshot

    def snapshot_that_may_not_fit() -> None:
        with clone_runs_out_of_memory(dist.get_rank() == rank and current_step() == step):
            snapshot()

    backend.snapshot = snapshot_that_may_not_fit
