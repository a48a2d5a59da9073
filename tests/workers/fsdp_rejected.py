"""One rank: wrap a model with FSDP2 and check that attaching the plain-PyTorch probe is refused."""

import datetime

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from megatron_sharpness import TorchSharpnessProbe

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
fully_shard(model)
try:
    TorchSharpnessProbe(model, torch.optim.SGD(model.parameters(), lr=0.1))
except TypeError as error:
    print(f"REJECTED: {error}")
dist.destroy_process_group()
