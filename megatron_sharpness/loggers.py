"""Where measurements go. Each logger takes every Measurement; integrations pick which to attach
(and attach them on one rank only)."""

from __future__ import annotations

import json
import os
from typing import Callable, Protocol

from megatron_sharpness.measurement import Measurement


class MeasurementLogger(Protocol):
    def log(self, measurement: Measurement) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Appends one JSON object per measurement; flushed per line so a crashed job keeps its data."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

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
