"""Argument checks shared by the public entry points: each raises one error that names the argument,
what it got and what is allowed, at construction rather than deep inside a measurement."""

from __future__ import annotations

from typing import Any, Iterable

from megatron_sharpness.loggers import MeasurementLogger


def require_callable(value: Any, argument: str, allowed: str) -> None:
    if not callable(value):
        raise TypeError(f"critical sharpness: {argument} must be {allowed}, got {_describe(value)}")


def require_optimizer(optimizer: Any, argument: str = "optimizer") -> None:
    """Anything shaped like a torch optimizer: param_groups and a step() method."""
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, (list, tuple)) or not callable(getattr(optimizer, "step", None)):
        raise TypeError(f"critical sharpness: {argument} must be the training optimizer (with param_groups "
                        f"and step()), got {_describe(optimizer)}")


def checked_loggers(loggers: Iterable[MeasurementLogger] | None,
                    argument: str = "loggers") -> list[MeasurementLogger] | None:
    """The loggers as a list (a generator is read once), or None for the integration's defaults."""
    if loggers is None:
        return None
    if isinstance(loggers, (str, bytes)) or not isinstance(loggers, Iterable):
        raise TypeError(f"critical sharpness: {argument} must be a list of loggers (objects with log() and "
                        f"close()) or None, got {_describe(loggers)}")
    loggers = list(loggers)
    for logger in loggers:
        if not (callable(getattr(logger, "log", None)) and callable(getattr(logger, "close", None))):
            raise TypeError(f"critical sharpness: every entry of {argument} must have log(measurement) and "
                            f"close(), got {_describe(logger)}")
    return loggers


def require_positive_int(value: Any, argument: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"critical sharpness: {argument}={value!r} is invalid; allowed: an integer >= 1")


def _describe(value: Any) -> str:
    text = repr(value)
    return type(value).__name__ + (f" ({text[:60]}...)" if len(text) > 60 else f" ({text})")
