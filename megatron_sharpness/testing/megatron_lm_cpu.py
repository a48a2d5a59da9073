"""Run NVIDIA/Megatron-LM's own training scripts (pretrain_gpt.py) on CPU with gloo.

    torchrun --nproc-per-node 2 -m megatron_sharpness.testing.megatron_lm_cpu \\
        /path/to/Megatron-LM/pretrain_gpt.py --distributed-backend gloo --transformer-impl local ...

installs the shims below, then runs the script as __main__ with the remaining arguments (the
script's folder first on sys.path, as `python pretrain_gpt.py` would have it). Put the checkout
first on PYTHONPATH too, so that its own megatron/core is the one imported.

This is test machinery, never part of a real run: Megatron-LM's training loop assumes CUDA in many
places that have nothing to do with the math we test. Each shim below says which places and why.
The megatron-core shims of megatron_cpu.py come first; the ones here cover Megatron-LM's training
code (megatron/training/) and the parts of megatron-core it reaches that our own loops do not.
The math runs unchanged, in the dtype the flags ask for, on CPU tensors. With one fake device
Megatron seeds its model-parallel RNG tracker, whose states megatron_cpu maps onto torch's CPU
generator: dropout, inside tensor-parallel regions too, draws from that one generator.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.abc
import importlib.util
import os
import runpy
import shutil
import sys
import sysconfig
import tempfile
import types
from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from megatron_sharpness.testing.megatron_cpu import install_cpu_shims

_installed = False


def _names_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, int) and not isinstance(device, bool):  # a bare ordinal is a CUDA device to torch
        return True
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Sends every tensor that Megatron-LM asks for on 'cuda' to the CPU instead.

    Megatron-LM writes device='cuda' / device=torch.cuda.current_device() in factories all over
    its training code (loss and token-count accumulators, the batch broadcast buffers of
    get_batch_on_this_tp_rank, grad-norm and timer reductions), moves batches and models with
    .cuda() / .to('cuda') / .to(device=...) and pins host memory. Catching these at the torch
    function level covers every call site of every version without listing them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda(...): stay where it is (on the CPU)
            return args[0]
        if name in ("pin_memory", "is_pinned"):  # pinning needs a CUDA driver
            return args[0] if name == "pin_memory" else False
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if name == "to":
            args = tuple("cpu" if _names_cuda(a) else a for a in args)
        kwargs.pop("pin_memory", None)
        return func(*args, **kwargs)


class _HostStream:
    """Stands for a CUDA stream or event: CPU work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _HostStream:
        return _HostStream()

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:  # Event.wait (Megatron-FSDP waits for its gradient reduce)
        pass

    def query(self) -> bool:
        return True


def _compiler_tools_for_this_python() -> str:
    """A folder with `python3` and `python3-config` for the running interpreter.

    Megatron compiles its dataset index helpers at start-up with a Makefile that calls `python3 -m
    pybind11 --includes` and `python3-config --extension-suffix` from PATH; in a venv (and under
    pyenv) those can be another Python, whose extension module this one cannot import."""
    folder = Path(tempfile.mkdtemp(prefix="megatron-lm-cpu-bin-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    # Scripts, not symlinks: a venv's python must be started by its own path to find its venv.
    for name, body in (("python3", f'exec "{sys.executable}" "$@"'),
                       ("python3-config", f"echo {sysconfig.get_config_var('EXT_SUFFIX')}")):
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return str(folder)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs patch(module) right after `name` is first imported (the checkout's module, whichever
    version it is, and only if the script imports it)."""

    def __init__(self, name: str, patch: Callable) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module) -> None:
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def _after_import(name: str, patch: Callable) -> None:
    if name in sys.modules:
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, patch))


class _CpuDevice(str):
    """What torch.cuda.current_device() answers under Megatron-FSDP: "cpu" wherever torch reads it
    as a device, "0" where Megatron-FSDP formats it into f"cuda:{...}" (its device string, which
    _CudaToCpu then sends to the CPU). megatron_cpu's torch.device("cpu") would make "cuda:cpu";
    an int 0 would be a CUDA device in the autograd engine's threads, where no TorchFunctionMode runs."""

    def __format__(self, spec: str) -> str:
        return "0"


def install_megatron_lm_cpu_shims(megatron_fsdp: bool = False) -> None:
    """Make Megatron-LM's training loop run on CPU with gloo; call before importing its scripts."""
    global _installed
    if _installed:
        return
    _installed = True
    install_cpu_shims()
    if megatron_fsdp:
        torch.cuda.current_device = lambda: _CpuDevice("cpu")

    # initialize_megatron asserts torch.cuda.is_available() ("Megatron requires CUDA"), and with
    # device_count() == 0 it neither builds the model-parallel groups nor seeds the RNG tracker
    # (TP > 1 then fails, and dropout forks an unseeded tracker). One fake device per process.
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *args, **kwargs: None

    # validate_args reads the device's compute capability when TP or CP > 1 (Hopper and older
    # need CUDA_DEVICE_MAX_CONNECTIONS=1, which the tests set); answer as a Hopper would.
    properties = types.SimpleNamespace(name="CPU (megatron_lm_cpu)", major=9, minor=0, total_memory=2 ** 40,
                                       multi_processor_count=1)
    torch.cuda.get_device_properties = lambda *args, **kwargs: properties
    torch.cuda.get_device_capability = lambda *args, **kwargs: (properties.major, properties.minor)
    torch.cuda.get_device_name = lambda *args, **kwargs: properties.name

    # get_model builds the DDP wrappers inside a side stream (for CUDA-graph capture) and the
    # pipeline schedules keep communication streams and events.
    torch.cuda.Stream = _HostStream
    torch.cuda.Event = _HostStream
    torch.cuda.current_stream = lambda *args, **kwargs: _HostStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _HostStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.set_stream = lambda *args, **kwargs: None

    # With CUDA faked, torch.optim.Adam asks torch.accelerator for the current accelerator to
    # pick its fused/foreach path: answer "none".
    torch.accelerator.is_available = lambda: False
    torch.accelerator.current_accelerator = lambda *args, **kwargs: None

    # Megatron's jit fusions (bias-GeLU, bias-dropout-add, ...) are torch.compile'd even when
    # unused by the flags' path; compiling on CPU needs a C++ toolchain per process and minutes.
    torch._dynamo.config.disable = True

    # The dataset index helpers' Makefile must build for this interpreter.
    os.environ["PATH"] = _compiler_tools_for_this_python() + os.pathsep + os.environ.get("PATH", "")

    # core_v0.16's start-up "loads fused kernels": it runs nvcc to read the CUDA version (there is
    # none); the local transformer with the --no-*-fusion flags uses none of those kernels.
    _after_import("megatron.legacy.fused_kernels", lambda module: setattr(module, "load", lambda args: None))

    _after_import("megatron.core.transformer.torch_norm", _sequence_parallel_norms)

    _CudaToCpu().__enter__()


def _sequence_parallel_norms(module) -> None:
    """A CPU stand-in for apex's FusedLayerNorm under sequence parallelism (ours, not Megatron's).

    Without apex the local transformer spec builds torch's LayerNorm/RMSNorm through
    WrappedTorchNorm, which asserts that sequence parallelism is off. With it on, each tensor-parallel
    rank normalises its own part of the sequence and the norm weights' gradients are partial sums
    that finalize_model_grads all-reduces over the tensor-parallel group — for the weights tagged
    `sequence_parallel`, as apex's FusedLayerNorm tags them. This builds torch's norm and tags its
    weights the same way; the math is torch's (no fused kernel)."""
    build = module.WrappedTorchNorm.__new__

    def build_tagged(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return build(cls, config, hidden_size, eps, *args, **kwargs)
        config.sequence_parallel = False
        try:
            norm = build(cls, config, hidden_size, eps, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for weight in norm.parameters():
            weight.sequence_parallel = True
        return norm

    module.WrappedTorchNorm.__new__ = staticmethod(build_tagged)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit("usage: python -m megatron_sharpness.testing.megatron_lm_cpu SCRIPT.py [SCRIPT ARGS...]; "
                         f"got {argv!r}")
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        raise SystemExit(f"megatron_lm_cpu: no such training script: {script}")
    install_megatron_lm_cpu_shims(megatron_fsdp="--use-megatron-fsdp" in argv)
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
