"""Backend for plain PyTorch models and torch DistributedDataParallel, any torch.optim optimizer.

The model's parameters are the optimizer's master copy here, so writing a trial point would
destroy θ_{t+1}: both θ_t and θ_{t+1} are cloned (2 × the parameter bytes, only while measuring).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from megatron_sharpness.backends.groups import GroupSelection, Segment, commit_pairs, local_names, whole, write_group
from megatron_sharpness.backends.lerp import NOISY_COMPUTE_BITS, one_ulp_moved_into
from megatron_sharpness.backends.resolution import SIGNIFICAND_BITS, ResolutionHistogram
from megatron_sharpness.backends.rng import RngState
from megatron_sharpness.faults import (CAUGHT, OUT_OF_MEMORY, ProbeFailure, RankError, UsageError, describe,
                                       device_of, gather_errors, report_local_failure, snapshot_skip_reason)

LossFn = Callable[[], "torch.Tensor | float"]


class TorchBackend:
    """loss_fns maps None (the step's batch) and each relative task's name to a closure that
    returns that batch's mean loss at the current parameters; the integration sets it per step.
    compute_dtype: the dtype the forward computes in where it differs from the parameters' (e.g.
    bf16 under torch.autocast); None = each parameter's own dtype."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 process_group: dist.ProcessGroup | None = None, compute_dtype: torch.dtype | None = None):
        self._check_model(model)
        self.model = model
        self.optimizer = optimizer
        self.params = self._trainable_params()
        if process_group is None and isinstance(model, DistributedDataParallel):
            process_group = model.process_group
        self.process_group = process_group
        self.compute_dtype = compute_dtype
        self.loss_fns: dict[str | None, LossFn] = {}
        self.loss_bits = SIGNIFICAND_BITS[torch.float32]
        self._floor = 0.0
        # The ranks whose own loss was non-finite in the last reduction (None: none).
        self.non_finite_ranks: tuple[int, ...] | None = None
        self._theta_t: list[torch.Tensor] | None = None
        self._theta_next: list[torch.Tensor] | None = None
        self._buffers: list[torch.Tensor] | None = None
        self._rng: RngState | None = None
        self._snapshot_skipped: str | None = None
        self._group = GroupSelection(self._sum_histogram)

    @staticmethod
    def _check_model(model: torch.nn.Module) -> None:
        _reject_sharded_model(model)

    def _sum_histogram(self, counts: torch.Tensor) -> None:
        """Sums a resolution histogram over the ranks that hold different parameters: none here
        (plain or DDP: every rank holds them all)."""

    def _trainable_params(self) -> list[torch.Tensor]:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            raise ValueError("the optimizer holds no parameter that requires grad: nothing to measure")
        return params

    @torch.no_grad()
    def snapshot(self) -> None:
        # Read at every measured step: a param group added (add_param_group) or a param unfrozen
        # since the last one moves with the step too.
        self.params = self._trainable_params()
        error = None
        try:
            self._theta_t = [p.detach().clone() for p in self.params]
        except OUT_OF_MEMORY as caught:
            error, self._theta_t = caught, None
        # Every rank skips the measurement if any rank's copy did not fit.
        failed = self._gather([float(error is not None)])
        self._snapshot_skipped = None
        if any(flag for flag, in failed):
            errors = [RankError(0, describe(error))] if self._world_size() == 1 else gather_errors(error, self.process_group)
            self._snapshot_skipped = snapshot_skip_reason(errors)
            self._theta_t = None

    @torch.no_grad()
    def after_step(self) -> str | None:
        if self._snapshot_skipped is not None:
            return self._snapshot_skipped
        assert self._theta_t is not None, "snapshot() must run before optimizer.step()"
        self._theta_next = [p.detach().clone() for p in self.params]
        # Forwards in train mode update BatchNorm statistics and draw dropout masks: keep both so
        # that every trial point sees the same state and training resumes exactly where it was.
        self._buffers = [b.detach().clone() for b in self.model.buffers()]
        self._rng = RngState.capture()
        changed = any(not torch.equal(old, new) for old, new in zip(self._theta_t, self._theta_next))
        if not self._any_rank(changed):
            return "the step changed no parameter (skipped step or zero update)"
        histogram = ResolutionHistogram.of_segments(
            [(old.reshape(-1), new.reshape(-1), dtype) for old, new, dtype in zip(self._theta_t, self._theta_next, self._dtypes())])
        self._sum_histogram(histogram.counts)
        self._floor = histogram.floor()
        return None

    def resolution_floor(self) -> float:
        return self._floor if self._group.floor is None else self._group.floor

    @torch.no_grad()
    def gradient_slope(self) -> float | None:
        """gᵀ(θ_{t+1} − θ_t) from the gradients the step used (still in .grad): dL/ds at s = 0 of
        the step's loss, up to what the caller did to them (clipping scales it). A placement prior
        for the search, never a reading; rank 0's float on every rank, so that all place alike."""
        assert self._theta_t is not None and self._theta_next is not None
        if all(param.grad is None for param in self.params):
            return None
        total = 0.0
        for param, old, new in zip(self.params, self._theta_t, self._theta_next):
            if param.grad is not None:
                total += float(torch.dot(param.grad.reshape(-1).double(), (new - old).reshape(-1).double()))
        return self._gather([total])[0][0]

    def parameter_names(self) -> list[str]:
        # Every rank holds every parameter (plain or DDP): no union over ranks needed.
        return local_names(self._segments())

    def _dtypes(self) -> list[torch.dtype]:
        """The dtype the forward reads each parameter in."""
        return [self.compute_dtype or param.dtype for param in self.params]

    def _segments(self) -> list[list[Segment]]:
        names = {id(param): name for name, param in _unwrapped(self.model).named_parameters()}
        # A parameter the optimizer holds but the model does not (rare) still gets a stable name.
        return [whole(names.get(id(param), f"optimizer_param_{index}"), param)
                for index, param in enumerate(self.params)]

    @torch.no_grad()
    def select_group(self, names) -> None:
        assert self._theta_t is not None and self._theta_next is not None
        self._group.select(self._segments(), names, self._dtypes(), self._theta_t, self._theta_next)

    @torch.no_grad()
    def write(self, step_multiple: float) -> None:
        assert self._theta_t is not None and self._theta_next is not None
        for index, (param, old, new) in enumerate(zip(self.params, self._theta_t, self._theta_next)):
            ranges = self._group.pair(index)
            if ranges is None:
                torch.lerp(old, new, step_multiple, out=param.detach())
            else:
                write_group(param.detach(), old, new, step_multiple, ranges)

    def commit(self, step_multiple: float, names) -> None:
        assert self._theta_t is not None and self._theta_next is not None
        commit_pairs(self._theta_t, self._theta_next, step_multiple, self._segments(), names)
    @torch.no_grad()
    def write_rounding_noise(self, sample: int) -> bool:
        assert self._theta_t is not None and self._theta_next is not None
        dtypes = self._dtypes()
        if not any(dtype in NOISY_COMPUTE_BITS for dtype in dtypes):
            return False
        offset = 0
        for param, old, new, dtype in zip(self.params, self._theta_t, self._theta_next, dtypes):
            if dtype in NOISY_COMPUTE_BITS:
                one_ulp_moved_into(param.detach(), old, new, dtype, sample, offset)
            else:
                param.detach().copy_(old)
            offset += old.numel()
        return True

    def loss(self, task: str | None) -> float:
        label = "the step's loss_fn" if task is None else f"the loss_fn of relative task {task!r}"
        value, error = math.nan, None
        try:
            self._reset_forward_state()
            with torch.no_grad():
                raw = self.loss_fns[task]()
            value = self._scalar(raw, label)
            # A Python float gives no dtype: assume the fp32 of most losses, not float64's resolution.
            self.loss_bits = SIGNIFICAND_BITS.get(getattr(raw, "dtype", None), SIGNIFICAND_BITS[torch.float32])
        except CAUGHT as caught:
            error = caught
            report_local_failure(caught)
        return self._mean_over_ranks(value, error)

    def reduce_loss(self, value: object, label: str) -> float:
        """A scalar loss of this rank as the float every rank agrees on (the mean over ranks)."""
        return self._mean_over_ranks(self._scalar(value, label))

    @staticmethod
    def _scalar(value: object, label: str) -> float:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise _BadLoss(f"{label} must return a scalar loss, got a tensor of shape "
                                 f"{tuple(value.shape)}")
            value = value.item()
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            # float("3") would pass a string through and the search would run on nonsense.
            raise _BadLossType(f"{label} must return the loss as a scalar tensor or a float, got "
                            f"{type(value).__name__} ({value!r:.60})")
        return float(value)

    @torch.no_grad()
    def restore(self) -> None:
        if self._theta_next is not None:
            for param, new in zip(self.params, self._theta_next):
                param.detach().copy_(new)
            self._reset_forward_state()
        self._theta_t = self._theta_next = self._buffers = self._rng = None
        self._group.clear()

    def _reset_forward_state(self) -> None:
        assert self._buffers is not None and self._rng is not None
        for buffer, saved in zip(self.model.buffers(), self._buffers):
            buffer.detach().copy_(saved)
        self._rng.restore()

    def _world_size(self) -> int:
        if self.process_group is None or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def _any_rank(self, flag: bool) -> bool:
        return any(value for value, in self._gather([float(flag)]))

    def _mean_over_ranks(self, value: float, error: BaseException | None = None) -> float:
        """The mean of the ranks' values, or ProbeFailure on every rank if any rank's loss failed:
        the failed flag travels in the same all-gather as the values."""
        gathered = self._gather([value, float(error is not None)])
        if any(failed for _, failed in gathered):
            if self._world_size() == 1:
                raise ProbeFailure([RankError.of(0, error)], error)
            raise ProbeFailure(gather_errors(error, self.process_group), error)
        non_finite = [index for index, (v, _) in enumerate(gathered) if not math.isfinite(v)]
        self.non_finite_ranks = tuple(self._global_rank(index) for index in non_finite) or None
        # Summing the gathered values in rank order gives every rank the same float bits; an
        # all_reduce leaves the summation order to the transport.
        return sum(v for v, _ in gathered) / len(gathered)

    def _global_rank(self, index: int) -> int:
        if self._world_size() == 1:
            return dist.get_rank() if dist.is_initialized() else 0
        return index if self.process_group is None else dist.get_global_rank(self.process_group, index)

    def _gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's values, in rank order (this rank's alone outside a process group)."""
        if self._world_size() == 1:
            return [values]
        local = torch.tensor(values, dtype=torch.float64, device=device_of(self.process_group))
        gathered = [torch.empty_like(local) for _ in range(self._world_size())]
        dist.all_gather(gathered, local, group=self.process_group)
        return [t.tolist() for t in gathered]


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    # DDP's `module.` prefix is not part of the parameter's name in the user's model.
    return model.module if isinstance(model, DistributedDataParallel) else model


class _BadLoss(UsageError, ValueError):
    pass


class _BadLossType(UsageError, TypeError):
    pass


def _reject_sharded_model(model: torch.nn.Module) -> None:
    """FSDP shards parameters and gathers them inside forward: the lerp would hit the wrong tensors.
    Checked on every submodule: FSDP1 wrapped inside a plain container holds flat params that are
    neither DTensors nor the model's own."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    sharded = next((module for module in model.modules()
                    if isinstance(module, (FullyShardedDataParallel, FSDPModule))), None)
    if sharded is None and not any(isinstance(p, DTensor) for p in model.parameters()):
        return
    where = "" if sharded is None or sharded is model else f" (inside {type(model).__name__})"
    name = type(model if sharded is None else sharded).__name__
    raise TypeError(f"{name}{where} with sharded (FSDP/DTensor) parameters is not supported "
                    "by the plain-PyTorch probe; supported: a plain nn.Module, torch "
                    "DistributedDataParallel, or a model sharded with torch FSDP2 (fully_shard) "
                    "(DeepSpeed and Megatron have their own backends)")
