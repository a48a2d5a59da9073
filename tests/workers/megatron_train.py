"""One rank of a megatron-core run on CPU/gloo, for tests/test_megatron.py.

Trains a tiny GPTModel twice from the same seed with Megatron's own schedules: without the probe
(then one more step where the backend is driven by hand to check s = 0, s = 1 and restore), and
with MegatronSharpness measuring every step. Writes OUT/rank{R}.json with what the test asserts.
"""

import argparse
import json
import os

import torch

from megatron_sharpness.testing.megatron_cpu import install_cpu_shims

install_cpu_shims()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # noqa: E402

from megatron_sharpness.backends.megatron import (MegatronBackend, canonical_names, leaf_optimizers,  # noqa: E402
                                                  master_pairs, master_triples, reduce_lm_loss)
from megatron_sharpness.modules import default_groups  # noqa: E402
from megatron_sharpness.config import SharpnessConfig  # noqa: E402
from megatron_sharpness.integrations.megatron_core import MegatronSharpness  # noqa: E402
from megatron_sharpness.testing.faults import InjectedFault, snapshot_runs_out_of_memory  # noqa: E402
from megatron_sharpness.testing.reference import ulps_apart  # noqa: E402
from megatron_sharpness.testing.megatron_gpt import (TinyGPTSetup, build_model_and_optimizer, forward_step,  # noqa: E402
                                                      init_gloo_model_parallel, shutdown_model_parallel,
                                                      synthetic_batch)


def setup_of(a):
    return TinyGPTSetup(tensor_parallel=a.tp, pipeline_parallel=a.pp, virtual_pipeline=a.vpp,
                        distributed_optimizer=a.dist_opt, bf16=a.bf16, overlap_param_gather=a.overlap,
                        layers=a.layers, dropout=a.dropout, precision_aware=a.precision_aware)


def build(a):
    chunks, optimizer = build_model_and_optimizer(a.setup)
    if a.frozen_layer:  # a submodule the user keeps in eval mode (its dropout off) while the rest trains
        next(m for chunk in chunks for m in chunk.modules() if type(m).__name__ == "TransformerLayer").eval()
    return chunks, optimizer


def data_iterators(a, seed_base, steps):
    """One long-lived iterator per model chunk over all steps: a probe that consumed a micro-batch
    would shift every later step."""
    dp_rank = ps.get_data_parallel_rank()
    items = [synthetic_batch(a.setup, seed_base + 1000 * step + 10 * dp_rank + micro)
             for step in range(steps) for micro in range(a.nmb)]
    return [iter(items) for _ in range(a.vpp or 1)]


def forward_backward(a, chunks, optimizer, data):
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    return get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=chunks,
                                       num_microbatches=a.nmb, seq_length=a.setup.seq_length,
                                       micro_batch_size=a.setup.micro_batch_size, forward_only=False)


def train_step(a, chunks, optimizer, iterators, sharpness=None, iteration=None):
    data = iterators if a.vpp else iterators[0]
    if sharpness is None:
        return forward_backward(a, chunks, optimizer, data), optimizer.step()
    store = forward_backward(a, chunks, optimizer, sharpness.record(data, a.nmb, iteration))
    return store, sharpness.step(iteration, training_losses=store if a.reuse_training_loss else None)


def state(chunks, optimizer):
    # With overlap_param_gather the all-gather of θ_{t+1} waits for the next forward; compare the
    # gathered params (the probe's after_step() has already forced that gather).
    leaves = leaf_optimizers(optimizer)
    if any(type(leaf).__name__ == "DistributedOptimizer" for leaf in leaves):
        for chunk in chunks:
            chunk.start_param_sync(force_sync=True)
    return {
        "params": [p.detach().clone() for c in chunks for p in c.parameters()],
        "main_params": [main.detach().clone() for leaf in leaves for main, _ in master_pairs(leaf)],
        "optimizer": [t.clone() for leaf in leaves for s in leaf.optimizer.state.values()
                      for t in s.values() if isinstance(t, torch.Tensor)],
        "rng": [torch.get_rng_state()] + [s.clone() for _, s in sorted(get_cuda_rng_tracker().get_states().items())],
    }


def hand_checks(a, chunks, backend, before, after, params):
    """s = 1, s = 0, s = 1/2 and restore through one backend, on the step it measured."""
    backend.write(1.0)
    checks = {"s1_is_step": all(torch.equal(p, q) for p, q in zip(params(), after))}
    backend.write(0.0)
    checks["s0_is_before"] = all(torch.equal(p, q) for p, q in zip(params(), before))
    backend.write(0.5)
    checks["s_half_moves"] = not all(torch.equal(p, q) for p, q in zip(params(), after))
    if a.modules:
        # One group moved to s = 1, every other parameter exactly at θ_t, on every rank's shard.
        names = backend.parameter_names()
        checks["groups"] = list(default_groups(names))
        group = default_groups(names)["layer_1"]
        backend.select_group(group)
        backend.write(1.0)
        by_id = canonical_names(chunks)
        in_group = [by_id[id(p)] in group for c in chunks for p in c.parameters()]
        checks["group_moves_alone"] = all(torch.equal(p, q if moved else r) for p, q, r, moved in
                                          zip(params(), after, before, in_group))
        checks["group_nonempty_here"] = any(in_group)
        backend.select_group(None)
    backend.restore()
    checks["restored"] = all(torch.equal(p, q) for p, q in zip(params(), after))
    return checks


def reference_run(a):
    chunks, optimizer = build(a)
    iterators = data_iterators(a, 0, a.steps + 2)
    losses = [reduce_lm_loss(train_step(a, chunks, optimizer, iterators)[0]).item() for _ in range(a.steps)]
    reference = state(chunks, optimizer)

    # One more step with the backend driven by hand, in each write mode on the same step.
    def params():
        return [p.detach().clone() for c in chunks for p in c.parameters()]

    local, sharded = (MegatronBackend(optimizer, chunks, evaluate=None, write=mode) for mode in ("auto", "sharded"))
    # auto with a budget that local writes do not fit writes sharded
    budget = MegatronBackend(optimizer, chunks, evaluate=None, write="auto", write_memory_budget_mib=0.0)
    forward_backward(a, chunks, optimizer, iterators if a.vpp else iterators[0])
    before = params()
    local.snapshot()
    sharded.snapshot()
    budget.snapshot()
    optimizer.step()
    checks = {"after_step": local.after_step(), "sharded_after_step": sharded.after_step(),
              "budget_writes_locally": budget.writes_locally}
    try:
        MegatronBackend(optimizer, chunks, evaluate=None, write="local")
        checks["local_refused"] = None
    except ValueError as error:
        checks["local_refused"] = str(error)
    after = params()
    # Far along the step the local line follows the fp32 step: within the rounding of θ_{t+1}
    # and of the trial point of the sharded write, also where the bf16 endpoints are equal.
    sharded.write(8.0)
    far = params()
    sharded.write(1.0)
    local.write(8.0)
    checks["local_far_ulps"] = max(ulps_apart(p, q, r) for p, q, r in zip(params(), far, after))
    checks["local"] = local._local is not None
    checks.update(hand_checks(a, chunks, local, before, after, params))
    checks["sharded"] = {key: value for key, value in hand_checks(a, chunks, sharded, before, after, params).items()
                         if key not in ("groups", "group_nonempty_here")}
    checks.update(commit_checks(a, chunks, optimizer, iterators, params))
    return reference, checks, losses


def commit_checks(a, chunks, optimizer, iterators, params):
    """One more step, shortened to a quarter by the guard's commit() (of layer_1 alone with
    --modules): the model params are the trial point s = 1/4 (the group's elements; θ_{t+1} elsewhere),
    the masters hold lerp(θ_t, θ_{t+1}, 1/4) exactly (the group's; θ_{t+1} elsewhere) — where the
    precision-aware optimizer keeps them, its state's master, composed from the shard and its
    remainder — and the rest of the optimizer's state is what the real step left."""
    leaves = leaf_optimizers(optimizer)

    def mains():
        return [main.detach().clone() for leaf in leaves for main, _ in master_pairs(leaf)]

    def moments():
        return [t.clone() for leaf in leaves for s in leaf.optimizer.state.values() for key, t in s.items()
                if isinstance(t, torch.Tensor) and key != "master_param"]

    backend = MegatronBackend(optimizer, chunks, evaluate=None)
    forward_backward(a, chunks, optimizer, iterators if a.vpp else iterators[0])
    theta_t = mains()
    backend.snapshot()
    optimizer.step()
    backend.after_step()
    after, theta_next, state_after = params(), mains(), moments()
    group = default_groups(backend.parameter_names())["layer_1"] if a.modules else None
    backend.write(0.25)
    quarter = params()
    backend.commit(0.25, group)
    backend.restore()
    by_id = canonical_names(chunks)
    in_group = [group is None or by_id[id(p)] in group for c in chunks for p in c.parameters()]
    pair_in_group = [group is None or by_id[id(model)] in group
                     for leaf in leaves for _, _, model in master_triples(leaf)]
    return {"committed": all(torch.equal(p, q if moved else r) for p, q, r, moved in
                             zip(params(), quarter, after, in_group)),
            "masters_committed": all(torch.equal(m, torch.lerp(old, new, 0.25) if moved else new)
                                     for m, old, new, moved in zip(mains(), theta_t, theta_next, pair_in_group)),
            "commit_keeps_optimizer_state": all(torch.equal(x, y) for x, y in zip(moments(), state_after))}


def probe_run(a, write):
    chunks, optimizer = build(a)
    iterators = data_iterators(a, 0, a.steps + 1)
    held_out = data_iterators(a, 777_000, 64)
    config = SharpnessConfig(interval=1, micro_batches=a.micro_batches, reuse_training_loss=a.reuse_training_loss,
                             write=write, **({"modules": "default", "modules_interval": 1} if a.modules else {}))
    fault = InjectedFault(a.fail_at)

    def probe_forward_step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)
        return output, fault.wrap(loss_func)

    sharpness = MegatronSharpness(chunks, optimizer, probe_forward_step, config, seq_length=a.setup.seq_length,
                                  micro_batch_size=a.setup.micro_batch_size, loggers=[],
                                  relative_data_iterators={"held-out": held_out if a.vpp else held_out[0]})
    snapshot_runs_out_of_memory(sharpness.backend, a.snapshot_oom, lambda: fault.current_step)
    records, training_losses, optimizer_names = [], [], [type(o).__name__ for o in leaf_optimizers(optimizer)]
    all_batch_losses = []
    for step in range(a.steps):
        # Megatron-LM passes its own iteration (e.g. when resuming); otherwise the probe counts.
        iteration = None if a.first_iteration is None else a.first_iteration + step
        fault.at_step(step + 1)
        store, _ = train_step(a, chunks, optimizer, iterators, sharpness, iteration)
        count = min(a.micro_batches or a.nmb, a.nmb)
        training_losses.append(reduce_lm_loss(store[:count]).item())
        all_batch_losses.append(reduce_lm_loss(store).item())
        records.append(sharpness.last_measurement.to_dict())
    probed = state(chunks, optimizer)
    left = [sum(1 for _ in it) for it in iterators]
    # Where the optimizer kept its masters (the precision-aware optimizer: its own state).
    masters = sorted({str(kept["master_param"].dtype) for leaf in leaf_optimizers(optimizer)
                      for kept in leaf.optimizer.state.values() if "master_param" in kept})
    return probed, records, training_losses, all_batch_losses, optimizer_names, left, masters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--overlap", action="store_true", help="overlap_grad_reduce and overlap_param_gather")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nmb", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--reuse-training-loss", action="store_true")
    parser.add_argument("--frozen-layer", action="store_true", help="the first transformer layer in eval mode throughout")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--writes", nargs="+", default=["auto"], choices=["auto", "local", "sharded"],
                        help="write modes of the probe runs (one run each; the first is reported in full)")
    parser.add_argument("--modules", action="store_true", help="the per-module breakdown at every measurement")
    parser.add_argument("--first-iteration", type=int, default=None)
    parser.add_argument("--precision-aware", choices=("fp32", "remainders"), default=None,
                        help="the precision-aware optimizer (CPU stand-in for TransformerEngine's FusedAdam), its "
                             "masters in its state as fp32 or as int16 remainders")
    parser.add_argument("--fail-at", default=None, metavar="RANK:STEP:CALL[:nan]",
                        help="rank RANK raises torch.OutOfMemoryError in its CALL-th probe loss_func of step STEP")
    parser.add_argument("--snapshot-oom", default=None, metavar="RANK:STEP",
                        help="rank RANK runs out of memory while the probe snapshots θ_t at step STEP")
    a = parser.parse_args()
    a.setup = setup_of(a)

    init_gloo_model_parallel(a.tp, a.pp, a.vpp, timeout_seconds=120)
    reference, checks, reference_losses = reference_run(a)
    runs = {}
    for write in a.writes:
        probed, records, training_losses, probed_losses, optimizers, left, masters = probe_run(a, write)
        equal = {key: len(reference[key]) == len(probed[key]) and all(
            x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(reference[key], probed[key])) for key in reference}
        runs[write] = {"optimizers": optimizers, "masters_in_optimizer_state": masters, "bitwise_equal": equal, "records": records,
                       "training_losses": training_losses, "micro_batches_left": left,
                       "same_training_losses": reference_losses == probed_losses}
    rank = torch.distributed.get_rank()
    result = {"rank": rank, "checks": checks, **runs[a.writes[0]], "writes": runs}
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as out:
        json.dump(result, out)
    shutdown_model_parallel()


if __name__ == "__main__":
    main()
