"""model.safetensors: every GGUF tensor dequantized to float32, renamed, checked and written in shards."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from ..config import GemmaConfig
from ..errors import ModelLoadError
from ..model import Gemma3, checkpoint_shapes
from .reader import import_gguf

# Shards are built in memory (and copied once more while serialized), so this bounds the
# converter's peak memory. The 270M model (1.07 GB in float32) fits in one file.
_MAX_SHARD_BYTES = 2 * 1000**3

# GGUF name -> checkpoint (transformers) name, outside and inside the transformer blocks.
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


def write_weights(reader, config: dict, out: Path, source: str, *, progress: bool) -> dict | None:
    """Write every text-model tensor into safetensors files in `out`, as float32 under its checkpoint name.

    Returns the contents of model.safetensors.index.json when the weights take several shards,
    None when they fit in model.safetensors alone.
    """
    gguf = import_gguf()
    expected = _expected_shapes(config)
    plan = _plan(reader, config["num_hidden_layers"], expected, source)
    shards = _shards(plan, expected)

    counter = _Progress(len(plan), enabled=progress)
    weight_map, total_bytes = {}, 0
    for file, shard in shards.items():
        arrays = {}
        for tensor, name in shard:
            arrays[name] = _float32(gguf, tensor, name, expected[name], source)
            weight_map[name] = file
            total_bytes += arrays[name].nbytes
            counter.step()
        save_file(arrays, str(out / file), metadata={"format": "pt"})
        os.chmod(out / file, 0o644)  # safetensors creates it 0600, unlike the other files
        del arrays  # only one shard is ever held in memory
    counter.done()
    if len(shards) == 1:
        return None
    return {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape, as gemmalite's model declares it (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Gemma3(GemmaConfig.from_hf(config))
    # The checkpoint's names are the model's checkpoint names with a "model." prefix.
    return {f"model.{name}": tuple(shape) for name, shape in checkpoint_shapes(model).items()}


def _checkpoint_name(gguf_name: str, num_layers: int) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_NAME.fullmatch(gguf_name)
    if m and int(m[1]) < num_layers and m[2] in _LAYER_TENSORS:
        return f"model.layers.{int(m[1])}.{_LAYER_TENSORS[m[2]]}"
    return None


def _plan(reader, num_layers: int, expected: dict, source: str) -> list[tuple[object, str]]:
    """(GGUF tensor, checkpoint name) for each text-model tensor; the names must be exactly the model's."""
    plan, unknown = [], []
    for tensor in reader.tensors:
        name = _checkpoint_name(tensor.name, num_layers)
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
    return plan


def _shards(plan: list, expected: dict) -> dict[str, list]:
    """File name -> its part of `plan`, cut from shapes alone so that no tensor is read yet."""
    groups, size = [[]], 0
    for tensor, name in plan:
        nbytes = 4 * int(np.prod(expected[name]))  # float32
        if groups[-1] and size + nbytes > _MAX_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((tensor, name))
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{k:05d}-of-{len(groups):05d}.safetensors": group for k, group in enumerate(groups, 1)}


def _float32(gguf, tensor, name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    """One tensor dequantized, checked against the model's shape, norms shifted back to Gemma's w."""
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(
            f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which this version "
            "of gguf cannot dequantize; upgrade it: pip install -U gguf"
        ) from None
    # The reader already hands back row-major [out_features, in_features], what torch's Linear wants.
    values = np.ascontiguousarray(values, dtype=np.float32)
    if tuple(values.shape) != shape:
        raise ModelLoadError(
            f"{source}: tensor {tensor.name} has shape {tuple(values.shape)}, but the metadata implies {shape}"
        )
    if name.endswith("norm.weight"):
        values = values - 1.0  # llama.cpp stores Gemma's norms as 1 + w; see the package docstring
    return values


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
