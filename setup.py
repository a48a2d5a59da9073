import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "megatron_sharpness" / "__init__.py").read_text(),
                    re.MULTILINE).group(1)

setup(
    name="megatron-sharpness",
    version=VERSION,
    description="Critical sharpness of the loss along the optimizer's update, measured during "
                "Megatron-LM, DeepSpeed and PyTorch training",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_sharpness", "megatron_sharpness.*"]),
    # the CPU measurement benchmarks/cost_model.py reads by default
    package_data={"megatron_sharpness.benchmarks": ["probe_cost_cpu.json"]},
    # Ranges we support; the exact versions our machines test with are in constraints.txt
    # (README: `pip install -c constraints.txt ...`). torch: megatron-core's own floor.
    install_requires=["torch>=2.6"],
    extras_require={
        # 0.19.6: the newest release Megatron-DeepSpeed runs with (0.19.7 removed
        # deepspeed.compression.compress); 0.19.8: the newest release.
        "deepspeed": ["deepspeed>=0.19.6,<0.20"],
        # The megatron-core releases on PyPI that our Megatron-LM patches cover (core_v0.16 to
        # core_v0.19; Megatron-LM main brings its own megatron/core).
        "megatron": ["megatron-core>=0.16,<0.20"],
        "mpi": ["mpi4py"],
        "plot": ["matplotlib"],
        # mpich: an MPI with mpiexec from PyPI, for the MPI launch tests. pybind11, tensorboard and
        # triton: what Megatron-LM's real pretrain_gpt.py needs on CPU in the end-to-end tests
        # (its dataset helpers build with pybind11; it imports triton; --tensorboard-dir).
        "dev": ["pytest", "pytest-timeout", "mpich", "pybind11", "tensorboard", "triton"],
    },
    entry_points={"console_scripts": ["megatron-sharpness=megatron_sharpness.cli:main"]},
)
