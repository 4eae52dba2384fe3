"""Manifests: the SHA-256 and size of every file of a directory, written last and checked on load.

A checkpoint's or model directory's files are read back as they were written or not at all: a
flipped byte in a tensor region, a truncated file or a hand-edited config would otherwise load
without complaint. The manifest lists every regular file below the directory (subdirectories
included, as relative POSIX paths) except itself. A directory without one (weights converted or
assembled by hand) is read unverified, with one warning per directory and process
(:func:`verify_or_warn`); a manifest that is present but does not match is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path, PurePosixPath

from ._atomic import atomic_path

MANIFEST = "manifest.json"
FORMAT = "dreamportrait.manifest"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*")
                  if path.is_file() and path.relative_to(directory).as_posix() != MANIFEST)


def write_manifest(directory: str | Path) -> Path:
    """Write ``directory/manifest.json`` listing every regular file below ``directory``; call it
    after the last of them is written."""
    directory = Path(directory)
    files = {path.relative_to(directory).as_posix(): {"sha256": _sha256(path), "bytes": path.stat().st_size}
             for path in _listed_files(directory)}
    with atomic_path(directory / MANIFEST) as temporary:
        temporary.write_text(json.dumps({"format": FORMAT, "version": 1, "files": files}, indent=2) + "\n")
    return directory / MANIFEST


def _inside(directory: Path, name: str) -> Path | None:
    """``directory / name`` for a relative POSIX path that stays inside ``directory``, else None."""
    parts = PurePosixPath(name).parts  # without "" or "." parts: PurePosixPath drops them
    if not parts or name.startswith("/") or ".." in parts or "\\" in name:
        return None
    return directory.joinpath(*parts)


def verify_manifest(directory: str | Path, required: tuple[str, ...] = ()) -> set[str]:
    """Check every file ``directory/manifest.json`` lists against its size and SHA-256, and that it
    lists ``required``; a ValueError names the first file that does not match. Returns the names
    listed (relative POSIX paths)."""
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
        path = _inside(directory, name)
        if path is None:
            raise ValueError(f"{manifest} is damaged: it lists {name!r}, which is not a path inside {directory}")
        if not path.is_file():
            raise ValueError(f"{path} is missing (listed in {manifest})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{path} is damaged: {size} bytes, {manifest} lists {entry['bytes']}")
        if _sha256(path) != entry["sha256"]:
            raise ValueError(f"{path} is damaged: its SHA-256 differs from the one {manifest} lists")
    return set(files)


_warned_unverified: set[str] = set()


def verify_or_warn(directory: str | Path, required: tuple[str, ...] = ()) -> set[str] | None:
    """:func:`verify_manifest` where ``directory`` has a manifest (the names it lists); where it has
    none, a warning (once per directory and process) that its files are read unverified, and None."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return verify_manifest(directory, required)
    key = str(directory.resolve())
    if key not in _warned_unverified:
        _warned_unverified.add(key)
        warnings.warn(f"{directory} has no {MANIFEST}: its files are read without a content check (a directory "
                      f"written by hand or converted; dreamportrait._manifest.write_manifest({str(directory)!r}) "
                      f"records their hashes)", UnverifiedDirectoryWarning, stacklevel=3)
    return None


def require_listed(directory: str | Path, listed: set[str] | None, names) -> None:
    """Each of ``names`` (relative POSIX paths that will be read) is listed in the manifest, when
    ``listed`` (what :func:`verify_or_warn` returned) says there is one."""
    if listed is None:
        return
    for name in names:
        if name not in listed:
            raise ValueError(f"{Path(directory) / name} is not listed in {Path(directory) / MANIFEST}: it was "
                             f"added or replaced after the manifest was written")


class UnverifiedDirectoryWarning(UserWarning):
    """A directory without a manifest is read without a content check."""
