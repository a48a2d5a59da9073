"""Critical sharpness for a plain PyTorch (or torch DDP) training loop: replace
`optimizer.step()` with `probe.step(loss_fn)`."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from megatron_sharpness.backends.fsdp2 import FSDP2Backend, is_fsdp2_model
from megatron_sharpness.backends.pytorch import LossFn, TorchBackend, _unwrapped
from megatron_sharpness.checks import checked_loggers, require_callable, require_optimizer, require_positive_int
from megatron_sharpness.config import SharpnessConfig, require_config
from megatron_sharpness.loggers import JsonlLogger, MeasurementLogger, WarningLogger
from megatron_sharpness.measurement import Measurement
from megatron_sharpness.policies import lr_scaled
from megatron_sharpness.probe import SharpnessProbe


class TorchSharpnessProbe:
    """Measures λ_c every `config.interval` optimizer steps along the step the optimizer takes.

    loss_fn (given to step()) evaluates the mean loss of the step's own batch at the model's
    current parameters; it is called under torch.no_grad() with the model in whatever mode the
    training loop left it, and must read the same batch each time it is called. Under DDP each
    rank's value is averaged over the DDP process group, so every rank sees the same number; for a
    model sharded with torch FSDP2 (fully_shard) over the process group (default: the world).
    compute_dtype: the dtype the forward computes in when it is not the parameters' own, e.g.
    torch.bfloat16 under torch.autocast; it sets the resolution floor of the search (FSDP2: the
    mixed-precision policy's param_dtype unless given).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 config: SharpnessConfig | None = None,
                 loggers: Iterable[MeasurementLogger] | None = None,
                 process_group: dist.ProcessGroup | None = None,
                 compute_dtype: torch.dtype | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"critical sharpness: model must be a torch.nn.Module (or its DDP wrapper), "
                            f"got {type(model).__name__}")
        require_optimizer(optimizer)
        self.config = require_config(config) if config is not None else SharpnessConfig()
        loggers = checked_loggers(loggers)
        self.optimizer = optimizer
        backend = FSDP2Backend if is_fsdp2_model(model) else TorchBackend
        self.backend = backend(model, optimizer, process_group, compute_dtype)
        if loggers is None:
            loggers = _default_loggers(self.config)
        self.probe = SharpnessProbe(self.config, loggers)
        self.relative_tasks: dict[str, LossFn] = {}
        self.iteration = 0

    def state_dict(self) -> dict[str, Any]:
        """Save it with the model and optimizer: the step count (which steps are due) and the warm
        starts. After load_state_dict() the resumed run measures bitwise what the uninterrupted one
        would have (same forwards, same values). Relative tasks' data is the caller's own."""
        return {"iteration": self.iteration, "probe": self.probe.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("iteration"), int) or "probe" not in state:
            raise ValueError("critical sharpness: load_state_dict() wants what TorchSharpnessProbe.state_dict() "
                             f"returned ({{'iteration': int, 'probe': ...}}), got {state!r:.120}")
        self.probe.load_state_dict(state["probe"])
        self.iteration = state["iteration"]

    def add_relative_task(self, name: str, loss_fn: LossFn) -> None:
        """Also search the loss of another task (e.g. a fixed held-out batch) along each step."""
        if not isinstance(name, str) or not name or name in self.relative_tasks:
            raise ValueError(f"relative task name {name!r} must be a new non-empty string; "
                             f"registered: {sorted(self.relative_tasks)}")
        require_callable(loss_fn, f"the loss_fn of relative task {name!r}", _LOSS_FN_ALLOWED)
        self.relative_tasks[name] = loss_fn

    def step(self, loss_fn: LossFn, optimizer_step: Callable[[], Any] | None = None,
             training_loss: torch.Tensor | float | None = None, iteration: int | None = None) -> Measurement | None:
        """Run the optimizer step (optimizer.step() unless optimizer_step is given, e.g.
        `lambda: scaler.step(optimizer)`), and on measured iterations the probe around it.

        training_loss: the loss the training forward of this step computed, to be used as L(θ_t)
        instead of one more forward. Right only where loss_fn() at θ_t returns bitwise the same
        number (the same batch, no dropout, the same autocast): the first measurement given one
        checks that with its own forward and, if they differ, warns and stops using them.

        iteration: the 1-based number of this optimizer step in the whole run (the training loop's
        own count), which decides whether it is measured and labels its record. Without it the
        probe counts its calls, starting after the optimizer's own step count (Adam's `step`,
        restored by optimizer.load_state_dict) or after the iteration of a loaded probe state."""
        # Checked before the real step runs, so that a slip does not leave a half-done iteration.
        require_callable(loss_fn, "loss_fn", _LOSS_FN_ALLOWED)
        if optimizer_step is not None:
            require_callable(optimizer_step, "optimizer_step",
                             "a callable that runs the optimizer step, e.g. lambda: scaler.step(optimizer)")
        if iteration is not None:
            require_positive_int(iteration, "iteration")
        run_step = optimizer_step if optimizer_step is not None else self.optimizer.step
        if iteration is not None:
            self.iteration = iteration
        else:
            if self.iteration == 0:
                # A run resumed without load_state_dict() would count from 1 again and label its
                # records with the steps of the first leg; the optimizer's count survived the resume.
                self.iteration = optimizer_step_count(self.optimizer)
            self.iteration += 1
        with lr_scaled(*self._guarded_groups()):
            if not self.probe.is_due(self.iteration):
                run_step()
                return None
            lr = float(self.optimizer.param_groups[0]["lr"])
            self.backend.snapshot()
            try:
                run_step()
            except BaseException:
                self.backend.restore()
                raise
        self.backend.loss_fns = {None: loss_fn, **self.relative_tasks}
        baseline = None if training_loss is None else self.backend.reduce_loss(training_loss, "training_loss")
        return self.probe.measure(self.backend, self.iteration, lr, list(self.relative_tasks), baseline)

    def _guarded_groups(self) -> tuple[list[dict], float]:
        """The param groups the lr guard scales at this step, and by how much: every group, or where
        the guard acted on one module group, the param groups that hold its parameters."""
        guard = self.probe.guard
        if guard is None:
            return [], 1.0
        factor, module_group = guard.lr_factor(self.iteration)
        groups = self.optimizer.param_groups
        if module_group is not None and factor != 1.0:
            names = set(self.probe.group_members(module_group))
            held = {id(param) for name, param in _unwrapped(self.backend.model).named_parameters() if name in names}
            groups = [group for group in groups if any(id(param) in held for param in group["params"])]
        return groups, factor

    def close(self) -> None:
        self.probe.close()


def optimizer_step_count(optimizer: torch.optim.Optimizer) -> int:
    """The steps the optimizer has taken, where it counts them (Adam, AdamW, RMSprop, Adagrad, ...
    keep `step` per parameter; SGD keeps none: 0). The largest count: a parameter without a
    gradient at some step was not stepped then."""
    counts = [state["step"] for state in optimizer.state.values() if isinstance(state, dict) and "step" in state]
    return max((int(count.item() if isinstance(count, torch.Tensor) else count) for count in counts), default=0)


_LOSS_FN_ALLOWED = ("a callable without arguments that recomputes the step's mean loss, e.g. "
                    "lambda: loss_fn(model, x, y) (not the loss tensor itself)")


def _default_loggers(config: SharpnessConfig) -> list[MeasurementLogger]:
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    if not is_writer:
        return []
    return [WarningLogger()] + ([] if config.log_file is None else [JsonlLogger(config.log_file)])
