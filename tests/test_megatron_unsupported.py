"""Setups the megatron-core backend does not support are refused with the setup's name."""

import types

import pytest
import torch

pytest.importorskip("megatron.core", reason="the megatron extra is not installed (pip install -e '.[megatron]')")

from megatron.core.optimizer import DistributedOptimizer  # noqa: E402

from megatron_sharpness.backends.megatron import leaf_optimizers, reject_unsupported_model  # noqa: E402


def bare(cls, **attributes):
    instance = cls.__new__(cls)
    instance.__dict__.update(attributes)
    return instance


@pytest.mark.parametrize("optimizer, message", [
    (type("LayerWiseDistributedOptimizer", (), {})(), "LayerWiseDistributedOptimizer is not supported yet: each rank"),
    (type("Lion", (), {})(), "optimizer .*Lion is not supported"),
    (bare(DistributedOptimizer, config=types.SimpleNamespace(use_precision_aware_optimizer=True),
          optimizer=types.SimpleNamespace(master_weights=False)), "without master weights in its state"),
    (bare(DistributedOptimizer, config=types.SimpleNamespace(use_precision_aware_optimizer=True),
          optimizer=types.SimpleNamespace(master_weights=True, master_weight_dtype=torch.float16)),
     "with fp16 master weights .--main-params-dtype fp16. is not supported yet: its masters are scaled"),
    (bare(DistributedOptimizer, config=types.SimpleNamespace(use_precision_aware_optimizer=False),
          optimizer=type("HybridDeviceOptimizer", (), {})()), "HybridDeviceOptimizer .optimizer CPU offload. is not"),
])
def test_unsupported_optimizers(optimizer, message):
    with pytest.raises(TypeError, match=message) as error:
        leaf_optimizers(optimizer)
    assert "supported: DistributedOptimizer (also with the precision-aware optimizer), Float16OptimizerWithFloat16Params " \
           "and FP32Optimizer" in str(error.value)


@pytest.mark.parametrize("chunk, message", [
    (types.SimpleNamespace(ddp_config=types.SimpleNamespace(use_megatron_fsdp=True, megatron_fsdp_version=2,
                                                            data_parallel_sharding_strategy="optim_grads_params"),
                           start_param_sync=None), "Megatron-FSDP other than v1"),
    (types.SimpleNamespace(ddp_config=types.SimpleNamespace(use_megatron_fsdp=True, megatron_fsdp_version=1,
                                                            data_parallel_sharding_strategy="optim"),
                           start_param_sync=None), "optim_grads_params"),
    (type("TorchFullyShardedDataParallel", (), {"start_param_sync": None})(), "torch FSDP2 wrapper"),
    (types.SimpleNamespace(config=types.SimpleNamespace(fp8_param=True), start_param_sync=None), "fp8/fp4 compute"),
    (types.SimpleNamespace(config=types.SimpleNamespace(fp8="hybrid"), start_param_sync=None), "amax history"),
    (types.SimpleNamespace(), "wrap it in megatron.core DistributedDataParallel"),
])
def test_unsupported_models(chunk, message):
    with pytest.raises(TypeError, match=message):
        reject_unsupported_model([chunk])
