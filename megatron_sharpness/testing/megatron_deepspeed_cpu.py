"""CPU harness for the real Megatron-DeepSpeed `pretrain_gpt.py` (gloo, DS_ACCELERATOR=cpu).

    python -m megatron_sharpness.testing.megatron_deepspeed_cpu pretrain_gpt.py ARGS...

installs the shims below, then runs the script as `__main__`; `run()` launches it that way under
torchrun on a patched checkout that `prepare_checkout()` made. Megatron-DeepSpeed reaches the
device through DeepSpeed's accelerator, so it needs one shim where Megatron-LM needs many:

- S1 vision imports: megatron/training.py imports megatron.model.vision.knn_monitor (DINO
  pretraining only), which imports torchvision at module level. The only torchvision wheel for
  torch 2.13 is a CUDA build whose import fails on CPU torch, and a fake torchvision package would
  be picked up by transformers (imported by Megatron's tokenizers). The module is replaced by one
  whose functions refuse to run.
- S2 params norm: megatron/utils.py calc_params_l2_norm (--log-params-norm) calls
  `torch.norm(list_of_tensors)` when the device is not CUDA (CUDA uses apex's
  multi_tensor_l2norm), which torch refuses. torch.norm is wrapped to take a list or tuple of
  tensors as the one vector they make up, which is what multi_tensor_l2norm computes.

What a CPU run needs besides (all in `command()` / `run()`): gloo; `LOCAL_SIZE` = ranks per node
(Megatron-DeepSpeed reads it for the local rank); the `--no-*-fusion` flags (the fused kernels are
CUDA-only); `--micro-batch-size 1` (the non-flash attention path views a sliced QKV tensor, which
only works for one sample per micro-batch); a Python environment with deepspeed <= 0.19.6 (0.19.7
removed deepspeed.compression.compress, which megatron/training.py imports), built by
`.ci/megatron-deepspeed-venv.sh` together with DeepSpeed's CPU comm op, whose JIT cache
(`TORCH_EXTENSIONS_DIR`) must not be shared with another deepspeed version.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tarfile
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_sharpness.testing.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "patches" / "megatron-deepspeed" / "0001-critical-sharpness.patch"
VENV_SCRIPT = ROOT / ".ci" / "megatron-deepspeed-venv.sh"
# Where .ci/megatron-deepspeed-venv.sh builds the environment unless told otherwise.
DEFAULT_VENV = Path.home() / ".cache" / "megatron-sharpness" / "ds0196-venv"
SNAPSHOT = "megatron-deepspeed-4efb479d.tar.gz"


def _refuse(*args, **kwargs):
    raise RuntimeError("megatron.model.vision.knn_monitor is stubbed by the CPU harness "
                       "(megatron_sharpness.testing.megatron_deepspeed_cpu, shim S1): no vision training here")


def _norm_accepting_tensor_lists(norm):
    def wrapped(input, *args, **kwargs):
        if isinstance(input, (list, tuple)):
            input = torch.cat([tensor.reshape(-1) for tensor in input])
        return norm(input, *args, **kwargs)

    return wrapped


def install_shims() -> None:
    torch.norm = _norm_accepting_tensor_lists(torch.norm)
    knn_monitor = types.ModuleType("megatron.model.vision.knn_monitor")
    knn_monitor.__doc__ = "S1: stand-in without torchvision (megatron_sharpness.testing.megatron_deepspeed_cpu)"
    for name in ("compute_feature_bank", "get_feature_bank", "knn_predict"):
        setattr(knn_monitor, name, _refuse)
    sys.modules[knn_monitor.__name__] = knn_monitor


def venv_python(venv: Path | None = None) -> Path | None:
    """The venv's python if .ci/megatron-deepspeed-venv.sh completed it, else None."""
    venv = Path(os.environ.get("MEGATRON_SHARPNESS_DS_VENV", DEFAULT_VENV)) if venv is None else venv
    python = venv / "bin" / "python"
    return python if python.exists() and (venv / ".megatron-sharpness-complete").exists() else None


def prepare_checkout(source: Path, dest: Path) -> Path:
    """A patched Megatron-DeepSpeed under dest: source is a snapshot tarball (one top folder) or a
    checkout, which is copied (never modified). A checkout that already has the patch is taken
    as it is. Returns the folder that holds pretrain_gpt.py."""
    dest.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        with tarfile.open(source) as archive:
            archive.extractall(dest, filter="data")
        (checkout,) = [path for path in dest.iterdir() if path.is_dir()]
    else:
        checkout = dest / source.name
        shutil.copytree(source, checkout, ignore=shutil.ignore_patterns(".git", "*.so", "__pycache__"))
    if not (checkout / "pretrain_gpt.py").exists():
        raise FileNotFoundError(f"{source} holds no Megatron-DeepSpeed pretrain_gpt.py")
    already = subprocess.run(["git", "apply", "--reverse", "--check", str(PATCH)], cwd=checkout,
                             capture_output=True).returncode == 0
    if not already:
        applied = subprocess.run(["git", "apply", str(PATCH)], cwd=checkout, capture_output=True, text=True)
        if applied.returncode != 0:
            raise RuntimeError(f"{PATCH} does not apply to {source} (copied to {checkout}); it targets "
                               f"Megatron-DeepSpeed 4efb479d, unpatched or patched with it:\n{applied.stderr}")
    return checkout


def build_dataset_helpers(checkout: Path, python: Path) -> None:
    """Compiles megatron/data/helpers (Megatron would on rank 0 at start-up, a minute on 2 cores),
    cached beside the venv by the source's hash."""
    data = checkout / "megatron" / "data"
    digest = hashlib.sha256((data / "helpers.cpp").read_bytes()).hexdigest()[:16]
    cache = python.parent.parent / "megatron-deepspeed-helpers" / digest
    built = sorted(cache.glob("helpers*.so")) if cache.exists() else []
    if not built:
        env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run(["make", "-C", str(data)], env=env, check=True, capture_output=True, text=True)
        cache.mkdir(parents=True, exist_ok=True)
        built = [shutil.copy2(path, cache) for path in data.glob("helpers*.so")]
    for path in built:
        # Copied after the source, so make sees the library as up to date.
        shutil.copy(path, data)


@dataclass
class Layout:
    """One parallel layout of the tiny GPT. zero: ZeRO stage; pipeline: the PipelineEngine
    (otherwise --no-pipeline-parallel and the DeepSpeedEngine)."""
    name: str
    tensor: int = 1
    pipeline: int = 1
    data: int = 2
    zero: int = 1
    bf16: bool = False
    pipeline_engine: bool = False
    global_batch: int = 4

    @property
    def ranks(self) -> int:
        return self.tensor * self.pipeline * self.data


@dataclass
class RunResult:
    returncode: int
    output: str
    out_dir: Path
    lines: dict[int, str] = field(default_factory=dict)  # iteration -> Megatron's iteration line


def ds_config(layout: Layout, out_dir: Path) -> dict:
    config = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 10_000,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": layout.zero},
        "csv_monitor": {"enabled": True, "output_path": str(out_dir / "csv"), "job_name": "run"},
    }
    if layout.bf16:
        config["bf16"] = {"enabled": True}
    return config


def command(checkout: Path, data_prefix: Path, layout: Layout, out_dir: Path, iterations: int,
            sharpness_flags: list[str]) -> list[str]:
    """pretrain_gpt.py's arguments for a tiny GPT (2 layers, width 32, sequence 32, byte tokens)
    with default dropout (0.1 attention and hidden)."""
    config_path = out_dir / "ds_config.json"
    config_path.write_text(json.dumps(ds_config(layout, out_dir)))
    args = [
        str(checkout / "pretrain_gpt.py"),
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
        "--seq-length", "32", "--max-position-embeddings", "32",
        "--micro-batch-size", "1", "--global-batch-size", str(layout.global_batch),
        "--train-iters", str(iterations), "--lr", "1e-3", "--lr-decay-style", "constant", "--seed", "1234",
        "--tensor-model-parallel-size", str(layout.tensor), "--pipeline-model-parallel-size", str(layout.pipeline),
        "--data-path", str(data_prefix), "--split", "100,0,0", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "256", "--distributed-backend", "gloo",
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100000", "--log-params-norm",
        "--tensorboard-dir", str(out_dir / "tensorboard"), "--log-timers-to-tensorboard",
        "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
        "--no-gradient-accumulation-fusion",
        "--deepspeed", "--deepspeed_config", str(config_path), "--zero-stage", str(layout.zero),
    ]
    if layout.bf16:
        args.append("--bf16")
    if not layout.pipeline_engine:
        args.append("--no-pipeline-parallel")
    return args + sharpness_flags


def run(python: Path, checkout: Path, data_prefix: Path, layout: Layout, out_dir: Path, iterations: int,
        sharpness_flags: list[str], timeout: float) -> RunResult:
    """Runs pretrain_gpt.py under torchrun (the venv's) on layout.ranks local ranks; kills the
    whole process group at the timeout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LOCAL_SIZE": str(layout.ranks),
           "TORCH_EXTENSIONS_DIR": str(python.parent.parent / "torch_extensions"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(checkout)]),
           "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    argv = [str(python), "-m", "torch.distributed.run", "--nproc-per-node", str(layout.ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "megatron_sharpness.testing.megatron_deepspeed_cpu",
            *command(checkout, data_prefix, layout, out_dir, iterations, sharpness_flags)]
    log_path = out_dir / "output.txt"
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = -signal.SIGKILL
    output = log_path.read_text(errors="replace")
    return RunResult(returncode, output, out_dir, iteration_lines(output))


def iteration_lines(output: str) -> dict[int, str]:
    lines = {}
    for line in output.splitlines():
        start = line.find(" iteration ")
        if start >= 0 and "consumed samples:" in line:
            lines[int(line[start:].split()[1].split("/")[0])] = line[start:]
    return lines


def training_fields(line: str) -> dict[str, str]:
    """The fields of an iteration line that training determines (no timings, no ours)."""
    keep = ("lm loss", "grad norm", "params norm", "loss scale", "consumed samples", "learning rate",
            "number of skipped iterations", "number of nan iterations")
    fields = {}
    for part in line.split("|"):
        name, _, value = part.partition(":")
        if name.strip() in keep:
            fields[name.strip()] = value.strip()
    return fields


def tensorboard_scalars(python: Path, directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under directory, read with the venv's
    tensorboard (the project's environment need not have it)."""
    code = ("import json, sys\n"
            "from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer\n"
            "m = EventMultiplexer(size_guidance={'scalars': 0}).AddRunsFromDirectory(sys.argv[1]); m.Reload()\n"
            "out = {}\n"
            "for run, tags in m.Runs().items():\n"
            "    for tag in tags['scalars']:\n"
            "        out[tag] = [(e.step, e.value) for e in m.Scalars(run, tag)]\n"
            "print(json.dumps(out))\n")
    result = subprocess.run([str(python), "-c", code, str(directory)], capture_output=True, text=True,
                            check=True, timeout=120)
    return {tag: [tuple(pair) for pair in pairs] for tag, pairs in json.loads(result.stdout.splitlines()[-1]).items()}


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m megatron_sharpness.testing.megatron_deepspeed_cpu SCRIPT [ARGS...]")
    install_shims()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
