"""The `megatron-sharpness` command."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_sharpness import __version__
from megatron_sharpness.integrations.flags import integer_at_least


positive_int = integer_at_least(1, "an integer >= 1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sharpness",
        description="Critical sharpness of the loss along the optimizer's update, measured while training.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="pre-train a small GPT on CPU with megatron-core (TP and PP through "
                                             "torchrun, bf16, distributed optimizer) with the probe on")
    demo.add_argument("--steps", type=positive_int, default=300, help="iterations (default 300)")
    demo.add_argument("--interval", type=positive_int, default=10, help="measure every N iterations (default 10)")
    demo.add_argument("--output-dir", default="sharpness-demo",
                      help="indexed datasets, JSONL and PNG go here (default sharpness-demo)")
    demo.add_argument("--tensor-parallel", type=positive_int, default=2,
                      help="tensor-parallel ranks; must divide the model's 4 attention heads (default 2)")
    demo.add_argument("--pipeline-parallel", type=positive_int, default=2,
                      help="pipeline stages; must divide the model's 4 layers (default 2)")

    torch_demo = commands.add_parser("demo-torch", help="the same idea in plain PyTorch: a tiny GPT, one process")
    torch_demo.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    torch_demo.add_argument("--interval", type=positive_int, default=10, help="measure every N steps (default 10)")
    torch_demo.add_argument("--output-dir", default="sharpness-demo-torch",
                            help="critical_sharpness.jsonl and critical_sharpness.png go here "
                                 "(default sharpness-demo-torch)")
    torch_demo.add_argument("--seed", type=int, default=0, help="seed of the model and the batches (default 0)")

    spike_demo = commands.add_parser("demo-spike", help="a tiny GPT where one group's lr is multiplied at a known "
                                                        "iteration: the warning fires before the loss spikes")
    spike_demo.add_argument("--steps", type=positive_int, default=30, help="iterations (default 30)")
    spike_demo.add_argument("--provoke-at", type=positive_int, default=16,
                            help="first iteration with the group's lr multiplied (default 16)")
    spike_demo.add_argument("--factor", type=float, default=30.0, help="the lr multiplier (default 30)")
    spike_demo.add_argument("--group", default="output", choices=("embedding", "layer_0", "layer_1", "output"),
                            help="the default module group whose lr is multiplied (default output)")
    spike_demo.add_argument("--calm", action="store_true", help="the same run without the provocation")
    spike_demo.add_argument("--guard", default="off", choices=("off", "shorten", "lr"),
                            help="the probe's guard at its defaults (default off)")
    spike_demo.add_argument("--output-dir", default="sharpness-demo-spike",
                            help="train.log, critical_sharpness.jsonl and .png go here (default sharpness-demo-spike)")

    log_help = ("training logs (Megatron-LM, Megatron-DeepSpeed, DeepSpeed, SLURM output) or JSONL files from "
                "--critical-sharpness-log-file / log_file; where a file's steps go backwards (a run restarted or "
                "resumed into the same file) the records from there on are kept apart as a leg of their own, with "
                "a warning; files are merged leg by leg, a later file's record of a step winning, so give the "
                "files in run order")
    parse = commands.add_parser("parse", help="per-step sharpness from training logs or JSONL files")
    parse.add_argument("logs", nargs="+", metavar="LOG", help=log_help)
    parse.add_argument("--format", choices=("table", "csv", "json"), default="table",
                       help="a text table for reading, CSV or a JSON list for other tools (default table)")

    summary = commands.add_parser("summary", help="per-phase statistics of the measured sharpness")
    summary.add_argument("logs", nargs="+", metavar="LOG", help=log_help)
    summary.add_argument("--phases", type=positive_int, default=4,
                         help="split the measured steps into N phases of equal count (default 4)")

    plot = commands.add_parser("plot", help="PNG of λ_c per step with the 2/η edge of stability and the lr")
    plot.add_argument("logs", nargs="+", metavar="LOG", help=log_help)
    plot.add_argument("--output", "-o", default="critical_sharpness.png", metavar="FILE",
                      help="image to write; the extension picks the format (png, pdf, svg, ...; .png is added "
                           "to a name without one); a folder gets critical_sharpness.png inside "
                           "(default critical_sharpness.png)")
    check = commands.add_parser(
        "check", help="apply our patch to a copy of a Megatron-LM checkout and train a tiny GPT for 3 iterations "
                      "on CPU with the probe on: does this checkout work, before a cluster job?")
    check.add_argument("checkout", metavar="PATH", help="the Megatron-LM checkout (left unchanged)")
    check.add_argument("--python", default=sys.executable,
                       help="the Python to train with (core_v0.17 and later need 3.12; default: this one)")
    check.add_argument("--nproc", type=positive_int, default=1, help="ranks (default 1)")
    check.add_argument("--timeout", type=positive_int, default=600, help="seconds (default 600)")
    check.add_argument("megatron_flags", nargs=argparse.REMAINDER, metavar="-- FLAGS",
                       help="more pretrain_gpt.py flags, e.g. -- --tensor-model-parallel-size 2")
    run = commands.add_parser(
        "exec", help="run COMMAND with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set from srun, "
                     "mpiexec or torchrun (e.g. srun megatron-sharpness exec -- python pretrain_gpt.py ...)")
    run.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the program and its arguments, after --")
    return parser


def _exec(command: list[str]) -> int:
    from megatron_sharpness.distributed import LaunchEnvironmentError, discover

    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("megatron-sharpness exec: error: give the command to run after --", file=sys.stderr)
        return 2
    try:
        found = discover()
    except LaunchEnvironmentError as error:
        print(f"megatron-sharpness exec: error: {error}", file=sys.stderr)
        return 2
    os.environ.update({"RANK": str(found.rank), "WORLD_SIZE": str(found.world_size),
                       "LOCAL_RANK": str(found.local_rank), "MASTER_ADDR": found.master_addr,
                       "MASTER_PORT": str(found.master_port)})
    try:
        os.execvp(command[0], command)
    except OSError as error:
        print(f"megatron-sharpness exec: error: cannot run {command[0]!r}: {error.strerror}", file=sys.stderr)
        return 127


def _print(text: str) -> None:
    """Print to stdout; a reader that has gone (`parse ... | head`) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at devnull so that the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _image_formats() -> set[str]:
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:  # report.plot says how to install it
        return {"png"}
    return set(FigureCanvasBase.get_supported_filetypes())


def plot_path(output: str) -> tuple[str, str | None]:
    """The file `plot -o output` writes, and why it differs from output (None if it does not)."""
    if output.endswith(("/", os.sep)):  # a folder by its name: make it
        from megatron_sharpness.report import ReportError

        try:
            os.makedirs(output, exist_ok=True)
        except OSError as error:
            raise ReportError(f"cannot create the folder {output}: {error.strerror or error}") from None
    if os.path.isdir(output):
        return os.path.join(output, "critical_sharpness.png"), f"{output} is a folder"
    extension = os.path.splitext(output)[1][1:].lower()
    if extension not in _image_formats():
        reason = "no extension" if not extension else f"the extension .{extension}, which is no image format"
        return output + ".png", f"{output!r} has {reason}: added .png"
    return output, None


def _torch_demo(args: argparse.Namespace) -> int:
    from megatron_sharpness.demo import run_demo
    from megatron_sharpness.demo_megatron import missing_module, output_dir_problem

    problems = []
    if args.steps < args.interval:
        problems.append(f"--steps {args.steps} is below --interval {args.interval}: no step would be measured; "
                        "allowed: --steps >= --interval")
    problem = output_dir_problem(args.output_dir)
    if problem:
        problems.append(problem)
    if missing_module("matplotlib"):
        problems.append("matplotlib (for the PNG) is not installed: pip install -e '.[plot]'")
    for problem in problems:
        print(f"megatron-sharpness demo-torch: error: {problem}", file=sys.stderr)
    if problems:
        return 2
    log_file = os.path.join(args.output_dir, "critical_sharpness.jsonl")
    if os.path.exists(log_file):  # the JSONL logger appends; a new demo starts a new file
        os.remove(log_file)
    run_demo(steps=args.steps, interval=args.interval, log_file=log_file, seed=args.seed)
    return main(["plot", log_file, "-o", os.path.join(args.output_dir, "critical_sharpness.png")])


def _spike_demo(args: argparse.Namespace) -> int:
    from megatron_sharpness.demo_megatron import output_dir_problem
    from megatron_sharpness.demo_spike import run_spike_demo

    problem = output_dir_problem(args.output_dir)
    if problem is None and args.provoke_at > args.steps and not args.calm:
        problem = f"--provoke-at {args.provoke_at} is after the last iteration ({args.steps}); allowed: <= --steps"
    if problem:
        print(f"megatron-sharpness demo-spike: error: {problem}", file=sys.stderr)
        return 2
    log_file = os.path.join(args.output_dir, "critical_sharpness.jsonl")
    if os.path.exists(log_file):
        os.remove(log_file)
    lines: list[str] = []

    def show(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    run_spike_demo(steps=args.steps, provoke_at=None if args.calm else args.provoke_at, factor=args.factor,
                   group=args.group, log_file=log_file, print_fn=show, guard=args.guard)
    train_log = os.path.join(args.output_dir, "train.log")
    with open(train_log, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    code = main(["summary", train_log])
    return code or main(["plot", train_log, log_file, "-o", os.path.join(args.output_dir, "critical_sharpness.png")])


def _report(args: argparse.Namespace) -> int:
    from megatron_sharpness import report
    from megatron_sharpness.logs import LogError, read_logs, read_losses
    from megatron_sharpness.spikes import detect_spikes

    def warn(message: str) -> None:
        print(f"megatron-sharpness {args.command}: warning: {message}", file=sys.stderr)

    try:
        records = read_logs(args.logs, warn)
        if args.command == "parse":
            _print(report.render(records, args.format))
        elif args.command == "summary":
            losses = read_losses(args.logs)
            _print(report.summary(records, args.phases) + "\n" +
                   report.spike_report(records, detect_spikes(losses), bool(losses)))
        else:
            output, changed = plot_path(args.output)
            report.plot(records, output, detect_spikes(read_losses(args.logs)))
            _print(f"wrote {output}" + (f" ({changed})" if changed else ""))
    except (LogError, report.ReportError) as error:
        print(f"megatron-sharpness {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from megatron_sharpness.demo_megatron import run_demo

        return run_demo(steps=args.steps, interval=args.interval, output_dir=args.output_dir,
                        tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel)
    if args.command == "demo-torch":
        return _torch_demo(args)
    if args.command == "demo-spike":
        return _spike_demo(args)
    if args.command == "check":
        from megatron_sharpness.testing.megatron_lm_check import CheckError, check
        from pathlib import Path

        flags = args.megatron_flags[1:] if args.megatron_flags[:1] == ["--"] else args.megatron_flags
        try:
            return check(Path(args.checkout), args.python, args.nproc, flags, args.timeout)
        except CheckError as error:
            print(f"megatron-sharpness check: error: {error}", file=sys.stderr)
            return 2
    if args.command == "exec":
        return _exec(args.command_line)
    if args.command in ("parse", "summary", "plot"):
        return _report(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
