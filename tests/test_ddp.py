import json
import os

from megatron_sharpness.testing.launch import run_ranks

WORKERS = os.path.join(os.path.dirname(__file__), "workers")


def test_two_rank_ddp_probe_is_bitwise_neutral_and_identical_on_every_rank(tmp_path):
    steps = 20
    run_ranks([os.path.join(WORKERS, "ddp_train.py"), str(tmp_path), str(steps)], world_size=2, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["bitwise_equal"], f"rank {result['rank']}: training with the probe diverged"
        assert result["rng_equal"], f"rank {result['rank']}: the probe moved the RNG"
    records = [result["records"] for result in ranks]
    assert len(records[0]) == steps
    for first, second in zip(*records):
        local = (first.pop("local_baseline"), second.pop("local_baseline"))
        first.pop("probe_seconds"), second.pop("probe_seconds")
        # Same floats on every rank (JSON floats round-trip exactly), so the same branches were taken.
        assert first == second
        assert first["skipped"] is None and first["converged"]
        assert local[0] != local[1]  # each rank has its own batch...
        assert first["loss"] == (local[0] + local[1]) / 2  # ...and the probe sees their mean
        assert first["relative"]["held-out"]["converged"]


def test_fsdp1_and_partly_sharded_models_are_rejected_with_a_clear_error():
    results = run_ranks([os.path.join(WORKERS, "fsdp_rejected.py")], world_size=2, timeout=120)
    for result in results:
        assert "ACCEPTED fsdp2\n" in result.output  # fully_shard models have their own backend (test_fsdp2.py)
        assert ("REJECTED fsdp2-partial: critical sharpness: an FSDP2 model's parameters must all be DTensors "
                "(fully_shard the modules that hold them, or the root); not sharded: 1.weight, 1.bias") in result.output
        assert ("REJECTED nested-fsdp1: FullyShardedDataParallel (inside Sequential) with sharded (FSDP/DTensor) "
                "parameters is not supported") in result.output
        assert "or a model sharded with torch FSDP2 (fully_shard)" in result.output


def test_two_rank_ddp_with_the_module_breakdown_is_bitwise_neutral_and_identical_on_every_rank(tmp_path):
    steps = 6
    run_ranks([os.path.join(WORKERS, "ddp_train.py"), str(tmp_path), str(steps), "--modules"], world_size=2, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["bitwise_equal"] and result["rng_equal"], f"rank {result['rank']}"
    for first, second in zip(*(result["records"] for result in ranks)):
        for record in (first, second):
            record.pop("local_baseline"), record.pop("probe_seconds")
        assert first == second
        # DDP's `module.` prefix is not part of the group's parameter names: the default groups hold.
        assert list(first["modules"]) == ["embedding", "layer_0", "output"]
        assert first["modules_forwards"] == sum(m["forwards"] for m in first["modules"].values()) > 0
