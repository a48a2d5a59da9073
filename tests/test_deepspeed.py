"""The DeepSpeed integration, multi-process with the real deepspeed on gloo (2 ranks, CPU).

Each configuration trains a tiny GPT with and without the probe (tests/workers/deepspeed_train.py)
and checks the invariants: training is bitwise unchanged (params, fp32 masters, optimizer state,
loss scale, RNG), s = 0 / s = 1 / restore reproduce the gathered params exactly, every rank holds the
same measurement, and L(θ_t) of the probe is the step's own training loss — which fails if a write
ever leaves stale gathered weights behind (the ZeRO-3 pitfall). ZeRO-1/2 and BF16_Optimizer write
locally (write "auto"); every configuration is checked by hand in both write modes on one step, and
ZeRO-2 also trains with each.
"""

import json
import math
import os
import time

import pytest

from megatron_sharpness.testing.launch import run_ranks

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]')")

WORKER = os.path.join(os.path.dirname(__file__), "workers", "deepspeed_train.py")
ENV = {"DS_ACCELERATOR": "cpu"}
# DeepSpeed JIT-compiles these CPU ops on first use (tests/conftest.py gives them a folder per
# environment): the comm op at every init, FusedAdam and CPUAdam for the fused and offload configs.
OPS = {"ShareMemCommBuilder": "deepspeed_shm_comm", "FusedAdamBuilder": "fused_adam", "CPUAdamBuilder": "cpu_adam"}


@pytest.fixture(scope="module", autouse=True)
def deepspeed_ops_built_once():
    """Build (or load) the ops here, once, before any launch: a compile inside a launch (minutes on a
    loaded machine) would run against that launch's timeout, with the other rank waiting on it."""
    from deepspeed.accelerator import get_accelerator

    for builder in OPS:
        get_accelerator().create_op_builder(builder).load(verbose=False)
    built = os.listdir(os.environ["TORCH_EXTENSIONS_DIR"])
    assert set(OPS.values()) <= set(built), f"ops missing from {os.environ['TORCH_EXTENSIONS_DIR']}: {built}"

CONFIGS = {
    "zero0-fp32": (["--stage", "0", "--dtype", "fp32"], "AdamW"),
    "zero0-bf16": (["--stage", "0", "--dtype", "bf16"], "FP16_UnfusedOptimizer"),
    "zero0-bf16-fused-adam": (["--stage", "0", "--dtype", "bf16", "--fused"], "FP16_Optimizer"),
    # then one step with a model that returns (logits, loss) and no loss_from_output: raised everywhere
    "zero1-bf16-then-a-model-returning-logits-and-loss": (["--stage", "1", "--mistake"], "DeepSpeedZeroOptimizer"),
    "zero1-bf16-fp32-accumulation-module-breakdown": (["--stage", "1", "--bf16-optimizer", "--modules"],
                                                      "BF16_Optimizer"),
    # each write mode's converged searches against an fp64 reference on the same state
    "zero2-bf16-local-and-sharded-writes-against-fp64": (["--stage", "2", "--writes", "local", "sharded",
                                                          "--fp64-reference"], "DeepSpeedZeroOptimizer"),
    "zero2-bf16-offload": (["--stage", "2", "--offload"], "DeepSpeedZeroOptimizer"),
    # reuse asked for, but dropout: the first measurement finds the losses differ and stops reusing;
    # the first block stays in eval mode (no dropout) throughout, as the user set it
    "zero2-bf16-dropout-one-block-in-eval-mode-reusing-the-training-loss": (
        ["--stage", "2", "--dropout", "0.2", "--frozen-block", "--reuse-training-loss"], "DeepSpeedZeroOptimizer"),
    "zero3-bf16": (["--stage", "3"], "DeepSpeedZeroOptimizer_Stage3"),
    "zero3-bf16-no-persistent-params": (["--stage", "3", "--persist", "0"], "DeepSpeedZeroOptimizer_Stage3"),
    "zero3-bf16-offload": (["--stage", "3", "--offload"], "DeepSpeedZeroOptimizer_Stage3"),
    "zero1-fp16": (["--stage", "1", "--dtype", "fp16"], "DeepSpeedZeroOptimizer"),
    "zero2-fp16": (["--stage", "2", "--dtype", "fp16"], "DeepSpeedZeroOptimizer"),
    "zero3-fp16": (["--stage", "3", "--dtype", "fp16"], "DeepSpeedZeroOptimizer_Stage3"),
    "zero2-bf16-accumulation-4": (["--stage", "2", "--gas", "4"], "DeepSpeedZeroOptimizer"),
    "zero2-bf16-accumulation-4-first-2-reusing-the-training-loss": (
        ["--stage", "2", "--gas", "4", "--micro-batches", "2", "--reuse-training-loss"], "DeepSpeedZeroOptimizer"),
    "zero3-bf16-accumulation-4": (["--stage", "3", "--gas", "4", "--persist", "0"], "DeepSpeedZeroOptimizer_Stage3"),

    "megatron-deepspeed-zero2-bf16": (["--stage", "2", "--gas", "4", "--micro-batches", "3",
                                       "--megatron-deepspeed"], "DeepSpeedZeroOptimizer"),
    "megatron-deepspeed-zero2-bf16-from-ds-config": (["--stage", "2", "--gas", "4", "--micro-batches", "3",
                                                      "--megatron-deepspeed", "--from-ds-config"],
                                                     "DeepSpeedZeroOptimizer"),
    "pipeline-fp32": (["--pipeline", "--stage", "0", "--dtype", "fp32", "--gas", "4"], "AdamW"),
    "pipeline-bf16-zero1-module-breakdown": (["--pipeline", "--stage", "1", "--bf16-optimizer", "--gas", "4", "--modules"],
                                             "BF16_Optimizer"),
    "pipeline-fp32-first-2": (["--pipeline", "--stage", "0", "--dtype", "fp32", "--gas", "4",
                               "--micro-batches", "2"], "AdamW"),
}


def launch(tmp_path, args):
    results = run_ranks([WORKER, "--out", str(tmp_path), *args], world_size=2, timeout=400, env=ENV)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    return results, ranks


def strip_timing(records):
    return [None if r is None else {k: v for k, v in r.items() if k != "probe_seconds"} for r in records]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_probe_is_exact_and_invisible_to_training(name, tmp_path):
    args, optimizer = CONFIGS[name]
    _, ranks = launch(tmp_path, args)
    hand = {"s1_is_step": True, "s0_is_before": True, "repeatable_loss": True, "s_half_moves": True, "restored": True}
    # ZeRO-1/2 and BF16_Optimizer in bf16/fp16 write locally (write "auto")
    local = optimizer in ("DeepSpeedZeroOptimizer", "BF16_Optimizer") and "fp32" not in args
    for result in ranks:
        for write, run in result["writes"].items():
            assert run["optimizer"] == optimizer
            assert all(run["bitwise_equal"].values()), f"rank {result['rank']}, {write}: {run['bitwise_equal']}"
        checks = dict(result["checks"])
        if "--modules" in args and "--pipeline" not in args:  # one group moved alone through the partitions
            assert checks.pop("groups")[-1] == "output" and checks.pop("group_moves_alone")
        if "--pipeline" not in args:
            assert checks.pop("local") == local
            assert checks.pop("budget_writes_locally") is False
            refused = checks.pop("local_refused")  # write="local" where no rank holds the full params
            assert (refused is None) == (local or optimizer not in ("DeepSpeedZeroOptimizer_Stage3",)), refused
            assert refused is None or "partitions them (ZeRO-3); use write='sharded' or 'auto'" in refused
            # the local trial point at s = 8 lies within the roundings of θ_{t+1}, of the bf16 step
            # and of its own of the sharded one: 3 bf16 ulps (a lerp between the bf16 endpoints
            # misses it by up to 8)
            far = checks.pop("local_far_ulps")
            assert far <= 3.0 if local else far == 0.0
            if optimizer == "DeepSpeedZeroOptimizer_Stage3":
                assert checks.pop("zero3_state")
            sharded = checks.pop("sharded")
            assert "--modules" not in args or sharded.pop("group_moves_alone")
            assert optimizer != "DeepSpeedZeroOptimizer_Stage3" or sharded.pop("zero3_state")
            assert sharded == hand
            if "--modules" not in args:  # the guard's shortened step lands in the master partition exactly
                assert checks.pop("masters_committed")
            assert checks == {"after_step": None, "sharded_after_step": None, **hand, "committed": True,
                              "commit_keeps_optimizer_state": True}
    # The probe's L(θ_t) on the recorded micro-batches is the step's training loss, bitwise, unless
    # dropout draws other masks, or the pipeline reports all 4 micro-batches where the probe uses 2.
    exact_baseline = "--dropout" not in args and not ("--pipeline" in args and "--micro-batches" in args)
    for write in ranks[0]["writes"]:
        first, second = (strip_timing(result["writes"][write]["records"]) for result in ranks)
        assert first == second, f"the ranks disagree on a measurement ({write})"
        for record, training_loss in zip(first, ranks[0]["writes"][write]["training_losses"]):
            assert record["skipped"] is None and record["converged"], (write, record)
            if "--megatron-deepspeed" not in args:  # the patch has no relative tasks yet
                assert record["relative"]["held-out"]["converged"], (write, record["relative"])
            assert (record["loss"] == training_loss) == exact_baseline
            # with reuse, the first measurement checks the training loss against its own forward first
            reused = "--reuse-training-loss" in args and exact_baseline and record["step"] > 1
            assert record["baseline_reused"] is reused
            assert record["forwards"] == len(record["evaluations"]) + (0 if reused else 1) + record["noise_forwards"]
            if "--modules" in args:  # a PipelineModule's groups are its layers: layer_0 … layer_3
                assert record["modules_trigger"] == "interval" and list(record["modules"]) == list(first[0]["modules"])
                assert len(record["modules"]) >= 4
                assert record["modules_forwards"] == sum(m["forwards"] for m in record["modules"].values())
        assert len(first) == 4 and [r["step"] for r in first] == [1, 2, 3, 4]
        if "--fp64-reference" in args:  # 30 steps: median 0.013 in either mode, max 0.030 local, 0.059 sharded
            errors = ranks[0]["writes"][write]["fp64_errors"]
            assert len(errors) == 8 and all(error is not None and error <= 1 / 16 for _, error in errors), errors
    if "--mistake" in args:
        for result in ranks:
            assert result["mistake"] == {
                "raised": "ModelOutputError: critical sharpness: the loss must be a scalar, but the first element of "
                          "the model's output (tuple of 2) has shape (4, 16, 256); pass attach(..., "
                          "loss_from_output=fn) that returns the mean loss (e.g. lambda output: output[1] for a model "
                          "returning (prediction, loss))",
                "params_are_the_step": True, "measured": False}, result["rank"]


@pytest.mark.parametrize("mode", ["shorten", "lr"])
def test_the_guard_acts_through_the_engine_and_training_goes_on(mode, tmp_path):
    """ZeRO-2 bf16, the guard firing at every measured step (guard_ratio 1e-6, aiming at 1e-3 × the
    critical lr): every rank records the same actions, the master partitions and the bf16 params
    agree after training, shorten keeps the lr, and the lr guard scales the steps after it while the
    engine's own lr stays the configured one."""
    _, ranks = launch(tmp_path, ["--stage", "2", "--guard", mode])
    for result in ranks:
        assert result["masters_match_model"] and result["lr_after"] == 3e-3
        assert not result["bitwise_equal"]["params"]  # the guard changed training, as it should
    first, second = (strip_timing(result["records"]) for result in ranks)
    assert first == second
    assert all(math.isfinite(loss) for loss in ranks[0]["training_losses"])
    # Every measurement acts, except where the lr guard has already brought lr/critical lr below
    # its target (1e-3): nothing left to do there.
    actions = [record["guard"] for record in first if record["guard"] is not None]
    assert first[0]["guard"] is not None and len(actions) >= (4 if mode == "shorten" else 1)
    assert all(a["mode"] == mode and a["group"] is None and 0 < a["factor"] < 1 for a in actions)
    factor = first[0]["guard"]["factor"]
    if mode == "shorten":
        assert [r["lr"] for r in first] == [3e-3] * 4 and factor == pytest.approx(1e-3 / first[0]["lr_over_critical_lr"])
    else:  # the factor set at step 1 (at least 0.05), one step into its 100-step recovery
        assert factor == max(0.05, 1e-3 / first[0]["lr_over_critical_lr"])
        assert first[1]["lr"] == pytest.approx(3e-3 * factor ** 0.99, rel=1e-12)


def test_fp16_overflow_steps_are_reported_as_skipped_then_measured(tmp_path):
    _, ranks = launch(tmp_path, ["--stage", "2", "--dtype", "fp16", "--scale-power", "22", "--steps", "6"])
    for result in ranks:
        assert all(result["bitwise_equal"].values())
    records = strip_timing(ranks[0]["records"])
    assert records == strip_timing(ranks[1]["records"])
    skipped = [r for r in records if r["skipped"]]
    measured = [r for r in records if not r["skipped"]]
    assert skipped and measured, "the loss scale should overflow first, then recover"
    for record in skipped:
        assert "overflow" in record["skipped"] and record["critical_lr"] is None and record["forwards"] is None
    for record in measured:
        assert record["converged"]


def test_monitor_jsonl_and_log_line_from_the_ds_config_section(tmp_path):
    csv_dir, log_file = tmp_path / "csv", tmp_path / "sharpness.jsonl"
    (tmp_path / "out").mkdir()
    results, ranks = launch(tmp_path / "out", ["--stage", "2", "--csv-dir", str(csv_dir),
                                               "--log-file", str(log_file), "--interval", "2"])
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert strip_timing(records) == strip_timing([r for r in ranks[0]["records"] if r is not None])

    def csv_values(event):
        lines = (csv_dir / "probe" / f"Train_Samples_{event}.csv").read_text().splitlines()
        return [float(line.split(",")[1]) for line in lines[1:]]

    assert csv_values("critical_sharpness") == [r["critical_sharpness"] for r in records]
    assert csv_values("critical_lr") == [r["critical_lr"] for r in records]
    assert csv_values("relative_critical_sharpness_held-out") == [
        r["relative"]["held-out"]["critical_sharpness"] for r in records]
    log_lines = [line for line in results[0].output.splitlines() if "| critical sharpness:" in line]
    assert len(log_lines) == 2 and log_lines[0].startswith(" iteration        2 | critical sharpness: ")
    assert not any("| critical sharpness:" in line for line in results[1].output.splitlines())


@pytest.mark.parametrize("stage", ["2", "3"])
def test_one_rank_oom_inside_a_probe_forward_fails_the_measurement_not_the_job(stage, tmp_path):
    """Rank 1 raises torch.OutOfMemoryError in its loss at a trial point of step 2 (its 6th probe
    loss: after both baselines, both loss-noise samples and s = 1). Before, rank 1 went on into
    restore()'s all-gather while rank 0 waited in the loss reduction: a hang until the
    process-group timeout."""
    _, ranks = launch(tmp_path, ["--stage", stage, "--fail-at", "1:2:6"])
    for result in ranks:
        assert all(result["bitwise_equal"].values()), f"rank {result['rank']}: {result['bitwise_equal']}"
    first, second = (strip_timing(result["records"]) for result in ranks)
    assert first == second
    assert [r["status"] for r in first] == ["converged", "failed", "converged", "converged"]
    error = first[1]["error"]
    assert (error["rank"], error["ranks"], error["task"]) == (1, [1], None)
    assert error["message"].startswith("OutOfMemoryError: injected on rank 1 at probe loss 6 of step 2")
    assert error["lr"] > 0  # a trial point of the search, not L(θ_t)


RESUME_WORKER = os.path.join(os.path.dirname(__file__), "workers", "deepspeed_resume.py")


@pytest.mark.parametrize("cold", [False, True])
def test_resume_through_save_and_load_checkpoint_measures_bitwise_as_uninterrupted(cold, tmp_path):
    """ZeRO-2 bf16, 6 steps measured every 2nd (with a held-out task), against 3 steps,
    engine.save_checkpoint(), a new engine, engine.load_checkpoint(), 3 more. cold: DeepSpeed's own
    load_checkpoint, bypassing the probe's, loses the warm starts: the test must see that."""
    run_ranks([RESUME_WORKER, "--out", str(tmp_path), *(["--cold"] if cold else [])], world_size=2,
              timeout=400, env=ENV)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in ranks:
        assert result["weights_equal"], f"rank {result['rank']}: training did not resume bitwise"
        assert [r["step"] for r in result["whole"]] == [2, 4, 6]
        assert [r["step"] for r in result["resumed"]] == [4, 6]
        assert all(r["converged"] and r["relative"]["held-out"]["converged"] for r in result["whole"])
        # The caller's client_state comes back, the probe's entry does not (unless bypassed).
        keys = result["client_state_keys"]
        assert "mine" in keys and ("critical_sharpness" in keys) == cold, keys
    assert ranks[0]["resumed"] == ranks[1]["resumed"]
    expected = ranks[0]["whole"][1:]
    if not cold:
        assert ranks[0]["resumed"] == expected  # same trial points, forwards and values, bitwise
    else:
        assert [r["evaluations"] for r in ranks[0]["resumed"]] != [r["evaluations"] for r in expected]


@pytest.mark.parametrize("call, status", [(6, "non_finite"), (1, "skipped")])
def test_one_rank_nan_in_a_probe_forward_names_that_rank(call, status, tmp_path):
    """Rank 1's own loss is NaN once, at its `call`-th probe loss of step 2: a trial point of the
    search (6th: after both baselines, both loss-noise samples and s = 1), or L(θ_t) itself (1st).
    Every rank records the same outcome and names rank 1; training is bitwise unchanged."""
    results, ranks = launch(tmp_path, ["--stage", "2", "--fail-at", f"1:2:{call}:nan"])
    for result in ranks:
        assert all(result["bitwise_equal"].values()), f"rank {result['rank']}: {result['bitwise_equal']}"
    first, second = (strip_timing(result["records"]) for result in ranks)
    assert first == second
    assert [r["status"] for r in first] == ["converged", status, "converged", "converged"]
    record = first[1]
    if status == "non_finite":
        assert record["non_finite_ranks"] == [1] and record["critical_lr"] is None
        assert sum(loss == "nan" for _, loss in record["evaluations"]) == 1  # once, then finite again
        assert record["relative"]["held-out"]["converged"] and record["relative"]["held-out"]["non_finite_ranks"] is None
    else:
        assert record["skipped"] == "loss of the step's batch is nan before the step (on rank 1)"
    assert all(r["non_finite_ranks"] is None for r in first if r is not record)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_snapshot_that_does_not_fit_on_one_rank_skips_the_measurement_everywhere(stage, tmp_path):
    """Rank 1 runs out of memory cloning its fp32 partition at step 2: every rank skips that
    measurement and says why, training goes on bitwise, no hang."""
    started = time.monotonic()
    _, ranks = launch(tmp_path, ["--stage", stage, "--snapshot-oom", "1:2"])
    print(f"snapshot OOM, DeepSpeed ZeRO-{stage}: {time.monotonic() - started:.1f} s")  # pytest -rP
    for result in ranks:
        assert all(result["bitwise_equal"].values()), f"rank {result['rank']}: {result['bitwise_equal']}"
    first, second = (strip_timing(result["records"]) for result in ranks)
    assert first == second
    assert [r["status"] for r in first] == ["converged", "skipped", "converged", "converged"]
    assert first[1]["skipped"] == ("the θ_t snapshot did not fit in memory (rank 1: OutOfMemoryError: "
                                   "injected: no memory for the θ_t snapshot)")


@pytest.mark.parametrize("stage", ["2", "3"])
def test_module_breakdown_through_zero_partitions_is_exact_and_invisible(stage, tmp_path):
    """The breakdown at every measurement from the ds_config (modules: default): training bitwise
    unchanged, the same records on both ranks, and one group moved alone through the ZeRO
    partitions (a parameter split across ranks' partitions included)."""
    _, ranks = launch(tmp_path, ["--stage", stage, "--modules"])
    for result in ranks:
        assert all(result["bitwise_equal"].values()), f"rank {result['rank']}: {result['bitwise_equal']}"
        assert result["checks"]["groups"] == ["embedding", "layer_0", "layer_1", "output"]
        assert result["checks"]["group_moves_alone"] and result["checks"]["restored"]
    first, second = (strip_timing(result["records"]) for result in ranks)
    assert first == second
    for record in first:
        assert record["modules_trigger"] == "interval"
        assert list(record["modules"]) == ["embedding", "layer_0", "layer_1", "output"]
        assert record["modules"]["output"]["status"] == "converged"
        assert record["forwards_total"] == (record["forwards"] + sum(r["forwards"] for r in record["relative"].values())
                                            + record["modules_forwards"])
