import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from megatron_sharpness.distributed import LaunchEnvironmentError, discover, first_host
from megatron_sharpness.testing.launch import free_port

WORKER = os.path.join(os.path.dirname(__file__), "workers", "rank_discovery.py")


@pytest.mark.parametrize("nodelist, host", [
    ("node17", "node17"), ("n[1-4]", "n1"), ("gpu[007-012,020],cpu3", "gpu007"), ("a[3,5-6]", "a3"),
    ("localhost,n[2-3]", "localhost"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_variables_describe_the_job_even_inside_slurm():
    found = discover({"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert (found.launcher, found.rank, found.world_size, found.local_rank) == ("torchrun", 5, 8, 1)


def test_srun_task_per_gpu():
    found = discover({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "localhost,n2", "SLURM_JOB_ID": "123456"})
    assert found == type(found)("slurm", 3, 4, 1, "localhost", 20000 + 123456 % 20000)


@pytest.mark.parametrize("environ, message", [
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "WORLD_SIZE": "8", "SLURM_JOB_NODELIST": "localhost",
      "SLURM_JOB_ID": "1"}, "WORLD_SIZE=8 disagrees with SLURM_NTASKS=4"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "RANK": "0", "SLURM_JOB_NODELIST": "localhost",
      "SLURM_JOB_ID": "1"}, "RANK=0 disagrees with SLURM_PROCID=2"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "no-such-host.invalid", "SLURM_JOB_ID": "1"},
     "MASTER_ADDR='no-such-host.invalid' does not resolve"),
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}, "rank 4 is outside"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are needed"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "1"}, "WORLD_SIZE=3 disagrees with OMPI_COMM_WORLD_SIZE=2"),
    ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "PMI_RANK='x' is not an integer"),
])
def test_inconsistent_environments_are_clear_errors(environ, message):
    with pytest.raises(LaunchEnvironmentError, match=message.replace("(", r"\(").replace("[", r"\[")):
        discover(environ)


def results(output):
    # mpiexec forwards the ranks' output as it comes: two results can share a line
    return sorted((json.loads(match) for match in re.findall(r"RESULT (\{[^{}]*\})", output)), key=lambda r: r["rank"])


@pytest.mark.parametrize("ranks", [2, 4])
def test_mpiexec_with_mpi4py_picks_the_rendezvous(ranks):
    mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: pip install mpich mpi4py (the dev extra installs them)"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    result = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, WORKER], capture_output=True, text=True,
                            timeout=180, env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = results(result.stdout)
    assert [r["rank"] for r in found] == list(range(ranks)) == [r["torch_rank"] for r in found]
    assert all(r["launcher"] == "mpi" and r["world_size"] == ranks for r in found)
    assert all(r["rank_sum"] == ranks * (ranks - 1) / 2 for r in found)


def test_torchrun():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), WORKER], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = results(result.stdout)
    assert [(r["launcher"], r["rank"], r["local_rank"], r["rank_sum"]) for r in found] == [
        ("torchrun", 0, 0, 1.0), ("torchrun", 1, 1, 1.0)]
