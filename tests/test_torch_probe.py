import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_sharpness import SharpnessConfig, TorchSharpnessProbe
from megatron_sharpness.backends.pytorch import TorchBackend
from megatron_sharpness.loggers import LogLineLogger


# ---------------------------------------------------------------- quadratic: the analytic case

def quadratic(spectrum, seed):
    """θ ∈ R^n, L = ½ θᵀHθ with H = Q diag(spectrum) Qᵀ, in float64."""
    generator = torch.Generator().manual_seed(seed)
    n = len(spectrum)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    hessian = q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T
    theta = nn.Parameter(torch.randn(n, generator=generator, dtype=torch.float64))
    return theta, hessian, lambda: 0.5 * theta @ hessian @ theta


@pytest.mark.parametrize("spectrum", [
    [1.0, 10.0],
    torch.logspace(0, 3, 20).tolist(),
    [100.0] * 5,
    [0.01, 1000.0, 3.0],
    torch.linspace(0.5, 50.0, 64).tolist(),
])
@pytest.mark.parametrize("lr", [1e-4, 1e-2])
def test_gradient_descent_on_a_quadratic_gives_the_analytic_critical_sharpness(spectrum, lr):
    theta, hessian, loss_fn = quadratic(spectrum, seed=len(spectrum))
    optimizer = torch.optim.SGD([theta], lr=lr)
    probe = TorchSharpnessProbe(theta_module(theta), optimizer, SharpnessConfig(interval=1))
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn().backward()
        grad = theta.grad.detach().clone()
        expected = float(grad @ hessian @ grad / (grad @ grad))  # λ_c = gᵀHg / gᵀg
        measurement = probe.step(loss_fn)
        lo, hi = measurement.task.search.bracket
        assert lo <= 2 / expected <= hi
        assert measurement.critical_sharpness == pytest.approx(expected, rel=1 / 16)


def theta_module(*params):
    module = nn.Module()
    for index, param in enumerate(params):
        module.register_parameter(f"p{index}", param)
    return module


def test_relative_task_is_searched_along_the_same_direction_with_its_own_answer():
    theta, hessian, loss_fn = quadratic([1.0, 10.0, 100.0], seed=0)
    other_hessian = hessian @ hessian  # same eigenvectors, so the step also descends on task 2

    def other_loss():
        return 0.5 * theta @ other_hessian @ theta

    optimizer = torch.optim.SGD([theta], lr=1e-3)
    probe = TorchSharpnessProbe(theta_module(theta), optimizer, SharpnessConfig(interval=1))
    probe.add_relative_task("other", other_loss)
    optimizer.zero_grad()
    loss_fn().backward()
    direction = theta.grad.detach().clone()
    other_grad = other_hessian @ theta.detach()
    # L2(θ − ηd) rises above L2(θ) once η > 2·dᵀ∇L2 / dᵀH2 d.
    expected_critical_lr = float(2 * direction @ other_grad / (direction @ other_hessian @ direction))
    measurement = probe.step(loss_fn)
    relative = measurement.relative["other"].search
    assert relative.critical_lr == pytest.approx(expected_critical_lr, rel=1 / 16)
    assert measurement.critical_lr != pytest.approx(relative.critical_lr, rel=0.2)


# ---------------------------------------------------------------- a small network

def mlp(seed=0, dropout=0.0, batch_norm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 32)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 3)]
    return nn.Sequential(*layers)


def regression_batch(step, size=32):
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(size, 8, generator=generator)
    targets = torch.stack([inputs[:, :4].sum(1), torch.sin(inputs[:, 4]), inputs[:, 5] * inputs[:, 6]], 1)
    return inputs, targets


def test_critical_lr_lies_in_the_bracket_of_a_dense_scan():
    # float64, so that the scan is not decided by rounding noise when Adam's step barely descends
    model = mlp().double()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=3))
    converged = uphill = 0
    for step in range(1, 31):
        inputs, targets = (t.double() for t in regression_batch(step))
        for net, opt in ((model, optimizer), (twin, twin_optimizer)):
            opt.zero_grad()
            F.mse_loss(net(inputs), targets).backward()
        theta_t = [p.detach().clone() for p in twin.parameters()]
        twin_optimizer.step()
        theta_next = [p.detach().clone() for p in twin.parameters()]
        measurement = probe.step(lambda: F.mse_loss(model(inputs), targets))
        if measurement is None:
            continue

        def scan_loss(eta):  # θ_t − η·Δθ with Δθ = (θ_t − θ_{t+1}) / η_t, written independently of lerp
            scanned = copy.deepcopy(twin)
            with torch.no_grad():
                for p, old, new in zip(scanned.parameters(), theta_t, theta_next):
                    p.copy_(old - (eta / 1e-2) * (old - new))
                return F.mse_loss(scanned(inputs), targets).item()

        search = measurement.task.search
        baseline = scan_loss(0.0)
        assert baseline == search.baseline_loss
        if not search.converged:  # the step goes uphill on its own batch: the loss rises at once
            assert search.bracket[0] == 0.0
            assert all(scan_loss(search.bracket[1] * k / 50) > baseline for k in range(1, 51))
            uphill += 1
            continue
        etas = [measurement.critical_lr * 3 * k / 600 for k in range(1, 601)]
        first_rise = next(i for i, eta in enumerate(etas) if scan_loss(eta) > baseline)
        scan_lo, scan_hi = (etas[first_rise - 1] if first_rise else 0.0), etas[first_rise]
        lo, hi = search.bracket
        assert lo <= scan_hi and scan_lo <= hi, (lo, hi, scan_lo, scan_hi)
        assert abs(measurement.critical_lr / scan_hi - 1) <= 1 / 16 + 0.01
        converged += 1
    assert converged >= 7 and converged + uphill == 10


# ---------------------------------------------------------------- s = 1 is the real step

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=3e-3),
    "adamw-weight-decay": lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "two-groups": lambda params: torch.optim.AdamW(
        [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 1e-4, "weight_decay": 0.0}],
        lr=1e-3, weight_decay=0.05),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 0.05])
def test_step_multiple_one_reproduces_the_real_step_exactly(name, clip):
    model = mlp()
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    backend = TorchBackend(model, optimizer)
    for step in range(1, 4):
        inputs, targets = regression_batch(step)
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        grads = [p.grad.clone() for p in model.parameters()]
        theta_t = [p.detach().clone() for p in model.parameters()]
        backend.snapshot()
        optimizer.step()
        theta_next = [p.detach().clone() for p in model.parameters()]
        assert backend.after_step() is None
        backend.write(0.37)
        assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), theta_next))
        backend.write(0.0)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta_t))
        backend.write(1.0)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta_next))
        backend.write(2.5)
        backend.restore()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta_next))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


# ---------------------------------------------------------------- the probe does not perturb training

def train(optimizer_name, probe_on, steps=20, dropout=0.2, batch_norm=True, log_file=None):
    model = mlp(seed=3, dropout=dropout, batch_norm=batch_norm)
    optimizer = OPTIMIZERS[optimizer_name](list(model.parameters()))
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    probe = None
    if probe_on:
        probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1, log_file=log_file))
        held_out = regression_batch(-1)
        probe.add_relative_task("held-out", lambda: F.mse_loss(model(held_out[0]), held_out[1]))
    torch.manual_seed(11)
    measurements = []
    for step in range(1, steps + 1):
        inputs, targets = regression_batch(step)
        optimizer.zero_grad()
        loss = F.mse_loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if probe is None:
            optimizer.step()
        else:
            measurements.append(probe.step(lambda: F.mse_loss(model(inputs), targets)))
        schedule.step()
    if probe is not None:
        probe.close()
    state = {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
    }
    return state, measurements


def assert_bitwise_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{index}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_probing_every_step_leaves_training_bitwise_identical(name, tmp_path):
    reference, _ = train(name, probe_on=False)
    probed, measurements = train(name, probe_on=True, log_file=str(tmp_path / "s.jsonl"))
    assert_bitwise_equal(reference, probed)
    assert len(measurements) == 20
    assert all(m.skipped is None and m.task.search.converged for m in measurements)
    # Along the training step a held-out batch may go uphill: then the search ends capped at lo = 0.
    relative = [m.relative["held-out"].search for m in measurements]
    assert all(r.converged or r.bracket[0] == 0.0 for r in relative)
    assert sum(r.converged for r in relative) >= 10
    # Warm starts: after the first step a search should need far fewer forwards than a cold one.
    assert sorted(m.task.forwards for m in measurements)[10] <= 8


def test_dropout_sees_the_same_mask_at_every_trial_point():
    model = mlp(dropout=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1))
    inputs, targets = regression_batch(0)
    F.mse_loss(model(inputs), targets).backward()
    baselines = []

    def loss_fn():
        value = F.mse_loss(model(inputs), targets)
        baselines.append(value.item())
        return value

    measurement = probe.step(loss_fn)
    # loss_fn ran at s = 0 first; with a fresh dropout mask per call the baseline would be noise.
    assert measurement.task.search.baseline_loss == baselines[0]
    backend = probe.backend
    backend.snapshot()
    backend.after_step()
    backend.loss_fns = {None: loss_fn}
    assert backend.loss(None) == backend.loss(None)
    backend.restore()


# ---------------------------------------------------------------- skipped steps and output

def test_a_step_that_changes_nothing_is_reported_as_skipped(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    log_file = tmp_path / "sharpness.jsonl"
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1, log_file=str(log_file)))
    inputs, targets = regression_batch(0)
    F.mse_loss(model(inputs), targets).backward()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    skipped = probe.step(lambda: calls.append(1) or 0.0, optimizer_step=lambda: None)
    assert skipped.skipped and "changed no parameter" in skipped.skipped
    assert skipped.critical_sharpness is None and not calls
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    optimizer.param_groups[0]["lr"] = 0.0
    assert probe.step(lambda: 0.0).skipped == "lr is 0.0"
    probe.close()
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["skipped"] and r["critical_lr"] is None for r in records)


def test_non_finite_baseline_is_skipped_and_parameters_restored():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1))
    inputs, targets = regression_batch(0)
    F.mse_loss(model(inputs), targets).backward()
    measurement = probe.step(lambda: torch.tensor(math.nan))
    assert "nan" in measurement.skipped
    reference = mlp()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    F.mse_loss(reference(inputs), targets).backward()
    reference_optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def test_nan_at_a_trial_point_counts_as_a_rise():
    theta, _, loss_fn = quadratic([1.0, 4.0], seed=1)
    optimizer = torch.optim.SGD([theta], lr=1e-2)
    probe = TorchSharpnessProbe(theta_module(theta), optimizer, SharpnessConfig(interval=1))
    theta_t = theta.detach().clone()
    loss_fn().backward()
    step = theta.grad.detach() * 1e-2

    def diverging_loss():  # NaN once the trial point is beyond 3 × the real step
        if torch.dot(theta_t - theta.detach(), step) > 3 * torch.dot(step, step):
            return torch.tensor(math.nan)
        return -torch.dot(theta_t - theta.detach(), step)

    measurement = probe.step(diverging_loss)
    lo, hi = measurement.task.search.bracket
    assert measurement.task.search.converged and lo <= 3e-2 <= hi
    assert any(math.isnan(loss) for _, loss in measurement.task.search.evaluations)


def test_capped_search_is_reported_as_not_converged(tmp_path):
    theta, _, _ = quadratic([1.0, 4.0], seed=2)
    optimizer = torch.optim.SGD([theta], lr=1e-2)
    log_file = tmp_path / "s.jsonl"
    probe = TorchSharpnessProbe(theta_module(theta), optimizer,
                                SharpnessConfig(interval=1, max_search=6, log_file=str(log_file)))
    theta.grad = torch.ones_like(theta)
    measurement = probe.step(lambda: theta.sum())  # a linear loss falls forever along the step
    assert not measurement.task.search.converged and measurement.status == "capped"
    assert measurement.critical_lr is None and measurement.task.forwards == 7
    assert "(never rose)" in measurement.log_fields()
    probe.close()
    record = json.loads(log_file.read_text())
    assert record["converged"] is False and record["critical_lr"] is None
    assert record["status"] == "capped" and record["bracket"][1] is None and record["step_raised_loss"] is False
    # the loss fell at every evaluated lr: the largest of them bounds η_c from below
    assert record["bracket"][0] == max(lr for lr, _ in record["evaluations"]) > 0.32


def test_jsonl_record_and_log_line(tmp_path):
    log_file = tmp_path / "sub" / "sharpness.jsonl"
    lines = []
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=2, log_file=str(log_file)))
    probe.probe.loggers.append(LogLineLogger(lines.append))
    held_out = regression_batch(-1)
    probe.add_relative_task("held-out", lambda: F.mse_loss(model(held_out[0]), held_out[1]))
    for step in range(1, 5):
        inputs, targets = regression_batch(step)
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        probe.step(lambda: F.mse_loss(model(inputs), targets))
    probe.close()
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    required = {"step", "lr", "critical_lr", "critical_sharpness", "lr_over_critical_lr", "forwards",
                "bracket", "converged", "probe_seconds", "relative", "skipped"}
    for record in records:
        assert required <= record.keys()
        assert record["skipped"] is None and record["converged"] is True
        assert record["critical_sharpness"] == pytest.approx(2 / record["critical_lr"])
        assert record["lr_over_critical_lr"] == pytest.approx(record["lr"] / record["critical_lr"])
        lo, hi = record["bracket"]
        assert lo < record["critical_lr"] < hi
        assert record["forwards"] == 1 + len(record["evaluations"]) + record["noise_forwards"]
        relative = record["relative"]["held-out"]
        assert {"critical_lr", "critical_sharpness", "forwards", "bracket", "converged"} <= relative.keys()
    assert len(lines) == 2 and lines[0].startswith(" iteration        2 | critical sharpness: ")
    assert "| critical lr: " in lines[0] and "| lr/critical lr: " in lines[0]
    assert "| relative sharpness held-out: " in lines[0] and lines[0].endswith(" |")


def test_relative_task_names_must_be_new_and_non_empty():
    model = mlp()
    probe = TorchSharpnessProbe(model, torch.optim.SGD(model.parameters(), lr=0.1))
    probe.add_relative_task("a", lambda: 0.0)
    for bad in ("a", "", None):
        with pytest.raises(ValueError, match="relative task name"):
            probe.add_relative_task(bad, lambda: 0.0)


def test_non_scalar_loss_is_a_clear_error():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1))
    inputs, targets = regression_batch(0)
    F.mse_loss(model(inputs), targets).backward()
    with pytest.raises(ValueError, match="must return a scalar loss"):
        probe.step(lambda: F.mse_loss(model(inputs), targets, reduction="none"))


def test_a_step_skipped_by_the_amp_grad_scaler_is_not_measured():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1))
    inputs, targets = regression_batch(0)
    scaler.scale(F.mse_loss(model(inputs), targets)).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    before = [p.detach().clone() for p in model.parameters()]
    measurement = probe.step(lambda: F.mse_loss(model(inputs), targets),
                             optimizer_step=lambda: scaler.step(optimizer))
    scaler.update()
    assert measurement.skipped and "changed no parameter" in measurement.skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**3
    optimizer.zero_grad()
    scaler.scale(F.mse_loss(model(inputs), targets)).backward()
    measurement = probe.step(lambda: F.mse_loss(model(inputs), targets),
                             optimizer_step=lambda: scaler.step(optimizer))
    assert measurement.skipped is None and measurement.task.search.converged


def test_log_fields_of_capped_searches_give_the_known_bound():
    from megatron_sharpness.measurement import Measurement, TaskMeasurement
    from megatron_sharpness.search import critical_lr_search

    never_rose = TaskMeasurement(critical_lr_search(lambda s: -s, 0.0, lr=0.5, max_search=3, method="paper"))
    # descent (slope −1) whose crossing lies below the floor 1/8: L rises from s = 1/8 on
    below_floor = TaskMeasurement(critical_lr_search(lambda s: -s + 100 * s * s, 0.0, lr=0.5,
                                                     resolution_floor=0.125))
    uphill = TaskMeasurement(critical_lr_search(lambda s: s + s * s, 0.0, lr=0.5))
    fields = Measurement(step=1, lr=0.5, task=never_rose,
                         relative={"b": below_floor, "c": uphill}).log_fields()
    # never rose up to η = 0.5·4 = 2: η_c > 2, λ_c < 1; rose at the floor η = 0.5/8: λ_c > 32
    assert "critical sharpness: < 1.0000E+00 (never rose) | critical lr: > 2.0000E+00 (never rose) |" in fields
    assert "relative sharpness b: > 3.2000E+01 (unresolved) |" in fields
    # slope of L(θ_t − η·Δθ) in η: (L(1) − L(−1))/2 per step multiple, / 0.5 per lr
    assert "relative sharpness c: ascent (slope +2.000E+00) |" in fields
    assert "step raised loss: no |" in fields


# ---------------------------------------------------------------- parameters are read at each step

def twin_runs(change):
    """Two identical models trained 2 steps with Adam; `change(model, optimizer)` runs after step 1.
    The first probe is built before the change, the second after it: both must measure step 2 alike."""
    results = []
    for build_after_change in (False, True):
        model = mlp(seed=5)
        first, last = model[0], model[-1]
        last.weight.requires_grad_(False)
        optimizer = torch.optim.Adam(first.parameters(), lr=3e-3)
        optimizer.add_param_group({"params": [last.weight], "lr": 3e-3})
        probe = None if build_after_change else TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=2))
        for step in (1, 2):
            if step == 2:
                change(model, optimizer)
                if build_after_change:
                    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1))
            inputs, targets = regression_batch(step)
            optimizer.zero_grad()
            F.mse_loss(model(inputs), targets).backward()
            if probe is None:
                optimizer.step()
            else:
                measurement = probe.step(lambda: F.mse_loss(model(inputs), targets))
        results.append(measurement)
    return results


def add_bias_group(model, optimizer):
    optimizer.add_param_group({"params": [model[-1].bias], "lr": 1e-2})


def unfreeze_last_weight(model, optimizer):
    model[-1].weight.requires_grad_(True)


@pytest.mark.parametrize("change", [add_bias_group, unfreeze_last_weight])
def test_a_param_group_added_or_a_param_unfrozen_later_moves_along_the_step(change):
    built_before, built_after = twin_runs(change)
    assert built_after.task.search.converged
    assert built_before.task.search.evaluations == built_after.task.search.evaluations
    assert built_before.critical_sharpness == built_after.critical_sharpness


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_reusing_the_training_loss_saves_the_baseline_forward_and_changes_nothing_else(dropout, recwarn):
    measured, probes = {}, {}
    for reuse in (False, True):
        model = mlp(seed=7, dropout=dropout, batch_norm=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=2))
        measurements = []
        for step in range(1, 9):
            inputs, targets = regression_batch(step)
            optimizer.zero_grad()
            loss = F.mse_loss(model(inputs), targets)
            loss.backward()
            measurement = probe.step(lambda: F.mse_loss(model(inputs), targets),
                                     training_loss=loss.detach() if reuse else None)
            if measurement is not None:
                measurements.append(measurement)
        measured[reuse], probes[reuse] = measurements, probe.probe
    if dropout:
        # The training forward drew other dropout masks than the probe's: the first measurement's
        # check finds the losses differ, and the probe evaluates L(θ_t) itself from then on.
        assert probes[True].training_loss_matches is False
        reused_flags = [m.to_dict()["baseline_reused"] for m in measured[True]]
        assert reused_flags == [False] * len(measured[True])
    else:
        assert probes[True].training_loss_matches is True
    warned = [w for w in recwarn if "differs from a probe forward" in str(w.message)]
    assert len(warned) == (1 if dropout else 0)
    first = True
    for plain, reused in zip(measured[False], measured[True]):
        assert reused.task.search.baseline_loss == plain.task.search.baseline_loss  # bitwise the same L(θ_t)
        assert reused.task.search.evaluations == plain.task.search.evaluations
        # the first measurement checks the training loss against its own forward
        saved = 0 if first or dropout else 1
        assert reused.task.forwards == plain.task.forwards - saved
        assert reused.to_dict()["baseline_reused"] is bool(saved) and plain.to_dict()["baseline_reused"] is False
        first = False
