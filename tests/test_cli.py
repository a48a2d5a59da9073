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


def test_demo_prints_megatron_style_lines_and_writes_jsonl_and_png(tmp_path, capsys):
    out = tmp_path / "torch-demo"
    log_file = out / "critical_sharpness.jsonl"
    log_file.parent.mkdir()
    log_file.write_text('{"step": 999, "critical_sharpness": 1.0}\n')  # from an earlier run: replaced
    assert main(["demo-torch", "--steps", "30", "--interval", "10", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == f"wrote {out / 'critical_sharpness.png'}"
    assert (out / "critical_sharpness.png").read_bytes()[:4] == b"\x89PNG"
    lines = [line for line in printed.splitlines() if " iteration " in line]
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


def test_demo_checks_its_arguments_before_launching_one_line_per_mistake(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    output = subprocess.run([sys.executable, "-m", "megatron_sharpness.cli", "demo", "--tensor-parallel", "3",
                             "--pipeline-parallel", "3", "--steps", "5", "--interval", "10",
                             "--output-dir", str(blocker / "out")], capture_output=True, text=True, timeout=120)
    assert output.returncode == 2 and "Traceback" not in output.stderr and "torchrun" not in output.stdout
    assert output.stderr.splitlines() == [
        "megatron-sharpness demo: error: --tensor-parallel 3: must divide the demo model's 4 attention heads; "
        "allowed: 1, 2, 4",
        "megatron-sharpness demo: error: --pipeline-parallel 3: must divide the demo model's 4 layers; "
        "allowed: 1, 2, 4",
        "megatron-sharpness demo: error: --steps 5 is below --interval 10: no iteration would be measured; "
        "allowed: --steps >= --interval",
        f"megatron-sharpness demo: error: --output-dir {blocker / 'out'}: cannot write there (Not a directory); "
        "allowed: a writable folder",
    ]


def test_demo_accepts_the_layouts_it_can_run(tmp_path):
    from megatron_sharpness.demo_megatron import demo_problems

    for tensor_parallel, pipeline_parallel in ((1, 1), (2, 2), (4, 1), (1, 4)):
        problems = demo_problems(10, 10, str(tmp_path), tensor_parallel, pipeline_parallel)
        # megatron-core and matplotlib may be missing where the extras are not installed
        assert [p for p in problems if "not installed" not in p] == []


def test_demo_torch_checks_its_arguments_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["demo-torch", "--steps", "5", "--interval", "10", "--output-dir", str(blocker)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing trained
    assert captured.err.splitlines() == [
        "megatron-sharpness demo-torch: error: --steps 5 is below --interval 10: no step would be measured; "
        "allowed: --steps >= --interval",
        f"megatron-sharpness demo-torch: error: --output-dir {blocker}: is a file, not a folder; "
        "allowed: a writable folder",
    ]


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
