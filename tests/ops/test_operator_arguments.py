"""Every registered ``torch.ops.dreamportrait`` operator, forward and backward, compiled and Triton,
test-only emulations included, checks each tensor argument before touching memory.

The operators are listed from the dispatcher's registry, so an operator registered without an entry
in :data:`SPECS` fails :func:`test_every_registered_operator_has_a_boundary_spec`. For every
operator and every tensor argument the same cases are tried: a tensor with a dimension too few, one
with a size off by one, another dtype, another device (meta), and, where it can be built, a
non-contiguous view and an expanded (stride-0, overlapping) view. A bad argument must raise a
RuntimeError, ValueError or TypeError whose message names it; a view of another layout must give
the result of its contiguous copy (every kernel reads its inputs through ``.contiguous()`` or its
strides). Sizes past 32-bit indexing are tried with expanded tensors, so nothing big is allocated.
Running this module as a script prints the cases and their outcomes per operator.
"""

from __future__ import annotations

import collections
import re
import sys
from dataclasses import dataclass, field

import pytest
import torch

from dreamportrait import _extension

import dreamportrait.ops.sample_and_decode  # noqa: F401  (registers the Triton operators)
from dreamportrait.ops import _backend
from dreamportrait.ops.triton import launch as triton_launch

INT32_MAX = 2**31 - 1


def _registered() -> list[str]:
    _extension.status()  # loads the compiled operators when they are built
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("dreamportrait::"))


# ---- Valid arguments of every operator (float64 on the CPU) -------------------------------------

def _f(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _triplane(grad=None):
    planes, points = _f(2, 3, 4, 5, 5), torch.rand(2, 7, 3, dtype=torch.float64) - 0.5
    head = [("grad_output", grad)] if grad is not None else []
    return [*head, ("planes", planes), ("points", points), ("box_warp", 1.0), ("axes", [0, 1, 0, 2, 2, 0]),
            ("reduce", "mean")]


def _composite(backward=False):
    tensors = [("densities", torch.rand(8, 6, dtype=torch.float64)), ("colors", torch.rand(8, 6, 3, dtype=torch.float64)),
               ("depths", torch.rand(8, 6, dtype=torch.float64)), ("deltas", torch.rand(8, 6, dtype=torch.float64))]
    if backward:
        return [("grad_rgb", _f(8, 3)), ("grad_depth", _f(8)), ("grad_opacity", _f(8)), ("grad_weights", _f(8, 6)),
                *tensors]
    return [*tensors, ("transmittance_threshold", 0.0)]


def _attention(backward=False, tiles=None):
    q, k, v, gate = _f(2, 8, 6, 16), _f(2, 8, 5, 16), _f(2, 8, 5, 16), _f(8)
    mask = torch.tensor([[True] * 5, [True, False, True, True, False]])
    arguments = [("q", q), ("k", k), ("v", v), ("gate", gate), ("key_padding_mask", mask)]
    if backward:
        arguments = [("grad_out", _f(2, 8, 6, 16)), *arguments, ("lse", _f(2, 8, 6).abs())]
    arguments.append(("scale", 0.25))
    if tiles is not None:
        arguments += list(tiles.items())
    return arguments


def _decoder(backward=False, emulation=False):
    # 16 channels and hidden units: the smallest decoder the fused Triton kernel takes.
    planes, points = _f(2, 3, 16, 5, 5), torch.rand(2, 7, 3, dtype=torch.float64) - 0.5
    head = [("grad_output", _f(2, 7, 3))] if backward else []
    tail = [("needs_planes", True), ("needs_points", True)] if backward else []
    if emulation:  # an H100's shared memory, two SMs, blocks of 64 threads
        tail += [("shared_memory", 227 * 1024), ("sms", 2), ("threads", 64)]
    return [*head, ("planes", planes), ("points", points), ("box_warp", 1.0), ("axes", [0, 1, 0, 2, 2, 0]),
            ("weight1", _f(16, 16)), ("bias1", _f(16)), ("weight2", _f(3, 16)), ("bias2", _f(3)), *tail]


@dataclass
class Spec:
    """How to call an operator: its valid arguments (a fresh list per call), the argument whose
    dtype and device the others must match (a mismatch may be reported under either name), which
    dimension of each tensor to grow by one for the size case, and arguments whose dtype is free."""

    arguments: object
    primary: str
    grow: dict = field(default_factory=dict)
    backend: str = "cpu"  # cpu (C++ operators), triton (Python custom ops)
    reduced_precision: bool = False  # takes float16 and bfloat16 on CPU tensors (emulations, Triton)


TRIPLANE_GROW = {"planes": 1, "points": 2, "grad_output": 2}
ATTENTION_GROW = {"q": 3, "gate": 0, "key_padding_mask": 1, "lse": 2, "grad_out": 2}
DECODER_GROW = {"planes": 1, "points": 2, "weight1": 1, "weight2": 1, "grad_output": 2}


def _specs() -> dict[str, Spec]:
    tiles = {"block_q": 16, "block_k": 16, "tiles_per_block": 1}
    specs = {
        "triplane_sample": Spec(_triplane, "planes", TRIPLANE_GROW),
        "triplane_sample_backward_planes": Spec(lambda: _triplane(_f(2, 7, 4)), "planes", TRIPLANE_GROW),
        "triplane_sample_backward_points": Spec(lambda: _triplane(_f(2, 7, 4)), "planes", TRIPLANE_GROW),
        "composite_rays": Spec(_composite, "densities"),
        "composite_rays_backward": Spec(lambda: _composite(True), "densities"),
        "composite_warp_emulation": Spec(_composite, "densities", reduced_precision=True),
        "composite_warp_emulation_backward": Spec(lambda: _composite(True), "densities", reduced_precision=True),
        "gated_cross_attention": Spec(_attention, "q", ATTENTION_GROW),
        "gated_cross_attention_backward": Spec(lambda: _attention(True), "q", ATTENTION_GROW),
        "attention_tile_emulation": Spec(lambda: _attention(tiles=tiles), "q", ATTENTION_GROW,
                                         reduced_precision=True),
        "attention_tile_emulation_backward": Spec(lambda: _attention(True, {**tiles, "splits": 0}), "q",
                                                  ATTENTION_GROW, reduced_precision=True),
        "sample_and_decode": Spec(_decoder, "planes", DECODER_GROW),
        "sample_and_decode_backward": Spec(lambda: _decoder(True), "planes", DECODER_GROW),
        "sample_and_decode_tile_emulation": Spec(lambda: _decoder(emulation=True), "planes", DECODER_GROW,
                                                 reduced_precision=True),
        "sample_and_decode_tile_emulation_backward": Spec(lambda: _decoder(True, True), "planes", DECODER_GROW,
                                                          reduced_precision=True),
    }
    for name in list(specs):
        if "emulation" not in name:
            base = specs[name]
            triton_name = name.replace("_backward", "_triton_backward") if "_backward" in name else name + "_triton"
            specs[triton_name] = Spec(base.arguments, base.primary, base.grow, backend="triton",
                                      reduced_precision=True)
    return specs


SPECS = _specs()
NO_TENSOR_ARGUMENTS = {"cuda_archs", "cuda_ptx_archs", "cpu_vector_bytes", "attention_tile_shape",
                       "sample_and_decode_tile_shape"}


def test_every_registered_operator_has_a_boundary_spec():
    unknown = [name for name in _registered() if name not in SPECS and name not in NO_TENSOR_ARGUMENTS]
    assert not unknown, f"registered operators without argument-boundary cases in {__file__}: {unknown}"


def _usable(spec: Spec) -> str | None:
    """Why the spec's operator cannot be called here, or None."""
    if spec.backend == "cpu" and not _extension.status().available:
        return "the compiled extension is not built"
    if spec.backend == "triton" and not (_backend.triton_importable() and _backend.triton_interpreted()):
        return "triton on CPU tensors needs TRITON_INTERPRET=1"
    return None


# ---- The cases ----------------------------------------------------------------------------------

def _fewer_dims(t):
    return t[0] if t.dim() else t.unsqueeze(0)


def _grown(t, dim):
    shape = list(t.shape)
    shape[dim] += 1
    return torch.zeros(shape, dtype=t.dtype) if t.dtype == torch.bool else torch.randn(shape, dtype=t.dtype)


def _other_dtype(t):
    return t.to(torch.uint8) if t.dtype == torch.bool else t.to(torch.float32)


def _non_contiguous(t):
    if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    doubled = torch.stack([t, t], dim=-1)  # every other element
    return doubled[..., 0]


def _expanded(t):
    if t.dim() == 0:
        return None
    return t.narrow(0, 0, 1).expand_as(t)


def _all_floating(spec: Spec, dtype):
    return [v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for _, v in spec.arguments()]


def cases(name: str):
    """(case, argument, arguments) triples of an operator; ``arguments`` a list of values."""
    spec = SPECS[name]
    valid = spec.arguments()
    # Every floating-point tensor of a dtype the kernel does not take: the primary argument is named.
    out = [("kernel-dtype", spec.primary, _all_floating(spec, torch.int64))]
    if not spec.reduced_precision:
        out.append(("kernel-dtype", spec.primary, _all_floating(spec, torch.float16)))
    for index, (arg, value) in enumerate(valid):
        if not isinstance(value, torch.Tensor):
            continue

        def replaced(new, index=index):
            values = [v for _, v in spec.arguments()]
            values[index] = new
            return values

        out.append(("fewer-dims", arg, replaced(_fewer_dims(value))))
        if arg != spec.primary:
            out.append(("size", arg, replaced(_grown(value, spec.grow.get(arg, 0)))))
        out.append(("dtype", arg, replaced(_other_dtype(value))))
        out.append(("device", arg, replaced(value.to("meta"))))
        out.append(("non-contiguous", arg, replaced(_non_contiguous(value))))
        expanded = _expanded(value)
        if expanded is not None:
            out.append(("expanded", arg, replaced(expanded)))
    return out


LAYOUT_CASES = ("non-contiguous", "expanded")


def _call(name, values):
    op = getattr(torch.ops.dreamportrait, name)
    if SPECS[name].backend == "triton":
        with triton_launch.recording(dry_run=True):  # checked before any launch; nothing runs
            return op(*values)
    return op(*values)


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def classify(name: str, case: str, arg: str, values) -> tuple[str, str]:
    """('named', message) for a clear error naming the argument, ('correct', '') for the result of
    the contiguous copies, ('other', what happened) otherwise."""
    spec = SPECS[name]
    allowed = {arg}
    if arg == spec.primary and case in ("dtype", "device", "fewer-dims"):
        # The other tensors are checked against the primary argument: the mismatch names them (with it).
        allowed |= {n for n, v in spec.arguments() if isinstance(v, torch.Tensor)}
    try:
        result = _call(name, values)
    except (RuntimeError, ValueError, TypeError) as error:
        message = str(error).split("\n")[0]
        if any(re.search(rf"(?<![A-Za-z_]){re.escape(a)}(?![A-Za-z_0-9])", str(error)) for a in allowed):
            return "named", message
        return "other", f"{type(error).__name__}: {message}"
    except Exception as error:  # noqa: BLE001
        return "other", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if case not in LAYOUT_CASES:
        return "other", "accepted"
    if spec.backend == "triton":
        return "correct", "accepted (read through .contiguous())"
    expected = _call(name, [v.contiguous() if isinstance(v, torch.Tensor) else v for v in values])
    for ours, theirs in zip(_outputs(result), _outputs(expected)):
        if not torch.equal(ours.isnan(), theirs.isnan()) or not torch.allclose(
                ours.nan_to_num(), theirs.nan_to_num(), rtol=1e-12, atol=1e-12):
            return "other", "result differs from the contiguous inputs'"
    return "correct", ""


def _parameters():
    params = []
    for name in sorted(SPECS):
        reason = _usable(SPECS[name])
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if SPECS[name].backend == "triton":
            marks.append(pytest.mark.triton)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("name", _parameters())
def test_each_tensor_argument_is_checked(name):
    outcomes = [(case, arg, *classify(name, case, arg, values)) for case, arg, values in cases(name)]
    bad = [f"{case} {arg}: {detail}" for case, arg, outcome, detail in outcomes if outcome == "other"]
    assert not bad, f"{name}: " + "; ".join(bad)
    for case, arg, outcome, _ in outcomes:
        assert outcome == ("correct" if case in LAYOUT_CASES else "named"), (case, arg, outcome)


# ---- Sizes past 32-bit indexing ------------------------------------------------------------------
# Expanded (stride-0) tensors of the sizes, so nothing big is allocated; each case is also sized so
# that, were the check missing, the operator's first output would be far larger than any machine's
# memory and its allocation would fail at once rather than run.

def _big(*shape, dtype=torch.float64):
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape)


def _composite_big(rays, samples, backward=False):
    tensors = [_big(rays, samples), _big(rays, samples, 1), _big(rays, samples), _big(rays, samples)]
    if backward:
        return [_big(rays, 1), _big(rays), _big(rays), _big(rays, samples), *tensors]
    return [*tensors, 0.0]


def _attention_big(batch, heads, queries, keys, dim, backward=False, tiles=()):
    q, k, v = _big(batch, heads, queries, dim), _big(batch, heads, keys, dim), _big(batch, heads, keys, dim)
    arguments = [q, k, v, _big(heads), None]
    if backward:
        arguments = [_big(batch, heads, queries, dim), *arguments, _big(batch, heads, queries)]
    return [*arguments, 0.25, *tiles]


def _triplane_big(batch, count, channels, backward=False):
    head = [_big(batch, count, channels)] if backward else []
    return [*head, _big(batch, 3, channels, 2, 2), _big(batch, count, 3), 1.0, [0, 1, 0, 2, 2, 0], "mean"]


def _decoder_big(batch, count, backward=False):
    head = [_big(batch, count, 128)] if backward else []
    tail = [True, True] if backward else []
    return [*head, _big(batch, 3, 16, 2, 2), _big(batch, count, 3), 1.0, [0, 1, 0, 2, 2, 0], _big(16, 16), _big(16),
            _big(128, 16), _big(128), *tail]


TILES = (16, 16, 1)
OVERFLOWS = [
    # The host emulations share the CUDA launchers' host code: their limits are the CUDA kernels'.
    ("composite_warp_emulation", "densities", lambda: _composite_big(4 * 2**31, 2**12)),
    ("composite_warp_emulation_backward", "densities", lambda: _composite_big(4 * 2**31, 2**12, True)),
    ("attention_tile_emulation", "q", lambda: _attention_big(1, 1, 16 * 2**31, 5, 16, tiles=TILES)),
    ("attention_tile_emulation", "k", lambda: _attention_big(1, 1, 16, 16 * 2**31, 16, tiles=TILES)),
    ("attention_tile_emulation", "q", lambda: _attention_big(2**16, 2**15, 16, 5, 2**14, tiles=TILES)),
    ("attention_tile_emulation", "q", lambda: _attention_big(1, 1, 2**12, 5, 2**31, tiles=TILES)),
    ("attention_tile_emulation_backward", "q", lambda: _attention_big(1, 1, 16 * 2**31, 5, 16, True, (*TILES, 0))),
    ("attention_tile_emulation_backward", "k", lambda: _attention_big(1, 1, 16, 16 * 2**31, 16, True, (*TILES, 0))),
    ("attention_tile_emulation_backward", "q",
     lambda: _attention_big(2**16, 2**15, 16, 5, 2**14, True, (*TILES, 0))),
    # The Triton kernels: 32-bit program ids times a block, at most 65535 programs along the grid's
    # second and third axes.
    ("triplane_sample_triton", "planes", lambda: _triplane_big(2**16, 2**10, 2**20)),
    ("triplane_sample_triton", "points", lambda: _triplane_big(1, 2**31, 2**12)),
    ("triplane_sample_triton", "planes", lambda: _triplane_big(1, 2**12, 2**31)),
    ("triplane_sample_triton_backward_planes", "points", lambda: _triplane_big(1, 2**31, 2**12, True)),
    ("triplane_sample_triton_backward_points", "planes", lambda: _triplane_big(2**16, 2**10, 2**20, True)),
    ("composite_rays_triton", "densities", lambda: _composite_big(2**31, 2**12)),
    ("composite_rays_triton_backward", "densities", lambda: _composite_big(2**31, 2**12, True)),
    ("gated_cross_attention_triton", "q", lambda: _attention_big(2**8, 2**8, 2**10, 5, 2**10)),
    ("gated_cross_attention_triton", "q", lambda: _attention_big(1, 1, 2**31, 5, 2**10)),
    ("gated_cross_attention_triton", "k", lambda: _attention_big(1, 1, 2**10, 2**31, 2**10)),
    ("gated_cross_attention_triton_backward", "q", lambda: _attention_big(2**8, 2**8, 2**10, 5, 2**10, True)),
    ("sample_and_decode_triton", "planes", lambda: _decoder_big(2**16, 2**20)),
    ("sample_and_decode_triton", "points", lambda: _decoder_big(1, 2**31)),
    ("sample_and_decode_triton_backward", "points", lambda: _decoder_big(1, 2**31, True)),
]


def _overflow_parameters():
    params = []
    for index, (name, arg, _) in enumerate(OVERFLOWS):
        reason = _usable(SPECS[name])
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(index, marks=marks, id=f"{name}-{arg}-{index}"))
    return params


def classify_overflow(name: str, arg: str, values) -> tuple[str, str]:
    try:
        _call(name, values)
    except (RuntimeError, ValueError, TypeError) as error:
        if re.search(rf"(?<![A-Za-z_]){re.escape(arg)} is too large", str(error)):
            return "named", str(error).splitlines()[0]
        return "other", f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return "other", "accepted"


@pytest.mark.parametrize("index", _overflow_parameters())
def test_sizes_past_32_bit_indexing_are_refused_naming_the_argument(index):
    name, arg, build = OVERFLOWS[index]
    outcome, detail = classify_overflow(name, arg, build())
    assert outcome == "named", f"{name} {arg}: {detail}"


SIXTY_FOUR_BIT = {"sample_and_decode_tile_emulation", "sample_and_decode_tile_emulation_backward"}
"""Emulated CUDA schedules that index in 64 bits throughout (the fused decoder's: a grid-stride loop
over tiles, at most a few blocks per SM), so that no size is too large for them."""


def test_every_kernel_with_32_bit_indices_has_an_overflow_case():
    """The Triton operators and the CUDA launchers' host code (reached through the emulations)."""
    covered = {name for name, _, _ in OVERFLOWS}
    expected = {name for name, spec in SPECS.items()
                if spec.backend == "triton" or ("emulation" in name and name not in SIXTY_FOUR_BIT)}
    assert expected <= covered, sorted(expected - covered)


def report() -> None:
    table = collections.OrderedDict()
    for name in sorted(SPECS):
        reason = _usable(SPECS[name])
        if reason:
            print(f"{name}: skipped ({reason})")
            continue
        counts = collections.Counter()
        for case, arg, values in cases(name):
            outcome, detail = classify(name, case, arg, values)
            counts[outcome] += 1
            if outcome == "other" or "-v" in sys.argv:
                print(f"  {name} {case} {arg}: {outcome} {detail}")
        table[name] = counts
    for name, arg, build in OVERFLOWS:
        if _usable(SPECS[name]):
            continue
        outcome, detail = classify_overflow(name, arg, build())
        table[name]["overflow-" + outcome] += 1
        table[name][outcome] += 1
        if outcome == "other" or "-v" in sys.argv:
            print(f"  {name} overflow {arg}: {outcome} {detail}")
    print(f"| {'operator':40s} | cases | named | correct | other | of which 32-bit |")
    for name, counts in table.items():
        total = counts["named"] + counts["correct"] + counts["other"]
        overflow = counts["overflow-named"] + counts["overflow-other"]
        print(f"| {name:40s} | {total:5d} | {counts['named']:5d} | {counts['correct']:7d} | {counts['other']:5d} | "
              f"{overflow:15d} |")


if __name__ == "__main__":
    report()
