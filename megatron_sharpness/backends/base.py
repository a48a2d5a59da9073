"""The small protocol every framework backend implements.

A backend knows where one framework keeps the parameters the optimizer updated (the fp32 master
shard of this rank, the model's compute copy, the all-gather that spreads it) and how to run a
forward-only loss on the step's recorded batch. It knows nothing of the search.

Optionally a backend sets `non_finite_ranks` in loss(): the ranks whose own part of a non-finite
loss was NaN/inf (None where the loss is finite or the reduction cannot tell); the probe puts them
in the record. Optionally `gradient_slope()` returns gᵀ(θ_{t+1} − θ_t) from the step's own
gradients (None where they are gone), a prior for placing the step's search. `loss_bits`: the significand bits of the dtype the loss itself is computed in
(24 for fp32, the default where a backend does not say); the loss cannot resolve differences
below its own rounding.
"""

from __future__ import annotations

from typing import Collection, Protocol


class ProbeBackend(Protocol):
    def snapshot(self) -> None:
        """Before optimizer.step(): keep θ_t of this rank's shard."""

    def after_step(self) -> str | None:
        """Right after optimizer.step(): keep θ_{t+1} and whatever state the probe's forwards could
        disturb. Returns why the step cannot be measured (the optimizer skipped it, or it changed
        no parameter on any rank), or None; the answer is the same on every rank."""

    def resolution_floor(self) -> float:
        """After after_step(): the step multiple at which half of the parameters that the step
        changed move in the compute dtype (backends/resolution.py); the same on every rank."""

    def write(self, step_multiple: float) -> None:
        """Put θ(s) = lerp(θ_t, θ_{t+1}, s) into the parameters the forward pass reads (s may be
        negative: the slope is measured on both sides of θ_t); with a group selected, only the
        group's parameters move and every other one is θ_t."""

    def write_rounding_noise(self, sample: int) -> bool:
        """Put θ_t into the parameters the forward reads with every element the step changed
        moved one compute-dtype ulp, up or down by a hash of its position and `sample`
        (backends/lerp.py one_ulp_moved_into): the loss there differs from L(θ_t) by rounding
        alone. Returns False, writing nothing, where the compute dtype is fp32 or wider."""

    def parameter_names(self) -> list[str]:
        """After after_step(): the names of the parameters the optimizer updates, the same list on
        every rank (the union over ranks that hold different ones, in rank order). Names are the
        model's own, wrapper prefixes removed; Megatron layers are numbered globally."""

    def select_group(self, names: Collection[str] | None) -> None:
        """Restrict write() and resolution_floor() to the named parameters: θ(s) = θ_t + s·Δθ_G.
        None selects every parameter again. A collective: every rank passes the same names.
        restore() selects None."""

    def loss(self, task: str | None) -> float:
        """Forward-only loss at the current parameters, reduced so that every rank gets the same
        float. task None is the batch of the step; a name is a relative task's batch."""

    def commit(self, step_multiple: float, names: Collection[str] | None) -> None:
        """Before restore(): make θ_t + s·Δθ (on the named parameters' elements only; all where
        None) what restore() puts back in place of θ_{t+1}: the fp32 master shard and, through
        restore's own copy and all-gather, the model params. The optimizer's state (moments, step
        count) stays as the real step left it. Local: no collective."""

    def restore(self) -> None:
        """Put θ_{t+1} and the state kept by after_step back, bitwise, and free the snapshot.
        Safe to call at any point after snapshot(), also when after_step() was never reached."""
