"""The one typed configuration of the probe, validated in one place.

The same fields are used everywhere: Python keyword arguments, a ds_config section
(`"critical_sharpness": {...}`), and Megatron-style flags (`--critical-sharpness-<field>`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from megatron_sharpness.modules import DEFAULT as DEFAULT_MODULES
from megatron_sharpness.modules import validate_patterns
from megatron_sharpness.search import DEFAULT_MAX_SEARCH, DEFAULT_TOL, SEARCH_METHODS


# What a failed probe forward does: record the failure and go on, or fail fast.
ON_ERROR = ("skip", "raise")
# How trial points reach the parameters the forward reads (README "Trial-point writes").
WRITE_MODES = ("auto", "local", "sharded")
# What the guard does at a measured step past guard_ratio (policies.py).
GUARD_MODES = ("off", "shorten", "lr")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


@dataclass(frozen=True)
class SharpnessConfig:
    """What to measure, how often, how precisely, and where to write it.

    enabled: measure at all (lets a ds_config section switch the probe off without removing it).
    interval: measure every `interval`-th optimizer step (steps count from 1, as Megatron's
        iterations do).
    tol: stop bisecting once 1 − lo/hi ≤ tol; the paper uses 1/16.
    max_search: at most this many loss evaluations before the crossing is bracketed.
    initial_guess: where the first search starts, as a multiple of the step's own lr
        (1.0 = the step the optimizer took).
    warm_start: start each later search at the previous converged critical lr of the same task.
    search: "fast" places trial points with the quadratic model (about half the forwards);
        "paper" is the paper's exponential + binary search. Both certify the same bracket.
    micro_batches: evaluate the loss on the first k micro-batches of the step (gradient
        accumulation); None = all of them.
    log_file: JSONL file that gets one object per measurement (written by rank 0), or None.
    on_error: what a probe forward that raises on some rank (an OOM, say) does: "skip" records the
        measurement as failed on every rank and training goes on; "raise" raises on every rank
        (after θ_{t+1} is restored). Either way no rank is left waiting in a collective.
    reuse_training_loss: take L(θ_t) of the step's batch from the training forward instead of a
        probe forward (one forward fewer per measurement). Only right where the training forward
        computes bitwise the loss a probe forward would: no dropout, same micro-batches. The first
        measurement checks it with one extra forward and stops reusing, with a warning, if not.
    modules: the per-module breakdown (each parameter group searched along its own part of the
        update): None = off; "default" = embedding, each transformer block, output (final norm and
        output layer), from parameter names (megatron_sharpness/modules.py); or {group name:
        pattern or [patterns]}, fnmatch on parameter names, `re:` for a regular expression.
    modules_interval: run the breakdown at every modules_interval-th measurement (0: only when a
        warning triggers it).
    modules_on_warning: also run it at a measurement that warns (see warn_ratio).
    modules_max_search: at most this many evaluations of a group's search before its crossing is
        bracketed (doubling from the whole update's critical lr): a group that has not crossed by
        then is reported as capped, far from unstable; bounds the breakdown's cost.
    warn_ratio: warn when lr/critical lr of the step's batch exceeds this, or the step raised its
        batch's loss. 1.0 is where the step passes the batch's own critical lr along its direction;
        0.5 (the default) is half way there: on the instability suite (benchmarks/instability.py)
        Adam mini-batch runs spiked while reading 0.5-1, and 0.5 warned ahead of 3× as many spikes
        as 1.0 (30 % against 10 %) at 1.7 false alarms per 1000 calm steps (all of them in one calm
        run that sits at 0.3-0.7: raise it for such runs).
    budget: None measures every `interval` steps. A number in (0, 1) is the adaptive interval
        (policies.py): at most this share of the training compute on average (0.01 = 1 %), measuring
        every `interval` steps far from the edge and down to every step at it.
    guard: "off" (default), "shorten" or "lr": what to do at a measured step whose lr/critical lr
        exceeds guard_ratio (policies.py): shorten the step just taken to guard_target·η_c/η_t of
        itself, or scale the following steps' lr by that factor, recovering over guard_recovery steps.
    guard_ratio: lr/critical lr above which the guard acts.
    guard_target: κ in (0, 1]: the guard aims at κ times the critical lr.
    guard_recovery: steps over which the lr guard's factor returns to 1.
    write: how trial points reach the parameters the forward reads, where the optimizer shards its
        fp32 master over data parallelism (Megatron's distributed optimizer, ZeRO-1/2,
        BF16_Optimizer). "sharded": each rank writes its master shard's trial point and the
        framework all-gathers the parameters, per trial point. "local": every rank keeps θ_{t+1}
        and the step in the model dtype (2 + 2 bytes per parameter of its tensor/pipeline slice)
        and writes trial points from 1/2 of the step on into its own full parameters, with no
        collective. "auto": local where the optimizer allows it and it fits write_memory_budget_mib.
    write_memory_budget_mib: with write "auto", the most memory per rank (MiB) that local writes
        may hold; None: no limit.
    """

    enabled: bool = True
    interval: int = 100
    tol: float = DEFAULT_TOL
    max_search: int = DEFAULT_MAX_SEARCH
    initial_guess: float = 1.0
    warm_start: bool = True
    search: str = "fast"
    micro_batches: int | None = None
    log_file: str | None = None
    on_error: str = "skip"
    reuse_training_loss: bool = False
    modules: str | Mapping[str, Any] | None = None
    modules_interval: int = 10
    modules_on_warning: bool = True
    modules_max_search: int = 8
    warn_ratio: float = 0.5
    budget: float | None = None
    guard: str = "off"
    guard_ratio: float = 0.5
    guard_target: float = 0.5
    guard_recovery: int = 100
    write: str = "auto"
    write_memory_budget_mib: float | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.enabled, bool), "enabled", self.enabled, "true or false")
        _require(_is_int(self.interval) and self.interval >= 1, "interval", self.interval,
                 "an integer >= 1 (measure every interval-th step)")
        _require(_is_real(self.tol) and 0.0 < self.tol < 1.0, "tol", self.tol,
                 "a number in the open interval (0, 1), e.g. 0.0625")
        _require(_is_int(self.max_search) and self.max_search >= 1, "max_search", self.max_search,
                 "an integer >= 1 (loss evaluations in the exponential phase)")
        _require(_is_real(self.initial_guess) and math.isfinite(self.initial_guess)
                 and self.initial_guess > 0.0, "initial_guess", self.initial_guess,
                 "a finite number > 0 (a multiple of the step's lr)")
        _require(isinstance(self.warm_start, bool), "warm_start", self.warm_start, "true or false")
        _require(self.search in SEARCH_METHODS, "search", self.search, " or ".join(SEARCH_METHODS))
        _require(self.micro_batches is None or (_is_int(self.micro_batches) and self.micro_batches >= 1),
                 "micro_batches", self.micro_batches, "an integer >= 1, or null for all micro-batches of the step")
        _require(self.log_file is None or (isinstance(self.log_file, str) and self.log_file != ""),
                 "log_file", self.log_file, "a file path or null")
        _require(self.on_error in ON_ERROR, "on_error", self.on_error, " or ".join(ON_ERROR))
        _require(isinstance(self.reuse_training_loss, bool), "reuse_training_loss", self.reuse_training_loss,
                 "true or false")
        object.__setattr__(self, "modules", _modules(self.modules))
        _require(_is_int(self.modules_interval) and self.modules_interval >= 0, "modules_interval",
                 self.modules_interval, "an integer >= 0 (every k-th measurement; 0: only on warnings)")
        _require(isinstance(self.modules_on_warning, bool), "modules_on_warning", self.modules_on_warning,
                 "true or false")
        _require(_is_int(self.modules_max_search) and self.modules_max_search >= 1, "modules_max_search",
                 self.modules_max_search, "an integer >= 1 (evaluations of a group's search before a bracket)")
        _require(_is_real(self.warn_ratio) and math.isfinite(self.warn_ratio) and self.warn_ratio > 0,
                 "warn_ratio", self.warn_ratio, "a finite number > 0 (lr/critical lr above which to warn)")
        _require(self.budget is None or (_is_real(self.budget) and 0.0 < self.budget < 1.0), "budget", self.budget,
                 "null (measure every interval steps) or a share of the training compute in (0, 1), e.g. 0.01")
        _require(self.guard in GUARD_MODES, "guard", self.guard, " or ".join(GUARD_MODES))
        _require(_is_real(self.guard_ratio) and math.isfinite(self.guard_ratio) and self.guard_ratio > 0,
                 "guard_ratio", self.guard_ratio, "a finite number > 0 (lr/critical lr above which the guard acts)")
        _require(_is_real(self.guard_target) and 0.0 < self.guard_target <= 1.0, "guard_target", self.guard_target,
                 "a number in (0, 1] (the fraction of the critical lr the guard aims at)")
        _require(_is_int(self.guard_recovery) and self.guard_recovery >= 1, "guard_recovery", self.guard_recovery,
                 "an integer >= 1 (steps for the lr guard's factor to return to 1)")
        _require(self.write in WRITE_MODES, "write", self.write, " or ".join(WRITE_MODES))
        budget = self.write_memory_budget_mib
        _require(budget is None or (_is_real(budget) and math.isfinite(budget) and budget >= 0),
                 "write_memory_budget_mib", budget, "a finite number >= 0 (MiB per rank), or null for no limit")
        _require(budget is None or self.write == "auto", "write_memory_budget_mib", budget,
                 f"null unless write is \"auto\" (write={self.write!r} does not choose)")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "critical_sharpness") -> SharpnessConfig:
        """Build from a mapping such as a ds_config section; unknown keys are an error."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source} must be a mapping of field names to values, "
                              f"got {type(values).__name__}")
        allowed = cls.field_names()
        unknown = sorted(str(key) for key in values if key not in allowed)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(allowed)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require_config(config: Any, argument: str = "config") -> SharpnessConfig:
    """config itself when it is a SharpnessConfig; otherwise one error naming the argument, the type
    it got and how to build the right one (a dict is the common slip)."""
    if isinstance(config, SharpnessConfig):
        return config
    hint = (f"; build one from a mapping with SharpnessConfig.from_dict({argument})"
            if isinstance(config, Mapping) else "; build one with SharpnessConfig(interval=..., ...)")
    raise ConfigError(f"critical sharpness: {argument} must be a SharpnessConfig, got "
                      f"{type(config).__name__}{hint}")


_MODULES_ALLOWED = ("null (off), \"default\", or a mapping {group name: pattern or [patterns]} "
                    "(fnmatch on parameter names, \"re:...\" for a regular expression)")


def _modules(value: Any) -> str | dict[str, list[str]] | None:
    """The modules field normalised to None, "default" or {name: [patterns]} (a copy: the config
    stays frozen), or a ConfigError."""
    if value is None or value == DEFAULT_MODULES:
        return value
    _require(isinstance(value, Mapping) and len(value) > 0, "modules", value, _MODULES_ALLOWED)
    groups = {}
    for name, patterns in value.items():
        if isinstance(patterns, str):
            patterns = [patterns]
        ok = (isinstance(name, str) and name != "" and isinstance(patterns, (list, tuple)) and len(patterns) > 0
              and all(isinstance(p, str) and p != "" for p in patterns))
        _require(ok, "modules", value, _MODULES_ALLOWED)
        bad = validate_patterns(patterns)
        _require(bad is None, "modules", value, f"valid regular expressions after re:, not {bad}")
        groups[name] = list(patterns)
    return groups


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"critical sharpness config: {name}={value!r} is invalid; allowed: {allowed}")
