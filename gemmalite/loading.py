"""`load()`: from a checkpoint source to a ready Engine.

The checks of device, dtype and length happen here, where the user's arguments enter; the
checkpoint's own defaults (generation_config.json) are read here too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .engine import DEFAULT_REWIND_MARGIN, Engine
from .errors import InvalidArgumentError, ModelLoadError
from .model import Gemma3, checkpoint_shapes, pack_weights
from .packages import cache_dir
from .packing import can_pack, pack_for_cpu
from .sampling import SamplingSettings
from .shortlist import DEFAULT_SHORTLIST, shortlist_head
from .tokenizer import Tokenizer
from .weights import Checkpoint, load_state_dict, read_checkpoint, resolve

DEFAULT_MAX_SEQ_LEN = 32768  # global layers attend over the filled span only, so a long cache costs memory, not speed
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def parse_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("device 'cuda' was asked for, but no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise InvalidArgumentError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def parse_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    if dtype in (torch.float16, "float16", "fp16", "half"):
        raise InvalidArgumentError("float16 is refused: Gemma 3 activations overflow in fp16; use bfloat16 or float32")
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float32):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise InvalidArgumentError(f"unknown dtype {dtype!r}; use 'bfloat16' or 'float32'")


def generation_defaults(checkpoint: Checkpoint) -> tuple[SamplingSettings, tuple[int, ...]]:
    """Sampling defaults and extra eos ids from generation_config.json; greedy when it has none."""
    gc = checkpoint.generation_config
    eos = gc.get("eos_token_id") or ()
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    if not gc.get("do_sample"):
        return SamplingSettings(), eos
    try:
        settings = SamplingSettings(
            temperature=float(gc.get("temperature") or 1.0),
            top_k=int(gc.get("top_k") or 0),
            top_p=float(gc.get("top_p") or 1.0),
            min_p=float(gc.get("min_p") or 0.0),
        )
    except InvalidArgumentError as e:
        raise ModelLoadError(f"generation_config.json has invalid sampling values: {e}") from None
    return settings, eos


def load(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile: bool | str | None = None,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    rewind_margin: int = DEFAULT_REWIND_MARGIN,
    reuse_prompts: bool = True,
    draft: "str | os.PathLike | Engine | None" = None,
    vision: bool = True,
    shortlist: int | None = None,
) -> Engine:
    """Load a Gemma 3 checkpoint (local dir, .gguf file or Hub repo id) into an Engine.

    quantize="int8" stores every projection and the head as int8 (weight-only); see quantize.py.
    rewind_margin: how many tokens a cache can step back (each sliding layer keeps that many
    slots beyond its window); see cache.py. reuse_prompts: keep each call's cache, so that a
    later prompt that starts with the same tokens prefills only the rest. draft: a smaller
    model with the same tokenizer (a source, loaded like this one, or an Engine such as an int8
    one) that drafts tokens for speculative decoding; see speculative.py. A draft loaded from a
    source scores only the DEFAULT_SHORTLIST likeliest tokens (see shortlist.py); to choose, load
    it yourself with shortlist=N, or None for its whole head. shortlist: an output head over N
    tokens, -inf for the rest, for an engine that drafts (alone it could never write the others). vision: build the
    image tower when the checkpoint has one (False saves its memory; the engine then takes no images).
    compile: True compiles prefill and the decode step with torch.compile in this process (CUDA's
    default: CUDA graphs); "cached" runs them from packages compiled once per machine and kept on
    disk, built in the background after the first process that lacks them (CPU's default; see
    packages.py); False runs eagerly.
    """
    if not isinstance(vision, bool):
        raise InvalidArgumentError(f"vision must be True or False, got {vision!r}")
    if isinstance(rewind_margin, bool) or not isinstance(rewind_margin, int) or rewind_margin < 0:
        raise InvalidArgumentError(f"rewind_margin must be an integer >= 0, got {rewind_margin!r}")
    if quantize not in (None, "int8"):
        raise InvalidArgumentError(f"unknown quantize={quantize!r}; the choices are None and 'int8'")
    device = parse_device(device)
    dtype = parse_dtype(dtype)
    if compile is None:
        compile = True if device.type == "cuda" else ("cached" if cache_dir() is not None else False)
    if compile not in (True, False, "cached"):
        raise InvalidArgumentError(f"compile must be True, False or 'cached', got {compile!r}")
    resolved = resolve(source)
    checkpoint = read_checkpoint(resolved)
    max_seq_len = _max_seq_len(max_seq_len, checkpoint.config.max_position_embeddings)

    model = _build_model(checkpoint, device, dtype)
    image_encoder = None
    if vision:
        from .vision import build_encoder  # before packing: the tower reads the checkpoint's own tensors

        image_encoder = build_encoder(checkpoint, checkpoint.config.hidden_size, device, dtype)
    if quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(model)
    elif can_pack(device, dtype):
        pack_for_cpu(model)  # oneDNN's layout: about twice the speed of plain bf16 matmuls here
    tokenizer = None
    if checkpoint.tokenizer_file:
        tokenizer = Tokenizer(checkpoint.tokenizer_file, bos_id=checkpoint.config.bos_token_id)
        tokenizer.check_against(checkpoint.config)
    if shortlist is not None:
        shortlist_head(model, tokenizer, shortlist)
    defaults, extra_eos = generation_defaults(checkpoint)
    if draft is not None and not isinstance(draft, Engine):
        draft = load(
            draft, device=device, dtype=dtype, compile=compile, max_seq_len=max_seq_len, rewind_margin=rewind_margin,
            shortlist=DEFAULT_SHORTLIST,
        )  # fmt: skip
    engine = Engine(
        model,
        tokenizer,
        device=device,
        dtype=dtype,
        compile=compile,
        max_seq_len=max_seq_len,
        defaults=defaults,
        eos_ids=extra_eos,
        rewind_margin=rewind_margin,
        reuse_prompts=bool(reuse_prompts),
        draft=draft,
        image_encoder=image_encoder,
        vision_skipped=not vision and "vision_config" in checkpoint.raw_config,
    )
    if engine.runner.packages is not None:  # how the background builder loads this model again
        engine.runner.packages.recipe = {
            "source": str(Path(resolved).resolve()), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "max_seq_len": max_seq_len, "quantize": quantize, "rewind_margin": rewind_margin,
            "shortlist": shortlist,
        }  # fmt: skip
    return engine


def _max_seq_len(value, model_limit: int) -> int:
    if value is None:
        return min(model_limit, DEFAULT_MAX_SEQ_LEN)
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= model_limit:
        raise InvalidArgumentError(f"max_seq_len must be an integer in [2, {model_limit}] for this model, got {value!r}")
    return value


def _build_model(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> Gemma3:
    """Build on the meta device, then take the checkpoint's tensors as the parameters: no second copy."""
    with torch.device("meta"):
        model = Gemma3(checkpoint.config)
    state = load_state_dict(checkpoint, checkpoint_shapes(model), device, dtype)
    model.load_state_dict(pack_weights(model, state), assign=True)
    return model.eval().requires_grad_(False)
