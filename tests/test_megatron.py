"""The megatron-core backend, multi-process with the real megatron-core on gloo (CPU shims on).

Each layout trains a tiny GPTModel with Megatron's own schedules with and without the probe
(tests/workers/megatron_train.py) and checks: training is bitwise unchanged (params, main params,
optimizer state, RNG tracker states, per-step losses), the data iterator is not advanced, s = 0 /
s = 1 / restore reproduce the params exactly on every rank, every rank holds the same measurement,
and L(θ_t) of the probe is the step's own training loss. The distributed-optimizer layouts write
locally (write "auto") and are checked by hand in both write modes on one step; two of them also
train with sharded writes.
"""

import json
import os
import time

import pytest

from megatron_sharpness.search import DEFAULT_TOL
from megatron_sharpness.testing.launch import run_ranks

pytest.importorskip("megatron.core", reason="the megatron extra is not installed (pip install -e '.[megatron]')")

WORKER = os.path.join(os.path.dirname(__file__), "workers", "megatron_train.py")

LAYOUTS = {
    "dp2-fp32": (2, [], "FP32Optimizer"),
    "dp2-fp32-distributed-optimizer": (2, ["--dist-opt"], "DistributedOptimizer"),
    "dp2-bf16-distributed-optimizer-resumed-at-41-both-write-modes": (
        2, ["--bf16", "--dist-opt", "--first-iteration", "41", "--writes", "local", "sharded"], "DistributedOptimizer"),
    "dp2-bf16-distributed-optimizer-overlap-param-gather-both-write-modes": (
        2, ["--bf16", "--dist-opt", "--overlap", "--writes", "auto", "sharded"], "DistributedOptimizer"),
    "dp2-bf16-first-2-micro-batches-reusing-the-training-loss": (2, ["--bf16", "--micro-batches", "2",
                                                                     "--reuse-training-loss"],
                                                                 "Float16OptimizerWithFloat16Params"),
    # reuse asked for, but dropout: the first measurement finds the losses differ and stops reusing;
    # the first transformer layer stays in eval mode (no dropout) throughout, as the user set it
    "dp2-bf16-dropout-one-layer-in-eval-mode-reusing-the-training-loss": (
        2, ["--bf16", "--dropout", "0.1", "--frozen-layer", "--reuse-training-loss"], "Float16OptimizerWithFloat16Params"),
    # the module breakdown at every measurement, through TP shards, pipeline stages and virtual chunks
    "tp2-bf16-module-breakdown": (2, ["--tp", "2", "--bf16", "--modules"], "Float16OptimizerWithFloat16Params"),
    # the precision-aware optimizer (its inner optimizer keeps the masters: testing.precision_aware's
    # CPU stand-in for TransformerEngine's FusedAdam), masters as int16 remainders and as fp32
    "dp2-bf16-precision-aware-optimizer-remainders-module-breakdown": (
        2, ["--bf16", "--dist-opt", "--precision-aware", "remainders", "--modules"], "DistributedOptimizer"),
    "dp2-bf16-precision-aware-optimizer-fp32-masters": (2, ["--bf16", "--dist-opt", "--precision-aware", "fp32"],
                                                        "DistributedOptimizer"),
    "pp2-fp32": (2, ["--pp", "2"], "FP32Optimizer"),
    "pp2-bf16-distributed-optimizer": (2, ["--pp", "2", "--bf16", "--dist-opt"], "DistributedOptimizer"),
    "pp2-vpp2-fp32-module-breakdown": (2, ["--pp", "2", "--vpp", "2", "--layers", "4", "--modules"], "FP32Optimizer"),
    "pp2-vpp2-bf16-distributed-optimizer": (2, ["--pp", "2", "--vpp", "2", "--layers", "4", "--bf16", "--dist-opt"],
                                            "DistributedOptimizer"),
    "tp2xpp2-bf16-distributed-optimizer": (4, ["--tp", "2", "--pp", "2", "--bf16", "--dist-opt"],
                                           "DistributedOptimizer"),

    "tp2xdp2-fp32": (4, ["--tp", "2"], "FP32Optimizer"),
    "tp2xdp2-bf16-distributed-optimizer-overlap-param-gather": (4, ["--tp", "2", "--bf16", "--dist-opt", "--overlap"],
                                                                "DistributedOptimizer"),
}


def strip_timing(records):
    return [{k: v for k, v in r.items() if k != "probe_seconds"} for r in records]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_probe_is_exact_and_invisible_to_training(name, tmp_path):
    world_size, args, optimizer = LAYOUTS[name]
    run_ranks([WORKER, "--out", str(tmp_path), *args], world_size=world_size, timeout=400,
              env={"PYTHONWARNINGS": "ignore"})
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    chunks = 2 if "--vpp" in args else 1
    precision_aware = {"remainders": ["torch.int16"], "fp32": ["torch.float32"]}.get(
        args[args.index("--precision-aware") + 1] if "--precision-aware" in args else None, [])
    hand = {"s1_is_step": True, "s0_is_before": True, "s_half_moves": True, "restored": True}
    for result in ranks:
        for write, run in result["writes"].items():
            assert run["optimizers"] == [optimizer]
            assert run["masters_in_optimizer_state"] == precision_aware
            assert all(run["bitwise_equal"].values()), f"rank {result['rank']}, {write}: {run['bitwise_equal']}"
            assert run["same_training_losses"]
            assert run["micro_batches_left"] == [4] * chunks  # exactly the unused last step's micro-batches
        checks = dict(result["checks"])
        if "--modules" in args:  # one group moved alone within this rank's shards
            assert checks.pop("groups")[-1] == "output" and checks.pop("group_moves_alone")
            checks.pop("group_nonempty_here")
        # bf16 params under the distributed optimizer are written locally; there the trial point
        # at s = 8 lies within the roundings of θ_{t+1}, of the bf16 step and of its own of the
        # sharded one: 3 bf16 ulps (a lerp between the bf16 endpoints misses it by up to 8)
        local = checks.pop("local")
        assert local == ("--dist-opt" in args and "--bf16" in args)
        assert checks.pop("budget_writes_locally") is False
        refused = checks.pop("local_refused")  # write="local" where the gathered params are fp32
        assert (refused is None) == ("--bf16" in args or "--dist-opt" not in args), refused
        assert refused is None or "write='local' needs the distributed optimizer's params in bf16 or fp16" in refused
        far = checks.pop("local_far_ulps")
        assert far <= 3.0 if local else far == 0.0
        sharded = checks.pop("sharded")
        assert "--modules" not in args or sharded.pop("group_moves_alone")
        assert sharded == hand
        assert checks.pop("masters_committed")  # the guard's shortened step lands in the masters exactly
        assert checks == {"after_step": None, "sharded_after_step": None, **hand, "committed": True,
                          "commit_keeps_optimizer_state": True}
    for write in ranks[0]["writes"]:
        first = strip_timing(ranks[0]["writes"][write]["records"])
        for result in ranks[1:]:
            assert strip_timing(result["writes"][write]["records"]) == first, f"rank {result['rank']} disagrees, {write}"
    exact_baseline = "--dropout" not in args
    reused = "--reuse-training-loss" in args and exact_baseline
    for write, run in ranks[0]["writes"].items():
        first = strip_timing(run["records"])
        for index, (record, training_loss) in enumerate(zip(first, run["training_losses"])):
            assert record["skipped"] is None and record["converged"], (write, record)
            assert (record["loss"] == training_loss) == exact_baseline
            # the first measurement checks the training loss against its own forward before trusting it
            assert record["baseline_reused"] is (reused and index > 0)
            assert record["forwards"] == (len(record["evaluations"]) + (0 if record["baseline_reused"] else 1)
                                          + record["noise_forwards"])
            if "--bf16" not in args:
                # The gradients' slope (Megatron's clipping undone, each shard counted once) against the
                # quadratic through L(θ_t), L(1) and the crossing: a slope a with L(1) − L(θ_t) = a·(1 − 1/s*).
                step_multiple = record["critical_lr"] / record["lr"]
                rise_at_one = next(loss for lr, loss in record["evaluations"] if lr == record["lr"]) - record["loss"]
                secant = rise_at_one / (1 - 1 / step_multiple) / record["lr"]
                assert 0.5 <= record["gradient_slope"] / secant <= 2, (record["gradient_slope"], secant)
            if "--modules" in args:
                assert record["modules_trigger"] == "interval" and list(record["modules"])[-1] == "output"
                assert record["modules_forwards"] == sum(m["forwards"] for m in record["modules"].values())
            relative = record["relative"]["held-out"]
            # a held-out update may go uphill (ascent) or, in bf16, cross where rounding decides (noisy:
            # its slope off its trend's, or the loss noise moving the crossing by more than tol/2)
            assert relative["status"] in ("converged", "ascent", "unresolved", "noisy"), relative
            ratio = relative["bracket_slope_ratio"]
            assert relative["status"] != "noisy" or (ratio is not None and not 1 / 3 <= ratio <= 3) \
                or relative["crossing_uncertainty"] > DEFAULT_TOL / 2, relative
        first_iteration = int(args[args.index("--first-iteration") + 1]) if "--first-iteration" in args else 1
        assert [r["step"] for r in first] == [first_iteration, first_iteration + 1, first_iteration + 2]


def test_one_rank_oom_inside_a_probe_forward_fails_the_measurement_not_the_job(tmp_path):
    """Rank 1 raises torch.OutOfMemoryError in its loss_func at a trial point of step 2 (its 13th
    probe loss: after both baselines and s = 1). Before, rank 1 went on into restore()'s param
    all-gather while rank 0 waited in the loss reduction: a hang until the process-group timeout."""
    run_ranks([WORKER, "--out", str(tmp_path), "--dist-opt", "--fail-at", "1:2:13"], world_size=2, timeout=400,
              env={"PYTHONWARNINGS": "ignore"})
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in ranks:
        assert all(result["bitwise_equal"].values()), f"rank {result['rank']}: {result['bitwise_equal']}"
        assert result["same_training_losses"]
    first = strip_timing(ranks[0]["records"])
    assert strip_timing(ranks[1]["records"]) == first
    assert [r["status"] for r in first] == ["converged", "failed", "converged"]
    failed = first[1]
    error = failed["error"]
    assert (error["rank"], error["ranks"], error["task"]) == (1, [1], None)
    assert error["message"].startswith("OutOfMemoryError: injected on rank 1 at probe loss 13 of step 2")
    assert error["lr"] > 0  # a trial point of the search, not L(θ_t)
    assert failed["critical_lr"] is None and failed["relative"] == {} and failed["skipped"] is None


def test_one_rank_nan_in_a_probe_forward_names_that_rank(tmp_path):
    """Rank 1's own loss is NaN once, in its 13th probe loss_func of step 2 (a trial point, after
    both baselines and s = 1, 4 micro-batches each): the search ends non_finite on every rank, the
    record names rank 1 (a count rides in the loss all-reduce, an all-gather only then names it)."""
    run_ranks([WORKER, "--out", str(tmp_path), "--dist-opt", "--fail-at", "1:2:13:nan"], world_size=2, timeout=400,
              env={"PYTHONWARNINGS": "ignore"})
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in ranks:
        assert all(result["bitwise_equal"].values()), f"rank {result['rank']}: {result['bitwise_equal']}"
    first = strip_timing(ranks[0]["records"])
    assert strip_timing(ranks[1]["records"]) == first
    assert [r["status"] for r in first] == ["converged", "non_finite", "converged"]
    assert [r["non_finite_ranks"] for r in first] == [None, [1], None]
    assert sum(loss == "nan" for _, loss in first[1]["evaluations"]) == 1


def test_snapshot_that_does_not_fit_on_one_rank_skips_the_measurement_everywhere(tmp_path):
    """Rank 1 runs out of memory cloning its θ_t shard at step 2 (distributed optimizer): one
    all-reduce before the optimizer step tells every rank, all skip that measurement and say why,
    training goes on bitwise, and the run ends well within its hard timeout."""
    started = time.monotonic()
    run_ranks([WORKER, "--out", str(tmp_path), "--dist-opt", "--snapshot-oom", "1:2"], world_size=2, timeout=400,
              env={"PYTHONWARNINGS": "ignore"})
    print(f"snapshot OOM, megatron-core DP2 dist-opt: {time.monotonic() - started:.1f} s")  # pytest -rP
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in ranks:
        assert all(result["bitwise_equal"].values()), f"rank {result['rank']}: {result['bitwise_equal']}"
        assert result["same_training_losses"]
    first = strip_timing(ranks[0]["records"])
    assert strip_timing(ranks[1]["records"]) == first
    assert [r["status"] for r in first] == ["converged", "skipped", "converged"]
    assert first[1]["skipped"] == ("the θ_t snapshot did not fit in memory (rank 1: OutOfMemoryError: "
                                   "injected: no memory for the θ_t snapshot)")


def test_module_breakdown_is_exact_per_shard_and_invisible_to_training(tmp_path):
    """DP2 bf16 distributed optimizer, the breakdown at every measurement: training still bitwise
    unchanged, the same records on every rank, one group moved alone within the shards. Layers
    numbered globally across pipeline stages: tests/test_megatron_lm.py (PP2)."""
    layout = ["--bf16", "--dist-opt"]
    run_ranks([WORKER, "--out", str(tmp_path), "--modules", *layout], world_size=2, timeout=400,
              env={"PYTHONWARNINGS": "ignore"})
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in ranks:
        assert all(result["bitwise_equal"].values()) and result["same_training_losses"]
        assert result["checks"]["groups"] == ["embedding", "layer_0", "layer_1", "output"]
        assert result["checks"]["group_moves_alone"] and result["checks"]["restored"] and result["checks"]["committed"]
    assert [r["checks"]["group_nonempty_here"] for r in ranks] == [True, True]  # both ranks' shards hold layer_1
    first = strip_timing(ranks[0]["records"])
    assert strip_timing(ranks[1]["records"]) == first
    for record in first:
        assert record["modules_trigger"] == "interval" and list(record["modules"]) == ["embedding", "layer_0", "layer_1", "output"]
        assert record["modules_forwards"] == sum(m["forwards"] for m in record["modules"].values())
        assert all(m["status"] in ("converged", "capped") for m in record["modules"].values())
        assert record["modules"]["output"]["status"] == "converged"
