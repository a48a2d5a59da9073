import json
import shutil
import subprocess
import sys

import pytest

import megatron_sharpness
from megatron_sharpness.cli import main


def test_console_script_reports_the_version():
    executable = shutil.which("megatron-sharpness")
    assert executable, "the megatron-sharpness console script is not installed (pip install -e .)"
    output = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert output.stdout.strip() == f"megatron-sharpness {megatron_sharpness.__version__}"


def test_demo_prints_megatron_style_lines_and_writes_jsonl(tmp_path, capsys):
    log_file = tmp_path / "demo.jsonl"
    assert main(["demo-torch", "--steps", "30", "--interval", "10", "--log-file", str(log_file)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " iteration " in line]
    assert len(lines) == 3
    assert "iteration       10/      30 | lm loss: " in lines[0]
    assert "| critical sharpness: " in lines[0] and "| relative sharpness heldout: " in lines[0]
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    for record, line in zip(records, lines):
        assert record["converged"] and record["relative"]["heldout"]["converged"]
        assert f"critical sharpness: {record['critical_sharpness']:.4E}" in line
        assert f"lm loss: {record['loss']:.6E}" in line  # the probe's L(θ_t) is the training loss


@pytest.mark.parametrize("argv, message", [
    (["demo-torch", "--steps", "0"], "--steps: 0 is invalid; allowed: an integer >= 1"),
    (["demo", "--interval", "x"], "--interval: 'x' is not an integer"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_2_with_the_flag_named(argv, message):
    output = subprocess.run([sys.executable, "-m", "megatron_sharpness.cli", *argv],
                            capture_output=True, text=True, timeout=60)
    assert output.returncode == 2
    assert message in output.stderr
    assert "Traceback" not in output.stderr


def test_check_names_what_is_wrong_with_a_checkout(tmp_path):
    def check(path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "megatron_sharpness.cli", "check", str(path)],
                              capture_output=True, text=True, timeout=60)

    output = check(tmp_path)
    assert output.returncode == 2 and "has no pretrain_gpt.py" in output.stderr
    (tmp_path / "pretrain_gpt.py").write_text("print('not Megatron-LM')\n")
    output = check(tmp_path)
    assert output.returncode == 2 and "none of our patches applies (core_v0.16, core_v0.17" in output.stderr
    assert "Traceback" not in output.stderr
