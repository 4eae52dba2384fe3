"""Every Triton kernel of the ops is launched through :func:`launch`, so its launches can be recorded.

The record is what the GPU compiler needs to build the exact kernel a launch would run (its
signature, specialisation and compile-time constants), taken from the ops' own launch code rather
than from a hand-kept list. :mod:`dreamportrait.ops.triton.compile_check` compiles recorded
launches to cubins for real GPU targets without a GPU: the test suite records the launches of the
public ops (run under ``TRITON_INTERPRET=1``) and compiles each of them.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class TensorArgument:
    """What a kernel's specialisation reads of a tensor argument: its dtype and whether its
    address is 16-byte aligned. Quacks like a tensor for Triton's specialisation (``dtype``,
    ``data_ptr()``)."""

    dtype: torch.dtype
    aligned: bool

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel (``module:name``), its grid, its arguments by name (tensors
    replaced by :class:`TensorArgument`) and its compile options (``num_warps``, ``num_stages``)."""

    kernel: str
    grid: tuple[int, ...]
    arguments: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, int], ...] = ()

    @property
    def module(self) -> str:
        return self.kernel.split(":")[0]

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]


_recordings: list[list[Launch]] = []
_dry_runs: list[bool] = []  # one per active recording: whether it skips the kernels


LAUNCH_OPTIONS = ("num_warps", "num_stages")
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # programs along a CUDA grid's axes


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, recorded by every active :func:`recording`. Keyword
    arguments named in :data:`LAUNCH_OPTIONS` are compile options, the others kernel arguments."""
    if len(grid) > 3 or not all(0 <= g <= limit for g, limit in zip(grid, GRID_LIMITS)):
        raise ValueError(f"{kernel.fn.__name__}: a launch grid of {tuple(grid)} programs exceeds a CUDA grid's "
                         f"{GRID_LIMITS}")
    if _recordings:
        record = _describe(kernel, grid, args, kwargs)
        for recorded in _recordings:
            recorded.append(record)
        if any(_dry_runs):
            return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording(dry_run: bool = False) -> Iterator[list[Launch]]:
    """Collect the launches made inside the block (in order, repeats included). With ``dry_run``
    the kernels are not run: the ops compute every launch as usual, but their outputs are left
    uninitialised, which is enough to learn what they launch (and fast under the interpreter)."""
    recorded: list[Launch] = []
    _recordings.append(recorded)
    _dry_runs.append(dry_run)
    try:
        yield recorded
    finally:
        index = next(i for i, r in enumerate(_recordings) if r is recorded)
        del _recordings[index], _dry_runs[index]


def _describe(kernel, grid, args, kwargs) -> Launch:
    options = tuple((name, int(kwargs[name])) for name in LAUNCH_OPTIONS if name in kwargs)
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    arguments = tuple(
        (name, TensorArgument(value.dtype, value.data_ptr() % 16 == 0) if isinstance(value, torch.Tensor) else value)
        for name, value in bound.arguments.items()
    )
    return Launch(f"{kernel.fn.__module__}:{kernel.fn.__name__}", tuple(int(g) for g in grid), arguments, options)
