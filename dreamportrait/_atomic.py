"""Writing files so that a reader never sees half of one.

Temporary files and directories get the modes a plain ``open()`` or ``mkdir()`` would give under
the user's umask: once renamed into place they are the results, which ``tempfile.mkstemp`` and
``mkdtemp`` would leave readable by their owner only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path


def _create_unique(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """``parent / (prefix + random + suffix)``, made by ``create``, which fails if it exists."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def temporary_directory(parent: str | Path, prefix: str, suffix: str = ".tmp") -> Path:
    """A new empty directory ``parent/<prefix><random><suffix>`` (mode 0777 less the umask)."""
    return _create_unique(Path(parent), prefix, suffix, Path.mkdir)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the block succeeds it is renamed to ``path``
    (atomic on POSIX), and if the block fails it is removed, leaving any old ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the extension: writers such as ffmpeg choose the format by it.
    temporary = _create_unique(path.parent, f".{path.name}.", f".tmp{path.suffix}", _create_file)
    mode = temporary.stat().st_mode
    try:
        yield temporary
        # Some writers replace the file they are given with one of their own (safetensors' is 0600).
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
