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


def write_indexed_dataset(path_prefix: str, corpus: bytes, document_bytes: int = 4096) -> str:
    """Writes corpus as a Megatron indexed dataset (path_prefix.bin / .idx) of byte tokens, one
    document per document_bytes; returns path_prefix. Needs megatron-core."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(path_prefix + ".bin", dtype=numpy.uint16)
    tokens = numpy.frombuffer(corpus, dtype=numpy.uint8).astype(numpy.uint16)
    for start in range(0, len(tokens), document_bytes):
        document = tokens[start:start + document_bytes]
        builder.add_document(document, [len(document)])
    builder.finalize(path_prefix + ".idx")
    return path_prefix
