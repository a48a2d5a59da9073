"""What the megatron-core backend supports and what it refuses, with why, in one place.

The same refusal is raised twice over: by the backend when the probe is attached to a model and
optimizer (megatron-core loops), and, for Megatron-LM, when its flags are parsed — before the model
is built and a checkpoint loaded (integrations/megatron_lm.py maps flags onto these entries). Both
say the same words.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = ("DistributedOptimizer (also with the precision-aware optimizer), Float16OptimizerWithFloat16Params "
             "and FP32Optimizer, alone or in a ChainedOptimizer, over megatron-core DistributedDataParallel model "
             "chunks or Megatron-FSDP (v1, optim_grads_params)")


@dataclass(frozen=True)
class Refusal:
    what: str
    why: str

    def message(self, flags: str | None = None) -> str:
        named = self.what if flags is None else f"{flags} ({self.what})"
        return f"critical sharpness: {named} is not supported yet: {self.why}; supported: {SUPPORTED}"

    def error(self) -> TypeError:
        return TypeError(self.message())


LAYER_WISE = Refusal(
    "LayerWiseDistributedOptimizer",
    "each rank steps whole parameters and spreads them with the optimizer's own all-gather, which the probe "
    "does not drive")
CPU_OFFLOAD = Refusal(
    "HybridDeviceOptimizer (optimizer CPU offload)",
    "its fp32 masters live on the CPU inside its own sub-optimizers and reach the model through its own copies")
FP8 = Refusal(
    "fp8/fp4 compute (TransformerEngine)",
    "the delayed-scaling amax history advances with every forward, so the probe's forwards would change "
    "training after them, and the weights reach the matmuls through a quantized copy whose rounding the "
    "resolution floor and the loss-noise samples do not model")
TORCH_FSDP2 = Refusal(
    "Megatron's torch FSDP2 wrapper (TorchFullyShardedDataParallel)",
    "megatron-core's optimizer steps its DTensor shards, a layout the megatron-core backend does not read, and "
    "it cannot be tried on CPU (torch fails in fully_shard's init there); plain torch fully_shard models "
    "are supported by TorchSharpnessProbe")
