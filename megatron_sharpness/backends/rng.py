"""RNG state the probe's forwards must neither consume nor depend on."""

from __future__ import annotations

import torch


class RngState:
    """CPU and (if initialized) CUDA generator states. Restoring before every trial forward gives
    each trial point the same dropout masks; restoring at the end leaves training's stream as if
    no probe had run."""

    def __init__(self, cpu: torch.Tensor, cuda: list[torch.Tensor] | None):
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
