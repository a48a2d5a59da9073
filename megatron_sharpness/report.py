"""Tables, per-phase statistics and plots of parsed sharpness records (the CLI's parse, summary
and plot)."""

from __future__ import annotations

import csv
import io
import json
import statistics

from megatron_sharpness.logs import StepRecord, is_finite, relative_names


class ReportError(ValueError):
    pass


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(records: list[StepRecord], fmt: str) -> str:
    names = relative_names(records)
    rows = [record.as_row(names) | {"skipped": record.skipped} for record in records]
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
        return out.getvalue().rstrip("\n")
    header = list(rows[0])
    table = [header] + [[_text(row[key]) for key in header] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table)


def _edge_ratio(record: StepRecord) -> float | None:
    """η_t·λ_c/2 = η_t/η_c: above 1 the step is past the edge of stability."""
    if is_finite(record.lr_over_critical_lr):
        return record.lr_over_critical_lr
    if is_finite(record.lr) and is_finite(record.critical_sharpness):
        return record.lr * record.critical_sharpness / 2
    return None


def _slope(steps: list[int], values: list[float]) -> float | None:
    if len(steps) < 2 or len(set(steps)) < 2:
        return None
    mean_step, mean_value = statistics.fmean(steps), statistics.fmean(values)
    covariance = sum((s - mean_step) * (v - mean_value) for s, v in zip(steps, values))
    variance = sum((s - mean_step) ** 2 for s in steps)
    return covariance / variance


def summary(records: list[StepRecord], phases: int) -> str:
    measured = [r for r in records if is_finite(r.critical_sharpness)]
    if not measured:
        raise ReportError("no converged measurement to summarise (every step was skipped or capped)")
    phases = min(phases, len(measured))
    bounds = [round(i * len(measured) / phases) for i in range(phases + 1)]
    header = ["phase", "steps", "measured", "median λ_c", "λ_c slope /1k steps", "share η·λ_c/2 > 1"]
    lines = [header]
    for index in range(phases):
        part = measured[bounds[index]:bounds[index + 1]]
        steps = [r.step for r in part]
        values = [r.critical_sharpness for r in part]
        slope = _slope(steps, values)
        ratios = [ratio for ratio in (_edge_ratio(r) for r in part) if ratio is not None]
        share = f"{100 * sum(ratio > 1 for ratio in ratios) / len(ratios):.0f}%" if ratios else "-"
        lines.append([str(index + 1), f"{steps[0]}-{steps[-1]}", str(len(part)), f"{statistics.median(values):.4g}",
                      "-" if slope is None else f"{1000 * slope:+.4g}", share])
    skipped = sum(1 for r in records if r.skipped)
    capped = sum(1 for r in records if not r.skipped and not is_finite(r.critical_sharpness))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)
    return (f"{len(records)} measured steps ({skipped} skipped, {capped} capped), "
            f"steps {records[0].step}-{records[-1].step}\n{table}")


def plot(records: list[StepRecord], output: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("plot needs matplotlib: pip install 'megatron-sharpness[plot]'") from None
    measured = [r for r in records if is_finite(r.critical_sharpness)]
    if not measured:
        raise ReportError("nothing to plot: no converged measurement")
    figure, axis = plt.subplots(figsize=(9, 5))
    axis.plot([r.step for r in measured], [r.critical_sharpness for r in measured], "o-", ms=3,
              label="critical sharpness λ_c")
    for name in relative_names(records):
        points = [(r.step, r.relative.get(name)) for r in records if is_finite(r.relative.get(name))]
        if points:
            axis.plot(*zip(*points), ".-", ms=3, alpha=0.8, label=f"relative λ_c: {name}")
    with_lr = [r for r in records if is_finite(r.lr) and r.lr > 0]
    if with_lr:
        axis.plot([r.step for r in with_lr], [2 / r.lr for r in with_lr], "k--", lw=1, label="2/η (edge of stability)")
        lr_axis = axis.twinx()
        lr_axis.plot([r.step for r in with_lr], [r.lr for r in with_lr], color="tab:gray", lw=1, alpha=0.6)
        lr_axis.set_ylabel("learning rate η", color="tab:gray")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("sharpness")
    axis.legend(loc="best", fontsize=8)
    axis.set_title("critical sharpness along the optimizer's update")
    figure.tight_layout()
    try:
        figure.savefig(output, dpi=120)
    except OSError as error:
        raise ReportError(f"cannot write {output}: {error.strerror or error}") from None
    finally:
        plt.close(figure)
