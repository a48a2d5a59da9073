"""LocalWrites on its own (one process, the step's all-gather a no-op): the numbers a local trial
point is made of. The backends' use of it, on 2 and 4 ranks: tests/test_megatron.py and
tests/test_deepspeed.py (both write modes by hand on one step, training bitwise with either,
ZeRO-2 against an fp64 reference)."""

import pytest
import torch

from megatron_sharpness.backends import local as local_module
from megatron_sharpness.backends.local import LocalWrites, local_bytes, wants_local


def one_rank(model_dtype, old, new):
    """A 'model' of one flat, its only shard the whole of it: params = bf16/fp16 θ_{t+1}."""
    flat = new.to(model_dtype)
    writes = LocalWrites([flat], lambda steps: [])
    writes.take_step([[(new, old, flat)]])
    return flat, writes


def test_s1_and_restore_are_theta_next_bitwise_also_for_signed_zeros_and_non_finite_values():
    old = torch.tensor([0.5, -0.0, 1.0, float("nan"), float("inf"), 3.0])
    new = torch.tensor([0.25, -0.0, -0.0, float("nan"), float("inf"), 3.0 + 1e-6])
    flat, writes = one_rank(torch.bfloat16, old, new)
    expected = flat.clone()
    writes.write(2.5)
    writes.write(1.0)
    assert torch.equal(flat.view(torch.int16), expected.view(torch.int16))
    writes.write(-3.0)
    writes.restore()
    assert torch.equal(flat.view(torch.int16), expected.view(torch.int16))


def test_far_along_the_step_elements_that_moved_less_than_an_ulp_move_as_the_fp32_step_says():
    """A bf16 ulp at 1.0 is 2^-7. Masters moved 0.3 ulp: their bf16 endpoints are equal, so a lerp
    between those would never move them; the local line moves them 0.3 ulp per unit of s."""
    ulp = 2.0 ** -7
    old = torch.full((1000,), 1.0) + torch.linspace(0, 0.2, 1000) * ulp  # all round to 1.0
    new = old + 0.3 * ulp
    flat, writes = one_rank(torch.bfloat16, old, new)
    assert torch.equal(flat, old.bfloat16())  # the endpoints agree in bf16
    writes.write(11.0)  # 10 steps beyond θ_{t+1}: 3 ulps along the step, ~3.3 from θ_t
    moved = (flat.float() - 1.0) / ulp
    exact = (old + 11.0 * (new - old) - 1.0) / ulp
    assert (moved - exact).abs().max() <= 1.0  # the rounding of θ_{t+1} and of the trial point
    assert moved.min() >= 2.0


def test_an_fp16_model_keeps_a_step_below_fp16s_range():
    old = torch.full((8,), 1e-4)
    new = old + 1e-9  # under fp16's smallest subnormal (6e-8): an fp16 step would be 0
    flat, writes = one_rank(torch.float16, old, new)
    writes.write(1001.0)  # 1e-6 along the step: about 16 fp16 ulps at 1e-4
    assert torch.allclose(flat.float(), old + 1e-6, rtol=0, atol=2.0 ** -24)


def test_trial_points_are_computed_in_fp32_and_rounded_once(monkeypatch):
    """Slices of the CPU path meet without a seam; the step multiple keeps its fp32 precision
    (torch.add(..., alpha=) on bf16 would round 1234.5 to 1232)."""
    torch.manual_seed(0)
    old = torch.randn(10_000)
    new = old + 1e-3 * torch.randn(10_000)
    monkeypatch.setattr(local_module, "chunk_elements", lambda device: 777)
    flat, writes = one_rank(torch.bfloat16, old, new)
    anchor, step = new.bfloat16().float(), (new - old).bfloat16().float()
    for s in (1235.5, 0.7, -2.0):
        writes.write(s)
        reference = (anchor + (s - 1.0) * step).bfloat16()
        # the kernel may fuse the multiply-add: at most one bf16 ulp apart, and rarely
        assert (flat != reference).float().mean() < 1e-3
        assert ((flat.float() - reference.float()).abs() <= reference.float().abs() * 2.0 ** -7).all()


def test_the_local_lines_floor_describes_anchor_plus_step():
    """Every master moved a quarter ulp (2^-9 at 1.0): the params read bf16(1 + (s − 1)·2^-9),
    which leaves 1.0 half an ulp above it, at s = 3 (the floor is the upper edge of the
    quarter-octave bin that holds 3)."""
    ulp = 2.0 ** -7
    old = torch.full((4096,), 1.0)
    new = old + 0.25 * ulp
    flat, writes = one_rank(torch.bfloat16, old, new)
    floor = writes.histogram([[(new, old, flat)]], "cpu").floor()
    assert floor == pytest.approx(2.0 ** (7 / 4)), floor
    writes.write(2.9)
    assert torch.equal(flat, torch.ones_like(flat))
    writes.write(3.1)
    assert (flat > 1).all()


def test_what_auto_asks_for():
    flats = [torch.empty(1 << 20, dtype=torch.bfloat16)]
    assert local_bytes(flats) == 4 * 2**20  # the anchor and the step, 2 bytes each
    assert wants_local("auto", None, flats) and wants_local("local", None, flats)
    assert wants_local("auto", 4.0, flats) and not wants_local("auto", 3.9, flats)
    assert not wants_local("sharded", None, flats)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_restore_waits_for_the_steps_gather(dtype):
    """The gather's works are waited for before the step buffers can go (restore) or be read."""
    waited = []

    class Work:
        def wait(self):
            waited.append(True)

    flat = torch.ones(4, dtype=dtype)
    writes = LocalWrites([flat], lambda steps: [Work(), Work()])
    writes.take_step([[(torch.full((4,), 2.0), torch.ones(4), flat)]])
    writes.write(1.0)
    assert waited == []  # s = 1 is the anchor: nothing to wait for
    writes.restore()
    assert waited == [True, True]
