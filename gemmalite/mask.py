"""Attention masks as a pure function of key positions and query positions.

No slicing that depends on data: every mask is `[B, 1, T, K]` with T queries and K keys, where
both sides carry an absolute position and a validity flag. A query at position q may see a key
at position p when

    the key is valid (written, and not padding),
    p <= q                       (causal),
    q - p < sliding_window       (sliding layers only: the last W positions, q's own included).

Images are the one exception to causality: the soft tokens of one image see each other both
ways (still within the window on sliding layers), in prefill. `image_spans` gives, for each
query, the positions [start, end) of the image it belongs to (empty for text); an image never
sees a later one, and decoding is causal.

Padded queries (rows whose chunk is shorter than T) see every key, so that their softmax has
something to normalise and no NaN can appear; their outputs are never used.
"""

from __future__ import annotations

import torch


def attention_mask(
    query_positions: torch.Tensor,  # [B, T] int64
    query_valid: torch.Tensor,  # [B, T] bool
    key_positions: torch.Tensor,  # [B, K] int64
    key_valid: torch.Tensor,  # [B, K] bool
    sliding_window: int | None,
    image_spans: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([B, T], [B, T]) start, end
) -> torch.Tensor:
    """Boolean mask [B, 1, T, K]: True where the query may attend to the key."""
    q = query_positions[:, :, None]  # [B, T, 1]
    k = key_positions[:, None, :]  # [B, 1, K]
    allowed = key_valid[:, None, :] & (k <= q)
    if image_spans is not None:
        start, end = image_spans
        allowed = allowed | (key_valid[:, None, :] & (k >= start[:, :, None]) & (k < end[:, :, None]))
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    allowed = allowed | ~query_valid[:, :, None]
    return allowed[:, None]


def chunk_positions(start: torch.Tensor, n_new: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, T] and validity [B, T] of a chunk of `length` tokens appended after `start`.

    Row b holds `n_new[b]` real tokens followed by padding; padding continues the positions so
    that RoPE stays finite, and is marked invalid.
    """
    offsets = torch.arange(length, device=start.device)
    return start[:, None] + offsets, offsets[None, :] < n_new[:, None]


def global_slot_positions(lengths: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions of a full-length buffer: slot i holds position i once i < length."""
    slots = torch.arange(size, device=lengths.device)[None, :].expand(lengths.shape[0], size)
    return slots, slots < lengths[:, None]


def ring_slot_positions(lengths: torch.Tensor, window: int, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions of the first `slots` (default: all) of a ring of `window` slots after
    `lengths` tokens were written.

    Position p lives in slot p % W, so slot s holds the newest p < length with p % W == s:
    p = (length - 1) - ((length - 1 - s) mod W). A negative p is a slot not yet written.
    """
    slots = torch.arange(window if slots is None else slots, device=lengths.device)[None, :]
    last = lengths[:, None] - 1
    positions = last - torch.remainder(last - slots, window)
    return positions, positions >= 0
