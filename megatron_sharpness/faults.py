"""Failures inside a probe, agreed on by every rank before any further collective.

A rank whose probe forward raised (an OOM in the loss, say) must not walk into restore()'s param
all-gather while its peers wait in the loss reduction: the job would hang until the process-group
timeout. So each backend folds a "failed" flag into the one reduction its loss() runs anyway:
every rank learns of a failure in the same collective, takes the same branch, and the probe
restores θ_{t+1} on all of them. What cannot be caught here: an exception inside a collective of
the forward itself (a tensor- or pipeline-parallel exchange), where the peers are already
waiting in a collective the failing rank will never join.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

# What a probe forward may raise and still leave the process usable: OOMs (torch.OutOfMemoryError
# is a RuntimeError), a loss_fn's own errors. Not KeyboardInterrupt / SystemExit.
CAUGHT = (Exception,)
# Where a snapshot does not fit.
OUT_OF_MEMORY = (MemoryError, torch.OutOfMemoryError)


@dataclass(frozen=True)
class RankError:
    """The original error of one rank, as text: 'OutOfMemoryError: CUDA out of memory ...'."""

    rank: int
    error: str
    # The caller's mistake (a loss_fn returning a string), not a fault: raised whatever on_error says.
    usage: bool = False

    @staticmethod
    def of(rank: int, error: BaseException) -> RankError:
        return RankError(rank, describe(error), isinstance(error, UsageError))


class UsageError(Exception):
    """Mixed into the errors that name a caller's mistake found inside a probe forward: raised on
    every rank at the first measurement, whatever on_error says, rather than recorded as failed."""


# The trial point of the probe forward under way (lr 0.0: L(θ_t); task None: the step's batch),
# for report_local_failure; set by the probe around each backend.loss().
_trial: tuple[float, str | None] | None = None


@contextlib.contextmanager
def trial_point(lr: float, task: str | None) -> Iterator[None]:
    global _trial
    outer, _trial = _trial, (lr, task)
    try:
        yield
    finally:
        _trial = outer


# Innermost frames of a local failure's traceback that report_local_failure prints.
REPORTED_FRAMES = 4


def report_local_failure(error: BaseException) -> None:
    """Prints this rank's own probe-forward error to stderr, once per error, before the rank goes
    into the collective that tells its peers. Where the failure happened inside a collective of the
    forward itself (a tensor-parallel all-reduce), the peers never reach that collective and the
    job hangs until the process-group timeout: the cause must be in the log before the wait. A
    caller's mistake (UsageError) is raised on every rank right after instead; single processes
    record the error and do not wait."""
    if isinstance(error, UsageError) or getattr(error, "_critical_sharpness_reported", False):
        return
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    # Never raises: the caller must reach the collective that tells its peers whatever happens here.
    with contextlib.suppress(Exception):
        error._critical_sharpness_reported = True
        where = "" if _trial is None else f" at trial lr {_trial[0]:.4E}" + (
            "" if _trial[1] is None else f" of relative task {_trial[1]!r}")
        frames = "".join(traceback.format_tb(error.__traceback__)[-REPORTED_FRAMES:])
        print(f"critical sharpness: rank {dist.get_rank()}: a probe forward raised{where}: {describe(error)}\n"
              f"  innermost frames (most recent call last):\n{frames}"
              "  waiting for the other ranks in the next collective; if the job hangs there until the process-group "
              "timeout, this error is the cause", file=sys.stderr, flush=True)


def describe(error: BaseException) -> str:
    # One line: the text lands in Megatron's `key: value |` log fields.
    text = f"{type(error).__name__}: {error}".replace("|", "/")
    return " ".join(text.split())[:500]


class ProbeFailure(Exception):
    """Raised on every rank alike once the ranks agreed that at least one of them failed."""

    def __init__(self, errors: Sequence[RankError], local: BaseException | None = None):
        self.errors = list(errors)
        self.local = local  # this rank's own error, None where only a peer failed
        first = self.errors[0]
        super().__init__(f"rank {first.rank}: {first.error}")

    @property
    def usage(self) -> bool:
        return any(error.usage for error in self.errors)


def device_of(group: dist.ProcessGroup | None = None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_loss(value: float, error: BaseException | None, local_non_finite: bool | None,
               group: dist.ProcessGroup | None = None) -> tuple[float, tuple[int, ...] | None]:
    """One all-reduce over `group` of [rank 0's value, failed ranks, ranks whose own partial loss
    was non-finite]: returns rank 0's value bitwise (the other ranks add zeros) or raises
    ProbeFailure on every rank. Only after a failure, which every rank then knows of, one more
    collective gathers the error texts; only where the non-finite count is > 0, one all-gather of
    the flags names those ranks. local_non_finite None: this rank's reduction cannot tell. The ranks are
    None when the agreed loss is finite, or non-finite while no rank could tell which."""
    values, count = _agree([value], error, local_non_finite, group, src=0)
    if count == 0:
        return values[0], None
    flag = torch.tensor([float(bool(local_non_finite))], dtype=torch.float64, device=device_of(group))
    flags = [torch.empty_like(flag) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, flag, group=group)
    ranks = tuple(_global_rank(group, index) for index, f in enumerate(flags) if f.item() > 0)
    return values[0], ranks


def _agree(values: Sequence[float], error: BaseException | None, local_non_finite: bool | None,
           group: dist.ProcessGroup | None, src: int) -> tuple[list[float], int]:
    rank = dist.get_rank()
    own = [0.0] * len(values) if rank != src or error is not None else [float(v) for v in values]
    packed = torch.tensor([*own, float(error is not None), float(bool(local_non_finite))],
                          dtype=torch.float64, device=device_of(group))
    dist.all_reduce(packed, group=group)
    if packed[-2].item() > 0:
        raise ProbeFailure(gather_errors(error, group), error)
    return packed[:-2].tolist(), int(packed[-1].item())


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


# Whether this rank's own part of the loss of the current probe forward was non-finite, noted by
# the loss reductions we ship (reduce_lm_loss, the DeepSpeed replay) right before they reduce it
# across ranks, where it is still this rank's; None: nothing noted (a reduction that cannot tell).
_local_non_finite: bool | None = None


def note_local_loss(partial: torch.Tensor) -> None:
    global _local_non_finite
    _local_non_finite = not bool(torch.isfinite(partial).all())


def take_local_non_finite() -> bool | None:
    """What note_local_loss() noted since the last call (None: nothing); forgets it."""
    global _local_non_finite
    noted, _local_non_finite = _local_non_finite, None
    return noted


def gather_errors(error: BaseException | None, group: dist.ProcessGroup | None = None) -> list[RankError]:
    """Every rank must call this (after agreeing that some rank failed); the failing ranks' errors."""
    own = None if error is None else RankError.of(dist.get_rank(), error)
    gathered: list[RankError | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, own, group=group)
    return sorted((e for e in gathered if e is not None), key=lambda e: e.rank)


def any_rank_failed(error: BaseException | None, group: dist.ProcessGroup | None = None) -> list[RankError]:
    """One all-reduce of a failed flag (and, only on a failure, the texts): the errors of every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [] if error is None else [RankError.of(0, error)]
    flag = torch.tensor([float(error is not None)], dtype=torch.float64, device=device_of(group))
    dist.all_reduce(flag, group=group)
    return gather_errors(error, group) if flag.item() > 0 else []


def snapshot_skip_reason(errors: Sequence[RankError]) -> str | None:
    """Why a measurement is skipped when the θ_t snapshot did not fit on some rank."""
    if not errors:
        return None
    first = errors[0]
    return f"the θ_t snapshot did not fit in memory (rank {first.rank}: {first.error})"
