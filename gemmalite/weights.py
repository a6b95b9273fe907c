"""Finding and reading checkpoints: local dirs, Hub repos and GGUF files.

Everything foreign stops here: Hub downloads, both config shapes, weight-name prefixes of text
and multimodal checkpoints, GGUF files. What leaves is a `GemmaConfig`, a state dict of clean
names on the target device and dtype, and the paths of the optional tokenizer and defaults.

Only safetensors are read; pickled weights (.bin, .pt) are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import GemmaConfig
from .errors import ModelLoadError

# Prefixes of the text model's weights, in text-only and multimodal checkpoints.
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# Weights that belong to other parts of a multimodal checkpoint, or duplicate the tied head.
IGNORED = re.compile(r"^(lm_head\.weight|language_model\.lm_head\.weight|.*vision_tower\..*|.*multi_modal_projector\..*)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """A local checkpoint dir, read enough to know what it holds."""

    path: Path
    config: GemmaConfig
    weight_files: list[Path]
    tokenizer_file: Path | None
    generation_config: dict
    raw_config: dict = field(default_factory=dict)  # config.json as read (the vision part reads its own)


def resolve(source: str | os.PathLike) -> Path:
    """A local dir for `source`: a dir as is, a .gguf file converted once, or a Hub repo id."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import cached_checkpoint

        return cached_checkpoint(path)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; give a checkpoint directory, a .gguf file or a Hub repo id")
    if isinstance(source, str) and HUB_ID.match(source) and not source.startswith((".", "~")):
        return download(source)
    raise ModelLoadError(f"model not found: {source} (no such directory or file, and not a Hub repo id)")


def download(repo_id: str) -> Path:
    """Fetch a Hub repo's config, safetensors and tokenizer; the HF cache, HF_TOKEN and offline mode apply."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelLoadError(
            f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, "
            "then set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"Hub repo {repo_id} not found (or private: set HF_TOKEN if you have access)"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline?); download it once online, or pass a local checkpoint dir"
        ) from None
    except HfHubHTTPError as e:
        raise ModelLoadError(f"cannot download {repo_id} from the Hub: {e}") from None


def read_checkpoint(path: Path) -> Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; is it a Gemma 3 checkpoint directory?")
    raw = _read_json(config_file)
    config = GemmaConfig.from_hf(raw)
    tokenizer = path / "tokenizer.model"
    generation = path / "generation_config.json"
    return Checkpoint(
        path=path,
        config=config,
        weight_files=_weight_files(path),
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
        generation_config=_read_json(generation) if generation.is_file() else {},
        raw_config=raw,
    )


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {file}: {e}") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map")
        root = path.resolve()
        files = []
        for name in dict.fromkeys(weight_map.values()):
            shard = (path / name).resolve()
            if Path(name).is_absolute() or root not in shard.parents:
                raise ModelLoadError(f"{index} names a shard outside the checkpoint dir: {name!r}; refusing it")
            if not shard.is_file():
                raise ModelLoadError(f"{index} names shard {name}, which is missing from {path}")
            files.append(shard)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return [path / name for name in others]
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ModelLoadError(
            f"{path} holds only pickled weights ({', '.join(pickled)}); gemmalite loads safetensors only "
            "and never unpickles. Convert them to safetensors first."
        )
    raise ModelLoadError(f"{path} has no model.safetensors or model.safetensors.index.json")


CONVERT_BLOCK_BYTES = 64 * 2**20


def _read_tensor(file: Path, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with safe_open(str(file), framework="pt", device=str(device)) as f:
        view = f.get_slice(name)
        shape = view.get_shape()
        if device.type != "cpu" or view.get_dtype() == _SAFETENSORS_DTYPES[dtype] or not shape:
            # On CPU in the same dtype this is a view of the mapping; on a GPU, one copy to it.
            return f.get_tensor(name).to(dtype)
    # Convert in row blocks, each from its own short-lived mapping, so that a large tensor (the
    # 262144-row embedding) never sits in memory in both dtypes at once.
    out = torch.empty(shape, dtype=dtype)
    step = max(1, CONVERT_BLOCK_BYTES // (4 * out[0].numel()))
    for start in range(0, shape[0], step):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            out[start : start + step] = f.get_slice(name)[start : start + step].to(dtype)
    return out


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def text_weight_name(name: str) -> str | None:
    """The model's parameter name for a checkpoint tensor, or None for tensors gemmalite skips."""
    if IGNORED.match(name):
        return None
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


# The vision parts of a multimodal checkpoint, as the Hub names them (`vision_tower.vision_model.`,
# `multi_modal_projector.`), as transformers 5 does (`model.vision_tower.`, `model.multi_modal_projector.`)
# and as it saves them (`vision_tower.`): the tower's names become `tower.`, the projector's `projector.`.
VISION_NAME = re.compile(r"^(?:model\.)?(?:vision_tower\.(?:vision_model\.)?(?P<tower>.+)|multi_modal_projector\.(?P<projector>.+))$")


def vision_weight_name(name: str) -> str | None:
    """The image encoder's parameter name for a checkpoint tensor, or None for the text model's."""
    match = VISION_NAME.match(name)
    if match is None:
        return None
    return f"tower.{match['tower']}" if match["tower"] else f"projector.{match['projector']}"


def load_state_dict(
    checkpoint: Checkpoint,
    expected: dict[str, torch.Size],
    device: torch.device,
    dtype: torch.dtype,
    rename=text_weight_name,
) -> dict[str, torch.Tensor]:
    """Read every expected tensor once, straight to `device` and `dtype`, checking names and shapes.

    safetensors maps the file: a tensor already in the target dtype on CPU stays a view of the
    mapping (no copy). A tensor that needs converting is read from a short-lived mapping, so the
    source pages are released as soon as it is converted and peak memory stays near the result.
    `rename` gives the model's name of a checkpoint tensor, or None for tensors it skips.
    """
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint.weight_files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                names = []
                for name in f.keys():
                    key = rename(name)
                    if key is None:
                        continue
                    if key not in expected:
                        raise ModelLoadError(f"{file.name}: unexpected tensor {name!r}; is this a Gemma 3 text checkpoint?")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[key]):
                        raise ModelLoadError(
                            f"{file.name}: tensor {name!r} has shape {list(shape)}, "
                            f"but the config implies {list(expected[key])}"
                        )
                    names.append((name, key))
            for name, key in names:
                state[key] = _read_tensor(file, name, device, dtype)
        except SafetensorError as e:
            raise ModelLoadError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint {checkpoint.path} is missing tensors: {shown}")
    return state
