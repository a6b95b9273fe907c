"""Turn a Gemma 3 GGUF (llama.cpp's format) into a plain checkpoint directory, once.

gemmalite itself only reads one checkpoint shape: what transformers'
`Gemma3ForCausalLM.save_pretrained` writes (config.json, safetensors, tokenizer.model). Rather
than teach the engine a second format, a GGUF is converted into that shape and cached, so
everything after this package sees a normal checkpoint.

How a GGUF maps onto that directory
-----------------------------------
config.json (metadata.py)
    llama.cpp keeps the hyperparameters as `gemma3.*` metadata (`embedding_length` is
    hidden_size, `key_length` is head_dim, `context_length` is max_position_embeddings, ...).
    What it leaves out, llama.cpp hard-codes for Gemma 3 and so do we (with config.py's
    defaults): five sliding-window layers then one global, RoPE base 10k on sliding layers,
    and query_pre_attn_scalar = head_dim except for the 27B (62 layers), which uses
    hidden_size / num_heads.

model.safetensors (tensors.py; float32; above 2 GB, shards plus model.safetensors.index.json)
    Every tensor is dequantized with `gguf.quants.dequantize`, so any type gguf can read
    works (F32, F16, BF16, the legacy Q4_0..Q8_0 and the K and IQ quants). GGUF lists a
    tensor's dimensions innermost first, but the reader hands back numpy arrays already in
    row-major [out_features, in_features] order, which is what torch's Linear wants; shapes
    are checked against gemmalite's own model, so a mix-up would fail loudly. Names are
    translated by the tables in tensors.py. llama.cpp stores Gemma's RMSNorm weights as
    (1 + w), because its norm multiplies by the weight directly while Gemma's multiplies by
    (1 + w); we subtract the 1 again. There is no output/lm_head tensor: Gemma ties it to the
    embedding.

tokenizer.model (tokenizer.py)
    The vocabulary (pieces, scores, types) is stored as `tokenizer.ggml.*` arrays, which are
    sentencepiece's own fields with the same type numbering, so the model is rebuilt with
    sentencepiece's protobuf. Two things llama.cpp changed have to be undone: whitespace-run
    pieces are spelled with ' ' instead of sentencepiece's '\u2581', and every token that
    transformers calls "special" (<start_of_turn>, <end_of_turn>, <mask>, <unusedN>) is typed
    CONTROL, which sentencepiece never matches in text. Those become USER_DEFINED again, so
    a chat prompt tokenizes to their ids; only bos/eos/pad stay CONTROL and unk UNKNOWN.

generation_config.json (metadata.py)
    Token ids only: bos, pad, and as eos both the file's eos and <end_of_turn>, which is what
    Google's Gemma 3 checkpoints list (llama.cpp also stops on <end_of_turn>). No sampling
    defaults: the GGUF does not carry any.

Tensors that belong to no text model (a vision tower, `v.*` / `mm.*`, which llama.cpp
normally puts in a separate mmproj file) are skipped; any other unknown tensor is an error,
since silently dropping it could produce a model that runs but is wrong.

The rest of the package: reader.py opens the file (the gguf package is an optional extra,
imported only when a file is read), checkpoint.py writes the directory so that it appears
whole or not at all, and cache.py keeps one conversion per GGUF content.
"""

from .cache import DEFAULT_MODEL_DESCRIPTION, cache_root, cached_checkpoint, default_gguf_path
from .checkpoint import CONVERTER_VERSION, PROVENANCE_FILE, convert
from .reader import fast_reader_class

__all__ = [
    "CONVERTER_VERSION",
    "DEFAULT_MODEL_DESCRIPTION",
    "PROVENANCE_FILE",
    "cache_root",
    "cached_checkpoint",
    "convert",
    "default_gguf_path",
    "fast_reader_class",
]
