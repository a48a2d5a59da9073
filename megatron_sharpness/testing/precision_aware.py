"""A CPU stand-in for TransformerEngine's FusedAdam, so that megatron-core's precision-aware
optimizer (--use-precision-aware-optimizer) runs in CPU tests. Test machinery, never for a run.

TransformerEngine's FusedAdam is GPU-only. What the probe depends on is where it keeps the master
weights, and that this stand-in keeps exactly as it does: in its state under "master_param", fp32,
or (store_param_remainders, bf16 params) as the int16 low halves of the fp32 bits, the bf16 param
being the high half rounded up where the low half's top bit is set; the gradient read from
`.decoupled_grad`; fp32 params stepped in place. The Adam(W) math is the textbook one in fp32 (not
the fused kernel's instruction order: the tests compare runs with and without the probe, both on
the stand-in).
"""

from __future__ import annotations

import torch

from megatron_sharpness.backends.megatron_precision_aware import compose_master, low_half, round_half_up_bf16


class StandInFusedAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, adam_w_mode: bool = True, capturable: bool = False, master_weights: bool = False,
                 master_weight_dtype=torch.float32, exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32,
                 use_decoupled_grad: bool = False, store_param_remainders: bool = False):
        if capturable or exp_avg_dtype != torch.float32 or exp_avg_sq_dtype != torch.float32:
            raise NotImplementedError("the stand-in keeps fp32 moments and is not capturable")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.adam_w_mode, self.master_weights = adam_w_mode, master_weights
        self.master_weight_dtype, self.use_decoupled_grad = master_weight_dtype, use_decoupled_grad
        self.store_param_remainders = store_param_remainders and master_weights and master_weight_dtype == torch.float32

    def initialize_state(self, param: torch.Tensor, store_param_remainders: bool | None = None) -> None:
        remainders = self.store_param_remainders if store_param_remainders is None else store_param_remainders
        state = self.state[param]
        state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
        if self.master_weights:
            if remainders and param.dtype == torch.bfloat16:
                state["master_param"] = torch.zeros_like(param, dtype=torch.int16)
            else:
                state["master_param"] = param.detach().float().clone()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            correction1, correction2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            for param in group["params"]:
                grad = getattr(param, "decoupled_grad", None) if self.use_decoupled_grad else param.grad
                if grad is None:
                    continue
                state = self.state[param]
                if not state:
                    self.initialize_state(param)
                kept = state.get("master_param") if param.dtype != torch.float32 else None
                if kept is None:
                    master = param.detach().float()
                elif kept.dtype == torch.int16:
                    master = compose_master(param, kept)
                else:
                    master = kept
                grad = grad.float()
                if not self.adam_w_mode:
                    grad = grad + group["weight_decay"] * master
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (state["exp_avg"] / correction1) / ((state["exp_avg_sq"] / correction2).sqrt() + group["eps"])
                if self.adam_w_mode:
                    update = update + group["weight_decay"] * master
                master = master - group["lr"] * update
                if kept is None:
                    param.copy_(master)
                elif kept.dtype == torch.int16:
                    param.copy_(round_half_up_bf16(master).view(param.shape))
                    kept.copy_(low_half(master).view(kept.shape))
                else:
                    kept.copy_(master)
                    param.copy_(master)
        return None


def install_stand_in_fused_adam() -> None:
    """megatron-core builds the stand-in where it would build TransformerEngine's FusedAdam (the
    factory's and the distributed optimizer's module-level Adam, and the factory's TE version check)."""
    import megatron.core.optimizer as factory
    import megatron.core.optimizer.distrib_optimizer as distributed

    factory.Adam = StandInFusedAdam
    factory.USING_PYTORCH_OPTIMIZER = False
    factory.is_te_min_version = lambda version, check_equality=True: True
    distributed.Adam = StandInFusedAdam  # the class DistributedOptimizer accepts as "Adam"


def precision_aware_config(config, remainders: bool) -> None:
    """Turn an OptimizerConfig built without the precision-aware optimizer into one with it, as
    its __post_init__ would have set it had TransformerEngine been installed (that check imports
    TransformerEngine's FusedAdam)."""
    config.use_precision_aware_optimizer = True
    config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 = True
    config.store_param_remainders = remainders
