"""Long runs, numerics, resources: nothing drifts, leaks or leaks across engines."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import gemmalite

from conftest import make_checkpoint, reference_greedy

W = 8


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_greedy_matches_transformers_over_2000_tokens(tmp_path):
    # The smallest hybrid model (five sliding layers, one global) keeps 2000 reference steps cheap.
    directory, reference = make_checkpoint(tmp_path, tokenizer=False, num_hidden_layers=6, hidden_size=32, intermediate_size=64)
    engine = gemmalite.load(directory, dtype="float32", max_seq_len=2048)
    prompt = [2, 17, 99, 230]
    got = engine.generate_ids([prompt], max_new_tokens=2000, ignore_eos=True)[0]
    assert len(got) == 2000  # 250 wraps of the 8-slot ring
    assert got == reference_greedy(reference, prompt, 2000)


def test_bf16_long_run_has_finite_logits(tiny):
    engine = gemmalite.load(tiny[0], dtype="bfloat16", max_seq_len=1200)
    prompt = [2, 5, 6, 7]
    out = engine.generate_ids([prompt], max_new_tokens=600, ignore_eos=True)[0]
    assert len(out) == 600  # 75 wraps of the ring
    logits = engine.logits(torch.tensor([prompt + out]))
    assert torch.isfinite(logits).all()


def test_real_270m_bf16_activations_stay_far_from_overflow(real_270m_dir):
    """The largest residual-stream value over a 700-token bf16 forward, against bf16's range."""
    engine = gemmalite.load(real_270m_dir, dtype="bfloat16", max_seq_len=1024)
    largest = []
    hooks = [b.register_forward_hook(lambda m, a, out: largest.append(out.abs().max().item())) for b in engine.model.layers]
    text = "The lighthouse keeper had lived on the island for thirty years. " * 50
    try:
        logits = engine.logits(torch.tensor([engine.tokenizer.encode(text)[:700]]))
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(logits).all()
    peak = max(largest)
    assert peak < torch.finfo(torch.bfloat16).max / 1e20, peak  # decades of headroom
    assert peak > 10  # Gemma's residual stream does carry large values: the hook saw them


def test_rss_stays_flat_over_300_generate_calls(tiny_engine):
    lengths = [(3 + 7 * i) % 61 + 1 for i in range(350)]
    for n in lengths[:50]:  # warm-up
        tiny_engine.generate_ids([[2] * n], max_new_tokens=n % 9 + 1, ignore_eos=True)
    before = rss_bytes()
    for n in lengths[50:]:
        tiny_engine.generate_ids([[2] * n], max_new_tokens=n % 9 + 1, ignore_eos=True)
    growth = rss_bytes() - before
    assert growth < 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 300 calls"


def test_two_engines_keep_their_own_caches(tiny, tmp_path, tiny_engine):
    other_dir, _ = make_checkpoint(tmp_path / "other", seed=1, tokenizer=False)
    other = gemmalite.load(other_dir, dtype="float32")
    prompts = [[2, 40, 41, 42], [2, 7]]
    alone_a = tiny_engine.generate_ids(prompts, max_new_tokens=30, ignore_eos=True)
    alone_b = other.generate_ids(prompts, max_new_tokens=30, ignore_eos=True)
    assert alone_a != alone_b
    session_a, session_b = tiny_engine.session(chat=False), other.session(chat=False)
    for _ in range(3):  # interleave calls and sessions on both engines
        assert session_a.send_ids([2, 40, 41, 42] if not session_a.tokens else [9], max_new_tokens=5, ignore_eos=True)
        assert other.generate_ids(prompts, max_new_tokens=30, ignore_eos=True) == alone_b
        assert session_b.send_ids([2, 7] if not session_b.tokens else [9], max_new_tokens=5, ignore_eos=True)
        assert tiny_engine.generate_ids(prompts, max_new_tokens=30, ignore_eos=True) == alone_a


def test_two_compiled_engines_keep_their_own_graphs(tmp_path, compiled_engine, tiny_engine):
    other_dir, _ = make_checkpoint(tmp_path / "other", seed=2, tokenizer=False)
    other_compiled = gemmalite.load(other_dir, dtype="float32", compile=True, max_seq_len=1024)
    other_eager = gemmalite.load(other_dir, dtype="float32", max_seq_len=1024)
    prompt = [[2, 11, 12, 13, 14]]
    for _ in range(2):
        assert compiled_engine.generate_ids(prompt, max_new_tokens=40, ignore_eos=True) == tiny_engine.generate_ids(
            prompt, max_new_tokens=40, ignore_eos=True
        )
        assert other_compiled.generate_ids(prompt, max_new_tokens=40, ignore_eos=True) == other_eager.generate_ids(
            prompt, max_new_tokens=40, ignore_eos=True
        )


def test_loading_does_not_double_peak_memory(real_270m_dir):
    """Peak RSS while loading the 270M in bf16 (from float32 safetensors) against the bytes its weights hold."""
    script = textwrap.dedent(
        f"""
        import json, gemmalite
        def status(key):
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
        base = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")
        from gemmalite.packing import weight_bytes
        engine = gemmalite.load({str(real_270m_dir)!r}, dtype="bfloat16")
        # What the weights hold: parameters and packed weights, and the tied rows kept for lookups.
        embedding = engine.model.embed_tokens.weight
        weights = weight_bytes(engine.model) + embedding.numel() * embedding.element_size()
        print(json.dumps({{"peak": status("VmHWM:") - base, "weights": weights}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = figures["peak"] / figures["weights"]
    assert ratio < 1.6, f"peak {figures['peak'] / 2**20:.0f} MiB for {figures['weights'] / 2**20:.0f} MiB of weights"
