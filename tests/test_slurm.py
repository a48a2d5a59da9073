"""The launch scripts on a real SLURM cluster: two emulated nodes on this host (slurmctld, two
slurmd, munge; launch/local-slurm-cluster.sh installs and starts them). CPU variants: the
megatron-core demo worker with TP2 × PP2 across both nodes (torchrun per node, and one srun task
per rank) and a DeepSpeed ZeRO-2 job. If SLURM cannot be started the tests fail with the reason."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
JOB_TIMEOUT = 400


@pytest.fixture(scope="module")
def slurm():
    start = subprocess.run(["bash", os.path.join(LAUNCH, "local-slurm-cluster.sh"), "start"], capture_output=True,
                           text=True, timeout=900, env={**os.environ, "SLURM_NODES": "2", "SLURM_CPUS": "4"})
    if start.returncode != 0:
        pytest.fail(f"SLURM could not be started (exit {start.returncode}):\n{start.stdout[-2000:]}\n{start.stderr[-3000:]}")
    yield
    subprocess.run(["bash", os.path.join(LAUNCH, "local-slurm-cluster.sh"), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from megatron_sharpness.demo_megatron import prepare_data

    return prepare_data(str(tmp_path_factory.mktemp("data")))


def submit(script, workdir, sbatch_args, env):
    """sbatch --wait the script; returns (the job's log under logs/, its slurm-*.out)."""
    job_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "LOG_DIR": str(workdir / "logs"),
               "SHARPNESS_INTERVAL": "5", **env}
    command = ["sbatch", "--wait", "--parsable", f"--chdir={workdir}", "--export=ALL", *sbatch_args,
               os.path.join(LAUNCH, script)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=job_env)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--user", "root"], timeout=60)
        pytest.fail(f"{script} did not finish within {JOB_TIMEOUT} s")
    job_id = result.stdout.strip().split(";")[0]
    outputs = sorted(workdir.glob(f"slurm-*-{job_id}.out"))
    slurm_out = outputs[0].read_text() if outputs else ""
    assert result.returncode == 0, f"{script}: sbatch exit {result.returncode}\n{result.stderr}\n{slurm_out[-4000:]}"
    logs = sorted((workdir / "logs").glob(f"*-{job_id}.log"))
    assert logs, f"{script}: no per-job log\n{slurm_out[-3000:]}"
    return logs[0], slurm_out


def check_measured(log, slurm_out, steps):
    lines = [line for line in log.read_text().splitlines() if "critical sharpness:" in line]
    assert len(lines) == len(steps), log.read_text()[-3000:]
    records = [json.loads(line) for line in log.with_suffix(".sharpness.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == steps and all(r["converged"] for r in records)
    assert f"{len(steps)} measured steps, steps {steps[0]}-{steps[-1]}" in slurm_out


def test_megatron_torchrun_per_node_tp2_pp2_across_two_nodes(slurm, demo_data, tmp_path):
    train, heldout = demo_data
    log, out = submit("megatron_lm_torchrun.sbatch", tmp_path, ["--nodes=2"], {
        "GPUS_PER_NODE": "2", "HELDOUT_PATH": heldout,
        "TRAIN_ENTRY": "-m megatron_sharpness.demo_megatron --worker",
        "TRAIN_ARGS": f"--data-path {train} --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                      "--train-iters 20 --log-interval 5"})
    assert "nodes: n[1-2], 2 processes per node" in log.read_text()
    assert "relative sharpness heldout:" in log.read_text()
    check_measured(log, out, [5, 10, 15, 20])


def test_megatron_one_srun_task_per_rank(slurm, demo_data, tmp_path):
    train, _ = demo_data
    log, out = submit("megatron_lm_srun.sbatch", tmp_path, ["--nodes=2", "--ntasks-per-node=2"], {
        "HELDOUT_PATH": "", "TRAIN_COMMAND": f"{sys.executable} -m megatron_sharpness.demo_megatron --worker",
        "TRAIN_ARGS": f"--data-path {train} --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                      "--train-iters 10 --log-interval 5"})
    assert "nodes: n[1-2], 4 tasks" in log.read_text()
    check_measured(log, out, [5, 10])


def test_deepspeed_zero2_across_two_nodes(slurm, tmp_path):
    log, out = submit("deepspeed.sbatch", tmp_path, ["--nodes=2", "--ntasks-per-node=1"],
                      {"STEPS": "10", "ZERO_STAGE": "2", "DS_ACCELERATOR": "cpu"})
    config = json.loads(next((tmp_path / "logs").glob("*.ds_config.json")).read_text())
    assert config["zero_optimization"]["stage"] == 2 and config["critical_sharpness"]["interval"] == 5
    check_measured(log, out, [5, 10])
