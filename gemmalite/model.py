"""Gemma 3 (text), in plain eager PyTorch.

What is Gemma-3-specific, and why it is written the way it is:

- RMSNorm is computed in float32 and scales by (1 + weight): the checkpoints store weight - 1.
- The embedding is multiplied by sqrt(hidden_size), the scale first cast to the activation
  dtype (in bf16, sqrt(640) rounds to 25.25; the reference rounds the same way).
- Every block has four norms: before and after attention, before and after the MLP.
- q and k get their own RMSNorm over head_dim before RoPE.
- Attention scale is query_pre_attn_scalar ** -0.5, not always head_dim ** -0.5.
- Layers come five sliding-window to one global. The two kinds use different RoPE bases
  (10k local, 1M global); linear RoPE scaling applies to global layers only.
- The MLP is GeGLU with the tanh approximation of GELU.
- The output head is the embedding matrix (tied). Soft-capping is honoured when a config sets it.

The model holds parameters (and, once `setup_rope` has run, RoPE tables): positions, masks and the
KV cache arrive with each call, so the same module serves a cache-less forward, chunked prefill
and a compiled decode step.

q, k and v are one projection, and so are the MLP's gate and up: one matmul each instead of
three and two. Checkpoints store them apart; `pack_weights` joins them at load, and
`checkpoint_shapes` says what a checkpoint holds, so checkpoint names never reach the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Chunk, KVCache
from .config import GemmaConfig
from .mask import attention_mask, chunk_positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, scale: float, dtype: torch.dtype):
    """cos, sin [..., head_dim] for neox-style rotary embedding at the given positions [...]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (base**exponents) / scale
    angles = positions[..., None].float() * inv_freq  # [..., head_dim / 2]; both halves use the same angles
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.sliding = config.sliding_layers[layer]
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        hidden, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.qkv_proj = nn.Linear(hidden, q_dim + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x, rope, mask, cache: KVCache | None, chunk: Chunk | None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        # [B, T, heads * head_dim] -> [B, heads, T, head_dim]
        q = self.q_norm(q.view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, chunk)
        out = attend(q, k, v, mask, self.scale, self.softcap)  # [B, heads, T, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


ROW_TILE = 16  # attention matmuls take a multiple of this many query rows (see attend)


def attend(q, k, v, mask, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Grouped-query attention: q [B, H, T, D] over k, v [B, kv_heads, K, D]; mask [B, 1, T, K].

    One algorithm for every shape: prefill chunks, decode steps, padded rows. A query's scores
    are a row of one float32 matmul against the keys in slot order, its softmax runs over the
    same slots, and masked keys add exact zeros; so a token's output does not depend on how many
    queries came with it or on how many masked slots follow (checked bit for bit in
    tests/test_invariance.py). BLAS libraries pick their kernel by shape, a one-row product
    differing from a many-row one, so the rows are padded to a multiple of ROW_TILE (at least
    one tile): a decode step's few rows then go through the same kernel as a prefill chunk's.
    SDPA would not give that either (and its CPU kernel, one query per head at a time, is slow
    for decoding). float32 also keeps bf16 matmuls, slow on CPUs without bf16 units, out of it.
    """
    B, H, T, D = q.shape
    kv = k.shape[1]
    groups = H // kv
    # The query heads that share a key/value head become rows of one matmul against it, in
    # (head in group, query) order; bmm on 3-D views, as a 4-D matmul would copy the keys first.
    n = groups * T
    rows = F.pad(q.reshape(B * kv, n, D).float(), (0, 0, 0, -(-n // ROW_TILE) * ROW_TILE - n))  # n >= 1: one tile at least
    keys, values = k.flatten(0, 1).float(), v.flatten(0, 1).float()  # views of any span: no copy
    scores = torch.bmm(rows, keys.transpose(1, 2))[:, :n].reshape(B, kv, groups, T, -1) * scale
    if softcap is not None:  # Gemma 3 never sets it; Gemma 2 did
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(mask[:, :, None], scores, float("-inf"))  # mask [B, 1, T, K] for every head
    probs = F.pad(torch.softmax(scores, dim=-1).reshape(B * kv, n, -1), (0, 0, 0, rows.shape[1] - n))
    out = torch.bmm(probs, values)[:, :n]  # [B * kv_heads, groups * T, D]
    return out.to(q.dtype).reshape(B, H, T, D)


class TiedEmbedding(nn.Embedding):
    """Token embedding that doubles as the output head (Gemma ties them)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # on meta (loading) the checkpoint's tensor replaces it; meta's
            super().reset_parameters()  # normal_ would import torch's compiler stack, seconds of start-up

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MLP(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.sliding = config.sliding_layers[layer]
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x, rope, mask, cache, chunk):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache, chunk))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3(nn.Module):
    """The text model. Parameter names follow the transformers checkpoints, minus `model.`."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope_tables: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # sliding -> (cos, sin) [L, head_dim]

    def rope_settings(self, sliding: bool) -> tuple[float, float]:
        """(base, linear scale) of a layer kind: 10k unscaled on sliding layers, 1M (maybe scaled) on global ones."""
        cfg = self.config
        return (cfg.rope_local_base, 1.0) if sliding else (cfg.rope_global_base, cfg.rope_global_scale)

    def setup_rope(self, max_len: int) -> None:
        """Precompute cos and sin for positions [0, max_len) per layer kind, so steps only look them up."""
        if self.rope_tables and self.rope_tables[True][0].shape[0] >= max_len:
            return
        like = self.norm.weight  # the model's device and activation dtype
        positions = torch.arange(max_len, device=like.device)
        self.rope_tables = {
            sliding: rope_cos_sin(positions, self.config.head_dim, *self.rope_settings(sliding), like.dtype)
            for sliding in (True, False)
        }

    def rope(self, positions: torch.Tensor, limit: int, sliding: bool, dtype: torch.dtype):
        """cos, sin [B, 1, T, head_dim] at `positions` [B, T], whose real ones are all below `limit`."""
        table = self.rope_tables.get(sliding)
        if table is not None and limit <= table[0].shape[0] and table[0].dtype == dtype:
            # Padding positions can run past the table; clamping them changes nothing that is used.
            at = positions.clamp(max=table[0].shape[0] - 1)
            return table[0][at][:, None], table[1][at][:, None]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, *self.rope_settings(sliding), dtype)
        return cos[:, None], sin[:, None]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, hidden], scaled by sqrt(hidden) (the scale cast to their dtype first)."""
        x = self.embed_tokens(ids)
        return x * torch.tensor(self.config.embed_scale, dtype=x.dtype)

    def forward(
        self,
        ids: torch.Tensor,  # [B, T]
        cache: KVCache | None = None,
        n_new: torch.Tensor | None = None,  # [B] real tokens per row; the rest is padding
        last_only: bool = False,
        span: int | None = None,
        embeds: torch.Tensor | None = None,  # [B, T, hidden] in place of embed(ids)
        image_spans: tuple[torch.Tensor, torch.Tensor] | None = None,  # see mask.attention_mask
    ) -> torch.Tensor:
        """Logits [B, T, vocab], or [B, 1, vocab] for each row's last real token if `last_only`.

        With a cache, the chunk is appended after each row's cached tokens and the cache advances.
        Global layers attend over the first `span` slots of their buffers (default: all), which must
        hold every row's tokens once the chunk is in; see KVCache.span. Images come in as `embeds`
        (the text's embeddings with image features merged in, see vision/) and `image_spans`.
        """
        cfg = self.config
        B, T = ids.shape
        if n_new is None:
            n_new = torch.full((B,), T, dtype=torch.long, device=ids.device)
        x = self.embed(ids) if embeds is None else embeds

        if cache is None:  # a plain forward: the chunk is the whole text, and its own keys
            chunk = None
            positions, valid = chunk_positions(torch.zeros_like(n_new), n_new, T)
        else:
            chunk = cache.chunk(n_new, T, span)
            positions, valid = chunk.positions, chunk.valid

        def keys(sliding: bool):
            return (positions, valid) if cache is None else cache.key_positions(chunk, sliding)

        # One mask and one RoPE table per kind of layer, keyed by `sliding`, shared by all blocks.
        masks = {
            sliding: attention_mask(positions, valid, *keys(sliding), cfg.sliding_window if sliding else None, image_spans)
            for sliding in (True, False)
        }
        limit = T if cache is None else cache.max_seq_len
        rope = {sliding: self.rope(positions, limit, sliding, x.dtype) for sliding in (True, False)}

        for block in self.layers:
            x = block(x, rope[block.sliding], masks[block.sliding], cache, chunk)
        if cache is not None:
            cache.advance(chunk)

        if last_only:
            last = (n_new - 1).clamp(min=0)
            x = x[torch.arange(B, device=x.device), last][:, None]  # [B, 1, hidden]
        logits = self.embed_tokens.attend(self.norm(x))
        if cfg.final_logit_softcapping is not None:
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits


# ---------------------------------------------------------------------- checkpoint names
# Fused projection -> the checkpoint's separate ones, concatenated along the output rows in this order.
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _parts(config: GemmaConfig, name: str) -> list[tuple[str, int]]:
    """The checkpoint tensors (name, rows) that make up the model tensor `name`."""
    module, _, leaf = name.rpartition(".")
    prefix, _, packed = module.rpartition(".")
    if packed not in PACKED:
        return []
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}
    return [(f"{prefix}.{part}.{leaf}", rows[part]) for part in PACKED[packed]]


def checkpoint_shapes(model: Gemma3) -> dict[str, torch.Size]:
    """The tensors a checkpoint holds for this model, by the checkpoint's names (no `model.` prefix)."""
    shapes = {}
    for name, tensor in model.state_dict().items():
        parts = _parts(model.config, name)
        for part, rows in parts:
            shapes[part] = torch.Size((rows, *tensor.shape[1:]))
        if not parts:
            shapes[name] = tensor.shape
    return shapes


def pack_weights(model: Gemma3, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint's: fused projections concatenated, layer by layer."""
    packed = {}
    for name in model.state_dict():
        parts = _parts(model.config, name)
        packed[name] = torch.cat([state.pop(part) for part, _ in parts]) if parts else state.pop(name)
    return packed
