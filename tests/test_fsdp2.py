"""torch FSDP2 (fully_shard) on 2 ranks, gloo: the probe writes trial points into each rank's
local shards and FSDP's own all-gather spreads them. Training is bitwise the same with the probe
on and off, every rank records the same floats, and each trial loss is the loss an fp64 copy of
the whole model computes at that point of the line (the ranks' batches averaged)."""

import json
import os

import pytest

from megatron_sharpness.testing.launch import run_ranks

WORKER = os.path.join(os.path.dirname(__file__), "workers", "fsdp2_train.py")
# NAME: (precision, reshard_after_forward, dropout); bf16 = MixedPrecisionPolicy(param_dtype=bf16),
# fp32 shards. Without reshard_after_forward FSDP keeps each block's gathered params after a forward.
LAYOUTS = {"fp32": ("fp32", 1, 0.0), "bf16-no-reshard": ("bf16", 0, 0.0), "fp32-dropout": ("fp32", 1, 0.1)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    run_ranks([WORKER, str(out), *(f"{name}:{p}:{r}:{d}" for name, (p, r, d) in LAYOUTS.items())],
              world_size=2, timeout=600)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fsdp2_training_is_bitwise_the_same_and_every_rank_records_the_same_floats(ranks, layout):
    for result in ranks:
        assert result[layout]["bitwise_equal"], "the shards or the optimizer state differ after training"
        assert result[layout]["rng_equal"], "the probe moved the RNG"
    first, second = (result[layout]["records"] for result in ranks)
    assert len(first) == 5
    for one, other in zip(first, second):
        one.pop("probe_seconds"), other.pop("probe_seconds")
        assert one == other
        assert one["status"] == "converged" and one["skipped"] is None
    # Every second measurement breaks down by the default groups of the model's own names.
    assert [list(r["modules"]) for r in first[1::2]] == [["embedding", "layer_0", "layer_1", "output"]] * 2


@pytest.mark.parametrize("layout, tolerance", [("fp32", 1e-6), ("bf16-no-reshard", 3e-3)])
def test_fsdp2_trial_losses_are_the_fp64_losses_of_the_whole_model_on_the_line(ranks, layout, tolerance):
    records, fp64 = ranks[0][layout]["records"], ranks[0][layout]["fp64"]
    assert len(fp64) == len(records)
    bf16 = layout.startswith("bf16")
    for record, (baseline, *reference) in zip(records, fp64):
        assert record["loss"] == pytest.approx(baseline, rel=tolerance)
        assert [loss for _, loss in record["evaluations"]] == pytest.approx(reference, rel=tolerance)
        if not bf16:
            # The fp64 line agrees with the bracket certified in fp32: no rise at lo, a rise at hi.
            at = {lr: value for (lr, _), value in zip(record["evaluations"], reference)}
            lo, hi = record["bracket"]
            assert at[lo] <= baseline < at[hi]
    # The forward reads the policy's bf16: the loss noise is measured (fp32: never) and the
    # resolution floor is a bf16 one, many octaves above fp32's.
    assert all((r["noise_forwards"] > 0) == bf16 for r in records)
    assert all((r["resolution_floor_lr"] > 1e-5) == bf16 for r in records)
