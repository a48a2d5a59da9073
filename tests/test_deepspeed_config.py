"""In-process checks of the DeepSpeed integration's input handling (no engine needed)."""

import types

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]')")

from megatron_sharpness.backends.deepspeed import master_layout  # noqa: E402
from megatron_sharpness.config import ConfigError, SharpnessConfig  # noqa: E402
from megatron_sharpness.integrations.deepspeed import config_from_engine, loss_of  # noqa: E402


class Lion:  # stands for any optimizer wrapper the backend has no layout for
    pass


def engine_with(optimizer, zero_stage=0, config=None):
    return types.SimpleNamespace(optimizer=optimizer, zero_optimization=lambda: zero_stage, config=config or {})


def test_unknown_optimizer_is_refused_naming_its_class_and_the_supported_ones():
    with pytest.raises(TypeError) as error:
        master_layout(engine_with(Lion()))
    message = str(error.value)
    assert "Lion is not supported" in message
    for name in ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer", "FP16_Optimizer"):
        assert name in message


def test_torch_optimizer_over_low_precision_params_is_refused():
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="not supported"):
        master_layout(engine_with(torch.optim.SGD([param], lr=0.1)))


def test_ds_config_section_is_read_and_validated():
    engine = engine_with(None, config={"critical_sharpness": {"interval": 5, "micro_batches": 2}})
    assert config_from_engine(engine) == SharpnessConfig(interval=5, micro_batches=2)
    assert config_from_engine(engine_with(None)) == SharpnessConfig(enabled=False)
    with pytest.raises(ConfigError, match=r"ds_config\['critical_sharpness'\]: unknown field\(s\) every"):
        config_from_engine(engine_with(None, config={"critical_sharpness": {"every": 5}}))
    with pytest.raises(ConfigError, match="micro_batches=0 is invalid"):
        config_from_engine(engine_with(None, config={"critical_sharpness": {"micro_batches": 0}}))


def test_loss_is_found_in_common_model_outputs():
    loss = torch.tensor(2.5)
    assert loss_of(loss) is loss
    assert loss_of((loss, torch.zeros(4))) is loss
    assert loss_of({"loss": loss, "logits": torch.zeros(4)}) is loss
    assert loss_of(types.SimpleNamespace(loss=loss)) is loss
    with pytest.raises(TypeError, match="cannot find the loss in a model output of type str"):
        loss_of("nope")
    with pytest.raises(TypeError, match="must be a scalar"):
        loss_of(torch.zeros(3))


def test_megatron_reported_losses_are_averaged_over_micro_batches():
    from megatron_sharpness.integrations.megatron_deepspeed import mean_reported_loss

    reported = [{"lm loss": torch.tensor(2.0)}, {"lm loss": torch.tensor(3.0)}, {"lm loss": torch.tensor(4.5)}]
    assert mean_reported_loss(reported).item() == 9.5 / 3
    with pytest.raises(KeyError, match="reported no 'lm loss'; got \\['loss'\\]"):
        mean_reported_loss([{"loss": torch.tensor(1.0)}])


def test_megatron_deepspeed_without_deepspeed_is_refused():
    import argparse

    from megatron_sharpness.integrations import megatron_deepspeed

    args = megatron_deepspeed.add_critical_sharpness_args(argparse.ArgumentParser()).parse_args(
        ["--critical-sharpness-interval", "10"])
    args.deepspeed = False
    with pytest.raises(ValueError, match="needs --deepspeed"):
        megatron_deepspeed.attach([object()], None, args, None)
    args.critical_sharpness_interval = 0
    assert megatron_deepspeed.attach([object()], None, args, None) is None
    args.deepspeed = True  # no flag and no ds_config section: off
    assert megatron_deepspeed.attach([engine_with(None)], None, args, None) is None


def test_a_measured_step_without_recorded_micro_batches_is_a_clear_error():
    from megatron_sharpness.integrations.deepspeed import DeepSpeedSharpness

    sharpness = DeepSpeedSharpness.__new__(DeepSpeedSharpness)
    sharpness.engine = types.SimpleNamespace(is_gradient_accumulation_boundary=lambda: True, global_steps=4)
    sharpness.probe = types.SimpleNamespace(is_due=lambda step: True, guard=None)
    sharpness._recorder, sharpness._recorded, sharpness._reads_no_data = None, [], False
    with pytest.raises(RuntimeError, match="step 5 is measured but none of its micro-batches was recorded"):
        sharpness._step()


def test_a_rank_that_reads_no_data_is_measured_with_no_batches():
    # Megatron-DeepSpeed hands TP ranks > 0 data_iterator=None (issue 10, bug 4).
    from megatron_sharpness.integrations.deepspeed import DeepSpeedSharpness

    sharpness = DeepSpeedSharpness.__new__(DeepSpeedSharpness)
    sharpness.engine = types.SimpleNamespace(is_gradient_accumulation_boundary=lambda: True, global_steps=4)
    sharpness.probe = types.SimpleNamespace(is_due=lambda step: True, guard=None)
    sharpness.records_forwards = sharpness.is_pipeline = False
    sharpness.config = SharpnessConfig()
    sharpness.backend = types.SimpleNamespace(batches=None)
    sharpness._recorder, sharpness._recorded, sharpness._reads_no_data = None, [], False
    sharpness._measure_around = lambda run_step, training_loss=None: run_step()
    sharpness._original = lambda: "stepped"
    assert sharpness.record_batches(None) is None
    assert sharpness._step() == "stepped"
    assert sharpness.backend.batches == [] and sharpness._reads_no_data is False


def test_pipeline_forwards_run_in_training_mode_like_every_other_path():
    # eval_batch switches the module to eval mode, the DeepSpeedEngine path does not: one rule,
    # training mode (dropout on, the same masks at every trial point) (issue 10, bug 5).
    from megatron_sharpness.integrations.deepspeed import pipeline_loss

    module = torch.nn.Dropout(0.5)
    seen = []

    def eval_batch(data_iter, num_micro_batches, reduce_output, bcast_loss):
        module.eval()  # what DeepSpeed's eval_batch does first
        seen.append((module.training, engine.monitor.enabled))
        return torch.tensor(1.0)

    engine = types.SimpleNamespace(module=module, monitor=types.SimpleNamespace(enabled=True), eval_batch=eval_batch)
    pipeline_loss(engine)([], 2)
    assert seen == [(True, False)]
    assert engine.monitor.enabled and "eval" not in vars(module)
    module.eval()
    assert not module.training


def test_reusing_the_training_loss_with_a_custom_evaluate_is_refused():
    # The training losses of another schedule (Megatron-DeepSpeed's) are not the ones attach records.
    from megatron_sharpness.integrations.deepspeed import DeepSpeedSharpness

    engine = types.SimpleNamespace(step=lambda: None, optimizer=object())
    with pytest.raises(ConfigError, match="reuse_training_loss needs the engine's own forwards"):
        DeepSpeedSharpness(engine, SharpnessConfig(reuse_training_loss=True), evaluate=lambda batches, count: None)


def test_the_megatron_deepspeed_glue_names_a_deepspeed_that_cannot_run_megatron_deepspeed():
    """Megatron-DeepSpeed imports deepspeed.compression.compress, gone since deepspeed 0.19.7: the glue
    says so at import (Megatron-DeepSpeed's training.py imports it a few lines before its own
    import fails), naming the installed version and the one to install."""
    import importlib.util
    import subprocess
    import sys

    import deepspeed

    result = subprocess.run([sys.executable, "-W", "default", "-c", "import megatron_sharpness.integrations.megatron_deepspeed"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = (f"critical sharpness: deepspeed {deepspeed.__version__} is installed, which has no "
               "deepspeed.compression.compress: Megatron-DeepSpeed imports it in megatron/training.py and stops with "
               "ModuleNotFoundError; install deepspeed==0.19.6 (pip install 'deepspeed==0.19.6')")
    try:
        has_compression = importlib.util.find_spec("deepspeed.compression.compress") is not None
    except ImportError:
        has_compression = False
    assert (message in result.stderr) != has_compression, result.stderr
    from megatron_sharpness.integrations.megatron_deepspeed import deepspeed_problem

    assert deepspeed_problem("0.19.6", True) is None
    assert deepspeed_problem("0.19.9", False).startswith("critical sharpness: deepspeed 0.19.9 is installed, which has no")
