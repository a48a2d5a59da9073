"""Backend for megatron-core: model chunks wrapped in its DistributedDataParallel and the optimizer
from get_megatron_optimizer (a ChainedOptimizer over DistributedOptimizer /
Float16OptimizerWithFloat16Params / FP32Optimizer), with tensor, pipeline (also virtual) and data
parallelism. Attribute names are those of megatron-core 0.16.1 (verified bitwise on CPU, see
DESIGN.md §3); they are unchanged on Megatron-LM main.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Collection, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer import (ChainedOptimizer, DistributedOptimizer, Float16OptimizerWithFloat16Params,
                                     FP32Optimizer)
from megatron.core.transformer.module import param_is_not_shared

from megatron_sharpness.backends.groups import (GroupSelection, Segment, commit_pairs, local_names, union_in_rank_order,
                                                whole, write_group)
from megatron_sharpness.backends.local import (LOCAL_DTYPES, LOCAL_FROM, LocalWrites, agree_on_local_writes,
                                               offset_in)
from megatron_sharpness.backends.modes import ModuleModes
from megatron_sharpness.faults import (CAUGHT, OUT_OF_MEMORY, UsageError, agree_loss, note_local_loss,
                                       report_local_failure, snapshot_skip_reason, take_local_non_finite)
from megatron_sharpness.backends import megatron_fsdp
from megatron_sharpness.backends import megatron_precision_aware as precision_aware
from megatron_sharpness.backends.lerp import NOISY_COMPUTE_BITS, one_ulp_moved_into
from megatron_sharpness.backends.megatron_support import CPU_OFFLOAD, FP8, LAYER_WISE, SUPPORTED, TORCH_FSDP2
from megatron_sharpness.backends.resolution import ResolutionHistogram
from megatron_sharpness.backends.rng import RngState

# Reduced loss of a task over its micro-batches, the same value on every rank up to the bits,
# given what this rank recorded (per model chunk) and how many micro-batches every rank runs.
Evaluator = Callable[[Sequence[Sequence[Any]], int], torch.Tensor]


def _unsupported(what: str) -> TypeError:
    return TypeError(f"critical sharpness: {what} is not supported yet; supported: {SUPPORTED}")


def leaf_optimizers(optimizer) -> list:
    kind = type(optimizer).__name__
    if kind == "LayerWiseDistributedOptimizer":
        raise LAYER_WISE.error()
    if isinstance(optimizer, ChainedOptimizer):
        return [leaf for inner in optimizer.chained_optimizers for leaf in leaf_optimizers(inner)]
    if type(optimizer) not in (DistributedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer):
        raise _unsupported(f"optimizer {type(optimizer).__module__}.{kind}")
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and type(inner).__name__ == "HybridDeviceOptimizer":
        raise CPU_OFFLOAD.error()
    if precision_aware.holds_masters(optimizer):
        precision_aware.check_masters(optimizer)
    return [optimizer]


def master_pairs(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 master tensor of this rank, the model-side tensor the optimizer copies it into),
    following each class's own _copy_main_params_to_model_params."""
    return [(main, target) for main, target, _ in master_triples(optimizer)]


def master_triples(optimizer) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """master_pairs with the model parameter each pair belongs to (a distributed-optimizer shard
    holds a range of one parameter)."""
    if getattr(optimizer, "is_stub_optimizer", False):
        return []
    if megatron_fsdp.is_megatron_fsdp(optimizer):
        return megatron_fsdp.master_triples(optimizer)
    if precision_aware.holds_masters(optimizer):
        return precision_aware.master_triples(optimizer)
    if isinstance(optimizer, DistributedOptimizer):
        def shard_of(model_param: torch.Tensor) -> torch.Tensor:
            world_range = optimizer._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
            buffer_index, _, bucket = optimizer.model_param_gbuf_map[model_param]
            flat = optimizer.buffers[buffer_index].buckets[bucket].param_data.view(-1)
            return flat[world_range.start:world_range.end]

        groups = list(zip(optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups))
        groups += list(zip(optimizer.model_fp32_groups, optimizer.shard_fp32_groups))
        return [(main, shard_of(model), model) for models, mains in groups for model, main in zip(models, mains)]
    if isinstance(optimizer, Float16OptimizerWithFloat16Params):
        pairs = [(main, model.data, model) for models, mains in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups)
                 for model, main in zip(models, mains)]
        return pairs + [(param.data, param.data, param) for group in optimizer.fp32_from_fp32_groups for param in group]
    return [(param.data, param.data, param) for group in optimizer.optimizer.param_groups for param in group["params"]]


_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")
# An expert's index inside its layer's experts module: SequentialMLP's local_experts.K, the
# grouped GEMM's (TEGroupedMLP) linear_fc1.weightK / biasK.
_EXPERT = re.compile(r"^(.*\.experts)(\.local_experts\.|\.linear_fc[12]\.(?:weight|bias))(\d+)(\b.*)$")


def canonical_names(model_chunks: Sequence[torch.nn.Module]) -> dict[int, str]:
    """id(model parameter) -> its name without wrapper prefixes (DDP's and Float16Module's
    `module.`), with `decoder.layers.N` numbered globally: a pipeline stage (and each virtual
    chunk) numbers its layers from 0, its TransformerLayers know their global layer_number. Experts
    are numbered globally too: with expert parallelism each rank numbers its own experts from 0."""
    names = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            expert = _EXPERT.match(name)
            if expert is not None:
                module = chunk.get_submodule(expert.group(1))
                group, local = getattr(module, "ep_group", None), getattr(module, "num_local_experts", None)
                if group is not None and isinstance(local, int):
                    index = group.rank() * local + int(expert.group(3))
                    name = f"{expert.group(1)}{expert.group(2)}{index}{expert.group(4)}"
            layer = _LAYER.match(name)
            if layer is not None:
                module = chunk.get_submodule(layer.group(1) + layer.group(2))
                number = getattr(module, "layer_number", None)
                if isinstance(number, int):
                    name = f"{layer.group(1)}{number - 1}{layer.group(3)}"
            while name.startswith("module."):
                name = name[len("module."):]
            names[id(param)] = name
    return names


def reject_unsupported_model(model_chunks: Sequence[torch.nn.Module]) -> None:
    for chunk in model_chunks:
        kind = type(chunk).__name__
        if megatron_fsdp.is_megatron_fsdp(chunk):
            megatron_fsdp.check_megatron_fsdp(chunk)
            continue
        if kind == "TorchFullyShardedDataParallel":
            raise TORCH_FSDP2.error()
        config = getattr(chunk, "config", None)
        if any(getattr(config, name, None) for name in ("fp8", "fp4", "fp8_param", "fp4_param")):
            raise FP8.error()
        if not hasattr(chunk, "start_param_sync"):
            raise _unsupported(f"a model chunk of type {kind} (wrap it in megatron.core DistributedDataParallel)")


def gathered_flats(leaves: Sequence) -> list[torch.Tensor]:
    """The param buffers the distributed optimizers all-gather after their step (one per model
    chunk and dtype): every model param of the slice is a view into one of them."""
    flats = {}
    for leaf in leaves:
        if isinstance(leaf, DistributedOptimizer) and not getattr(leaf, "is_stub_optimizer", False):
            for buffer in leaf.buffers:
                flats[buffer.param_data.data_ptr()] = buffer.param_data
    return list(flats.values())


class MegatronBackend:
    """loss_bits: megatron-core's losses are fp32 sums (loss_func's convention). batches: per model chunk, the micro-batches its data iterator yielded during the step.
    micro_batch_counts: how many micro-batches each task runs, the same on every rank.
    relative_batches: per relative task, in the same per-chunk form. step_applied: what
    optimizer.step() returned as its first value (False when the loss scaler skipped the step).
    write, write_memory_budget_mib: SharpnessConfig's (how trial points reach the params)."""

    loss_bits = 24

    def __init__(self, optimizer, model_chunks: Sequence[torch.nn.Module], evaluate: Evaluator,
                 write: str = "auto", write_memory_budget_mib: float | None = None):
        reject_unsupported_model(model_chunks)
        self.leaves = leaf_optimizers(optimizer)
        self.model_chunks = list(model_chunks)
        self.evaluate = evaluate
        self.uses_param_gather = any(isinstance(leaf, DistributedOptimizer) for leaf in self.leaves)
        self.overlap_param_gather = any(getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False)
                                        for chunk in self.model_chunks)
        self.megatron_fsdp = any(megatron_fsdp.is_megatron_fsdp(chunk) for chunk in self.model_chunks)
        # Megatron-FSDP gathers each unit module's params from its own buffers at every forward:
        # no step to gather ahead, no local writes.
        self._flats = [] if self.megatron_fsdp else gathered_flats(self.leaves)
        # Local writes serve where every gathered param is bf16/fp16 (fp32 params under the
        # distributed optimizer alias their master: nothing to gain).
        self.local_possible = bool(self._flats) and all(flat.dtype in LOCAL_DTYPES for flat in self._flats)
        if write == "local" and self.megatron_fsdp:
            raise ValueError("critical sharpness: write='local' is not available under Megatron-FSDP (its forwards "
                             "gather every param from the shards); use write='sharded' or 'auto'")
        if write == "local" and self.uses_param_gather and not self.local_possible:
            raise ValueError("critical sharpness: write='local' needs the distributed optimizer's params in bf16 or "
                             f"fp16; this model's gathered params are {sorted({str(f.dtype) for f in self._flats})}; "
                             "use write='sharded' or 'auto'")
        self.write_mode, self.write_memory_budget_mib = write, write_memory_budget_mib
        # auto stops asking for local writes once their buffers did not fit on some rank.
        self._local_failed = False
        self._local: LocalWrites | None = None
        self.writes_locally = False
        # Whether the params hold θ_{t+1} now (right after the step, after restore or s = 1): a
        # write of s = 1 then needs no all-gather.
        self._holds_next = False
        self.batches: list[list[Any]] = []
        self.relative_batches: dict[str, list[list[Any]]] = {}
        self.micro_batch_counts: dict[str | None, int] = {}
        self.step_applied = True
        # The total gradient norm optimizer.step() returned (before clipping), for gradient_slope().
        self.grad_norm: float | None = None
        # The ranks whose own part of the last loss was non-finite (None: finite, or not known).
        self.non_finite_ranks: tuple[int, ...] | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._models: list[torch.nn.Parameter] = []  # the model param of each pair
        self._flat_of_pair: list[int | None] = []
        self._casts: list = []
        self._pairs_per_leaf: list[int] = []
        self._segments: list[list[Segment]] = []
        self._all_names: list[str] | None = None
        self._group = GroupSelection(dist.all_reduce)  # shards differ across the world
        self._theta_t: list[torch.Tensor] | None = None
        self._theta_next: list[torch.Tensor] | None = None
        self._rng: RngState | None = None
        self._modes: ModuleModes | None = None
        self._floor = 0.0
        self._snapshot_skipped: str | None = None

    @torch.no_grad()
    def snapshot(self) -> None:
        per_leaf = [master_triples(leaf) for leaf in self.leaves]
        self._pairs_per_leaf = [len(leaf_triples) for leaf_triples in per_leaf]
        triples = [triple for leaf_triples in per_leaf for triple in leaf_triples]
        self._pairs = [(main, target) for main, target, _ in triples]
        self._models = [model for _, _, model in triples]
        # Per pair, the gathered param buffer its model side lies in (None: not gathered).
        self._flat_of_pair = [next((index for index, flat in enumerate(self._flats)
                                    if offset_in(flat.view(-1), target) is not None), None)
                              for _, target in self._pairs]
        # How an fp32 value becomes the model-side one (None: a plain cast, round to nearest even).
        self._casts = [cast for leaf, leaf_triples in zip(self.leaves, per_leaf)
                       for cast in (precision_aware.model_casts(leaf) if leaf_triples and precision_aware.holds_masters(leaf)
                                    else [None] * len(leaf_triples))]
        names = (megatron_fsdp.parameter_names if self.megatron_fsdp else canonical_names)(self.model_chunks)
        self._segments = [whole(names.get(id(model), f"unnamed_{index}"), main)
                          for index, (main, _, model) in enumerate(triples)]
        error = None
        try:
            self._theta_t = [main.detach().clone() for main, _ in self._pairs]
        except OUT_OF_MEMORY as caught:
            error, self._theta_t = caught, None
        # Every rank skips the measurement if any rank's shard did not fit, and writes locally only
        # where every rank can.
        self._local, errors, local_failed = agree_on_local_writes(
            error, self.local_possible and not self._local_failed, self.write_mode, self.write_memory_budget_mib,
            self._flats, self._gather_steps)
        self._local_failed = self._local_failed or local_failed
        self._snapshot_skipped = snapshot_skip_reason(errors)
        if self._snapshot_skipped is not None:
            self._theta_t, self._pairs, self._models, self._local = None, [], [], None
        self.writes_locally = self._local is not None  # this measurement's mode, for logs and benchmarks

    @torch.no_grad()
    def after_step(self) -> str | None:
        if self._snapshot_skipped is not None:
            return self._snapshot_skipped
        assert self._theta_t is not None, "snapshot() must run before optimizer.step()"
        if not self.step_applied:
            return "the optimizer skipped the step (inf/NaN gradients)"
        # Read again: a precision-aware optimizer's masters are composed from its state, which
        # its first step creates.
        mains = [main for leaf in self.leaves for main, _, _ in master_triples(leaf)]
        self._pairs = [(main, target) for main, (_, target) in zip(mains, self._pairs)]
        # Where the master is the model tensor itself a trial point would overwrite θ_{t+1}.
        self._theta_next = [main.detach().clone() if main.data_ptr() == target.data_ptr() else main
                            for main, target in self._pairs]
        if self.overlap_param_gather or self.megatron_fsdp:
            # the all-gather of θ_{t+1} was deferred to the next forward; Megatron-FSDP's may be in flight
            self._sync_params()
        self._holds_next = True
        self._rng = RngState.capture()
        self._modes = ModuleModes(self.model_chunks)
        # Summed over the world: tensor, pipeline and distributed-optimizer shards differ. The
        # counts also say whether any rank's step changed a parameter.
        histogram = ResolutionHistogram.of_step([target for _, target in self._pairs], self._theta_t,
                                                self._theta_next, _device())
        if self._local is None:
            dist.all_reduce(histogram.counts)
            self._floor = histogram.floor()
        else:
            shards = self._local_shards()
            self._local.take_step(shards)
            line = self._local.histogram(shards, _device())
            both = torch.cat([histogram.counts, line.counts])
            dist.all_reduce(both)
            histogram.counts, line.counts = both.split(histogram.counts.numel())
            # Trial points on either side of LOCAL_FROM come from a different line: none below
            # the floor of either.
            self._floor = max(histogram.floor(), line.floor())
        return None if histogram.counts.sum().item() > 0 else "the step changed no parameter (zero update)"

    def resolution_floor(self) -> float:
        return self._floor if self._group.floor is None else self._group.floor

    @torch.no_grad()
    def gradient_slope(self) -> float | None:
        """gᵀ(θ_{t+1} − θ_t) from the main grads the step used (still on the main params after
        step()), unscaled, with Megatron's clipping undone, each shard counted once as Megatron's
        own grad norm counts it (no shared or tensor-parallel duplicate); rank 0's float on every
        rank. A placement prior for the search: None where a rank holds no grads."""
        assert self._theta_t is not None and self._theta_next is not None
        # The main tensor holds the grad the step used (a distributed-optimizer shard, a Float16
        # optimizer's fp32 copy); FP32Optimizer gives the model param main_grad as its grad.
        grads = [main.grad if main.grad is not None else model.grad for (main, _), model in zip(self._pairs, self._models)]
        missing = bool(self._pairs) and all(grad is None for grad in grads)
        dot = torch.tensor([0.0, float(missing)], dtype=torch.float64, device=_device())
        for grad, model, old, new in zip(grads, self._models, self._theta_t, self._theta_next):
            if grad is not None and param_is_not_shared(model) and \
                    tensor_parallel.param_is_not_tensor_parallel_duplicate(model):
                dot[0] += torch.dot(grad.reshape(-1).double(), (new - old).reshape(-1).double())
        # Shards and model-parallel slices differ across the world; replicas add the same sum,
        # which the broadcast from rank 0 makes one float everywhere.
        dist.all_reduce(dot, group=self.leaves[0].get_grad_stats_parallel_group() if self.leaves else None)
        dist.broadcast(dot, src=0)
        if dot[1].item() > 0:
            return None
        clip = getattr(getattr(self.leaves[0], "config", None), "clip_grad", 0.0) if self.leaves else 0.0
        coefficient = clip / (self.grad_norm + 1.0e-6) if clip and self.grad_norm else 1.0
        return dot[0].item() / min(coefficient, 1.0)

    def parameter_names(self) -> list[str]:
        if self._all_names is None:  # the model's parameters do not change: gathered once
            gathered: list[list[str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local_names(self._segments))
            self._all_names = union_in_rank_order(gathered)
        return self._all_names

    @torch.no_grad()
    def select_group(self, names: Collection[str] | None) -> None:
        assert self._theta_t is not None and self._theta_next is not None
        self._group.select(self._segments, names, [target.dtype for _, target in self._pairs],
                           self._theta_t, self._theta_next, _device())

    @torch.no_grad()
    def write(self, step_multiple: float) -> None:
        assert self._theta_t is not None and self._theta_next is not None
        whole_update = self._group.ranges is None
        if whole_update and step_multiple == 1.0 and self._holds_next:
            return
        local = self._local is not None and whole_update and step_multiple >= LOCAL_FROM
        if local:
            self._local.write(step_multiple)
        for index, ((_, target), old, new) in enumerate(zip(self._pairs, self._theta_t, self._theta_next)):
            if not (local and self._flat_of_pair[index] is not None):
                write_group(target, old, new, step_multiple, self._group.pair(index), self._casts[index])
        if not local:
            self._sync_params()
        self._holds_next = whole_update and step_multiple == 1.0

    def commit(self, step_multiple: float, names: Collection[str] | None) -> None:
        # θ_{t+1} is the fp32 master itself (a clone where the master is the model param): the
        # shortened step lands in the master shard, and restore() copies and gathers it.
        assert self._theta_t is not None and self._theta_next is not None
        commit_pairs(self._theta_t, self._theta_next, step_multiple, self._segments, names)
        # A remainder-keeping precision-aware optimizer holds its master's low half in its state; the
        # restore writes the high half into the shard.
        start = 0
        for leaf, count in zip(self.leaves, self._pairs_per_leaf):
            if precision_aware.holds_masters(leaf):
                for state, master in zip(precision_aware.remainder_states(leaf), self._theta_next[start:start + count]):
                    if state is not None:
                        state.copy_(precision_aware.low_half(master).view(state.shape))
            start += count
        # The params no longer hold θ_{t+1}, and local writes' anchor is not the committed point:
        # restore() takes the sharded path.
        self._holds_next = False
        if self._local is not None:
            self._local.wait()  # its step's all-gather may still write into the step
            self._local = None

    @torch.no_grad()
    def write_rounding_noise(self, sample: int) -> bool:
        assert self._theta_t is not None and self._theta_next is not None
        # Every rank answers alike: the model dtype is the same across data, tensor and pipeline ranks.
        if not any(target.dtype in NOISY_COMPUTE_BITS for _, target in self._pairs):
            return False
        offset = 0
        for (_, target), old, new in zip(self._pairs, self._theta_t, self._theta_next):
            if target.dtype in NOISY_COMPUTE_BITS:
                one_ulp_moved_into(target, old, new, target.dtype, sample, offset)
            else:
                target.copy_(old)
            offset += old.numel()
        self._sync_params()
        self._holds_next = False
        return True

    @torch.no_grad()
    def loss(self, task: str | None) -> float:
        batches = self.batches if task is None else self.relative_batches[task]
        value, error = math.nan, None
        take_local_non_finite()  # nothing noted by an earlier forward may count for this one
        try:
            self._reset_random_state()
            value = self.evaluate(batches, self.micro_batch_counts[task]).detach().reshape(1).double().item()
        except CAUGHT as caught:
            error = caught
            report_local_failure(caught)
        # Every rank must branch alike: rank 0's bits, whether any rank failed, and how many ranks'
        # own part of the loss was non-finite, in one all-reduce.
        value, self.non_finite_ranks = agree_loss(value, error, take_local_non_finite())
        return value

    @torch.no_grad()
    def restore(self) -> None:
        if self._theta_next is not None:
            if not self._holds_next:
                if self._local is not None:
                    self._local.restore()
                for index, ((_, target), new, cast) in enumerate(zip(self._pairs, self._theta_next, self._casts)):
                    local = self._local is not None and self._flat_of_pair[index] is not None
                    if target.data_ptr() != new.data_ptr() and not local:
                        target.copy_(new if cast is None else cast(new))
                if self._local is None:
                    self._sync_params()
            if self.megatron_fsdp:
                megatron_fsdp.gather_as_after_step(self.model_chunks)
            self._reset_random_state()
            self._modes.restore()
        self._theta_t = self._theta_next = self._rng = self._local = None
        self._pairs, self._segments, self._models = [], [], []
        self._holds_next = False
        self._group.clear()

    def _local_shards(self) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Per gathered buffer: this rank's (θ_{t+1} master shard, θ_t of it, model-side view)."""
        shards: list[list] = [[] for _ in self._flats]
        for (_, target), old, new, flat in zip(self._pairs, self._theta_t, self._theta_next, self._flat_of_pair):
            if flat is not None:
                shards[flat].append((new, old, target))
        return shards

    def _gather_steps(self, steps: list[torch.Tensor]) -> list:
        """Starts the all-gathers of the step buffers as megatron-core all-gathers the param
        buffers: per bucket, over the bucket group's distributed-optimizer instance."""
        works = []
        for chunk in self.model_chunks:
            for bucket_group in [*chunk.bucket_groups, *getattr(chunk, "expert_parallel_bucket_groups", [])]:
                size = bucket_group.intra_distributed_optimizer_instance_size
                rank = bucket_group.intra_distributed_optimizer_instance_rank
                for bucket in bucket_group.buckets:
                    for flat, step in zip(self._flats, steps):
                        start = offset_in(flat.view(-1), bucket.param_data)
                        if start is None:
                            continue
                        region = step[start:start + bucket.param_data.numel()]
                        shard = region.numel() // size
                        works.append(dist.all_gather_into_tensor(
                            region, region[rank * shard:(rank + 1) * shard],
                            group=bucket_group.intra_distributed_optimizer_instance_group, async_op=True))
        return works

    def _sync_params(self) -> None:
        if self.megatron_fsdp:
            megatron_fsdp.invalidate_gathered(self.model_chunks)
        elif self.uses_param_gather:
            for chunk in self.model_chunks:
                chunk.start_param_sync(force_sync=True)

    def _reset_random_state(self) -> None:
        self._rng.restore()  # torch's generators and megatron-core's RNG tracker


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class LossReportError(UsageError, ValueError):
    """forward_step_func's loss_func reports the loss in another form than the probe reduces."""


def reduce_lm_loss(forward_data_store: Sequence[dict] | None, key: str = "lm loss") -> torch.Tensor:
    """The mean loss over micro-batches, tokens and data-parallel ranks, broadcast from the last
    pipeline stage so that every rank holds it. Each entry of forward_data_store (last stage only)
    is what loss_func reported: [loss sum, token count], megatron-core's convention. None: this
    rank's forward failed; it still joins the reductions (adding nothing) so that its peers do not
    hang in them, and the caller raises its error afterwards. A report in another form is a
    mistake of the setup: a flag in the same reductions tells every rank, and each raises
    LossReportError after them (the ranks that saw the report say what it was)."""
    totals = torch.zeros(3, dtype=torch.float64, device=_device())  # [loss sum, tokens, mistakes]
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    mistake = None
    if forward_data_store is not None and last_stage:
        mistake = _report_mistake(forward_data_store, key)
        if mistake is None:
            reported = [torch.as_tensor(entry[key]).double().reshape(2) for entry in forward_data_store]
            totals[:2] += torch.stack(reported).sum(0).to(totals.device)
            note_local_loss(totals[0])
        else:
            totals[2] = 1.0
    if last_stage:
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    if mistake is not None:
        raise LossReportError(mistake)
    if totals[2].item() > 0:
        raise LossReportError(f"critical sharpness: forward_step_func's loss_func did not report {key!r} as "
                              "[loss sum, token count] on the last pipeline stage (megatron-core's convention, "
                              "which the probe reduces); the error raised there says what it reported")
    return totals[0] / totals[1]


def _report_mistake(forward_data_store: Sequence[dict], key: str) -> str | None:
    """What is wrong with the loss reports of the micro-batches, or None."""
    if not forward_data_store:
        return "critical sharpness: forward_step_func's loss_func reported nothing (no micro-batch ran)"
    for entry in forward_data_store:
        if not isinstance(entry, dict) or key not in entry:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            return (f"critical sharpness: forward_step_func's loss_func reported no {key!r} (got {keys}); report "
                    f"[loss sum, token count] under {key!r} (megatron-core's convention, which the probe reduces), "
                    "or name the key with MegatronSharpness(..., loss_key=...)")
        value = entry[key]
        try:
            count = torch.as_tensor(value).numel()
        except (TypeError, ValueError, RuntimeError):
            count = None
        if count != 2:
            return (f"critical sharpness: forward_step_func's loss_func reported {key!r} as {value!r:.80}; "
                    "megatron-core's convention, which the probe reduces, is [loss sum, token count] per "
                    "micro-batch (e.g. torch.cat([loss_sum.view(1), num_tokens.view(1)]))")
    return None
