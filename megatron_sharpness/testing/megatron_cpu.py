"""Run megatron-core 0.16.1 on CPU with gloo, for the tests, the demo and the benchmarks.

megatron-core assumes CUDA in a few places that have nothing to do with the math. Nothing here is
active until install_cpu_shims() is called, and the probe itself never calls it. Call it before
building models and optimizers; megatron looks the patched names up at call time.
"""

from __future__ import annotations

import sys

import torch

_installed = False


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _on_cpu(factory):
    def factory_on_cpu(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    factory_on_cpu.__wrapped__ = factory
    return factory_on_cpu


def install_cpu_shims() -> None:
    global _installed
    if _installed:
        return
    _installed = True

    # Factories called with a literal device="cuda" (token counts in the schedules, found_inf and
    # loss-scale buffers of the mixed-precision optimizers, gradient-norm accumulators).
    torch.zeros = _on_cpu(torch.zeros)
    torch.tensor = _on_cpu(torch.tensor)
    # Param/grad buffers and p2p shapes are placed on torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Timers and p2p communication synchronize the CUDA stream.
    torch.cuda.synchronize = lambda *args, **kwargs: None

    # The model-parallel RNG tracker forks CUDA generator states for TP-layer init and dropout:
    # let it fork the CPU generator instead.
    import megatron.core.tensor_parallel.random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.manual_seed = lambda *args, **kwargs: None

    # The optimizers sort params by their type string ("torch.cuda.BFloat16Tensor", ...); on CPU
    # the names lack ".cuda" and the params are rejected. Answer with the CUDA name, but only to
    # megatron.core's own no-argument calls.
    tensor_type = torch.Tensor.type

    def cuda_type_name(self, *args, **kwargs):
        if not args and not kwargs and not self.is_cuda:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            name = tensor_type(self)
            if caller.startswith("megatron.core") and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return tensor_type(self, *args, **kwargs)

    torch.Tensor.type = cuda_type_name
