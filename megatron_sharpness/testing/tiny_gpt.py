"""A GPT small enough to train on two CPU cores (nanoGPT's layout, pre-norm, tied nothing)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """qk_norm: LayerNorm on each head's queries and keys (Dehghani et al. 2023), which bounds the
    attention logits; off, as in nanoGPT."""

    def __init__(self, width: int, heads: int, dropout: float, qk_norm: bool = False):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_norm = nn.LayerNorm(width // heads) if qk_norm else None
        self.k_norm = nn.LayerNorm(width // heads) if qk_norm else None
        self.ln_attn, self.ln_mlp = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc_in, self.fc_out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(batch, seq, width)))
        return x + self.drop(self.fc_out(F.gelu(self.fc_in(self.ln_mlp(x)))))


class TinyGPT(nn.Module):
    def __init__(self, vocab_size: int = 256, width: int = 64, layers: int = 2, heads: int = 4,
                 max_seq_len: int = 64, dropout: float = 0.0, qk_norm: bool = False):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, qk_norm) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


def lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
