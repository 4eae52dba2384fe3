"""Manifests: the SHA-256 and size of every file of a directory, written last and checked on load.

A checkpoint's files are read back as they were written or not at all: a flipped byte in a tensor
region, a truncated file or a hand-edited config would otherwise load without complaint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ._atomic import atomic_path

MANIFEST = "manifest.json"
FORMAT = "dreamportrait.manifest"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> Path:
    """Write ``directory/manifest.json`` listing every regular file in ``directory`` (not below it)."""
    directory = Path(directory)
    files = {path.name: {"sha256": _sha256(path), "bytes": path.stat().st_size}
             for path in sorted(directory.iterdir()) if path.is_file() and path.name != MANIFEST}
    with atomic_path(directory / MANIFEST) as temporary:
        temporary.write_text(json.dumps({"format": FORMAT, "version": 1, "files": files}, indent=2) + "\n")
    return directory / MANIFEST


def verify_manifest(directory: str | Path, required: tuple[str, ...] = ()) -> None:
    """Check every file ``directory/manifest.json`` lists against its size and SHA-256, and that it
    lists ``required``; a ValueError names the first file that does not match."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{manifest} is missing: the directory is incomplete or was not written as a checkpoint")
    try:
        listing = json.loads(manifest.read_text())
        files = listing["files"]
        if listing.get("format") != FORMAT or not all(
                isinstance(entry["sha256"], str) and isinstance(entry["bytes"], int) for entry in files.values()):
            raise ValueError("unexpected entries")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest} is damaged: {error}") from None
    for name in required:
        if name not in files:
            raise ValueError(f"{manifest} does not list {name}")
    for name, entry in files.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise ValueError(f"{path} is missing (listed in {manifest})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{path} is damaged: {size} bytes, {manifest} lists {entry['bytes']}")
        if _sha256(path) != entry["sha256"]:
            raise ValueError(f"{path} is damaged: its SHA-256 differs from the one {manifest} lists")
