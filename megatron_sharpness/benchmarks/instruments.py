"""What the benchmarks measure inside one rank, and how (benchmark code, not the package's hot path).

- Collectives: every torch.distributed collective call of the probe outside its forwards (writes,
  snapshot, after_step, restore), with the bytes of its output (a gather's full result, a
  reduction's tensor) and its seconds; inside loss() (the model's own, e.g. the vocab-parallel
  cross entropy's, and the loss reductions) only counted. Installed before megatron-core or
  DeepSpeed is imported, because both keep their own references to torch.distributed's
  functions (megatron-core's dist_all_gather_func, DeepSpeed's all_gather_function).
- Phases: wall and CPU time inside each backend method (snapshot, after_step, write, loss,
  restore), the probe's measure() and the resolution floor's histogram (ResolutionHistogram's
  of_segments and floor). The forwards are the time in loss(); everything else of a probe (the snapshot
  before the optimizer step and measure() after it) is its non-forward part. The CPU time of the
  process is the work done: on a machine that other jobs share, the wall time also counts the
  waiting for a core (and a collective counts the slower rank's lag).
- Memory: the peak of the bytes allocated since a window opened, from the allocation events of
  torch's profiler (profile_memory=True): each carries the allocator's running total (c10's CPU
  allocator, CUDA's caching allocator), so the peak counts every tensor the probe, the optimizer
  step or a forward allocates and frees, however briefly, and nothing allocated before the
  window. RSS would not: the C allocator keeps freed pages, and a temporary freed and reused
  inside one write never shows. The same peak outside the probe's forwards separates what the
  probe holds from a forward's own activations, and outside the resolution floor's histogram too
  what the snapshot and the writes hold.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from typing import Any, Iterator

import torch
import torch.distributed as dist

# Point-to-point sends of pipeline stages are the forwards' own, and P2POp checks isend/irecv by
# identity: not wrapped.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced",
               "all_reduce_coalesced", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "all_gather_object",
               "broadcast_object_list", "barrier")


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


class CollectiveCounter:
    """Counts torch.distributed collectives (calls, bytes, seconds) while `active`; those issued
    while `in_loss` (a probe forward with its loss reduction) apart."""

    def __init__(self):
        self.active = False
        self.in_loss = False
        self.calls: dict[str, int] = defaultdict(int)
        self.loss_calls = 0
        self.bytes = 0
        self.seconds = 0.0
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._counted(name, original))

    def _counted(self, name, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            if self.in_loss:
                self.loss_calls += 1
                return original(*args, **kwargs)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls[name] += 1
                self.bytes += _tensor_bytes(args[0] if args else next(iter(kwargs.values()), None))

        return counted

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds, self.loss_calls = defaultdict(int), 0, 0.0, 0

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a machine shared with other jobs the CPU
    time is the work done, the wall time also the waiting for a core."""
    return time.perf_counter(), time.process_time()


def since(started: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - started[0], now[1] - started[1]


class PhaseTimer:
    """Wall and CPU seconds spent inside named methods of objects, accumulated while `active`."""

    def __init__(self):
        self.active = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, method: str, phase: str | None = None) -> None:
        original = getattr(owner, method)
        phase = phase or method

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if self._depth[phase]:
                return original(*args, **kwargs)
            self._depth[phase] += 1
            started = clock()
            try:
                with torch.profiler.record_function(f"probe.{phase}"):  # found by peak_allocated
                    return original(*args, **kwargs)
            finally:
                self._depth[phase] -= 1
                if self.active:
                    wall, cpu = since(started)
                    self.seconds[phase] += wall
                    self.cpu[phase] += cpu
                    self.calls[phase] += 1

        setattr(owner, method, timed)

    def reset(self) -> None:
        self.seconds, self.cpu, self.calls = defaultdict(float), defaultdict(float), defaultdict(int)


def instrument_backend(timer: PhaseTimer, probe: Any, backend: Any, param_gather: tuple[Any, str]) -> None:
    """Times the probe's measure(), the backend's protocol methods and the resolution floor's
    histogram, and counts the all-gathers of the params (param_gather: the object and method that
    issue one) and of the step of local writes."""
    from megatron_sharpness.backends.local import LocalWrites
    from megatron_sharpness.backends.resolution import ResolutionHistogram

    for method in ("snapshot", "after_step", "write", "loss", "restore"):
        timer.wrap(backend, method)
    timer.wrap(probe, "measure")
    timer.wrap(ResolutionHistogram, "of_segments", "floor")
    timer.wrap(ResolutionHistogram, "floor", "floor")
    timer.wrap(*param_gather, "param_gather")
    timer.wrap(LocalWrites, "take_step", "step_gather")


@contextlib.contextmanager
def peak_allocated(device: torch.device, result: dict, outside: str = "probe.loss") -> Iterator[None]:
    """result["peak"]: the most bytes allocated on `device` at once inside the window, counting
    only what was allocated inside it (see the module docstring); result["peak_outside"]: the
    same over the moments outside the phases labelled `outside` (the probe's forwards);
    result["peak_writes"]: outside those and the resolution floor's histogram too."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    # The allocators report every allocation to the profiler's CPU side; no CUPTI needed.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    events = sorted((node for node in nodes
                     if node.tag == _EventType.Allocation and node.extra_fields.device.type == device.type),
                    key=lambda node: node.start_time_ns)
    spans = [(node.start_time_ns, node.end_time_ns) for node in nodes if node.name == outside]
    if not events:
        result["peak"] = result["peak_outside"] = result["peak_writes"] = 0
        return
    # The running total also holds bytes allocated before the window (CUDA: all of them; CPU:
    # those an earlier window allocated and that were freed outside any window): measure from the
    # total just before this window's first event.
    first = events[0].extra_fields
    opened = first.total_allocated - first.alloc_size
    result["peak"] = max(event.extra_fields.total_allocated for event in events) - opened
    if device.type == "cuda":  # the caching allocator's own account, to check the events against
        result["peak_cuda_stats"] = torch.cuda.max_memory_allocated(device) - start
    result["peak_outside"] = max((event.extra_fields.total_allocated for event in events
                                  if not any(start <= event.start_time_ns <= end for start, end in spans)),
                                 default=opened) - opened
    floor_spans = spans + [(node.start_time_ns, node.end_time_ns) for node in nodes if node.name == "probe.floor"]
    result["peak_writes"] = max((event.extra_fields.total_allocated for event in events
                                 if not any(start <= event.start_time_ns <= end for start, end in floor_spans)),
                                default=opened) - opened


def count_inside(counter: CollectiveCounter, owner: Any, method: str, flag: str = "active") -> None:
    """Sets counter.<flag> while owner.method runs: "active" for the probe's part of a training
    step, "in_loss" for its forwards."""
    original = getattr(owner, method)

    @functools.wraps(original)
    def counted(*args, **kwargs):
        setattr(counter, flag, True)
        try:
            return original(*args, **kwargs)
        finally:
            setattr(counter, flag, False)

    setattr(owner, method, counted)


class ProbeStats:
    """Per measured probe: forwards, seconds per phase, collectives; summarised as medians."""

    def __init__(self, timer: PhaseTimer, counter: CollectiveCounter):
        self.timer, self.counter = timer, counter
        self.rows: list[dict] = []

    def start(self) -> None:
        self.timer.reset()
        self.counter.reset()
        self.timer.active = True

    def stop(self, measurement) -> None:
        self.timer.active = False
        timer = self.timer
        self.rows.append({
            "forwards": measurement.forwards, "phases": {"wall": dict(timer.seconds), "cpu": dict(timer.cpu)},
            "writes": timer.calls.get("write", 0), "collectives": self.counter.total,
            "param_gathers": timer.calls.get("param_gather", 0), "step_gathers": timer.calls.get("step_gather", 0),
            "collective_calls": dict(self.counter.calls), "loss_collectives": self.counter.loss_calls,
            "collective_bytes": self.counter.bytes, "collective_seconds": self.counter.seconds})

    def summary(self, forward_seconds: tuple[float, float], train_step_seconds: tuple[float, float]) -> dict:
        """forward_seconds, train_step_seconds: (wall, CPU) medians."""
        import statistics

        median = statistics.median
        result = {
            "forwards": median([row["forwards"] for row in self.rows]),
            "forwards_max": max(row["forwards"] for row in self.rows),
            "writes": median([row["writes"] for row in self.rows]),
            "param_gathers": median([row["param_gathers"] for row in self.rows]),
            "step_gathers": median([row["step_gathers"] for row in self.rows]),
            "collectives": median([row["collectives"] for row in self.rows]),
            "collectives_per_forward": median([row["loss_collectives"] / row["forwards"] for row in self.rows]),
            "collective_bytes": median([row["collective_bytes"] for row in self.rows]),
            "collective_ms": 1e3 * median([row["collective_seconds"] for row in self.rows]),
            "collective_calls": self.rows[-1]["collective_calls"],
        }
        for index, kind in enumerate(("wall", "cpu")):
            forward, step = forward_seconds[index], train_step_seconds[index]
            # The probe: the snapshot before the optimizer step and everything after it.
            probes = [row["phases"][kind].get("snapshot", 0.0) + row["phases"][kind].get("measure", 0.0)
                      for row in self.rows]
            parts = [row["phases"][kind] for row in self.rows]
            result[kind] = {
                "probe_ms": 1e3 * median(probes), "forward_ms": 1e3 * forward, "train_step_ms": 1e3 * step,
                "probe_over_forwards": median([probe / (row["forwards"] * forward)
                                               for probe, row in zip(probes, self.rows)]),
                # the same without the resolution floor's histogram (being replaced by a cheap one)
                "probe_over_forwards_without_floor": median([(probe - part.get("floor", 0.0)) / (row["forwards"] * forward)
                                                             for probe, part, row in zip(probes, parts, self.rows)]),
                "non_forward_share": median([1 - part.get("loss", 0.0) / probe for probe, part in zip(probes, parts)]),
                "floor_share": median([part.get("floor", 0.0) / probe for probe, part in zip(probes, parts)]),
                "phase_ms": {name: 1e3 * median([part.get(name, 0.0) for part in parts])
                             for name in ("snapshot", "after_step", "floor", "write", "loss", "restore")},
                "probe_over_train_step": median(probes) / step,
            }
        return result
