"""Weight-only int8: int8 weights, activations in the engine's dtype, one matmul per projection.

At batch 1, decoding reads every weight once per token, so its speed is the speed of reading
weights. Gemma's tied 262144-row output head alone is 168M weights. int8 weights halve the bytes
of bf16.

Weights: symmetric int8, one scale per output row (out channel), for every projection and the
output head. Activations are not quantized: each matmul reads the int8 weight, scales its rows
and multiplies by the activations as they are. So the only error is the weights' own rounding,
which the error analysis of weights.md measured as most of what int8 ever cost.

The matmul:
- on CPU, PyTorch's weight-only int8 kernel (`aten._weight_int8pack_mm`), which converts the
  weight rows in registers. It gives every row of a batch the bits it gets alone (tested), as the
  reproducibility of README.md needs;
- elsewhere (CUDA), the weight converted to the activations' dtype, multiplied, then scaled:
  torch.compile fuses the conversion into the matmul's read, as gpt-fast does.

The output head's rounding matters most where it can change the winner: the top 64 logits are
recomputed from the float rows (a 64-row matmul). The embedding keeps the float rows for its
lookups, so the first layer sees the exact embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError
from .packing import TiedEmbeddingWithHead, replace_linears

RESCORED = 64  # how many of the head's top logits are recomputed from the float rows


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [out, in] as int8 rows and float32 scales [out]: weight ~= rows * scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    rows = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return rows, scales


def int8_matmul(x: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ (rows * scales[:, None])^T for int8 `rows` [out, in]; `scales` in x's dtype."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(x, rows, scales)
    return F.linear(x, rows.to(x.dtype)) * scales


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight [out, in] is int8 with one scale per output row."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        rows, scales = int8_rows(weight)
        self.register_buffer("rows", rows.to(weight.device))
        self.register_buffer("scales", scales.to(weight.device, weight.dtype))
        self.packed_bytes = rows.numel() + self.scales.numel() * self.scales.element_size()  # read per forward

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32."""
        return self.rows.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [N, in]; the kernel takes 2-D inputs
        return int8_matmul(flat, self.rows, self.scales).reshape(*x.shape[:-1], self.out_features)


class Int8TiedEmbedding(TiedEmbeddingWithHead):
    """The tied embedding / output head: int8 rows for the logits, the float rows for the rest."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight, Int8Linear(weight))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)  # [B, T, vocab]
        if not RESCORED:
            return logits
        top = logits.topk(min(RESCORED, logits.shape[-1]), dim=-1).indices  # [B, T, k]
        exact = (self.weight[top] @ x[..., None]).squeeze(-1)  # [B, T, k, hidden] @ [B, T, hidden, 1]
        return logits.scatter(-1, top, exact)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap every linear layer and the tied head for int8 versions, in place."""
    if any(p.dtype not in (torch.bfloat16, torch.float16, torch.float32) for p in model.parameters()):
        raise InvalidArgumentError("quantize='int8' needs float weights to quantize")
    replace_linears(model, Int8Linear)
    model.embed_tokens = Int8TiedEmbedding(model.embed_tokens.weight)
    return model
