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


@pytest.fixture(scope="module")
def megatron_bad_input():
    """One launch of tests/workers/megatron_bad_input.py (2 ranks): {rank: {case: text}} and the outputs."""
    pytest.importorskip("megatron.core", reason="the megatron extra is not installed")
    results = run_ranks([os.path.join(WORKERS, "megatron_bad_input.py")], world_size=2, timeout=300,
                        env={"PYTHONWARNINGS": "ignore"})
    cases = {result.rank: dict(line[len("CASE "):].split(": ", 1) for line in result.output.splitlines()
                               if line.startswith("CASE ")) for result in results}
    return cases, [result.output for result in results]


def test_megatron_core_entry_point_checks_chunks_config_and_micro_batch_counts(megatron_bad_input):
    cases, outputs = megatron_bad_input
    for rank in (0, 1):
        assert cases[rank]["single-chunk"].startswith(
            "TypeError: critical sharpness: model must be the list of model chunks (one per virtual pipeline stage, "
            "as Megatron's get_model returns it), got DistributedDataParallel; for one chunk pass [model]")
        assert cases[rank]["dict-config"].startswith("ConfigError: critical sharpness: config must be a SharpnessConfig, got dict")
        assert cases[rank]["record-4-run-1"] == (
            "ValueError: critical sharpness: record(data_iterator, num_microbatches) at iteration 1 expects 4 "
            "micro-batch(es) to replay, but forward_backward_func read only 1 from the iterator of model chunk 0; "
            "pass record() the num_microbatches that forward_backward_func runs")
        assert "PARAMS MOVED: False" in outputs[rank]  # refused before the real optimizer step


def test_megatron_core_loss_func_reporting_lm_loss_in_another_form_raises_on_every_rank(megatron_bad_input):
    """Pipeline parallel 2: the last stage sees the report and says what it was; the first stage
    learns of it in the same reduction. Raised at the first measurement, θ_{t+1} in place; not a
    `failed` record at every measurement."""
    cases, _ = megatron_bad_input
    last, first = cases[1], cases[0]
    assert last["lm-loss-scalar"].startswith(
        "LossReportError: critical sharpness: forward_step_func's loss_func reported 'lm loss' as tensor(")
    assert last["lm-loss-scalar"].endswith(
        "; megatron-core's convention, which the probe reduces, is [loss sum, token count] per micro-batch "
        "(e.g. torch.cat([loss_sum.view(1), num_tokens.view(1)]))")
    assert last["lm-loss-other-key"] == (
        "LossReportError: critical sharpness: forward_step_func's loss_func reported no 'lm loss' (got ['loss']); "
        "report [loss sum, token count] under 'lm loss' (megatron-core's convention, which the probe reduces), or "
        "name the key with MegatronSharpness(..., loss_key=...)")
    for case in ("lm-loss-scalar", "lm-loss-other-key"):
        assert first[case] == (
            "LossReportError: critical sharpness: forward_step_func's loss_func did not report 'lm loss' as "
            "[loss sum, token count] on the last pipeline stage (megatron-core's convention, which the probe "
            "reduces); the error raised there says what it reported")
        assert first[f"{case}-params-are-the-step"] == last[f"{case}-params-are-the-step"] == "True"


def test_megatron_core_failure_inside_a_tensor_parallel_collective_is_printed_before_the_wait(megatron_bad_input):
    """Tensor parallel 2: rank 1 raises inside the all-reduce of a probe forward at a trial point;
    rank 0 waits in that all-reduce until the process-group timeout (a hang with NCCL). Rank 1 must
    have printed its own error, with the trial lr and where it was raised, before it went into the
    next collective: after the wait only timeouts are left to print."""
    cases, outputs = megatron_bad_input
    lines = outputs[1].splitlines()
    reported = [index for index, line in enumerate(lines) if line.startswith("critical sharpness: rank 1: ")]
    assert len(reported) == 1, outputs[1][-3000:]
    line = lines[reported[0]]
    assert re.fullmatch(r"critical sharpness: rank 1: a probe forward raised at trial lr \d\.\d{4}E[-+]\d\d: "
                        r"RuntimeError: injected: rank 1 failed inside the tensor-parallel all-reduce of a probe "
                        r"forward", line), line
    assert float(line.split("trial lr ")[1].split(":")[0]) > 0
    assert lines[reported[0] + 1] == "  innermost frames (most recent call last):"
    frames = "\n".join(lines[reported[0] + 2:])
    assert "in all_reduce" in frames and "megatron_bad_input.py" in frames
    # printed before the wait: ahead of what rank 1 prints once the measurement is over
    assert lines.index("CASE tp-fault: failed") > reported[0]
    assert cases[0]["tp-fault"] == "failed"
