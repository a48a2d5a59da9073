"""A small DeepSpeed training script with the probe switched on from its ds_config, for the launch
scripts' CPU runs: a tiny GPT on the embedded corpus, one attach() line, nothing else changed.

    python -m megatron_sharpness.demo_deepspeed --deepspeed-config ds_config.json [--steps 30]

Ranks come from the environment (torchrun, or srun through `megatron-sharpness exec`).
"""

from __future__ import annotations

import argparse
import json
import os


def default_ds_config(stage: int = 2, interval: int = 5, log_file: str | None = None) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
        "critical_sharpness": {"enabled": True, "interval": interval, "micro_batches": 1, "log_file": log_file},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed-config", help="ds_config JSON (default: ZeRO-2 bf16, probe every 5 steps)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import deepspeed
    import torch

    from megatron_sharpness.data import ByteBatches, embedded_corpus
    from megatron_sharpness.integrations.deepspeed import attach
    from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss

    class GPTWithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = TinyGPT(width=64, layers=2, heads=4, max_seq_len=32)

        def forward(self, tokens, targets):
            return lm_loss(self.gpt, tokens, targets)

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    config = default_ds_config()
    if args.deepspeed_config:
        with open(args.deepspeed_config) as handle:
            config = json.load(handle)
    torch.manual_seed(0)
    model = GPTWithLoss()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    sharpness = attach(engine)
    data = ByteBatches(embedded_corpus(), batch_size=config["train_micro_batch_size_per_gpu"], seq_len=32,
                       seed=torch.distributed.get_rank())
    for _ in range(args.steps * engine.gradient_accumulation_steps()):
        engine.backward(engine(*next(data)))
        engine.step()
    sharpness.detach()
    engine.destroy()


if __name__ == "__main__":
    main()
