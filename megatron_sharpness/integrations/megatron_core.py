"""Critical sharpness in a megatron-core training loop (tensor, pipeline incl. virtual, and data
parallelism). Two calls in the train step:

    sharpness = MegatronSharpness(model, optimizer, forward_step_func, config,
                                  seq_length=..., micro_batch_size=...)
    ...
    data_iterator = sharpness.record(data_iterator, num_microbatches)   # before forward_backward_func
    losses = forward_backward_func(..., data_iterator=data_iterator, ...)
    update_successful, grad_norm, num_zeros = sharpness.step()         # instead of optimizer.step()

On measured iterations step() snapshots this rank's master shard, runs the real optimizer.step(),
then searches along the update with forward-only passes of Megatron's own forward_backward_func on
the micro-batches the step read, and restores θ_{t+1}.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from megatron_sharpness.backends.megatron import MegatronBackend, reduce_lm_loss
from megatron_sharpness.checks import (checked_loggers, require_callable, require_optimizer,
                                       require_positive_int)
from megatron_sharpness.config import SharpnessConfig, require_config
from megatron_sharpness.faults import CAUGHT, report_local_failure
from megatron_sharpness.loggers import JsonlLogger, MeasurementLogger, WarningLogger
from megatron_sharpness.measurement import Measurement
from megatron_sharpness.integrations.recording import RecordingIterator
from megatron_sharpness.policies import FORWARDS_PER_STEP, lr_scaled
from megatron_sharpness.probe import SharpnessProbe


class MegatronSharpness:
    """model: the list of model chunks (one per virtual pipeline stage). relative_data_iterators:
    per task name, the data iterator(s) of another task in the same form as the training ones;
    each measurement draws `config.micro_batches` (or the step's count) fresh micro-batches from
    them (`relative_micro_batches` if given) and searches their loss along the same update."""

    def __init__(self, model: list, optimizer, forward_step_func: Callable, config: SharpnessConfig, *,
                 seq_length: int, micro_batch_size: int, decoder_seq_length: int | None = None,
                 relative_data_iterators: Mapping[str, Any] | None = None,
                 relative_micro_batches: int | None = None, loss_key: str = "lm loss",
                 loggers: Iterable[MeasurementLogger] | None = None,
                 forward_backward_func: Callable | None = None):
        _check_model_chunks(model)
        require_optimizer(optimizer)
        require_callable(forward_step_func, "forward_step_func",
                         "Megatron's forward_step_func(data_iterator, model) -> (output, loss_func)")
        config = require_config(config)
        require_positive_int(seq_length, "seq_length")
        require_positive_int(micro_batch_size, "micro_batch_size")
        if relative_micro_batches is not None:
            require_positive_int(relative_micro_batches, "relative_micro_batches")
        if relative_data_iterators is not None and not isinstance(relative_data_iterators, Mapping):
            raise TypeError("critical sharpness: relative_data_iterators must map task names to data iterators, "
                            f"got {type(relative_data_iterators).__name__}")
        loggers = checked_loggers(loggers)
        if forward_backward_func is None:
            from megatron.core.pipeline_parallel import get_forward_backward_func

            forward_backward_func = get_forward_backward_func()
        self.model = list(model)
        self.optimizer = optimizer
        self.config = config
        self.loss_key = loss_key
        self.relative_data_iterators = dict(relative_data_iterators or {})
        self.relative_micro_batches = relative_micro_batches
        for name in self.relative_data_iterators:
            if not isinstance(name, str) or not name:
                raise ValueError(f"relative task name {name!r} must be a non-empty string")

        def evaluate(batches: list[list[Any]], count: int) -> torch.Tensor:
            iterators = [iter(chunk_batches) for chunk_batches in batches]
            error = None
            try:
                with torch.no_grad():
                    forward_data_store = forward_backward_func(
                        forward_step_func=forward_step_func,
                        data_iterator=iterators if len(self.model) > 1 else iterators[0],
                        model=self.model, num_microbatches=count, seq_length=seq_length,
                        micro_batch_size=micro_batch_size, decoder_seq_length=decoder_seq_length, forward_only=True)
            except CAUGHT as caught:
                # Join the loss reduction anyway: the peers are waiting in it (see faults.py). Said
                # first: a failure inside a tensor-parallel collective of the forward leaves the peers
                # in that collective, and the reduction waits until the process-group timeout.
                error, forward_data_store = caught, None
                report_local_failure(caught)
            loss = reduce_lm_loss(forward_data_store, loss_key)
            if error is not None:
                raise error
            return loss

        self.backend = MegatronBackend(optimizer, self.model, evaluate, config.write, config.write_memory_budget_mib)
        self.probe = SharpnessProbe(config, _default_loggers(config) if loggers is None else loggers)
        self.iteration = 0
        self.last_measurement: Measurement | None = None
        self._recorders: list[RecordingIterator | None] = []

    def record(self, data_iterator, num_microbatches: int, iteration: int | None = None):
        """The step's data iterator(s), recording the micro-batches of a measured step as they are
        read; returned unchanged on other steps. A list (virtual pipeline) is recorded per chunk.
        iteration: the 1-based iteration this step will be (default: the one after the last step())."""
        require_positive_int(num_microbatches, "num_microbatches")
        self._recorders = []
        if not self.probe.is_due(self.iteration + 1 if iteration is None else iteration):
            return data_iterator
        count = self._count(num_microbatches)
        self.backend.micro_batch_counts[None] = count
        self.probe.step_share = count / (FORWARDS_PER_STEP * num_microbatches)
        for name in self.relative_data_iterators:
            self.backend.micro_batch_counts[name] = self.relative_micro_batches or count
        iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
        self._recorders = [None if it is None else RecordingIterator(it, count) for it in iterators]
        wrapped = [it if recorder is None else recorder for it, recorder in zip(iterators, self._recorders)]
        return wrapped if isinstance(data_iterator, list) else wrapped[0]

    def step(self, iteration: int | None = None, training_losses: Sequence[dict] | None = None):
        """optimizer.step(), with the measurement around it on due iterations; returns what
        optimizer.step() returned. iteration: Megatron's 1-based iteration of this step (counted
        here when not given). training_losses: what forward_backward_func returned for this step
        (the loss dicts of the last pipeline stage, empty elsewhere), needed with
        config.reuse_training_loss: their first micro-batches, reduced as the probe reduces its
        own, stand for a forward at θ_t."""
        self.iteration = self.iteration + 1 if iteration is None else iteration
        # The lr guard's factor scales every param group for this one step (Megatron's scheduler
        # sets the lr afresh after it); 1 without a guard, and then nothing is touched.
        factor = 1.0 if self.probe.guard is None else self.probe.guard.lr_factor(self.iteration)[0]
        with lr_scaled(self.optimizer.param_groups, factor):
            return self._step(training_losses)

    def _step(self, training_losses: Sequence[dict] | None):
        if not self.probe.is_due(self.iteration):
            return self.optimizer.step()
        if not self._recorders:
            raise RuntimeError(f"critical sharpness: iteration {self.iteration} is measured but its data "
                               "iterator was not passed through record() before forward_backward_func")
        self._check_recorded_counts()
        training_loss = None
        if self.config.reuse_training_loss:
            if not isinstance(training_losses, Sequence) or isinstance(training_losses, (str, bytes)):
                raise TypeError("critical sharpness: reuse_training_loss needs step(..., training_losses=...) with "
                                "what forward_backward_func returned for this step (a list of loss dicts), got "
                                f"{type(training_losses).__name__}")
            count = self.backend.micro_batch_counts[None]
            training_loss = float(reduce_lm_loss(list(training_losses)[:count], self.loss_key))
        self.backend.batches = [[] if recorder is None else recorder.items for recorder in self._recorders]
        self.backend.relative_batches = {name: self._draw(iterators, self.backend.micro_batch_counts[name])
                                         for name, iterators in self.relative_data_iterators.items()}
        self._recorders = []
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.backend.snapshot()
        try:
            result = self.optimizer.step()
        except BaseException:
            self.backend.restore()
            raise
        self.backend.step_applied, self.backend.grad_norm = bool(result[0]), result[1]
        with _rerun_state_machine_disabled():
            self.last_measurement = self.probe.measure(self.backend, self.iteration, lr,
                                                       list(self.relative_data_iterators), training_loss)
        return result

    def close(self) -> None:
        self.probe.close()

    def _check_recorded_counts(self) -> None:
        """Before the real step: a schedule that read fewer micro-batches than record() was told
        would make the probe's replay run out of data (a bare StopIteration inside Megatron)."""
        expected = self.backend.micro_batch_counts[None]
        for chunk, recorder in enumerate(self._recorders):
            # A stage that reads no data at all (middle pipeline stages) records nothing, rightly.
            if recorder is not None and 0 < len(recorder.items) < expected:
                self._recorders = []
                raise ValueError(
                    f"critical sharpness: record(data_iterator, num_microbatches) at iteration {self.iteration} "
                    f"expects {expected} micro-batch(es) to replay, but forward_backward_func read only "
                    f"{len(recorder.items)} from the iterator of model chunk {chunk}; pass record() the "
                    "num_microbatches that forward_backward_func runs")

    def _count(self, num_microbatches: int) -> int:
        k = self.config.micro_batches
        return num_microbatches if k is None else min(k, num_microbatches)

    def _draw(self, data_iterator, count: int) -> list[list[Any]]:
        iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
        if len(iterators) != len(self.model):
            raise ValueError(f"critical sharpness: {len(iterators)} relative data iterators for "
                             f"{len(self.model)} model chunks")
        return [[] if it is None else list(itertools.islice(it, count)) for it in iterators]


def _check_model_chunks(model: Any) -> None:
    if not isinstance(model, (list, tuple)) or not model:
        got = type(model).__name__ + (" (empty)" if isinstance(model, (list, tuple)) else "")
        raise TypeError(f"critical sharpness: model must be the list of model chunks (one per virtual pipeline "
                        f"stage, as Megatron's get_model returns it), got {got}; for one chunk pass [model]")
    for index, chunk in enumerate(model):
        if not isinstance(chunk, torch.nn.Module):
            raise TypeError(f"critical sharpness: model[{index}] must be a model chunk (torch.nn.Module), "
                            f"got {type(chunk).__name__}")


@contextlib.contextmanager
def _rerun_state_machine_disabled() -> Iterator[None]:
    """Megatron's rerun state machine off for the probe's forward-only passes, as Megatron-LM's
    evaluate() does: the script's loss_func validates each loss through it, which asserts outside
    the training step's forward-backward pass (Megatron-LM's default --rerun-mode validate_results)."""
    from megatron.core.rerun_state_machine import RerunMode, get_rerun_state_machine

    machine = get_rerun_state_machine()
    mode = machine.get_mode()
    if mode == RerunMode.DISABLED:
        yield
        return
    machine.set_mode(RerunMode.DISABLED)
    try:
        yield
    finally:
        machine.set_mode(mode)


def _default_loggers(config: SharpnessConfig) -> list[MeasurementLogger]:
    # Megatron prints and writes TensorBoard from the last rank; the JSONL file and the warning follow it.
    if dist.get_rank() != dist.get_world_size() - 1:
        return []
    return [WarningLogger()] + ([] if config.log_file is None else [JsonlLogger(config.log_file)])
