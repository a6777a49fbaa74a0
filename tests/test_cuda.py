"""The CUDA kernels against the pure-torch reference, bit for bit, on a GPU (bench/gpu_check.sh runs
this file on the GPU machine; without a GPU every test here is skipped, and test_cuda_build.py
checks the build itself).

Every output is checked for exact equality with the reference, on fresh random inputs, with the
extension's debug fill on: each op fills its outputs with 0xFF bytes before its kernels run (NaN
floats, packed words with the tail bits set), so an element a kernel never writes always fails."""

import itertools
import os
import sys

import pytest
import torch
from kernel_cases import has_the_edge_outputs, same_bits, signed_zero_nan_subnormal_case

from cuda_ext import ops
from cuda_ext.reference import binary_block_ref, binary_conv2d_ref, pack_signs_ref, pack_weight_ref

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.cuda_built()), reason="needs a CUDA GPU and the CUDA build of cuda_ext"
)
PATHS = ["bmma", "simt", "bmma_async", "bmma_lean", "bmma_lean1", "bmma_split", "bmma_halo", "bmma_halo_w",
         "bmma_halo_p"]  # fmt: skip
CASES = list(itertools.product([3, 31, 64, 100, 130, 256], [1, 2], [1, 3], [0.0, 1.0, -1.0]))


# Kernel paths whose tests are skipped (ops.skipped_cuda_paths): bench/gpu_lib.sh's gpu_tests sets
# them for a rerun after a path's kernel lost the CUDA context (a skip fails the GPU check: the path
# is not checked).
SKIPPED_PATHS = ops.skipped_cuda_paths()


def cuda_context_alive() -> bool:
    """Whether the device still runs anything: after an illegal address or a trap every later call
    fails with the same error."""
    try:
        return (torch.ones(1, device="cuda") + 1).item() == 2
    except RuntimeError:
        return False


def end_the_process(test: str, path: str | None) -> None:
    """Every later test would fail on the dead context: end the process naming the test and its path,
    so that bench/gpu_lib.sh's gpu_tests reruns the rest without them (stderr bypasses pytest's
    capture)."""
    sys.__stderr__.write(f"\nCUDA context lost in {test} path={path or ''}\n")
    sys.__stderr__.flush()
    os.abort()


@pytest.fixture(autouse=True)
def debug_fill_and_sync(request):
    """Outputs start as 0xFF bytes; a kernel fault surfaces in the test that launched it (the sync),
    not in whichever test happens to touch the device next, and a fault that leaves the context
    unusable ends the process (end_the_process)."""
    path = request.node.callspec.params.get("path") if hasattr(request.node, "callspec") else None
    if path in SKIPPED_PATHS:
        pytest.skip(f"{path} lost the CUDA context in an earlier run of these tests (BIREAL_SKIP_CUDA_PATHS)")
    with ops.debug_fill():
        yield
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            if not cuda_context_alive():
                end_the_process(request.node.originalname, path)
            raise


def cuda_case(batch, channels, out_channels, side_h, side_w, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.randn(batch, channels, side_h, side_w, generator=g)
    w = torch.randn(out_channels, channels, kh, kw, generator=g)
    return x, w


def on_cuda(args):
    return tuple(a.cuda() if torch.is_tensor(a) else a for a in args)


def assert_block_equal(path, args, scale=None, bias=None, residual=None, out_dtype=None):
    """binary_conv2d and binary_block on `path` equal the reference, bit for bit."""
    ref_out, ref_packed = binary_block_ref(*args, scale, bias, residual, out_dtype)
    extra = on_cuda((scale, bias, residual))
    with ops.forced_cuda_path(path):
        conv = ops.binary_conv2d(*on_cuda(args), *extra, out_dtype=out_dtype)
        out, packed = ops.binary_block(*on_cuda(args), *extra, out_dtype=out_dtype)
    assert conv.dtype == ref_out.dtype and conv.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.cpu(), ref_out)
    assert torch.equal(out.cpu(), ref_out) and torch.equal(packed.cpu(), ref_packed)


def assert_block_and_conv_equal(path, args, out_channels):
    """On `path`, the block in bf16 with a bf16 residual, the float32 block with a float32 residual
    and the bare float32 conv equal the reference (random folded batch norm and residuals)."""
    residual = torch.randn_like(binary_conv2d_ref(*args))
    scale, bias = torch.rand(out_channels) + 0.5, torch.randn(out_channels)
    assert_block_equal(path, args, scale, bias, residual.to(torch.bfloat16), out_dtype=torch.bfloat16)
    assert_block_equal(path, args, scale, bias, residual)  # (bmma_halo: a float32 residual tile staged)
    assert_block_equal(path, args)


# The lean and halo paths (the lean epilogue, lean_epilogue.cuh) run what they instantiate for
# O % 8 == 0 and padding <= 3, and route everything else to bmma; PATHS runs every test on them, where
# O = 70 or 33 takes the route. (bmma_split splits the k-steps of these tests' small grids over
# clusters of up to 8 blocks: few tiles for the device's multiprocessors.)
LEAN_PATHS = ["bmma_lean", "bmma_lean1", "bmma_split", "bmma_halo", "bmma_halo_w", "bmma_halo_p"]
LEAN_SHAPES = list(itertools.product([3, 64, 130], [1, 2, 3], [(3, 1), (5, 2), (7, 3), (1, 0), (3, 4)]))


@pytest.mark.parametrize("path", LEAN_PATHS)
@pytest.mark.parametrize("out_channels", [8, 72, 128])
@pytest.mark.parametrize("channels,stride,kernel_padding", LEAN_SHAPES)
@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
def test_the_lean_epilogue_every_option_set(path, out_channels, channels, stride, kernel_padding, pad_value):
    """Each instantiated option set (bare, alpha only, folded batch norm with and without a residual
    of the output's type, float32 and bfloat16 out) and some that are routed to bmma (scale and bias
    without packing, a float32 residual under bfloat16 output, padding 4), on output tiles cut by
    M (3 x 11 x 9 pixels at stride 1) and by O (72: a partial 64-channel tile), equal the reference."""
    kernel, padding = kernel_padding
    x, w = cuda_case(3, channels, out_channels, 11, 9, kernel, seed=channels + 10 * stride + kernel)
    args = (pack_signs_ref(x), pack_weight_ref(w), channels, stride, padding, pad_value)
    ref = binary_conv2d_ref(*args)
    scale, bias = torch.rand(out_channels) + 0.5, torch.randn(out_channels)
    for out_dtype in (None, torch.bfloat16):
        same_type = torch.randn_like(ref).to(out_dtype or torch.float32)
        for options in ((None, None, None), (scale, None, None), (scale, bias, None), (scale, bias, same_type),
                        (scale, bias, torch.randn_like(ref))):  # fmt: skip
            assert_block_equal(path, args, *options, out_dtype=out_dtype)


@pytest.mark.parametrize("channels", [64, 200, 512])
@pytest.mark.parametrize("stride,kernel,padding", [(1, 3, 1), (2, 3, 1), (1, 1, 0), (3, 5, 2)])
@pytest.mark.parametrize("side_h,side_w", [(17, 35), (8, 16), (30, 9)])
@pytest.mark.parametrize("path", ["bmma_halo", "bmma_halo_w", "bmma_halo_p"])
def test_bmma_halo_tiles_and_halos(path, channels, stride, kernel, padding, side_h, side_w):
    """bmma_halo's blocks are 8 x 16 output pixels of one image with their input halo in shared
    memory (binary_conv_halo.cu): images cut into several tiles each way, partial tiles at the right
    and bottom edges, exactly whole tiles (8 x 16), halos of 1 to 8 words per pixel up to 36 KB (512
    channels at stride 2), and ones over the shared memory it allows (48 KB; bmma_halo_w, with the
    weights too, up to 100 KB by an opt-in: 68 KB at 512 channels, stride 1; 512 channels, 5 x 5 at
    stride 3 go to bmma_lean) all equal the reference: the packed block with a bfloat16 and a
    float32 residual, and the bare conv in float32, zero padding."""
    x, w = cuda_case(2, channels, 64, side_h, side_w, kernel, seed=channels + side_h + stride)
    args = (pack_signs_ref(x), pack_weight_ref(w), channels, stride, padding, 0.0)
    assert_block_and_conv_equal(path, args, 64)


@pytest.mark.parametrize("blocks", [1, 2, 5])
@pytest.mark.parametrize(
    "channels,out_channels,stride,side_h,side_w,pad_value",
    [(64, 64, 1, 17, 35, 0.0), (130, 72, 1, 19, 37, 1.0), (256, 128, 2, 30, 31, -1.0), (512, 64, 1, 8, 16, 0.0)],
)  # fmt: skip
def test_bmma_halo_p_blocks_loop_over_many_items(blocks, channels, out_channels, stride, side_h, side_w, pad_value):
    """bmma_halo_p with its grid capped (ops.persistent_blocks) at 1, 2 and 5 blocks, so that each
    loops over many work items (3 images of 2 x 3 to 3 x 3 tiles, 1 or 2 channel blocks), the next
    item's halo and residuals copied into the other buffer while one is computed: an odd and an even
    number of items per block, a partial channel block, tiles cut at the edges, stride 2, every pad
    value: the bf16 block with a bf16 residual, the float32 block and the bare conv equal the
    reference, and the cap is restored after."""
    x, w = cuda_case(3, channels, out_channels, side_h, side_w, 3, seed=channels + blocks)
    args = (pack_signs_ref(x), pack_weight_ref(w), channels, stride, 1, pad_value)
    with ops.persistent_blocks(blocks):
        assert ops._C.persistent_blocks() == blocks
        assert_block_and_conv_equal("bmma_halo_p", args, out_channels)
    assert ops._C.persistent_blocks() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["bmma_halo", "bmma_halo_w", "bmma_halo_p"])
def test_bmma_halo_with_a_residual_only_8_byte_aligned(path, dtype):
    """bmma_halo stages its residual tile with 16-byte copies; a residual whose base is only 8-byte
    aligned (a view 8 bytes into its storage) is routed to bmma_lean, and the outputs are still exact."""
    x, w = cuda_case(2, 64, 64, 12, 20, 3, seed=5)
    args = (pack_signs_ref(x), pack_weight_ref(w), 64, 1, 1, 0.0)
    n, o, ho, wo = binary_conv2d_ref(*args).shape
    scale, bias = torch.rand(64) + 0.5, torch.randn(64)
    offset = 8 // torch.tensor([], dtype=dtype).element_size()  # elements in 8 bytes
    storage = torch.randn(n * ho * wo * o + offset).to(dtype)
    residual = storage[offset:].view(n, ho, wo, o).permute(0, 3, 1, 2)  # channels_last, 8 bytes in
    out_dtype = dtype if dtype == torch.bfloat16 else None
    ref_out, ref_packed = binary_block_ref(*args, scale, bias, residual.contiguous(), out_dtype)
    on_gpu = storage.cuda()[offset:].view(n, ho, wo, o).permute(0, 3, 1, 2)
    assert on_gpu.data_ptr() % 16 == 8 and on_gpu.is_contiguous(memory_format=torch.channels_last)
    with ops.forced_cuda_path(path):
        out, packed = ops.binary_block(*on_cuda(args), scale.cuda(), bias.cuda(), on_gpu, out_dtype)
    assert torch.equal(out.cpu(), ref_out) and torch.equal(packed.cpu(), ref_packed)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(
    "channels,out_channels,side,stride", [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (256, 256, 14, 1),
                                          (256, 512, 14, 2), (512, 512, 7, 1), (100, 72, 9, 1)]
)  # fmt: skip
def test_bmma_split_the_k_steps_of_few_tiles(batch, channels, out_channels, side, stride):
    """bmma_split (binary_conv_split.cu) on Bi-Real-18's shapes at batch 1 and 4, and an odd one:
    the plan splits them (ops.split_k_plan with this device's multiprocessors: 2 to 8 blocks per
    tile, the last split shorter where the k-steps do not divide), and the block in bf16 with a bf16
    residual, the float32 block and the bare conv, zero and +1 padding, equal the reference."""
    x, w = cuda_case(batch, channels, out_channels, side, side, 3, seed=channels + side + stride)
    ho = (side + 2 - 3) // stride + 1
    blocks = -(-batch * ho * ho // 128) * -(-out_channels // 64)
    steps = -(-9 * -(-channels // 64) // 4)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits, _ = ops.split_k_plan(blocks, steps, sms)
    if batch == 1 and torch.cuda.get_device_capability(0)[0] >= 9:
        assert splits > 1, (blocks, steps, sms)  # the cluster kernel runs, not bmma_lean (batch 4: either)
    for pad_value in (0.0, 1.0):
        args = (pack_signs_ref(x), pack_weight_ref(w), channels, stride, 1, pad_value)
        assert_block_and_conv_equal("bmma_split", args, out_channels)


@pytest.mark.parametrize("path", LEAN_PATHS)
def test_the_lean_epilogue_with_the_border_classes_made_once(path):
    """A packed model passes ops.border_classes of its weights, made at load: bmma_lean and bmma_halo
    use it (the same outputs), a table of the wrong shape is refused naming the expected one, and
    the other paths ignore it."""
    x, w = cuda_case(2, 100, 72, 9, 7, 3, seed=11)
    args = on_cuda((pack_signs_ref(x), pack_weight_ref(w), 100, 1, 1, 0.0))
    scale, bias = torch.rand(72, device="cuda"), torch.randn(72, device="cuda")
    table = ops.border_classes(args[1], 100, 1)
    assert table.is_cuda and table.shape == (16, 72)
    ref_out, ref_packed = binary_block_ref(
        *(a.cpu() if torch.is_tensor(a) else a for a in args), scale.cpu(), bias.cpu()
    )
    for forced in (path, "bmma"):
        with ops.forced_cuda_path(forced):
            out, packed = ops.binary_block(*args, scale, bias, border_classes=table)
        assert torch.equal(out.cpu(), ref_out) and torch.equal(packed.cpu(), ref_packed), forced
    with (
        ops.forced_cuda_path(path),
        pytest.raises(RuntimeError, match=r"border_classes must be int32 \(16, 72\)"),
    ):
        ops.binary_block(*args, scale, bias, border_classes=table[:8])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_the_signs_of_zeros_nan_and_subnormal_outputs(path, out_dtype):
    """The packed signs of +0, -0, NaN and subnormal outputs are the reference's (the lean epilogue
    reads a bf16 pair's two signs with one packed compare, __hge2_mask, on sm_90), and the outputs
    keep them bit for bit."""
    args, scale, bias, residual = signed_zero_nan_subnormal_case(out_dtype)
    ref_out, ref_packed = binary_block_ref(*args, scale, bias, residual, out_dtype)
    assert has_the_edge_outputs(ref_out)
    with ops.forced_cuda_path(path):
        out, packed = ops.binary_block(*on_cuda(args), *on_cuda((scale, bias, residual)), out_dtype=out_dtype)
    assert same_bits(out.cpu(), ref_out) and torch.equal(packed.cpu(), ref_packed)


@pytest.mark.parametrize("path", LEAN_PATHS)
def test_the_lean_epilogue_after_the_weights_change(path):
    """kernels: auto packs new weights every step: the border classes come from each call's weights."""
    x, w = cuda_case(2, 64, 64, 7, 7, 3, seed=5)
    args = (pack_signs_ref(x), pack_weight_ref(w), 64, 1, 1, 0.0)
    assert_block_equal(path, args, torch.rand(64), torch.randn(64))
    args = (args[0], pack_weight_ref(-w.roll(1, dims=0)), *args[2:])
    assert_block_equal(path, args, torch.rand(64), torch.randn(64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [1, 31, 64, 65, 100, 130, 512])
def test_pack_signs_cuda(dtype, channels):
    x = torch.randn(3, channels, 5, 7).to(dtype)
    x[0, :, 0, 0] = 0.0
    x[1, :, 1, 1] = -0.0
    if dtype == torch.float64:
        x[2, :, 2, 2] = -1e-300
    for layout in (torch.contiguous_format, torch.channels_last):
        out = ops.pack_signs(x.cuda().contiguous(memory_format=layout))
        assert out.is_cuda and torch.equal(out.cpu(), pack_signs_ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "case",
    [
        (2, 64, 20, 18, 3, 2, 1),
        (1, 3, 7, 9, 3, 2, 1),
        (2, 100, 13, 11, 3, 2, 1),
        (1, 130, 8, 8, 2, 2, 0),
        (2, 17, 6, 7, 1, 1, 0),
        (1, 200, 9, 10, 5, 3, 2),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_max_pool_signs_cuda(dtype, case, with_bias):
    """The CUDA max_pool_signs kernel: max_pool2d(x + bias) and its packed signs, bit for bit against
    the reference on the CPU, NaN propagated, every element written (the debug fill)."""
    from cuda_ext.reference import max_pool_signs_ref

    n, c, h, w, k, s, p = case
    g = torch.Generator().manual_seed(c * 10 + k)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    x[0, c // 2, 1, 1] = float("nan")
    bias = (torch.randn(c, generator=g) * 0.5).to(dtype) if with_bias else None
    x[-1, 0] = 0.0 if bias is None else -bias[0]  # x + bias exactly 0 there: sign +1
    ref_out, ref_packed = max_pool_signs_ref(x, k, s, p, bias)
    for layout in (torch.contiguous_format, torch.channels_last):
        out, packed = ops.max_pool_signs(
            x.cuda().contiguous(memory_format=layout), k, s, p, None if bias is None else bias.cuda()
        )
        assert out.is_cuda and out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
        out = out.cpu()
        assert torch.equal(out.isnan(), ref_out.isnan()) and out.isnan().any()
        assert torch.equal(out.nan_to_num(7.0), ref_out.nan_to_num(7.0))
        assert torch.equal(packed.cpu(), ref_packed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels,stride,kernel,pad_value", CASES)
def test_binary_conv2d_cuda(path, channels, stride, kernel, pad_value):
    x, w = cuda_case(3, channels, 70, 11, 9, kernel, seed=channels * 7 + stride + kernel)
    args = (pack_signs_ref(x), pack_weight_ref(w), channels, stride, kernel // 2, pad_value)
    ref_plain = binary_conv2d_ref(*args)
    with ops.forced_cuda_path(path):
        plain = ops.binary_conv2d(*on_cuda(args))
    assert torch.equal(plain.cpu(), ref_plain)
    assert plain.is_contiguous(memory_format=torch.channels_last)
    scale, bias, residual = torch.randn(70), torch.randn(70), torch.randn_like(ref_plain)
    assert_block_equal(path, args, scale, bias, residual)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16, None])
@pytest.mark.parametrize("channels,stride,pad_value", [(3, 1, 0.0), (64, 2, 1.0), (130, 1, -1.0), (256, 1, 0.0)])
def test_bfloat16_output(path, residual_dtype, channels, stride, pad_value):
    """out_dtype=bfloat16: the float32 epilogue rounded once to nearest even, and the packed signs of
    the rounded values; a float32 or bfloat16 residual."""
    x, w = cuda_case(2, channels, 70, 9, 8, 3, seed=channels + stride)
    args = (pack_signs_ref(x), pack_weight_ref(w), channels, stride, 1, pad_value)
    ho, wo = (9 + 2 - 3) // stride + 1, (8 + 2 - 3) // stride + 1
    residual = None if residual_dtype is None else torch.randn(2, 70, ho, wo).to(residual_dtype)
    assert_block_equal(path, args, torch.rand(70) + 0.5, torch.randn(70), residual, torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel,padding", [(3, 2), (5, 2), (1, 2), ((1, 3), 1), ((3, 1), 1), ((3, 5), 2)])
@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
def test_wide_padding_and_non_square_kernels(path, kernel, padding, pad_value):
    x, w = cuda_case(2, 70, 33, 7, 10, kernel, seed=padding)
    args = (pack_signs_ref(x), pack_weight_ref(w), 70, 1, padding, pad_value)
    assert_block_equal(path, args, torch.randn(33), torch.randn(33))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("out_channels", [1, 7, 63, 65, 127, 129])
def test_odd_output_channel_counts(path, out_channels):
    x, w = cuda_case(3, 100, out_channels, 6, 5, 3, seed=out_channels)
    args = (pack_signs_ref(x), pack_weight_ref(w), 100, 1, 1, 0.0)
    ref = binary_conv2d_ref(*args)
    assert_block_equal(path, args, torch.randn(out_channels), torch.randn(out_channels), torch.randn_like(ref))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pad_value", [0.0, 1.0])
def test_zero_output_channels(path, pad_value):
    """O = 0 returns empty outputs (the zero padding's tap-sum kernel must not launch an empty grid)."""
    px = ops.pack_signs(torch.randn(2, 64, 5, 5, device="cuda"))
    pw = torch.zeros(0, 3, 3, 1, dtype=torch.int64, device="cuda")
    with ops.forced_cuda_path(path):
        out, packed = ops.binary_block(px, pw, 64, 1, 1, pad_value)
    assert out.shape == (2, 0, 5, 5) and packed.shape == (2, 5, 5, 0)


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_packed_operands(path):
    """Packed inputs as strided views (a crop of a larger map, weights viewed through a transpose)."""
    x, w = cuda_case(2, 130, 40, 12, 11, 3, seed=3)
    px_big, pw = pack_signs_ref(x), pack_weight_ref(w)
    px = px_big[:, 1:-1, ::2]  # (N, 10, 6, Cw), strided
    pw_t = pw.transpose(1, 2).contiguous().transpose(1, 2)  # same values, KH/KW strides swapped
    assert not px.is_contiguous() and not pw_t.is_contiguous()
    ref = binary_conv2d_ref(px.contiguous(), pw, 130, 1, 1, 0.0)
    with ops.forced_cuda_path(path):
        out = ops.binary_conv2d(px.cuda(), pw_t.cuda(), 130, 1, 1, 0.0)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(4))
def test_random_odd_shapes(path, seed):
    """Shapes drawn at random: odd channel counts, output channels, image sizes, batch."""
    g = torch.Generator().manual_seed(1000 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    channels, out_channels, h, w = r(1, 300), r(1, 200), r(1, 20), r(1, 20)
    kernel, stride = (1, 3)[r(0, 2)], r(1, 3)
    pad_value = (0.0, 1.0, -1.0)[r(0, 3)]
    x, wt = cuda_case(r(1, 5), channels, out_channels, h, w, kernel, seed)
    args = (pack_signs_ref(x), pack_weight_ref(wt), channels, stride, kernel // 2, pad_value)
    assert_block_equal(path, args, torch.randn(out_channels), torch.randn(out_channels))


@pytest.mark.parametrize("channels,side", [(64, 56), (128, 28), (256, 14), (512, 7)])
def test_bireal18_shapes_every_path_agrees(channels, side):
    """Bi-Real-18's layer shapes at batch 8: the CUDA paths agree exactly; a subset of images is also
    checked against the reference."""
    x, w = cuda_case(8, channels, channels, side, side, 3, seed=channels)
    px, pw = ops.pack_signs(x.cuda()), ops.pack_signs(w.cuda())
    scale, bias = torch.rand(channels, device="cuda") + 0.5, torch.randn(channels, device="cuda")
    residual = torch.randn(8, channels, side, side, device="cuda")
    args = (px, pw, channels, 1, 1, 0.0, scale, bias, residual)
    results = {}
    for path in PATHS:
        with ops.forced_cuda_path(path):
            results[path] = ops.binary_block(*args)
    for path in PATHS[1:]:
        assert torch.equal(results[path][0], results["bmma"][0]), path
        assert torch.equal(results[path][1], results["bmma"][1]), path
    ref = binary_conv2d_ref(px[:2].cpu(), pw.cpu(), channels, 1, 1, 0.0, scale.cpu(), bias.cpu(), residual[:2].cpu())
    assert torch.equal(results["bmma"][0][:2].cpu(), ref)


def test_opcheck_cuda():
    x = torch.randn(2, 33, 6, 5, device="cuda")
    px, pw = ops.pack_signs(x), ops.pack_signs(torch.randn(7, 33, 3, 3, device="cuda"))
    scale, bias, res = (
        torch.randn(7, device="cuda"),
        torch.randn(7, device="cuda"),
        torch.randn(2, 7, 6, 5, device="cuda"),
    )
    torch.library.opcheck(torch.ops.bireal.pack_signs.default, (x,))
    torch.library.opcheck(torch.ops.bireal.binary_conv2d.default, (px, pw, 33, 1, 1, 0.0, scale, bias, res))
    torch.library.opcheck(torch.ops.bireal.binary_block.default, (px, pw, 33, 1, 1, 1.0, scale, bias, res))
    torch.library.opcheck(
        torch.ops.bireal.binary_block.default, (px, pw, 33, 1, 1, 0.0, scale, bias, res.bfloat16(), torch.bfloat16)
    )


def test_runs_on_the_current_stream():
    x, w = cuda_case(4, 64, 64, 28, 28, 3, seed=5)
    px, pw = ops.pack_signs(x.cuda()), ops.pack_signs(w.cuda())
    expected = ops.binary_conv2d(px, pw, 64)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ops.binary_conv2d(px, pw, 64)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)


def test_bad_arguments_named_on_cuda():
    px = ops.pack_signs(torch.randn(1, 64, 4, 4, device="cuda"))
    pw = pack_weight_ref(torch.randn(3, 64, 3, 3))
    with pytest.raises(RuntimeError, match="packed_x on cuda"):
        ops.binary_conv2d(px, pw, 64)  # weights left on the CPU
    with pytest.raises(RuntimeError, match="scale"):
        ops.binary_conv2d(px, pw.cuda(), 64, scale=torch.ones(3))
    with pytest.raises(RuntimeError, match="in_channels=65"):
        ops.binary_conv2d(px, pw.cuda(), 65)


def _randomized_packed(name, **kwargs):
    import tempfile
    from pathlib import Path

    import bireal_core as bc
    from cuda_ext.packed import export_model, load_packed

    model = bc.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        return load_packed(export_model(model, Path(tmp) / "m.safetensors"), device="cuda")[0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "name,kwargs,side,dtype",
    [
        ("bireal18", {}, 224, torch.float32),
        ("bireal18", {}, 224, torch.bfloat16),
        ("bireal34", {"pad_value": -1.0}, 224, torch.float32),
        ("bireal50", {"num_classes": 10, "stem": "small", "width": 0.5}, 32, torch.bfloat16),
    ],
)
def test_packed_model_on_cuda_equals_reference_ops(monkeypatch, path, name, kwargs, side, dtype):
    """PackedBiReal on the GPU through the CUDA ops gives the same logits as the same folded model
    through the reference ops on the GPU (same float stem, shortcuts and head), with float32 and
    bfloat16 activations. ImageNet stem, 224 crops and the 1000-way head for the basic-block nets."""
    from cuda_ext.packed import reference_ops

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    packed = _randomized_packed(name, **kwargs).set_activation_dtype(dtype)
    x = torch.randn(4, 3, side, side, device="cuda")
    with torch.inference_mode():
        with ops.forced_cuda_path(path):
            ours = packed(x)
        with reference_ops():
            ref = packed(x)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("path", LEAN_PATHS)
def test_packed_model_with_programmatic_dependent_launch(path):
    """ops.programmatic_launch: the lean and halo kernels may start while the kernel before them
    finishes (sm_90+); the packed Bi-Real-18 in bf16 still equals the reference ops, eagerly and
    replayed as a CUDA graph at batch 1 (its kernels back to back), and the switch is restored."""
    from cuda_ext.packed import reference_ops

    packed = _randomized_packed("bireal18").fuse_shortcuts().set_activation_dtype(torch.bfloat16)
    x = torch.randn(1, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        with reference_ops():
            ref = packed(x)
        with ops.forced_cuda_path(path), ops.programmatic_launch():
            eager = packed(x)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = packed(x)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
    assert torch.equal(eager, ref) and torch.equal(static_out, ref)
    assert not ops._C.programmatic_launch()


def test_packed_model_under_cuda_graph_batch1():
    packed = _randomized_packed("bireal18")
    static_x = torch.randn(1, 3, 224, 224, device="cuda")
    with torch.no_grad():
        eager = packed(static_x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                packed(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = packed(static_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)
        new_x = torch.randn(1, 3, 224, 224, device="cuda")
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, packed(new_x))


def test_float32_mode_runs_the_real_valued_convs_in_ieee_float32(monkeypatch):
    """cuDNN may run float32 convs in TF32 (PyTorch's default for convs): the packed model's float32
    mode turns that off inside its forward, so its stem matches a float64 computation to float32
    rounding (5e-7 of the range on a CPU; TF32 misses by ~3e-4), and the process's flags are left as they were."""
    import copy

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    packed = _randomized_packed("bireal18")
    stem64 = copy.deepcopy(packed.stem).cpu().double()  # before the hook: a copy would carry it
    seen = []
    packed.stem.register_forward_hook(lambda module, inputs, out: seen.append(out))  # returns None
    x = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        packed(x.cuda())
        ref = stem64(x.double())
    err = (seen[0].double().cpu() - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), f"stem off by {err:.3g} (range {ref.abs().max().item():.3g})"
    assert torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize(
    "activation,gradient,pad_value,stride",
    [("approx_sign", "paper", 0.0, 1), ("ste_sign", "official", 1.0, 2), ("identity_sign", "caffe", -1.0, 1)],
)
def test_training_through_the_cuda_kernels_matches_the_float_path(activation, gradient, pad_value, stride):
    """``kernels: auto`` on CUDA (cuda_ext.training): output and gradients of a binary conv within
    float32 rounding of the float path on the same GPU (docs/training.md); the CPU test's helpers."""
    from test_training_kernels import binary_conv, both_paths, close_to_float

    torch.backends.cudnn.allow_tf32 = False  # the float path's reference conv in IEEE float32
    conv = binary_conv(128, 64, activation, gradient, pad_value, stride)
    x = torch.randn(4, 128, 14, 14, device="cuda") * 0.8
    (out_f, gx_f, gw_f, _), (out_k, gx_k, gw_k, _) = both_paths(conv, x)
    close_to_float(out_k, out_f)
    close_to_float(gx_k, gx_f)
    close_to_float(gw_k, gw_f)


def test_training_a_packed_bireal18_step_on_cuda():
    """A whole training step of Bi-Real-18 (ImageNet stem, 224 px) with the packed kernels on CUDA:
    finite loss and gradients, and every binary conv on the packed path."""
    import bireal_core as bc
    from cuda_ext.training import use_kernels

    model = bc.create_model("bireal18", num_classes=1000, stem="imagenet", width=1.0).cuda()
    assert use_kernels(model, "auto", "cuda") == 16
    x, y = torch.randn(8, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("activation", ["approx_sign", "ste_sign", "identity_sign"])
def test_the_packed_conv_under_bf16_autocast_on_cuda(activation):
    """``precision: bf16`` with ``kernels: auto`` on the GPU: bfloat16 out, backward in bfloat16,
    gradients within bfloat16's precision of the float path (the CPU test's case)."""
    from test_training_kernels import bf16_autocast_case

    bf16_autocast_case(activation, torch.device("cuda"))


def test_the_device_augmentation_and_a_training_step_make_no_host_sync():
    """Preparing a batch on the GPU (crop, flip, lighting, normalise) and a bf16 training step of
    Bi-Real-18 through the packed kernels never wait for the GPU (torch's sync debug mode raises on
    any synchronising call), so the host prepares the next batch while the step runs."""
    import bireal_core as bc
    from bireal_core.preprocess import default_input_config
    from cuda_ext.training import use_kernels
    from pipeline.decode import DeviceRecipe

    config = default_input_config("imagenet")
    model = bc.create_model("bireal18", num_classes=1000, stem="imagenet", width=0.5).cuda()
    model = model.to(memory_format=torch.channels_last)
    assert use_kernels(model, "auto", "cuda") == 16
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    shapes = ((375, 500), (500, 333))
    decoded = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).cuda() for h, w in shapes]
    recipe = DeviceRecipe(config, train=True, pca_lighting=True, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 7]).cuda()
    for step in range(3):  # the first runs outside the check: cuDNN's and the allocator's first calls
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            images = recipe(decoded).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_nvjpeg_decodes_the_shards_jpegs_as_libjpeg_does_and_replaces_a_damaged_one():
    """decode: device on the GPU: the batch's JPEGs decoded by nvJPEG within a few levels of the
    CPU decode (their IDCTs round differently), and a damaged file replaced by its predecessor."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.decode import decode_batch, encoded_sample

    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, progressive=i == 3)
        files.append(encoded_sample(buffer.getvalue()))
    on_gpu = decode_batch(files, torch.device("cuda"))
    on_cpu = decode_batch(files, torch.device("cpu"))
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert gpu.is_cuda and gpu.shape == cpu.shape == (3, 375, 500)
        assert (gpu.cpu().int() - cpu.int()).abs().float().mean() < 1.0
    files[2] = files[2][:300]
    repaired = decode_batch(files, torch.device("cuda"), keys=["a", "b", "c", "d"])
    assert torch.equal(repaired[2], repaired[1])
