"""Every public entry point checks its arguments when it is built (or before the real optimizer step),
with one message that names the argument and what is allowed."""

import os
import re
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_sharpness import ConfigError, SharpnessConfig, TorchSharpnessProbe
from megatron_sharpness.testing.launch import run_ranks

WORKERS = os.path.join(os.path.dirname(__file__), "workers")


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def backward(model):
    inputs, targets = torch.randn(16, 4), torch.randn(16, 1)
    F.mse_loss(model(inputs), targets).backward()
    return lambda: F.mse_loss(model(inputs), targets)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_a_dict_config_is_refused_with_the_way_to_build_one():
    model, optimizer = model_and_optimizer()
    with pytest.raises(ConfigError, match=r"config must be a SharpnessConfig, got dict; build one from a mapping "
                                          r"with SharpnessConfig\.from_dict\(config\)"):
        TorchSharpnessProbe(model, optimizer, {"interval": 1})


@pytest.mark.parametrize("model, optimizer, message", [
    (None, None, "model must be a torch.nn.Module"),
    (nn.Linear(2, 2), "sgd", "optimizer must be the training optimizer .* got str"),
])
def test_model_and_optimizer_are_checked(model, optimizer, message):
    with pytest.raises(TypeError, match=message):
        TorchSharpnessProbe(model, optimizer)


@pytest.mark.parametrize("due", [True, False])
def test_a_loss_tensor_instead_of_a_callable_is_refused_before_the_optimizer_step(due):
    model, optimizer = model_and_optimizer()
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1 if due else 2))
    loss = backward(model)()
    before = params(model)
    with pytest.raises(TypeError, match=r"loss_fn must be a callable without arguments .* got Tensor"):
        probe.step(loss)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # no optimizer step ran
    assert probe.iteration == 0
    with pytest.raises(TypeError, match="optimizer_step must be a callable"):
        probe.step(lambda: loss, optimizer_step=optimizer)
    with pytest.raises(TypeError, match="the loss_fn of relative task 'held-out' must be a callable"):
        probe.add_relative_task("held-out", loss)


@pytest.mark.parametrize("value, got", [("0.25", "str"), (None, "NoneType"), (True, "bool")])
def test_a_loss_fn_returning_no_number_fails_at_its_first_call(value, got):
    model, optimizer = model_and_optimizer()
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1))
    backward(model)
    calls = []
    with pytest.raises(TypeError, match=f"the step's loss_fn must return the loss as a scalar tensor or a float, "
                                        f"got {got}"):
        probe.step(lambda: calls.append(1) or value)
    assert len(calls) == 1  # the baseline, before any search
    reference, reference_optimizer = model_and_optimizer()
    backward(reference)
    reference_optimizer.step()
    # the real step ran and θ_{t+1} is back in place
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def test_an_unwritable_log_file_is_named_at_construction(tmp_path):
    model, optimizer = model_and_optimizer()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = str(blocker / "sharpness.jsonl")
    with pytest.raises(ConfigError, match=re.escape(f"log_file='{path}'") + " cannot be opened for appending: Not a directory"):
        TorchSharpnessProbe(model, optimizer, SharpnessConfig(log_file=path))


def test_loggers_must_have_log_and_close():
    model, optimizer = model_and_optimizer()
    with pytest.raises(TypeError, match="every entry of loggers must have log"):
        TorchSharpnessProbe(model, optimizer, loggers=[print])


def test_deepspeed_attach_checks_its_arguments():
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    from megatron_sharpness.integrations.deepspeed import attach

    engine = types.SimpleNamespace(step=lambda: None, optimizer=object())
    with pytest.raises(TypeError, match="engine must be the DeepSpeed engine"):
        attach(nn.Linear(2, 2), SharpnessConfig())
    with pytest.raises(ConfigError, match=r"got dict; build one from a mapping with SharpnessConfig\.from_dict"):
        attach(engine, {"interval": 1})
    with pytest.raises(TypeError, match="loss_from_output must be a callable"):
        attach(engine, SharpnessConfig(), loss_from_output="loss")
    with pytest.raises(TypeError, match=r"relative_batches\['held-out'\] must be a list of batches, got Tensor"):
        attach(engine, SharpnessConfig(), relative_batches={"held-out": torch.zeros(2, 3)})


def test_megatron_core_entry_point_checks_chunks_config_and_micro_batch_counts():
    pytest.importorskip("megatron.core", reason="the megatron extra is not installed")
    [result] = run_ranks([os.path.join(WORKERS, "megatron_bad_input.py")], world_size=1, timeout=180,
                         env={"PYTHONWARNINGS": "ignore"})
    cases = dict(line[len("CASE "):].split(": ", 1) for line in result.output.splitlines() if line.startswith("CASE "))
    assert cases["single-chunk"].startswith(
        "TypeError: critical sharpness: model must be the list of model chunks (one per virtual pipeline stage, "
        "as Megatron's get_model returns it), got DistributedDataParallel; for one chunk pass [model]")
    assert cases["dict-config"].startswith("ConfigError: critical sharpness: config must be a SharpnessConfig, got dict")
    assert cases["record-4-run-1"] == (
        "ValueError: critical sharpness: record(data_iterator, num_microbatches) at iteration 1 expects 4 "
        "micro-batch(es) to replay, but forward_backward_func read only 1 from the iterator of model chunk 0; "
        "pass record() the num_microbatches that forward_backward_func runs")
    assert "PARAMS MOVED: False" in result.output  # refused before the real optimizer step
