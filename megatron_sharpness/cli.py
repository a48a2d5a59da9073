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
    demo.add_argument("--tensor-parallel", type=positive_int, default=2)
    demo.add_argument("--pipeline-parallel", type=positive_int, default=2)

    torch_demo = commands.add_parser("demo-torch", help="the same idea in plain PyTorch: a tiny GPT, one process")
    torch_demo.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    torch_demo.add_argument("--interval", type=positive_int, default=10, help="measure every N steps (default 10)")
    torch_demo.add_argument("--log-file", default="critical_sharpness.jsonl",
                            help="JSONL output (default critical_sharpness.jsonl)")
    torch_demo.add_argument("--seed", type=int, default=0)

    parse = commands.add_parser("parse", help="per-step sharpness from training logs or JSONL files")
    parse.add_argument("logs", nargs="+", metavar="LOG")
    parse.add_argument("--format", choices=("table", "csv", "json"), default="table")

    summary = commands.add_parser("summary", help="per-phase statistics of the measured sharpness")
    summary.add_argument("logs", nargs="+", metavar="LOG")
    summary.add_argument("--phases", type=positive_int, default=4, help="split the measured steps into N phases")

    plot = commands.add_parser("plot", help="PNG of λ_c per step with the 2/η edge of stability and the lr")
    plot.add_argument("logs", nargs="+", metavar="LOG")
    plot.add_argument("--output", "-o", default="critical_sharpness.png")
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
    run.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from megatron_sharpness.demo_megatron import run_demo

        return run_demo(steps=args.steps, interval=args.interval, output_dir=args.output_dir,
                        tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel)
    if args.command == "demo-torch":
        from megatron_sharpness.demo import run_demo

        run_demo(steps=args.steps, interval=args.interval, log_file=args.log_file, seed=args.seed)
        return 0
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
        from megatron_sharpness import report
        from megatron_sharpness.logs import LogError, read_logs

        try:
            records = read_logs(args.logs)
            if args.command == "parse":
                print(report.render(records, args.format))
            elif args.command == "summary":
                print(report.summary(records, args.phases))
            else:
                report.plot(records, args.output)
                print(f"wrote {args.output}")
        except (LogError, report.ReportError) as error:
            print(f"megatron-sharpness {args.command}: error: {error}", file=sys.stderr)
            return 2
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
