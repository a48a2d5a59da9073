"""The measurement driver: when to measure, one search per task along the step's direction, warm
starts, and the fan-out of records to loggers. Framework specifics live in a ProbeBackend."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

from megatron_sharpness.backends.base import ProbeBackend
from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.loggers import MeasurementLogger
from megatron_sharpness.faults import ProbeFailure, trial_point
from megatron_sharpness.measurement import Measurement, ProbeError, TaskMeasurement, warning_reasons, warning_text
from megatron_sharpness.modules import resolve_groups
from megatron_sharpness.policies import FORWARDS_PER_STEP, guard_policy, interval_policy
from megatron_sharpness.search import Outcome, SearchResult, critical_lr_search

# Version of state_dict()'s layout, checked on load.
STATE_VERSION = 1
# A module group's search is the paper's doubling, at most config.modules_max_search evaluations
# before the crossing is bracketed. Along one group's part of the update the loss can stay below
# L(θ_t) at any step (normalisation layers bound it along the embedding's direction). Doubling then
# ends as capped (a group far from unstable) at a bounded cost, where the fast search's escalating
# gallop reaches steps of 1e40 and beyond (and float overflow in its step-size formula after about
# 9 misses).
MODULE_SEARCH = "paper"
# A task's loss noise ν is the rms of |L(θ_t, changed elements moved one compute-dtype ulp) −
# L(θ_t)| over its last NOISE_WINDOW measurements, one sample each; the first measurement takes
# NOISE_FIRST_SAMPLES (one sample of a zero-mean change can come out arbitrarily small: measured
# 0.04–6.6× its rms on a tiny GPT in bf16; with 3 first samples one reading in 146 first
# measurements was 14 % off where ν said 4.7 %, with 6 none). Two roundings of the loss value bound ν below.
NOISE_WINDOW = 8
NOISE_FIRST_SAMPLES = 6


class SharpnessProbe:
    def __init__(self, config: SharpnessConfig, loggers: Iterable[MeasurementLogger] = ()):
        self.config = config
        self.loggers = list(loggers)
        # Last converged critical lr per task (None = the step's own batch), in lr units so that
        # the warm start survives lr schedules. Only converged results: a bound or an ascent is
        # no place to start from.
        self._last_critical_lr: dict[str | None, float] = {}
        # Whether a training loss handed to measure() equals a probe forward at θ_t bitwise: None
        # until the first such measurement checks it (one forward), then True, or False for good.
        self.training_loss_matches: bool | None = None
        # Per task of the current measurement: the ranks whose own part of a non-finite loss was.
        self._non_finite_ranks: dict[str | None, set[int]] = {}
        # The same per module group (own key space: a group may be named like a relative task).
        self._last_module_lr: dict[str, float] = {}
        self.warnings = 0
        self._groups: tuple[list[str], dict[str, list[str]]] | None = None
        # Policies beside the probe (policies.py): when the next measurement is due, and the guard.
        self.schedule = interval_policy(config)
        self.guard = guard_policy(config)
        # The share of a training step one probe forward costs (the adaptive interval's budget):
        # integrations with gradient accumulation set evaluated / (3 × trained) micro-batches.
        self.step_share = 1.0 / FORWARDS_PER_STEP
        # Per task, the last NOISE_WINDOW rounding-noise samples (loss changes, ≥ 0).
        self._noise_samples: dict[str | None, list[float]] = {}
        # Whether the gradients' slope agreed with the loss at the last measurement that could
        # tell (None: none could yet): where the caller clips or scales the gradients it does not.
        self._gradient_slope_fits: bool | None = None
        # Loggers that have raised (warned about once; they are tried again at every measurement).
        self._failed_loggers: set[int] = set()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to measure as the uninterrupted one would: the warm starts and
        whether the training loss was found fit for reuse. Plain Python values (torch.save / JSON
        friendly); the step's batch is task None."""
        return {"version": STATE_VERSION,
                "last_critical_lr": [[name, lr] for name, lr in self._last_critical_lr.items()],
                "training_loss_matches": self.training_loss_matches,
                "modules": {"last_critical_lr": [[name, lr] for name, lr in self._last_module_lr.items()],
                            "warnings": self.warnings},
                "loss_noise": [[name, list(samples)] for name, samples in self._noise_samples.items()],
                "gradient_slope_fits": self._gradient_slope_fits,
                "schedule": self.schedule.state_dict(),
                "guard": {} if self.guard is None else self.guard.state_dict()}

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
        matches = state.get("training_loss_matches")  # absent in states saved before it existed
        if matches not in (None, True, False):
            raise ValueError(f"critical sharpness: bad training_loss_matches {matches!r} in the probe state; "
                             "allowed: true, false or null")
        self._last_critical_lr, self.training_loss_matches = restored, matches
        # Written by versions without the breakdown: no module warm starts, no warnings yet.
        modules = state.get("modules", {"last_critical_lr": [], "warnings": 0})
        module_lrs: dict[str, float] = {}
        for entry in modules["last_critical_lr"]:
            name, lr = entry
            if not isinstance(name, str) or not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"critical sharpness: bad module warm start {entry!r} in the probe state; "
                                 "allowed: [group name, finite lr > 0]")
            module_lrs[name] = lr
        if not (isinstance(modules["warnings"], int) and modules["warnings"] >= 0):
            raise ValueError(f"critical sharpness: bad warning count {modules['warnings']!r} in the probe state")
        self._last_module_lr, self.warnings = module_lrs, modules["warnings"]
        noise: dict[str | None, list[float]] = {}
        for entry in state.get("loss_noise", []):  # absent in states saved before it existed
            name, samples = entry
            if not (name is None or isinstance(name, str)) or not isinstance(samples, list) or not all(
                    isinstance(x, float) and math.isfinite(x) and x >= 0 for x in samples):
                raise ValueError(f"critical sharpness: bad loss noise samples {entry!r:.120} in the probe state; "
                                 "allowed: [task name or None, [finite numbers >= 0]]")
            noise[name] = samples[-NOISE_WINDOW:]
        self._noise_samples = noise
        fits = state.get("gradient_slope_fits")  # absent in states saved before it existed
        if fits not in (None, True, False):
            raise ValueError(f"critical sharpness: bad gradient_slope_fits {fits!r} in the probe state; "
                             "allowed: true, false or null")
        self._gradient_slope_fits = fits
        # Written by versions without the policies, or with a fixed interval / no guard: fresh ones.
        self.schedule.load_state_dict(state.get("schedule") or {})
        if self.guard is not None:
            self.guard.load_state_dict(state.get("guard") or {})

    def is_due(self, step: int) -> bool:
        return self.config.enabled and self.schedule.is_due(step)

    def measure(self, backend: ProbeBackend, step: int, lr: float,
                relative_tasks: Sequence[str] = (), training_loss: float | None = None) -> Measurement:
        """Call after backend.snapshot() and the real optimizer.step(). Always restores θ_{t+1}.
        training_loss: L(θ_t) of the step's batch from the training forward (reduced like
        backend.loss); used instead of a probe forward once the first measurement that is given one
        has found it bitwise equal to the probe's (see training_loss_matches)."""
        started = time.perf_counter()
        self._non_finite_ranks = {}
        searches: dict[str | None, TaskMeasurement] = {}
        modules: dict[str, TaskMeasurement] = {}
        reasons: list[str] = []
        skipped = failure = error = trigger = modules_error = action = None
        reuse = training_loss is not None and self.training_loss_matches is True
        try:
            skipped = self._skip_reason(backend, lr)
            if skipped is None:
                evaluated = [name for name in (None, *relative_tasks) if name is not None or not reuse]
                if evaluated:
                    backend.write(0.0)
                baselines = {name: self._loss(backend, name, 0.0, lr) for name in evaluated}
                if reuse:
                    baselines = {None: training_loss, **baselines}
                elif training_loss is not None and self.training_loss_matches is None:
                    self._check_training_loss(training_loss, baselines[None], step)
                skipped = _non_finite_baseline(baselines, self._non_finite_ranks)
            if skipped is None:
                noise, noise_forwards = self._loss_noise(backend, baselines, step, lr)
                floor = backend.resolution_floor()
                slope = getattr(backend, "gradient_slope", lambda: None)()
                hint = None if self._gradient_slope_fits is False else slope
                searches = {name: self._search(backend, name, lr, baseline, floor, noise[name],
                                               baseline_reused=name is None and reuse,
                                               noise_forwards=noise_forwards[name],
                                               slope_hint=hint if name is None else None)
                            for name, baseline in baselines.items()}
                fits = _slope_fits(searches[None].search, slope)
                self._gradient_slope_fits = self._gradient_slope_fits if fits is None else fits
                reasons = warning_reasons(searches[None], self.config.warn_ratio)
                trigger = self._breakdown_trigger(step, searches[None], bool(reasons))
                if trigger is not None:
                    modules, modules_error = self._breakdown(backend, lr, baselines[None],
                                                             searches[None].search.critical_lr, noise[None])
                if self.guard is not None:
                    action = self.guard.decide(step, searches[None], modules)
                    if action is not None and action.mode == "shorten":
                        # Before restore(): it then puts θ_t + s·Δθ where θ_{t+1} was.
                        backend.commit(action.factor, None if action.group is None else self._groups[1][action.group])
        except _FailedAt as caught:
            # Every rank raised this in the same collective: all of them restore below alike.
            failure, error, searches, modules, trigger, reasons = caught.error, caught.__cause__, {}, {}, None, []
            action = None
        finally:
            backend.restore()
        if isinstance(error, ProbeFailure) and error.usage:
            # A caller's mistake (e.g. a loss_fn returning a string) is no fault to skip over.
            raise error.local or RuntimeError(f"critical sharpness: {failure.text()}")
        task = searches.pop(None, None)
        warning = warning_text(step, reasons, modules)
        self.warnings += warning is not None
        measurement = Measurement(step=step, lr=lr, task=task, relative=searches,
                                  probe_seconds=time.perf_counter() - started, skipped=skipped, error=failure,
                                  modules=modules, modules_trigger=trigger, modules_error=modules_error,
                                  warning=warning, warnings=self.warnings, guard=action)
        gap = self.schedule.observe(measurement, self.step_share)
        if gap is not None:
            measurement = dataclasses.replace(measurement, next_interval=gap)
        for logger in self.loggers:
            self._guarded(logger, "log", measurement)
        if self.config.on_error == "raise" and (failure or modules_error) is not None:
            raise RuntimeError(f"critical sharpness: the measurement at step {step} failed "
                               f"({(failure or modules_error).text()}); on_error='raise'") from error
        return measurement

    def _guarded(self, logger: MeasurementLogger, method: str, *args: Any) -> None:
        """A logger that raises (a full disk under log_file, a TensorBoard writer gone) must not end
        training: loggers run on one rank only, so an exception there would leave the other ranks
        waiting in the next collective. One warning per logger; the probe and the other loggers go on."""
        try:
            getattr(logger, method)(*args)
        except Exception as caught:
            if id(logger) in self._failed_loggers:
                return
            self._failed_loggers.add(id(logger))
            # Printed, not warnings.warn: with warnings turned into errors the warning would raise
            # on this rank alone. A stderr that cannot be written to is no reason to stop either.
            with contextlib.suppress(Exception):
                print(f"critical sharpness: the {type(logger).__name__} logger failed in {method}(): "
                      f"{type(caught).__name__}: {caught}; the probe goes on measuring and logging elsewhere, "
                      "this logger is tried again at every measurement, and further failures of it are not "
                      "reported", file=sys.stderr, flush=True)

    def _check_training_loss(self, training_loss: float, probe_loss: float, step: int) -> None:
        # Every rank holds the same two reduced numbers, so every rank decides alike.
        self.training_loss_matches = training_loss == probe_loss
        if not self.training_loss_matches:
            warnings.warn(f"critical sharpness: at step {step} the training loss {training_loss!r} differs from a "
                          f"probe forward at the same parameters ({probe_loss!r}): dropout, other micro-batches or "
                          "a non-deterministic forward; L(θ_t) is evaluated by the probe from now on "
                          "(reuse_training_loss has no effect)", RuntimeWarning, stacklevel=3)

    def _loss(self, backend: ProbeBackend, name: str | None, step_multiple: float, lr: float) -> float:
        try:
            with trial_point(step_multiple * lr, name):
                loss = backend.loss(name)
        except ProbeFailure as caught:
            first = caught.errors[0]
            raise _FailedAt(ProbeError(first.rank, first.error, step_multiple * lr, name,
                                       tuple(e.rank for e in caught.errors))) from caught
        if not math.isfinite(loss):
            # Which ranks' own part of the loss was non-finite, where the backend's reduction tells.
            self._non_finite_ranks.setdefault(name, set()).update(getattr(backend, "non_finite_ranks", None) or ())
        return loss

    def _loss_noise(self, backend: ProbeBackend, baselines: Mapping[str | None, float], step: int,
                    lr: float) -> tuple[dict[str | None, float], dict[str | None, int]]:
        """Per task, the loss noise ν for the searches and the forwards spent measuring it. Where
        the compute dtype is fp32 or wider no forward is spent: the loss's own rounding is ν."""
        windows = self._noise_samples
        wanted = {name: max(1, NOISE_FIRST_SAMPLES - len(windows.get(name, ()))) for name in baselines}
        forwards = dict.fromkeys(baselines, 0)
        for sample in range(max(wanted.values())):
            # Seeded by the step: a resumed run moves the same elements the same way.
            if not backend.write_rounding_noise(step * NOISE_FIRST_SAMPLES + sample):
                break
            for name, baseline in baselines.items():
                if sample < wanted[name]:
                    loss = self._loss(backend, name, 0.0, lr)
                    forwards[name] += 1
                    if math.isfinite(loss):
                        window = windows.setdefault(name, [])
                        window.append(abs(loss - baseline))
                        del window[:-NOISE_WINDOW]
        bits = getattr(backend, "loss_bits", 24)
        noise = {}
        for name, baseline in baselines.items():
            samples = windows.get(name) if any(forwards.values()) else None
            measured = math.sqrt(sum(x * x for x in samples) / len(samples)) if samples else 0.0
            noise[name] = max(measured, 2.0 * _ulp(baseline, bits))
        return noise, forwards

    @staticmethod
    def _skip_reason(backend: ProbeBackend, lr: float) -> str | None:
        if not (math.isfinite(lr) and lr > 0.0):
            return f"lr is {lr}"
        return backend.after_step()

    def _breakdown_trigger(self, step: int, task: TaskMeasurement, warns: bool) -> str | None:
        """Why the per-module breakdown runs at this measurement, or None."""
        config = self.config
        if config.modules is None:
            return None
        if config.modules_on_warning and warns:
            return "step_raised_loss" if task.search.step_raised_loss_beyond_noise else "warn_ratio"
        # Counted from the step, not from a counter, so that a resumed run breaks down at the same steps.
        if config.modules_interval > 0 and (step // config.interval) % config.modules_interval == 0:
            return "interval"
        return None

    def _breakdown(self, backend: ProbeBackend, lr: float, baseline: float, critical_lr: float | None,
                   noise: float) -> tuple[dict[str, TaskMeasurement], ProbeError | None]:
        """One search per parameter group along the group's part of the update; L(θ_t) is shared.
        A group without a warm start starts at the whole update's critical lr (its scale): a group
        that does not cross within modules_max_search doublings of it is far from unstable. A group
        whose forward failed on some rank (every rank agreed) ends the breakdown: the groups searched
        before it are kept, the error names it, the later groups are not searched (the cause, an OOM
        say, would most likely strike them too)."""
        guess = None if critical_lr is None else critical_lr / lr
        names = backend.parameter_names()
        if self._groups is None or self._groups[0] != names:
            self._groups = (names, resolve_groups(self.config.modules, names))
        results = {}
        try:
            for group, members in self._groups[1].items():
                backend.select_group(members)
                try:
                    # The whole update's ν: a group moves fewer elements, so its own noise is smaller.
                    results[group] = self._search(backend, None, lr, baseline, backend.resolution_floor(), noise,
                                                  baseline_reused=True, warm_starts=self._last_module_lr,
                                                  key=group, max_search=self.config.modules_max_search,
                                                  method=MODULE_SEARCH, guess=guess)
                except _FailedAt as caught:
                    if isinstance(caught.__cause__, ProbeFailure) and caught.__cause__.usage:
                        raise
                    return results, dataclasses.replace(caught.error, group=group)
        finally:
            backend.select_group(None)
        return results, None

    def _search(self, backend: ProbeBackend, name: str | None, lr: float, baseline: float,
                floor: float, noise: float, baseline_reused: bool = False, warm_starts: dict | None = None,
                key: str | None = None, max_search: int | None = None,
                method: str | None = None, guess: float | None = None, noise_forwards: int = 0,
                slope_hint: float | None = None) -> TaskMeasurement:
        """warm_starts, key: where this search's warm start lives (default: the task's own);
        guess: the start without a warm start (default: the configured initial guess)."""
        if warm_starts is None:
            warm_starts, key = self._last_critical_lr, name
        guess = guess or self.config.initial_guess
        warm = self.config.warm_start and key in warm_starts
        if warm:
            guess = warm_starts[key] / lr

        def loss_at(step_multiple: float) -> float:
            backend.write(step_multiple)
            return self._loss(backend, name, step_multiple, lr)

        search = critical_lr_search(loss_at, baseline, lr=lr, initial_step_multiple=guess,
                                    tol=self.config.tol, max_search=max_search or self.config.max_search,
                                    resolution_floor=floor, method=method or self.config.search, loss_noise=noise,
                                    slope_hint=slope_hint)
        if search.critical_lr is not None:
            warm_starts[key] = search.critical_lr
        elif warm and search.outcome is not Outcome.NON_FINITE:
            # A warm start that did not lead to a number (a schedule jump, an old resumed state)
            # would misplace the next search too: start it from the initial guess.
            del warm_starts[key]
        ranks = self._non_finite_ranks.get(name)
        return TaskMeasurement(search, baseline_reused, tuple(sorted(ranks)) if ranks else None, noise_forwards)

    def group_members(self, group: str) -> list[str]:
        """The parameter names of a module group of the breakdown (after a breakdown ran)."""
        assert self._groups is not None, "no breakdown has run yet"
        return self._groups[1][group]

    def close(self) -> None:
        for logger in self.loggers:
            self._guarded(logger, "close")


def _slope_fits(search: SearchResult, slope: float | None) -> bool | None:
    """Whether the gradients' slope is within 25 % of the slope a converged search implies (the
    quadratic through L(θ_t), L(1) and the crossing s*: L(1) − L(θ_t) = a·(1 − 1/s*)); None where
    this search cannot tell (no slope, no number, a crossing too close to 1)."""
    if slope is None or not search.converged or search.critical_step_multiple < 1.5:
        return None
    rise = next(loss for s, loss in search.evaluations if s == 1.0) - search.baseline_loss
    implied = rise / (1.0 - 1.0 / search.critical_step_multiple)
    return implied < 0 and 0.8 <= slope / implied <= 1.25


def _ulp(value: float, bits: int) -> float:
    """The spacing of a float format with `bits` significand bits at value."""
    _, exponent = math.frexp(value)
    return math.ldexp(1.0, exponent - bits) if value != 0 else math.ldexp(1.0, -126)


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
