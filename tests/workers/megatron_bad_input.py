"""Two ranks of megatron-core on CPU/gloo, one `CASE name: ...` line per case and rank:

- pipeline parallel 2: MegatronSharpness refuses bad input with a clear error; a loss_func that
  reports `lm loss` in another form than [loss sum, token count] (a scalar, another key) raises on
  every rank at the first measurement, the first stage learning of it from the last, and θ_{t+1}
  is in place afterwards;
- then tensor parallel 2 with a short process-group timeout: rank 1 raises inside the
  tensor-parallel all-reduce of a probe forward (rank 0 waits in that all-reduce until the
  timeout); rank 1 must print its error before it waits in the next collective.
"""

import os
import sys

import torch

from megatron_sharpness.testing.megatron_cpu import install_cpu_shims

install_cpu_shims()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from megatron_sharpness.config import SharpnessConfig  # noqa: E402
from megatron_sharpness.integrations.megatron_core import MegatronSharpness  # noqa: E402
from megatron_sharpness.testing.megatron_gpt import (TinyGPTSetup, build_model_and_optimizer, forward_step,  # noqa: E402
                                                      init_gloo_model_parallel, synthetic_batch)

# Seconds rank 0 waits in the tensor-parallel all-reduce that rank 1 never joins.
TP_TIMEOUT = 15


def report(case, make):
    try:
        make()
        print(f"CASE {case}: accepted", flush=True)
    except (TypeError, ValueError, RuntimeError) as error:
        print(f"CASE {case}: {type(error).__name__}: {error}", flush=True)


def params(chunks):
    return [p.detach().clone() for chunk in chunks for p in chunk.parameters()]


def train_step(setup, chunks, optimizer, sharpness, step_func, micro_batches, seed):
    data = sharpness.record(iter([synthetic_batch(setup, seed + m) for m in range(micro_batches)]), micro_batches)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=step_func, data_iterator=data, model=chunks,
                                num_microbatches=micro_batches, seq_length=setup.seq_length,
                                micro_batch_size=setup.micro_batch_size, forward_only=False)
    return sharpness.step()


def reporting(report_of):
    """forward_step whose loss_func reports report_of([loss sum, tokens]) instead."""
    def step_func(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)

        def reported_otherwise(output_tensor):
            loss, tokens, reported = loss_func(output_tensor)
            return loss, tokens, report_of(reported["lm loss"])

        return output, reported_otherwise

    return step_func


def bad_input_and_mistakes():
    setup = TinyGPTSetup(pipeline_parallel=2)
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
                                seq_length=setup.seq_length, micro_batch_size=setup.micro_batch_size,
                                forward_only=False)
    before = params(chunks)
    report("record-4-run-1", sharpness.step)
    print(f"PARAMS MOVED: {any(not torch.equal(p, q) for p, q in zip(params(chunks), before))}", flush=True)

    cases = {"lm-loss-scalar": lambda reported: {"lm loss": reported[0] / reported[1]},
             "lm-loss-other-key": lambda reported: {"loss": reported}}
    real_step = optimizer.step
    for seed, (case, report_of) in enumerate(cases.items()):
        step_func = reporting(report_of)
        sharpness = MegatronSharpness(chunks, optimizer, step_func, SharpnessConfig(interval=1), loggers=[], **kwargs)
        after_step = []

        def step_and_keep_params():
            result = real_step()
            after_step.extend(params(chunks))
            return result

        optimizer.step = step_and_keep_params
        report(case, lambda: train_step(setup, chunks, optimizer, sharpness, step_func, 2, 100 * seed))
        optimizer.step = real_step
        in_place = bool(after_step) and all(torch.equal(p, q) for p, q in zip(params(chunks), after_step))
        print(f"CASE {case}-params-are-the-step: {in_place}", flush=True)


def failure_inside_a_tensor_parallel_collective():
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, distributed_timeout_minutes=TP_TIMEOUT / 60)
    setup = TinyGPTSetup(tensor_parallel=2)
    chunks, optimizer = build_model_and_optimizer(setup)
    tp_group, rank = parallel_state.get_tensor_model_parallel_group(), torch.distributed.get_rank()
    probe_forwards, armed = [], []
    real_all_reduce = torch.distributed.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        if armed and kwargs.get("group") is tp_group:
            armed.clear()
            raise RuntimeError("injected: rank 1 failed inside the tensor-parallel all-reduce of a probe forward")
        return real_all_reduce(tensor, *args, **kwargs)

    def step_func(data_iterator, model):
        if not torch.is_grad_enabled():  # a probe forward; the 3rd: a trial point after L(θ_t) and s = 1
            probe_forwards.append(1)
            if rank == 1 and len(probe_forwards) == 3:
                armed.append(1)
        return forward_step(data_iterator, model)

    torch.distributed.all_reduce = all_reduce
    sharpness = MegatronSharpness(chunks, optimizer, step_func, SharpnessConfig(interval=1), loggers=[],
                                  seq_length=setup.seq_length, micro_batch_size=setup.micro_batch_size)
    train_step(setup, chunks, optimizer, sharpness, step_func, 1, 0)
    print(f"CASE tp-fault: {sharpness.last_measurement.status}", flush=True)


init_gloo_model_parallel(1, 2, timeout_seconds=120)
bad_input_and_mistakes()
failure_inside_a_tensor_parallel_collective()
sys.stdout.flush()
sys.stderr.flush()
# The tensor-parallel groups are out of step after the injected failure: no orderly shutdown.
os._exit(0)
