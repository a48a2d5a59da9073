"""One rank of a DeepSpeed run on CPU/gloo, for tests/test_deepspeed.py.

Trains a tiny GPT twice from the same seed: without the probe (then one more step where the
backend is driven by hand to check s = 0, s = 1 and restore against gathered params), and with
the probe attached from the ds_config on every step. Writes OUT/rank{R}.json with what the test
asserts.
"""

import argparse
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from deepspeed import comm as ds_comm  # noqa: E402
from deepspeed.pipe import PipelineModule  # noqa: E402

from megatron_sharpness.backends.deepspeed import DeepSpeedBackend, master_layout  # noqa: E402
from megatron_sharpness.data import ByteBatches, embedded_corpus  # noqa: E402
from megatron_sharpness.integrations import megatron_deepspeed  # noqa: E402
from megatron_sharpness.config import SharpnessConfig  # noqa: E402
from megatron_sharpness.integrations.deepspeed import attach, engine_forward_loss, loss_of  # noqa: E402
from megatron_sharpness.modules import default_groups  # noqa: E402
from megatron_sharpness.testing.faults import InjectedFault, snapshot_runs_out_of_memory  # noqa: E402
from megatron_sharpness.testing.reference import first_crossing, ulps_apart  # noqa: E402
from megatron_sharpness.testing.tiny_gpt import Block, TinyGPT, lm_loss  # noqa: E402

SEQ, WIDTH, HEADS = 16, 32, 2


class GPTWithLoss(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.gpt = TinyGPT(width=WIDTH, layers=2, heads=HEADS, max_seq_len=SEQ, dropout=dropout)
        # True: forward returns (logits, loss), a model that needs attach(..., loss_from_output=...).
        self.returns_prediction = False

    def forward(self, tokens, targets):
        if self.returns_prediction:
            logits = self.gpt(tokens)
            return logits, cross_entropy(logits, targets)
        return lm_loss(self.gpt, tokens, targets)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.token, self.position = nn.Embedding(256, WIDTH), nn.Embedding(SEQ, WIDTH)

    def forward(self, tokens):
        return self.token(tokens) + self.position(torch.arange(tokens.shape[1]))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.out = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 256, bias=False)

    def forward(self, x):
        return self.out(self.norm(x))


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def ds_config(a):
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": a.gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": not a.fused}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": a.stage},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "critical_sharpness": {"enabled": True, "interval": a.interval, "micro_batches": a.micro_batches,
                               "log_file": a.log_file, "reuse_training_loss": a.reuse_training_loss,
                               "write": a.write,
                               **({"modules": "default", "modules_interval": 1} if a.modules else {}),
                               # The guard at every measured step, aiming far below the critical lr.
                               **({"guard": a.guard, "guard_ratio": 1e-6, "guard_target": 1e-3} if a.guard else {})},
    }
    if a.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif a.dtype == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": a.scale_power,
                          "loss_scale_window": 1000}
    if a.bf16_optimizer:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if a.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if a.persist is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = a.persist
    if a.csv_dir:
        config["csv_monitor"] = {"enabled": True, "output_path": a.csv_dir, "job_name": "probe"}
    return config


def build(a):
    torch.manual_seed(0)
    if a.pipeline:
        layers = [Embed(), Block(WIDTH, HEADS, a.dropout), Block(WIDTH, HEADS, a.dropout), Head()]
        model = PipelineModule(layers=layers, num_stages=2, loss_fn=cross_entropy, partition_method="uniform")
    else:
        model = GPTWithLoss(a.dropout)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                      config=ds_config(a))
    if a.frozen_block:  # a submodule the user keeps in eval mode (its dropout off) while the rest trains
        engine.module.gpt.blocks[0].eval()
    return engine


def batches(a, rank):
    # Pipeline stages must read the same samples; data-parallel ranks read their own.
    seed = 100 if a.pipeline else 100 + rank
    return ByteBatches(embedded_corpus(), batch_size=4, seq_len=SEQ, seed=seed)


def full_params(engine):
    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def state(engine):
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {
        "params": full_params(engine),
        "masters": [m.detach().clone() for m, _ in master_layout(engine).pairs()],
        "optimizer": [t.clone() for s in base.state.values() for t in s.values() if isinstance(t, torch.Tensor)],
        "loss_scale": [torch.tensor(float(getattr(engine.optimizer, "loss_scale", None) or 0.0))],
        "rng": [torch.get_rng_state()],
    }


def train_step(engine, a, data):
    """One optimizer step; returns the mean training loss of its micro-batches on this rank."""
    if a.pipeline:
        return float(engine.train_batch(data))
    losses = []
    for _ in range(a.gas):
        tokens, targets = next(data)
        loss = engine(tokens, targets)
        engine.backward(loss)
        losses.append(loss.detach().double())
        engine.step()
    return losses


def mean_over_ranks(local_losses, engine, micro_batches):
    """The training loss of the probed micro-batches, reduced exactly as the backend reduces."""
    total = torch.zeros((), dtype=torch.float64)
    for loss in local_losses[:micro_batches]:
        total += loss
    value = total / len(local_losses[:micro_batches])
    ds_comm.all_reduce(value, group=engine.data_parallel_group)
    value /= ds_comm.get_world_size(group=engine.data_parallel_group)
    return value.item()


def megatron_forward_backward(*, forward_step_func, data_iterator, model, num_microbatches, seq_length,
                               micro_batch_size, decoder_seq_length=None, forward_only=False):
    """Megatron-DeepSpeed's forward_backward_no_pipelining with --deepspeed, reduced to what it does
    with a DeepSpeed engine: forward_step_func per micro-batch, engine.backward, the accumulation
    boundary set by hand, one loss dict per micro-batch."""
    engine = model[0]
    reported = []
    for micro in range(num_microbatches):
        if not forward_only:
            engine.set_gradient_accumulation_boundary(micro == num_microbatches - 1)
        output, loss_func = forward_step_func(data_iterator, engine)
        loss, report = loss_func(output)
        if not forward_only:
            engine.backward(loss)
        reported.append(report)
    return reported


def megatron_forward_step(data_iterator, model):
    tokens, targets = next(data_iterator)
    loss = model(tokens, targets)

    def loss_func(output):
        averaged = output.detach().clone()  # average_losses_across_data_parallel_group
        ds_comm.all_reduce(averaged, group=model.data_parallel_group)
        return output, {"lm loss": averaged / ds_comm.get_world_size(group=model.data_parallel_group)}

    return loss, loss_func


def megatron_train_step(engine, a, data):
    """Megatron-DeepSpeed's train_step without pipeline parallelism, with the patch's record()."""
    reported = megatron_forward_backward(
        forward_step_func=megatron_forward_step, data_iterator=megatron_deepspeed.record(data), model=[engine],
        num_microbatches=a.gas, seq_length=SEQ, micro_batch_size=4)
    engine.step()
    return reported


def reference_run(a, rank):
    engine = build(a)
    data = batches(a, rank)
    for _ in range(a.steps):
        if a.megatron_deepspeed:
            megatron_train_step(engine, a, data)
        else:
            train_step(engine, a, data)
    reference = state(engine)
    checks = {}
    if not a.pipeline:
        # One more step with the backend driven by hand, in each write mode on the same step.
        backends = {mode: DeepSpeedBackend(engine, engine_forward_loss(engine), write=mode) for mode in ("auto", "sharded")}
        for backend in backends.values():
            backend.micro_batch_counts[None] = a.gas
        before = full_params(engine)
        for micro in range(a.gas):  # one step() at the boundary, which works in either loop style
            tokens, targets = next(data)
            for backend in backends.values():
                backend.batches.append(((tokens, targets), {}))
            engine.set_gradient_accumulation_boundary(micro == a.gas - 1)
            engine.backward(engine(tokens, targets))
        # auto with a budget that local writes do not fit writes sharded
        backends["auto, budget 0 MiB"] = DeepSpeedBackend(engine, engine_forward_loss(engine), write="auto",
                                                          write_memory_budget_mib=0.0)
        for backend in backends.values():
            backend.snapshot()
        engine.step()
        checks["budget_writes_locally"] = backends.pop("auto, budget 0 MiB").writes_locally
        try:
            DeepSpeedBackend(engine, engine_forward_loss(engine), write="local")
            checks["local_refused"] = None
        except ValueError as error:
            checks["local_refused"] = str(error)
        after = full_params(engine)
        local, sharded = backends["auto"], backends["sharded"]
        checks["after_step"] = local.after_step()
        checks["sharded_after_step"] = sharded.after_step()
        if checks["after_step"] is not None:  # an fp16 overflow skipped the step: nothing to write
            local.restore()
            sharded.restore()
            engine.destroy()
            return reference, checks
        # Far along the step the local line follows the fp32 step: within the rounding of θ_{t+1}
        # and of the trial point of the sharded write, also where the bf16 endpoints are equal.
        sharded.write(8.0)
        far = full_params(engine)
        sharded.write(1.0)
        local.write(8.0)
        checks["local"] = local._local is not None
        checks["local_far_ulps"] = max(ulps_apart(p, q, r) for p, q, r in zip(full_params(engine), far, after))
        checks.update(hand_checks(a, engine, local, before, after))
        checks["sharded"] = {key: value for key, value in hand_checks(a, engine, sharded, before, after).items()
                             if key != "groups"}
        checks.update(commit_checks(engine, a, data, local))
    engine.destroy()
    return reference, checks


def hand_checks(a, engine, backend, before, after):
    """s = 1, s = 0, s = 1/2 and restore through one backend, against the gathered params."""
    backend.write(1.0)
    checks = {"s1_is_step": all(torch.equal(p, q) for p, q in zip(full_params(engine), after))}
    backend.write(0.0)
    checks["s0_is_before"] = all(torch.equal(p, q) for p, q in zip(full_params(engine), before))
    checks["repeatable_loss"] = backend.loss(None) == backend.loss(None)  # same dropout masks
    backend.write(0.5)
    checks["s_half_moves"] = not all(torch.equal(p, q) for p, q in zip(full_params(engine), after))
    if a.modules:
        # One group at s = 1, every other parameter exactly at θ_t, through the partitions.
        names = backend.parameter_names()
        checks["groups"] = list(default_groups(names))
        group = default_groups(names)["layer_1"]
        backend.select_group(group)
        backend.write(1.0)
        in_group = [name in group for name, _ in engine.module.named_parameters()]
        checks["group_moves_alone"] = all(torch.equal(p, q if moved else r) for p, q, r, moved in
                                          zip(full_params(engine), after, before, in_group))
        backend.select_group(None)
    backend.restore()
    if hasattr(engine.optimizer, "persistent_parameters"):
        # ZeRO-3 as its own step leaves it: the persistent params gathered, every other one released
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        checks["zero3_state"] = all((p.ds_status == ZeroParamStatus.AVAILABLE) == bool(p.ds_persist)
                                    for p in engine.module.parameters())
    checks["restored"] = all(torch.equal(p, q) for p, q in zip(full_params(engine), after))
    return checks


class Fp64Reference:
    """L(θ_t + s·Δθ) in fp64 from the full fp32 masters of one step, on this rank's batch,
    averaged over the data-parallel ranks as the probe's loss is (every rank calls it alike)."""

    def __init__(self, engine, theta_t, theta_next, batch):
        with torch.random.fork_rng(devices=[]):  # the training's RNG stays where it is
            self.model = GPTWithLoss(0.0).double()
        self.theta_t = [t.double() for t in theta_t]
        self.delta = [n.double() - t for n, t in zip(theta_next, self.theta_t)]
        self.batch, self.group = batch, engine.data_parallel_group
        self.baseline = self.loss(0.0)

    @torch.no_grad()
    def loss(self, s):
        for param, start, delta in zip(self.model.parameters(), self.theta_t, self.delta):
            param.copy_(start + s * delta)
        value = self.model(*self.batch).reshape(1)
        ds_comm.all_reduce(value, group=self.group)
        return value.item() / ds_comm.get_world_size(group=self.group)

    def first_crossing(self, low, high):
        return first_crossing(self.loss, self.baseline, low, high)


def full_masters(engine):
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]


def fp64_errors(engine, record, theta_t, theta_next, batches):
    """|λ_c / λ_c(fp64) − 1| of each converged search of a record (the step's batch, held-out)."""
    errors = []
    for task, result in ((None, record), *record["relative"].items()):
        if result["status"] != "converged":
            continue
        reference = Fp64Reference(engine, theta_t, theta_next, batches[task])
        lr = record["lr"]
        truth = reference.first_crossing(result["resolution_floor_lr"] / lr / 4, 4 * result["bracket"][1] / lr)
        errors.append([task, None if truth is None else abs(result["critical_lr"] / lr / truth - 1)])
    return errors


def commit_checks(engine, a, data, backend):
    """One more step, shortened to a quarter by the guard's commit() (of layer_1 alone with
    --modules): the gathered params are the trial point s = 1/4 (the group's; θ_{t+1} elsewhere), this
    rank's master partition holds lerp(θ_t, θ_{t+1}, 1/4) exactly, and the optimizer's state is what
    the real step left."""
    layout = master_layout(engine)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)

    def moments():
        return [t.clone() for s in base.state.values() for t in s.values() if isinstance(t, torch.Tensor)]

    for micro in range(a.gas):
        tokens, targets = next(data)
        engine.set_gradient_accumulation_boundary(micro == a.gas - 1)
        engine.backward(engine(tokens, targets))
    theta_t = [m.detach().clone() for m, _ in layout.pairs()]
    backend.snapshot()
    engine.step()
    skipped = backend.after_step()
    if skipped is not None:  # an fp16 overflow: the test sees this key instead of the commit's
        backend.restore()
        return {"commit_step_skipped": skipped}
    after, state_after = full_params(engine), moments()
    theta_next = [m.detach().clone() for m, _ in layout.pairs()]
    group = default_groups(backend.parameter_names())["layer_1"] if a.modules else None
    backend.write(0.25)
    quarter = full_params(engine)
    backend.commit(0.25, group)
    backend.restore()
    in_group = [group is None or name in group for name, _ in engine.module.named_parameters()]
    checks = {"committed": all(torch.equal(p, q if moved else r) for p, q, r, moved in
                               zip(full_params(engine), quarter, after, in_group)),
              "commit_keeps_optimizer_state": all(torch.equal(x, y) for x, y in zip(moments(), state_after))}
    if group is None:
        checks["masters_committed"] = all(torch.equal(m, torch.lerp(old, new, 0.25)) for (m, _), old, new
                                          in zip(layout.pairs(), theta_t, theta_next))
    return checks


def probe_run(a, rank, write):
    a.write = write
    engine = build(a)
    held_out = next(ByteBatches(embedded_corpus(), batch_size=4, seq_len=SEQ, seed=7))
    fault = InjectedFault(a.fail_at)
    if a.megatron_deepspeed:
        # Without our flags the ds_config's critical_sharpness section (interval 1, same micro-batches) applies.
        flags = [] if a.from_ds_config else ["--critical-sharpness-interval", "1",
                                              "--critical-sharpness-micro-batches", str(a.micro_batches or a.gas)]
        args = megatron_deepspeed.add_critical_sharpness_args(argparse.ArgumentParser()).parse_args(flags)
        args.deepspeed, args.seq_length, args.micro_batch_size, args.decoder_seq_length = True, SEQ, 4, None
        sharpness = megatron_deepspeed.attach([engine], megatron_forward_step, args,
                                              lambda: megatron_forward_backward)
        sharpness.probe.loggers.clear()
    else:
        sharpness = attach(engine, loggers=None if a.csv_dir else [], relative_batches={"held-out": [held_out]},
                           loss_from_output=fault.wrap(loss_of))
    snapshot_runs_out_of_memory(sharpness.backend, a.snapshot_oom, lambda: fault.current_step)
    drawn = []
    data = (drawn.append(batch) or batch for batch in batches(a, rank))
    records, training_losses, errors = [], [], []
    for step in range(a.steps):
        fault.at_step(step + 1)
        if a.fp64_reference:
            theta_t = full_masters(engine)
        if a.megatron_deepspeed:
            reported = megatron_train_step(engine, a, data)
            training_losses.append(megatron_deepspeed.mean_reported_loss(reported[:sharpness.micro_batches]).item())
        elif a.pipeline:
            training_losses.append(train_step(engine, a, data))
        else:
            training_losses.append(mean_over_ranks(train_step(engine, a, data), engine, sharpness.micro_batches))
        measurement = sharpness.last_measurement
        sharpness.last_measurement = None
        records.append(None if measurement is None else measurement.to_dict())
        if a.fp64_reference and measurement is not None:
            errors += fp64_errors(engine, records[-1], theta_t, full_masters(engine),
                                  {None: drawn[-1], "held-out": held_out})
    probed = state(engine)
    probed["consistent"] = [torch.tensor(all(torch.equal(target, master.to(target.dtype))
                                             for master, target in master_layout(engine).pairs()))]
    probed["lr_after"] = [torch.tensor(float(engine.get_lr()[0]), dtype=torch.float64)]
    optimizer = type(engine.optimizer).__name__
    sharpness.detach()
    mistake = model_output_mistake(engine, data) if a.mistake and write == a.writes[0] else None
    engine.destroy()
    return probed, records, training_losses, optimizer, errors, mistake


def model_output_mistake(engine, data):
    """One more step with the model returning (logits, loss) and the probe attached without
    loss_from_output: a mistake of the setup, which must raise on every rank at the first
    measurement (not be recorded as failed), with θ_{t+1} in place."""
    engine.module.returns_prediction = True
    sharpness = attach(engine, SharpnessConfig(interval=1), loggers=[])
    real_step, after_step = sharpness._original, []

    def step_and_keep_params(*args, **kwargs):
        result = real_step(*args, **kwargs)
        after_step.extend(full_params(engine))
        return result

    sharpness._original = step_and_keep_params
    tokens, targets = next(data)
    engine.backward(engine(tokens, targets)[1])
    try:
        engine.step()
        raised = None
    except Exception as error:
        raised = f"{type(error).__name__}: {error}"
    in_place = bool(after_step) and all(torch.equal(p, q) for p, q in zip(full_params(engine), after_step))
    sharpness.detach()
    return {"raised": raised, "params_are_the_step": in_place, "measured": sharpness.last_measurement is not None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--bf16-optimizer", action="store_true")
    parser.add_argument("--gas", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=None)
    parser.add_argument("--persist", type=int, default=None)
    parser.add_argument("--scale-power", type=int, default=8)
    parser.add_argument("--pipeline", action="store_true")
    parser.add_argument("--megatron-deepspeed", action="store_true",
                        help="train as Megatron-DeepSpeed's train_step does, with our patch's three calls")
    parser.add_argument("--from-ds-config", action="store_true",
                        help="with --megatron-deepspeed: no flags, switch the probe on from the ds_config")
    parser.add_argument("--fused", action="store_true", help="DeepSpeed's FusedAdam instead of torch's AdamW")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--reuse-training-loss", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fp64-reference", action="store_true",
                        help="(gas 1) compare every converged search with an fp64 reference on the same state")
    parser.add_argument("--writes", nargs="+", default=["auto"], choices=["auto", "local", "sharded"],
                        help="write modes of the probe runs (one run each; the first is reported in full)")
    parser.add_argument("--csv-dir", default=None, help="use the default loggers, with DeepSpeed's CSV monitor")
    parser.add_argument("--log-file", default=None)
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--modules", action="store_true", help="the per-module breakdown at every measurement")
    parser.add_argument("--frozen-block", action="store_true", help="the first block in eval mode throughout")
    parser.add_argument("--mistake", action="store_true",
                        help="after the run, one step with a model returning (logits, loss) and no loss_from_output")
    parser.add_argument("--guard", default=None, choices=["shorten", "lr"], help="the guard, firing at every measurement")
    parser.add_argument("--fail-at", default=None, metavar="RANK:STEP:CALL[:nan]",
                        help="rank RANK raises torch.OutOfMemoryError in its CALL-th probe loss of step STEP")
    parser.add_argument("--snapshot-oom", default=None, metavar="RANK:STEP",
                        help="rank RANK runs out of memory while the probe snapshots θ_t at step STEP")
    a = parser.parse_args()

    torch.set_num_threads(1)
    if a.dtype == "fp16":  # the CPU accelerator reports no fp16 support; DeepSpeed's fp16 path runs anyway
        from deepspeed.accelerator import get_accelerator
        get_accelerator().is_fp16_supported = lambda: True
    deepspeed.init_distributed(dist_backend="gloo")
    rank = ds_comm.get_rank()
    a.write = a.writes[0]
    reference, checks = reference_run(a, rank)
    runs = {}
    for write in a.writes:
        probed, records, training_losses, optimizer, errors, mistake = probe_run(a, rank, write)
        equal = {key: len(reference[key]) == len(probed[key]) and all(
            x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(reference[key], probed[key])) for key in reference}
        runs[write] = {"optimizer": optimizer, "bitwise_equal": equal, "records": records,
                       "training_losses": training_losses, "fp64_errors": errors,
                       "masters_match_model": bool(probed["consistent"][0]), "lr_after": probed["lr_after"][0].item()}
        if mistake is not None:
            runs[write]["mistake"] = mistake
    result = {"rank": rank, "checks": checks, **runs[a.writes[0]], "writes": runs}
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as out:
        json.dump(result, out)
    ds_comm.barrier()


if __name__ == "__main__":
    main()
