"""The cache's write rule and the mask builder, each on its own."""

import pytest
import torch

from gemmalite.cache import KVCache
from gemmalite.config import GemmaConfig
from gemmalite.mask import attention_mask, chunk_positions, global_slot_positions, ring_slot_positions

from conftest import TINY


def tiny_config(**changes) -> GemmaConfig:
    raw = {"model_type": "gemma3_text", "vocab_size": 400, **TINY, **changes}
    return GemmaConfig.from_hf(raw)


def brute_force_mask(q_pos, q_valid, k_pos, k_valid, window):
    B, T = q_pos.shape
    K = k_pos.shape[1]
    out = torch.zeros(B, 1, T, K, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for k in range(K):
                if not q_valid[b, t]:
                    out[b, 0, t, k] = True
                    continue
                q, p = int(q_pos[b, t]), int(k_pos[b, k])
                ok = bool(k_valid[b, k]) and p <= q and (window is None or q - p < window)
                out[b, 0, t, k] = ok
    return out


def test_mask_matches_the_definition_for_ragged_rows():
    start = torch.tensor([0, 5, 13])
    n_new = torch.tensor([4, 2, 0])  # the last row is all padding
    q_pos, q_valid = chunk_positions(start, n_new, 4)
    ring_pos, ring_valid = ring_slot_positions(start, 6)
    k_pos, k_valid = torch.cat([ring_pos, q_pos], 1), torch.cat([ring_valid, q_valid], 1)
    for window in (None, 3, 6):
        got = attention_mask(q_pos, q_valid, k_pos, k_valid, window)
        assert torch.equal(got, brute_force_mask(q_pos, q_valid, k_pos, k_valid, window))


def test_every_query_sees_at_least_one_key():
    """No row of the mask is empty, so softmax never divides by zero (no NaN), padding included."""
    start = torch.tensor([0, 3, 40])
    n_new = torch.tensor([1, 0, 5])
    q_pos, q_valid = chunk_positions(start, n_new, 5)
    for k_pos, k_valid, window in (
        (*global_slot_positions(start + n_new, 64), None),
        (*ring_slot_positions(start, 8), 8),
    ):
        if window:
            k_pos, k_valid = torch.cat([k_pos, q_pos], 1), torch.cat([k_valid, q_valid], 1)
        assert attention_mask(q_pos, q_valid, k_pos, k_valid, window).any(-1).all()


def test_ring_slot_positions_follow_p_mod_w():
    window = 4
    for length in range(0, 15):
        pos, valid = ring_slot_positions(torch.tensor([length]), window)
        for slot in range(window):
            held = [p for p in range(length) if p % window == slot]
            if held:
                assert valid[0, slot] and pos[0, slot] == held[-1]
            else:
                assert not valid[0, slot]


def test_ring_holds_the_last_window_of_keys_after_any_chunking():
    """Writing positions in chunks of varying size (written first) leaves slot p % N holding position p's key.

    Guaranteed for the last N - 1 positions, more than any query sees: padding may use the slot
    of position length - N, the next token's slot.
    """
    config = tiny_config()
    cache = KVCache(config, 1, 64, dtype=torch.float32)
    N, longest = cache.ring, cache.longest_chunk
    assert N == cache.window + longest  # room for a whole chunk beyond the window
    written = 0
    for size in (3, longest, 1, 5, longest, 2, 7):
        n_new = torch.tensor([size])
        chunk = cache.chunk(n_new, longest)  # padded
        positions = chunk.positions.float()
        k = positions[:, None, :, None].expand(1, config.num_kv_heads, longest, config.head_dim).contiguous()
        keys, _ = cache.update(0, k, k.clone(), chunk)  # layer 0 is sliding
        assert keys.shape[2] == N  # the ring itself, the chunk already in it
        cache.advance(chunk)
        written += size
        ring = cache.keys[0][0, 0, :, 0]
        for p in range(max(0, written - N + 1), written):
            assert ring[p % N] == p


def test_a_chunk_longer_than_the_ring_allows_is_refused():
    cache = KVCache(tiny_config(), 1, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="longer than this cache takes"):
        cache.chunk(torch.tensor([1]), cache.longest_chunk + 1)


def test_padding_never_overwrites_a_needed_key():
    config = tiny_config()
    cache = KVCache(config, 2, 32, dtype=torch.float32)
    marker = torch.arange(1, 8, dtype=torch.float32)
    k = marker[None, None, :, None].expand(2, config.num_kv_heads, 7, config.head_dim).contiguous()
    chunk = cache.chunk(torch.tensor([7, 3]), 7)
    cache.update(5, k, k.clone(), chunk)  # layer 5 is global
    cache.advance(chunk)
    assert torch.equal(cache.keys[5][0, 0, :7, 0], marker)
    assert torch.equal(cache.keys[5][1, 0, :3, 0], marker[:3])
    assert cache.lengths.tolist() == [7, 3]


def test_sliding_memory_does_not_grow_with_context():
    config = tiny_config()
    small, large = KVCache(config, 1, 64), KVCache(config, 1, 4096)
    ring_bytes = [t.numel() for t, s in zip(small.keys, config.sliding_layers) if s]
    assert ring_bytes == [t.numel() for t, s in zip(large.keys, config.sliding_layers) if s]
    # Every buffer is one slot longer than the longest span it is sliced to (see KVCache.__init__).
    assert all(t.shape[2] == large.ring + 1 < 4096 for t, s in zip(large.keys, config.sliding_layers) if s)
    assert all(t.shape[2] == 4096 + 1 for t, s in zip(large.keys, config.sliding_layers) if not s)
