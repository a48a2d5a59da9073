"""Writing a trial point along one parameter group's part of the update.

A backend's (fp32 master, model tensor) pairs are whole parameters (plain PyTorch, megatron-core)
or flat partitions that hold pieces of many parameters (ZeRO, DeepSpeed's BF16/FP16 optimizers).
Each pair gets a list of segments (parameter name, first element, end element) in the pair's own
element coordinates. For a group G, θ(s) = θ_t + s·Δθ_G: the group's segments are lerped and every
other element of the pair is θ_t.
"""

from __future__ import annotations

from typing import Callable, Collection, Iterable, Sequence

import torch

from megatron_sharpness.backends.lerp import lerp_into
from megatron_sharpness.backends.resolution import ResolutionHistogram

Segment = tuple[str, int, int]
Ranges = list[tuple[int, int]]


def whole(name: str, tensor: torch.Tensor) -> list[Segment]:
    return [(name, 0, tensor.numel())]


def view_segments(container: torch.Tensor, views: Iterable[tuple[str, torch.Tensor]]) -> list[Segment]:
    """Where each named tensor that views container's storage lies inside container (a flat
    partition), clipped to it: a parameter that lies in other ranks' partitions gets no segment."""
    size = container.element_size()
    storage = container.untyped_storage().data_ptr()
    segments = []
    for name, view in views:
        if view.numel() == 0 or view.untyped_storage().data_ptr() != storage:
            continue
        start = (view.data_ptr() - container.data_ptr()) // size
        first, end = max(start, 0), min(start + view.numel(), container.numel())
        if first < end:
            segments.append((name, first, end))
    return segments


def local_names(segments: Sequence[Sequence[Segment]]) -> list[str]:
    """The parameter names of this rank's pairs, each once, in the order the pairs hold them."""
    return list(dict.fromkeys(name for pair in segments for name, _, _ in pair))


def union_in_rank_order(per_rank: Sequence[Sequence[str]]) -> list[str]:
    """Every rank's names, each once: rank 0's in its order, then the names only later ranks hold
    (a later pipeline stage's layers, say)."""
    return list(dict.fromkeys(name for names in per_rank for name in names))


def group_ranges(segments: Sequence[Sequence[Segment]], names: Collection[str]) -> list[Ranges]:
    """Per pair, the element ranges that the named parameters own, adjacent ranges merged."""
    chosen = set(names)
    per_pair = []
    for pair in segments:
        ranges: Ranges = []
        for name, start, end in sorted((s for s in pair if s[0] in chosen), key=lambda s: s[1]):
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        per_pair.append(ranges)
    return per_pair


@torch.no_grad()
def write_group(target: torch.Tensor, old: torch.Tensor, new: torch.Tensor, weight: float,
                ranges: Ranges | None, cast: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """target ← lerp(old, new, weight) on ranges (None: everywhere), old elsewhere; cast: how a
    value becomes target's (lerp_into)."""
    if ranges is None:
        lerp_into(target, old, new, weight, cast)
        return
    covered = sum(end - start for start, end in ranges)
    if covered < old.numel():
        target.view(-1).copy_(old.view(-1) if cast is None else cast(old.view(-1)))
    for start, end in ranges:
        lerp_into(target.view(-1)[start:end], old.view(-1)[start:end], new.view(-1)[start:end], weight, cast)


@torch.no_grad()
def commit_pairs(olds: Sequence[torch.Tensor], news: Sequence[torch.Tensor], weight: float,
                 segments: Sequence[Sequence[Segment]], names: Collection[str] | None) -> None:
    """news ← lerp(olds, news, weight) in place, on the named parameters' elements (None: all):
    the step θ_t → θ_{t+1} shortened to `weight` of itself, the rest of θ_{t+1} untouched."""
    ranges = None if names is None else group_ranges(segments, names)
    for index, (old, new) in enumerate(zip(olds, news)):
        for start, end in [(0, new.numel())] if ranges is None else ranges[index]:
            lerp_into(new.view(-1)[start:end], old.view(-1)[start:end], new.view(-1)[start:end], weight)


def group_histogram(dtypes: Sequence[torch.dtype], olds: Sequence[torch.Tensor], news: Sequence[torch.Tensor],
                    ranges: Sequence[Ranges], device: torch.device | str = "cpu") -> ResolutionHistogram:
    """This rank's resolution histogram over the group's elements only (sum it over ranks);
    dtypes: each pair's compute dtype."""
    return ResolutionHistogram.of_segments([(old.reshape(-1)[start:end], new.reshape(-1)[start:end], dtype)
                                            for dtype, old, new, pair_ranges in zip(dtypes, olds, news, ranges)
                                            for start, end in pair_ranges], device)


class GroupSelection:
    """The selected group's ranges per pair (None: every element), and its resolution floor,
    computed once per group and measurement. summed: sums a histogram's counts over the ranks that
    hold different parameters (identity where every rank holds the same ones)."""

    def __init__(self, summed: Callable[[torch.Tensor], None]):
        self.summed = summed
        self.ranges: list[Ranges] | None = None
        self.floor: float | None = None

    def select(self, segments: Sequence[Sequence[Segment]], names: Collection[str] | None,
               dtypes: Sequence[torch.dtype], olds: Sequence[torch.Tensor], news: Sequence[torch.Tensor],
               device: torch.device | str = "cpu") -> None:
        """A collective where summed is one: every rank selects the same names in the same order."""
        if names is None:
            self.ranges = self.floor = None
            return
        self.ranges = group_ranges(segments, names)
        histogram = group_histogram(dtypes, olds, news, self.ranges, device)
        self.summed(histogram.counts)
        self.floor = histogram.floor()

    def clear(self) -> None:
        self.ranges = self.floor = None

    def pair(self, index: int) -> Ranges | None:
        return None if self.ranges is None else self.ranges[index]
