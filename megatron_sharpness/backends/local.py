"""Local trial-point writes: no collective per trial point where the fp32 master is sharded.

With Megatron's distributed optimizer, ZeRO-1/2 and BF16_Optimizer each data-parallel rank holds a
shard of the fp32 master but, after the step's own all-gather, the full model-dtype (bf16/fp16)
parameters of its tensor/pipeline slice. A sharded write lerps the master shard and all-gathers the
parameters once per trial point. A local write needs no collective: every rank keeps

- the anchor: θ_{t+1} in the model dtype, a copy of its full parameters right after the step;
- the step: θ_{t+1} − θ_t of the fp32 master, rounded to bf16 (fp32's range: an fp16 step would
  underflow), formed on each rank's shard and all-gathered once per measurement;

and writes θ(s) = anchor + (s − 1)·step into the parameters (computed in fp32, rounded once to the
model dtype); restore is a copy of the anchor. s = 1 is the anchor bitwise. The step's all-gather
is asynchronous: it runs beside the next forward (NCCL) and is waited for at the first local write.

Why the step is the fp32 difference and not the difference of the bf16 endpoints: an element
whose master moved less than half a bf16 ulp has equal bf16 endpoints, so a lerp between those
never moves it, while the true line does at large step multiples (critical lrs often lie at
s ≫ 1): such writes searched another direction. Why θ_{t+1} anchors the line: s = 1 is then
exact and nearby points share its rounding. Near θ_t the rounding of the anchor would stand in
for a change of the loss, so trial points below LOCAL_FROM go through the sharded path, which is
exact there (s = 0 gives θ_t bitwise, and the resolution floor describes it). The resolution floor
of the local line (where its elements leave their value at s = 0) is computed too, and the backend
takes the larger one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_sharpness.backends.lerp import chunk_elements
from megatron_sharpness.backends.resolution import SAMPLE_ELEMENTS, ResolutionHistogram
from megatron_sharpness.faults import OUT_OF_MEMORY, RankError, device_of, gather_errors

# Trial points at this step multiple and above are written locally, below it through the sharded
# path: each side is anchored at the endpoint nearer to it.
LOCAL_FROM = 0.5
# Dtypes of the model params that local writes serve (fp32 model params are the master or a
# copy of it: nothing to save).
LOCAL_DTYPES = (torch.bfloat16, torch.float16)
STEP_DTYPE = torch.bfloat16


def offset_in(flat: torch.Tensor, view: torch.Tensor) -> int | None:
    """Where view starts inside flat (both over the same storage), in elements; None if elsewhere."""
    if view.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
        return None
    start = (view.data_ptr() - flat.data_ptr()) // flat.element_size()
    return start if 0 <= start and start + view.numel() <= flat.numel() else None


def local_bytes(flats: Sequence[torch.Tensor]) -> int:
    """What LocalWrites holds for these flats: the anchor in the model dtype and the step in bf16."""
    return sum(flat.numel() * (flat.element_size() + torch.finfo(STEP_DTYPE).bits // 8) for flat in flats)


class LocalWrites:
    """flats: the full model-dtype tensors the forward reads (each contiguous; every parameter of
    the slice is a view into one of them). shards: per flat, this rank's (fp32 master, θ_t of it,
    model-side view inside the flat) triples. gather_steps(steps): starts the all-gathers of the
    step buffers (laid out like the flats) the way the framework all-gathers the flats, and
    returns their work handles (async_op=True)."""

    def __init__(self, flats: Sequence[torch.Tensor], gather_steps: Callable[[list[torch.Tensor]], list]):
        self.flats = [flat.view(-1) for flat in flats]
        self.gather_steps = gather_steps
        self._pending: list = []
        # Allocated before the optimizer step, so that a snapshot that does not fit is known
        # (and agreed on) before anything changed.
        self.anchors = [torch.empty_like(flat) for flat in self.flats]
        self.steps = [torch.zeros(flat.numel(), dtype=STEP_DTYPE, device=flat.device) for flat in self.flats]

    def step_view(self, index: int, view: torch.Tensor) -> torch.Tensor:
        start = offset_in(self.flats[index], view)
        assert start is not None, "a shard's model-side view must lie inside its flat"
        return self.steps[index][start:start + view.numel()]

    @torch.no_grad()
    def take_step(self, shards: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]) -> None:
        """After the optimizer step and its all-gather: the anchor and the gathered step."""
        for anchor, flat in zip(self.anchors, self.flats):
            anchor.copy_(flat)
        for index, triples in enumerate(shards):
            for new, old, view in triples:
                step = self.step_view(index, view)
                new_flat, old_flat = new.reshape(-1), old.reshape(-1)
                chunk = chunk_elements(new_flat.device)
                for start in range(0, new_flat.numel(), chunk):
                    end = start + chunk
                    step[start:end].copy_(new_flat[start:end] - old_flat[start:end])
        self._pending = self.gather_steps(self.steps)

    def wait(self) -> None:
        """Until the step's all-gather has landed."""
        for work in self._pending:
            work.wait()
        self._pending = []

    @torch.no_grad()
    def write(self, step_multiple: float) -> None:
        if step_multiple != 1.0:
            self.wait()
        for flat, anchor, step in zip(self.flats, self.anchors, self.steps):
            if step_multiple == 1.0:
                flat.copy_(anchor)  # bitwise, also for −0.0 and non-finite elements
                continue
            # A one-element fp32 tensor (not a Python scalar, not 0-dim) makes fp32 the computation
            # dtype: one kernel, rounded once to the model dtype. torch.add(..., alpha=) on bf16
            # tensors rounds alpha itself to bf16 on CPU (8 bits of the step multiple).
            weight = torch.tensor([step_multiple - 1.0], dtype=torch.float32, device=flat.device)
            # CUDA casts inside the kernel; the CPU casts each input to an fp32 temporary first.
            chunk = flat.numel() if flat.is_cuda else chunk_elements(flat.device)
            for start in range(0, flat.numel(), chunk):
                end = start + chunk
                torch.addcmul(anchor[start:end], step[start:end], weight, out=flat[start:end])

    @torch.no_grad()
    def restore(self) -> None:
        self.wait()  # no collective may still write into the step when it is freed
        for flat, anchor in zip(self.flats, self.anchors):
            flat.copy_(anchor)

    @torch.no_grad()
    def histogram(self, shards: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
                  device: torch.device | str) -> ResolutionHistogram:
        """This rank's share of the local line's resolution histogram: a systematic sample of its
        shard's elements along anchor + (s − 1)·step (sum it over the ranks, as the sharded line's).
        Reads this rank's part of the step only: no need to wait for the gather."""
        views = [(self.anchors[index], self.step_view(index, view), offset_in(self.flats[index], view), view.numel())
                 for index, triples in enumerate(shards) for _, _, view in triples]
        stride = sample_stride(sum(numel for *_, numel in views))
        segments = []
        for anchor, step, start, numel in views:
            new = anchor[start:start + numel][::stride].float()
            segments.append((new - step[::stride].float(), new, anchor.dtype))
        histogram = ResolutionHistogram.of_segments(segments, device)
        histogram.counts *= stride  # each sampled element stands for `stride`, as in the sharded line's
        return histogram


def sample_stride(numel: int) -> int:
    """The smallest prime that takes at most SAMPLE_ELEMENTS of numel elements (a prime stride
    does not alias with row lengths)."""
    stride = max(-(-numel // SAMPLE_ELEMENTS), 1)
    while stride > 2 and any(stride % k == 0 for k in range(2, int(stride ** 0.5) + 1)):
        stride += 1
    return stride


def wants_local(mode: str, budget_mib: float | None, flats: Sequence[torch.Tensor]) -> bool:
    """Whether this rank asks for local writes (the ranks agree in agree_on_local_writes)."""
    if mode == "sharded":
        return False
    return mode == "local" or budget_mib is None or local_bytes(flats) <= budget_mib * 2**20


def agree_on_local_writes(theta_error: BaseException | None, possible: bool, mode: str, budget_mib: float | None,
                          flats: Sequence[torch.Tensor], gather_steps: Callable[[list[torch.Tensor]], list]
                          ) -> tuple[LocalWrites | None, list[RankError], bool]:
    """After θ_t's snapshot (theta_error: where it did not fit), before the optimizer step: this
    measurement's local writes where every rank asked for them and has their buffers, else None;
    the errors that skip the measurement (θ_t on some rank; with mode "local" also the buffers);
    whether some rank's buffers did not fit (auto then writes sharded from now on)."""
    wanted = possible and wants_local(mode, budget_mib, flats)
    local, local_error = None, None
    if wanted and theta_error is None:
        try:
            local = LocalWrites(flats, gather_steps)
        except OUT_OF_MEMORY as caught:
            local_error = caught
    errors, local_errors, everywhere = agree_on_snapshot(theta_error, local_error, wanted)
    if local_errors and mode == "local":
        errors = errors or local_errors
    if local_errors or not everywhere:
        local = None
    return local, errors, bool(local_errors)


def agree_on_snapshot(theta_error: BaseException | None, local_error: BaseException | None, wanted: bool,
                      group=None) -> tuple[list[RankError], list[RankError], bool]:
    """One all-reduce before the optimizer step: (the ranks whose θ_t did not fit, the ranks whose
    local-write buffers did not fit, whether every rank wanted local writes). The error texts cost
    a second collective, only where some rank failed."""
    if not (dist.is_available() and dist.is_initialized()):
        return ([] if theta_error is None else [RankError.of(0, theta_error)],
                [] if local_error is None else [RankError.of(0, local_error)], wanted)
    flags = torch.tensor([float(theta_error is not None), float(local_error is not None), float(not wanted)],
                         dtype=torch.float64, device=device_of(group))
    dist.all_reduce(flags, group=group)
    theta_errors = gather_errors(theta_error, group) if flags[0].item() > 0 else []
    local_errors = gather_errors(local_error, group) if flags[1].item() > 0 else []
    return theta_errors, local_errors, flags[2].item() == 0
