"""The measurement driver: when to measure, one search per task along the step's direction, warm
starts, and the fan-out of records to loggers. Framework specifics live in a ProbeBackend."""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping, Sequence

from megatron_sharpness.backends.base import ProbeBackend
from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.loggers import MeasurementLogger
from megatron_sharpness.faults import ProbeFailure
from megatron_sharpness.measurement import Measurement, ProbeError, TaskMeasurement
from megatron_sharpness.search import critical_lr_search

# Version of state_dict()'s layout, checked on load.
STATE_VERSION = 1


class SharpnessProbe:
    def __init__(self, config: SharpnessConfig, loggers: Iterable[MeasurementLogger] = ()):
        self.config = config
        self.loggers = list(loggers)
        # Last converged critical lr per task (None = the step's own batch), in lr units so that
        # the warm start survives lr schedules. Only converged results: a bound or an ascent is
        # no place to start from.
        self._last_critical_lr: dict[str | None, float] = {}
        # Per task of the current measurement: the ranks whose own part of a non-finite loss was.
        self._non_finite_ranks: dict[str | None, set[int]] = {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to measure as the uninterrupted one would: the warm starts.
        Plain Python values (torch.save / JSON friendly); the step's batch is task None."""
        return {"version": STATE_VERSION,
                "last_critical_lr": [[name, lr] for name, lr in self._last_critical_lr.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(f"critical sharpness: not a probe state of version {STATE_VERSION}: {state!r:.120}")
        restored: dict[str | None, float] = {}
        for entry in state["last_critical_lr"]:
            name, lr = entry
            if not (name is None or isinstance(name, str)) or not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"critical sharpness: bad warm start {entry!r} in the probe state; "
                                 "allowed: [task name or None, finite lr > 0]")
            restored[name] = lr
        self._last_critical_lr = restored

    def is_due(self, step: int) -> bool:
        return self.config.enabled and step % self.config.interval == 0

    def measure(self, backend: ProbeBackend, step: int, lr: float,
                relative_tasks: Sequence[str] = (), training_loss: float | None = None) -> Measurement:
        """Call after backend.snapshot() and the real optimizer.step(). Always restores θ_{t+1}.
        training_loss: L(θ_t) of the step's batch where the training forward gave bitwise the number
        a probe forward would (reduced like backend.loss); saves that forward."""
        started = time.perf_counter()
        self._non_finite_ranks = {}
        searches: dict[str | None, TaskMeasurement] = {}
        skipped = failure = error = None
        try:
            skipped = self._skip_reason(backend, lr)
            if skipped is None:
                evaluated = [name for name in (None, *relative_tasks) if name is not None or training_loss is None]
                if evaluated:
                    backend.write(0.0)
                baselines = {name: self._loss(backend, name, 0.0, lr) for name in evaluated}
                if training_loss is not None:
                    baselines = {None: training_loss, **baselines}
                skipped = _non_finite_baseline(baselines, self._non_finite_ranks)
            if skipped is None:
                floor = backend.resolution_floor()
                searches = {name: self._search(backend, name, lr, baseline, floor,
                                               baseline_reused=name is None and training_loss is not None)
                            for name, baseline in baselines.items()}
        except _FailedAt as caught:
            # Every rank raised this in the same collective: all of them restore below alike.
            failure, error, searches = caught.error, caught.__cause__, {}
        finally:
            backend.restore()
        if isinstance(error, ProbeFailure) and error.usage:
            # A caller's mistake (e.g. a loss_fn returning a string) is no fault to skip over.
            raise error.local or RuntimeError(f"critical sharpness: {failure.text()}")
        measurement = Measurement(step=step, lr=lr, task=searches.pop(None, None), relative=searches,
                                  probe_seconds=time.perf_counter() - started, skipped=skipped, error=failure)
        for logger in self.loggers:
            logger.log(measurement)
        if failure is not None and self.config.on_error == "raise":
            raise RuntimeError(f"critical sharpness: the measurement at step {step} failed "
                               f"({failure.text()}); on_error='raise'") from error
        return measurement

    def _loss(self, backend: ProbeBackend, name: str | None, step_multiple: float, lr: float) -> float:
        try:
            loss = backend.loss(name)
        except ProbeFailure as caught:
            first = caught.errors[0]
            raise _FailedAt(ProbeError(first.rank, first.error, step_multiple * lr, name,
                                       tuple(e.rank for e in caught.errors))) from caught
        if not math.isfinite(loss):
            # Which ranks' own part of the loss was non-finite, where the backend's reduction tells.
            self._non_finite_ranks.setdefault(name, set()).update(getattr(backend, "non_finite_ranks", None) or ())
        return loss

    @staticmethod
    def _skip_reason(backend: ProbeBackend, lr: float) -> str | None:
        if not (math.isfinite(lr) and lr > 0.0):
            return f"lr is {lr}"
        return backend.after_step()

    def _search(self, backend: ProbeBackend, name: str | None, lr: float, baseline: float,
                floor: float, baseline_reused: bool = False) -> TaskMeasurement:
        guess = self.config.initial_guess
        if self.config.warm_start and name in self._last_critical_lr:
            guess = self._last_critical_lr[name] / lr

        def loss_at(step_multiple: float) -> float:
            backend.write(step_multiple)
            return self._loss(backend, name, step_multiple, lr)

        search = critical_lr_search(loss_at, baseline, lr=lr, initial_step_multiple=guess,
                                    tol=self.config.tol, max_search=self.config.max_search,
                                    resolution_floor=floor, method=self.config.search)
        if search.critical_lr is not None:
            self._last_critical_lr[name] = search.critical_lr
        ranks = self._non_finite_ranks.get(name)
        return TaskMeasurement(search, baseline_reused, tuple(sorted(ranks)) if ranks else None)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _non_finite_baseline(baselines: dict[str | None, float], ranks: Mapping[str | None, set[int]]) -> str | None:
    for name, loss in baselines.items():
        if not math.isfinite(loss):
            label = "the step's batch" if name is None else f"relative task {name!r}"
            where = f" (on rank {', '.join(map(str, sorted(ranks[name])))})" if ranks.get(name) else ""
            return f"loss of {label} is {loss} before the step{where}"
    return None


class _FailedAt(Exception):
    """A ProbeFailure with the trial point it happened at."""

    def __init__(self, error: ProbeError):
        super().__init__(error.text())
        self.error = error
