"""`megatron-sharpness check PATH`: does a Megatron-LM checkout work with our patch? A cheap answer
before a cluster job: copy the checkout to a temporary folder, apply the patch of its release line
(unless it is patched already), and train a tiny GPT for a few iterations on CPU with gloo
(megatron_lm_cpu) with the probe on, in Megatron's default rerun mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The patches ship with the source tree, next to the package.
PATCHES = Path(__file__).resolve().parents[2] / "patches" / "megatron-lm"
PATCH_NAME = "0001-critical-sharpness.patch"
# Patch folder -> the Python its Megatron-LM line needs at least (pyproject's requires-python).
MINIMUM_PYTHON = {"core_v0.16": (3, 10)}
NEWER_LINES_PYTHON = (3, 12)

# A GPT small enough for CPU, through Megatron-LM's own data path (mock data, null tokenizer); the
# fused kernels are CUDA-only.
TINY_GPT = ["--distributed-backend", "gloo", "--transformer-impl", "local",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32", "--lr", "1e-3",
            "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
            "--no-gradient-accumulation-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
            "--no-masked-softmax-fusion", "--no-persist-layer-norm", "--no-rope-fusion"]


class CheckError(RuntimeError):
    pass


def _git_apply(checkout: Path, patch: Path, *flags: str) -> bool:
    return subprocess.run(["git", "apply", *flags, str(patch)], cwd=checkout, capture_output=True).returncode == 0


def available_patches() -> list[Path]:
    patches = sorted(PATCHES.glob(f"*/{PATCH_NAME}"))
    if not patches:
        raise CheckError(f"no Megatron-LM patches in {PATCHES}: run from a source checkout of megatron-sharpness")
    return patches


def patch_for(checkout: Path) -> tuple[Path, bool]:
    """Our patch for this checkout's release line, and whether it is applied already."""
    if not (checkout / "pretrain_gpt.py").is_file():
        raise CheckError(f"{checkout} is not a Megatron-LM checkout: it has no pretrain_gpt.py")
    patches = available_patches()
    for applied in (False, True):
        matching = [patch for patch in patches if _git_apply(checkout, patch, "--check", *(["--reverse"] * applied))]
        if len(matching) == 1:
            return matching[0], applied
        if len(matching) > 1:
            raise CheckError(f"{checkout}: several patches match ({[p.parent.name for p in matching]}); "
                             "expected one per release line")
    raise CheckError(f"{checkout}: none of our patches applies ({', '.join(p.parent.name for p in patches)}); "
                     "it may be a release line we do not support yet, or locally changed where the patch goes")


def required_python(patch: Path) -> tuple[int, int]:
    return MINIMUM_PYTHON.get(patch.parent.name, NEWER_LINES_PYTHON)


def patched_copy(checkout: Path, target: Path) -> tuple[Path, Path]:
    """Copies the checkout (without .git) to target/Megatron-LM and patches it; returns (copy, patch)."""
    patch, applied = patch_for(checkout)
    copy = target / "Megatron-LM"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git"))
    if not applied:
        subprocess.run(["git", "apply", str(patch)], cwd=copy, check=True, capture_output=True)
    return copy, patch


def check(checkout: Path, python: str, world_size: int, extra_flags: list[str], timeout: float) -> int:
    from megatron_sharpness.testing.launch import LaunchError, run_ranks

    version = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory(prefix="megatron-sharpness-check-") as folder:
        copy, patch = patched_copy(checkout.resolve(), Path(folder))
        needed = required_python(patch)
        if tuple(map(int, version)) < needed:
            raise CheckError(f"{checkout} ({patch.parent.name}) needs Python >= {needed[0]}.{needed[1]}; "
                             f"{python} is {'.'.join(version)} (give another with --python)")
        print(f"{checkout}: {patch.parent.name} patch, training {world_size} rank(s) on CPU ...", flush=True)
        root = str(Path(__file__).resolve().parents[2])
        try:
            results = run_ranks(
                ["-m", "megatron_sharpness.testing.megatron_lm_cpu", str(copy / "pretrain_gpt.py"), *TINY_GPT,
                 "--micro-batch-size", "1", "--global-batch-size", str(2 * world_size), "--train-iters", "3",
                 "--critical-sharpness-interval", "2", *extra_flags],
                world_size, timeout=timeout, python=python,
                env={"PYTHONPATH": os.pathsep.join([str(copy), root, os.environ.get("PYTHONPATH", "")]),
                     "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
        except LaunchError as error:
            print(error, file=sys.stderr)
            return 1
    lines = [line.strip() for line in results[-1].output.splitlines() if " iteration " in line]
    print("\n".join(lines))
    if len(lines) != 3 or "| critical sharpness: " not in lines[1]:
        print(f"megatron-sharpness check: {checkout}: expected 3 iteration lines, the second with "
              "'| critical sharpness: ...' ; see above", file=sys.stderr)
        return 1
    print(f"megatron-sharpness check: {checkout} works with the {patch.parent.name} patch")
    return 0
