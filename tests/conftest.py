import os

# Ranks and tests share two cores: more threads per process only adds contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests run DeepSpeed on the CPU with gloo, also on machines that have a GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
