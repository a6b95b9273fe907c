"""int8 weights for CPU decoding, run by fbgemm's int8 matmul.

At batch 1, decoding reads every weight once per token, so its speed is the speed of reading
weights. Gemma's tied 262144-row output head alone is 168M weights. int8 weights halve the bytes
of bf16, and fbgemm's int8 kernels read them about twice as fast as the bf16 matmul does here.

Weights are symmetric int8 with one scale per output channel (per row). fbgemm's kernel also
quantizes each call's activations, per token, to 8 bits; CPUs without VNNI need them kept to 7
bits (`reduce_range`) so that their 16-bit pair sums cannot saturate.

Which layers: the head and every projection except each MLP's down_proj. down_proj's input,
gelu(gate) * up, has outliers that 8-bit activations cannot hold: quantizing it alone costs
more than all the others together (measured on Gemma 3 270M; see weights.md). The embedding
shares the head's int8 rows: a looked-up row is dequantized with its scale.

Activations stay in the engine's dtype between layers; only the int8 matmuls run in float32.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from .errors import InvalidArgumentError


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "asimddp" in flags


REDUCE_RANGE = not _cpu_has_vnni()


def _int8_rows(weight: torch.Tensor) -> torch.Tensor:
    """A per-row (output channel) symmetric qint8 tensor for `weight` [out, in]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # Quantized tensors are deprecated upstream, but they remain the way into fbgemm's
        # int8 matmul in this PyTorch; see the note in weights.md.
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(w, scale.double(), zero, axis=0, dtype=torch.qint8)


# fbgemm's packed weights are opaque objects that torch.compile cannot take as inputs, so the
# matmul is a custom op that finds them by key: compiled graphs call it like any other kernel.
_PACKED: dict[int, object] = {}
_keys = itertools.count()


@torch.library.custom_op("gemmalite::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """x [N, in] float32 @ int8 weight [out, in]^T, by fbgemm."""
    return torch.ops.quantized.linear_dynamic(x, _PACKED[key], REDUCE_RANGE)


@int8_linear.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class Int8Linear(nn.Module):
    def __init__(self, rows: torch.Tensor):
        """`rows`: a qint8 weight [out, in] with per-row scales (see _int8_rows)."""
        super().__init__()
        self.out_features, self.in_features = rows.shape
        self.key = next(_keys)
        _PACKED[self.key] = torch.ops.quantized.linear_prepack(rows, None)
        weakref.finalize(self, _PACKED.pop, self.key, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        out = int8_linear(flat, self.key, self.out_features)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8TiedEmbedding(nn.Module):
    """The tied embedding / output head, with int8 rows."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        rows = _int8_rows(weight)
        self.register_buffer("rows", rows.int_repr(), persistent=False)
        self.register_buffer("scales", rows.q_per_channel_scales().float(), persistent=False)
        self.head = Int8Linear(rows)
        self.dtype = weight.dtype  # the engine's activation dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.rows[ids].float() * self.scales[ids, None]).to(self.dtype)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


KEEP_FLOAT = ("down_proj",)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap the linear layers (but down_proj) and the tied embedding for int8 versions, in place (CPU only)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise InvalidArgumentError("int8 needs PyTorch's fbgemm CPU kernels, which this build lacks")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise InvalidArgumentError("quantize='int8' runs on CPU only (fbgemm); on CUDA use bfloat16")
    torch.backends.quantized.engine = "fbgemm"
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name not in KEEP_FLOAT:
                setattr(module, name, Int8Linear(_int8_rows(child.weight)))
    model.embed_tokens = Int8TiedEmbedding(model.embed_tokens.weight)
    return model
