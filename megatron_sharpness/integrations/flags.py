"""Megatron-style command-line flags (kebab-case, one argument group), shared by the Megatron-LM
and Megatron-DeepSpeed integrations. Values are validated by SharpnessConfig, so a bad value fails
at argument parsing with the flag's name and what is allowed."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from megatron_sharpness.config import GUARD_MODES, ON_ERROR, WRITE_MODES, ConfigError, SharpnessConfig
from megatron_sharpness.search import SEARCH_METHODS

# flag suffix -> SharpnessConfig field
FLAG_FIELDS = {
    "tol": "tol",
    "max-search": "max_search",
    "initial-guess": "initial_guess",
    "search": "search",
    "micro-batches": "micro_batches",
    "log-file": "log_file",
    "on-error": "on_error",
    "reuse-training-loss": "reuse_training_loss",
    "modules-interval": "modules_interval",
    "warn-ratio": "warn_ratio",
    "budget": "budget",
    "guard": "guard",
    "guard-ratio": "guard_ratio",
    "guard-target": "guard_target",
    "guard-recovery": "guard_recovery",
    "write": "write",
    "write-memory-budget-mib": "write_memory_budget_mib",
}


def _validated(field: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {parse.__name__}") from None
        try:
            SharpnessConfig(**{field: value})
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error).split(": ", 1)[1]) from None
        return value

    return convert


def parse_modules(text: str) -> str | tuple[str, list[str]]:
    """One --critical-sharpness-modules item: `default`, or NAME=PATTERN[,PATTERN...]."""
    if text == "default":
        return text
    name, equals, patterns = text.partition("=")
    if not equals or not name or not patterns:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: default, or NAME=PATTERN[,PATTERN...] "
                                         "(fnmatch on parameter names, re:REGEX for a regular expression)")
    group = (name, patterns.split(","))
    try:
        SharpnessConfig(modules=dict([group]))
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).split(": ", 1)[1]) from None
    return group


def _modules_of(items: list | None) -> str | dict[str, list[str]] | None:
    if not items:
        return None
    if "default" in items:
        if len(items) > 1:
            raise ConfigError("critical sharpness: --critical-sharpness-modules takes `default` alone or "
                              f"NAME=PATTERN items, not both: {items!r}")
        return "default"
    groups: dict[str, list[str]] = {}
    for name, patterns in items:
        if name in groups:
            raise ConfigError(f"critical sharpness: --critical-sharpness-modules names group {name!r} twice")
        groups[name] = patterns
    return groups


def integer_at_least(minimum: int, allowed: str) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, else an error saying what is allowed."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is invalid; allowed: {allowed}")
        return value

    return convert


def add_critical_sharpness_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """For Megatron's extra_args_provider: returns the parser, as Megatron expects."""
    defaults = SharpnessConfig()
    group = parser.add_argument_group(title="critical sharpness")
    group.add_argument("--critical-sharpness-interval", type=integer_at_least(0, "an integer >= 1, or 0 for off"), default=0, metavar="N",
                       help="measure critical sharpness every N iterations (default 0: off)")
    group.add_argument("--critical-sharpness-tol", type=_validated("tol", float), default=defaults.tol,
                       help=f"bisect until 1 - lo/hi <= tol (default {defaults.tol})")
    group.add_argument("--critical-sharpness-max-search", type=_validated("max_search", int),
                       default=defaults.max_search, help="at most this many evaluations before the crossing is bracketed")
    group.add_argument("--critical-sharpness-initial-guess", type=_validated("initial_guess", float),
                       default=defaults.initial_guess, help="first search's start, as a multiple of the lr")
    group.add_argument("--critical-sharpness-search", type=_validated("search", str), default=defaults.search,
                       choices=SEARCH_METHODS, help="fast: trial points from the quadratic model (default); "
                                                    "paper: the paper's exponential + binary search")
    group.add_argument("--critical-sharpness-micro-batches", type=_validated("micro_batches", int), default=None,
                       metavar="K", help="evaluate on the first K micro-batches of the step (default: all)")
    group.add_argument("--critical-sharpness-log-file", type=_validated("log_file", str), default=None,
                       metavar="PATH", help="append one JSON object per measurement to PATH")
    group.add_argument("--critical-sharpness-on-error", type=_validated("on_error", str), default=defaults.on_error,
                       choices=ON_ERROR, help="a probe forward that raises on some rank: skip (record the "
                                              "measurement as failed, train on; default) or raise on every rank")
    group.add_argument("--critical-sharpness-reuse-training-loss", action="store_true",
                       help="take L(θ_t) from the step's training loss (one forward fewer per measurement); needs "
                            "--hidden-dropout 0 --attention-dropout 0; checked bitwise at the first measurement")
    group.add_argument("--critical-sharpness-modules", type=parse_modules, nargs="+", default=None,
                       metavar="GROUP", help="per-module breakdown: `default` (embedding, each layer, output) or "
                                             "NAME=PATTERN[,PATTERN...] items (fnmatch on parameter names, re:REGEX)")
    group.add_argument("--critical-sharpness-modules-interval", type=_validated("modules_interval", int),
                       default=defaults.modules_interval, metavar="K",
                       help=f"break down every K-th measurement (0: only on warnings; default {defaults.modules_interval})")
    group.add_argument("--no-critical-sharpness-modules-on-warning", dest="critical_sharpness_modules_on_warning",
                       action="store_false", help="do not break down a measurement because it warns")
    group.add_argument("--critical-sharpness-warn-ratio", type=_validated("warn_ratio", float),
                       default=defaults.warn_ratio, metavar="R",
                       help=f"warn when lr/critical lr exceeds R or the step raised its batch's loss (default {defaults.warn_ratio})")
    group.add_argument("--critical-sharpness-budget", type=_validated("budget", float), default=None, metavar="SHARE",
                       help="adaptive interval: measure every N iterations (--critical-sharpness-interval) far from the "
                            "edge, down to every iteration at it, spending at most SHARE of the training compute on "
                            "average (e.g. 0.01); default: a fixed interval")
    group.add_argument("--critical-sharpness-guard", type=_validated("guard", str), default=defaults.guard,
                       choices=GUARD_MODES, help="at a measured iteration whose lr/critical lr exceeds the guard ratio: "
                                                 "shorten the step just taken, or lower the lr for the next ones "
                                                 f"(default {defaults.guard})")
    group.add_argument("--critical-sharpness-guard-ratio", type=_validated("guard_ratio", float),
                       default=defaults.guard_ratio, metavar="R",
                       help=f"lr/critical lr above which the guard acts (default {defaults.guard_ratio})")
    group.add_argument("--critical-sharpness-guard-target", type=_validated("guard_target", float),
                       default=defaults.guard_target, metavar="K",
                       help=f"the guard aims at K × the critical lr (default {defaults.guard_target})")
    group.add_argument("--critical-sharpness-guard-recovery", type=_validated("guard_recovery", int),
                       default=defaults.guard_recovery, metavar="N",
                       help=f"iterations for the lr guard's factor to return to 1 (default {defaults.guard_recovery})")
    group.add_argument("--critical-sharpness-write", type=_validated("write", str), default=defaults.write,
                       choices=WRITE_MODES, help="how trial points reach the params with the distributed optimizer: "
                                                 "local (no all-gather per trial point; holds θ_{t+1} and the step in "
                                                 "the model dtype, 4 bytes per parameter of this rank's TP/PP slice), "
                                                 "sharded (all-gather per trial point), auto (default: local where it "
                                                 "fits --critical-sharpness-write-memory-budget-mib)")
    group.add_argument("--critical-sharpness-write-memory-budget-mib", type=_validated("write_memory_budget_mib", float),
                       default=None, metavar="MIB",
                       help="with --critical-sharpness-write auto: the most memory per rank local writes may hold")
    return parser


def config_from_args(args: argparse.Namespace) -> SharpnessConfig:
    interval = args.critical_sharpness_interval
    fields = {field: getattr(args, "critical_sharpness_" + flag.replace("-", "_"))
              for flag, field in FLAG_FIELDS.items()}
    return SharpnessConfig(enabled=interval > 0, interval=max(interval, 1), modules=_modules_of(args.critical_sharpness_modules),
                           modules_on_warning=args.critical_sharpness_modules_on_warning, **fields)
