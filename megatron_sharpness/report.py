"""Tables, per-phase statistics and plots of parsed sharpness records (the CLI's parse, summary
and plot)."""

from __future__ import annotations

import csv
import io
import json
import statistics

from megatron_sharpness.logs import STATUSES, StepRecord, is_finite, relative_names


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
    rows = [record.as_row(names) | {"skipped": record.skipped, "error": record.error} for record in records]
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
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)
    outcomes = [f"{len(records)} measured steps, steps {records[0].step}-{records[-1].step}",
                f"  step's batch: {_outcome_counts([r.status for r in records])}"]
    raised = [r.step_raised_loss for r in records if r.step_raised_loss is not None]
    if raised:
        outcomes.append(f"  the step raised its batch's loss at {sum(raised)} of {len(raised)} measured steps")
    for name in relative_names(records):
        statuses = [r.relative_status[name] for r in records if name in r.relative_status]
        values = [r.relative[name] for r in records if is_finite(r.relative.get(name))]
        median = f", median relative λ_c {statistics.median(values):.4g}" if values else ""
        outcomes.append(f"  relative task {name}: {_outcome_counts(statuses)}{median}")
    return "\n".join(outcomes) + "\n" + table


def _outcome_counts(statuses: list[str]) -> str:
    """'12 converged, 3 ascent, ...' in the order of STATUSES, outcomes that occur only."""
    return ", ".join(f"{statuses.count(status)} {status}" for status in STATUSES if status in statuses) or "none"


def plot(records: list[StepRecord], output: str) -> None:
    """Writes figure(records) to output."""
    built = figure(records)
    import matplotlib.pyplot as plt

    try:
        built.savefig(output, dpi=120)
    except OSError as error:
        raise ReportError(f"cannot write {output}: {error.strerror or error}") from None
    finally:
        plt.close(built)


def figure(records: list[StepRecord]):
    """λ_c per step on a log scale, relative tasks beside it, the lr in a panel of its own.

    Only converged values are drawn as lines, broken where a step has no number. Bounds are
    triangles pointing where λ_c lies (unresolved: λ_c above the marker; never rose: below); an
    ascent (×) or a crossing placed by the loss's rounding (◇, noisy) has no λ_c at all and is marked
    on the top edge.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.transforms import blended_transform_factory
    except ImportError:
        raise ReportError("plot needs matplotlib: pip install 'megatron-sharpness[plot]'") from None
    if all(r.status in ("skipped", "failed") for r in records):
        raise ReportError("nothing to plot: every measured step was skipped or failed")
    with_lr = [r for r in records if is_finite(r.lr) and r.lr > 0]
    built, axes = plt.subplots(2 if with_lr else 1, 1, figsize=(9, 6.5 if with_lr else 5), sharex=True,
                                squeeze=False, gridspec_kw={"height_ratios": [3, 1]} if with_lr else None)
    axis = axes[0][0]
    top_edge = blended_transform_factory(axis.transData, axis.transAxes)
    series = [("critical sharpness λ_c", "tab:blue", [(r.step, r.critical_sharpness, r.status, r.bound) for r in records])]
    colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for index, name in enumerate(relative_names(records)):
        points = [(r.step, r.relative.get(name), r.relative_status.get(name), r.relative_bound.get(name)) for r in records
                  if name in r.relative_status or name in r.relative]
        series.append((f"relative λ_c: {name}", colors[index % len(colors)], points))
    for label, color, points in series:
        steps = [step for step, _, _, _ in points]
        values = [value if is_finite(value) else float("nan") for _, value, _, _ in points]
        axis.plot(steps, values, "o-", ms=3, lw=1, color=color, label=label)
        for marker, status, text in (("^", "unresolved", "λ_c > bound (unresolved)"),
                                     ("v", "capped", "λ_c < bound (never rose)")):
            bounded = [(step, bound[1]) for step, _, state, bound in points if state == status and bound]
            if bounded:
                axis.plot(*zip(*bounded), marker, ls="none", ms=6, color=color, mfc="none", label=f"{label}: {text}")
        for marker, status, text in (("x", "ascent", "ascent (no λ_c)"), ("d", "noisy", "noisy (no λ_c)")):
            steps = [step for step, _, state, _ in points if state == status]
            if steps:
                axis.plot(steps, [0.98] * len(steps), marker, ms=5, color=color, mfc="none", transform=top_edge,
                          label=f"{label}: {text}")
    if with_lr:
        steps = [r.step for r in with_lr]
        axis.plot(steps, [2 / r.lr for r in with_lr], "k--", lw=1, label="2/η (edge of stability)")
        lr_axis = axes[1][0]
        lr_axis.plot(steps, [r.lr for r in with_lr], color="tab:gray", lw=1)
        lr_axis.set_ylabel("learning rate η")
        lr_axis.set_xlabel("step")
    else:
        axis.set_xlabel("step")
    axis.set_yscale("log")
    axis.set_ylabel("sharpness")
    # Below the band of the top edge, where ascents and noisy readings are marked.
    axis.legend(loc="upper right", bbox_to_anchor=(1.0, 0.95), fontsize=7)
    axis.set_title("critical sharpness along the optimizer's update")
    built.tight_layout()
    return built
