"""megatron-sharpness parse / summary / plot on logs as jobs write them."""

import json
import math
import subprocess
import sys

import pytest

from megatron_sharpness.cli import main
from megatron_sharpness.logs import parse_lines

MEGATRON_LINE = (" [2026-11-24 10:00:{sec:02d}] iteration {step:8d}/    1000 | consumed samples: {samples:10d} | "
                 "elapsed time per iteration (ms): 812.3 | learning rate: {lr:.6E} | global batch size:    64 | "
                 "lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: 0.812 | critical sharpness: {sharp} | "
                 "critical lr: {clr} | lr/critical lr: {ratio} | sharpness forwards: 7 | "
                 "relative sharpness heldout: {rel} | number of skipped iterations:   0 |")


def megatron_line(step, sharp=1.5e2, lr=3e-4, rel=2.0e2):
    clr = 2 / sharp
    return MEGATRON_LINE.format(sec=step % 60, step=step, samples=64 * step, lr=lr, loss=2.5, sharp=f"{sharp:.4E}",
                                clr=f"{clr:.4E}", ratio=f"{lr / clr:.3f}", rel=f"{rel:.4E}")


def test_multi_rank_slurm_log_with_prefixes_interleaving_and_truncation(tmp_path):
    lines = [
        "0: using world size: 8, data-parallel size: 2, tensor-model-parallel size: 2",
        "7: " + megatron_line(10, sharp=120.0),
        "7: " + megatron_line(20, sharp=130.0, lr=5e-4),
        # two ranks' output run together on one line
        "[rank7]: " + megatron_line(30, sharp=140.0) + "[rank3]: some warning" + megatron_line(40, sharp=150.0),
        "7: " + megatron_line(50, sharp=1.0).replace("critical sharpness: 1.0000E+00", "critical sharpness: < 3.1E-01 (capped)"),
        "7: " + megatron_line(60).split("critical sharpness:")[0] + "critical sharpness: skipped (the optimizer skipped the step) |",
        "7: " + megatron_line(70, sharp=170.0)[:180],  # cut before the sharpness fields
        "7: " + megatron_line(80, sharp=180.0)[:-60],  # cut after them
        "\x00\x01 garbage \xff",
    ]
    log = tmp_path / "slurm-1234.out"
    log.write_text("\n".join(lines) + "\n")
    records = parse_lines(log.read_text().splitlines())
    assert [r.step for r in records] == [10, 20, 30, 40, 50, 60, 80]
    by_step = {r.step: r for r in records}
    assert by_step[10].critical_sharpness == 120.0 and by_step[10].lr == 3e-4 and by_step[10].lm_loss == 2.5
    assert by_step[20].lr == 5e-4 and by_step[20].lr_over_critical_lr == pytest.approx(5e-4 / (2 / 130), abs=1e-3)
    assert by_step[40].critical_sharpness == 150.0 and by_step[40].relative == {"heldout": 200.0}
    assert by_step[50].critical_sharpness is None and by_step[50].skipped is None
    assert by_step[60].skipped == "the optimizer skipped the step"
    assert by_step[80].critical_sharpness == 180.0


def test_jsonl_and_deepspeed_log_line_and_corrupt_records(tmp_path):
    records = [{"step": 5, "lr": 1e-3, "critical_lr": 0.02, "critical_sharpness": 100.0, "lr_over_critical_lr": 0.05,
                "loss": 3.0, "relative": {"web": {"critical_sharpness": 80.0}}, "skipped": None},
               {"step": 10, "lr": 1e-3, "critical_lr": None, "critical_sharpness": None, "skipped": "DeepSpeed skipped"}]
    jsonl = tmp_path / "sharpness.jsonl"
    jsonl.write_text(json.dumps(records[0]) + "\n{\"step\": 7, \"critical_sha\n" + json.dumps(records[1]) + "\n")
    deepspeed_log = tmp_path / "ds.log"
    deepspeed_log.write_text("[2026-11-24 10:00:00,000] [INFO] [engine.py:100] something\n"
                             " iteration       15 | critical sharpness: 9.0000E+01 | critical lr: 2.2222E-02 | "
                             "lr/critical lr: 0.045 | sharpness forwards: 6 | relative sharpness web: 7.0000E+01 |\n")
    parsed = parse_lines(jsonl.read_text().splitlines() + deepspeed_log.read_text().splitlines())
    assert [(r.step, r.critical_sharpness, r.skipped) for r in parsed] == [
        (5, 100.0, None), (10, None, "DeepSpeed skipped"), (15, 90.0, None)]
    assert parsed[0].relative == {"web": 80.0} and parsed[2].relative == {"web": 70.0}


def test_demo_log_round_trip_through_parse(tmp_path, capsys):
    jsonl = tmp_path / "critical_sharpness.jsonl"
    main(["demo-torch", "--steps", "20", "--interval", "5", "--output-dir", str(tmp_path)])
    log = tmp_path / "demo.log"
    log.write_text(capsys.readouterr().out)
    assert main(["parse", str(log), "--format", "json"]) == 0
    from_log = json.loads(capsys.readouterr().out)
    from_jsonl = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in from_log] == [r["step"] for r in from_jsonl] == [5, 10, 15, 20]
    for parsed, record in zip(from_log, from_jsonl):
        assert parsed["critical_sharpness"] == pytest.approx(record["critical_sharpness"], rel=1e-4)
        assert parsed["critical_lr"] == pytest.approx(record["critical_lr"], rel=1e-4)
        assert parsed["lr"] == pytest.approx(record["lr"], rel=1e-6)
        assert parsed["relative_sharpness/heldout"] == pytest.approx(
            record["relative"]["heldout"]["critical_sharpness"], rel=1e-4)
    assert main(["parse", str(jsonl), "--format", "csv"]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert csv_lines[0] == ("step,status,lr,critical_sharpness,critical_lr,lr_over_critical_lr,step_raised_loss,"
                            "lm_loss,probe_loss,relative_sharpness/heldout,relative_status/heldout,skipped,error")
    assert len(csv_lines) == 5
    assert main(["summary", str(jsonl), "--phases", "2"]) == 0
    summary = capsys.readouterr().out
    assert "4 measured steps, steps 5-20" in summary and "5-10" in summary and "15-20" in summary
    assert "step's batch: 4 converged" in summary
    png = tmp_path / "sharpness.png"
    assert main(["plot", str(jsonl), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_slope_and_edge_share(tmp_path):
    jsonl = tmp_path / "s.jsonl"
    records = [{"step": s, "lr": 0.01, "critical_lr": 2 / (100 + s), "critical_sharpness": 100.0 + s,
                "lr_over_critical_lr": 0.01 * (100 + s) / 2, "relative": {}, "skipped": None} for s in range(0, 400, 10)]
    jsonl.write_text("\n".join(json.dumps(r) for r in records))
    result = subprocess.run([sys.executable, "-m", "megatron_sharpness.cli", "summary", str(jsonl), "--phases", "2"],
                            capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    lines = lines[[line.split()[0] for line in lines].index("phase"):]
    # λ_c grows by 1 per step: +1000 per 1k steps; η·λ_c/2 > 1 once λ_c > 200, i.e. from step 110 on.
    assert lines[1].split()[:5] == ["1", "0-190", "20", "195", "+1000"] and lines[1].split()[5] == "45%"
    assert lines[2].split()[:5] == ["2", "200-390", "20", "395", "+1000"] and lines[2].split()[5] == "100%"


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "no critical sharpness measurement found"),
    (b"", "no critical sharpness measurement found"),
    (b'{"step": 3, "critical_sharpness": "abc"}\n', "no converged measurement"),
])
def test_garbage_input_is_a_clear_error_not_a_traceback(tmp_path, content, message):
    bad = tmp_path / "bad.log"
    bad.write_bytes(content)
    command = "summary" if b"abc" in content else "parse"
    result = subprocess.run([sys.executable, "-m", "megatron_sharpness.cli", command, str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_file_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "megatron_sharpness.cli", "plot", str(tmp_path / "nope.log")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_steps_that_go_backwards_in_a_log_are_kept_apart_as_a_leg_with_a_warning(tmp_path, capsys):
    # A Megatron job ran to step 30, was killed, resumed from the checkpoint at step 20 into the same log and
    # re-ran 30; another rank printed step 20 once more (the same line: no new leg).
    log = tmp_path / "job.log"
    log.write_text("\n".join([megatron_line(10, sharp=110.0), megatron_line(20, sharp=120.0),
                              megatron_line(30, sharp=130.0), "3: " + megatron_line(20, sharp=120.0),
                              "resuming from checkpoint at iteration 20",
                              megatron_line(30, sharp=135.0), megatron_line(40, sharp=140.0)]) + "\n")
    assert [(r.leg, r.step, r.critical_sharpness) for r in parse_lines(log.read_text().splitlines())] == [
        (1, 10, 110.0), (1, 20, 120.0), (1, 30, 130.0), (2, 30, 135.0), (2, 40, 140.0)]
    # A plain-PyTorch run restarted without its probe state into the same JSONL: steps 2, 4, 6, then 2, 4
    # again (they were global steps 8 and 10). Nothing of the first leg may vanish.
    jsonl = tmp_path / "sharpness.jsonl"
    jsonl.write_text("".join(json.dumps({"step": s, "lr": 1e-3, "critical_sharpness": v, "relative": {}}) + "\n"
                             for s, v in ((2, 1.0), (4, 2.0), (6, 3.0), (2, 8.0), (4, 10.0))))
    assert main(["parse", str(jsonl), "--format", "json"]) == 0
    result = capsys.readouterr()
    assert [(r["leg"], r["step"], r["critical_sharpness"]) for r in json.loads(result.out)] == [
        (1, 2, 1.0), (1, 4, 2.0), (1, 6, 3.0), (2, 2, 8.0), (2, 4, 10.0)]
    assert result.err.splitlines() == [
        f"megatron-sharpness parse: warning: {jsonl}: the steps go backwards at line 4 (step 2 after step 6): a run "
        "restarted without its probe state, or resumed from an earlier checkpoint; its records are kept apart as "
        "leg 2, not merged with the steps before (pass the run's iteration to the probe, or load its state, to "
        "count on)"]
    assert main(["summary", str(jsonl)]) == 0
    out = capsys.readouterr().out
    assert "leg 1 of 2:\n3 measured steps, steps 2-6" in out
    assert "leg 2 of 2 (the log's steps went backwards before it):\n2 measured steps, steps 2-4" in out
    # Files are merged leg by leg: a later file's record of a step wins (the logs of consecutive jobs).
    first, resumed = tmp_path / "first.jsonl", tmp_path / "resumed.jsonl"
    first.write_text("".join(json.dumps({"step": s, "lr": 1e-3, "critical_sharpness": v, "relative": {}}) + "\n"
                             for s, v in ((10, 1.0), (20, 2.0))))
    resumed.write_text("".join(json.dumps({"step": s, "lr": 1e-3, "critical_sharpness": v, "relative": {}}) + "\n"
                               for s, v in ((20, 3.0), (30, 4.0))))
    assert main(["parse", str(first), str(resumed), "--format", "json"]) == 0
    result = capsys.readouterr()
    assert [r["critical_sharpness"] for r in json.loads(result.out)] == [1.0, 3.0, 4.0] and result.err == ""
    assert "leg" not in json.loads(result.out)[0]


def test_the_lr_of_a_log_line_is_the_measured_step_s_own_not_megatron_s_next_one():
    from megatron_sharpness.measurement import Measurement

    # Megatron prints `learning rate` after the scheduler stepped: at step 15 of a cosine schedule the
    # next iteration's 2.607e-4, where the step ran at 3.25e-4.
    measurement = Measurement(step=15, lr=3.25e-4, task=None, skipped="the step changed no parameter")
    line = megatron_line(15, lr=2.607e-4).split("critical sharpness:")[0] + measurement.log_fields()
    (record,) = parse_lines([line])
    assert record.lr == 3.25e-4 and record.status == "skipped"


def records_jsonl(path, steps):
    path.write_text("".join(json.dumps({"step": s, "lr": 1e-3, "critical_lr": 2 / (100 + s), "critical_sharpness": 100.0 + s,
                                        "relative": {}, "skipped": None}) + "\n" for s in steps))


def test_parse_into_a_closed_pipe_ends_quietly(tmp_path):
    jsonl = tmp_path / "long.jsonl"
    records_jsonl(jsonl, range(1, 4001))  # a table far beyond a pipe's buffer
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m megatron_sharpness.cli parse {jsonl} "
                                           "| head -2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and len(result.stdout.splitlines()) == 2


def test_unreadable_jsonl_lines_are_counted_on_stderr(tmp_path, capsys):
    jsonl = tmp_path / "crashed.jsonl"
    records_jsonl(jsonl, [10, 20, 30])
    with open(jsonl, "a") as handle:
        handle.write("\x00\x07 garbage\n" + '{"step": 40, "lr": 1e-3, "critical_sh')  # the crash cut the last line
    assert main(["parse", str(jsonl), "--format", "csv"]) == 0
    result = capsys.readouterr()
    assert result.err.splitlines() == [f"megatron-sharpness parse: warning: {jsonl}: skipped 2 of 5 lines that hold "
                                       "no readable measurement record (cut short or garbage)"]
    assert [line.split(",")[0] for line in result.out.splitlines()[1:]] == ["10", "20", "30"]
    text_log = tmp_path / "train.log"  # a text log's other output (a config dump) is no warning
    text_log.write_text("{\n  \"train_batch_size\": 8\n}\n" + megatron_line(10) + "\nother output\n" * 3)
    assert main(["parse", str(text_log)]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("output, written, note", [
    ("noext", "noext.png", " ('{out}noext' has no extension: added .png)"),
    ("run.v2", "run.v2.png", " ('{out}run.v2' has the extension .v2, which is no image format: added .png)"),
    ("figure.pdf", "figure.pdf", ""),
    ("plots", "plots/critical_sharpness.png", " ({out}plots is a folder)"),
    ("new/", "new/critical_sharpness.png", " ({out}new/ is a folder)"),
])
def test_plot_writes_exactly_the_file_it_names(tmp_path, capsys, output, written, note):
    pytest.importorskip("matplotlib")
    jsonl = tmp_path / "s.jsonl"
    records_jsonl(jsonl, [10, 20, 30])
    (tmp_path / "plots").mkdir()
    out = f"{tmp_path}/"
    assert main(["plot", str(jsonl), "-o", out + output]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {out}{written}" + note.format(out=out)]
    magic = b"%PDF" if written.endswith(".pdf") else b"\x89PNG"
    assert (tmp_path / written).read_bytes()[:4] == magic
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"s.jsonl", "plots", written.split("/")[0]})


def test_every_argument_of_every_command_has_help():
    from megatron_sharpness.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"parse", "summary", "plot", "demo", "demo-torch", "exec"} <= commands.keys()
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_plot_draws_numbers_as_lines_with_gaps_and_outcomes_as_markers():
    pytest.importorskip("matplotlib")
    from megatron_sharpness.report import figure

    line = (" iteration {step:8d}/     100 | learning rate: {lr:.6E} | lm loss: 2.5 | critical sharpness: {own} | "
            "step raised loss: no | sharpness forwards: 4 | relative sharpness heldout: {rel} |")
    rows = [(10, 1e-3, "1.0000E+02", "2.0000E+02"), (20, 2e-3, "> 5.0000E+03 (unresolved)", "ascent (slope +1.000E+00)"),
            (30, 2e-3, "1.2000E+02", "< 3.0000E+01 (never rose)"),
            (40, 1e-3, "1.3000E+02", "noisy (loss rounding: slope ×6.56 its trend)"),
            (50, 1e-3, "1.1000E+02", "unresolved (the loss changed by no more than its noise)")]
    records = parse_lines([line.format(step=s, lr=lr, own=own, rel=rel) for s, lr, own, rel in rows])
    built = figure(records)
    main_axis, lr_axis = built.axes
    lines = {artist.get_label(): artist for artist in main_axis.get_lines()}
    own = lines["critical sharpness λ_c"].get_ydata()
    assert list(own[[0, 2, 3, 4]]) == [100.0, 120.0, 130.0, 110.0] and math.isnan(own[1])  # a gap, not a bridge
    assert list(lines["critical sharpness λ_c: λ_c > bound (unresolved)"].get_ydata()) == [5000.0]
    assert list(lines["relative λ_c: heldout: λ_c < bound (never rose)"].get_ydata()) == [30.0]
    assert list(lines["relative λ_c: heldout: ascent (no λ_c)"].get_xdata()) == [20]
    assert list(lines["relative λ_c: heldout: noisy (no λ_c)"].get_xdata()) == [40]
    assert list(lines["relative λ_c: heldout: unresolved (no λ_c)"].get_xdata()) == [50]  # no bound: not lost
    assert "critical sharpness λ_c: unresolved (no λ_c)" not in lines  # the bounded one is a triangle
    assert [r.relative_status["heldout"] for r in records] == ["converged", "ascent", "capped", "noisy", "unresolved"]
    assert list(lines["2/η (edge of stability)"].get_ydata()) == [2000.0, 1000.0, 1000.0, 2000.0, 2000.0]  # follows the lr
    assert lr_axis.get_ylabel() == "learning rate η" and list(lr_axis.get_lines()[0].get_ydata()) == [1e-3, 2e-3, 2e-3, 1e-3,
                                                                                                      1e-3]


def test_plot_draws_each_leg_of_a_log_apart():
    pytest.importorskip("matplotlib")
    from megatron_sharpness.report import figure

    lines = [json.dumps({"step": s, "lr": 1e-3, "critical_sharpness": v, "relative": {}})
             for s, v in ((2, 1.0), (4, 2.0), (2, 8.0), (4, 10.0))]
    built = figure(parse_lines(lines))
    drawn = {artist.get_label(): artist for artist in built.axes[0].get_lines()}
    assert list(drawn["critical sharpness λ_c (leg 1)"].get_ydata()) == [1.0, 2.0]
    assert list(drawn["critical sharpness λ_c (leg 2)"].get_ydata()) == [8.0, 10.0]
    assert drawn["critical sharpness λ_c (leg 2)"].get_linestyle() != drawn["critical sharpness λ_c (leg 1)"].get_linestyle()
