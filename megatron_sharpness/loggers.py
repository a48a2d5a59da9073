"""Where measurements go. Each logger takes every Measurement; integrations pick which to attach
(and attach them on one rank only)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Protocol

from megatron_sharpness.config import ConfigError
from megatron_sharpness.measurement import Measurement


class MeasurementLogger(Protocol):
    def log(self, measurement: Measurement) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Appends one JSON object per measurement, one write per line, so that a crashed job keeps
    its data. A write that fails (a full disk) is cut back to the last whole line and raised with
    the file's name; the probe warns and keeps measuring (SharpnessProbe's logger guard), and a
    later measurement writes again once there is room."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = self._open(path)
        except OSError as error:
            # Opened at construction so that a bad path fails before training, not at the first measurement.
            raise ConfigError(f"critical sharpness config: log_file={path!r} cannot be opened for appending: "
                              f"{error.strerror or error}; allowed: a writable file path or null") from None

    @staticmethod
    def _open(path: str) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            return os.open(path, flags, 0o644)
        except FileNotFoundError:  # the folder does not exist yet (a folder that is a file fails above)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return os.open(path, flags, 0o644)

    def log(self, measurement: Measurement) -> None:
        data = (json.dumps(measurement.to_dict(), allow_nan=False) + "\n").encode("utf-8")
        whole = os.fstat(self._fd).st_size
        try:
            written = 0
            while written < len(data):  # a full disk can take part of a line before it refuses the rest
                written += os.write(self._fd, data[written:])
        except OSError as error:
            if written:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, whole)
            raise OSError(error.errno, error.strerror, self.path) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
