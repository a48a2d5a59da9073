"""Per-module critical sharpness: groups from names, the group-restricted write, the analytic
block-diagonal quadratic."""

import pytest
import torch
import torch.nn as nn

from megatron_sharpness.backends.groups import group_ranges, view_segments, write_group
from megatron_sharpness.backends.pytorch import TorchBackend
from megatron_sharpness.modules import ModuleGroupError, default_groups, resolve_groups
from megatron_sharpness.search import critical_lr_search
from megatron_sharpness.testing.tiny_gpt import TinyGPT

MEGATRON_NAMES = (["embedding.word_embeddings.weight", "embedding.position_embeddings.weight"]
                  + [f"decoder.layers.{i}.{part}" for i in range(3)
                     for part in ("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight")]
                  + ["decoder.final_layernorm.weight", "output_layer.weight"])


def test_default_groups_of_megatron_names():
    groups = default_groups(MEGATRON_NAMES)
    assert list(groups) == ["embedding", "layer_0", "layer_1", "layer_2", "output"]
    assert groups["layer_1"] == ["decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.mlp.linear_fc1.weight"]
    assert groups["output"] == ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert len(groups["embedding"]) == 2


def test_default_groups_of_the_tiny_gpt_and_of_a_deep_model():
    names = [name for name, _ in TinyGPT(layers=3).named_parameters()]
    groups = default_groups(names)
    assert list(groups) == ["embedding", "layer_0", "layer_1", "layer_2", "output"]
    assert groups["embedding"] == ["token_embedding.weight", "position_embedding.weight"]
    assert groups["output"] == ["ln_final.weight", "ln_final.bias", "head.weight"]
    deep = default_groups([f"blocks.{i}.w" for i in range(40)])
    assert list(deep)[:2] == ["layers_0-2", "layers_3-5"] and len(deep) == 14  # ceil(40/3) runs of 3
    assert sum(len(members) for members in deep.values()) == 40  # every parameter in a group
    # DeepSpeed's PipelineModule (and nn.Sequential) name parameters by their layer's index.
    assert list(default_groups(["0.token.weight", "1.qkv.weight", "2.qkv.weight", "3.norm.weight"])) == [
        "layer_0", "layer_1", "layer_2", "layer_3"]


def moe_layer_names(layer: int, experts: int = 2, shared: bool = True) -> list[str]:
    """A Megatron MoE block's parameters (local transformer spec, SequentialMLP)."""
    prefix = f"decoder.layers.{layer}"
    names = [f"{prefix}.input_layernorm.weight", f"{prefix}.self_attention.linear_qkv.weight",
             f"{prefix}.self_attention.linear_proj.weight", f"{prefix}.pre_mlp_layernorm.weight",
             f"{prefix}.mlp.router.weight"]
    names += [f"{prefix}.mlp.experts.local_experts.{e}.linear_fc{i}.weight" for e in range(experts) for i in (1, 2)]
    return names + ([f"{prefix}.mlp.shared_experts.linear_fc1.weight"] if shared else [])


def test_default_groups_of_a_moe_model_split_each_block_into_attention_router_and_experts():
    dense = ["decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.mlp.linear_fc1.weight"]
    names = (["embedding.word_embeddings.weight"] + dense + moe_layer_names(1) + moe_layer_names(2, shared=False)
             + ["decoder.final_layernorm.weight", "output_layer.weight"])
    groups = default_groups(names)
    assert list(groups) == ["embedding", "layer_0.attention", "layer_0.mlp", "layer_1.attention", "layer_1.router",
                            "layer_1.experts", "layer_1.shared_experts", "layer_2.attention", "layer_2.router",
                            "layer_2.experts", "output"]
    assert groups["layer_1.attention"] == ["decoder.layers.1.input_layernorm.weight",
                                           "decoder.layers.1.self_attention.linear_qkv.weight",
                                           "decoder.layers.1.self_attention.linear_proj.weight",
                                           "decoder.layers.1.pre_mlp_layernorm.weight"]
    assert groups["layer_1.router"] == ["decoder.layers.1.mlp.router.weight"]
    assert len(groups["layer_1.experts"]) == 4 and groups["layer_0.mlp"] == ["decoder.layers.0.mlp.linear_fc1.weight"]
    assert sorted(n for members in groups.values() for n in members) == sorted(names)  # each parameter once
    # Mixtral / DeepSpeed MoE names: the router is the block's `gate`, a shared expert's gate is the shared expert's.
    hf = default_groups(["model.layers.0.self_attn.q_proj.weight", "model.layers.0.block_sparse_moe.gate.weight",
                         "model.layers.0.block_sparse_moe.experts.0.w1.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                         "model.layers.0.deepspeed_moe.experts.deepspeed_experts.1.w.weight"])
    assert {g: len(m) for g, m in hf.items()} == {"layer_0.attention": 1, "layer_0.router": 1, "layer_0.experts": 2,
                                                  "layer_0.shared_experts": 1}
    # A deep MoE model: at most MAX_MOE_LAYER_RUNS runs of blocks, each split.
    deep = default_groups([name for layer in range(61) for name in moe_layer_names(layer)])
    assert list(deep)[:4] == ["layers_0-7.attention", "layers_0-7.router", "layers_0-7.experts", "layers_0-7.shared_experts"]
    assert len(deep) == 4 * 8 and list(deep)[-1] == "layers_56-60.shared_experts"


def test_configured_groups_fnmatch_regex_and_a_pattern_matching_nothing():
    groups = resolve_groups({"attn": ["*.self_attention.*"], "l2": ["re:layers\\.2\\."]}, MEGATRON_NAMES)
    assert groups["attn"] == [f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(3)]
    assert groups["l2"] == ["decoder.layers.2.self_attention.linear_qkv.weight", "decoder.layers.2.mlp.linear_fc1.weight"]
    with pytest.raises(ModuleGroupError, match=r"'nope' \(lm_head\.\*\) matches no parameter.*embedding\.word"):
        resolve_groups({"nope": ["lm_head.*"]}, MEGATRON_NAMES)


def test_view_segments_clip_parameters_to_a_partition():
    flat = torch.arange(10.0)
    views = [("a", flat[0:4]), ("b", flat[4:7]), ("c", flat[7:10]), ("other", torch.zeros(3))]
    partition = flat[3:8]
    assert view_segments(partition, views) == [("a", 0, 1), ("b", 1, 4), ("c", 4, 5)]
    assert group_ranges([view_segments(partition, views)], {"a", "b"}) == [[(0, 4)]]  # merged
    target = torch.full((5,), -1.0)
    write_group(target, torch.zeros(5), torch.ones(5), 0.5, [(1, 4)])
    assert target.tolist() == [0.0, 0.5, 0.5, 0.5, 0.0]


def block_quadratic(seed=0):
    """Three parameter blocks, H block-diagonal with a different spectrum per block (float64)."""
    generator = torch.Generator().manual_seed(seed)
    sizes, scales = (3, 5, 4), (1.0, 30.0, 300.0)
    model = nn.Module()
    blocks = []
    for index, (size, scale) in enumerate(zip(sizes, scales)):
        q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        eigen = scale * (0.2 + torch.rand(size, generator=generator, dtype=torch.float64))
        blocks.append(q @ torch.diag(eigen) @ q.T)
        model.register_parameter(f"block{index}", nn.Parameter(torch.randn(size, generator=generator, dtype=torch.float64)))
    hessian = torch.block_diag(*blocks)

    def loss_fn():
        theta = torch.cat([model.block0, model.block1, model.block2])
        return 0.5 * theta @ hessian @ theta

    return model, hessian, loss_fn


def test_group_search_on_a_block_diagonal_quadratic_gives_each_blocks_exact_crossing():
    model, hessian, loss_fn = block_quadratic()
    # An update that is not -lr * g, with per-group lrs so that the blocks' crossings differ widely.
    optimizer = torch.optim.Adam([{"params": [model.block0], "lr": 0.05}, {"params": [model.block1], "lr": 0.01},
                                  {"params": [model.block2], "lr": 0.002}])
    for _ in range(2):  # Adam's first step is sign-like; take a later one
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    optimizer.zero_grad()
    loss_fn().backward()
    backend = TorchBackend(model, optimizer)
    backend.loss_fns = {None: loss_fn}
    theta_t = torch.cat([p.detach().clone() for p in model.parameters()])
    grad = torch.cat([p.grad for p in model.parameters()])
    baseline = float(loss_fn().detach())
    backend.snapshot()
    optimizer.step()
    theta_next = torch.cat([p.detach().clone() for p in model.parameters()])
    assert backend.after_step() is None
    assert backend.parameter_names() == ["block0", "block1", "block2"]
    step = theta_next - theta_t
    offsets = [0, 3, 8, 12]
    crossings = []
    for index in range(3):
        direction = torch.zeros_like(step)
        direction[offsets[index]:offsets[index + 1]] = step[offsets[index]:offsets[index + 1]]
        expected = float(-2 * grad @ direction / (direction @ hessian @ direction))  # s* of ½θᵀHθ along d_G
        backend.select_group([f"block{index}"])
        backend.write(1.0)
        moved = torch.cat([p.detach() for p in model.parameters()])
        assert torch.equal(moved, theta_t + direction) or torch.allclose(moved, theta_t + direction, rtol=0, atol=1e-15)

        def loss_at(s):
            backend.write(s)
            return backend.loss(None)

        result = critical_lr_search(loss_at, baseline, lr=0.05, tol=1 / 64, resolution_floor=backend.resolution_floor())
        lo, hi = result.bracket_step_multiple
        assert result.converged and lo <= expected <= hi, (index, expected, result.bracket_step_multiple)
        assert result.critical_step_multiple == pytest.approx(expected, rel=1 / 64)
        crossings.append(expected)
    assert max(crossings) / min(crossings) > 5  # the blocks really differ: a mixed-up group would fail
    backend.select_group(None)
    backend.write(1.0)
    assert torch.equal(torch.cat([p.detach() for p in model.parameters()]), theta_next)
    backend.restore()
    assert torch.equal(torch.cat([p.detach() for p in model.parameters()]), theta_next)


def test_probe_breakdown_of_the_block_quadratic_through_the_config():
    from megatron_sharpness import SharpnessConfig, TorchSharpnessProbe

    model, hessian, loss_fn = block_quadratic(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.004)
    config = SharpnessConfig(interval=1, modules={"first": "block0", "rest": ["block1", "re:^block2$"]},
                             modules_interval=2, modules_on_warning=False, tol=1 / 64, modules_max_search=40)
    printed = []
    from megatron_sharpness.loggers import LogLineLogger
    probe = TorchSharpnessProbe(model, optimizer, config, loggers=[LogLineLogger(printed.append)])
    records = []
    for _ in range(4):
        optimizer.zero_grad()
        loss_fn().backward()
        grad = torch.cat([p.grad for p in model.parameters()])
        records.append((probe.step(loss_fn), grad))
    assert [bool(m.modules) for m, _ in records] == [False, True, False, True]  # every 2nd measurement
    for measurement, grad in records[1::2]:
        assert measurement.modules_trigger == "interval"
        for group, (start, end) in {"first": (0, 3), "rest": (3, 12)}.items():
            direction = torch.zeros_like(grad)
            direction[start:end] = -0.004 * grad[start:end]  # SGD: Δθ_G = -lr g_G
            expected_lr = 0.004 * float(-2 * grad @ direction / (direction @ hessian @ direction))
            assert measurement.modules[group].search.critical_lr == pytest.approx(expected_lr, rel=1 / 64)
        record = measurement.to_dict()
        assert set(record["modules"]) == {"first", "rest"}
        assert record["modules_forwards"] == sum(m["forwards"] for m in record["modules"].values()) > 0
        assert record["forwards_total"] == record["forwards"] + record["modules_forwards"]
        worst = max(record["modules"], key=lambda g: record["modules"][g]["lr_over_critical_lr"])
        assert f"| modules: 2 (worst {worst} " in printed[3]
        scalars = measurement.scalars()
        assert scalars[f"module_lr_over_critical_lr/{worst}"] == record["modules"][worst]["lr_over_critical_lr"]
    assert "modules:" not in printed[0]


def test_warning_and_automatic_breakdown_when_the_step_overshoots():
    from megatron_sharpness import SharpnessConfig, TorchSharpnessProbe
    from megatron_sharpness.loggers import WarningLogger

    model, hessian, loss_fn = block_quadratic(seed=2)
    # Big enough for the stiff block (λ ~ 300) to overshoot, far too small for the others.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.009)
    warnings = []
    config = SharpnessConfig(interval=1, modules="default", modules_interval=0)
    probe = TorchSharpnessProbe(model, optimizer, config, loggers=[WarningLogger(warnings.append)])
    optimizer.zero_grad()
    loss_fn().backward()
    measurement = probe.step(loss_fn)
    assert measurement.lr_over_critical_lr > 1 and measurement.task.search.step_raised_loss
    assert measurement.modules_trigger == "step_raised_loss"
    assert list(measurement.modules) == ["output"]  # no embedding or layer names: all in one group
    assert warnings == [f"WARNING: {measurement.warning}"]
    assert "critical sharpness at iteration 1: lr/critical lr" in warnings[0] and "raised its batch's loss" in warnings[0]
    assert measurement.warnings == 1 and "sharpness warnings: 1" in measurement.log_fields()
    assert probe.probe.state_dict()["modules"]["warnings"] == 1
    assert measurement.scalars()["sharpness_warning"] == 1.0
    calm = SharpnessConfig(interval=1, modules="default", modules_interval=0, warn_ratio=1e6)
    model, _, loss_fn = block_quadratic(seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    quiet = TorchSharpnessProbe(model, optimizer, calm, loggers=[])
    optimizer.zero_grad()
    loss_fn().backward()
    measurement = quiet.step(loss_fn)
    assert measurement.warning is None and measurement.modules == {} and measurement.modules_trigger is None
    assert "sharpness_warning" not in measurement.scalars()  # an event: no point without a warning
    assert "sharpness warnings" not in measurement.log_fields()


def test_warn_ratio_triggers_the_breakdown_without_a_raised_loss():
    from megatron_sharpness import SharpnessConfig, TorchSharpnessProbe

    model, _, loss_fn = block_quadratic(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    config = SharpnessConfig(interval=1, modules={"b0": "block0", "b12": ["block1", "block2"]}, modules_interval=0,
                             warn_ratio=1e-3)
    probe = TorchSharpnessProbe(model, optimizer, config, loggers=[])
    optimizer.zero_grad()
    loss_fn().backward()
    measurement = probe.step(loss_fn)
    assert not measurement.task.search.step_raised_loss and measurement.lr_over_critical_lr > 1e-3
    assert measurement.modules_trigger == "warn_ratio" and set(measurement.modules) == {"b0", "b12"}
    assert measurement.warning.startswith(f"critical sharpness at iteration 1: lr/critical lr "
                                          f"{measurement.lr_over_critical_lr:.2f} > 0.001; highest lr/critical lr by module: b12 ")
    # The stiff blocks cross near the whole update's η_c; the soft block, hundreds of times further
    # out, does not within 8 doublings: capped, far from unstable, no ratio to rank.
    assert measurement.worst_module() == ("b12", pytest.approx(measurement.modules["b12"].search.lr /
                                                                measurement.modules["b12"].search.critical_lr))
    assert measurement.modules["b0"].status == "capped" and measurement.modules["b0"].forwards == 9


def test_megatron_names_number_experts_globally():
    # With expert parallelism each rank numbers its own experts from 0; the names the groups and
    # patterns see count from the first expert of the first expert-parallel rank.
    pytest.importorskip("megatron.core", reason="the megatron extra is not installed")
    from megatron_sharpness.backends.megatron import canonical_names

    class Experts(nn.Module):  # SequentialMLP on expert-parallel rank 1 of 2, two local experts
        def __init__(self):
            super().__init__()
            self.ep_group, self.num_local_experts = type("Group", (), {"rank": lambda self: 1})(), 2
            self.local_experts = nn.ModuleList([nn.Linear(2, 2, bias=False) for _ in range(2)])

    mlp = nn.Module()
    mlp.experts, mlp.shared_experts = Experts(), nn.Linear(2, 2, bias=False)
    layer = nn.Module()
    layer.mlp = mlp
    decoder = nn.Module()
    decoder.layers = nn.ModuleList([layer])
    chunk = nn.Module()
    chunk.decoder = decoder
    names = sorted(canonical_names([chunk]).values())
    assert names == ["decoder.layers.0.mlp.experts.local_experts.2.weight",
                     "decoder.layers.0.mlp.experts.local_experts.3.weight", "decoder.layers.0.mlp.shared_experts.weight"]
