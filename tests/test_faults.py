"""A probe can fail, a job cannot hang: a failure inside a probe forward or the θ_t snapshot on ONE
rank is agreed on by every rank before any further collective, θ_{t+1} is restored everywhere and
the measurement is recorded as failed (or skipped) while training goes on bitwise unchanged.
The megatron-core and DeepSpeed versions live in tests/test_megatron.py and tests/test_deepspeed.py."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_sharpness import SharpnessConfig, TorchSharpnessProbe
from megatron_sharpness.config import ConfigError
from megatron_sharpness.integrations.flags import add_critical_sharpness_args, config_from_args
from megatron_sharpness.logs import parse_lines
from megatron_sharpness.measurement import Measurement, ProbeError
from megatron_sharpness.testing.launch import run_ranks

WORKER = os.path.join(os.path.dirname(__file__), "workers", "ddp_train.py")
STEPS = 4


def ddp_run(tmp_path, *args, outputs=None):
    results = run_ranks([WORKER, str(tmp_path), str(STEPS), *args], world_size=2, timeout=240)
    if outputs is not None:
        outputs += [result.output for result in results]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["bitwise_equal"], f"rank {result['rank']}: training with the failed probe diverged"
        assert result["rng_equal"], f"rank {result['rank']}: the failed probe moved the RNG"
    records = [[{k: v for k, v in r.items() if k not in ("probe_seconds", "local_baseline")} for r in result["records"]]
               for result in ranks]
    assert records[0] == records[1], "the ranks disagree"
    return records[0]


def test_ddp_one_rank_oom_in_the_loss_fn_fails_that_measurement_on_every_rank(tmp_path):
    """Rank 1's 3rd loss_fn call of step 2 (after both L(θ_t) and s = 1) fails the measurement. At
    step 3, rank 1 runs out of memory in the 2nd forward of the module breakdown's layer_0 search:
    the step's own λ_c, the held-out task and the group searched before (embedding) are kept, the
    error names layer_0, the group after it (output) is not searched."""
    records = ddp_run(tmp_path, "--fail-at", "1:2:3,1:3:2@layer_0", "--modules")
    assert [r["status"] for r in records] == ["converged", "failed", "converged", "converged"]
    error = records[1]["error"]
    assert (error["rank"], error["ranks"], error["task"], error["group"]) == (1, [1], None, None)
    assert error["message"] == "OutOfMemoryError: injected on rank 1 at probe loss 3 of step 2"
    assert error["lr"] > 0
    assert [list(r["modules"]) for r in records] == [["embedding", "layer_0", "output"], [], ["embedding"],
                                                     ["embedding", "layer_0", "output"]]
    broken = records[2]
    assert broken["critical_sharpness"] > 0 and broken["relative"]["held-out"]["status"] != "failed"
    assert broken["error"] is None and [r["modules_error"] for r in records[:2] + records[3:]] == [None] * 3
    group_error = broken["modules_error"]
    assert (group_error["rank"], group_error["ranks"], group_error["task"], group_error["group"]) == (1, [1], None, "layer_0")
    assert group_error["message"] == "OutOfMemoryError: injected on rank 1 at probe loss 2 of group layer_0 of step 3"
    assert group_error["lr"] > 0
    assert broken["forwards_total"] == (broken["forwards"] + broken["relative"]["held-out"]["forwards"]
                                        + broken["modules"]["embedding"]["forwards"])


def test_ddp_snapshot_that_does_not_fit_on_one_rank_skips_the_measurement_everywhere(tmp_path):
    records = ddp_run(tmp_path, "--snapshot-oom", "1:3")
    assert [r["status"] for r in records] == ["converged", "converged", "skipped", "converged"]
    assert records[2]["skipped"] == ("the θ_t snapshot did not fit in memory (rank 1: OutOfMemoryError: "
                                     "injected: no memory for the θ_t snapshot)")


def test_ddp_on_error_raise_raises_on_every_rank_after_restoring(tmp_path):
    records = ddp_run(tmp_path, "--fail-at", "0:2:1", "--on-error", "raise")
    assert "raised" not in records[0] and records[0]["status"] == "converged"
    assert records[1] == {"raised": "critical sharpness: the measurement at step 2 failed (rank 0, lr 0.0000E+00: "
                                    "OutOfMemoryError: injected on rank 0 at probe loss 1 of step 2); on_error='raise'"}
    assert records[2]["status"] == "converged"


FULL_DISK = r"""
import json, resource, signal, sys
import torch, torch.nn.functional as F
from megatron_sharpness import SharpnessConfig, TorchSharpnessProbe

path, limit = sys.argv[1], int(sys.argv[2])
# Writes past `limit` bytes fail with EFBIG, after a partial write that fills the file up to it: a
# disk that fills in the middle of a line.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1, log_file=path))
x, y = torch.randn(16, 4), torch.randn(16, 1)
steps = []
for _ in range(6):
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    steps.append(probe.step(lambda: F.mse_loss(model(x), y)).step)
probe.close()
print(json.dumps(steps))
"""


def test_a_log_file_that_fills_up_keeps_whole_lines_and_the_probe_goes_on(tmp_path):
    log_file = tmp_path / "sharpness.jsonl"
    limit = 2500  # a record here is 0.6-1 kB: the disk fills during the 3rd or 4th
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(log_file), str(limit)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [1, 2, 3, 4, 5, 6]  # measured and returned at every step
    text = log_file.read_text()
    assert text.endswith("\n") and len(text.encode()) <= limit
    steps = [json.loads(line)["step"] for line in text.splitlines()]
    assert 2 <= len(steps) < 6 and steps == sorted(steps)
    warned = [line for line in result.stderr.splitlines() if "logger failed" in line]
    assert len(warned) == 1 and (f"the JsonlLogger logger failed in log(): OSError: [Errno 27] File too large: "
                                 f"'{log_file}'") in warned[0]


def test_single_process_failure_is_recorded_and_training_goes_on():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1), loggers=[])
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    calls = []

    def loss_fn():
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("host RAM exhausted")
        return F.mse_loss(model(x), y)

    F.mse_loss(model(x), y).backward()
    twin = copy.deepcopy(model)
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        theirs.grad = mine.grad.clone()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    expected = list(twin.parameters())
    measurement = probe.step(loss_fn)
    assert measurement.status == "failed" and measurement.error.message == "MemoryError: host RAM exhausted"
    assert measurement.error.lr == pytest.approx(0.1)  # s = 1, the second forward
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected))


def test_failed_measurement_round_trips_through_the_log_line_and_jsonl():
    error = ProbeError(rank=1, message="OutOfMemoryError: CUDA out of memory (tried 2.00 GiB)", lr=0.03, ranks=(1, 3))
    measurement = Measurement(step=7, lr=0.01, task=None, error=error)
    line = f" iteration        7/     100 | lm loss: 3.5 | {measurement.log_fields()}"
    assert measurement.log_fields() == ("critical sharpness: failed (rank 1 (and 1 more rank), lr 3.0000E-02: "
                                        "OutOfMemoryError: CUDA out of memory (tried 2.00 GiB)) | step lr: 1.000000E-02 |")
    (from_line,) = parse_lines([line])
    (from_json,) = parse_lines([json.dumps(measurement.to_dict())])
    for record in (from_line, from_json):
        assert (record.step, record.status, record.critical_sharpness, record.lr) == (7, "failed", None, 0.01)
        assert record.error == "rank 1 (and 1 more rank), lr 3.0000E-02: OutOfMemoryError: CUDA out of memory (tried 2.00 GiB)"


def test_on_error_is_validated_and_has_a_flag():
    with pytest.raises(ConfigError, match=r"on_error='ignore' is invalid; allowed: skip or raise"):
        SharpnessConfig(on_error="ignore")
    parser = add_critical_sharpness_args(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--critical-sharpness-interval", "5", "--critical-sharpness-on-error", "raise"])
    assert config_from_args(args).on_error == "raise"
    assert config_from_args(parser.parse_args([])).on_error == "skip"


def _train_with_probe(steps, state=None, start=0, optimizer_class=torch.optim.Adam, pass_iteration=False):
    """A tiny regression trained from a checkpoint-like start; returns records and the probe.
    state["probe"] None: resumed without the probe's state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = optimizer_class(model.parameters(), lr=3e-2)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=2), loggers=[])
    held_x, held_y = torch.randn(32, 6), torch.randn(32, 1)
    probe.add_relative_task("held-out", lambda: F.mse_loss(model(held_x), held_y))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["probe"] is not None:
            probe.load_state_dict(state["probe"])
    records = []
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(32, 6, generator=generator)
        y = x.sum(1, keepdim=True).sin()
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        counted = {"iteration": step + 1} if pass_iteration else {}  # else the probe counts
        measurement = probe.step(lambda: F.mse_loss(model(x), y), **counted)
        if measurement is not None:
            records.append({k: v for k, v in measurement.to_dict().items() if k != "probe_seconds"})
    checkpoint = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                  "probe": copy.deepcopy(probe.state_dict())}
    return records, checkpoint


def test_resume_from_the_probe_state_measures_what_the_uninterrupted_run_would():
    uninterrupted, _ = _train_with_probe(12)
    _, checkpoint = _train_with_probe(6)
    resumed, _ = _train_with_probe(6, checkpoint, start=6)
    assert [r["step"] for r in resumed] == [8, 10, 12]
    assert resumed == uninterrupted[3:]  # same steps, same forwards, same values, bitwise
    # Without the probe state the warm start is lost: other trial points (and the step count restarts).
    checkpoint["probe"] = {"iteration": 6, "probe": {"version": 1, "last_critical_lr": []}}
    cold, _ = _train_with_probe(6, checkpoint, start=6)
    assert [r["step"] for r in cold] == [8, 10, 12]
    assert [r["evaluations"] for r in cold] != [r["evaluations"] for r in uninterrupted[3:]]


def test_a_resume_without_the_probe_state_counts_steps_on_from_the_optimizer_or_the_given_iteration():
    """Steps 1-6, a checkpoint of model and optimizer only, steps 7-12 in a new process: the probe
    must not count from 1 again (its records would be labelled steps 2, 4, 6 and read as the first
    leg's). Adam counts its own steps; SGD keeps none, there the loop's iteration is passed."""
    uninterrupted, _ = _train_with_probe(12)
    _, checkpoint = _train_with_probe(6)
    checkpoint["probe"] = None
    resumed, _ = _train_with_probe(6, checkpoint, start=6)
    assert [r["step"] for r in resumed] == [8, 10, 12]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in uninterrupted[3:]]
    _, checkpoint = _train_with_probe(6, optimizer_class=torch.optim.SGD)
    checkpoint["probe"] = None
    resumed, _ = _train_with_probe(6, checkpoint, start=6, optimizer_class=torch.optim.SGD, pass_iteration=True)
    assert [r["step"] for r in resumed] == [8, 10, 12]
    probe = TorchSharpnessProbe(torch.nn.Linear(2, 1), torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"iteration=0 is invalid; allowed: an integer >= 1"):
        probe.step(lambda: 0.0, iteration=0)


def test_load_state_dict_rejects_what_is_not_a_probe_state():
    probe = TorchSharpnessProbe(torch.nn.Linear(2, 1), torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1),
                                loggers=[])
    with pytest.raises(ValueError, match="load_state_dict"):
        probe.load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="bad warm start"):
        probe.load_state_dict({"iteration": 3, "probe": {"version": 1, "last_critical_lr": [[None, -1.0]]}})


def test_ddp_one_rank_nan_at_a_trial_point_names_that_rank_and_a_full_disk_does_not_stop_training(tmp_path):
    """Rank 1's 3rd loss_fn call of step 2: the first trial point after L(θ_t) and s = 1. The JSONL
    file of rank 0 is /dev/full: every write fails with ENOSPC. Rank 0 warns once, naming the file,
    and goes on measuring; the ranks stay in step, training is bitwise unchanged, close() is quiet."""
    outputs = []
    records = ddp_run(tmp_path, "--fail-at", "1:2:3:nan", "--log-file", "/dev/full", outputs=outputs)
    assert [r["status"] for r in records] == ["converged", "non_finite", "converged", "converged"]
    assert [r["non_finite_ranks"] for r in records] == [None, [1], None, None]
    warned = [line for line in outputs[0].splitlines() if "logger failed" in line]
    assert len(warned) == 1 and warned[0].endswith(
        "critical sharpness: the JsonlLogger logger failed in log(): OSError: [Errno 28] No space left on device: "
        "'/dev/full'; the probe goes on measuring and logging elsewhere, this logger is tried again at every "
        "measurement, and further failures of it are not reported")
    assert "logger failed" not in outputs[1] and "Traceback" not in outputs[0] + outputs[1]


def test_non_finite_ranks_reach_the_log_line_and_jsonl():
    from megatron_sharpness.measurement import TaskMeasurement
    from megatron_sharpness.search import Outcome, SearchResult

    search = SearchResult(lr=0.01, baseline_loss=2.0, outcome=Outcome.NON_FINITE, critical_step_multiple=None,
                          bracket_step_multiple=(1.0, None), evaluations=((1.0, 1.9), (2.0, float("nan")), (2.0, 1.95)))
    measurement = Measurement(step=3, lr=0.01, task=TaskMeasurement(search, non_finite_ranks=(1, 3)))
    assert measurement.log_fields().startswith("critical sharpness: non-finite (once, at lr 2.0000E-02, on rank 1, 3) |")
    record = measurement.to_dict()
    assert record["non_finite_ranks"] == [1, 3] and record["status"] == "non_finite"
    (from_line,) = parse_lines([f" iteration        3/     100 | {measurement.log_fields()}"])
    (from_json,) = parse_lines([json.dumps(record)])
    assert from_line.status == from_json.status == "non_finite"
