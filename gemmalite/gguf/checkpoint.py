"""A GGUF file in, a finished checkpoint directory out: written aside, then renamed into place.

The directory appears complete or not at all. Its provenance file records which converter
version wrote it and from which file, so a cache can tell a finished, current conversion
from a stale or half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import InvalidArgumentError, ModelLoadError
from .metadata import config_from_metadata, generation_config
from .reader import import_gguf, open_gemma3
from .tensors import write_weights
from .tokenizer import tokenizer_proto

# Bump when the output of `convert` changes, so stale cache entries get rebuilt.
CONVERTER_VERSION = 1
PROVENANCE_FILE = "gemmalite_gguf.json"


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Convert a Gemma 3 GGUF into a transformers-style checkpoint directory at `out_dir`.

    `out_dir` must not exist yet (or be empty). It appears complete or not at all: the files
    are written into a temporary sibling directory that is renamed into place at the end.
    Raises ModelLoadError for a missing, corrupt or non-Gemma-3 file, MissingExtraError
    without the gguf extra, and InvalidArgumentError if `out_dir` holds something already.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    import_gguf()  # without the extra, say so before anything else
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise InvalidArgumentError(f"{out_dir} already exists and is not an empty directory; choose another output path")
    staging = convert_to_staging(gguf_path, out_dir, progress=progress)
    try:
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def convert_to_staging(gguf_path: Path, out_dir: Path, *, progress: bool, digest: str | None = None) -> Path:
    """Write the whole checkpoint into a fresh temporary sibling of `out_dir`; return it."""
    if progress:  # opening alone takes seconds, so say what is happening before it
        print(f"gemmalite: converting {gguf_path.name} to a float32 checkpoint (done once)", file=sys.stderr, flush=True)
    reader = open_gemma3(gguf_path)
    try:
        config = config_from_metadata(reader)
    except (TypeError, ValueError) as e:  # a metadata value of the wrong kind
        raise ModelLoadError(f"{gguf_path.name} has invalid Gemma 3 metadata: {e}") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
        model_proto = tokenizer_proto(reader)
        if len(model_proto.pieces) != config["vocab_size"]:
            raise ModelLoadError(
                f"{gguf_path.name}: the tokenizer has {len(model_proto.pieces)} tokens but the "
                f"embedding has {config['vocab_size']} rows"
            )
        (staging / "tokenizer.model").write_bytes(model_proto.SerializeToString())
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", generation_config(config, model_proto))
        index = write_weights(reader, config, staging, gguf_path.name, progress=progress)
        if index is not None:
            _write_json(staging / "model.safetensors.index.json", index)
        provenance = {"converter_version": CONVERTER_VERSION, "source": gguf_path.name}
        _write_json(staging / PROVENANCE_FILE, {**provenance, "sha256": digest or file_digest(gguf_path)})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def publish(staging: Path, out_dir: Path) -> None:
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


def is_current(out_dir: Path) -> bool:
    """True if `out_dir` is a finished conversion made by this converter version."""
    try:
        info = json.loads((out_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("converter_version") == CONVERTER_VERSION


def file_digest(path: Path) -> str:
    """sha256 of the file's content, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
