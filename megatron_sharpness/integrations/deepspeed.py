"""Critical sharpness inside a DeepSpeed engine, switched on from the ds_config:

    "critical_sharpness": {"enabled": true, "interval": 100, "log_file": "sharpness.jsonl"}

plus one line after deepspeed.initialize():

    from megatron_sharpness.integrations.deepspeed import attach
    sharpness = attach(engine)

The training loop is unchanged: the engine's own step() (or train_batch() for a PipelineEngine)
runs the probe on measured steps, replaying the micro-batches the step trained on. The engine's
save_checkpoint() / load_checkpoint() carry the probe's state (its warm starts) in the checkpoint's
client_state, so a resumed run measures what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from deepspeed import comm as ds_comm
from deepspeed.runtime.pipe.engine import PipelineEngine

from megatron_sharpness.backends.deepspeed import DeepSpeedBackend, Evaluator
from megatron_sharpness.checks import checked_loggers, require_callable
from megatron_sharpness.config import ConfigError, SharpnessConfig, require_config
from megatron_sharpness.faults import CAUGHT, UsageError, note_local_loss, report_local_failure
from megatron_sharpness.loggers import JsonlLogger, LogLineLogger, MeasurementLogger, WarningLogger
from megatron_sharpness.measurement import Measurement
from megatron_sharpness.integrations.recording import RecordingIterator
from megatron_sharpness.policies import FORWARDS_PER_STEP, lr_scaled
from megatron_sharpness.probe import SharpnessProbe

CONFIG_SECTION = "critical_sharpness"
# The probe's entry in the client_state of the engine's checkpoints.
CLIENT_STATE_KEY = "critical_sharpness"


class ModelOutputError(UsageError, TypeError):
    """The model's output holds no scalar loss where loss_from_output looks for it: a mistake of
    the setup, raised on every rank at the first measurement."""


def loss_of(output: Any) -> torch.Tensor:
    """The loss in what the model's forward returned: the tensor itself, the first element of a
    tuple or list, or `.loss` / `["loss"]` (Hugging Face style outputs)."""
    where = "the model's output"
    if isinstance(output, torch.Tensor):
        loss = output
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss, where = output[0], f"the first element of the model's output ({type(output).__name__} of {len(output)})"
    elif isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        loss, where = output["loss"], "the model's output['loss']"
    elif isinstance(getattr(output, "loss", None), torch.Tensor):
        loss, where = output.loss, "the model's output.loss"
    else:
        raise ModelOutputError(f"critical sharpness: cannot find the loss in a model output of type "
                               f"{type(output).__name__}; pass attach(..., loss_from_output=fn) that returns it")
    if loss.numel() != 1:
        raise ModelOutputError(f"critical sharpness: the loss must be a scalar, but {where} has shape "
                               f"{tuple(loss.shape)}; pass attach(..., loss_from_output=fn) that returns the mean "
                               "loss (e.g. lambda output: output[1] for a model returning (prediction, loss))")
    return loss


class DeepSpeedMonitorLogger:
    """Writes each measurement through the engine's monitor (TensorBoard / W&B / CSV, as the
    ds_config set them up), against global samples like DeepSpeed's own Train/Samples/* events."""

    def __init__(self, engine):
        self.engine = engine

    def log(self, measurement: Measurement) -> None:
        samples = self.engine.global_samples
        events = [(f"Train/Samples/{name}", value, samples) for name, value in measurement.scalars().items()]
        if events:
            self.engine.monitor.write_events(events)

    def close(self) -> None:
        pass


def engine_forward_loss(engine, loss_from_output: Callable[[Any], torch.Tensor] = loss_of) -> Evaluator:
    """Replays (args, kwargs) micro-batches through engine(...) and averages over data parallelism."""

    def evaluate(batches: Sequence[Any], count: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=engine.device)
        error = None
        try:
            for args, kwargs in batches[:count]:
                total += loss_from_output(engine(*args, **kwargs)).detach().double()
        except CAUGHT as caught:
            # Join the reduction anyway: the peers are waiting in it (see faults.py); said first, in
            # case they wait in a collective of the forward instead (ZeRO-3's parameter all-gather).
            error = caught
            report_local_failure(caught)
        note_local_loss(total)  # non-finite exactly where the mean is
        mean = data_parallel_mean(engine, total, count)
        if error is not None:
            raise error
        return mean

    return evaluate


def data_parallel_mean(engine, total: torch.Tensor, count: int) -> torch.Tensor:
    """total / count averaged over the data-parallel ranks: the probe's reduction of a loss, which
    a training loss must follow to be bitwise comparable with it."""
    mean = total / count
    ds_comm.all_reduce(mean, group=engine.data_parallel_group)
    return mean / ds_comm.get_world_size(group=engine.data_parallel_group)


def pipeline_loss(engine: PipelineEngine) -> Evaluator:
    """Runs the micro-batches through the pipeline with eval_batch, so every stage takes part;
    eval_batch averages over micro-batches and data parallelism and broadcasts over the stages.
    The forwards stay in the module's training mode, as on every other path: eval_batch's own
    module.eval() is skipped for the call, so dropout is on (with the same masks at every trial
    point, the backend resets the RNG before each)."""

    def evaluate(batches: Sequence[Any], count: int) -> torch.Tensor:
        module = engine.module
        monitor_enabled = engine.monitor.enabled
        engine.monitor.enabled = False  # eval_batch would log every trial point as an eval loss
        module.eval = lambda: module
        try:
            return engine.eval_batch(iter(batches[:count]) if batches else None, num_micro_batches=count,
                                     reduce_output="avg", bcast_loss=True)
        finally:
            del module.eval
            engine.monitor.enabled = monitor_enabled

    return evaluate


class DeepSpeedSharpness:
    """The probe attached to one engine; detach() puts the engine back as it was.

    Micro-batches are recorded as they pass, without consuming data: by a forward pre-hook on the
    engine's module (default), by the pipeline's data iterator (PipelineEngine), or, when a custom
    `evaluate` replays them through another schedule, by the iterator that record_batches() wraps.
    """

    def __init__(self, engine, config: SharpnessConfig,
                 relative_batches: Mapping[str, Sequence[Any]] | None = None,
                 loss_from_output: Callable[[Any], torch.Tensor] = loss_of,
                 loggers: Iterable[MeasurementLogger] | None = None,
                 evaluate: Evaluator | None = None):
        if not callable(getattr(engine, "step", None)) or getattr(engine, "optimizer", None) is None:
            raise TypeError("critical sharpness: engine must be the DeepSpeed engine that deepspeed.initialize "
                            f"returned (with an optimizer), got {type(engine).__name__}")
        config = require_config(config)
        require_callable(loss_from_output, "loss_from_output", "a callable that takes the model's output and "
                         "returns the scalar loss")
        if evaluate is not None:
            require_callable(evaluate, "evaluate", "a callable evaluate(batches, count) -> loss tensor, or None")
        _check_relative_batches(relative_batches)
        loggers = checked_loggers(loggers)
        self.engine = engine
        self.config = config
        self.is_pipeline = isinstance(engine, PipelineEngine)
        self.records_forwards = evaluate is None and not self.is_pipeline
        if config.reuse_training_loss and not self.records_forwards:
            raise ConfigError("critical sharpness: reuse_training_loss needs the engine's own forwards recorded "
                              "by attach() (a plain DeepSpeed engine); not available with a PipelineEngine or "
                              "a custom evaluate, where the training losses are not the probe's")
        self._loss_from_output = loss_from_output
        self._training_losses: list[torch.Tensor] = []
        if evaluate is None:
            evaluate = pipeline_loss(engine) if self.is_pipeline else engine_forward_loss(engine, loss_from_output)
        self.backend = DeepSpeedBackend(engine, evaluate, config.write, config.write_memory_budget_mib)
        self.probe = SharpnessProbe(config, _default_loggers(engine, config) if loggers is None else loggers)
        self.last_measurement: Measurement | None = None
        self._recorded: list[Any] = []
        self._recorder: RecordingIterator | None = None
        self._reads_no_data = False
        self._set_relative_batches(relative_batches or {})
        self._hook = self._loss_hook = None
        if self.is_pipeline:
            self._original = engine.train_batch
            engine.train_batch = self._train_batch
        else:
            self._original = engine.step
            engine.step = self._step
            if self.records_forwards:
                self._hook = engine.module.register_forward_pre_hook(self._record, with_kwargs=True)
            if config.reuse_training_loss:
                self._loss_hook = engine.module.register_forward_hook(self._record_loss)
        self._save_checkpoint, self._load_checkpoint = engine.save_checkpoint, engine.load_checkpoint
        engine.save_checkpoint, engine.load_checkpoint = self.save_checkpoint, self.load_checkpoint

    @property
    def micro_batches(self) -> int:
        accumulation = self.engine.gradient_accumulation_steps()
        return accumulation if self.config.micro_batches is None else min(self.config.micro_batches, accumulation)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        if self._loss_hook is not None:
            self._loss_hook.remove()
        if self.is_pipeline:
            del self.engine.train_batch
        else:
            del self.engine.step
        del self.engine.save_checkpoint, self.engine.load_checkpoint
        self.probe.close()

    def save_checkpoint(self, save_dir, tag=None, client_state=None, *args, **kwargs):
        """The engine's save_checkpoint, with the probe's state added to client_state."""
        client_state = {**(client_state or {}), CLIENT_STATE_KEY: self.probe.state_dict()}
        return self._save_checkpoint(save_dir, tag, client_state, *args, **kwargs)

    def load_checkpoint(self, *args, **kwargs):
        """The engine's load_checkpoint; restores the probe's state saved with the checkpoint and
        returns (load_path, client_state) without it, as the engine's own would."""
        load_path, client_state = self._load_checkpoint(*args, **kwargs)
        state = client_state.pop(CLIENT_STATE_KEY, None) if isinstance(client_state, dict) else None
        if state is not None:
            self.probe.load_state_dict(state)
        elif load_path is not None and self.config.enabled and ds_comm.get_rank() == 0:
            print(f"critical sharpness: {load_path} holds no probe state (saved without the probe?): the first "
                  "measurement after the resume starts cold", flush=True)
        return load_path, client_state

    def record_batches(self, data_iterator: Iterator | None) -> Iterator | None:
        """Wrap the iterator a step's micro-batches are read from (only needed with a custom
        evaluate); returned unchanged unless the next optimizer step will be measured. None is a
        rank that reads no data (Megatron's TP ranks > 0 receive their batch by broadcast): its
        evaluate is then given no batches and must replay with no iterator as well."""
        if self.records_forwards or self.is_pipeline:
            raise RuntimeError("record_batches() goes with attach(..., evaluate=...); this probe already "
                               "records the micro-batches as they reach the engine")
        if not self._next_step_is_due():
            return data_iterator
        self._reads_no_data = data_iterator is None
        if data_iterator is not None:
            self._recorder = RecordingIterator(data_iterator, self.micro_batches)
            return self._recorder
        return None

    def _set_relative_batches(self, relative_batches: Mapping[str, Sequence[Any]]) -> None:
        as_stored = _as_call if self.records_forwards else (lambda batch: batch)
        self.backend.relative_batches = {name: [as_stored(batch) for batch in batches]
                                         for name, batches in relative_batches.items()}
        self.backend.micro_batch_counts.update({name: len(b) for name, b in self.backend.relative_batches.items()})

    def _next_step_is_due(self) -> bool:
        return self.probe.is_due(self.engine.global_steps + 1)

    def _record(self, module, args, kwargs) -> None:
        # Only training forwards of a step that will be measured; the probe's own run under no_grad.
        if torch.is_grad_enabled() and self._next_step_is_due() and len(self._recorded) < self.micro_batches:
            self._recorded.append((args, dict(kwargs)))

    def _record_loss(self, module, args, output) -> None:
        # Runs after _record for the same forward, so the two lists stay in step.
        if torch.is_grad_enabled() and self._next_step_is_due() and len(self._training_losses) < self.micro_batches:
            self._training_losses.append(self._loss_from_output(output).detach().double())

    def _lr_factor(self) -> float:
        """The lr guard's factor for the next optimizer step (1: no guard, or none in force)."""
        guard = self.probe.guard
        return 1.0 if guard is None else guard.lr_factor(self.engine.global_steps + 1)[0]

    @contextlib.contextmanager
    def _lr_guarded(self) -> Iterator[None]:
        """The engine's optimizer.step() with every param group's lr × the guard's factor: the
        engine calls its scheduler right after it, which then sets the lr as it always would."""
        factor = self._lr_factor()
        if factor == 1.0:
            yield
            return
        optimizer = self.engine.optimizer
        step = optimizer.step

        def scaled_step(*args, **kwargs):
            with lr_scaled(optimizer.param_groups, factor):
                return step(*args, **kwargs)

        optimizer.step = scaled_step
        try:
            yield
        finally:
            del optimizer.step

    def _step(self, *args, **kwargs):
        with self._lr_guarded():
            return self._step_or_measure(*args, **kwargs)

    def _step_or_measure(self, *args, **kwargs):
        engine = self.engine
        if not (engine.is_gradient_accumulation_boundary() and self._next_step_is_due()):
            return self._original(*args, **kwargs)
        if self._recorder is not None:
            self._recorded, self._recorder = self._recorder.items, None
        if not self._recorded and not self._reads_no_data:
            raise RuntimeError(f"critical sharpness: step {engine.global_steps + 1} is measured but none of its "
                               "micro-batches was recorded: call the engine (with grad enabled) for the training "
                               "forward, or pass the step's data iterator through record_batches()")
        self.backend.batches, self._recorded, self._reads_no_data = self._recorded, [], False
        training_loss = None
        if self.config.reuse_training_loss:
            total = torch.zeros((), dtype=torch.float64, device=engine.device)
            for loss in self._training_losses:
                total += loss
            training_loss = float(data_parallel_mean(engine, total, len(self._training_losses)))
            self._training_losses = []
        return self._measure_around(lambda: self._original(*args, **kwargs), training_loss)

    def _train_batch(self, data_iter: Iterator | None = None):
        with self._lr_guarded():
            return self._train_batch_or_measure(data_iter)

    def _train_batch_or_measure(self, data_iter: Iterator | None):
        engine = self.engine
        if not self._next_step_is_due():
            return self._original(data_iter)
        if data_iter is not None:
            engine.set_dataiterator(data_iter)
        self.backend.batches = []
        if engine.data_iterator is None:  # middle stages read no data
            return self._measure_around(lambda: self._original(None))
        recorder = RecordingIterator(engine.data_iterator, self.micro_batches)
        engine.data_iterator = recorder

        def run_step():
            try:
                return self._original(None)
            finally:
                engine.data_iterator = recorder.source
                self.backend.batches = recorder.items

        return self._measure_around(run_step)

    def _measure_around(self, run_step: Callable[[], Any], training_loss: float | None = None):
        step_number = self.engine.global_steps + 1
        lr = float(self.engine.get_lr()[0]) * self._lr_factor()
        self.probe.step_share = self.micro_batches / (FORWARDS_PER_STEP * self.engine.gradient_accumulation_steps())
        self.backend.snapshot()
        try:
            result = run_step()
        except BaseException:
            self.backend.restore()
            raise
        self.backend.micro_batch_counts[None] = self.micro_batches
        self.last_measurement = self.probe.measure(self.backend, step_number, lr,
                                                   list(self.backend.relative_batches), training_loss)
        return result


def _check_relative_batches(relative_batches: Any) -> None:
    if relative_batches is None:
        return
    if not isinstance(relative_batches, Mapping):
        raise TypeError("critical sharpness: relative_batches must map task names to lists of batches, "
                        f"got {type(relative_batches).__name__}")
    for name, batches in relative_batches.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"relative task name {name!r} must be a non-empty string")
        if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes, torch.Tensor, Mapping)):
            raise TypeError(f"relative task {name!r}: relative_batches[{name!r}] must be a list of batches, "
                            f"got {type(batches).__name__}")
        if len(batches) == 0:
            raise ValueError(f"relative task {name!r} has no batches")


def _as_call(batch: Any) -> tuple[tuple, dict]:
    """A relative batch as engine(*args, **kwargs): a tuple of args, a dict of kwargs, or one tensor."""
    if isinstance(batch, tuple):
        return batch, {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    return (batch,), {}


def _default_loggers(engine, config: SharpnessConfig) -> list[MeasurementLogger]:
    if ds_comm.get_rank() != 0:
        return []
    loggers: list[MeasurementLogger] = [LogLineLogger(), WarningLogger()]
    if config.log_file is not None:
        loggers.append(JsonlLogger(config.log_file))
    if engine.monitor.enabled:
        loggers.append(DeepSpeedMonitorLogger(engine))
    return loggers


def config_from_engine(engine) -> SharpnessConfig:
    ds_config = getattr(engine, "config", None)
    section = ds_config.get(CONFIG_SECTION) if isinstance(ds_config, Mapping) else None
    if section is None:
        return SharpnessConfig(enabled=False)
    return SharpnessConfig.from_dict(section, source=f"ds_config[{CONFIG_SECTION!r}]")


def attach(engine, config: SharpnessConfig | None = None,
           relative_batches: Mapping[str, Sequence[Any]] | None = None,
           loss_from_output: Callable[[Any], torch.Tensor] = loss_of,
           loggers: Iterable[MeasurementLogger] | None = None,
           evaluate: Evaluator | None = None) -> DeepSpeedSharpness:
    """Attach the probe to a DeepSpeed engine (or PipelineEngine). The config comes from the
    ds_config's "critical_sharpness" section unless given; without one the probe stays off.

    relative_batches: per task name, fixed batches in the form the engine is called with (a tuple
    of args, a dict of kwargs or one tensor; for a PipelineEngine what its data_iter yields, given
    on every stage). evaluate(batches, count): replaces the default replay through engine(...)
    when the step's micro-batches run through another schedule (Megatron-DeepSpeed); then wrap
    the step's data iterator with record_batches()."""
    if config is None:
        config = config_from_engine(engine)
    return DeepSpeedSharpness(engine, config, relative_batches, loss_from_output, loggers, evaluate)
