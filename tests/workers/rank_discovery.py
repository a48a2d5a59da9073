"""Initialise torch.distributed from the launcher's environment and prove the ranks talk."""

import datetime
import json

import torch
import torch.distributed as dist

from megatron_sharpness.distributed import init_distributed

found = init_distributed(backend="gloo", timeout=datetime.timedelta(seconds=60))
total = torch.tensor([float(found.rank)])
dist.all_reduce(total)
print("RESULT " + json.dumps({"launcher": found.launcher, "rank": found.rank, "world_size": found.world_size,
                              "local_rank": found.local_rank, "rank_sum": total.item(),
                              "torch_rank": dist.get_rank()}), flush=True)
dist.destroy_process_group()
