"""One RNG capture covers torch's generators and every framework's CUDA RNG tracker (issue 10,
bug 3: Megatron-DeepSpeed's dropout draws from Megatron's tracker, which was not restored)."""

import megatron.core.tensor_parallel.random as megatron_random
import pytest
import torch
from deepspeed.runtime.activation_checkpointing import checkpointing as deepspeed_checkpointing

from megatron_sharpness.backends.rng import RngState, rng_trackers


class _GeneratorTracker:
    """The tracker interface (get_states / set_states / fork) over CPU generator states, as the
    Megatron trackers use it: fork swaps a named state into the default generator and back."""

    def __init__(self, seed: int):
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_ = {"model-parallel-rng": torch.get_rng_state()}
        torch.set_rng_state(saved)

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = states

    def draw(self) -> torch.Tensor:
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_["model-parallel-rng"])
        try:
            return torch.rand(4)
        finally:
            self.states_["model-parallel-rng"] = torch.get_rng_state()
            torch.set_rng_state(outer)


@pytest.mark.parametrize("module", [megatron_random, deepspeed_checkpointing], ids=["megatron", "deepspeed"])
def test_tracker_states_are_restored_with_torch_generators(module, monkeypatch):
    tracker = _GeneratorTracker(seed=1234)
    monkeypatch.setattr(module, "_CUDA_RNG_STATE_TRACKER", tracker)
    assert any(found is tracker for found in rng_trackers())
    state = RngState.capture()
    first = (tracker.draw(), torch.rand(4))
    assert not torch.equal(tracker.draw(), first[0])  # the tracker moves on by itself
    state.restore()
    second = (tracker.draw(), torch.rand(4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # A second restore from the same capture gives the same draws again (states handed out are copies).
    state.restore()
    assert torch.equal(tracker.draw(), first[0])


def test_empty_and_absent_trackers_are_ignored(monkeypatch):
    tracker = _GeneratorTracker(seed=1)
    tracker.states_ = {}
    monkeypatch.setattr(megatron_random, "_CUDA_RNG_STATE_TRACKER", tracker)
    monkeypatch.setattr(deepspeed_checkpointing, "_CUDA_RNG_STATE_TRACKER", None)
    assert rng_trackers() == []
    RngState.capture().restore()
    assert tracker.states_ == {}
