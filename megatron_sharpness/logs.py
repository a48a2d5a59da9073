"""Reading per-step sharpness back from training logs: our JSONL files and the iteration lines of
Megatron-LM, Megatron-DeepSpeed and our DeepSpeed logger, including multi-rank SLURM logs with rank
prefixes, lines of several ranks run together and lines cut short."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from megatron_sharpness.measurement import ProbeError

# "iteration      10/     200 |" (Megatron) or "iteration       10 |" (our DeepSpeed line); the
# rest of the line up to the next "iteration" holds that step's "key: value |" fields.
_ITERATION = re.compile(r"iteration\s+(\d+)(?:\s*/\s*\d+)?\s*\|")
_FIELD = re.compile(r"\s*([A-Za-z][A-Za-z0-9 /_\-.()]*?):\s*([^|]*?)\s*\|")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VALUE = re.compile(rf"^({_NUMBER})$")
# "modules: 14 (worst output 0.83)", "modules: 4 (worst layer_0 ascent)", or "modules: 4"
_MODULES = re.compile(rf"^(\d+)(?:\s+\(worst\s+(\S+)\s+(>?{_NUMBER}|ascent)\))?$")


class LogError(ValueError):
    """A log could not be read or holds no sharpness measurement."""


# The outcomes of a search (search.Outcome), of a due step that was not measured, and of a
# measurement whose forward raised on some rank.
STATUSES = ("converged", "ascent", "unresolved", "capped", "noisy", "non_finite", "skipped", "failed")


@dataclass
class StepRecord:
    step: int
    critical_sharpness: float | None
    critical_lr: float | None = None
    lr: float | None = None
    lr_over_critical_lr: float | None = None
    # Megatron's `lm loss` of the iteration (log lines), and L(θ_t) on the micro-batches the probe
    # evaluated (the JSONL `loss`): with micro_batches < all of the step's they differ.
    lm_loss: float | None = None
    probe_loss: float | None = None
    relative: dict[str, float | None] = field(default_factory=dict)
    skipped: str | None = None
    status: str = "converged"
    step_raised_loss: bool | None = None
    # λ_c bound where no number exists: ('>', b) for unresolved, ('<', b) for capped
    bound: tuple[str, float] | None = None
    relative_status: dict[str, str] = field(default_factory=dict)
    relative_bound: dict[str, tuple[str, float]] = field(default_factory=dict)
    # A failed measurement: "rank 1, lr 3.0000E-02: OutOfMemoryError: ..."
    error: str | None = None
    # The per-module breakdown: lr/critical lr per group (inf: ascent; None: no number), from a
    # JSONL record, worst first; a log line gives the worst group only.
    modules: dict[str, float | str | None] = field(default_factory=dict)
    worst_module: tuple[str, float | str | None] | None = None
    # Whether this measurement warned, and the run's warning count so far.
    warning: bool | None = None
    warnings: int | None = None
    # What the guard did at this measurement, as the log line writes it ("shorten output ×0.125").
    guard: str | None = None
    # Which leg of its log the record belongs to (1: the first): a new leg starts where a log's
    # steps go backwards or repeat with other values (a run restarted from step 1, or resumed from
    # an earlier checkpoint). line: where in its log the record was read (1-based).
    leg: int = field(default=1, compare=False)
    line: int | None = field(default=None, compare=False)

    def as_row(self, relative_names: list[str], legs: bool = False) -> dict[str, object]:
        row: dict[str, object] = {"leg": self.leg} if legs else {}
        row |= {"step": self.step, "status": self.status, "lr": self.lr,
                                  "critical_sharpness": self.critical_sharpness, "critical_lr": self.critical_lr,
                                  "lr_over_critical_lr": self.lr_over_critical_lr,
                                  "step_raised_loss": self.step_raised_loss, "lm_loss": self.lm_loss,
                                  "probe_loss": self.probe_loss}
        for name in relative_names:
            row[f"relative_sharpness/{name}"] = self.relative.get(name)
            row[f"relative_status/{name}"] = self.relative_status.get(name)
        return row


def _number(text: str) -> float | None:
    match = _VALUE.match(text.strip())
    return float(match.group(1)) if match else None


def _from_json(record: dict) -> StepRecord | None:
    if not isinstance(record.get("step"), int) or "critical_sharpness" not in record:
        return None

    def real(value):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    tasks = {name: task for name, task in (record.get("relative") or {}).items() if isinstance(task, dict)}
    skipped = record.get("skipped") if isinstance(record.get("skipped"), str) else None
    sharpness = real(record.get("critical_sharpness"))
    status = _json_status(record, skipped, sharpness)
    bracket = record.get("bracket")
    raised = record.get("step_raised_loss")
    relative_status = {name: _json_status(task, None, real(task.get("critical_sharpness"))) for name, task in tasks.items()}
    entries = {name: entry for name, entry in (record.get("modules") or {}).items() if isinstance(entry, dict)}
    # Worst first, as the probe ranks them: ascents among themselves by the steeper slope.
    ranked = sorted(((name, ratio) for name, entry in entries.items() if (ratio := _module_ratio(entry)) is not None),
                    key=lambda item: (item[1], _ascent_slope(entries[item[0]]) if math.isinf(item[1]) else 0.0),
                    reverse=True)
    # An unresolved group's ratio is a lower bound: kept as the text the log line shows (">1.00").
    modules = {name: f">{ratio:.2f}" if entries[name].get("status") == "unresolved" else ratio for name, ratio in ranked}
    modules |= {name: None for name in entries if name not in modules}
    warnings = record.get("warnings")
    return StepRecord(step=record["step"], critical_sharpness=sharpness,
                      critical_lr=real(record.get("critical_lr")), lr=real(record.get("lr")),
                      lr_over_critical_lr=real(record.get("lr_over_critical_lr")), probe_loss=real(record.get("loss")),
                      relative={name: real(task.get("critical_sharpness")) for name, task in tasks.items()},
                      skipped=skipped, status=status, step_raised_loss=raised if isinstance(raised, bool) else None,
                      bound=_bound(status, bracket), error=_json_error(record.get("error")),
                      relative_status=relative_status,
                      relative_bound={name: bound for name, task in tasks.items()
                                      if (bound := _bound(relative_status[name], task.get("bracket")))},
                      modules=modules, worst_module=next(iter(modules.items())) if ranked else None,
                      warning=("warning" in record and record["warning"] is not None) if "warning" in record else None,
                      warnings=warnings if isinstance(warnings, int) and not isinstance(warnings, bool) else None,
                      guard=_json_guard(record.get("guard")))


def _json_guard(guard: object) -> str | None:
    """A record's guard action as the log line's text; None where it did not act."""
    if not isinstance(guard, dict) or not isinstance(guard.get("factor"), (int, float)):
        return None
    where = f" {guard['group']}" if isinstance(guard.get("group"), str) else ""
    return f"{guard.get('mode')}{where} ×{guard['factor']:.3g}"


def _ascent_slope(entry: dict) -> float:
    slope = entry.get("slope")
    return float(slope) if isinstance(slope, (int, float)) and not isinstance(slope, bool) else 0.0


def _module_ratio(entry: dict) -> float | None:
    """lr/critical lr of a module group's JSON entry; an ascent is infinite."""
    if entry.get("status") == "ascent":
        return math.inf
    ratio = entry.get("lr_over_critical_lr")
    return float(ratio) if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else None


def _json_error(error: object) -> str | None:
    """The log-line text of a failed measurement's JSON `error` object."""
    if not isinstance(error, dict):
        return None
    try:
        return ProbeError(rank=int(error["rank"]), message=str(error["message"]), lr=float(error["lr"]),
                          task=error.get("task"), ranks=tuple(int(r) for r in error.get("ranks") or ())).text()
    except (KeyError, TypeError, ValueError):
        return str(error.get("message", error))


def _json_status(record: dict, skipped: str | None, sharpness: float | None) -> str:
    status = record.get("status")
    if status in STATUSES:
        return status
    # Records from before the status key: a null critical sharpness was a capped search.
    return "skipped" if skipped else ("converged" if sharpness is not None else "capped")


def _bound(status: str, bracket: object) -> tuple[str, float] | None:
    if not (isinstance(bracket, list) and len(bracket) == 2):
        return None
    lo, hi = bracket
    if status == "unresolved" and isinstance(hi, (int, float)) and hi > 0:
        return ">", 2.0 / hi
    if status == "capped" and isinstance(lo, (int, float)) and lo > 0:
        return "<", 2.0 / lo
    return None


def _text_status(text: str) -> tuple[str, tuple[str, float] | None]:
    """The outcome of a log-line value: a number, 'ascent (...)', '> b (unresolved)',
    'unresolved (...)', '< b (never rose)' or, from older versions, '< b (capped)'."""
    if _number(text) is not None:
        return "converged", None
    if text.startswith("ascent"):
        return "ascent", None
    if text.startswith("skipped"):
        return "skipped", None
    if text.startswith("noisy"):
        return "noisy", None
    if text.startswith("non-finite"):
        return "non_finite", None
    if text.startswith("failed"):
        return "failed", None
    match = re.match(rf"^([<>])\s*({_NUMBER})\s*\((unresolved|never rose|capped)\)", text)
    if match:
        return ("unresolved" if match.group(3) == "unresolved" else "capped"), (match.group(1), float(match.group(2)))
    if text.startswith("unresolved"):  # no bound: the loss did not resolve the update at all
        return "unresolved", None
    return "unknown", None


def _from_fields(step: int, text: str) -> StepRecord | None:
    fields = {key.strip().lower(): value for key, value in _FIELD.findall(text)}
    if "critical sharpness" not in fields:
        return None
    sharpness_text = fields["critical sharpness"]
    status, bound = _text_status(sharpness_text)
    if status == "unknown":
        return None
    skipped = None
    if status == "skipped":
        skipped = sharpness_text[len("skipped"):].strip(" ()") or "skipped"
    error = _parenthesised(sharpness_text[len("failed"):]) if status == "failed" else None
    relative_texts = {key[len("relative sharpness "):]: value for key, value in fields.items()
                      if key.startswith("relative sharpness ")}
    loss = fields.get("lm loss", fields.get("loss"))
    raised = fields.get("step raised loss")
    modules = _MODULES.match(fields.get("modules", ""))
    worst = None
    if modules and modules.group(2):
        text = modules.group(3)
        # A '>' bound stays text: the report shows it as the line did.
        worst = (modules.group(2), math.inf if text == "ascent" else (text if text.startswith(">") else _number(text)))
    warnings = fields.get("sharpness warnings")
    return StepRecord(step=step, critical_sharpness=_number(sharpness_text), critical_lr=_number(fields.get("critical lr", "")),
                      # Our own `step lr` is the measured step's; Megatron prints `learning rate` after
                      # the scheduler stepped (the next iteration's lr).
                      lr=_number(fields.get("step lr", fields.get("learning rate", ""))),
                      lr_over_critical_lr=_number(fields.get("lr/critical lr", "")),
                      lm_loss=_number(loss) if loss is not None else None,
                      relative={name: _number(text) for name, text in relative_texts.items()}, skipped=skipped,
                      status=status, step_raised_loss=None if raised is None else raised == "yes", bound=bound,
                      relative_status={name: _text_status(text)[0] for name, text in relative_texts.items()},
                      relative_bound={name: bound for name, text in relative_texts.items()
                                      if (bound := _text_status(text)[1])},
                      error=error, worst_module=worst,
                      warnings=int(warnings) if warnings is not None and warnings.isdigit() else None,
                      guard=fields.get("sharpness guard"))


def _parenthesised(text: str) -> str:
    """'(rank 1, ...: out of memory (2 GiB))' -> the text inside the outer parentheses only."""
    text = text.strip()
    return text[1:-1] if text.startswith("(") and text.endswith(")") else text


def _json_record(line: str) -> StepRecord | None:
    """The measurement in a JSONL line (after any rank prefix), or None."""
    start = line.find("{")
    if start < 0 or '"critical_sharpness"' not in line:
        return None
    try:
        return _from_json(json.loads(line[start:]))
    except (json.JSONDecodeError, AttributeError):
        return None


def unreadable_jsonl_lines(lines: list[str]) -> int:
    """In a file of JSON lines (at least half of its non-empty lines start with "{"), how many
    non-empty lines hold no readable measurement record (cut short by a crash, or garbage). 0 for
    text logs, where most lines are other output."""
    content = [line for line in lines if line.strip()]
    if sum(line.lstrip().startswith("{") for line in content) * 2 < len(content):
        return 0
    return sum(_json_record(line) is None for line in content)


def parse_lines(lines: Iterable[str]) -> list[StepRecord]:
    """Every step measured in the lines, in (leg, step) order. Where the steps go backwards or a
    step comes again with other values, a new leg starts (StepRecord.leg): a run restarted without
    its probe state counts from step 1 again, and a run resumed from a checkpoint measures the steps
    after it again; the two legs are kept apart, not merged (which of them holds the truth the log
    cannot tell). A record equal to the one already read for its step (several ranks print the same
    line) is read once."""
    legs: list[dict[int, StepRecord]] = [{}]
    last_step: int | None = None
    for number, line in enumerate(lines, 1):
        for record in _records_in(line):
            if last_step is not None and record.step <= last_step:
                if legs[-1].get(record.step) == record:
                    continue
                legs.append({})
            record.leg, record.line = len(legs), number
            legs[-1][record.step] = record
            last_step = record.step
    return _mark_warnings([leg[step] for leg in legs for step in sorted(leg)])


def _records_in(line: str) -> list[StepRecord]:
    record = _json_record(line)
    if record is not None:
        return [record]
    matches = list(_ITERATION.finditer(line))
    found = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(line)
        record = _from_fields(int(match.group(1)), line[match.end():end])
        if record is not None:
            found.append(record)
    return found


def new_legs(records: list[StepRecord]) -> list[tuple[StepRecord, StepRecord]]:
    """(the last record of a leg, the first of the next) for each leg after the first."""
    return [(before, after) for before, after in zip(records, records[1:]) if after.leg != before.leg]


def _mark_warnings(records: list[StepRecord]) -> list[StepRecord]:
    """A log line carries the run's warning count: a measurement warned where the count grew
    (the first counted one: where it is above 0)."""
    previous, leg = 0, 1
    for record in records:
        if record.leg != leg:
            leg = record.leg
            if record.warnings is not None and record.warnings < previous:
                previous = 0  # a run restarted without its probe state counts anew; a resumed one goes on
        if record.warnings is not None:
            if record.warning is None:
                record.warning = record.warnings > previous
            previous = record.warnings
    return records


def parse_losses(lines: Iterable[str]) -> dict[int, float]:
    """iteration -> training loss: `lm loss` of every iteration line (measured or not); where a log
    has none, the JSONL `loss` (L(θ_t) on the step's batch) of the measured steps."""
    printed: dict[int, float] = {}
    probed: dict[int, float] = {}
    for line in lines:
        start = line.find("{")
        if start >= 0 and '"critical_sharpness"' in line:
            record = _json_record(line)
            if record is not None and record.probe_loss is not None:
                probed[record.step] = record.probe_loss
            continue
        matches = list(_ITERATION.finditer(line))
        for index, match in enumerate(matches):
            end = matches[index + 1].start() if index + 1 < len(matches) else len(line)
            fields = {key.strip().lower(): value for key, value in _FIELD.findall(line[match.end():end])}
            value = _number(fields.get("lm loss", "")) if "lm loss" in fields else None
            if value is None and fields.get("lm loss", "").strip().lower() in ("nan", "inf"):
                value = float(fields["lm loss"])
            if value is not None:
                printed[int(match.group(1))] = value
    return printed or probed


def read_losses(paths: Iterable[str]) -> dict[int, float]:
    """The training loss per iteration over all files (later files win), for spike detection."""
    losses: dict[int, float] = {}
    for path in paths:
        try:
            with open(path, "rb") as handle:
                losses.update(parse_losses(handle.read().decode("utf-8", errors="replace").splitlines()))
        except OSError as error:
            raise LogError(f"cannot read {path}: {error.strerror or error}") from None
    return losses


def read_logs(paths: Iterable[str], warn: Callable[[str], None] | None = None) -> list[StepRecord]:
    """The records of all files. Files are merged leg by leg: where two files hold the same step of
    the same leg the later file's record wins (a log and its JSONL, or the logs of consecutive jobs
    given in run order). warn gets one line per JSONL file with unreadable lines, and one per place
    where a file's steps go backwards (a new leg)."""
    merged: dict[tuple[int, int], StepRecord] = {}
    for path in paths:
        try:
            with open(path, "rb") as handle:
                text = handle.read().decode("utf-8", errors="replace")
        except OSError as error:
            raise LogError(f"cannot read {path}: {error.strerror or error}") from None
        lines = text.splitlines()
        found = parse_lines(lines)
        unreadable = unreadable_jsonl_lines(lines)
        if warn is not None:
            if unreadable:
                warn(f"{path}: skipped {unreadable} of {sum(1 for line in lines if line.strip())} lines that hold no "
                     "readable measurement record (cut short or garbage)")
            for before, after in new_legs(found):
                warn(f"{path}: the steps go backwards at line {after.line} (step {after.step} after step "
                     f"{before.step}): a run restarted without its probe state, or resumed from an earlier "
                     f"checkpoint; its records are kept apart as leg {after.leg}, not merged with the steps "
                     f"before (pass the run's iteration to the probe, or load its state, to count on)")
        if not found:
            raise LogError(f"{path}: no critical sharpness measurement found (expected JSONL records from "
                           "--critical-sharpness-log-file or iteration lines with '| critical sharpness: ... |')")
        merged.update(((record.leg, record.step), record) for record in found)
    return _mark_warnings([merged[key] for key in sorted(merged)])


def legs_of(records: list[StepRecord]) -> list[list[StepRecord]]:
    """The records split by leg, in order (one list where the log never went backwards)."""
    legs: dict[int, list[StepRecord]] = {}
    for record in records:
        legs.setdefault(record.leg, []).append(record)
    return [legs[leg] for leg in sorted(legs)]


def relative_names(records: Iterable[StepRecord]) -> list[str]:
    names: list[str] = []
    for record in records:
        names += [name for name in record.relative if name not in names]
    return names


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
