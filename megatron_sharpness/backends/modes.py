"""The training/eval mode of every submodule, as the probe found it.

A probe forward may switch modes on its way (DeepSpeed's eval_batch, a custom evaluate); putting
back only the top module's `.training` with `module.train(mode)` would set every submodule to that
mode, and a submodule the user keeps in eval mode (a frozen encoder, a teacher) would get its
dropout back. Each module's own flag is restored instead, without calling train() overrides:
the saved flags already are what those overrides produced.
"""

from __future__ import annotations

from typing import Iterable

import torch


class ModuleModes:
    def __init__(self, roots: Iterable[torch.nn.Module]):
        self._modes = [(module, module.training) for root in roots for module in root.modules()]

    def restore(self) -> None:
        for module, training in self._modes:
            module.training = training
