"""Costly results on disk: keyed by a hash of exactly what determines them, written atomically, verified on read.

An artifact is a directory ``<cache_dir>/<kind>/<key>/`` holding safetensors files and ``meta.json``. The
directory is built under a temporary name and renamed into place, so a reader sees all of it or none of it.
``meta.json`` records the key's inputs and each file's SHA-256; a file that does not match is reported and the
artifact is recomputed. A file lock makes concurrent jobs compute a shared artifact once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from shadow.errors import ConfigError
from shadow.models import readable

log = logging.getLogger(__name__)


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: Path) -> dict | None:
    """The artifact's metadata if every file matches its checksum, else None (with a warning)."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        bad = [name for name, digest in meta["files"].items() if sha256_file(directory / name) != digest]
    except (OSError, ValueError, KeyError) as err:
        log.warning("artifact %s is unreadable (%s); recomputing it", directory, err)
        return None
    if bad:
        log.warning("artifact %s is corrupt (%s fails its checksum); recomputing it", directory, ", ".join(bad))
        return None
    return meta


def find(cache_dir: str | Path, kind: str, inputs: dict) -> Path | None:
    """The artifact for ``inputs`` if it exists and passes its checksums, without building it."""
    directory = Path(cache_dir) / kind / cache_key(inputs)
    return directory if directory.exists() and verify(directory) is not None else None


def check_space(cache_dir: str | Path, need: float, what: str) -> None:
    """Fail before any work when ``cache_dir``'s disk cannot hold ``need`` more bytes."""
    place = Path(cache_dir).resolve()
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    log.info("%s: ≈%s on disk; %s free under %s", what, readable(need), readable(free), cache_dir)
    if need > free:
        raise ConfigError(f"cache_dir={str(cache_dir)!r} has {free / 1e9:.1f} GB free but {what} need ≈"
                          f"{need / 1e9:.1f} GB; free space or set cache_dir to a larger disk")


def cached(cache_dir: str | Path, kind: str, inputs: dict, build: Callable[[Path], dict],
           rebuild: bool = False) -> tuple[Path, dict]:
    """The directory and metadata of the artifact for ``inputs``, building it with ``build(tmp_dir)`` if needed
    (always with ``rebuild``, replacing the old one).

    ``build`` writes its files into the directory it is given and returns extra metadata (JSON-serialisable).
    """
    root = Path(cache_dir) / kind
    root.mkdir(parents=True, exist_ok=True)
    final = root / cache_key(inputs)
    with FileLock(str(final) + ".lock"):
        for stale in root.glob(f".{final.name}-*"):  # left by a killed build: the lock says none is running
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists() and not rebuild:
            meta = verify(final)
            if meta is not None:
                log.info("%s: reusing %s", kind, final)
                return final, meta
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}-"))
        try:
            start = time.perf_counter()
            extra = build(tmp)
            meta = {"kind": kind, "inputs": inputs, **extra, "build_seconds": round(time.perf_counter() - start, 3),
                    "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, meta
