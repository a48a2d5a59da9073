"""Benchmarks (scripts that print tables, not tests)."""

from __future__ import annotations

import json
import sys
from typing import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    table = [list(header)] + [list(row) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def argv_of(a, names: Sequence[str]) -> list[str]:
    """The flags that give a worker's parser back these fields of `a` (`micro_batches` → `--micro-batches N`)."""
    return [item for name in names for item in (f"--{name.replace('_', '-')}", str(getattr(a, name)))]


def run_setups(module: str, setups: dict[str, tuple[int, list[str]]], common: list[str],
               env: dict[str, str], timeout: float = 600) -> list[tuple[str, dict]]:
    """Runs `python -m module --worker ARGS` on each setup's ranks; rank 0 prints `RESULT {json}`."""
    from megatron_sharpness.testing.launch import run_ranks

    rows = []
    for name, (world_size, args) in setups.items():
        results = run_ranks(["-m", module, "--worker", *args, *common], world_size=world_size, timeout=timeout, env=env)
        line = next(line for line in results[0].output.splitlines() if line.startswith("RESULT "))
        rows.append((name, json.loads(line[len("RESULT "):])))
        print(f"done: {name}", file=sys.stderr, flush=True)
    return rows
