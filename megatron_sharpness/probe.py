"""The measurement driver: when to measure, one search per task along the step's direction, warm
starts, and the fan-out of records to loggers. Framework specifics live in a ProbeBackend."""

from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

from megatron_sharpness.backends.base import ProbeBackend
from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.loggers import MeasurementLogger
from megatron_sharpness.measurement import Measurement, TaskMeasurement
from megatron_sharpness.search import critical_lr_search


class SharpnessProbe:
    def __init__(self, config: SharpnessConfig, loggers: Iterable[MeasurementLogger] = ()):
        self.config = config
        self.loggers = list(loggers)
        # Last converged critical lr per task (None = the step's own batch), in lr units so that
        # the warm start survives lr schedules.
        self._last_critical_lr: dict[str | None, float] = {}

    def is_due(self, step: int) -> bool:
        return self.config.enabled and step % self.config.interval == 0

    def measure(self, backend: ProbeBackend, step: int, lr: float,
                relative_tasks: Sequence[str] = ()) -> Measurement:
        """Call after backend.snapshot() and the real optimizer.step(). Always restores θ_{t+1}."""
        started = time.perf_counter()
        task: TaskMeasurement | None = None
        relative: dict[str, TaskMeasurement] = {}
        skipped: str | None = None
        try:
            if not (math.isfinite(lr) and lr > 0.0):
                skipped = f"lr is {lr}"
            elif not backend.after_step():
                skipped = "the step changed no parameter (skipped step or zero update)"
            else:
                task, skipped = self._search(backend, None, lr)
                for name in relative_tasks:
                    if skipped is not None:
                        break
                    relative[name], skipped = self._search(backend, name, lr)
        finally:
            backend.restore()
        if skipped is not None:
            task, relative = None, {}
        measurement = Measurement(step=step, lr=lr, task=task, relative=relative,
                                  probe_seconds=time.perf_counter() - started, skipped=skipped)
        for logger in self.loggers:
            logger.log(measurement)
        return measurement

    def _search(self, backend: ProbeBackend, name: str | None,
                lr: float) -> tuple[TaskMeasurement | None, str | None]:
        backend.write(0.0)
        baseline = backend.loss(name)
        if not math.isfinite(baseline):
            label = "the step's batch" if name is None else f"relative task {name!r}"
            return None, f"loss of {label} is {baseline} before the step"
        guess = self.config.initial_guess
        if self.config.warm_start and name in self._last_critical_lr:
            guess = self._last_critical_lr[name] / lr

        def loss_at(step_multiple: float) -> float:
            backend.write(step_multiple)
            return backend.loss(name)

        search = critical_lr_search(loss_at, baseline, lr=lr, initial_step_multiple=guess,
                                    tol=self.config.tol, max_search=self.config.max_search)
        if search.critical_lr is not None:
            self._last_critical_lr[name] = search.critical_lr
        return TaskMeasurement(search), None

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
