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
from megatron.core import parallel_state
from megatron.core.optimizer import (ChainedOptimizer, DistributedOptimizer, Float16OptimizerWithFloat16Params,
                                     FP32Optimizer)

from megatron_sharpness.backends.groups import GroupSelection, Segment, local_names, union_in_rank_order, whole, write_group
from megatron_sharpness.backends.modes import ModuleModes
from megatron_sharpness.faults import (CAUGHT, OUT_OF_MEMORY, UsageError, agree_loss, any_rank_failed, note_local_loss,
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


class MegatronBackend:
    """loss_bits: megatron-core's losses are fp32 sums (loss_func's convention). batches: per model chunk, the micro-batches its data iterator yielded during the step.
    micro_batch_counts: how many micro-batches each task runs, the same on every rank.
    relative_batches: per relative task, in the same per-chunk form. step_applied: what
    optimizer.step() returned as its first value (False when the loss scaler skipped the step)."""

    loss_bits = 24

    def __init__(self, optimizer, model_chunks: Sequence[torch.nn.Module], evaluate: Evaluator):
        reject_unsupported_model(model_chunks)
        self.leaves = leaf_optimizers(optimizer)
        self.model_chunks = list(model_chunks)
        self.evaluate = evaluate
        self.uses_param_gather = any(isinstance(leaf, DistributedOptimizer) for leaf in self.leaves)
        self.megatron_fsdp = any(megatron_fsdp.is_megatron_fsdp(chunk) for chunk in self.model_chunks)
        self.batches: list[list[Any]] = []
        self.relative_batches: dict[str, list[list[Any]]] = {}
        self.micro_batch_counts: dict[str | None, int] = {}
        self.step_applied = True
        # The ranks whose own part of the last loss was non-finite (None: finite, or not known).
        self.non_finite_ranks: tuple[int, ...] | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._casts: list = []
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
        triples = [triple for leaf_triples in per_leaf for triple in leaf_triples]
        self._pairs = [(main, target) for main, target, _ in triples]
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
        # Every rank skips the measurement if any rank's shard did not fit.
        self._snapshot_skipped = snapshot_skip_reason(any_rank_failed(error))
        if self._snapshot_skipped is not None:
            self._theta_t, self._pairs = None, []

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
        self._sync_params()  # also drains a param all-gather that overlap_param_gather deferred
        self._rng = RngState.capture()
        self._modes = ModuleModes(self.model_chunks)
        # Summed over the world: tensor, pipeline and distributed-optimizer shards differ. The
        # counts also say whether any rank's step changed a parameter.
        histogram = ResolutionHistogram.of_step([target for _, target in self._pairs], self._theta_t,
                                                self._theta_next, _device())
        dist.all_reduce(histogram.counts)
        self._floor = histogram.floor()
        return None if histogram.counts.sum().item() > 0 else "the step changed no parameter (zero update)"

    def resolution_floor(self) -> float:
        return self._floor if self._group.floor is None else self._group.floor

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
        for index, ((_, target), old, new) in enumerate(zip(self._pairs, self._theta_t, self._theta_next)):
            write_group(target, old, new, step_multiple, self._group.pair(index), self._casts[index])
        self._sync_params()

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
            for (_, target), new, cast in zip(self._pairs, self._theta_next, self._casts):
                if target.data_ptr() != new.data_ptr():
                    target.copy_(new if cast is None else cast(new))
            self._sync_params()
            if self.megatron_fsdp:
                megatron_fsdp.gather_as_after_step(self.model_chunks)
            self._reset_random_state()
            self._modes.restore()
        self._theta_t = self._theta_next = self._rng = None
        self._pairs, self._segments = [], []
        self._group.clear()

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
