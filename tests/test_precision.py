"""bf16 measurements against fp64 references on identical states.

The model keeps fp32 master weights and computes in bf16 (torch.autocast), as LLM training does.
For each measured step θ_t and θ_{t+1} are kept; an fp64 copy of the model evaluates the same
batch at θ_t + s·(θ_{t+1} − θ_t) exactly, which gives the reference crossing (dense scan, then
bisection) and the exact slope (autograd in fp64).
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.data import ByteBatches, embedded_corpus, train_heldout_split
from megatron_sharpness.integrations.pytorch import TorchSharpnessProbe
from megatron_sharpness.testing.reference import first_crossing
from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss

TOL = 1 / 16


def bf16_loss(model, tokens, targets):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return lm_loss(model, tokens, targets)


class Fp64Reference:
    """L(θ_t + s·Δθ) in fp64 on one batch, for the θ_t and θ_{t+1} of one step. loss(model,
    inputs, targets) computes the batch's loss (in the model's dtype)."""

    def __init__(self, model, theta_t, theta_next, tokens, targets, loss=lm_loss):
        self.model = copy.deepcopy(model).double()
        self.theta_t = [p.double() for p in theta_t]
        self.delta = [n.double() - p for n, p in zip(theta_next, self.theta_t)]
        self.tokens = tokens.double() if tokens.is_floating_point() else tokens
        self.targets, self.loss_fn = targets, loss
        self.baseline = self.loss(0.0)

    def _set(self, s):
        with torch.no_grad():
            for param, start, delta in zip(self.model.parameters(), self.theta_t, self.delta):
                param.copy_(start + s * delta)

    def loss(self, s):
        self._set(s)
        with torch.no_grad():
            return self.loss_fn(self.model, self.tokens, self.targets).item()

    def slope(self):
        """dL/ds at s = 0, exactly: ∇L(θ_t)·Δθ."""
        self._set(0.0)
        self.model.zero_grad()
        self.loss_fn(self.model, self.tokens, self.targets).backward()
        return sum((p.grad * d).sum().item() for p, d in zip(self.model.parameters(), self.delta))

    def first_crossing(self, low, high):
        return first_crossing(self.loss, self.baseline, low, high)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def check_against_reference(task, reference, lr):
    """The outcome is right for the fp64 truth on the same state, or honest about its limits.
    Returns |λ_c / λ_c(fp64) − 1| for a converged search, else None."""
    search = task.search
    if task.status == "converged":
        truth = reference.first_crossing(search.resolution_floor / 4, 4 * search.bracket_step_multiple[1])
        assert truth is not None
        assert search.critical_sharpness <= 2 / (search.resolution_floor * lr) * (1 + 1e-12)
        return abs(search.critical_step_multiple / truth - 1)
    elif task.status == "ascent":  # never where the exact slope says the update descends
        assert reference.slope() > 0, search
    elif task.status == "unresolved":
        hi = search.bracket_step_multiple[1]
        if hi is not None:  # λ_c > bound, i.e. the fp64 crossing lies below hi
            truth = reference.first_crossing(hi * 1e-6, hi)
            assert reference.slope() > 0 or (truth is not None and truth <= hi), search
    elif task.status == "noisy":
        # Rounding, not curvature, could have placed the bracket: its slope is off its trend, or the
        # loss noise moves the crossing by more than tol/2 given the exact fp64 slope there too
        # (up to a factor 4: the bf16 slope is as noisy as the bracket's ends).
        lo, hi = search.bracket_step_multiple
        off_trend = not 1 / 3 <= (search.bracket_slope_ratio or 1.0) <= 3
        fp64_slope = (reference.loss(hi) - reference.loss(lo)) / (hi - lo)
        fp64_uncertainty = search.loss_noise / (fp64_slope * (lo + hi) / 2) if fp64_slope > 0 else math.inf
        assert off_trend or fp64_uncertainty > TOL / 8, (search, fp64_uncertainty)
    else:
        assert task.status == "capped"
        lo = search.bracket_step_multiple[0]
        assert reference.first_crossing(search.resolution_floor / 4, lo) is None
    return None


def test_bf16_training_run_with_heldout_agrees_with_fp64():
    torch.manual_seed(0)
    train_text, heldout_text = train_heldout_split(embedded_corpus())
    batches = ByteBatches(train_text, 8, 32, 0)
    heldout = next(ByteBatches(heldout_text, 8, 32, 1))
    model = TinyGPT(width=32, layers=2, heads=2, max_seq_len=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=10), compute_dtype=torch.bfloat16)
    probe.add_relative_task("heldout", lambda: bf16_loss(model, *heldout))
    outcomes = {"converged": 0, "ascent": 0, "unresolved": 0, "capped": 0, "noisy": 0}
    ascents_by_truth, errors = [], []
    for iteration in range(1, 201):
        tokens, targets = next(batches)
        loss = bf16_loss(model, tokens, targets)
        loss.backward()
        measured = iteration % 10 == 0
        if measured:
            theta_t = params(model)
            with torch.no_grad():
                before = bf16_loss(model, tokens, targets).item()
        measurement = probe.step(lambda: bf16_loss(model, tokens, targets))
        optimizer.zero_grad()
        if not measured:
            continue
        with torch.no_grad():
            after = bf16_loss(model, tokens, targets).item()
        assert measurement.task.search.step_raised_loss == (after > before)
        lr = measurement.lr
        theta_next = params(model)
        for task, batch in ((measurement.task, (tokens, targets)), (measurement.relative["heldout"], heldout)):
            reference = Fp64Reference(model, theta_t, theta_next, *batch)
            error = check_against_reference(task, reference, lr)
            if error is not None:
                errors.append(error)
            outcomes[task.status] += 1
            if task is measurement.relative["heldout"]:
                ascents_by_truth.append((reference.slope() > 0, task.status))
    print("errors", sorted(errors), outcomes)
    assert outcomes["converged"] >= 30, outcomes
    # Where L(s) − L(θ_t) stays within the bf16 loss's rounding over a wide range of s the crossing
    # is the rounding's: such searches end noisy, and every number given agrees with fp64 to tol.
    errors.sort()
    assert errors[len(errors) // 2] <= TOL / 4 and errors[-1] <= TOL, errors
    # every held-out update that the exact fp64 slope calls uphill is reported without a λ_c
    assert all(status in ("ascent", "unresolved") for uphill, status in ascents_by_truth if uphill), ascents_by_truth


@pytest.fixture(scope="module")
def state_and_grads():
    torch.manual_seed(1)
    model = TinyGPT(width=32, layers=2, heads=2, max_seq_len=32)
    tokens, targets = next(ByteBatches(train_heldout_split(embedded_corpus())[0], 8, 32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):  # away from initialisation
        optimizer.zero_grad()
        bf16_loss(model, tokens, targets).backward()
        optimizer.step()
    optimizer.zero_grad()
    bf16_loss(model, tokens, targets).backward()
    return model, tokens, targets


def measure_once(model, tokens, targets, lr, initial_guess=1.0):
    grads = [p.grad for p in model.parameters()]
    model = copy.deepcopy(model)  # deepcopy drops .grad
    for param, grad in zip(model.parameters(), grads):
        param.grad = grad.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1, initial_guess=initial_guess),
                                compute_dtype=torch.bfloat16)
    theta_t = params(model)
    measurement = probe.step(lambda: bf16_loss(model, tokens, targets))
    return measurement, Fp64Reference(model, theta_t, params(model), tokens, targets)


@pytest.mark.parametrize("lr", [1e-9, 1e-8, 1e-7, 1e-5, 1e-3, 1e-2])
def test_lr_sweep_in_bf16_is_right_or_honest(state_and_grads, lr):
    measurement, reference = measure_once(*state_and_grads, lr)
    if measurement.skipped is not None:
        assert all(torch.equal(d, torch.zeros_like(d)) for d in reference.delta)  # fp32 could not take the step
        return
    error = check_against_reference(measurement.task, reference, lr)
    assert error is None or error <= 0.1


def test_poisoned_warm_start_in_bf16(state_and_grads):
    honest, reference = measure_once(*state_and_grads, 1e-3)
    assert honest.status == "converged"
    poisoned, _ = measure_once(*state_and_grads, 1e-3,
                               initial_guess=1e-6 * honest.task.search.critical_step_multiple)
    assert poisoned.status == "converged"
    assert check_against_reference(poisoned.task, reference, 1e-3) <= 0.1
    assert all(s >= poisoned.task.search.resolution_floor for s, _ in poisoned.task.search.evaluations if s != 1.0)


def digits(count, seed):
    """8×8 images of ten classes (a fixed template per class plus noise), like sklearn's digits."""
    templates = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return templates[labels] + 0.25 * torch.randn(count, 1, 8, 8, generator=generator), labels


class DigitsCNN(nn.Module):
    """Two convolutions with BatchNorm (train mode: batch statistics, running buffers updated)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.norm2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, images):
        hidden = F.relu(self.norm1(self.conv1(images)))
        return self.head(F.max_pool2d(F.relu(self.norm2(self.conv2(hidden))), 2).flatten(1))


def cnn_loss(model, images, labels):
    return F.cross_entropy(model(images).float(), labels)


def cnn_bf16_loss(model, images, labels):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return cnn_loss(model, images, labels)


def warmup_cosine(step, peak=3e-3, warmup=20, total=200):
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.fixture(scope="module")
def cnn_state():
    """A bf16-trained CNN (fp32 master weights, AdamW with warm-up and cosine) 60 steps in."""
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=warmup_cosine(0))
    for step in range(60):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step)
        optimizer.zero_grad()
        cnn_bf16_loss(model, *digits(64, 100 + step)).backward()
        optimizer.step()
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def cnn_measurements(state, lr, search, steps=1, warm_starts=None):
    """AdamW steps at lr from the trained state, each measured on its batch and a held-out batch,
    with the fp64 references of both on the same θ_t and θ_{t+1}. warm_starts: the probe's state
    entry to start from (poisoned ones, say)."""
    model, heldout = DigitsCNN(), digits(64, 2)
    model.load_state_dict(state[0])
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(copy.deepcopy(state[1]))  # its moment tensors would be shared, and stepped
    for group in optimizer.param_groups:
        group["lr"] = lr
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1, search=search),
                                compute_dtype=torch.bfloat16)
    probe.add_relative_task("heldout", lambda: cnn_bf16_loss(model, *heldout))
    if warm_starts is not None:
        probe.probe.load_state_dict({**probe.probe.state_dict(), "last_critical_lr": warm_starts})
    for step in range(steps):
        batch = digits(64, 1 + 10 * step)
        optimizer.zero_grad()
        cnn_bf16_loss(model, *batch).backward()
        theta_t = params(model)
        measurement = probe.step(lambda: cnn_bf16_loss(model, *batch))
        theta_next = params(model)
        yield measurement, [(task, Fp64Reference(model, theta_t, theta_next, *data, loss=cnn_loss))
                            for task, data in ((measurement.task, batch), (measurement.relative["heldout"], heldout))]


@pytest.mark.parametrize("search", ["fast", "paper"])
@pytest.mark.parametrize("lr", [1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
def test_lr_sweep_on_a_batchnorm_cnn_in_bf16_is_right_or_honest(cnn_state, lr, search):
    # At 1e-9 … 1e-7 the fp32 master moves a few dozen to a few thousand of the 3.9k elements and
    # the bf16 loss is flat to its noise: a crossing placed there by rounding is no number.
    for _, references in cnn_measurements(cnn_state, lr, search):
        for task, reference in references:
            error = check_against_reference(task, reference, lr)
            assert error is None or error <= TOL, (task.search, error)


@pytest.mark.parametrize("poison", [100.0, 0.01])
def test_warm_starts_poisoned_at_the_start_of_a_chain_give_no_wrong_reading(cnn_state, poison):
    # Warm starts ×100 (a schedule jump, an old resumed state) or ×0.01 off the truth, then six
    # measurements: the slope is taken at ±1, not at ±(the warm start), a warm start that led to no
    # number is dropped, and no reading of the chain is off the fp64 truth.
    honest, _ = next(cnn_measurements(cnn_state, 1e-3, "fast"))
    truths = {None: honest.critical_lr, "heldout": honest.relative["heldout"].search.critical_lr or 1e-3 * 5}
    poisoned = [[name, poison * lr] for name, lr in truths.items()]
    converged = 0
    for measurement, references in cnn_measurements(cnn_state, 1e-3, "fast", steps=6, warm_starts=poisoned):
        for task, reference in references:
            error = check_against_reference(task, reference, 1e-3)
            assert error is None or error <= TOL, (measurement.step, task.search, error)
            converged += task.status == "converged"
    assert converged >= 6  # the step's own batch converges at every measurement of the chain
