"""Parameter groups for the per-module breakdown, from parameter names alone (pure Python).

A group is searched along its own part of the update, θ(s) = θ_t + s·Δθ_G. Names are the
backend's canonical parameter names (wrapper prefixes such as DDP's `module.` removed; Megatron
layers numbered globally across pipeline stages).

Default groups:
- `embedding`: names with an `embedding`/`embed` component (Megatron `embedding.*`, nanoGPT-like
  `token_embedding`, `wte`, `wpe`);
- one group per transformer block, from the first `<container>.<N>.` in the name (Megatron
  `decoder.layers.N.*`, `blocks.N.*`, `h.N.*`; DeepSpeed's PipelineModule and nn.Sequential
  `N.*`, where N counts every layer, the embedding's included), named `layer_N`; deeper models than
  MAX_LAYER_GROUPS blocks get contiguous runs of blocks (`layers_0-3`), so that every parameter
  is still in a group and the breakdown costs at most MAX_LAYER_GROUPS + 2 searches;
- `output`: everything else (final norm and output layer).

Mixture-of-experts models (a parameter name with an `experts` component) split each block by its
parts, so that the router and the experts are not hidden inside the block: `layer_N.router`
(components `router`, `gate`: Megatron's `mlp.router`, DeepSpeed's and HF's `gate`),
`layer_N.shared_experts` (`shared_experts`, `shared_expert`, `shared_expert_gate`),
`layer_N.experts` (`experts`), `layer_N.mlp` (the dense MLP of a block without experts, `mlp`
component) and `layer_N.attention` (the rest of the block: attention and the block's norms). Deeper
MoE models than MAX_MOE_LAYER_RUNS blocks get runs of blocks (`layers_0-3.router`), so that a
breakdown costs at most 4 · MAX_MOE_LAYER_RUNS + 2 searches.

Configured groups: {name: pattern or [patterns]}; a pattern is an fnmatch pattern on the full
name, or a regular expression after `re:` (re.search). A parameter may be in several groups.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Mapping, Sequence

MAX_LAYER_GROUPS = 16
MAX_MOE_LAYER_RUNS = 8
DEFAULT = "default"

# A block's parts in a mixture-of-experts model, by name component, the first that matches wins
# (a shared expert's gate is the shared expert's, not the router).
_MOE_PARTS = (("shared_experts", {"shared_experts", "shared_expert", "shared_expert_gate"}),
              ("router", {"router", "gate"}), ("experts", {"experts"}), ("mlp", {"mlp"}))

_LAYER = re.compile(r"^(?:(.*?)\.)?(\d+)\.")
_EMBEDDING = re.compile(r"(^|[._])(embedding|embeddings|embed|wte|wpe)([._]|$)|_embedding([._]|$)")

Patterns = Mapping[str, Sequence[str]]


class ModuleGroupError(ValueError):
    """The configured groups do not fit the model's parameter names."""


def default_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """embedding, layer groups in block order, output; empty groups left out."""
    embedding, output = [], []
    layers: dict[int, list[str]] = {}
    for name in names:
        layer = _LAYER.match(name)
        if layer is not None:
            layers.setdefault(int(layer.group(2)), []).append(name)
        elif _EMBEDDING.search(name):
            embedding.append(name)
        else:
            output.append(name)
    groups: dict[str, list[str]] = {"embedding": embedding} if embedding else {}
    indices = sorted(layers)
    moe = any("experts" in name.split(".") for members in layers.values() for name in members)
    per_group = max(1, math.ceil(len(indices) / (MAX_MOE_LAYER_RUNS if moe else MAX_LAYER_GROUPS)))
    for first in range(0, len(indices), per_group):
        run = indices[first:first + per_group]
        label = f"layer_{run[0]}" if len(run) == 1 else f"layers_{run[0]}-{run[-1]}"
        members = [name for index in run for name in layers[index]]
        if not moe:
            groups[label] = members
            continue
        parts: dict[str, list[str]] = {}
        for name in members:
            parts.setdefault(moe_part(name), []).append(name)
        for part in ("attention", "router", "experts", "shared_experts", "mlp"):
            if part in parts:
                groups[f"{label}.{part}"] = parts[part]
    if output:
        groups["output"] = output
    return groups


def moe_part(name: str) -> str:
    """Which part of a mixture-of-experts block a parameter belongs to (its name's components)."""
    components = set(name.split("."))
    return next((part for part, names in _MOE_PARTS if components & names), "attention")


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def configured_groups(patterns: Patterns, names: Sequence[str]) -> dict[str, list[str]]:
    groups = {}
    for group, group_patterns in patterns.items():
        members = [name for name in names if any(matches(pattern, name) for pattern in group_patterns)]
        if not members:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise ModuleGroupError(f"critical sharpness: module group {group!r} ({', '.join(group_patterns)}) "
                                   f"matches no parameter; the parameters are named: {shown}")
        groups[group] = members
    return groups


def resolve_groups(modules: str | Patterns, names: Sequence[str]) -> dict[str, list[str]]:
    """The groups to search, {group name: parameter names}, the same on every rank given the same
    names."""
    return default_groups(names) if modules == DEFAULT else configured_groups(modules, names)


def validate_patterns(regexes: Sequence[str]) -> str | None:
    """The first `re:` pattern that does not compile, with why; None if all do."""
    for pattern in regexes:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                return f"{pattern!r} ({error})"
    return None
