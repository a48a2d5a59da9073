"""What the probe costs a large training run, per write mode: a model of one probe on H100s with
megatron-core's distributed optimizer, from counts measured by benchmarks/probe_cost.py. Not a test.

Every assumption is a named constant below. What the model takes from the measurement (one row
per write mode of the megatron-core distributed-optimizer setup, the largest size measured):
forwards per probe, write() calls, all-gathers of the params (sharded writes and restore) and of
the step (local writes), and small collectives outside the forwards. Everything else scales with
the job: a forward with the job's FLOPs, a gather with its bytes over the data-parallel links, a
write or a copy with its bytes through HBM.

    python -m megatron_sharpness.benchmarks.cost_model [--counts probe_cost.json] [--reuse-training-loss]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from megatron_sharpness.benchmarks import markdown_table

# The GPU: NVIDIA H100 SXM, 8 per node, NVLink inside a node, one 400 Gb/s InfiniBand NIC per GPU.
PEAK_BF16_FLOPS = 989e12            # dense bf16 tensor-core peak
TRAIN_MFU = 0.40                    # model FLOPs utilisation of a training step (pipeline bubble included)
FORWARD_MFU = 0.40                  # of a probe forward: one micro-batch through the stages in turn
HBM_BYTES_PER_S = 3.35e12 * 0.7     # HBM3 peak at 70 % for elementwise passes
DP_GATHER_BYTES_PER_S = 40e9        # all-gather bus bandwidth per GPU across nodes (50 GB/s link at 80 %)
SMALL_COLLECTIVE_S = 30e-6          # an all-reduce or broadcast of a few numbers across the job
LOSS_COLLECTIVES_PER_FORWARD = 3    # the loss over data parallelism, the agreement, the pipeline broadcast
STEP_GATHER_HIDDEN = 0.0            # share of the local step's all-gather hidden behind the forward it runs
                                    # beside (asynchronous on NCCL; not measured yet, so not counted on)

# Bytes per element of one pass (reads + writes).
SNAPSHOT_BYTES = 4 + 4              # θ_t of the fp32 master shard: read, write
LERP_BYTES = 4 + 4 + 2              # sharded write: θ_t and θ_{t+1} of the shard, the bf16 shard of the params
STEP_BYTES = 4 + 4 + 2              # local: the step from the shard's fp32 θ_t and θ_{t+1}, in bf16
LOCAL_WRITE_BYTES = 2 + 2 + 2       # local write: anchor, step, params (one kernel)
COPY_BYTES = 2 + 2                  # local: the anchor copy after the step, the restore
FLOOR_BYTES = 4 + 4                 # the resolution floor: one pass over the shard per line it describes
PARAM_BYTES = 2                     # bf16 params and step on the wire


@dataclass(frozen=True)
class Job:
    name: str
    parameters: float
    layers: int
    hidden: int
    seq_length: int
    global_batch: int  # sequences per optimizer step
    micro_batch: int   # sequences per micro-batch; the probe evaluates one micro-batch per rank
    tp: int
    pp: int
    dp: int
    interval: int = 100

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def forward_flops_per_token(self) -> float:
        # 2 per parameter, plus attention scores and values over a causal sequence
        return 2 * self.parameters + 2 * self.layers * self.seq_length * self.hidden

    @property
    def slice_elements(self) -> float:
        return self.parameters / (self.tp * self.pp)

    @property
    def shard_elements(self) -> float:
        return self.slice_elements / self.dp


# The 7B run, and a 1B run of the kind one trains on a few nodes with data parallelism only.
GPT_7B = Job("7B (TP4·PP2·DP64, 512 GPUs, seq 4096)", parameters=6.74e9, layers=32, hidden=4096, seq_length=4096,
             global_batch=1024, micro_batch=1, tp=4, pp=2, dp=64)
GPT_1B = Job("1B (DP64, 64 GPUs, seq 2048)", parameters=1.3e9, layers=24, hidden=2048, seq_length=2048,
             global_batch=512, micro_batch=1, tp=1, pp=1, dp=64)


@dataclass(frozen=True)
class Counts:
    """Per probe, as measured: forwards, write() calls, param all-gathers, step all-gathers,
    collectives outside the forwards (gathers included)."""
    forwards: float
    writes: float
    param_gathers: float
    step_gathers: float
    collectives: float


def seconds(job: Job) -> dict[str, float]:
    hbm = HBM_BYTES_PER_S
    gather = PARAM_BYTES * job.slice_elements * (job.dp - 1) / job.dp / DP_GATHER_BYTES_PER_S
    return {
        "train_step": 3 * job.forward_flops_per_token * job.global_batch * job.seq_length
        / (job.gpus * PEAK_BF16_FLOPS * TRAIN_MFU),
        "forward": job.forward_flops_per_token * job.micro_batch * job.seq_length
        / (job.tp * PEAK_BF16_FLOPS * FORWARD_MFU),
        "gather": gather,
        "snapshot": SNAPSHOT_BYTES * job.shard_elements / hbm,
        "lerp": LERP_BYTES * job.shard_elements / hbm,
        "step": STEP_BYTES * job.shard_elements / hbm,
        "local_write": LOCAL_WRITE_BYTES * job.slice_elements / hbm,
        "copy": COPY_BYTES * job.slice_elements / hbm,
        "floor": FLOOR_BYTES * job.shard_elements / hbm,
    }


def probe_seconds(job: Job, counts: Counts, local: bool, reuse_training_loss: bool) -> dict[str, float]:
    """The parts of one probe. With the training loss reused the baseline forward and its write
    (s = 0, a sharded one in either mode) are saved, and with sharded writes also the gather of
    s = 1 (the params still hold θ_{t+1} when the search starts there)."""
    t = seconds(job)
    forwards = counts.forwards - (1 if reuse_training_loss else 0)
    param_gathers = counts.param_gathers - ((1 if local else 2) if reuse_training_loss else 0)
    small = counts.collectives - counts.param_gathers - counts.step_gathers
    parts = {
        "forwards": forwards * (t["forward"] + LOSS_COLLECTIVES_PER_FORWARD * SMALL_COLLECTIVE_S),
        "param gathers": param_gathers * (t["gather"] + t["lerp"]),
        "snapshot and floor": t["snapshot"] + (2 if local else 1) * t["floor"],
        "small collectives": small * SMALL_COLLECTIVE_S,
    }
    if local:
        local_writes = max(counts.writes - counts.param_gathers, 0)
        parts["step gather and local writes"] = (counts.step_gathers * ((1 - STEP_GATHER_HIDDEN) * t["gather"] + t["step"])
                                                 + 2 * t["copy"] + local_writes * t["local_write"])
    return parts


def load_counts(path: str) -> dict[str, Counts]:
    """Per write mode, the counts of the megatron-core distributed-optimizer rows of a probe_cost
    JSON file, at the largest model measured."""
    with open(path) as source:
        rows = [row for row in json.load(source)["rows"] if row["setup"].startswith("megatron-core")]
    if not rows:
        raise SystemExit(f"{path}: no megatron-core rows (run benchmarks/probe_cost.py with that setup)")
    largest = max(row["parameters"] for row in rows)
    return {("local" if row["local"] else "sharded"): Counts(row["forwards"], row["writes"], row["param_gathers"],
                                                             row["step_gathers"], row["collectives"])
            for row in rows if row["parameters"] == largest}


DEFAULT_COUNTS = os.path.join(os.path.dirname(__file__), "probe_cost_cpu.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default=DEFAULT_COUNTS, help="a probe_cost.py --json file (default: the "
                                                                 "CPU measurement shipped beside this file)")
    a = parser.parse_args(argv)
    counts = load_counts(a.counts)
    rows, parts_rows = [], []
    for job in (GPT_1B, GPT_7B):
        t = seconds(job)
        for mode, count in counts.items():
            for reuse in (False, True):
                parts = probe_seconds(job, count, mode == "local", reuse)
                probe = sum(parts.values())
                rows.append((job.name, mode, "yes" if reuse else "no", f"{count.forwards - reuse:g}",
                             f"{1e3 * probe:.0f}", f"{1e3 * parts['forwards']:.0f}",
                             f"{100 * probe / (job.interval * t['train_step']):.2f} %"))
                if not reuse:
                    parts_rows.append((job.name, mode, ", ".join(f"{name} {1e3 * value:.1f}" for name, value in parts.items())))
        print(f"{job.name}: training step {t['train_step']:.2f} s, one forward {1e3 * t['forward']:.1f} ms, "
              f"one param all-gather {1e3 * t['gather']:.1f} ms, one local write {1e3 * t['local_write']:.2f} ms")
    print()
    print(markdown_table(("job", "write", "training loss reused", "forwards", "probe ms", "of which forwards ms",
                          "overhead at interval 100"), rows))
    print()
    print(markdown_table(("job", "write", "probe parts (ms)"), parts_rows))


if __name__ == "__main__":
    main()
