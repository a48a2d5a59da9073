"""Backend for models sharded with torch FSDP2 (`fully_shard`, the torchtitan path).

Each parameter is a DTensor whose local shard (fp32, or the dtype it was created in) is what the
optimizer steps: the master of this rank's part. FSDP all-gathers the shards in every forward,
cast to the mixed-precision policy's param_dtype (bf16, say). So a trial point is written into the
local shards — θ(s) = lerp(θ_t, θ_{t+1}, s), both clones of this rank's shards, since the shard
is the master — and FSDP's own all-gather in the next forward spreads it. The plain-PyTorch
backend does the rest on those local shards (replayed loss, mean over the ranks, RNG, buffers);
what differs here: the shards differ across ranks (the resolution histogram and gᵀΔθ are summed
over them), the forward reads the policy's param_dtype, and unsharded parameters that FSDP kept
after a forward (the root module, `reshard_after_forward=False`) are released after every write,
so that the next forward gathers the new shards instead of serving the old values.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from megatron_sharpness.backends.groups import Segment, whole
from megatron_sharpness.backends.pytorch import TorchBackend


def is_fsdp2_model(model: torch.nn.Module) -> bool:
    return any(isinstance(module, FSDPModule) for module in model.modules())


class FSDP2Backend(TorchBackend):
    """model: the module fully_shard was applied to (and, usually, its blocks before it).
    process_group: the ranks whose losses are averaged (default: the whole world, which holds the
    data-parallel ranks of FSDP and HSDP alike). compute_dtype: the dtype the forward reads the
    parameters in; default: each parameter's mixed-precision param_dtype, else its own dtype."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 process_group: dist.ProcessGroup | None = None, compute_dtype: torch.dtype | None = None):
        if not dist.is_initialized():
            raise RuntimeError("critical sharpness: an FSDP2 model needs torch.distributed initialised "
                               "(fully_shard itself does)")
        super().__init__(model, optimizer, process_group or dist.group.WORLD, compute_dtype)
        self._fsdp_modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
        # Read now, while the modules hold their sharded parameters: after a forward that left a
        # module unsharded, named_parameters() yields the gathered copies instead.
        self._names = {id(param): name for name, param in model.named_parameters()}

    @staticmethod
    def _check_model(model: torch.nn.Module) -> None:
        plain = [name for name, param in model.named_parameters() if not isinstance(param, DTensor)]
        if plain:
            raise TypeError(f"critical sharpness: an FSDP2 model's parameters must all be DTensors (fully_shard the "
                            f"modules that hold them, or the root); not sharded: {', '.join(plain[:4])}"
                            f"{f', ... ({len(plain)} in all)' if len(plain) > 4 else ''}")

    def _sharded_params(self) -> list[DTensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def _trainable_params(self) -> list[torch.Tensor]:
        # The local shards: views of FSDP's sharded storage, stepped in place by the optimizer and
        # read by FSDP's all-gather.
        sharded = self._sharded_params()
        if not sharded:
            raise ValueError("the optimizer holds no parameter that requires grad: nothing to measure")
        if not all(isinstance(param, DTensor) for param in sharded):
            raise TypeError("critical sharpness: the optimizer of an FSDP2 model must hold its DTensor parameters "
                            "(build it from model.parameters() after fully_shard)")
        return [param.to_local() for param in sharded]

    def _dtypes(self) -> list[torch.dtype]:
        # Read after the step: FSDP settles each parameter's dtypes at its first forward.
        policy = {} if self.compute_dtype else _policy_param_dtypes(self._fsdp_modules)
        return [self.compute_dtype or policy.get(id(param), local.dtype)
                for param, local in zip(self._sharded_params(), self.params)]

    def _sum_histogram(self, counts: torch.Tensor) -> None:
        dist.all_reduce(counts, group=self.process_group)

    def _segments(self) -> list[list[Segment]]:
        return [whole(self._names.get(id(param), f"optimizer_param_{index}"), local)
                for index, (param, local) in enumerate(zip(self._sharded_params(), self.params))]

    @torch.no_grad()
    def gradient_slope(self) -> float | None:
        """gᵀ(θ_{t+1} − θ_t) over the whole model: each rank's shards, a replicated element (HSDP's
        replicas) counted once; the same float on every rank."""
        assert self._theta_t is not None and self._theta_next is not None
        sharded = self._sharded_params()
        if all(param.grad is None for param in sharded):
            return None
        total = 0.0
        for param, old, new in zip(sharded, self._theta_t, self._theta_next):
            if param.grad is not None:
                grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
                replicas = math.prod(param.device_mesh.size(dim) for dim, placement in enumerate(param.placements)
                                     if placement.is_replicate())
                total += float(torch.dot(grad.reshape(-1).double(), (new - old).reshape(-1).double())) / replicas
        return sum(value for value, in self._gather([total]))

    def write(self, step_multiple: float) -> None:
        super().write(step_multiple)
        self._release_unsharded()

    def write_rounding_noise(self, sample: int) -> bool:
        written = super().write_rounding_noise(sample)
        self._release_unsharded()
        return written

    def restore(self) -> None:
        super().restore()
        self._release_unsharded()

    def _release_unsharded(self) -> None:
        # FSDP skips the all-gather of a module whose parameters are still unsharded from an
        # earlier forward (the root keeps them for the backward that a forward-only pass never
        # runs; so does reshard_after_forward=False): those copies hold the previous trial point.
        for module in self._fsdp_modules:
            module.reshard()


def _policy_param_dtypes(modules: list[FSDPModule]) -> dict[int, torch.dtype]:
    """id(sharded parameter) -> the dtype FSDP all-gathers it in for the forward (its
    MixedPrecisionPolicy's param_dtype), for the parameters whose policy sets one; known once
    FSDP's lazy init ran (the first forward)."""
    dtypes = {}
    for module in modules:
        group = module._get_fsdp_state()._fsdp_param_group  # None for a module without parameters
        for fsdp_param in [] if group is None else group.fsdp_params:
            if fsdp_param.param_dtype is not None:
                dtypes[id(fsdp_param.sharded_param)] = fsdp_param.param_dtype
    return dtypes
