"""int8 weights for CPU decoding, run by fbgemm's int8 matmul, close to lossless.

At batch 1, decoding reads every weight once per token, so its speed is the speed of reading
weights. Gemma's tied 262144-row output head alone is 168M weights. int8 weights halve the bytes
of bf16, and fbgemm's int8 kernels read them about twice as fast as the bf16 matmul does here.

Weights: symmetric int8, one scale per output row, for every projection and the output head.

Activations are where the error came from. fbgemm's dynamic int8 matmul quantizes its input
too, with one 8-bit scale for the whole tensor, and only 7 bits on CPUs without VNNI (where
16-bit pair sums could saturate). Gemma's activations have outliers, so that cost more than
the int8 weights did: on Gemma 3 270M against bf16 it gave a mean KL of 0.24 nats per token on
an AVX2 CPU, 0.054 on one with VNNI (see weights.md). So the activations do not go through
fbgemm's quantizer. Each token's activations are written as two 7-bit digits,

    x = (high + low / 126) * step,   step = max|x| / 63,   high, low integers in [-63, 63],

and both digits go through the int8 matmul as two rows of one call, which fbgemm computes
exactly (integer sums; scale 1 and zero point 64 map the digits to themselves). x keeps about
14 bits per token, more than bf16 keeps of a typical value, and 7-bit digits never saturate.
At batch 1 the second row is free: the matmul is bound by reading the weights, not by
arithmetic. What remains is the int8 weights' own rounding.

The output head's rounding matters most where it can change the winner: the top 64 logits are
recomputed from the float rows (a 64-row matmul). The embedding keeps the float rows for its
lookups, so the first layer sees the exact embedding.

Activations stay in the engine's dtype between layers; only the int8 matmuls run in float32.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import InvalidArgumentError
from .packing import TiedEmbeddingWithHead, held, hold, replace_linears

DIGIT = 63  # an activation digit is an integer in [-63, 63]: 7 bits
RESCORED = 64  # how many of the head's top logits are recomputed from the float rows


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
# matmul is a custom op that finds them by key (see packing.hold): compiled graphs call it like
# any other kernel.
@torch.library.custom_op("gemmalite::int8_linear", mutates_args=())
def int8_linear(digits: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """digits [N, in] (float32 holding integers in [-63, 63]) @ int8 weight [out, in]^T, by fbgemm."""
    # With scale 1 and zero point 64, fbgemm's input quantization maps each digit to itself.
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(digits, 1.0, DIGIT + 1, held(key))


@int8_linear.register_fake
def _(digits: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return digits.new_empty(digits.shape[0], out_features)


class Int8Linear(nn.Module):
    def __init__(self, rows: torch.Tensor):
        """`rows`: a qint8 weight [out, in] with per-row scales (see _int8_rows)."""
        super().__init__()
        self.out_features, self.in_features = rows.shape
        self.packed_bytes = rows.numel()  # one byte per weight (scales not counted)
        self.key = hold(self, torch.ops.quantized.linear_prepack(rows, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()  # [N, in]
        n = flat.shape[0]
        # Two digits per activation, one step per token: flat = (high + low / 126) * step.
        step = flat.abs().amax(-1, keepdim=True).clamp(min=1e-30) / DIGIT
        high = torch.round(flat / step)
        low = torch.round((flat - high * step) / step * (2 * DIGIT))
        both = int8_linear(torch.cat([high, low]), self.key, self.out_features)  # [2N, out]
        out = (both[:n] + both[n:] / (2 * DIGIT)) * step
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8TiedEmbedding(TiedEmbeddingWithHead):
    """The tied embedding / output head: int8 rows for the logits, the float rows for the rest."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight, Int8Linear(_int8_rows(weight)))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)  # [B, T, vocab]
        if not RESCORED:
            return logits
        top = logits.topk(min(RESCORED, logits.shape[-1]), dim=-1).indices  # [B, T, k]
        exact = (self.weight[top] @ x[..., None]).squeeze(-1)  # [B, T, k, hidden] @ [B, T, hidden, 1]
        return logits.scatter(-1, top, exact)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap every linear layer and the tied head for int8 versions, in place (CPU only)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise InvalidArgumentError("int8 needs PyTorch's fbgemm CPU kernels, which this build lacks")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise InvalidArgumentError("quantize='int8' runs on CPU only (fbgemm); on CUDA use bfloat16")
    torch.backends.quantized.engine = "fbgemm"
    replace_linears(model, lambda weight: Int8Linear(_int8_rows(weight)))
    model.embed_tokens = Int8TiedEmbedding(model.embed_tokens.weight)
    return model
