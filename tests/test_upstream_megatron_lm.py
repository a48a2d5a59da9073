"""End to end: NVIDIA/Megatron-LM's REAL pretrain_gpt.py, patched with our patch for its release
line, trained on CPU with gloo (megatron_sharpness.testing.megatron_lm_cpu) in Megatron-LM's
default rerun mode (validate_results), with the probe on and off.

Sources: the pinned snapshots in ../shared/upstream/ (each unpacked into a temporary folder), or
your own checkout: MEGATRON_SHARPNESS_MEGATRON_LM=/path/to/Megatron-LM (copied, then patched with
whichever of our patches applies). core_v0.17 and later need Python 3.12: the venv that
.ci/py312-venv.sh builds (MEGATRON_SHARPNESS_PY312_VENV to move it). Without a snapshot or that
Python the tests skip and say why; under CI (CI=true) a skip fails instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_sharpness.data import embedded_corpus, write_indexed_dataset
from megatron_sharpness.testing import megatron_lm_check
from megatron_sharpness.testing.launch import run_ranks

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ROOT / "patches" / "megatron-lm"
UPSTREAM = Path(os.environ.get("MEGATRON_SHARPNESS_UPSTREAM", ROOT.parent / "shared" / "upstream"))
PY312_VENV = Path(os.environ.get("MEGATRON_SHARPNESS_PY312_VENV",
                                 Path.home() / ".cache" / "megatron-sharpness" / "py312-venv"))
USER_CHECKOUT = os.environ.get("MEGATRON_SHARPNESS_MEGATRON_LM")

# snapshot in ../shared/upstream/ -> our patch for its release line
SNAPSHOTS = {"core_v0.16.1": "core_v0.16", "core_v0.17.1": "core_v0.17", "core_v0.18.2": "core_v0.18",
             "core_v0.19.0": "core_v0.19", "main-d98e8a64dd": "main"}
RUN_TIMEOUT = 300.0


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"under CI every upstream end-to-end test must run: {reason}")
    pytest.skip(reason)


def _python_for(patch: Path) -> str:
    needed = megatron_lm_check.required_python(patch)
    if sys.version_info[:2] >= needed:
        return sys.executable
    venv_python = PY312_VENV / "bin" / "python"
    if needed > (3, 12) or not venv_python.is_file():
        _unavailable(f"{patch.parent.name} needs Python >= {needed[0]}.{needed[1]}: build its venv with "
                     f"`bash .ci/py312-venv.sh` (expected at {venv_python}; MEGATRON_SHARPNESS_PY312_VENV moves it)")
    return str(venv_python)


@dataclass(frozen=True)
class Checkout:
    name: str
    path: Path
    python: str


@pytest.fixture(scope="module")
def checkout(request, tmp_path_factory) -> Checkout:
    """A patched copy of Megatron-LM, unpacked (or copied) into a temporary folder."""
    target = tmp_path_factory.mktemp(f"megatron-lm-{request.param}")
    if request.param == "user":
        path, patch = megatron_lm_check.patched_copy(Path(USER_CHECKOUT), target)
        return Checkout(request.param, path, _python_for(patch))
    patch = PATCHES / SNAPSHOTS[request.param] / megatron_lm_check.PATCH_NAME
    python = _python_for(patch)
    path = _unpacked(request.param, target)
    subprocess.run(["git", "apply", str(patch)], cwd=path, check=True)
    return Checkout(request.param, path, python)


def _unpacked(snapshot: str, target: Path) -> Path:
    tarball = UPSTREAM / f"megatron-lm-{snapshot}.tar.gz"
    if not tarball.is_file():
        _unavailable(f"no snapshot {tarball} (../shared/upstream/, or MEGATRON_SHARPNESS_UPSTREAM); "
                     "or point MEGATRON_SHARPNESS_MEGATRON_LM at a checkout")
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")
    return target / "Megatron-LM"


@pytest.mark.parametrize("snapshot", list(SNAPSHOTS))
def test_each_release_line_takes_its_own_patch_and_no_other(snapshot, tmp_path):
    path = _unpacked(snapshot, tmp_path)
    patch = PATCHES / SNAPSHOTS[snapshot] / megatron_lm_check.PATCH_NAME
    assert megatron_lm_check.patch_for(path) == (patch, False)
    subprocess.run(["git", "apply", str(patch)], cwd=path, check=True)
    assert megatron_lm_check.patch_for(path) == (patch, True)  # recognised once applied
    training = (path / "megatron" / "training" / "training.py").read_text()
    # The rerun loop must keep its RerunDataIterator: record() feeds forward_backward_func only.
    assert "data_iterator = critical_sharpness.record(" not in training
    assert "data_iterator=critical_sharpness.record(" in training


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    # Byte tokens folded below the tests' --vocab-size 128.
    corpus = bytes(byte & 0x7F for byte in embedded_corpus()[:40000])
    return write_indexed_dataset(str(tmp_path_factory.mktemp("heldout") / "heldout"), corpus, document_bytes=2000)


TINY_GPT = [*megatron_lm_check.TINY_GPT, "--log-params-norm"]
ITERATIONS = 3
MEASURED = 2  # --critical-sharpness-interval: iteration 2 is measured, 1 and 3 are not


def _iteration_fields(output: str) -> dict[int, dict[str, str]]:
    """Megatron's iteration lines: iteration -> {field: text}."""
    lines = {}
    for match in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|(.*)", output):
        lines[int(match.group(1))] = {key.strip(): value.strip()
                                      for key, value in re.findall(r"([^|:]+):([^|]*)\|", match.group(2))}
    return lines


def _scalars(tensorboard_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir))
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}


@dataclass
class Run:
    lines: dict[int, dict[str, str]]
    scalars: dict[str, dict[int, float]]
    jsonl: list[dict]


def _train(checkout: Checkout, out: Path, world_size: int, flags: list[str], probe: bool,
           iterations: range = range(1, ITERATIONS + 1)) -> Run:
    """Trains up to the last of `iterations` (those logged: a resumed run starts later)."""
    out.mkdir(parents=True)
    tensorboard_dir, jsonl = out / "tb", out / "sharpness.jsonl"
    probe_flags = ["--critical-sharpness-interval", str(MEASURED), "--critical-sharpness-log-file", str(jsonl)]
    started = time.monotonic()
    results = run_ranks(
        ["-m", "megatron_sharpness.testing.megatron_lm_cpu", str(checkout.path / "pretrain_gpt.py"), *TINY_GPT,
         "--train-iters", str(iterations[-1]), *flags, "--tensorboard-dir", str(tensorboard_dir), *(probe_flags if probe else [])],
        world_size, timeout=RUN_TIMEOUT, python=checkout.python,
        # Megatron-FSDP asserts that CUDA_DEVICE_MAX_CONNECTIONS is not 1; TP on Hopper wants 1.
        env={"PYTHONPATH": os.pathsep.join([str(checkout.path), str(ROOT)]),
             "CUDA_DEVICE_MAX_CONNECTIONS": "8" if "--use-megatron-fsdp" in flags else "1"})
    print(f"{checkout.name} {out.name}: {time.monotonic() - started:.1f} s")  # shown by pytest -rP
    last = results[-1].output  # Megatron prints the iteration line on the last rank
    lines = _iteration_fields(last)
    assert sorted(lines) == list(iterations), last[-3000:]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    return Run(lines, _scalars(tensorboard_dir), records)


MEGATRON_FSDP = ["--bf16", "--use-megatron-fsdp", "--use-distributed-optimizer", "--ckpt-format", "fsdp_dtensor"]
LAYOUTS = {
    # TP2, with a relative task read from an indexed dataset
    "tp2-relative": (2, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4"]),
    "dp2-bf16-distopt-overlap": (2, ["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
                                     "--overlap-param-gather", "--micro-batch-size", "1", "--global-batch-size", "4"]),
    # A Llama-style block (RoPE, RMSNorm, SwiGLU, untied embeddings, no biases) under TP2 + sequence
    # parallelism (the norms: the harness's stand-in for apex's FusedLayerNorm), selective recompute.
    "tp2-sp-llama-selective-recompute": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                             "--position-embedding-type", "rope", "--normalization", "RMSNorm",
                                             "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
                                             "--recompute-granularity", "selective", "--bf16",
                                             "--micro-batch-size", "2", "--global-batch-size", "4"]),
    # MoE: 4 experts, top-2, expert parallel 2 folded over TP2 + SP, the allgather dispatcher, a
    # DeepSeek-V3-style router (sigmoid scores, expert bias, group-limited), a shared expert, full
    # recompute; the default module breakdown at the measurement (attention / router / experts).
    "moe-tp2-sp-ep2-deepseek-full-recompute": (2, [
        "--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1",
        "--expert-model-parallel-size", "2", "--num-experts", "4", "--moe-router-topk", "2",
        "--moe-token-dispatcher-type", "allgather", "--disable-bias-linear", "--moe-router-score-function", "sigmoid",
        "--moe-router-enable-expert-bias", "--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
        "--moe-router-topk-scaling-factor", "2.5", "--moe-shared-expert-intermediate-size", "64",
        "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1", "--bf16",
        "--critical-sharpness-modules", "default", "--critical-sharpness-modules-interval", "1",
        "--micro-batch-size", "2", "--global-batch-size", "4"]),
    # 4 ranks, one job: TP2 + SP × DP2, bf16, distributed optimizer, overlapped grad reduce and param gather.
    "tp2-sp-dp2-bf16-distopt-overlap": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--bf16",
                                            "--use-distributed-optimizer", "--overlap-grad-reduce",
                                            "--overlap-param-gather", "--micro-batch-size", "1",
                                            "--global-batch-size", "4"]),
    # Megatron-FSDP (v1, optim_grads_params): trial points in its model-weight shards, its own all-gather.
    "megatron-fsdp-dp2": (2, MEGATRON_FSDP + ["--micro-batch-size", "2", "--global-batch-size", "4"]),
    "megatron-fsdp-tp2xdp2": (4, MEGATRON_FSDP + ["--tensor-model-parallel-size", "2", "--micro-batch-size", "1",
                                                  "--global-batch-size", "4"]),
}
# Layouts that run on some lines only: MoE on CPU needs core_v0.19 or later (core_v0.16's router
# gating calls TransformerEngine's GEMM unguarded); the 4-rank jobs and Megatron-FSDP (whose
# gather pipeline the probe drives as main has it) run on the newest line alone.
LINES = {"moe-tp2-sp-ep2-deepseek-full-recompute": ("core_v0.19.0", "main-d98e8a64dd"),
         "tp2-sp-dp2-bf16-distopt-overlap": ("main-d98e8a64dd",), "megatron-fsdp-dp2": ("main-d98e8a64dd",),
         "megatron-fsdp-tp2xdp2": ("main-d98e8a64dd",)}
MOE_GROUPS = ["embedding"] + [f"layer_{layer}.{part}" for layer in (0, 1)
                              for part in ("attention", "router", "experts", "shared_experts")] + ["output"]
TRAINING_TAGS = ["lm loss", "grad-norm", "params-norm"]
TRAINING_FIELDS = ["lm loss", "grad norm", "params norm"]


def _matrix() -> list[tuple[str, str]]:
    """(source, layout) pairs. Every layout runs on the oldest and the newest line and on a user's
    checkout; each line between runs one, a different one each, to keep the suite's time in
    budget (two or three training runs per pair); a layout in LINES runs on its lines only.
    MEGATRON_SHARPNESS_E2E_ALL=1: every pair a line can run."""
    if USER_CHECKOUT:
        return [("user", layout) for layout in LAYOUTS]
    everything = os.environ.get("MEGATRON_SHARPNESS_E2E_ALL") == "1"
    between = dict(zip(list(SNAPSHOTS)[1:-1], ["pp2", "dp2-bf16-distopt-overlap", "tp2-relative"]))
    return [(snapshot, layout) for snapshot in SNAPSHOTS for layout in LAYOUTS
            if snapshot in LINES.get(layout, ()) or (layout not in LINES and (
                everything or snapshot not in between or between[snapshot] == layout))]


@pytest.mark.parametrize("checkout, layout", _matrix(), indirect=["checkout"])
def test_real_pretrain_gpt_measures_and_trains_bitwise_as_without_probe(checkout, heldout, layout, tmp_path):
    world_size, flags = LAYOUTS[layout]
    relative = layout == "tp2-relative"
    if relative:
        flags = [*flags, "--relative-sharpness-data-path", f"heldout={heldout}"]
    on = _train(checkout, tmp_path / "on", world_size, flags, probe=True)
    off = _train(checkout, tmp_path / "off", world_size, flags, probe=False)

    # Training is bitwise the same: the iteration lines' values, and TensorBoard's float32 scalars.
    for iteration in (1, 2, 3):
        for name in TRAINING_FIELDS:
            assert on.lines[iteration][name] == off.lines[iteration][name], (iteration, name)
    for tag in TRAINING_TAGS:
        assert sorted(on.scalars[tag]) == [1, 2, 3] and on.scalars[tag] == off.scalars[tag], tag

    # Our fields on the measured iteration only, and nowhere without the probe.
    measured = on.lines[MEASURED]
    assert "critical sharpness" not in on.lines[1] and "critical sharpness" not in on.lines[3]
    assert not any("critical sharpness" in fields for fields in off.lines.values()) and off.jsonl == []
    sharpness = float(measured["critical sharpness"])
    assert 0 < sharpness < 1e6 and float(measured["critical lr"]) == pytest.approx(2 / sharpness, rel=1e-3)

    # The JSONL holds the same measurement, and TensorBoard its scalars at that iteration.
    [record] = on.jsonl
    assert record["step"] == MEASURED and record["skipped"] is None
    assert f"{record['critical_sharpness']:.4E}" == measured["critical sharpness"]
    assert f"{record['critical_lr']:.4E}" == measured["critical lr"]
    assert record["forwards_total"] == int(measured["sharpness forwards"])  # relative tasks included
    assert on.scalars["critical sharpness"] == {MEASURED: pytest.approx(record["critical_sharpness"], rel=1e-6)}
    assert on.scalars["critical lr"] == {MEASURED: pytest.approx(record["critical_lr"], rel=1e-6)}
    if "--critical-sharpness-modules" in flags:  # a MoE block split into its parts, experts global
        assert list(record["modules"]) == MOE_GROUPS and record["modules_trigger"] == "interval"
    if "--use-megatron-fsdp" in flags and world_size == 2:
        # The same run with the plain distributed optimizer: the same θ_t (its L bitwise) and a step
        # that differs only by the order of the gradient reduction, so the same crossing: the two
        # brackets overlap. (Their midpoints may differ by up to the tolerance: the plain run's
        # search also has the gradients' slope, which Megatron-FSDP's backend does not read.)
        plain = _train(checkout, tmp_path / "distributed-optimizer", world_size,
                       [f for f in flags if f not in ("--use-megatron-fsdp", "--ckpt-format", "fsdp_dtensor")], probe=True)
        [reference] = plain.jsonl
        assert record["loss"] == reference["loss"]
        (low, high), (plain_low, plain_high) = record["bracket"], reference["bracket"]
        assert max(low, plain_low) <= min(high, plain_high), (record["bracket"], reference["bracket"])
    if not relative:
        assert record["relative"] == {} and "relative sharpness heldout" not in measured
        return
    # A held-out batch may see an ascent direction (no finite critical lr): the line then says so.
    task = record["relative"]["heldout"]
    if task["critical_sharpness"] is None:
        says = {"ascent": "ascent", "unresolved": "(unresolved)", "capped": "(never rose)", "non_finite": "non-finite"}
        assert says[task["status"]] in measured["relative sharpness heldout"]
        assert "relative critical sharpness heldout" not in on.scalars
    else:
        assert f"{task['critical_sharpness']:.4E}" == measured["relative sharpness heldout"]
        assert on.scalars["relative critical sharpness heldout"] == {
            MEASURED: pytest.approx(task["critical_sharpness"], rel=1e-6)}
    # TP ranks > 0 receive the relative batch from TP rank 0 into Megatron's own buffers: the held-out
    # loss must not depend on whether the batch carries an attention mask (a [1, 1, s, s] mask read
    # as [micro_batch_size, 1, s, s] on rank 1 changed it). One more training run: on one line only
    # (the batch is ours; test_megatron_lm.py checks its shape), and on a user's checkout.
    if checkout.name not in ("core_v0.16.1", "user"):
        return
    unmasked = _train(checkout, tmp_path / "on-no-mask", world_size,
                      [*flags, "--no-create-attention-mask-in-dataloader"], probe=True)
    assert unmasked.jsonl[0]["relative"]["heldout"]["loss"] == pytest.approx(task["loss"], rel=1e-6, abs=0)


# Resume: 6 iterations measured every 2nd, uninterrupted, against 3 (--exit-interval: the same lr
# schedule), saved, then --load and 3 more.
RESUME_LAYOUT = "tp2-relative"
RESUME_SNAPSHOT = "core_v0.16.1"  # runs on the suite's own Python; USER_CHECKOUT: the user's checkout


@pytest.mark.parametrize("checkout", ["user" if USER_CHECKOUT else RESUME_SNAPSHOT], indirect=True)
def test_real_pretrain_gpt_resumed_from_a_checkpoint_measures_bitwise_as_uninterrupted(checkout, heldout, tmp_path):
    world_size, flags = LAYOUTS[RESUME_LAYOUT]
    # No dropout: on CPU the harness's CUDA RNG tracker maps onto torch's CPU generator, which
    # Megatron's checkpoint does not bring back (its dropout after a resume is not bitwise).
    flags = [*flags, "--relative-sharpness-data-path", f"heldout={heldout}", "--hidden-dropout", "0",
             "--attention-dropout", "0"]
    saved = tmp_path / "checkpoints"
    whole = _train(checkout, tmp_path / "whole", world_size, flags, probe=True, iterations=range(1, 7))
    _train(checkout, tmp_path / "first", world_size,
           [*flags, "--save", str(saved), "--save-interval", "3", "--train-iters", "6", "--exit-interval", "3"],
           probe=True, iterations=range(1, 4))
    assert (saved / "critical_sharpness" / "iter_0000003.json").is_file()
    resumed = _train(checkout, tmp_path / "resumed", world_size,
                     [*flags, "--save", str(saved), "--save-interval", "3", "--load", str(saved)],
                     probe=True, iterations=range(4, 7))

    # Training itself resumes bitwise (else the comparison below would say nothing about the probe):
    # TensorBoard's per-iteration values. (The iteration line's lm loss averages over what the
    # process has logged, so it can differ right after a resume, with or without the probe.)
    for tag in TRAINING_TAGS:
        assert resumed.scalars[tag] == {i: v for i, v in whole.scalars[tag].items() if i > 3}, tag
    # The measurements after the resume: the same trial points and values (warm starts), the same
    # held-out batches (data positions), bit for bit.
    timing = {"probe_seconds"}
    expected = [{k: v for k, v in r.items() if k not in timing} for r in whole.jsonl if r["step"] > 3]
    got = [{k: v for k, v in r.items() if k not in timing} for r in resumed.jsonl]
    assert [r["step"] for r in got] == [4, 6]
    assert got == expected
    assert (saved / "critical_sharpness" / "iter_0000006.json").is_file()


@pytest.mark.parametrize("checkout", ["user" if USER_CHECKOUT else RESUME_SNAPSHOT], indirect=True)
def test_real_pretrain_gpt_with_the_guard_shortens_the_measured_step_and_trains_on(checkout, tmp_path):
    # The guard provoked at the measured iteration (any lr/critical lr passes a ratio of 1e-9; it
    # aims at 1e-4 of the critical lr): PP2, each stage commits its part of the shortened step.
    world_size, flags = LAYOUTS["pp2"]
    guard = ["--critical-sharpness-guard", "shorten", "--critical-sharpness-guard-ratio", "1e-9",
             "--critical-sharpness-guard-target", "1e-4"]
    guarded = _train(checkout, tmp_path / "guarded", world_size, [*flags, *guard], probe=True)
    [record] = guarded.jsonl
    action = record["guard"]
    assert action["mode"] == "shorten" and action["group"] is None
    assert action["factor"] == pytest.approx(1e-4 / record["lr_over_critical_lr"]) and 0 < action["factor"] < 1
    assert guarded.lines[MEASURED]["sharpness guard"] == f"shorten ×{action['factor']:.3g}"
    assert guarded.scalars["sharpness guard factor"] == {MEASURED: pytest.approx(action["factor"], rel=1e-6)}
    assert "sharpness guard" not in guarded.lines[1] and "sharpness guard" not in guarded.lines[3]
    assert 0 < float(guarded.lines[3]["lm loss"]) < 20  # training goes on after the shortened step


@pytest.mark.parametrize("checkout", ["user" if USER_CHECKOUT else RESUME_SNAPSHOT], indirect=True)
def test_real_pretrain_gpt_reuses_its_training_loss_as_the_probes_baseline(checkout, tmp_path):
    # --critical-sharpness-reuse-training-loss: Megatron's losses_reduced of the step, reduced as the
    # probe reduces its own forwards, stands for L(θ_t) once the first measurement found it bitwise
    # equal to a probe forward. Same trial points and values, one forward fewer from then on.
    world_size, flags = LAYOUTS["tp2-relative"]
    flags = [*flags, "--hidden-dropout", "0", "--attention-dropout", "0"]
    iterations = range(1, 7)  # measured at 2, 4 and 6
    plain = _train(checkout, tmp_path / "plain", world_size, flags, probe=True, iterations=iterations)
    reused = _train(checkout, tmp_path / "reused", world_size, [*flags, "--critical-sharpness-reuse-training-loss"],
                    probe=True, iterations=iterations)
    assert [r["step"] for r in reused.jsonl] == [2, 4, 6]
    assert [r["baseline_reused"] for r in reused.jsonl] == [False, True, True]
    for with_reuse, without in zip(reused.jsonl, plain.jsonl):
        assert with_reuse["loss"] == without["loss"] and with_reuse["evaluations"] == without["evaluations"]
        assert with_reuse["critical_lr"] == without["critical_lr"]
        assert with_reuse["forwards"] == without["forwards"] - with_reuse["baseline_reused"]
    for tag in TRAINING_TAGS:
        assert reused.scalars[tag] == plain.scalars[tag], tag


@pytest.mark.parametrize("checkout", ["user"] if USER_CHECKOUT else ["core_v0.16.1", "main-d98e8a64dd"], indirect=True)
def test_real_pretrain_gpt_refuses_an_unsupported_setup_when_it_parses_its_flags(checkout, tmp_path):
    # core_v0.16 parses inside pretrain(), main in parse_and_validate_args() before it: either way
    # the refusal comes before Megatron's own validation (which would want TransformerEngine for
    # fp8), before the model is built and a checkpoint loaded.
    result = subprocess.run(
        [checkout.python, "-m", "megatron_sharpness.testing.megatron_lm_cpu", str(checkout.path / "pretrain_gpt.py"),
         *TINY_GPT, "--train-iters", "2", "--micro-batch-size", "1", "--global-batch-size", "1", "--bf16",
         "--fp8-format", "hybrid", "--load", str(tmp_path / "checkpoint"), "--critical-sharpness-interval", "1"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout.path), str(ROOT)]), "OMP_NUM_THREADS": "1",
             "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "pretrain_gpt.py: error: critical sharpness: --fp8-format hybrid (fp8/fp4 compute (TransformerEngine)) is not "
        "supported yet: the delayed-scaling amax history"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "building GPT model" not in result.stdout
