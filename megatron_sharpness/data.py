"""The embedded default task: byte-level language modelling on English text that ships with
CPython itself (the help topics of `pydoc_data`), so the demo runs with nothing downloaded."""

from __future__ import annotations

import torch

VOCAB_SIZE = 256


def embedded_corpus() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")


class ByteBatches:
    """Random windows of a byte corpus as (inputs, next-byte targets), from a seeded generator so
    that runs are reproducible and the probe can be shown not to consume data."""

    def __init__(self, corpus: bytes, batch_size: int, seq_len: int, seed: int):
        if len(corpus) <= seq_len + 1:
            raise ValueError(f"corpus of {len(corpus)} bytes is too short for seq_len {seq_len}")
        self.tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        self.batch_size, self.seq_len = batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> ByteBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,),
                               generator=self.generator)
        windows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


def train_heldout_split(corpus: bytes, heldout_fraction: float = 0.1) -> tuple[bytes, bytes]:
    cut = int(len(corpus) * (1.0 - heldout_fraction))
    return corpus[:cut], corpus[cut:]
