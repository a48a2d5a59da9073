"""The Megatron-LM glue: flags, the train-step hook in a megatron-core loop shaped like
Megatron-LM's, the iteration log line, TensorBoard / W&B scalars, indexed relative datasets."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="the megatron extra is not installed (pip install -e '.[megatron]')")

from megatron_sharpness.data import embedded_corpus, write_indexed_dataset  # noqa: E402
from megatron_sharpness.integrations import megatron_lm  # noqa: E402
from megatron_sharpness.logs import parse_lines  # noqa: E402
from megatron_sharpness.testing.launch import run_ranks  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "workers", "megatron_lm_train.py")


def test_hook_log_line_tensorboard_wandb_and_jsonl_agree(tmp_path):
    heldout = write_indexed_dataset(str(tmp_path / "heldout_text_document"), embedded_corpus()[-60000:])
    log_file = tmp_path / "sharpness.jsonl"
    results = run_ranks([WORKER, "--out", str(tmp_path), "--pipeline-model-parallel-size", "2",
                         "--critical-sharpness-interval", "2", "--critical-sharpness-micro-batches", "2",
                         "--relative-sharpness-data-path", f"heldout={heldout}", "--relative-sharpness-micro-batches", "2",
                         "--critical-sharpness-log-file", str(log_file),
                         # A threshold every step passes: each measurement warns and is broken down.
                         "--critical-sharpness-modules", "default", "--critical-sharpness-modules-interval", "0",
                         "--critical-sharpness-warn-ratio", "1e-9",
                         # And a guard that acts at each of them on the worst group, aiming far below its edge.
                         "--critical-sharpness-guard", "shorten", "--critical-sharpness-guard-ratio", "1e-9",
                         "--critical-sharpness-guard-target", "1e-4"],
                        world_size=2, timeout=300, env={"PYTHONWARNINGS": "ignore"})
    assert "iteration" not in results[0].output  # Megatron prints from the last rank only
    assert "WARNING: critical sharpness" not in results[0].output
    warnings = [line for line in results[1].output.splitlines() if line.startswith("WARNING: critical sharpness")]
    assert [w.split(":")[1] for w in warnings] == [" critical sharpness at iteration 2", " critical sharpness at iteration 4",
                                                   " critical sharpness at iteration 6"]
    lines = [line for line in results[1].output.splitlines() if " iteration " in line and line not in warnings]
    assert len(lines) == 6
    assert all("critical sharpness:" in line for line in lines[1::2])
    assert not any("critical sharpness:" in line for line in lines[0::2])

    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    parsed = parse_lines(results[1].output.splitlines())
    assert [r.step for r in parsed] == [2, 4, 6]
    for count, (record, from_log) in enumerate(zip(records, parsed), 1):
        assert record["warnings"] == from_log.warnings == count and from_log.warning
        # Pipeline stage 0 holds the embedding and layer 0, stage 1 layer 1 and the output layer.
        assert list(record["modules"]) == ["embedding", "layer_0", "layer_1", "output"]
        assert record["modules_trigger"] == "warn_ratio" and from_log.worst_module[0] in record["modules"]
        assert record["converged"]
        assert from_log.critical_sharpness == pytest.approx(record["critical_sharpness"], rel=1e-4)
        assert from_log.lr == pytest.approx(record["lr"], rel=1e-6)
        assert set(record["relative"]) == {"heldout"} and record["relative"]["heldout"]["forwards"] >= 2
        # The guard shortened the worst group's part of the step (on its own pipeline stage).
        guard = record["guard"]
        assert guard["mode"] == "shorten" and guard["group"] == from_log.worst_module[0] and 0 <= guard["factor"] < 1
        assert from_log.guard == f"shorten {guard['group']} ×{guard['factor']:.3g}"

    written = json.loads((tmp_path / "rank1.json").read_text())
    assert json.loads((tmp_path / "rank0.json").read_text())["left"] == 0  # training read every micro-batch
    # After the shortened steps every rank's bf16 params are its fp32 master shard's cast.
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["masters_match_model"] for r in range(2)] == [True, True]
    scalars = {(kind, tag, step): value for kind, tag, value, step in written["scalars"]}
    for record in records:
        samples = record["step"] * 2 * 4  # micro batch 2, 4 micro-batches, data parallel 1
        assert scalars[("tb", "critical sharpness", record["step"])] == record["critical_sharpness"]
        assert scalars[("tb", "critical sharpness vs samples", samples)] == record["critical_sharpness"]
        assert scalars[("tb", "lr over critical lr", record["step"])] == record["lr_over_critical_lr"]
        assert scalars[("wandb", "critical lr", record["step"])] == record["critical_lr"]
        assert scalars[("tb", "sharpness warning", record["step"])] == 1.0
        assert scalars[("tb", "sharpness guard factor", record["step"])] == record["guard"]["factor"]
        for group, entry in record["modules"].items():
            if entry["lr_over_critical_lr"] is not None:
                assert scalars[("tb", f"module lr over critical lr {group}", record["step"])] == entry["lr_over_critical_lr"]
        relative = record["relative"]["heldout"]["critical_sharpness"]
        if relative is not None:
            assert scalars[("tb", "relative critical sharpness heldout", record["step"])] == relative


@pytest.mark.parametrize("flags, message", [
    (["--relative-sharpness-data-path", "heldout"], "'heldout' is invalid; allowed: NAME=PATH"),
    (["--relative-sharpness-data-path", "=/data/x"], "allowed: NAME=PATH"),
    (["--relative-sharpness-micro-batches", "0"], "0 is invalid; allowed: an integer >= 1"),
    (["--critical-sharpness-interval", "-3"], "allowed: an integer >= 1, or 0 for off"),
])
def test_bad_flags_fail_at_parsing(flags, message):
    code = ("import argparse; from megatron_sharpness.integrations.megatron_lm import add_critical_sharpness_args;"
            f"add_critical_sharpness_args(argparse.ArgumentParser(prog='pretrain_gpt.py')).parse_args({flags!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_relative_dataset_is_read_in_windows_and_a_bad_path_is_a_clear_error(tmp_path):
    corpus = bytes(range(256)) * 20
    prefix = write_indexed_dataset(str(tmp_path / "ramp"), corpus, document_bytes=1000)
    batches = megatron_lm.IndexedDatasetBatches(prefix, seq_length=9, micro_batch_size=3)
    first, second = next(batches), next(batches)
    assert first["tokens"].tolist()[0] == list(range(9)) and first["labels"].tolist()[0] == list(range(1, 10))
    assert first["tokens"].tolist()[1][0] == 10 and second["tokens"].tolist()[0][0] == 30
    # Megatron broadcasts the mask from TP rank 0 into a [micro_batch_size, 1, s, s] buffer.
    assert first["attention_mask"].shape == (3, 1, 9, 9) and first["loss_mask"].shape == (3, 9)
    assert first["attention_mask"][2, 0].tolist() == (torch.ones(9, 9).triu(1) > 0).tolist()
    unmasked = megatron_lm.IndexedDatasetBatches(prefix, seq_length=9, micro_batch_size=3, attention_mask=False)
    assert "attention_mask" not in next(unmasked)
    with pytest.raises(ValueError, match="cannot read the indexed dataset"):
        megatron_lm.IndexedDatasetBatches(str(tmp_path / "missing"), seq_length=9, micro_batch_size=3)
    args = megatron_lm.add_critical_sharpness_args(argparse.ArgumentParser()).parse_args(
        ["--relative-sharpness-data-path", f"a={prefix}", f"a={prefix}"])
    args.seq_length, args.micro_batch_size = 9, 3
    with pytest.raises(ValueError, match="task name 'a' is given twice"):
        megatron_lm._relative_iterators(args, 1)


@pytest.mark.parametrize("window_documents", [0.3, 2.5])  # windows shorter and longer than a document
def test_relative_dataset_position_round_trips_through_its_state(tmp_path, window_documents):
    corpus = bytes(i * 7 % 251 for i in range(5000))
    prefix = write_indexed_dataset(str(tmp_path / "ramp"), corpus, document_bytes=700)
    seq_length = int(700 * window_documents)
    reference = megatron_lm.IndexedDatasetBatches(prefix, seq_length=seq_length, micro_batch_size=2)
    for _ in range(5):
        next(reference)
    state = json.loads(json.dumps(reference.state_dict()))  # as the state file holds it
    resumed = megatron_lm.IndexedDatasetBatches(prefix, seq_length=seq_length, micro_batch_size=2)
    resumed.load_state_dict(state)
    for _ in range(8):  # across the end of the dataset (it cycles)
        assert torch.equal(next(resumed)["tokens"], next(reference)["tokens"])
    with pytest.raises(ValueError, match="tokens left over from a document of 700"):
        resumed.load_state_dict({"document": 1, "leftover": 700})
    with pytest.raises(ValueError, match="document 99 is not in"):
        resumed.load_state_dict({"document": 99, "leftover": 0})


MEGATRON_STYLE_FLAGS = [("--optimizer", {"default": "adam"}), ("--use-distributed-optimizer", {"action": "store_true"}),
                        ("--optimizer-cpu-offload", {"action": "store_true"}), ("--fp8-format", {"dest": "fp8"}),
                        ("--fp8-param-gather", {"action": "store_true"}), ("--use-megatron-fsdp", {"action": "store_true"}),
                        ("--data-parallel-sharding-strategy", {"default": "optim_grads_params"}),
                        ("--use-torch-fsdp2", {"action": "store_true"}),
                        ("--use-precision-aware-optimizer", {"action": "store_true"}),
                        ("--main-params-dtype", {"default": "fp32", "choices": ["fp32", "fp16"]}), ("--hidden-dropout", {"type": float, "default": 0.1}),
                        ("--attention-dropout", {"type": float, "default": 0.1}),
                        ("--bf16", {"action": "store_true"}), ("--fp16", {"action": "store_true"})]


def megatron_style_parser() -> argparse.ArgumentParser:
    """Megatron-LM's flags that decide a refusal (their names and defaults as in arguments.py), our
    flags added the way Megatron-LM adds them: through extra_args_provider."""
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py")
    for name, options in MEGATRON_STYLE_FLAGS:
        parser.add_argument(name, **options)
    return megatron_lm.extra_args_provider()(parser)


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "dist_muon"], "--optimizer dist_muon (LayerWiseDistributedOptimizer) is not supported yet: each rank "
                                   "steps whole parameters"),
    (["--optimizer", "muon", "--use-distributed-optimizer"], "--optimizer muon --use-distributed-optimizer "
                                                             "(LayerWiseDistributedOptimizer)"),
    (["--optimizer-cpu-offload"], "--optimizer-cpu-offload (HybridDeviceOptimizer (optimizer CPU offload))"),
    (["--fp8-format", "hybrid"], "--fp8-format hybrid (fp8/fp4 compute (TransformerEngine)) is not supported yet: the "
                                 "delayed-scaling amax history"),
    (["--fp8-param-gather"], "--fp8-param-gather (fp8/fp4 compute"),
    # The suite's megatron-core (0.16.1, constraints.txt) has the older all-gather pipeline.
    (["--use-megatron-fsdp"], "--use-megatron-fsdp (Megatron-FSDP of this Megatron-LM line) is not supported yet: its "
                              "all-gather pipeline has no reset(preserve_non_fsdp_units)"),
    (["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim"],
     "--use-megatron-fsdp --data-parallel-sharding-strategy optim (Megatron-FSDP other than v1 with "
     "data_parallel_sharding_strategy optim_grads_params"),
    (["--use-torch-fsdp2"], "--use-torch-fsdp2 (Megatron's torch FSDP2 wrapper (TorchFullyShardedDataParallel))"),
    (["--use-megatron-fsdp", "--critical-sharpness-write", "local"],
     "--critical-sharpness-write local is not available with --use-megatron-fsdp"),
    (["--use-distributed-optimizer", "--critical-sharpness-write", "local"],
     "--critical-sharpness-write local needs the distributed optimizer's params in bf16 or fp16"),
    (["--use-precision-aware-optimizer", "--main-params-dtype", "fp16"],
     "--use-precision-aware-optimizer --main-params-dtype fp16 (the precision-aware optimizer with fp16 master weights"),
    (["--critical-sharpness-reuse-training-loss", "--attention-dropout", "0"],
     "--critical-sharpness-reuse-training-loss needs --hidden-dropout 0 and --attention-dropout 0 (got --hidden-dropout "
     "0.1, --attention-dropout 0.0)"),
    (["--relative-sharpness-data-path", "heldout=/nonexistent/val"],
     "--relative-sharpness-data-path heldout=/nonexistent/val: no /nonexistent/val.bin and no /nonexistent/val.idx"),
])
def test_setups_the_probe_cannot_measure_are_refused_when_the_flags_are_parsed(flags, message, capsys):
    with pytest.raises(SystemExit) as exited:
        megatron_style_parser().parse_args(["--critical-sharpness-interval", "10", *flags])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"pretrain_gpt.py: error: critical sharpness: {message}"), error
    assert error.count("\n") == 1  # one line, no usage dump of Megatron's hundreds of flags
    # The same flags with the probe off, and the setups it measures, parse.
    megatron_style_parser().parse_args(flags)
    megatron_style_parser().parse_known_args(["--critical-sharpness-interval", "10", "--optimizer", "muon",
                                              "--use-precision-aware-optimizer",
                                              "--hidden-dropout", "0", "--attention-dropout", "0",
                                              "--critical-sharpness-reuse-training-loss", "--bf16"])
    megatron_style_parser().parse_args(["--critical-sharpness-interval", "10", "--use-distributed-optimizer", "--bf16",
                                        "--critical-sharpness-write", "local"])
    assert megatron_lm._sharpness is None  # nothing was attached
