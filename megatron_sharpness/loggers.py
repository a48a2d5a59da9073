"""Where measurements go. Each logger takes every Measurement; integrations pick which to attach
(and attach them on one rank only)."""

from __future__ import annotations

import json
import os
from typing import Callable, Protocol

from megatron_sharpness.config import ConfigError
from megatron_sharpness.measurement import Measurement


class MeasurementLogger(Protocol):
    def log(self, measurement: Measurement) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Appends one JSON object per measurement; flushed per line so a crashed job keeps its data."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = self._open(path)
        except OSError as error:
            # Opened at construction so that a bad path fails before training, not at the first measurement.
            raise ConfigError(f"critical sharpness config: log_file={path!r} cannot be opened for appending: "
                              f"{error.strerror or error}; allowed: a writable file path or null") from None

    @staticmethod
    def _open(path: str):
        try:
            return open(path, "a", encoding="utf-8")
        except FileNotFoundError:  # the folder does not exist yet (a folder that is a file fails above)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return open(path, "a", encoding="utf-8")

    def log(self, measurement: Measurement) -> None:
        self._file.write(json.dumps(measurement.to_dict(), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class LogLineLogger:
    """Prints ` iteration N | critical sharpness: ... |` in the style of Megatron's log line."""

    def __init__(self, print_fn: Callable[[str], None] = print):
        self._print = print_fn

    def log(self, measurement: Measurement) -> None:
        self._print(f" iteration {measurement.step:8d} | {measurement.log_fields()}")

    def close(self) -> None:
        pass


class WarningLogger:
    """Prints a measurement's instability warning as a Megatron-style `WARNING:` line (attach it on
    the rank that prints the log, as the integrations do)."""

    def __init__(self, print_fn: Callable[[str], None] = print):
        self._print = print_fn

    def log(self, measurement: Measurement) -> None:
        if measurement.warning is not None:
            self._print(f"WARNING: {measurement.warning}")

    def close(self) -> None:
        pass
