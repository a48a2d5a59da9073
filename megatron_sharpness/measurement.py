"""One measurement of critical sharpness, as a JSON record and as Megatron-style log fields.

The JSON keys are a contract: the CLI, the framework integrations and outside tools read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megatron_sharpness.search import SearchResult


@dataclass(frozen=True)
class TaskMeasurement:
    """The search along the step's direction for one loss."""

    search: SearchResult

    @property
    def forwards(self) -> int:
        return 1 + self.search.forwards  # the baseline L(θ_t) is one forward of its own

    def evaluations(self) -> list[list[float | str]]:
        """Every trial point as [lr, loss]."""
        return [[step_multiple * self.search.lr, _json_float(loss)]
                for step_multiple, loss in self.search.evaluations]

    def to_dict(self) -> dict[str, Any]:
        search = self.search
        return {
            "critical_lr": search.critical_lr,
            "critical_sharpness": search.critical_sharpness,
            "forwards": self.forwards,
            "bracket": list(search.bracket),
            "converged": search.converged,
            "loss": search.baseline_loss,
            "evaluations": self.evaluations(),
        }


@dataclass(frozen=True)
class Measurement:
    """Critical sharpness at one optimizer step: the step's own batch and each relative task.

    `skipped` names why a step that was due was not measured (e.g. the optimizer skipped it);
    then `task` is None and `relative` is empty.
    """

    step: int
    lr: float
    task: TaskMeasurement | None
    relative: dict[str, TaskMeasurement] = field(default_factory=dict)
    probe_seconds: float = 0.0
    skipped: str | None = None

    @property
    def critical_lr(self) -> float | None:
        return None if self.task is None else self.task.search.critical_lr

    @property
    def critical_sharpness(self) -> float | None:
        return None if self.task is None else self.task.search.critical_sharpness

    @property
    def lr_over_critical_lr(self) -> float | None:
        """η_t/η_c = η_t·λ_c/2: above 1 the real step raised the loss of its own batch."""
        critical_lr = self.critical_lr
        return None if critical_lr is None else self.lr / critical_lr

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "lr": self.lr,
            "critical_lr": self.critical_lr,
            "critical_sharpness": self.critical_sharpness,
            "lr_over_critical_lr": self.lr_over_critical_lr,
            "forwards": None if self.task is None else self.task.forwards,
            "bracket": None if self.task is None else list(self.task.search.bracket),
            "converged": None if self.task is None else self.task.search.converged,
            "loss": None if self.task is None else self.task.search.baseline_loss,
            "probe_seconds": self.probe_seconds,
            "relative": {name: task.to_dict() for name, task in self.relative.items()},
            "skipped": self.skipped,
        }
        if self.task is not None:
            record["evaluations"] = self.task.evaluations()
        return record

    def log_fields(self) -> str:
        """Fields for Megatron's iteration line: `critical sharpness: ... | critical lr: ... |`."""
        if self.task is None:
            return f"critical sharpness: skipped ({self.skipped}) |"
        parts = [
            f"critical sharpness: {_value_text(self.task.search, sharpness=True)}",
            f"critical lr: {_value_text(self.task.search, sharpness=False)}",
        ]
        ratio = self.lr_over_critical_lr
        if ratio is not None:
            parts.append(f"lr/critical lr: {ratio:.3f}")
        parts.append(f"sharpness forwards: {self.task.forwards}")
        for name, task in self.relative.items():
            parts.append(f"relative sharpness {name}: {_value_text(task.search, sharpness=True)}")
        return " | ".join(parts) + " |"


def _json_float(value: float) -> float | str:
    """JSON has no NaN or infinity, but a diverged trial point is worth keeping: write it as text."""
    return value if math.isfinite(value) else str(value)


def _value_text(search: SearchResult, sharpness: bool) -> str:
    """The critical lr or sharpness, or for a capped search the bound that is known."""
    value = search.critical_sharpness if sharpness else search.critical_lr
    if value is not None:
        return f"{value:.4E}"
    lo, hi = search.bracket
    above, bound = (True, lo) if hi is None else (False, hi)  # where η_c lies
    if sharpness:  # λ_c = 2/η_c turns the inequality around
        above, bound = not above, 2.0 / bound
    return f"{'>' if above else '<'} {bound:.4E} (capped)"
