"""One rank of megatron-core on CPU/gloo: MegatronSharpness refuses bad input with a clear error.
Prints one `CASE name: ErrorType: message` line per case, plus whether the params moved."""

import torch

from megatron_sharpness.testing.megatron_cpu import install_cpu_shims

install_cpu_shims()

from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from megatron_sharpness.config import SharpnessConfig  # noqa: E402
from megatron_sharpness.integrations.megatron_core import MegatronSharpness  # noqa: E402
from megatron_sharpness.testing.megatron_gpt import (TinyGPTSetup, build_model_and_optimizer, forward_step,  # noqa: E402
                                                      init_gloo_model_parallel, shutdown_model_parallel,
                                                      synthetic_batch)


def report(case, make):
    try:
        make()
        print(f"CASE {case}: accepted", flush=True)
    except (TypeError, ValueError) as error:
        print(f"CASE {case}: {type(error).__name__}: {error}", flush=True)


setup = TinyGPTSetup()
init_gloo_model_parallel(1, 1)
chunks, optimizer = build_model_and_optimizer(setup)
kwargs = dict(seq_length=setup.seq_length, micro_batch_size=setup.micro_batch_size)
report("single-chunk", lambda: MegatronSharpness(chunks[0], optimizer, forward_step, SharpnessConfig(), **kwargs))
report("dict-config", lambda: MegatronSharpness(chunks, optimizer, forward_step, {"interval": 1}, **kwargs))

sharpness = MegatronSharpness(chunks, optimizer, forward_step, SharpnessConfig(interval=1), **kwargs)
items = iter([synthetic_batch(setup, seed) for seed in range(4)])
data = sharpness.record(items, 4)  # the schedule below runs 1 micro-batch
for chunk in chunks:
    chunk.zero_grad_buffer()
optimizer.zero_grad()
get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=chunks, num_microbatches=1,
                            seq_length=setup.seq_length, micro_batch_size=setup.micro_batch_size, forward_only=False)
before = [p.detach().clone() for p in chunks[0].parameters()]
report("record-4-run-1", sharpness.step)
print(f"PARAMS MOVED: {any(not torch.equal(p, q) for p, q in zip(chunks[0].parameters(), before))}", flush=True)
shutdown_model_parallel()
