"""The three architectures, with the state-dict names of the published checkpoints (REFERENCE 3).

* :class:`LSTMClassifier` and :class:`TransformerClassifier`: SITS-NN tree species (softmax head).
* :class:`SBERTClassifier`: SITS-BERT forest disturbance (one logit; the caller applies sigmoid).

Every module also has ``logits(...)``: the output before the final activation (for training).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LSTMClassifier",
    "SBERTClassifier",
    "TransformerClassifier",
    "build_module",
    "sbert_position_table",
    "sinusoidal_table",
    "sitsnn_head",
]


def sitsnn_head(in_features: int, num_classes: int) -> nn.Sequential:
    """``fc`` of the SITS-NN models: Linear, ReLU, BatchNorm1d, Dropout(0.3), Linear, Softmax."""
    return nn.Sequential(
        nn.Linear(in_features, 256),
        nn.ReLU(),
        nn.BatchNorm1d(256),
        nn.Dropout(0.3),
        nn.Linear(256, num_classes),
        nn.Softmax(dim=1),
    )


class LSTMClassifier(nn.Module):
    """SITS-NN LSTM: ``embd`` -> ``lstm`` (batch first, zero state) -> last step -> ``fc``.

    Input (batch, T, num_bands) float32; output softmax probabilities (batch, num_classes).
    """

    def __init__(
        self,
        num_bands: int = 10,
        input_size: int = 32,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_classes: int = 5,
        bidirectional: bool = False,
    ):
        super().__init__()
        self.embd = nn.Linear(num_bands, input_size)
        self.lstm = nn.LSTM(
            input_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional
        )
        self.fc = sitsnn_head(hidden_size * (2 if bidirectional else 1), num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embd(x))
        return self.fc[:-1](out[:, -1, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc[-1](self.logits(x))


def sinusoidal_table(rows: int, dim: int) -> torch.Tensor:
    """Classic sinusoidal table (rows, dim): even columns sin(p w_i), odd cos(p w_i)."""
    position = torch.arange(rows, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(rows, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)[:, : dim // 2]
    return table


class _SequencePositionalEncoding(nn.Module):
    """Adds ``pe[:T]`` to a sequence-first input; ``pe`` (max_len, 1, d_model) is a saved buffer."""

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoidal_table(max_len, d_model).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.pe.shape[0]:
            raise ValueError(
                f"sequence of {x.shape[0]} steps exceeds the {self.pe.shape[0]}-row table"
            )
        return self.dropout(x + self.pe[: x.shape[0]])


class TransformerClassifier(nn.Module):
    """SITS-NN Transformer: sequence-first input (T, batch, num_bands), output at the last
    position."""

    def __init__(
        self,
        num_bands: int = 10,
        num_classes: int = 5,
        d_model: int = 64,
        nhead: int = 8,
        num_layers: int = 2,
        dim_feedforward: int = 256,
    ):
        super().__init__()
        self.src_embd = nn.Linear(num_bands, d_model)
        self.pos_encoder = _SequencePositionalEncoding(d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward)
        self.transformer_encoder = nn.TransformerEncoder(
            layer, num_layers, nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.fc = sitsnn_head(d_model, num_classes)

    def logits(self, src: torch.Tensor) -> torch.Tensor:
        out = self.transformer_encoder(self.pos_encoder(self.src_embd(src)))
        return self.fc[:-1](out[-1])

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        return self.fc[-1](self.logits(src))


def sbert_position_table(rows: int, dim: int) -> torch.Tensor:
    """SBERT day table (rows, dim): row 0 zeros (padding), row k the encoding of position k - 1."""
    table = torch.zeros(rows, dim)
    table[1:] = sinusoidal_table(rows - 1, dim)
    return table


class _SBERTEmbedding(nn.Module):
    def __init__(self, num_features: int, dim: int, max_position: int):
        super().__init__()
        self.input = nn.Linear(num_features, dim)
        self.position = nn.Module()
        self.position.register_buffer("pe", sbert_position_table(max_position, dim))

    def forward(self, x: torch.Tensor, doy: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input(x), self.position.pe[doy]], dim=-1)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} attention heads")
        self.heads = heads
        self.linear_layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(3)])
        self.output_linear = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, dropout: float) -> torch.Tensor:
        b, s, h = x.shape
        w = torch.cat([lin.weight for lin in self.linear_layers])
        bb = torch.cat([lin.bias for lin in self.linear_layers])
        qkv = F.linear(x, w, bb).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        # bias (b, 1, 1, s): 0 for observations, -1e9 for padding keys
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=bias, dropout_p=dropout if self.training else 0.0
        )
        return self.output_linear(out.transpose(1, 2).reshape(b, s, h))


class _FeedForward(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(hidden, 4 * hidden)
        self.w_2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.gelu(self.w_1(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.attention = _Attention(hidden, heads)
        self.feed_forward = _FeedForward(hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, dropout: float) -> torch.Tensor:
        x = x + F.dropout(self.attention(x, bias, dropout), dropout, self.training)
        return x + F.dropout(self.feed_forward(x), dropout, self.training)


class _SBERT(nn.Module):
    def __init__(
        self, num_features: int, hidden: int, n_layers: int, heads: int, max_position: int
    ):
        super().__init__()
        self.embedding = _SBERTEmbedding(num_features, hidden // 2, max_position)
        self.transformer_blocks = nn.ModuleList([_Block(hidden, heads) for _ in range(n_layers)])


class SBERTClassifier(nn.Module):
    """SITS-BERT classifier (REFERENCE 3a), no LayerNorm, max-pooled over all positions.

    ``forward(x (B, S, F) float32, doy (B, S) int64, mask (B, S) bool) -> logits (B, num_classes)``.
    """

    def __init__(
        self,
        num_features: int = 10,
        hidden: int = 128,
        n_layers: int = 3,
        attn_heads: int = 8,
        dropout: float = 0.3,
        num_classes: int = 1,
        max_position: int = 1826,
    ):
        super().__init__()
        self.dropout = dropout
        self.sbert = _SBERT(num_features, hidden, n_layers, attn_heads, max_position)
        self.classification = nn.Module()
        self.classification.linear = nn.Linear(hidden, num_classes)

    @property
    def max_position(self) -> int:
        return int(self.sbert.embedding.position.pe.shape[0])

    def logits(self, x: torch.Tensor, doy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.sbert.embedding(x, doy)
        h = F.dropout(h, self.dropout, self.training)
        bias = torch.zeros(mask.shape, dtype=h.dtype, device=h.device)
        bias.masked_fill_(~mask.bool(), -1e9)
        bias = bias[:, None, None, :]
        for block in self.sbert.transformer_blocks:
            h = block(h, bias, self.dropout)
        return self.classification.linear(h.amax(dim=1))

    def forward(self, x: torch.Tensor, doy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.logits(x, doy, mask)


_CLASSES = {
    "sits-lstm": LSTMClassifier,
    "sits-transformer": TransformerClassifier,
    "sbert": SBERTClassifier,
}


def build_module(family: str, hyperparameters: dict) -> nn.Module:
    """Instantiate the architecture ``family`` with the card's hyper-parameters (keyword
    arguments)."""
    return _CLASSES[family](**hyperparameters)
