"""End to end: the REAL Megatron-DeepSpeed pretrain_gpt.py with our patch, on CPU (gloo).

The pinned snapshot (../shared/upstream/megatron-deepspeed-4efb479d.tar.gz, or the checkout or
tarball named by MEGATRON_SHARPNESS_MEGATRON_DEEPSPEED) is unpacked into a temporary folder and
patched; a tiny GPT with default dropout trains from a byte-level indexed dataset in the venv that
.ci/megatron-deepspeed-venv.sh builds (deepspeed 0.19.6; MEGATRON_SHARPNESS_DS_VENV names
another). Each layout runs with the probe off and on; training must be bitwise the same (the
iteration line's lm loss, grad norm and params norm, and TensorBoard's float32 scalars), our
fields appear in Megatron's iteration line on measured iterations only, and the JSONL and the
DeepSpeed monitor (CSV) hold the same measurements. Without the venv or the snapshot the tests
skip, saying what is missing; under CI (CI=true) that is a failure.
"""

import csv
import json
import os
from pathlib import Path

import pytest

from megatron_sharpness.logs import parse_lines
from megatron_sharpness.testing import megatron_deepspeed_cpu as harness

ITERATIONS = 4
INTERVAL = 2
MEASURED = list(range(INTERVAL, ITERATIONS + 1, INTERVAL))
TIMEOUT = 300

LAYOUTS = [
    # DeepSpeedEngine (--no-pipeline-parallel): ZeRO-1/2/3, data parallel 2, 2 micro-batches.
    harness.Layout("zero1", zero=1),
    harness.Layout("zero2-bf16", zero=2, bf16=True),
    harness.Layout("zero3-bf16", zero=3, bf16=True),
    # TP rank 1 gets data_iterator=None (issue 10, bug 4).
    harness.Layout("tp2xdp2-zero1", tensor=2, zero=1),
    # PipelineEngine, 2 stages, 4 micro-batches (bf16 ZeRO-1: BF16_Optimizer, which logs a grad norm).
    harness.Layout("pp2-bf16-zero1", pipeline=2, data=1, zero=1, bf16=True, pipeline_engine=True),
]


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the Megatron-DeepSpeed end-to-end tests cannot run: {reason}")
    pytest.skip(reason)


def _source() -> Path | None:
    named = os.environ.get("MEGATRON_SHARPNESS_MEGATRON_DEEPSPEED")
    if named:
        return Path(named)
    snapshot = harness.ROOT.parent / "shared" / "upstream" / harness.SNAPSHOT
    return snapshot if snapshot.exists() else None


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    python = harness.venv_python()
    if python is None:
        _unavailable(f"no Megatron-DeepSpeed venv: run {harness.VENV_SCRIPT} (or set MEGATRON_SHARPNESS_DS_VENV)")
    source = _source()
    if source is None or not source.exists():
        _unavailable(f"no Megatron-DeepSpeed source: set MEGATRON_SHARPNESS_MEGATRON_DEEPSPEED to a checkout or "
                     f"to {harness.SNAPSHOT} (looked for {harness.ROOT.parent / 'shared' / 'upstream'})")
    pytest.importorskip("megatron.core", reason="writing the indexed dataset needs the megatron extra")
    from megatron_sharpness.data import embedded_corpus, write_indexed_dataset

    root = tmp_path_factory.mktemp("megatron-deepspeed")
    checkout = harness.prepare_checkout(source, root / "src")
    harness.build_dataset_helpers(checkout, python)
    data = write_indexed_dataset(str(root / "text_document"), embedded_corpus()[:100_000])
    return python, checkout, Path(data)


def _run(upstream, layout, out_dir, flags):
    python, checkout, data = upstream
    result = harness.run(python, checkout, data, layout, out_dir, ITERATIONS, flags, TIMEOUT)
    assert result.returncode == 0, f"{layout.name}: exit {result.returncode}\n{result.output[-6000:]}"
    assert sorted(result.lines) == list(range(1, ITERATIONS + 1)), result.output[-6000:]
    assert "has no deepspeed.compression.compress" not in result.output  # the glue's warning is for other versions
    return result


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_probe_leaves_training_bitwise_unchanged_and_logs_everywhere(upstream, layout, tmp_path):
    python = upstream[0]
    log_file = tmp_path / "on" / "sharpness.jsonl"
    off = _run(upstream, layout, tmp_path / "off", [])
    on = _run(upstream, layout, tmp_path / "on", ["--critical-sharpness-interval", str(INTERVAL),
                                               "--critical-sharpness-log-file", str(log_file)])

    # Training: every field training determines, as printed, and TensorBoard's float32 scalars.
    for iteration in range(1, ITERATIONS + 1):
        fields = harness.training_fields(off.lines[iteration])
        # Megatron-DeepSpeed logs a grad norm on the PipelineEngine path only.
        assert {"lm loss", "params norm"} | ({"grad norm"} if layout.pipeline_engine else set()) <= set(fields)
        assert harness.training_fields(on.lines[iteration]) == fields, iteration
    scalars_off = harness.tensorboard_scalars(python, off.out_dir / "tensorboard")
    scalars_on = harness.tensorboard_scalars(python, on.out_dir / "tensorboard")
    compared = [tag for tag in scalars_off if tag.split("/")[0] in ("lm-loss-training", "params-norm", "grad-norm")]
    assert "lm-loss-training/lm loss" in compared and "params-norm/params-norm" in compared
    for tag in compared:
        assert len(scalars_off[tag]) == ITERATIONS and scalars_on[tag] == scalars_off[tag], tag

    # Our fields: in the iteration line of measured iterations only, as in the JSONL.
    for iteration, line in on.lines.items():
        assert ("critical sharpness:" in line) == (iteration in MEASURED), line
    assert not any("critical sharpness" in line for line in off.lines.values())
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [record["step"] for record in records] == MEASURED
    parsed = parse_lines(on.lines.values())
    assert [record.step for record in parsed] == MEASURED
    for record, from_line in zip(records, parsed):
        assert record["converged"] and record["critical_sharpness"] > 0
        assert from_line.critical_sharpness == pytest.approx(record["critical_sharpness"], rel=1e-3)

    # DeepSpeed's monitor (csv_monitor in the ds_config): ours against global samples, DeepSpeed's
    # own (lr, and train_loss on the pipeline) unchanged.
    ours = {"Train_Samples_critical_sharpness.csv", "Train_Samples_critical_lr.csv",
            "Train_Samples_lr_over_critical_lr.csv", "Train_Samples_step_raised_loss.csv"}
    tables_on, tables_off = _csv_tables(on.out_dir), _csv_tables(off.out_dir)
    assert set(tables_on) == set(tables_off) | ours and not ours & set(tables_off)
    for name, rows in tables_off.items():
        assert tables_on[name] == rows, name
    rows = tables_on["Train_Samples_critical_sharpness.csv"]
    assert [int(step) for step, _ in rows] == [step * layout.global_batch for step in MEASURED]
    assert [float(value) for _, value in rows] == pytest.approx([r["critical_sharpness"] for r in records], rel=1e-6)


def _csv_tables(out_dir: Path) -> dict[str, list[list[str]]]:
    tables = {}
    for path in sorted((out_dir / "csv" / "run").glob("*.csv")):
        with open(path) as table:
            tables[path.name] = list(csv.reader(table))[1:]
    return tables
