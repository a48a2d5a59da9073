"""CPU demo on real megatron-core: a small GPT pre-trains on the embedded corpus, converted to
Megatron's indexed format, with tensor and pipeline parallelism through torchrun on gloo, the
distributed optimizer and bf16, and our Megatron-LM flags and hooks on. The last rank prints
Megatron's iteration line with λ_c; the run ends with `megatron-sharpness plot`.

    megatron-sharpness demo [--steps 300] [--interval 10] [--output-dir sharpness-demo]
                            [--tensor-parallel 2] [--pipeline-parallel 2]

The arguments are checked before anything is launched; each mistake gets one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

from megatron_sharpness.testing.launch import free_port


# The demo's GPT; tensor parallelism splits its attention heads, pipeline parallelism its layers.
LAYERS, HIDDEN, HEADS, VOCAB = 4, 64, 4, 256


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def output_dir_problem(output_dir: str, flag: str = "--output-dir") -> str | None:
    """Why nothing can be written into output_dir (created if missing), or None."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return f"{flag} {output_dir}: is a file, not a folder; allowed: a writable folder"
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        return f"{flag} {output_dir}: cannot write there ({error.strerror or error}); allowed: a writable folder"
    return None


def missing_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:  # the parent package is missing
        return True


def demo_problems(steps: int, interval: int, output_dir: str, tensor_parallel: int,
                  pipeline_parallel: int) -> list[str]:
    """Every reason the demo would fail or show nothing, one line each, found before launching."""
    problems = []
    if HEADS % tensor_parallel:
        problems.append(f"--tensor-parallel {tensor_parallel}: must divide the demo model's {HEADS} attention "
                        f"heads; allowed: {_divisors(HEADS)}")
    if LAYERS % pipeline_parallel:
        problems.append(f"--pipeline-parallel {pipeline_parallel}: must divide the demo model's {LAYERS} layers; "
                        f"allowed: {_divisors(LAYERS)}")
    if steps < interval:
        problems.append(f"--steps {steps} is below --interval {interval}: no iteration would be measured; "
                        "allowed: --steps >= --interval")
    problem = output_dir_problem(output_dir)
    if problem:
        problems.append(problem)
    if missing_module("megatron.core"):
        problems.append("megatron-core is not installed: pip install -e '.[megatron]'")
    if missing_module("matplotlib"):
        problems.append("matplotlib (for the PNG) is not installed: pip install -e '.[plot]'")
    return problems


def prepare_data(output_dir: str) -> tuple[str, str]:
    """The embedded corpus as two Megatron indexed datasets: training text and held-out text."""
    from megatron_sharpness.data import embedded_corpus, train_heldout_split, write_indexed_dataset

    os.makedirs(output_dir, exist_ok=True)
    train_text, heldout_text = train_heldout_split(embedded_corpus())
    return (write_indexed_dataset(os.path.join(output_dir, "train_text_document"), train_text),
            write_indexed_dataset(os.path.join(output_dir, "heldout_text_document"), heldout_text))


def worker(argv: list[str]) -> None:
    import torch

    from megatron_sharpness.testing.megatron_cpu import install_cpu_shims

    install_cpu_shims()
    from megatron.core import parallel_state

    from megatron_sharpness.integrations import megatron_lm
    from megatron_sharpness.testing.megatron_gpt import (TinyGPTSetup, build_model_and_optimizer,
                                                          init_gloo_model_parallel, megatron_lm_train_step,
                                                          shutdown_model_parallel)

    parser = megatron_lm.add_critical_sharpness_args(argparse.ArgumentParser(prog="demo worker"))
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=2)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=2)
    parser.add_argument("--train-iters", type=int, default=100)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lr-warmup-iters", type=int, default=10)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    args.decoder_seq_length = None

    init_gloo_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    setup = TinyGPTSetup(tensor_parallel=args.tensor_model_parallel_size,
                         pipeline_parallel=args.pipeline_model_parallel_size, distributed_optimizer=True, bf16=True,
                         layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, seq_length=args.seq_length,
                         micro_batch_size=args.micro_batch_size, lr=args.lr)
    model, optimizer = build_model_and_optimizer(setup)
    train_data = megatron_lm.IndexedDatasetBatches(args.data_path, args.seq_length, args.micro_batch_size)
    last_rank = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    consumed_samples, started = 0, time.time()
    for iteration in range(args.train_iters):  # as in Megatron-LM's train(): 0-based inside train_step
        learning_rate = args.lr * min(1.0, (iteration + 1) / args.lr_warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        loss, grad_norm = megatron_lm_train_step(model, optimizer, train_data, args, iteration)
        iteration += 1
        consumed_samples += args.micro_batch_size * args.num_microbatches * parallel_state.get_data_parallel_world_size()
        if iteration % args.log_interval == 0 and last_rank:
            elapsed_ms = 1000 * (time.time() - started) / args.log_interval
            started = time.time()
            print(f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{args.train_iters:8d} | "
                  f"consumed samples: {consumed_samples:12d} | elapsed time per iteration (ms): {elapsed_ms:.1f} | "
                  f"learning rate: {learning_rate:.6E} | lm loss: {loss:.6E} | grad norm: {grad_norm:.3f} |"
                  + megatron_lm.log_fields(iteration), flush=True)
    shutdown_model_parallel()


def run_demo(steps: int = 300, interval: int = 10, output_dir: str = "sharpness-demo", tensor_parallel: int = 2,
             pipeline_parallel: int = 2, timeout: float = 900) -> int:
    problems = demo_problems(steps, interval, output_dir, tensor_parallel, pipeline_parallel)
    for problem in problems:
        print(f"megatron-sharpness demo: error: {problem}", file=sys.stderr)
    if problems:
        return 2
    train_data, heldout_data = prepare_data(output_dir)
    log_file = os.path.join(output_dir, "critical_sharpness.jsonl")
    if os.path.exists(log_file):
        os.remove(log_file)
    ranks = tensor_parallel * pipeline_parallel
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "megatron_sharpness.demo_megatron", "--worker",
               "--data-path", train_data, "--tensor-model-parallel-size", str(tensor_parallel),
               "--pipeline-model-parallel-size", str(pipeline_parallel), "--train-iters", str(steps),
               "--log-interval", str(interval), "--critical-sharpness-interval", str(interval),
               "--critical-sharpness-micro-batches", "1", "--critical-sharpness-log-file", log_file,
               "--relative-sharpness-data-path", f"heldout={heldout_data}"]
    print(f"torchrun: {ranks} ranks (TP={tensor_parallel}, PP={pipeline_parallel}), gloo, bf16, distributed "
          f"optimizer, {steps} iterations, critical sharpness every {interval}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        result = subprocess.run(command, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"demo: torchrun did not finish within {timeout:.0f} s", file=sys.stderr)
        return 1
    if result.returncode != 0:
        print(f"demo: torchrun exited with {result.returncode}", file=sys.stderr)
        return result.returncode
    from megatron_sharpness.cli import main as cli

    return cli(["plot", log_file, "-o", os.path.join(output_dir, "critical_sharpness.png")])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        raise SystemExit("run it as `megatron-sharpness demo`")
