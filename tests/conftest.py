import hashlib
import os
import sys

# Ranks and tests share two cores: more threads per process only adds contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests run DeepSpeed on the CPU with gloo, also on machines that have a GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _extensions_dir() -> str:
    """One folder of JIT-built torch extensions per Python environment (sys.prefix).

    DeepSpeed compiles its CPU ops (deepspeed_shm_comm, fused_adam, cpu_adam) on first use into
    TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions/py311_cpu: one folder for every
    environment of a Python version. The build files there name the environment's own include
    paths, so two virtualenvs that take turns rewrite them and rebuild each op every time.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    prefix = os.path.realpath(sys.prefix)
    key = hashlib.sha256(prefix.encode()).hexdigest()[:12]
    return os.path.join(cache, "torch_extensions", f"{os.path.basename(prefix)}-{key}")


# Set before any test imports DeepSpeed; launched ranks inherit it with the environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", _extensions_dir())
