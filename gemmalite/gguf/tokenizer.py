"""tokenizer.model: the sentencepiece model rebuilt from a GGUF's `tokenizer.ggml.*` arrays.

What llama.cpp changed, and why it is undone, is in the package docstring (gemmalite/gguf/__init__.py).
"""

from __future__ import annotations

from ..errors import MissingExtraError, ModelLoadError
from .reader import GGUF_EXTRA_HINT, field

# sentencepiece piece types; GGUF's token_type uses the same numbers (1 is NORMAL, 6 BYTE).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def tokenizer_proto(reader):
    """A sentencepiece ModelProto equivalent to the vocabulary in the GGUF."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm
    except ImportError:  # the generated module needs protobuf, which sentencepiece does not pull in
        raise MissingExtraError(f"converting a GGUF tokenizer needs protobuf: {GGUF_EXTRA_HINT}") from None

    if field(reader, "tokenizer.ggml.model", None) != "llama":  # llama.cpp's name for sentencepiece
        raise ModelLoadError("the GGUF tokenizer is not a sentencepiece vocabulary (tokenizer.ggml.model != 'llama')")
    tokens = field(reader, "tokenizer.ggml.tokens", None)
    scores = field(reader, "tokenizer.ggml.scores", None)
    types = field(reader, "tokenizer.ggml.token_type", None)
    if not tokens or len(scores or ()) != len(tokens) or len(types or ()) != len(tokens):
        raise ModelLoadError("the GGUF tokenizer arrays (tokens, scores, token_type) are missing or differ in length")
    ids = _special_ids(reader, len(tokens))

    proto = spm.ModelProto()
    kept_control = {ids["bos"], ids["eos"], ids["pad"]}
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
    norm.add_dummy_prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


def _special_ids(reader, vocab_size: int) -> dict[str, int]:
    """unk/bos/eos/pad ids, checked to lie inside the vocabulary."""
    ids = {
        name: int(field(reader, f"tokenizer.ggml.{key}", default))
        for name, key, default in (
            ("unk", "unknown_token_id", 3),
            ("bos", "bos_token_id", 2),
            ("eos", "eos_token_id", 1),
            ("pad", "padding_token_id", 0),
        )
    }
    if not all(0 <= i < vocab_size for i in ids.values()):
        raise ModelLoadError(f"the GGUF special token ids {ids} do not fit its {vocab_size}-token vocabulary")
    return ids
