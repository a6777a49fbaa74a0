"""The bireal ops against their pure-torch reference, on every CPU code path this CPU can run."""

import itertools

import pytest
import torch
from kernel_cases import has_the_edge_outputs, same_bits, signed_zero_nan_subnormal_case

from bireal_core import BinaryConv2d, IdentitySign, MagnitudeAwareSign
from cuda_ext import ops
from cuda_ext.reference import binary_block_ref, binary_conv2d_ref, pack_signs_ref, pack_weight_ref, unpack_signs_ref

PATHS = ops.cpu_paths()
CASES = list(itertools.product([3, 31, 33, 64, 100], [1, 2], [1, 3], [0.0, 1.0, -1.0], [1, 3]))


def test_best_path_first_and_portable_always_there():
    assert PATHS[-1] == "portable"
    assert ops.cpu_path() == PATHS[0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [1, 3, 31, 64, 65, 100, 130])
def test_pack_signs_matches_reference(path, dtype, channels):
    x = torch.randn(2, channels, 5, 3).to(dtype)
    x[0, :, 0, 0] = 0.0  # sign(0) = +1
    x[1, :, 1, 1] = -0.0
    with ops.forced_cpu_path(path):
        packed = ops.pack_signs(x)
    assert torch.equal(packed, pack_signs_ref(x))
    assert torch.equal(unpack_signs_ref(packed, channels), torch.where(x >= 0, 1.0, -1.0).float())


def test_pack_signs_accepts_channels_last_and_strided():
    x = torch.randn(2, 70, 6, 6)
    assert torch.equal(ops.pack_signs(x.contiguous(memory_format=torch.channels_last)), pack_signs_ref(x))
    assert torch.equal(ops.pack_signs(x[:, :, ::2, 1:]), pack_signs_ref(x[:, :, ::2, 1:]))


def test_worked_example_golden():
    """The example of docs/packed_format.md, bit for bit."""
    signs = -torch.ones(1, 70, 1, 1)
    for c in (0, 2, 63, 64, 69):
        signs[0, c] = 1.0
    signs[0, 1] = 0.0  # exact zero packs as +1
    packed = ops.pack_signs(signs)
    assert packed.shape == (1, 1, 1, 2)
    word0, word1 = (int(v) & (2**64 - 1) for v in packed.flatten())
    assert word0 == 0x8000000000000007  # channels 0, 1, 2 and 63
    assert word1 == 0x0000000000000021  # channels 64 and 69; bits 6..63 (past C = 70) are 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels,stride,kernel,pad_value,batch", CASES)
def test_binary_conv_matches_reference(path, channels, stride, kernel, pad_value, batch):
    x = torch.randn(batch, channels, 9, 7)
    w = torch.randn(37, channels, kernel, kernel)
    px, pw = pack_signs_ref(x), pack_weight_ref(w)
    args = (px, pw, channels, stride, kernel // 2, pad_value)
    with ops.forced_cpu_path(path):
        out = ops.binary_conv2d(*args)
        ref = binary_conv2d_ref(*args)
        assert torch.equal(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last)
        scale, bias = torch.randn(37), torch.randn(37)
        residual = torch.randn_like(ref)
        fused = ops.binary_conv2d(*args, scale, bias, residual)
        assert torch.equal(fused, binary_conv2d_ref(*args, scale, bias, residual))


@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
@pytest.mark.parametrize("stride", [1, 2])
def test_identical_to_float_simulation(pad_value, stride):
    """The kernel reproduces BinaryConv2d (the training graph's float simulation) bit for bit."""
    conv = BinaryConv2d(
        45,
        19,
        3,
        stride=stride,
        padding=1,
        bias=False,
        input_binarizer=IdentitySign(),
        weight_binarizer=MagnitudeAwareSign("plain"),
        pad_value=pad_value,
    )
    x = torch.randn(3, 45, 11, 10)
    x[:, :, 2, 2] = 0.0
    with torch.no_grad():
        expected = conv(x)
    out = ops.binary_conv2d(ops.pack_signs(x), ops.pack_signs(conv.weight.detach()), 45, stride, 1, pad_value)
    assert torch.equal(out, expected)


def test_tiny_images_all_border():
    x, w = torch.randn(2, 33, 1, 2), torch.randn(5, 33, 3, 3)
    for pad_value in (0.0, 1.0, -1.0):
        args = (pack_signs_ref(x), pack_weight_ref(w), 33, 1, 1, pad_value)
        assert torch.equal(ops.binary_conv2d(*args), binary_conv2d_ref(*args))


def test_opcheck():
    x = torch.randn(2, 33, 6, 5)
    px, pw = ops.pack_signs(x), pack_weight_ref(torch.randn(7, 33, 3, 3))
    torch.library.opcheck(torch.ops.bireal.pack_signs.default, (x,))
    torch.library.opcheck(torch.ops.bireal.binary_conv2d.default, (px, pw, 33, 1, 1, 0.0, None, None, None))
    scale, bias, res = torch.randn(7), torch.randn(7), torch.randn(2, 7, 3, 3)
    torch.library.opcheck(torch.ops.bireal.binary_conv2d.default, (px, pw, 33, 2, 1, -1.0, scale, bias, res))


def test_bad_arguments_named():
    px, pw = ops.pack_signs(torch.randn(1, 64, 4, 4)), pack_weight_ref(torch.randn(3, 64, 3, 3))
    with pytest.raises(RuntimeError, match="in_channels=65"):
        ops.binary_conv2d(px, pw, 65)
    with pytest.raises(RuntimeError, match="pad_value"):
        ops.binary_conv2d(px, pw, 64, pad_value=0.5)
    with pytest.raises(RuntimeError, match="packed_x must be an int64"):
        ops.binary_conv2d(px.float(), pw, 64)
    with pytest.raises(RuntimeError, match="residual"):
        ops.binary_conv2d(px, pw, 64, residual=torch.zeros(1, 3, 5, 5))
    with pytest.raises(RuntimeError, match="unknown path"):
        with ops.forced_cpu_path("sse9"):
            pass


@pytest.mark.parametrize(
    "channels,stride,kernel,pad_value", [(33, 1, 3, 0.0), (64, 2, 3, 1.0), (100, 1, 1, -1.0), (130, 2, 1, 0.0)]
)
def test_binary_block_is_conv_then_pack(channels, stride, kernel, pad_value):
    """The fused block returns binary_conv2d's output and exactly pack_signs of it (70 outputs:
    two words, the second with a tail)."""
    x, w = torch.randn(2, channels, 9, 8), torch.randn(70, channels, kernel, kernel)
    args = (pack_signs_ref(x), pack_weight_ref(w), channels, stride, kernel // 2, pad_value)
    epilogue = (torch.randn(70), torch.randn(70))
    out, packed = ops.binary_block(*args, *epilogue)
    ref_out, ref_packed = binary_block_ref(*args, *epilogue)
    assert torch.equal(out, ref_out) and torch.equal(packed, ref_packed)
    residual = torch.randn_like(out)
    out, packed = ops.binary_block(*args, *epilogue, residual)
    assert torch.equal(out, binary_conv2d_ref(*args, *epilogue, residual))
    assert torch.equal(packed, pack_signs_ref(out))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_the_signs_of_zeros_nan_and_subnormal_outputs(out_dtype):
    """Outputs +0 and -0 pack as +1, NaN as -1, +-2^-130 by their own sign (not flushed to zero), on
    every CPU path; the outputs keep them bit for bit (tests/test_cuda.py: the same on every CUDA path)."""
    args, scale, bias, residual = signed_zero_nan_subnormal_case(out_dtype)
    ref_out, ref_packed = binary_block_ref(*args, scale, bias, residual, out_dtype)
    assert has_the_edge_outputs(ref_out)
    for path in ops.cpu_paths():
        with ops.forced_cpu_path(path):
            out, packed = ops.binary_block(*args, scale, bias, residual, out_dtype=out_dtype)
        assert same_bits(out, ref_out) and torch.equal(packed, ref_packed), path


def test_binary_block_opcheck():
    px, pw = ops.pack_signs(torch.randn(2, 33, 6, 5)), pack_weight_ref(torch.randn(7, 33, 3, 3))
    scale, bias, res = torch.randn(7), torch.randn(7), torch.randn(2, 7, 6, 5)
    torch.library.opcheck(torch.ops.bireal.binary_block.default, (px, pw, 33, 1, 1, 0.0, scale, bias, res))


def test_pack_signs_of_tiny_doubles_compares_in_double():
    """-1e-300 is negative (packs as -1) even though it rounds to -0.0 in float32."""
    x = torch.tensor([-1e-300, 1e-300, -0.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
    for path in PATHS:
        with ops.forced_cpu_path(path):
            assert torch.equal(ops.pack_signs(x), pack_signs_ref(x))
    assert int(pack_signs_ref(x)) == 0b1110


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16, None])
def test_bfloat16_output_matches_reference(residual_dtype):
    """out_dtype=bfloat16: the float32 epilogue rounded once; the block packs the rounded values."""
    x, w = torch.randn(2, 100, 9, 8), torch.randn(70, 100, 3, 3)
    args = (pack_signs_ref(x), pack_weight_ref(w), 100, 1, 1, 0.0)
    residual = None if residual_dtype is None else torch.randn(2, 70, 9, 8).to(residual_dtype)
    epilogue = (torch.rand(70) + 0.5, torch.randn(70), residual)
    out, packed = ops.binary_block(*args, *epilogue, out_dtype=torch.bfloat16)
    ref_out, ref_packed = binary_block_ref(*args, *epilogue, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref_out) and torch.equal(packed, ref_packed)
    assert torch.equal(ref_out, binary_conv2d_ref(*args, *epilogue).to(torch.bfloat16))
    out32, packed32 = ops.binary_block(*args, *epilogue)  # float32 out, any residual dtype
    ref32, ref_packed32 = binary_block_ref(*args, *epilogue)
    assert out32.dtype == torch.float32 and torch.equal(out32, ref32) and torch.equal(packed32, ref_packed32)
    torch.library.opcheck(torch.ops.bireal.binary_block.default, (*args, *epilogue, torch.bfloat16))
    with pytest.raises(RuntimeError, match="out_dtype must be torch.float32 or torch.bfloat16"):
        ops.binary_conv2d(*args, out_dtype=torch.float16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel,padding", [(3, 2), (5, 2), (1, 2), ((1, 3), 1), ((3, 1), 1), ((3, 5), 2)])
@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
def test_wide_padding_and_non_square_kernels(path, kernel, padding, pad_value):
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x, w = torch.randn(2, 70, 7, 10), torch.randn(33, 70, kh, kw)
    args = (pack_signs_ref(x), pack_weight_ref(w), 70, 1, padding, pad_value)
    scale, bias = torch.randn(33), torch.randn(33)
    with ops.forced_cpu_path(path), ops.debug_fill():
        out, packed = ops.binary_block(*args, scale, bias)
    ref_out, ref_packed = binary_block_ref(*args, scale, bias)
    assert torch.equal(out, ref_out) and torch.equal(packed, ref_packed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels,kernel", [(512, 3), (130, 5), (64, 7)])
def test_the_largest_counts_are_exact_on_every_path(path, channels, kernel):
    """Every bit differing (x all +1, w all -1 but one channel): each tap word counts 64, the most
    it can. The AVX2 path sums its counts in bytes (at most 8 per word) and must move them to
    int64 before 256: 72, 75 and 49 (tap, word) steps here, past its 31-step flush."""
    x = torch.ones(2, channels, 6, 5)
    w = -torch.ones(48, channels, kernel, kernel)
    w[5] = 1.0  # the other extreme: no bit differs
    w[7, :, 0, 0] *= -1  # one tap agrees
    args = (pack_signs_ref(x), pack_weight_ref(w), channels, 1, kernel // 2, 0.0)
    scale, bias, residual = torch.rand(48) + 0.5, torch.randn(48), torch.randn(2, 48, 6, 5)
    with ops.forced_cpu_path(path), ops.debug_fill():
        out, packed = ops.binary_block(*args, scale, bias, residual)
        conv = ops.binary_conv2d(*args)
    ref_out, ref_packed = binary_block_ref(*args, scale, bias, residual)
    assert torch.equal(out, ref_out) and torch.equal(packed, ref_packed)
    assert torch.equal(conv, binary_conv2d_ref(*args))


@pytest.mark.parametrize("out_channels", [0, 1, 63, 65, 129])
def test_odd_and_zero_output_channels(out_channels):
    x, w = torch.randn(2, 100, 6, 5), torch.randn(out_channels, 100, 3, 3)
    args = (pack_signs_ref(x), pack_weight_ref(w), 100, 1, 1, 0.0)
    with ops.debug_fill():
        out, packed = ops.binary_block(*args)
    assert out.shape == (2, out_channels, 6, 5) and packed.shape == (2, 6, 5, (out_channels + 63) // 64)
    if out_channels:  # (F.conv2d, under the reference, rejects an empty weight)
        ref_out, ref_packed = binary_block_ref(*args)
        assert torch.equal(out, ref_out) and torch.equal(packed, ref_packed)


def test_non_contiguous_packed_operands():
    x, w = torch.randn(2, 130, 12, 11), torch.randn(40, 130, 3, 3)
    px, pw = pack_signs_ref(x)[:, 1:-1, ::2], pack_weight_ref(w).transpose(1, 2).contiguous().transpose(1, 2)
    assert not px.is_contiguous() and not pw.is_contiguous()
    assert torch.equal(
        ops.binary_conv2d(px, pw, 130), binary_conv2d_ref(px.contiguous(), pw.contiguous(), 130, 1, 1, 0.0)
    )


def test_streamed_output_matches_reference():
    """Large outputs are written with non-temporal stores (AVX-512 and AVX2 paths, BIREAL_STREAM_BYTES
    and up); a fresh process with the threshold at 1 byte checks that on small shapes, every path."""
    import os
    import subprocess
    import sys

    script = """
import torch
from cuda_ext import ops
from cuda_ext.reference import binary_block_ref, pack_signs_ref, pack_weight_ref
for path in ops.cpu_paths():
    for c, o, pad_value in ((64, 64, 0.0), (100, 48, 1.0), (130, 70, -1.0)):
        x, w = torch.randn(2, c, 9, 11), torch.randn(o, c, 3, 3)
        args = (pack_signs_ref(x), pack_weight_ref(w), c, 1, 1, pad_value)
        extra = (torch.randn(o), torch.randn(o), torch.randn(2, o, 9, 11))
        with ops.forced_cpu_path(path), ops.debug_fill():
            out, packed = ops.binary_block(*args, *extra)
            conv = ops.binary_conv2d(*args, *extra)
        ref_out, ref_packed = binary_block_ref(*args, *extra)
        assert torch.equal(out, ref_out) and torch.equal(packed, ref_packed), (path, c, o, pad_value)
        assert torch.equal(conv, ref_out), (path, c, o, pad_value)
print("ok", *ops.cpu_paths())
"""
    env = {**os.environ, "BIREAL_STREAM_BYTES": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


POOL_CASES = [  # (batch, channels, height, width, kernel_size, stride, padding)
    (2, 64, 20, 18, 3, 2, 1),  # the ImageNet stem's pool, one packed word
    (1, 3, 7, 9, 3, 2, 1),
    (2, 100, 13, 11, 3, 2, 1),  # two words, the second with a tail
    (1, 130, 8, 8, 2, 2, 0),
    (1, 64, 5, 5, 3, 1, 1),
    (2, 17, 6, 7, 1, 1, 0),
    (1, 200, 9, 10, 5, 3, 2),
]


def pool_input(case: tuple, dtype: torch.dtype, with_bias: bool, seed: int = 0):
    """x (N, C, H, W) with a NaN, and a bias (C,) or None; channel 0 of the last image is where x +
    bias is exactly 0 (x = -bias there; 0 without a bias), whose sign must be +1."""
    n, c, h, w, *_ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    x[0, c // 2, 1, 1] = float("nan")
    bias = (torch.randn(c, generator=g) * 0.5).to(dtype) if with_bias else None
    x[-1, 0] = 0.0 if bias is None else -bias[0]
    return x, bias


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_max_pool_signs_is_max_pool_then_pack(path, dtype, case, with_bias):
    """Bit for bit max_pool2d(x + bias) and pack_signs of its output (the kernel adds the bias after
    the max, once per output), every element written (debug fill), NaN propagated as torch does,
    from NCHW or channels_last inputs."""
    from cuda_ext.reference import max_pool_signs_ref

    _, _, _, _, k, s, p = case
    x, bias = pool_input(case, dtype, with_bias)
    for layout in (torch.contiguous_format, torch.channels_last):
        with ops.forced_cpu_path(path), ops.debug_fill():
            out, packed = ops.max_pool_signs(x.contiguous(memory_format=layout), k, s, p, bias)
        ref_out, ref_packed = max_pool_signs_ref(x, k, s, p, bias)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out.isnan(), ref_out.isnan()) and out.isnan().any()
        assert torch.equal(out.nan_to_num(7.0), ref_out.nan_to_num(7.0))
        assert torch.equal(packed, ref_packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", POOL_CASES)
def test_the_two_op_route_of_max_pool_signs_is_bit_for_bit_the_same(dtype, case):
    """max_pool_then_pack (what ops.max_pool_signs runs on a GPU whose max_pool_signs kernel lost
    the CUDA context: the bias after torch's max-pool, then pack_signs) equals the reference, the
    bias added before the max, bit for bit: NaN where it is, the packed signs, channels_last out."""
    from cuda_ext.reference import max_pool_signs_ref

    _, _, _, _, k, s, p = case
    x, bias = pool_input(case, dtype, True)
    out, packed = ops.max_pool_then_pack(x, k, s, p, bias)
    ref_out, ref_packed = max_pool_signs_ref(x, k, s, p, bias)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.isnan(), ref_out.isnan()) and out.isnan().any()
    assert torch.equal(out.nan_to_num(7.0), ref_out.nan_to_num(7.0)) and torch.equal(packed, ref_packed)


def test_max_pool_signs_opcheck_and_bad_arguments():
    x = torch.randn(2, 70, 9, 8)
    torch.library.opcheck(torch.ops.bireal.max_pool_signs.default, (x, 3, 2, 1))
    torch.library.opcheck(torch.ops.bireal.max_pool_signs.default, (x, 3, 2, 1, torch.randn(70)))
    with pytest.raises(RuntimeError, match=r"bias must have shape \(70,\)"):
        ops.max_pool_signs(x, 3, 2, 1, torch.randn(64))
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        ops.max_pool_signs(x, 3, 2, 1, torch.randn(70, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="padding <= kernel_size / 2"):
        ops.max_pool_signs(x, 3, 2, 2)
    with pytest.raises(RuntimeError, match="empty output"):
        ops.max_pool_signs(torch.randn(1, 8, 2, 2), 5, 1, 0)
    with pytest.raises(RuntimeError, match="floating point"):
        ops.max_pool_signs(torch.ones(1, 8, 4, 4, dtype=torch.int32))


def test_gpu_floors_are_the_reviews_arithmetic():
    """The kernel table's floors (cuda_ext.benchmarks.gpu_floors) at batch 256 on an H200's measured
    4.235 TB/s copy rate: 64x56 moves 109 MB as a conv and 218 MB as a block (25.8 and 51.6 us) and
    its padded MMAs take 7.7 us; 512x7 is closer to balance (the MMA time is 5.8 us)."""
    from cuda_ext.benchmarks import BMMA_MACS_PER_S, gpu_floors

    f = gpu_floors(64, 56, 256, copy_gb_s=4235.0)
    assert f["conv_bytes"] == 256 * 56 * 56 * 8 + 64 * 9 * 8 + 256 * 56 * 56 * 64 * 2
    assert round(f["conv_bytes"] / 1e6) == 109 and round(f["block_bytes"] / 1e6) == 218
    assert f["mma_ms"] == pytest.approx(256 * 56 * 56 * 64 * 768 / BMMA_MACS_PER_S * 1e3)  # 9 words -> 12
    assert f["conv_floor_ms"] * 1e3 == pytest.approx(25.8, abs=0.05)
    assert f["block_floor_ms"] * 1e3 == pytest.approx(51.6, abs=0.1)
    deep = gpu_floors(512, 7, 256, copy_gb_s=4235.0)
    assert deep["mma_ms"] * 1e3 == pytest.approx(256 * 49 * 512 * 18 * 256 / BMMA_MACS_PER_S * 1e6, rel=1e-9)
    assert deep["conv_floor_ms"] == max(deep["mma_ms"], deep["conv_bytes"] / 4235e6)
    strided = gpu_floors(64, 56, 256, copy_gb_s=4235.0, stride=2)
    assert strided["mma_ms"] == pytest.approx(f["mma_ms"] / 4)  # 28x28 outputs
    from cuda_ext.benchmarks import of_floor

    row = {"bf16_ms": 0.05, "async_bf16_ms": 0.04, "baseline_ms": 0.127, "block_bf16_ms": 0.1, "float_block_ms": 0.4}
    ratios = of_floor(row, f)
    assert ratios["conv_of_floor"] == pytest.approx(f["conv_floor_ms"] / 0.04)  # the faster variant
    assert ratios["floor_x_cudnn"] == pytest.approx(0.127 / f["conv_floor_ms"])  # about 4.9x, the ceiling
    assert ratios["block_of_floor"] == pytest.approx(f["block_floor_ms"] / 0.1)


def test_programmatic_launch_is_a_switch_restored_on_exit():
    """ops.programmatic_launch (the lean and halo CUDA kernels' programmatic dependent launch) is
    off by default, on inside, restored on exit, also after an error."""
    assert not ops._C.programmatic_launch()
    with ops.programmatic_launch():
        assert ops._C.programmatic_launch()
        with ops.programmatic_launch(False):
            assert not ops._C.programmatic_launch()
        assert ops._C.programmatic_launch()
    assert not ops._C.programmatic_launch()
    with pytest.raises(ValueError):
        with ops.programmatic_launch():
            raise ValueError
    assert not ops._C.programmatic_launch()
