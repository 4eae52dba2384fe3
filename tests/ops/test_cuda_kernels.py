"""The CUDA extension's attention, compositing and fused-decoder kernels as compiled: tensor-core
instructions in the half-precision attention SASS, resources and occupancy per target
(dreamportrait.occupancy). Reads the built extension with cuobjdump; needs no GPU."""

import pytest
import torch

from support import requires_extension

from dreamportrait import _extension, occupancy
from dreamportrait.ops.triton import compile_check


def test_blocks_per_sm_takes_the_tightest_limit():
    # threads: 2048 / 256 = 8 blocks; registers: 32 x 32 per warp, 64 warps = 8 blocks
    assert occupancy.blocks_per_sm(80, registers=32, threads=256, static_shared=0) == 8
    # registers: 128 x 32 = 4096 per warp, 16 warps = 4 blocks; shared: 228 KiB // 101 KiB = 2
    assert occupancy.blocks_per_sm(90, registers=128, threads=128, static_shared=1024, dynamic_shared=100 * 1024) == 2
    # sm_86: 1536 threads = 12 blocks of 128; 40 registers (1280 per warp, 51 warps) = 12 blocks
    assert occupancy.blocks_per_sm(86, registers=40, threads=128, static_shared=512) == 12
    # the 1 KiB reserved per block: added on sm_80 (164 KiB // 55 KiB = 2, where 54 KiB would give 3),
    # already in the static figure cuobjdump gives for sm_90 (228 KiB // 76 KiB = 3)
    assert occupancy.blocks_per_sm(80, registers=32, threads=128, static_shared=0, dynamic_shared=54 * 1024) == 2
    assert occupancy.blocks_per_sm(90, registers=32, threads=128, static_shared=1024, dynamic_shared=75 * 1024) == 3
    # a block that cannot be resident at all
    assert occupancy.blocks_per_sm(80, registers=255, threads=1024, static_shared=0) == 0
    assert occupancy.occupancy(90, blocks=2, threads=128) == 8 / 64


def _cuda_build():
    status = _extension.status()
    if not status.has_cuda:
        pytest.skip("the extension was built without CUDA kernels")
    return status


@pytest.fixture(scope="module")
def kernels():
    status = _cuda_build()
    resources = compile_check.extension_kernels(status.path)
    found = {}
    for (_, mangled) in resources:
        kernel = occupancy.identify(mangled)
        if kernel is not None:
            found[mangled] = kernel
    return status, resources, found


def test_every_attention_and_compositing_variant_is_compiled(kernels):
    _, _, found = kernels
    variants = {(k.op, k.backward, k.dtype, k.products) for k in found.values()}
    for backward in (False, True):
        for dtype in (torch.float16, torch.bfloat16):
            assert ("gated_cross_attention", backward, dtype, "tensor cores") in variants
        assert ("gated_cross_attention", backward, torch.float32, "TF32 tensor cores") in variants
        assert ("gated_cross_attention", backward, torch.float32, "FMA") in variants
        assert ("gated_cross_attention", backward, torch.float64, "FMA") in variants
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            assert ("composite_rays", backward, dtype, None) in variants
            assert ("sample_and_decode", backward, dtype, None) in variants


def test_attention_runs_on_tensor_cores(kernels):
    """HMMA (sm_80/86 mma.sync; HMMA or HGMMA on sm_90) in every architecture's SASS of the
    float16/bfloat16 and TF32 attention kernels; none in the exact float32/float64 ones."""
    status, _, found = kernels
    tool = compile_check.cuobjdump()
    for mangled, kernel in found.items():
        if kernel.op != "gated_cross_attention":
            continue
        per_arch = occupancy.tensor_core_archs(status.path, mangled, tool)
        assert set(per_arch) == set(status.cuda_archs), (kernel, per_arch)
        expected = kernel.products != "FMA"
        assert all(has == expected for has in per_arch.values()), (kernel, per_arch)


def test_every_kernel_is_resident_at_the_benchmark_shapes(kernels):
    status, resources, found = kernels
    rows = occupancy.kernel_rows(status.path, resources)
    assert len(rows) == sum(1 for (arch, mangled) in resources if mangled in found and arch in occupancy.SM_LIMITS)
    for row in rows:
        assert row.blocks_per_sm >= 1, row
        assert row.shared <= occupancy.SM_LIMITS[row.arch].shared_per_block + 1024, row
    table = occupancy.table(rows).splitlines()
    assert len(table) == len(rows) + 2
    # 4,096 rays fill an H100: a warp per ray, 1,024 blocks
    assert all(row.grid == 1024 for row in rows if row.kernel.op == "composite_rays")
    # the fused decoder: tiles of 32 points in float32 (12,288 at the workload's 393,216 points),
    # at most 4 blocks per SM of an H100
    decoder = [row for row in rows if row.kernel.op == "sample_and_decode"]
    assert decoder and all(row.grid == 4 * 132 for row in decoder)
    float32 = [row for row in decoder if row.kernel.dtype == torch.float32]
    weights = 64 * 32 + 64 + 33 * 64 + 33
    assert all(row.shared >= 4 * (weights + 32 * (33 + 65)) for row in float32 if not row.kernel.backward)
    assert all(row.shared >= 4 * (2 * weights + 32 * (33 + 2 * 65 + 34)) for row in float32 if row.kernel.backward)


@requires_extension
def test_decoder_tile_shape_is_the_largest_that_fits():
    """The CUDA launcher's tile choice (shared with the host emulation, so built without CUDA too)."""
    _extension.status()
    shape = torch.ops.dreamportrait.sample_and_decode_tile_shape
    # The weights staged transposed, C, K and O padded to whole groups of 8 (32, 64 and 40 here);
    # the backward's gradient sums in the weights' own shapes.
    staged = 32 * 64 + 64 + 64 * 40 + 40
    weights = 64 * 32 + 64 + 33 * 64 + 33
    per_point = 33 + 2 * 65 + 34  # features, pre-activations and hidden units, raw-output gradients
    exactly_16 = 8 * (staged + weights + 16 * per_point)
    assert shape(True, 32, 64, 33, torch.float64, exactly_16) == [16, exactly_16]
    assert shape(True, 32, 64, 33, torch.float64, exactly_16 - 1) == [8, 8 * (staged + weights + 8 * per_point)]
    assert shape(False, 32, 64, 33, torch.float16, 227 * 1024) == [32, 4 * (staged + 32 * (33 + 65))]
    assert shape(False, 5, 7, 2, torch.float32, 227 * 1024) == [32, 4 * (8 * 8 + 8 + 8 * 8 + 8 + 32 * (6 + 8))]
    assert shape(True, 32, 64, 33, torch.float64, 8 * (staged + weights)) == [0, 0]  # not even 4 points fit


def test_extension_table_names_kernels_in_anonymous_namespaces(kernels):
    status, _, _ = kernels
    table = compile_check.extension_table(status.path)
    assert "`forward_kernel<TensorCoreGemm<16>, c10::Half, float>`" in table
    assert "`backward_kernel<c10::BFloat16, float>`" in table  # composite_rays
