"""The precision-aware optimizer's masters: composed from TransformerEngine's bf16 param + int16
remainder state and rounded back the way its kernel rounds (bit-exact, ties included). The
optimizer end to end: tests/test_megatron.py's precision-aware layouts (a CPU stand-in)."""

import torch

from megatron_sharpness.backends.megatron_precision_aware import compose_master, low_half, round_half_up_bf16
from megatron_sharpness.testing.precision_aware import StandInFusedAdam


def fp32_with_low_half(high: torch.Tensor, low: int) -> torch.Tensor:
    return ((high.to(torch.int32) << 16) | low).view(torch.float32)


def test_master_bits_round_trip_through_bf16_and_remainder_ties_included():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(50_000, generator=generator) * torch.logspace(-6, 4, 50_000)
    highs = torch.randint(0, 0x7F00, (2_000,), generator=generator)
    ties = fp32_with_low_half(highs, 0x8000)  # exactly halfway between two bf16 values
    values = torch.cat([values, ties, -ties, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    bf16, remainder = round_half_up_bf16(values), low_half(values)
    assert torch.equal(compose_master(bf16, remainder).view(torch.int32), values.view(torch.int32))
    # Away from ties it is round to nearest; at a tie it goes away from zero, where torch rounds to even.
    away = ~torch.isin(values, torch.cat([ties, -ties]))
    assert torch.equal(bf16[away], values[away].bfloat16())
    tied_bf16 = round_half_up_bf16(ties)
    assert torch.equal(tied_bf16.view(torch.int16).to(torch.int32), highs.to(torch.int32) + 1)
    assert (tied_bf16 != ties.bfloat16()).sum() == (highs % 2 == 0).sum()  # to even: the even ones stay


def test_the_stand_in_keeps_its_masters_as_transformer_engine_does():
    # bf16 params: the master is the param's bits plus the int16 remainder; fp32 params are their own.
    bf16 = torch.nn.Parameter(torch.randn(64, dtype=torch.float32).bfloat16())
    fp32 = torch.nn.Parameter(torch.randn(8))
    optimizer = StandInFusedAdam([bf16, fp32], lr=1e-2, master_weights=True, use_decoupled_grad=True,
                                 store_param_remainders=True)
    before, before_fp32 = bf16.detach().float().clone(), fp32.detach().clone()
    bf16.decoupled_grad, fp32.decoupled_grad = torch.ones(64), torch.ones(8)
    optimizer.step()
    master = compose_master(bf16, optimizer.state[bf16]["master_param"])
    assert optimizer.state[bf16]["master_param"].dtype == torch.int16
    assert torch.allclose(master, before - 1e-2, atol=1e-6)  # Adam's first step moves every element by lr
    assert torch.equal(bf16.detach(), round_half_up_bf16(master).view(64))
    assert torch.allclose(fp32.detach(), before_fp32 - 1e-2, atol=1e-6)  # stepped in place
