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
    """spec "RANK:STEP:CALL[:nan][@GROUP]", or several of them joined by commas: on global rank
    RANK, the CALL-th (1-based) loss computation of the probe during optimizer step STEP raises
    torch.OutOfMemoryError, or with ":nan" returns its result with every float tensor in it turned
    to NaN. With "@GROUP" CALL counts the loss computations of the module breakdown's search of that
    group only (see follow_groups). None: never."""

    def __init__(self, spec: str | None):
        self.faults: list[tuple[int, int, int, bool, str | None]] = []
        for part in [] if spec is None else spec.split(","):
            where, _, group = part.partition("@")
            rank, step, call, *kind = where.split(":")
            if kind not in ([], ["nan"]) or (group == "" and "@" in part):
                raise ValueError(f"fault spec {part!r}: allowed RANK:STEP:CALL, RANK:STEP:CALL:nan, "
                                 "either followed by @GROUP")
            self.faults.append((int(rank), int(step), int(call), kind == ["nan"], group or None))
        self.current_step: int | None = None
        self.calls = 0
        self.group: str | None = None  # the breakdown's group being searched (follow_groups)
        self.group_calls = 0

    def at_step(self, step: int) -> None:
        self.current_step, self.calls = step, 0

    def follow_groups(self, backend: Any, groups_of: Callable[[list[str]], dict[str, list[str]]]) -> None:
        """Tell "@GROUP" faults which group the probe searches: backend.select_group(names) is the
        probe's switch to a group; groups_of(parameter names) names the groups as the probe does."""
        select = backend.select_group

        def select_and_note(names):
            select(names)
            groups = groups_of(backend.parameter_names())
            self.group = None if names is None else next(g for g, members in groups.items() if list(members) == list(names))
            self.group_calls = 0

        backend.select_group = select_and_note

    def check(self) -> bool:
        """Counts a loss computation; raises where a fault says, or says to poison it."""
        self.calls += 1
        self.group_calls += self.group is not None
        for rank, step, call, nan, group in self.faults:
            if self.current_step != step or dist.get_rank() != rank or group not in (None, self.group):
                continue
            if (self.calls if group is None else self.group_calls) != call:
                continue
            if nan:
                return True
            where = "" if group is None else f" of group {group}"
            raise torch.OutOfMemoryError(f"injected on rank {rank} at probe loss {call}{where} of step {step}")
        return False

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
