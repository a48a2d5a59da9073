"""Wiring for NVIDIA/Megatron-LM's training loop; patches/megatron-lm/ adds these calls:

    extra_args_provider(...)                      as pretrain's / parse_and_validate_args' extra_args_provider
    data_iterator = record(data_iterator, ...)    in train_step, before forward_backward_func
    ... = optimizer_step(optimizer, iteration, losses_reduced)   in train_step, instead of optimizer.step()
    log_string += log_fields(iteration)           in training_log, and write_scalars(...) beside it
    save_state(save_dir, iteration)               in save_checkpoint (checkpointing.py)

On measured iterations the probe runs right after the real optimizer.step(), with the script's own
forward_step_func on the micro-batches the step read. Relative tasks read Megatron indexed datasets
(.bin/.idx) given by --relative-sharpness-data-path NAME=PATH.

Resume: whenever Megatron saves a checkpoint, rank 0 writes the probe's state (warm starts, the
relative tasks' data positions) to SAVE_DIR/critical_sharpness/iter_NNNNNNN.json beside it; a run
started with --load reads the file of the iteration it resumed from when the probe is built (every
rank reads it: every rank holds the same state). A file beside the checkpoint, not an entry in its
state dict: it works alike for every --ckpt-format, and loading needs no patch line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from megatron_sharpness.backends import megatron_fsdp
from megatron_sharpness.backends.megatron_precision_aware import FP16_MASTERS
from megatron_sharpness.backends.megatron_support import CPU_OFFLOAD, FP8, LAYER_WISE, TORCH_FSDP2
from megatron_sharpness.integrations.flags import add_critical_sharpness_args as add_probe_args
from megatron_sharpness.integrations.flags import config_from_args, integer_at_least
from megatron_sharpness.integrations.megatron_core import MegatronSharpness
from megatron_sharpness.measurement import Measurement

_sharpness: MegatronSharpness | None = None
_relative: dict[str, list[IndexedDatasetBatches]] = {}

# The one Megatron-FSDP layout the probe drives (Megatron-LM's flags at their defaults).
MEGATRON_FSDP_LAYOUT = {"--megatron-fsdp-version": 1, "--data-parallel-sharding-strategy": "optim_grads_params",
                        "--outer-dp-sharding-strategy": "no_shard"}

# Layout version of the state file; checked on load.
STATE_FILE_VERSION = 1
STATE_FOLDER = "critical_sharpness"


def _name_and_path(text: str) -> tuple[str, str]:
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: NAME=PATH with PATH the prefix of a "
                                         "Megatron indexed dataset (PATH.bin and PATH.idx)")
    return name, path


def extra_args_provider(other: Callable | None = None) -> Callable:
    """An extra_args_provider adding our flags after those of `other` (e.g. ModelOpt's), if any."""
    def provide(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return add_critical_sharpness_args(parser if other is None else other(parser))

    return provide


def add_critical_sharpness_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's extra_args_provider (or a part of it): returns the parser, which from now on
    refuses (exit code 2, one line naming the flags) a setup the probe cannot measure, right after
    parsing: before Megatron builds the model and loads a checkpoint."""
    add_probe_args(parser)
    _refuse_after_parsing(parser)
    group = parser.add_argument_group(title="relative critical sharpness")
    group.add_argument("--relative-sharpness-data-path", type=_name_and_path, nargs="+", default=[],
                       metavar="NAME=PATH", help="another task's Megatron indexed dataset, searched along each "
                                                 "measured update (e.g. heldout=/data/val_text_document)")
    group.add_argument("--relative-sharpness-micro-batches", type=integer_at_least(1, "an integer >= 1"), default=1,
                       metavar="K", help="micro-batches of each relative task per measurement (default 1)")
    return parser


def _refuse_after_parsing(parser: argparse.ArgumentParser) -> None:
    # argparse has no hook after parsing, and Megatron-LM up to core_v0.17 parses inside
    # pretrain(): the parser's own parse_known_args (which parse_args calls) is wrapped instead, so
    # that the refusal comes with the flags, on every release line, without another patch line.
    parse_known_args = parser.parse_known_args

    def parse_and_check(args=None, namespace=None):
        parsed, extras = parse_known_args(args, namespace)
        refusal = refusal_of_args(parsed)
        if refusal is not None:
            parser.exit(2, f"{parser.prog}: error: {refusal}\n")
        return parsed, extras

    parser.parse_known_args = parse_and_check


def refusal_of_args(args: argparse.Namespace) -> str | None:
    """Why the probe cannot measure the run these Megatron-LM flags describe, or None (also when the
    probe is off). Flags of other release lines or scripts that a parser lacks count as not given."""
    if getattr(args, "critical_sharpness_interval", 0) <= 0:
        return None
    flag = functools.partial(getattr, args)
    optimizer = flag("optimizer", "adam")
    if optimizer == "dist_muon" or (optimizer not in ("adam", "sgd") and flag("use_distributed_optimizer", False)):
        given = "--optimizer dist_muon" if optimizer == "dist_muon" else f"--optimizer {optimizer} --use-distributed-optimizer"
        return LAYER_WISE.message(given)
    refused = [("--optimizer-cpu-offload", flag("optimizer_cpu_offload", False), CPU_OFFLOAD),
               ("--fp8-format", flag("fp8", None), FP8), ("--fp4-format", flag("fp4", None), FP8),
               ("--fp8-param-gather", flag("fp8_param_gather", False), FP8),
               ("--fp4-param-gather", flag("fp4_param_gather", False), FP8),
               ("--use-torch-fsdp2", flag("use_torch_fsdp2", False), TORCH_FSDP2)]
    for name, given, refusal in refused:
        if given:
            return refusal.message(name if given is True else f"{name} {given}")
    if flag("critical_sharpness_write", "auto") == "local":
        # What the backend refuses when attached, said here in the flags' terms.
        if flag("use_megatron_fsdp", False):
            return ("critical sharpness: --critical-sharpness-write local is not available with --use-megatron-fsdp "
                    "(its forwards gather every param from the shards); use sharded or auto")
        if flag("use_distributed_optimizer", False) and not (flag("bf16", False) or flag("fp16", False)):
            return ("critical sharpness: --critical-sharpness-write local needs the distributed optimizer's params in "
                    "bf16 or fp16 (--bf16 or --fp16; fp32 params alias their masters); use sharded or auto")
    if flag("use_megatron_fsdp", False):
        layout = {"--megatron-fsdp-version": flag("megatron_fsdp_version", 1),
                  "--data-parallel-sharding-strategy": flag("data_parallel_sharding_strategy", "optim_grads_params"),
                  "--outer-dp-sharding-strategy": flag("outer_dp_sharding_strategy", "no_shard")}
        if layout != MEGATRON_FSDP_LAYOUT:
            given = " ".join(f"{name} {value}" for name, value in layout.items() if MEGATRON_FSDP_LAYOUT[name] != value)
            return megatron_fsdp.LAYOUT.message(f"--use-megatron-fsdp {given}")
        refusal = megatron_fsdp.pipeline_refusal()
        if refusal is not None:
            return refusal.message("--use-megatron-fsdp")
    if flag("use_precision_aware_optimizer", False) and str(flag("main_params_dtype", "fp32")) in ("fp16", "torch.float16"):
        return FP16_MASTERS.message("--use-precision-aware-optimizer --main-params-dtype fp16")
    dropout = {name: flag(name.lstrip("-").replace("-", "_"), 0.0) or 0.0
               for name in ("--hidden-dropout", "--attention-dropout")}
    if flag("critical_sharpness_reuse_training_loss", False) and any(dropout.values()):
        return ("critical sharpness: --critical-sharpness-reuse-training-loss needs --hidden-dropout 0 and "
                f"--attention-dropout 0 (got {', '.join(f'{name} {value}' for name, value in dropout.items())}): with "
                "dropout the training forward's loss is not the one a probe forward computes")
    for name, path in flag("relative_sharpness_data_path", []):
        missing = [f"{path}{suffix}" for suffix in (".bin", ".idx") if not os.path.isfile(f"{path}{suffix}")]
        if missing:
            return (f"critical sharpness: --relative-sharpness-data-path {name}={path}: no {' and no '.join(missing)} "
                    "(PATH is the prefix of a Megatron indexed dataset, PATH.bin and PATH.idx)")
    return None


class IndexedDatasetBatches:
    """Micro-batches of consecutive (seq_length + 1)-token windows over the documents of a Megatron
    indexed dataset, in the dict form Megatron's GPT get_batch reads; cycles forever.
    attention_mask: whether batches carry one (Megatron's --no-create-attention-mask-in-dataloader
    turns it off)."""

    def __init__(self, path_prefix: str, seq_length: int, micro_batch_size: int, attention_mask: bool = True):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        try:
            self.dataset = IndexedDataset(path_prefix)
        except (OSError, AssertionError, ValueError) as error:
            raise ValueError(f"--relative-sharpness-data-path: cannot read the indexed dataset {path_prefix!r} "
                             f"({path_prefix}.bin / {path_prefix}.idx): {error}") from None
        if len(self.dataset) == 0:
            raise ValueError(f"--relative-sharpness-data-path: {path_prefix!r} holds no document")
        self.window, self.micro_batch_size = seq_length + 1, micro_batch_size
        self.attention_mask = attention_mask
        self._document, self._buffer = 0, torch.empty(0, dtype=torch.long)

    def __iter__(self) -> IndexedDatasetBatches:
        return self

    def _tokens(self, count: int) -> torch.Tensor:
        while self._buffer.numel() < count:
            document = torch.from_numpy(self.dataset[self._document].astype("int64"))
            self._buffer = torch.cat([self._buffer, document])
            self._document = (self._document + 1) % len(self.dataset)
        tokens, self._buffer = self._buffer[:count], self._buffer[count:]
        return tokens

    def state_dict(self) -> dict[str, int]:
        """The read position: the next document, and how many tokens of the one before it are left
        over. (What is left over is always a tail of the last document read: a document is read only
        while fewer tokens than needed are buffered.)"""
        return {"document": self._document, "leftover": int(self._buffer.numel())}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        document, leftover = state.get("document"), state.get("leftover")
        if not (isinstance(document, int) and 0 <= document < len(self.dataset)):
            raise ValueError(f"relative task data position: document {document!r} is not in [0, {len(self.dataset)})")
        previous = self.dataset[(document - 1) % len(self.dataset)]
        if not (isinstance(leftover, int) and 0 <= leftover < max(len(previous), 1)):
            raise ValueError(f"relative task data position: {leftover!r} tokens left over from a document of "
                             f"{len(previous)}; allowed: 0 <= leftover < the document's length (another dataset?)")
        self._document = document
        tail = previous[len(previous) - leftover:] if leftover else previous[:0]
        self._buffer = torch.from_numpy(tail.astype("int64"))

    def __next__(self) -> dict[str, torch.Tensor]:
        windows = self._tokens(self.window * self.micro_batch_size).view(self.micro_batch_size, self.window)
        return gpt_micro_batch(windows, self.attention_mask)


def gpt_micro_batch(tokens: torch.Tensor, attention_mask: bool = True) -> dict[str, torch.Tensor]:
    """A micro-batch as Megatron's GPT get_batch reads it, from [batch, seq + 1] token ids.

    Shapes and dtypes are those of Megatron's GPT dataset after collation, which
    get_batch_on_this_tp_rank broadcasts from TP rank 0 into buffers it allocates on the other
    ranks: the causal mask (True = masked) is [batch, 1, seq, seq], not a broadcastable [1, 1, ...]."""
    batch, seq_plus_one = tokens.shape
    seq = seq_plus_one - 1
    micro_batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                   "loss_mask": torch.ones(batch, seq),
                   "position_ids": torch.arange(seq).unsqueeze(0).expand(batch, -1).contiguous()}
    if attention_mask:
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool)).logical_not()
        micro_batch["attention_mask"] = causal.expand(batch, 1, seq, seq).contiguous()
    return micro_batch


def _relative_iterators(args: argparse.Namespace, chunks: int) -> dict[str, list[IndexedDatasetBatches]]:
    iterators: dict[str, list[IndexedDatasetBatches]] = {}
    for name, path in args.relative_sharpness_data_path:
        if name in iterators:
            raise ValueError(f"--relative-sharpness-data-path: task name {name!r} is given twice")
        iterators[name] = [IndexedDatasetBatches(path, args.seq_length, args.micro_batch_size,
                                                 getattr(args, "create_attention_mask_in_dataloader", True))
                           for _ in range(chunks)]
    return iterators


def state_path(checkpoint_dir: str, iteration: int) -> str:
    """Where the probe's state saved with Megatron's checkpoint of `iteration` lives."""
    return os.path.join(checkpoint_dir, STATE_FOLDER, f"iter_{iteration:07d}.json")


def save_state(save_dir: str, iteration: int) -> None:
    """Called by Megatron-LM's save_checkpoint on every rank: rank 0 writes the probe's state."""
    if _sharpness is None or dist.get_rank() != 0:
        return
    state = {"version": STATE_FILE_VERSION, "iteration": iteration, "probe": _sharpness.probe.state_dict(),
             "relative_data": {name: [chunk.state_dict() for chunk in chunks] for name, chunks in _relative.items()}}
    path = state_path(save_dir, iteration)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written whole, then renamed: a job killed mid-write leaves no half file to resume from.
    with open(f"{path}.tmp", "w") as file:
        json.dump(state, file)
    os.replace(f"{path}.tmp", path)


def _restore_state(args: argparse.Namespace, iteration: int) -> None:
    """After --load resumed at `iteration`: the probe's state saved with that checkpoint, if any."""
    path = state_path(args.load, iteration)
    if not os.path.isfile(path):
        if dist.get_rank() == 0:
            print(f"critical sharpness: no probe state at {path} (a checkpoint saved without the probe?): "
                  "the first measurement after the resume starts cold", flush=True)
        return
    with open(path) as file:
        state = json.load(file)
    if not isinstance(state, dict) or state.get("version") != STATE_FILE_VERSION or state.get("iteration") != iteration:
        raise ValueError(f"critical sharpness: {path} is not a probe state of version {STATE_FILE_VERSION} "
                         f"for iteration {iteration}")
    try:
        _sharpness.probe.load_state_dict(state["probe"])
        for name, chunks in _relative.items():
            # A task added since the checkpoint starts at its first document.
            for chunk, chunk_state in zip(chunks, state["relative_data"].get(name, [])):
                chunk.load_state_dict(chunk_state)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"critical sharpness: cannot resume from {path}: {error}; delete the file to resume "
                         "with a cold probe state") from None


def record(data_iterator, model: list, optimizer, forward_step_func: Callable, args: argparse.Namespace,
           iteration: int, num_microbatches: int):
    """The step's data iterator(s), recorded on measured iterations (1-based `iteration`)."""
    global _sharpness, _relative
    if _sharpness is None:
        config = config_from_args(args)
        if not config.enabled:
            return data_iterator
        _relative = _relative_iterators(args, len(model))
        _sharpness = MegatronSharpness(
            model, optimizer, forward_step_func, config, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, decoder_seq_length=getattr(args, "decoder_seq_length", None),
            relative_data_iterators={name: chunks if len(chunks) > 1 else chunks[0]
                                     for name, chunks in _relative.items()},
            relative_micro_batches=args.relative_sharpness_micro_batches)
        if getattr(args, "load", None) and iteration > 1:
            _restore_state(args, iteration - 1)
    return _sharpness.record(data_iterator, num_microbatches, iteration)


def optimizer_step(optimizer, iteration: int, losses_reduced: Sequence[dict] | None = None):
    """optimizer.step(), measured on due iterations; returns (update_successful, grad_norm, num_zeros).
    losses_reduced: what forward_backward_func returned for the step (read with
    --critical-sharpness-reuse-training-loss)."""
    if _sharpness is None:
        return optimizer.step()
    return _sharpness.step(iteration, training_losses=losses_reduced)


def _measurement_at(iteration: int) -> Measurement | None:
    if _sharpness is None or _sharpness.last_measurement is None:
        return None
    return _sharpness.last_measurement if _sharpness.last_measurement.step == iteration else None


def log_fields(iteration: int) -> str:
    """' critical sharpness: ... | critical lr: ... |' for Megatron's iteration line, or ''."""
    measurement = _measurement_at(iteration)
    return "" if measurement is None else " " + measurement.log_fields()


def write_scalars(writer, wandb_writer, iteration: int, consumed_samples: int) -> None:
    """Megatron-style TensorBoard tags (also ' vs samples') and W&B keys, as training_log writes them."""
    measurement = _measurement_at(iteration)
    if measurement is None:
        return
    for key, value in measurement.scalars().items():
        name, _, task = key.partition("/")  # relative tasks: "relative_critical_sharpness/<task>"
        tag = name.replace("_", " ") + (f" {task}" if task else "")
        if writer is not None:
            writer.add_scalar(tag, value, iteration)
            writer.add_scalar(f"{tag} vs samples", value, consumed_samples)
        if wandb_writer is not None:
            wandb_writer.log({tag: value}, iteration)


def reset() -> None:
    """Forget the attached probe (tests run several trainings in one process)."""
    global _sharpness, _relative
    _sharpness, _relative = None, {}
