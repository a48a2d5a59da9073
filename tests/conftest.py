import os

# Ranks and tests share two cores: more threads per process only adds contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")
