"""Backend for DeepSpeed engines: ZeRO stages 0-3, bf16/fp16/fp32, CPU offload, PipelineEngine.

Each DeepSpeed optimizer wrapper keeps this rank's fp32 master shard somewhere else and copies it
into the model's compute params its own way; a _MasterLayout names both places and repeats the
wrapper's own master→model copy for trial points. The attribute names are those of
deepspeed==0.19.8 (verified bitwise on CPU, see DESIGN.md §3).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Collection, Sequence

import torch
from deepspeed import comm as ds_comm
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.utils import all_gather_dp_groups
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch._utils import _unflatten_dense_tensors

from megatron_sharpness.backends.groups import (GroupSelection, Segment, commit_pairs, local_names,
                                                union_in_rank_order, view_segments, whole, write_group)
from megatron_sharpness.backends.lerp import NOISY_COMPUTE_BITS, one_ulp_moved_into
from megatron_sharpness.backends.local import (LOCAL_DTYPES, LOCAL_FROM, LocalWrites, agree_on_local_writes,
                                               offset_in)
from megatron_sharpness.backends.modes import ModuleModes
from megatron_sharpness.backends.resolution import ResolutionHistogram
from megatron_sharpness.backends.rng import RngState
from megatron_sharpness.faults import (CAUGHT, OUT_OF_MEMORY, agree_loss, report_local_failure, snapshot_skip_reason,
                                       take_local_non_finite)

SUPPORTED_OPTIMIZERS = ("DeepSpeedZeroOptimizer (ZeRO-1/2, with or without offload_optimizer)",
                        "DeepSpeedZeroOptimizer_Stage3 (ZeRO-3, with or without offload_optimizer)",
                        "BF16_Optimizer", "FP16_Optimizer", "FP16_UnfusedOptimizer",
                        "a torch.optim.Optimizer at ZeRO stage 0 with fp32 params")


class _MasterLayout:
    """pairs: (fp32 master tensor of this rank, model-side tensor it is copied into)."""

    # True where the master *is* the model param: writing a trial point then overwrites θ_{t+1}.
    master_is_model = False
    # True where a trial point reaches the other ranks' params only through a collective.
    needs_gather = False

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def segments(self, names: dict[int, str]) -> list[list[Segment]]:
        """Per pair, which parameter (by id -> name) owns which elements of the master."""
        raise NotImplementedError

    def before_write(self) -> None:
        pass

    def after_write(self) -> None:
        pass

    def settle(self) -> None:
        """At the end of a probe, with θ_{t+1} back: the state the optimizer's own step leaves."""

    def local_flats(self) -> list[torch.Tensor]:
        """The full model-dtype tensors (one per pair, in pair order) that hold every rank's
        params after the step's all-gather, where local writes can serve; [] elsewhere."""
        return []

    def gather_steps(self, steps: list[torch.Tensor]) -> list:
        """Starts the all-gathers of the step buffers (laid out like local_flats()); their works."""
        raise NotImplementedError


class _PartitionedLayout(_MasterLayout):
    """ZeRO-1/2 and BF16_Optimizer: a flat fp32 partition per param group, copied into this rank's
    low-precision partition and all-gathered over the data-parallel group (as update_lp_params)."""

    def __init__(self, optimizer, masters: list[torch.Tensor], partitions: list[list[torch.Tensor]],
                 groups_flat: list[torch.Tensor], params: list[list[torch.Tensor]]):
        self.optimizer, self.masters, self.partitions, self.groups_flat = optimizer, masters, partitions, groups_flat
        self.params = params

    def pairs(self):
        ranks = [ds_comm.get_rank(group=group) for group in self.optimizer.real_dp_process_group]
        return [(master, partition[rank]) for master, partition, rank in zip(self.masters, self.partitions, ranks)]

    def segments(self, names):
        # The low-precision params are views into the flat group; this rank's partition is a
        # slice of it, and the fp32 master partition has the same element layout.
        return [view_segments(partition, [(names[id(p)], p.data) for p in params])
                for (_, partition), params in zip(self.pairs(), self.params)]

    needs_gather = True

    def after_write(self):
        optimizer = self.optimizer
        all_gather_dp_groups(groups_flat=self.groups_flat, partitioned_param_groups=self.partitions,
                             dp_process_group=optimizer.real_dp_process_group,
                             start_alignment_factor=optimizer.nccl_start_alignment_factor,
                             allgather_bucket_size=optimizer.allgather_bucket_size)

    def local_flats(self):
        return list(self.groups_flat) if all(flat.dtype in LOCAL_DTYPES for flat in self.groups_flat) else []

    def gather_steps(self, steps):
        # As all_gather_dp_groups gathers the params: this rank's partition of each step buffer
        # lies where its partition of the params does.
        works = []
        for step, flat, parts, group in zip(steps, self.groups_flat, self.partitions,
                                            self.optimizer.real_dp_process_group):
            if ds_comm.get_world_size(group=group) > 1:
                own = parts[ds_comm.get_rank(group=group)]
                start = offset_in(flat, own)
                works.append(ds_comm.all_gather_into_tensor(step, step[start:start + own.numel()], group=group,
                                                            async_op=True))
        return works


class _Zero3Layout(_MasterLayout):
    needs_gather = True

    def __init__(self, optimizer: DeepSpeedZeroOptimizer_Stage3):
        self.optimizer = optimizer

    def pairs(self):
        return list(zip(self.optimizer.fp32_partitioned_groups_flat, self.optimizer.fp16_partitioned_groups_flat))

    def segments(self, names):
        # Each param's partition (ds_tensor) is a view into its sub-group's flat partition.
        optimizer = self.optimizer
        return [view_segments(flat, [(names[id(p)], p.ds_tensor) for p in params])
                for flat, params in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp16_groups)]

    def before_write(self):
        # Gathered params (persistent ones, and ones kept alive after a forward) are skipped by the
        # next all-gather: without releasing them every trial point would see stale weights.
        self.optimizer.parameter_offload.partition_all_parameters()

    def after_write(self):
        # The persistent params stay released: the next forward fetches them with their modules'
        # other params (one coalesced all-gather each) instead of one all-gather per param here.
        optimizer = self.optimizer
        for sub_group in range(len(optimizer.fp16_partitioned_groups_flat)):
            optimizer._unflatten_partitioned_parameters(sub_group)
        optimizer.invalidate_secondary_tensor()

    def settle(self):
        # As the optimizer's step leaves them: the persistent params gathered, every other one
        # released (a probe forward keeps its params gathered "for the backward", as a training
        # forward does). Coalesced, as ZeRO-3's forward fetches (by whether a param holds a
        # secondary partition), where the step gathers them one collective each.
        self.before_write()
        persistent = self.optimizer.persistent_parameters
        for group in ([p for p in persistent if p.ds_secondary_tensor is not None],
                      [p for p in persistent if p.ds_secondary_tensor is None]):
            if group:
                group[0].all_gather_coalesced(group).wait()


class _FusedFp16Layout(_MasterLayout):
    def __init__(self, optimizer: FP16_Optimizer):
        self.optimizer = optimizer

    def pairs(self):
        return list(zip(self.optimizer.fp32_groups_flat, self.optimizer.fp16_groups_flat))

    def segments(self, names):
        return [view_segments(flat, [(names[id(p)], p.data) for p in params])
                for flat, params in zip(self.optimizer.fp16_groups_flat, self.optimizer.fp16_groups)]

    def after_write(self):
        for flat, group in zip(self.optimizer.fp16_groups_flat, self.optimizer.fp16_groups):
            for param, view in zip(group, _unflatten_dense_tensors(flat, group)):
                param.data = view.data


class _UnfusedFp16Layout(_MasterLayout):
    def __init__(self, optimizer: FP16_UnfusedOptimizer):
        self.optimizer = optimizer

    def pairs(self):
        return [(master, param.data) for masters, params in zip(self.optimizer.fp32_groups, self.optimizer.fp16_groups)
                for master, param in zip(masters, params)]

    def segments(self, names):
        return [whole(names[id(param)], param) for params in self.optimizer.fp16_groups for param in params]


class _PlainLayout(_MasterLayout):
    master_is_model = True

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def pairs(self):
        return [(param.data, param.data) for param in self.params]

    def segments(self, names):
        return [whole(names[id(param)], param) for param in self.params]


def master_layout(engine) -> _MasterLayout:
    optimizer = engine.optimizer
    kind = type(optimizer)
    if kind is DeepSpeedZeroOptimizer_Stage3:
        return _Zero3Layout(optimizer)
    if kind is DeepSpeedZeroOptimizer:
        return _PartitionedLayout(optimizer, optimizer.single_partition_of_fp32_groups,
                                  optimizer.parallel_partitioned_bit16_groups, optimizer.bit16_groups_flat,
                                  optimizer.round_robin_bit16_groups)
    if kind is BF16_Optimizer:
        return _PartitionedLayout(optimizer, optimizer.fp32_groups_flat_partition,
                                  optimizer.bf16_partitioned_groups, optimizer.bf16_groups_flat, optimizer.bf16_groups)
    if kind is FP16_Optimizer:
        return _FusedFp16Layout(optimizer)
    if kind is FP16_UnfusedOptimizer:
        return _UnfusedFp16Layout(optimizer)
    if isinstance(optimizer, torch.optim.Optimizer) and not engine.zero_optimization() and all(
            p.dtype == torch.float32 for group in optimizer.param_groups for p in group["params"]):
        return _PlainLayout(optimizer)
    raise TypeError(f"critical sharpness: DeepSpeed optimizer {kind.__module__}.{kind.__name__} is not "
                    f"supported; supported: {'; '.join(SUPPORTED_OPTIMIZERS)}")


Batch = Any
# Reduced loss of a task over its micro-batches (the same value on every rank up to the bits),
# given the batches this rank recorded and how many micro-batches every stage runs.
Evaluator = Callable[[Sequence[Batch], int], torch.Tensor]


class DeepSpeedBackend:
    """batches: the micro-batches the step trained on, as the integration recorded them (middle
    pipeline stages record none). micro_batch_counts: how many micro-batches each task evaluates,
    known on every stage. relative_batches: per relative task, in the same form as batches.
    loss_bits: DeepSpeed's losses are fp32."""

    loss_bits = 24

    def __init__(self, engine, evaluate: Evaluator, write: str = "auto", write_memory_budget_mib: float | None = None):
        self.engine = engine
        self.layout = master_layout(engine)
        self.evaluate = evaluate
        self._flats = self.layout.local_flats()
        if write == "local" and self.layout.needs_gather and not self._flats:
            kind = type(engine.optimizer).__name__
            raise ValueError(f"critical sharpness: write='local' needs every rank to hold the full bf16/fp16 params "
                             f"after the step (ZeRO-1/2, BF16_Optimizer); {kind} "
                             f"{'partitions them (ZeRO-3)' if isinstance(self.layout, _Zero3Layout) else 'holds fp32 params'}"
                             "; use write='sharded' or 'auto'")
        self.write_mode, self.write_memory_budget_mib = write, write_memory_budget_mib
        # auto stops asking for local writes once their buffers did not fit on some rank.
        self._local_failed = False
        self._local: LocalWrites | None = None
        self.writes_locally = False
        # Whether the params hold θ_{t+1} now (right after the step, after restore or s = 1): a
        # write of s = 1 then needs no collective.
        self._holds_next = False
        self.batches: list[Batch] = []
        self.relative_batches: dict[str, Sequence[Batch]] = {}
        self.micro_batch_counts: dict[str | None, int] = {}
        self._theta_t: list[torch.Tensor] | None = None
        self._theta_next: list[torch.Tensor] | None = None
        self._rng: RngState | None = None
        self._modes: ModuleModes | None = None
        self._floor = 0.0
        self._snapshot_skipped: str | None = None
        # The ranks whose own part of the last loss was non-finite (None: finite, or not known).
        self.non_finite_ranks: tuple[int, ...] | None = None
        self._segments: list[list[Segment]] | None = None
        self._all_names: list[str] | None = None
        self._group = GroupSelection(ds_comm.all_reduce)  # partitions differ across the world

    @torch.no_grad()
    def snapshot(self) -> None:
        error = None
        try:
            self._theta_t = [master.detach().clone() for master, _ in self.layout.pairs()]
        except OUT_OF_MEMORY as caught:
            error, self._theta_t = caught, None
        # Every rank skips the measurement if any rank's partition did not fit, and writes locally only
        # where every rank can.
        self._local, errors, local_failed = agree_on_local_writes(
            error, bool(self._flats) and not self._local_failed, self.write_mode, self.write_memory_budget_mib,
            self._flats, self.layout.gather_steps)
        self._local_failed = self._local_failed or local_failed
        self._snapshot_skipped = snapshot_skip_reason(errors)
        if self._snapshot_skipped is not None:
            self._theta_t = self._local = None
        self.writes_locally = self._local is not None  # this measurement's mode, for logs and benchmarks

    @torch.no_grad()
    def after_step(self) -> str | None:
        if self._snapshot_skipped is not None:
            return self._snapshot_skipped
        assert self._theta_t is not None, "snapshot() must run before the optimizer step"
        if not self.engine.was_step_applied():  # decided by an all-reduced overflow flag
            return "DeepSpeed skipped the step (fp16 gradient overflow)"
        masters = [master for master, _ in self.layout.pairs()]
        self._theta_next = [m.clone() for m in masters] if self.layout.master_is_model else masters
        self._holds_next = True
        self._rng = RngState.capture()
        self._modes = ModuleModes([self.engine.module])
        # The histogram's counts also say whether any rank's step changed a parameter.
        pairs = self.layout.pairs()
        histogram = ResolutionHistogram.of_step([target for _, target in pairs], self._theta_t,
                                                self._theta_next, self.engine.device)
        if self._local is None:
            ds_comm.all_reduce(histogram.counts)
            self._floor = histogram.floor()
        else:
            # One pair per flat: a param group's master partition and this rank's partition.
            shards = [[(new, old, target)] for (_, target), old, new in zip(pairs, self._theta_t, self._theta_next)]
            self._local.take_step(shards)
            line = self._local.histogram(shards, self.engine.device)
            both = torch.cat([histogram.counts, line.counts])
            ds_comm.all_reduce(both)
            histogram.counts, line.counts = both.split(histogram.counts.numel())
            # Trial points on either side of LOCAL_FROM come from a different line: none below
            # the floor of either.
            self._floor = max(histogram.floor(), line.floor())
        return None if histogram.counts.sum().item() > 0 else "the step changed no parameter (zero update)"

    def resolution_floor(self) -> float:
        return self._floor if self._group.floor is None else self._group.floor

    def _segments_of_pairs(self) -> list[list[Segment]]:
        # The layout of partitions is fixed once the engine is built: computed once.
        if self._segments is None:
            module = self.engine.module
            names = {id(param): _canonical(name) for name, param in module.named_parameters()}
            self._segments = self.layout.segments(names)
        return self._segments

    def parameter_names(self) -> list[str]:
        if self._all_names is None:
            gathered: list[list[str] | None] = [None] * ds_comm.get_world_size()
            ds_comm.all_gather_object(gathered, local_names(self._segments_of_pairs()))
            self._all_names = union_in_rank_order(gathered)
        return self._all_names

    @torch.no_grad()
    def select_group(self, names: Collection[str] | None) -> None:
        assert self._theta_t is not None and self._theta_next is not None
        self._group.select(self._segments_of_pairs(), names, [target.dtype for _, target in self.layout.pairs()],
                           self._theta_t, self._theta_next, self.engine.device)

    @torch.no_grad()
    def write(self, step_multiple: float) -> None:
        assert self._theta_t is not None and self._theta_next is not None
        whole_update = self._group.ranges is None
        if whole_update and step_multiple == 1.0 and self._holds_next:
            return
        if self._local is not None and whole_update and step_multiple >= LOCAL_FROM:
            self._local.write(step_multiple)
        else:
            self.layout.before_write()
            for index, ((_, target), old, new) in enumerate(zip(self.layout.pairs(), self._theta_t, self._theta_next)):
                write_group(target, old, new, step_multiple, self._group.pair(index))
            self.layout.after_write()
        self._holds_next = whole_update and step_multiple == 1.0

    def commit(self, step_multiple: float, names: Collection[str] | None) -> None:
        # θ_{t+1} is this rank's fp32 master partition itself (a clone where the master is the
        # model param): the shortened step lands there, and restore() copies and gathers it.
        assert self._theta_t is not None and self._theta_next is not None
        commit_pairs(self._theta_t, self._theta_next, step_multiple, self._segments_of_pairs(), names)
        # The params no longer hold θ_{t+1}, and local writes' anchor is not the committed point:
        # restore() takes the sharded path.
        self._holds_next = False
        if self._local is not None:
            self._local.wait()  # its step's all-gather may still write into the step
            self._local = None

    @torch.no_grad()
    def write_rounding_noise(self, sample: int) -> bool:
        assert self._theta_t is not None and self._theta_next is not None
        pairs = self.layout.pairs()
        # The same answer on every rank: the engine's model dtype is one for all ranks.
        if not any(target.dtype in NOISY_COMPUTE_BITS for _, target in pairs):
            return False
        self.layout.before_write()
        offset = 0
        for (_, target), old, new in zip(pairs, self._theta_t, self._theta_next):
            if target.dtype in NOISY_COMPUTE_BITS:
                one_ulp_moved_into(target, old, new, target.dtype, sample, offset)
            else:
                target.copy_(old)
            offset += old.numel()
        self.layout.after_write()
        self._holds_next = False
        return True

    @torch.no_grad()
    def loss(self, task: str | None) -> float:
        batches = self.batches if task is None else self.relative_batches[task]
        value, error = math.nan, None
        take_local_non_finite()  # nothing noted by an earlier forward may count for this one
        try:
            self._rng.restore()
            value = self.evaluate(batches, self.micro_batch_counts[task]).detach().reshape(1).double().item()
        except CAUGHT as caught:
            error = caught
            report_local_failure(caught)
        # Every rank must branch alike: rank 0's bits (rather than trust the transport's summation
        # order to be the same everywhere), whether any rank failed, and how many ranks' own part
        # of the loss was non-finite, in one all-reduce.
        value, self.non_finite_ranks = agree_loss(value, error, take_local_non_finite())
        return value

    @torch.no_grad()
    def restore(self) -> None:
        if self._theta_next is not None:
            if self._local is not None and not self._holds_next:
                self._local.restore()
            elif not self._holds_next:
                self.layout.before_write()
                for (_, target), new in zip(self.layout.pairs(), self._theta_next):
                    target.copy_(new)
                self.layout.after_write()
            self.layout.settle()
            self._rng.restore()
            self._modes.restore()
        self._theta_t = self._theta_next = self._rng = self._local = None
        self._holds_next = False
        self._group.clear()


def _canonical(name: str) -> str:
    # Megatron-DeepSpeed and user wrappers put the model under `module.`.
    while name.startswith("module."):
        name = name[len("module."):]
    return name
