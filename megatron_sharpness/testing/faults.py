"""Fault injection for the multi-process tests: one rank raises torch.OutOfMemoryError at a chosen
probe forward, or while the probe snapshots θ_t, as a real OOM would."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist


class InjectedFault:
    """spec "RANK:STEP:CALL": on global rank RANK, the CALL-th (1-based) loss computation of the
    probe during optimizer step STEP raises. None: never."""

    def __init__(self, spec: str | None):
        self.rank = self.step = self.call = None
        if spec is not None:
            self.rank, self.step, self.call = (int(part) for part in spec.split(":"))
        self.current_step: int | None = None
        self.calls = 0

    def at_step(self, step: int) -> None:
        self.current_step, self.calls = step, 0

    def check(self) -> None:
        if self.rank is None or self.current_step != self.step or dist.get_rank() != self.rank:
            return
        self.calls += 1
        if self.calls == self.call:
            raise torch.OutOfMemoryError(f"injected on rank {self.rank} at probe loss {self.call} of step {self.step}")

    def wrap(self, loss: Callable) -> Callable:
        """loss, raising where this fault says."""
        def checked(*args, **kwargs):
            self.check()
            return loss(*args, **kwargs)

        return checked


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
