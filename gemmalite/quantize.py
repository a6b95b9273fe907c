"""Weight-only int8: int8 weights, activations kept as precise as the engine's dtype.

At batch 1, decoding reads every weight once per token, so its speed is the speed of reading
weights. Gemma's tied 262144-row output head alone is 168M weights. int8 weights halve the bytes
of bf16.

Weights: symmetric int8, one scale per output row (out channel), for every projection and the
output head. So the only error is the weights' own rounding, which the error analysis of
weights.md measured as most of what int8 ever cost.

The matmul:
- on CPU, oneDNN's int8 matmul (`onednn.qlinear_pointwise`, what PyTorch's x86 quantization runs)
  on weights packed once into its layout. It multiplies uint8 activations by int8 weights with
  int32 sums, on the CPU's integer dot-product units (VNNI, AMX). Activations are not rounded to
  8 bits: each row is scaled by its own largest value and written as two base-254 digits, two
  uint8 rows, so it keeps about 15 bits against its maximum (bf16 keeps 8 per value); the two
  rows' products are added back in float32. Integer sums are exact, so a row's result never
  depends on the rows beside it or on the kernel oneDNN picks for the batch's size: every row of
  a batch, a prefill chunk or a verification gets the bits it gets alone (tested), as the
  reproducibility of README.md needs. Measured on the AVX-512/AMX machine of docs/benchmarks.md,
  against `aten._weight_int8pack_mm` (which converts the weights to floats in registers): the
  262144 x 640 head 6 ms a token against 13 ms, a 512-token chunk of a 4096 x 640 projection
  4 ms against 19 ms.
- elsewhere (CUDA), the weight converted to the activations' dtype, multiplied, then scaled:
  torch.compile fuses the conversion into the matmul's read, as gpt-fast does. CPU builds without
  oneDNN take `aten._weight_int8pack_mm`.

The output head's rounding matters most where it can change the winner: the top 64 logits are
recomputed from the float rows (a 64-row matmul). The embedding keeps the float rows for its
lookups, so the first layer sees the exact embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError
from .packing import TiedEmbeddingWithHead, held, hold, replace, replace_linears

RESCORED = 64  # how many of the head's top logits are recomputed from the float rows
ROWS_AT_ONCE = 4096  # weight rows quantized per pass: a float32 copy of a few MB, not of the whole head


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [out, in] as int8 rows and float32 scales [out]: weight ~= rows * scales[:, None]."""
    rows = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_AT_ONCE):
        w = weight[start : start + ROWS_AT_ONCE].detach().to(torch.float32, copy=True)  # divided in place
        s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        scales[start : start + len(s)] = s
        rows[start : start + len(s)] = torch.round(w.div_(s[:, None]), out=w).clamp_(-127, 127)
    return rows, scales


def has_onednn_int8(device: torch.device) -> bool:
    """Whether int8 matmuls run on oneDNN here (CPU builds with it: PyTorch's x86 wheels)."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


DIGIT = 254  # the second digit's base: a remainder in [-0.5, 0.5] times 254 is an integer in [-127, 127]
ZERO = 128  # uint8's zero point: digits in [-127, 127] are stored as 1..255


def two_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [N, in] as uint8 digits [2N, in] (the N first digits, then the N second ones) and
    each row's scale [N, 1]: x ~= (first + second / DIGIT) * scale, about 15 bits against the row's
    largest value. Each row's digits depend on that row alone."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 127.0
    v = x32 / scale
    first = v.round()
    second = ((v - first) * DIGIT).round()
    return (torch.cat([first, second]) + ZERO).to(torch.uint8), scale


_LIBRARY = torch.library.Library("gemmalite", "FRAGMENT")
_LIBRARY.define("int8_digits_mm(Tensor digits, Tensor key, Tensor scales) -> Tensor")


def _int8_digits_mm(digits: torch.Tensor, key: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 digits [M, in] (zero point ZERO) @ packed int8 rows [out, in]^T, times the rows' float32
    `scales` [out]: float32 [M, out], from exact int32 sums."""
    weight, zero_points = held(int(key))
    return torch.ops.onednn.qlinear_pointwise(
        digits, 1.0, ZERO, weight, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )


_LIBRARY.impl("int8_digits_mm", _int8_digits_mm, "CPU")


@torch.library.register_fake("gemmalite::int8_digits_mm")
def _(digits: torch.Tensor, key: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return digits.new_empty(digits.shape[0], scales.shape[0], dtype=torch.float32)


def int8_matmul(x: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ (rows * scales[:, None])^T for int8 `rows` [out, in]; `scales` in x's dtype.
    The path of CUDA, and of CPU builds without oneDNN."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(x, rows, scales)
    return F.linear(x, rows.to(x.dtype)) * scales


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight [out, in] is int8 with one scale per output row.

    With oneDNN the rows live only in its packed layout, found by `key` (see packing.py);
    otherwise they are the buffer `rows`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        rows, scales = int8_rows(weight)
        self.register_buffer("scales", scales.to(weight.dtype))  # the int8pack and CUDA paths scale in x's dtype
        self.register_buffer("scales32", scales)
        self.packed_bytes = rows.numel() + scales.numel() * 4  # read per forward
        self.onednn = has_onednn_int8(weight.device)
        self.register_buffer("rows", None if self.onednn else rows)
        self.register_buffer("key", torch.tensor(hold(self, None)) if self.onednn else None, persistent=False)
        if self.onednn:
            self._pack(rows)

    def _pack(self, rows: torch.Tensor) -> None:
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        replace(int(self.key), (torch.ops.onednn.qlinear_prepack(rows.contiguous(), None), zero_points))

    def int8(self) -> torch.Tensor:
        """The int8 rows [out, in]."""
        return held(int(self.key))[0].to_dense().t().contiguous() if self.onednn else self.rows

    def set_rows(self, at: torch.Tensor, weight: torch.Tensor) -> None:
        """Quantize float rows `weight` into rows `at` (as the constructor would have)."""
        rows, scales = int8_rows(weight)
        self.scales[at], self.scales32[at] = scales.to(self.scales.dtype), scales
        if not self.onednn:
            self.rows[at] = rows
            return
        every = self.int8().clone()
        every[at] = rows
        self._pack(every)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32."""
        return self.int8().float() * self.scales32[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [N, in]; the kernels take 2-D inputs
        if self.onednn:
            digits, scale = two_digits(flat)
            first, second = torch.ops.gemmalite.int8_digits_mm(digits, self.key, self.scales32).chunk(2)
            out = ((first + second / DIGIT) * scale).to(x.dtype)
        else:
            out = int8_matmul(flat, self.rows, self.scales)
        return out.reshape(*x.shape[:-1], self.out_features)


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
