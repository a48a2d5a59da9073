"""Rank discovery: initialise torch.distributed from whatever launched this process — torchrun,
srun (one task per GPU), or mpiexec (Open MPI, MPICH) — with a clear error, not a hang, when the
environment contradicts itself."""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping


class LaunchEnvironmentError(RuntimeError):
    """The launcher's environment variables are missing, contradictory or point nowhere."""


@dataclass(frozen=True)
class RankEnvironment:
    launcher: str  # "torchrun", "slurm", "mpi", "env" (RANK/WORLD_SIZE set by hand) or "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "n[01-04,9],gpu7" -> "n01"."""
    match = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise LaunchEnvironmentError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchEnvironmentError(f"{name}={environ[name]!r} is not an integer") from None


def _check_agrees(environ: Mapping[str, str], name: str, value: int, source: str) -> None:
    if name in environ and _int(environ, name) != value:
        raise LaunchEnvironmentError(f"{name}={environ[name]} disagrees with {source}={value}; unset {name} or "
                                     "launch so that both describe the same job")


def _mpi_rendezvous(rank: int) -> tuple[str, int]:
    """Rank 0 picks its host and a free port and broadcasts them over MPI."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchEnvironmentError("launched by MPI without MASTER_ADDR/MASTER_PORT: export both, or install "
                                     "mpi4py (pip install 'megatron-sharpness[mpi]') so that rank 0 can pick them")
    endpoint = None
    if rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            endpoint = (socket.gethostname(), sock.getsockname()[1])
    return MPI.COMM_WORLD.bcast(endpoint, root=0)


def discover(environ: Mapping[str, str] | None = None) -> RankEnvironment:
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ:
        # torchrun (possibly one per SLURM node): its variables describe the whole job
        launcher = "torchrun"
        rank, world_size, local_rank = (_int(environ, n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        master = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        launcher = "slurm"
        rank, world_size = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
        local_rank = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
        _check_agrees(environ, "WORLD_SIZE", world_size, "SLURM_NTASKS")
        _check_agrees(environ, "RANK", rank, "SLURM_PROCID")
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        addr = environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
        # every task of a job derives the same port from the job id unless one is given
        port = environ.get("MASTER_PORT") or (str(20000 + _int(environ, "SLURM_JOB_ID") % 20000)
                                              if "SLURM_JOB_ID" in environ else None)
        master = addr, port
    elif "OMPI_COMM_WORLD_RANK" in environ or "PMI_RANK" in environ:
        launcher = "mpi"
        open_mpi = "OMPI_COMM_WORLD_RANK" in environ
        rank = _int(environ, "OMPI_COMM_WORLD_RANK" if open_mpi else "PMI_RANK")
        world_size = _int(environ, "OMPI_COMM_WORLD_SIZE" if open_mpi else "PMI_SIZE")
        local_name = "OMPI_COMM_WORLD_LOCAL_RANK" if open_mpi else "MPI_LOCALRANKID"
        local_rank = _int(environ, local_name) if local_name in environ else 0
        _check_agrees(environ, "WORLD_SIZE", world_size, "OMPI_COMM_WORLD_SIZE" if open_mpi else "PMI_SIZE")
        master = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
        if None in master:
            master = _mpi_rendezvous(rank)
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        launcher = "env"
        rank, world_size = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        local_rank = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
        master = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return RankEnvironment("single", 0, 1, 0, "127.0.0.1", sock.getsockname()[1])

    if not 0 <= rank < world_size:
        raise LaunchEnvironmentError(f"{launcher}: rank {rank} is outside world size {world_size}")
    addr, port = master
    if not addr or not port:
        raise LaunchEnvironmentError(f"{launcher}: MASTER_ADDR and MASTER_PORT are needed (got {addr!r}, {port!r})")
    try:
        socket.getaddrinfo(addr, None)
    except socket.gaierror:
        raise LaunchEnvironmentError(f"MASTER_ADDR={addr!r} does not resolve to an address") from None
    try:
        port_number = int(port)
    except ValueError:
        raise LaunchEnvironmentError(f"MASTER_PORT={port!r} is not a port number") from None
    if not 0 < port_number < 65536:
        raise LaunchEnvironmentError(f"MASTER_PORT={port!r} is not a port number")
    return RankEnvironment(launcher, rank, world_size, local_rank, str(addr), port_number)


def init_distributed(backend: str | None = None, timeout: datetime.timedelta = datetime.timedelta(minutes=10),
                     environ: Mapping[str, str] | None = None) -> RankEnvironment:
    """Discovers the ranks, exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (Megatron and
    DeepSpeed read them) and initialises torch.distributed (NCCL with CUDA, else gloo)."""
    import torch
    import torch.distributed as dist

    found = discover(environ)
    os.environ.update({"RANK": str(found.rank), "WORLD_SIZE": str(found.world_size),
                       "LOCAL_RANK": str(found.local_rank), "MASTER_ADDR": found.master_addr,
                       "MASTER_PORT": str(found.master_port)})
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(found.local_rank)
    dist.init_process_group(backend, init_method=f"tcp://{found.master_addr}:{found.master_port}",
                            rank=found.rank, world_size=found.world_size, timeout=timeout)
    return found
