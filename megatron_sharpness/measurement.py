"""One measurement of critical sharpness, as a JSON record and as Megatron-style log fields.

The JSON keys are a contract: the CLI, the framework integrations and outside tools read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from megatron_sharpness.search import TRUSTED_SLOPE_RATIO, Outcome, SearchResult

if TYPE_CHECKING:
    from megatron_sharpness.policies import GuardAction


@dataclass(frozen=True)
class TaskMeasurement:
    """The search along the step's direction for one loss. baseline_reused: L(θ_t) is the training
    forward's own loss, not a forward of the probe. non_finite_ranks: where a trial loss was
    non-finite, the ranks whose own part of it was (None: no such loss, or the reduction cannot tell).
    noise_forwards: forwards spent sampling the loss's rounding noise for this task."""

    search: SearchResult
    baseline_reused: bool = False
    non_finite_ranks: tuple[int, ...] | None = None
    noise_forwards: int = 0

    @property
    def forwards(self) -> int:
        return self.search.forwards + (0 if self.baseline_reused else 1) + self.noise_forwards

    @property
    def status(self) -> str:
        return self.search.outcome.value

    def evaluations(self) -> list[list[float | str]]:
        """Every trial point as [lr, loss], in the order evaluated (negative lrs: the slope)."""
        return [[step_multiple * self.search.lr, _json_float(loss)]
                for step_multiple, loss in self.search.evaluations]

    def to_dict(self) -> dict[str, Any]:
        search = self.search
        return {
            "status": self.status,
            "critical_lr": search.critical_lr,
            "critical_sharpness": search.critical_sharpness,
            "step_raised_loss": search.step_raised_loss,
            "slope": _json_float(search.slope) if search.slope is not None else None,
            "bracket_slope_ratio": _optional_float(search.bracket_slope_ratio),
            "loss_noise": search.loss_noise,
            "crossing_uncertainty": _optional_float(search.crossing_uncertainty),
            "resolution_floor_lr": search.resolution_floor_lr,
            "forwards": self.forwards,
            "noise_forwards": self.noise_forwards,
            "baseline_reused": self.baseline_reused,
            "bracket": list(search.bracket),
            "converged": search.converged,
            "loss": search.baseline_loss,
            "evaluations": self.evaluations(),
            "non_finite_ranks": _ranks(self.non_finite_ranks),
        }

    def module_dict(self) -> dict[str, Any]:
        """A group's entry in the record's `modules`: the numbers without the trial points."""
        search = self.search
        ratio = ratio_of(self)
        return {"status": self.status, "critical_lr": search.critical_lr, "critical_sharpness": search.critical_sharpness,
                "lr_over_critical_lr": None if ratio is None or not math.isfinite(ratio) else ratio,
                "step_raised_loss": search.step_raised_loss,
                "slope": _json_float(search.slope) if search.slope is not None else None,
                "bracket_slope_ratio": _optional_float(search.bracket_slope_ratio),
                "crossing_uncertainty": _optional_float(search.crossing_uncertainty),
                "resolution_floor_lr": search.resolution_floor_lr, "forwards": self.forwards,
                "bracket": list(search.bracket)}

    def value_text(self, sharpness: bool) -> str:
        """The critical sharpness (or lr), or what the outcome says instead of a number."""
        search = self.search
        value = search.critical_sharpness if sharpness else search.critical_lr
        if value is not None:
            return f"{value:.4E}"
        if search.outcome is Outcome.ASCENT:
            return "ascent" if search.slope is None else f"ascent (slope {search.slope:+.3E})"
        if search.outcome is Outcome.NON_FINITE:
            where = "" if self.non_finite_ranks is None else f", on rank {', '.join(map(str, self.non_finite_ranks))}"
            return f"non-finite (once, at lr {search.non_finite_at:.4E}{where})"
        if search.outcome is Outcome.NOISY:
            ratio = search.bracket_slope_ratio
            if ratio is not None and not TRUSTED_SLOPE_RATIO[0] <= ratio <= TRUSTED_SLOPE_RATIO[1]:
                return f"noisy (loss rounding: slope ×{ratio:.3g} its trend)"
            return f"noisy (loss noise moves the crossing ±{100 * search.crossing_uncertainty:.0f}%)"
        lo, hi = search.bracket
        if search.outcome is Outcome.UNRESOLVED and hi is None:
            return "unresolved (the loss changed by no more than its noise)"
        # where η_c lies; λ_c = 2/η_c turns the inequality around
        above, bound = (True, lo) if search.outcome is Outcome.CAPPED else (False, hi)
        if sharpness:
            above, bound = not above, 2.0 / bound
        label = "never rose" if search.outcome is Outcome.CAPPED else "unresolved"
        return f"{'>' if above else '<'} {bound:.4E} ({label})"

    def scalars(self, prefix: str, suffix: str = "") -> dict[str, float]:
        """Numbers for TensorBoard-like writers; which series has a point says the outcome."""
        search = self.search
        values = {f"{prefix}critical_sharpness{suffix}": search.critical_sharpness,
                  f"{prefix}step_raised_loss{suffix}": float(search.step_raised_loss)}
        bound = search.sharpness_bound()
        if bound is not None:
            kind = "lower" if bound[0] == ">" else "upper"
            values[f"{prefix}critical_sharpness_{kind}_bound{suffix}"] = bound[1]
        if search.outcome is Outcome.ASCENT and search.slope is not None and math.isfinite(search.slope):
            values[f"{prefix}ascent_slope{suffix}"] = search.slope
        return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class ProbeError:
    """A probe forward that raised on some rank(s), as every rank agreed on it. lr: the trial lr
    whose forward failed (0.0: L(θ_t) itself); task: None for the step's batch; group: the module
    group whose breakdown search it was (None: not the breakdown)."""

    rank: int
    message: str
    lr: float
    task: str | None = None
    ranks: tuple[int, ...] = ()
    group: str | None = None

    def text(self) -> str:
        where = "" if self.task is None else f", relative task {self.task}"
        where += "" if self.group is None else f", module group {self.group}"
        others = len(self.ranks) - 1
        also = f" (and {others} more rank{'s' if others > 1 else ''})" if others > 0 else ""
        return f"rank {self.rank}{also}, lr {self.lr:.4E}{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "ranks": list(self.ranks) or [self.rank], "lr": self.lr, "task": self.task,
                "group": self.group, "message": self.message}


@dataclass(frozen=True)
class Measurement:
    """Critical sharpness at one optimizer step: the step's own batch and each relative task.

    `skipped` names why a step that was due was not measured (e.g. the optimizer skipped it);
    `error`, a probe forward that raised on some rank (the measurement failed, training went on).
    With either, `task` is None and `relative` is empty.
    """

    step: int
    lr: float
    task: TaskMeasurement | None
    relative: dict[str, TaskMeasurement] = field(default_factory=dict)
    probe_seconds: float = 0.0
    skipped: str | None = None
    error: ProbeError | None = None
    # The per-module breakdown (empty where it did not run) and why it ran.
    modules: dict[str, TaskMeasurement] = field(default_factory=dict)
    modules_trigger: str | None = None
    # A breakdown search whose forward failed on some rank: the groups before it are in `modules`.
    modules_error: ProbeError | None = None
    # The instability warning of this measurement, and how many the run has had so far.
    warning: str | None = None
    warnings: int = 0
    # What the guard did at this measurement (policies.py), and the adaptive interval's gap to the
    # next measurement (None: a fixed interval).
    guard: GuardAction | None = None
    next_interval: int | None = None

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "skipped" if self.task is None else self.task.status

    @property
    def critical_lr(self) -> float | None:
        return None if self.task is None else self.task.search.critical_lr

    @property
    def critical_sharpness(self) -> float | None:
        return None if self.task is None else self.task.search.critical_sharpness

    @property
    def lr_over_critical_lr(self) -> float | None:
        """η_t/η_c = η_t·λ_c/2, the edge-of-stability reading. Whether the real step raised the
        loss is step_raised_loss, measured at s = 1 exactly."""
        critical_lr = self.critical_lr
        return None if critical_lr is None else self.lr / critical_lr

    @property
    def forwards(self) -> int:
        """Forward passes of the whole measurement, relative tasks and the breakdown included."""
        return sum(task.forwards for task in self.tasks()) + self.modules_forwards

    @property
    def modules_forwards(self) -> int:
        """Forward passes of the breakdown (its groups share L(θ_t) with the step's search)."""
        return sum(task.forwards for task in self.modules.values())

    def _worst_text(self) -> str:
        worst = self.worst_module()
        return "" if worst is None else f" (worst {worst[0]} {_ratio_text(worst[1], self.modules[worst[0]])})"

    def worst_module(self) -> tuple[str, float] | None:
        """The group with the highest lr/critical lr (an ascent counts as infinite), if any has one."""
        ranked = ranked_modules(self.modules)
        return ranked[0] if ranked else None

    def tasks(self) -> list[TaskMeasurement]:
        return ([] if self.task is None else [self.task]) + list(self.relative.values())

    def to_dict(self) -> dict[str, Any]:
        task = self.task
        search = None if task is None else task.search
        record: dict[str, Any] = {
            "step": self.step,
            "lr": self.lr,
            "status": self.status,
            "critical_lr": self.critical_lr,
            "critical_sharpness": self.critical_sharpness,
            "lr_over_critical_lr": self.lr_over_critical_lr,
            "step_raised_loss": None if search is None else search.step_raised_loss,
            "slope": None if search is None or search.slope is None else _json_float(search.slope),
            "gradient_slope": None if search is None else _optional_float(search.gradient_slope),
            "bracket_slope_ratio": None if search is None else _optional_float(search.bracket_slope_ratio),
            "loss_noise": None if search is None else search.loss_noise,
            "crossing_uncertainty": None if search is None else _optional_float(search.crossing_uncertainty),
            "resolution_floor_lr": None if search is None else search.resolution_floor_lr,
            "forwards": None if task is None else task.forwards,
            "noise_forwards": None if task is None else task.noise_forwards,
            "forwards_total": self.forwards,
            "baseline_reused": None if task is None else task.baseline_reused,
            "bracket": None if search is None else list(search.bracket),
            "converged": None if search is None else search.converged,
            "loss": None if search is None else search.baseline_loss,
            "non_finite_ranks": None if task is None else _ranks(task.non_finite_ranks),
            "probe_seconds": self.probe_seconds,
            "relative": {name: relative.to_dict() for name, relative in self.relative.items()},
            "skipped": self.skipped,
            "error": None if self.error is None else self.error.to_dict(),
            "modules": {name: task.module_dict() for name, task in self.modules.items()},
            "modules_trigger": self.modules_trigger,
            "modules_forwards": self.modules_forwards,
            "modules_error": None if self.modules_error is None else self.modules_error.to_dict(),
            "warning": self.warning,
            "warnings": self.warnings,
            "guard": None if self.guard is None else self.guard.to_dict(),
            "next_interval": self.next_interval,
        }
        if task is not None:
            record["evaluations"] = task.evaluations()
        return record

    def scalars(self) -> dict[str, float]:
        """Per measurement, the numbers that exist, under snake_case names; relative tasks as
        `<name>/<task>` (DeepSpeed's monitor style)."""
        if self.task is None:
            return {}
        values = self.task.scalars("")
        if self.critical_lr is not None:
            values["critical_lr"] = self.critical_lr
        if self.lr_over_critical_lr is not None:
            values["lr_over_critical_lr"] = self.lr_over_critical_lr
        for name, task in self.relative.items():
            values.update(task.scalars("relative_", f"/{name}"))
        for name, task in self.modules.items():
            ratio = ratio_of(task)
            if ratio is not None and math.isfinite(ratio):
                values[f"module_lr_over_critical_lr/{name}"] = ratio
            if task.search.critical_sharpness is not None:
                values[f"module_critical_sharpness/{name}"] = task.search.critical_sharpness
        if self.warning is not None:  # an event: a point where a measurement warned, none elsewhere
            values["sharpness_warning"] = 1.0
        if self.guard is not None:  # an event too: the factor the guard applied
            values["sharpness_guard_factor"] = self.guard.factor
        if self.next_interval is not None:
            values["sharpness_interval"] = float(self.next_interval)
        return values

    def log_fields(self) -> str:
        """Fields for Megatron's iteration line: `critical sharpness: ... | critical lr: ... |`.
        `step lr` is the lr of the measured step: Megatron's own `learning rate` field is printed
        after the scheduler has stepped, i.e. the next iteration's lr."""
        step_lr = [f"step lr: {self.lr:.6E}"] if math.isfinite(self.lr) else []
        interval = [] if self.next_interval is None else [f"sharpness interval: {self.next_interval}"]
        if self.error is not None:
            return " | ".join([f"critical sharpness: failed ({self.error.text()})", *step_lr, *interval]) + " |"
        if self.task is None:
            return " | ".join([f"critical sharpness: skipped ({self.skipped})", *step_lr, *interval]) + " |"
        parts = [f"critical sharpness: {self.task.value_text(sharpness=True)}"]
        if self.task.search.outcome is not Outcome.ASCENT:
            parts.append(f"critical lr: {self.task.value_text(sharpness=False)}")
        parts += step_lr
        ratio = self.lr_over_critical_lr
        if ratio is not None:
            parts.append(f"lr/critical lr: {ratio:.3f}")
        parts.append(f"step raised loss: {'yes' if self.task.search.step_raised_loss else 'no'}")
        parts.append(f"sharpness forwards: {self.forwards}")
        for name, task in self.relative.items():
            parts.append(f"relative sharpness {name}: {task.value_text(sharpness=True)}")
        if self.modules:
            parts.append(f"modules: {len(self.modules)}{self._worst_text()}")
        if self.modules_error is not None:
            parts.append(f"modules failed: {self.modules_error.text()}")
        if self.warnings:
            parts.append(f"sharpness warnings: {self.warnings}")
        if self.guard is not None:
            parts.append(f"sharpness guard: {self.guard.text()}")
        return " | ".join(parts + interval) + " |"


def _ranks(ranks: tuple[int, ...] | None) -> list[int] | None:
    return None if ranks is None else list(ranks)


def ratio_of(task: TaskMeasurement) -> float | None:
    """lr/critical lr of a search: exact where it converged; where the loss rose at every
    resolvable point, lr/hi (a lower bound, as the crossing lies below hi); an ascent is infinite
    (the update raises the loss at any step); None where the search says nothing finite."""
    search = task.search
    if search.critical_lr is not None:
        return search.lr / search.critical_lr
    if search.outcome is Outcome.ASCENT:
        return math.inf
    lo, hi = search.bracket
    if search.outcome is Outcome.UNRESOLVED and hi:
        return search.lr / hi
    return None


def ranked_modules(modules: dict[str, TaskMeasurement]) -> list[tuple[str, float]]:
    """(group, lr/critical lr) for the groups that have one, highest first; ascents (infinite)
    among themselves by the steeper rise of the loss at the start of the step."""
    def key(item: tuple[str, TaskMeasurement, float]) -> tuple[float, float]:
        slope = item[1].search.slope
        return item[2], slope if slope is not None and math.isinf(item[2]) and math.isfinite(slope) else 0.0

    rated = [(name, task, ratio) for name, task in modules.items() if (ratio := ratio_of(task)) is not None]
    return [(name, ratio) for name, _, ratio in sorted(rated, key=key, reverse=True)]


def _ratio_text(ratio: float, task: TaskMeasurement | None = None) -> str:
    """'ascent', '>1.00' where the ratio is a lower bound (unresolved), else the number."""
    if math.isinf(ratio):
        return "ascent"
    bound = task is not None and task.search.outcome is Outcome.UNRESOLVED
    return f"{'>' if bound else ''}{ratio:.2f}"


def warning_reasons(task: TaskMeasurement, warn_ratio: float) -> list[str]:
    """Why a measurement warns (empty: it does not): lr/critical lr of the step's batch above
    warn_ratio (an ascent, or a lower bound above it, included), or the step raised its batch's loss
    by more than the loss's rounding noise."""
    ratio = ratio_of(task)
    reasons = []
    if ratio is not None and ratio > warn_ratio:
        reasons.append(f"lr/critical lr {_ratio_text(ratio, task)} > {warn_ratio:g}")
    if task.search.step_raised_loss_beyond_noise:
        reasons.append("the step raised its batch's loss")
    return reasons


def warning_text(step: int, reasons: list[str], modules: dict[str, TaskMeasurement]) -> str | None:
    """The live warning of a measurement, or None; names the worst groups where a breakdown ran."""
    if not reasons:
        return None
    text = f"critical sharpness at iteration {step}: {', '.join(reasons)}"
    ranked = ranked_modules(modules)
    if ranked:
        text += "; highest lr/critical lr by module: " + ", ".join(f"{name} {_ratio_text(r, modules[name])}"
                                                                   for name, r in ranked[:3])
    return text


def _optional_float(value: float | None) -> float | str | None:
    return None if value is None else _json_float(value)


def _json_float(value: float) -> float | str:
    """JSON has no NaN or infinity, but a diverged trial point is worth keeping: write it as text."""
    return value if math.isfinite(value) else str(value)
