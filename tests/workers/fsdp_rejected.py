"""One rank: attach the plain-PyTorch probe to a model sharded with FSDP2 (accepted: its own
backend), to one where FSDP2 sharded a submodule only (refused: the root's parameters are plain),
and to FSDP1 inside a plain nn.Sequential (refused)."""

import datetime
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

from megatron_sharpness import TorchSharpnessProbe


def try_attach(label, model):
    try:
        TorchSharpnessProbe(model, torch.optim.SGD(model.parameters(), lr=0.1))
        print(f"ACCEPTED {label}")
    except TypeError as error:
        print(f"REJECTED {label}: {error}")


dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
fully_shard(model)
try_attach("fsdp2", model)
partial = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
fully_shard(partial[0])
try_attach("fsdp2-partial", partial)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # FSDP1 is deprecated in favour of fully_shard
    inner = FullyShardedDataParallel(torch.nn.Linear(4, 4), device_id=torch.device("cpu"))
try_attach("nested-fsdp1", torch.nn.Sequential(inner, torch.nn.Linear(4, 2)))
dist.destroy_process_group()
