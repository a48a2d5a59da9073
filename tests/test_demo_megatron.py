"""The README's main job, end to end with small settings: megatron-core TP2 × PP2 through torchrun."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core", reason="the megatron extra is not installed (pip install -e '.[megatron]')")


def test_demo_prints_sharpness_lines_writes_jsonl_and_png(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "megatron_sharpness.cli", "demo", "--steps", "20", "--interval", "5",
                             "--output-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " iteration " in line and "| lm loss: " in line]
    assert len(lines) == 4  # printed once, by the last rank
    assert all("| critical sharpness: " in line and "| relative sharpness heldout: " in line for line in lines)
    records = [json.loads(line) for line in (out / "critical_sharpness.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all(r["converged"] and r["forwards"] >= 3 for r in records)
    for record, line in zip(records, lines):
        assert f"critical sharpness: {record['critical_sharpness']:.4E}" in line
    assert (out / "critical_sharpness.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "train_text_document.bin").exists() and (out / "heldout_text_document.idx").exists()
