"""The CUDA kernels against the pure-torch reference, bit for bit, on a GPU (bench/gpu_check.sh runs
this file on the GPU machine; without a GPU every test here is skipped, and test_cuda_build.py
checks the build itself).

Every output is checked for exact equality with the reference, on fresh random inputs, with the
caching allocator's free memory poisoned first, so an element the kernel never wrote shows up."""
import itertools

import pytest
import torch

from cuda_ext import ops
from cuda_ext.reference import (binary_block_ref, binary_conv2d_ref, pack_signs_ref, pack_weight_ref)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ops.cuda_built()),
                                reason="needs a CUDA GPU and the CUDA build of cuda_ext")
PATHS = ["bmma", "simt"]
CASES = list(itertools.product([3, 31, 64, 100, 130, 256], [1, 2], [1, 3], [0.0, 1.0, -1.0]))


def poison_free_memory():
    """Fill the allocator's cached blocks with NaN (and the int64 pattern 0xFFF8...), so the next
    op's outputs start from garbage rather than from whatever a previous test left there."""
    free = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    if free > 0:
        torch.full((free // 4,), float("nan"), device="cuda")


def cuda_case(batch, channels, out_channels, side_h, side_w, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, side_h, side_w, generator=g)
    w = torch.randn(out_channels, channels, kernel, kernel, generator=g)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [1, 31, 64, 65, 100, 130, 512])
def test_pack_signs_cuda(dtype, channels):
    x = torch.randn(3, channels, 5, 7).to(dtype)
    x[0, :, 0, 0] = 0.0
    x[1, :, 1, 1] = -0.0
    if dtype == torch.float64:
        x[2, :, 2, 2] = -1e-300
    poison_free_memory()
    for layout in (torch.contiguous_format, torch.channels_last):
        out = ops.pack_signs(x.cuda().contiguous(memory_format=layout))
        assert out.is_cuda and torch.equal(out.cpu(), pack_signs_ref(x))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels,stride,kernel,pad_value", CASES)
def test_binary_conv2d_cuda(path, channels, stride, kernel, pad_value):
    x, w = cuda_case(3, channels, 70, 11, 9, kernel, seed=channels * 7 + stride + kernel)
    px, pw = pack_signs_ref(x), pack_weight_ref(w)
    args = (px, pw, channels, stride, kernel // 2, pad_value)
    scale, bias = torch.randn(70), torch.randn(70)
    ref_plain = binary_conv2d_ref(*args)
    residual = torch.randn_like(ref_plain)
    ref_fused = binary_conv2d_ref(*args, scale, bias, residual)
    cuda_args = (px.cuda(), pw.cuda(), channels, stride, kernel // 2, pad_value)
    with ops.forced_cuda_path(path):
        poison_free_memory()
        plain = ops.binary_conv2d(*cuda_args)
        fused = ops.binary_conv2d(*cuda_args, scale.cuda(), bias.cuda(), residual.cuda())
        out, packed = ops.binary_block(*cuda_args, scale.cuda(), bias.cuda(), residual.cuda())
    torch.cuda.synchronize()
    assert torch.equal(plain.cpu(), ref_plain)
    assert torch.equal(fused.cpu(), ref_fused)
    assert plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.cpu(), ref_fused) and torch.equal(packed.cpu(), pack_signs_ref(ref_fused))


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
    scale, bias = torch.randn(out_channels), torch.randn(out_channels)
    ref_out, ref_packed = binary_block_ref(*args, scale, bias)
    with ops.forced_cuda_path(path):
        poison_free_memory()
        out, packed = ops.binary_block(*(a.cuda() if torch.is_tensor(a) else a for a in args),
                                       scale.cuda(), bias.cuda())
    assert torch.equal(out.cpu(), ref_out), (channels, out_channels, h, w, kernel, stride, pad_value)
    assert torch.equal(packed.cpu(), ref_packed)


@pytest.mark.parametrize("channels,side", [(64, 56), (128, 28), (256, 14), (512, 7)])
def test_bireal18_shapes_tensor_cores_equal_cuda_cores(channels, side):
    """Bi-Real-18's layer shapes at batch 8: the two CUDA paths agree exactly; a subset of images is
    also checked against the reference."""
    x, w = cuda_case(8, channels, channels, side, side, 3, seed=channels)
    px, pw = ops.pack_signs(x.cuda()), ops.pack_signs(w.cuda())
    scale, bias = torch.rand(channels, device="cuda") + 0.5, torch.randn(channels, device="cuda")
    residual = torch.randn(8, channels, side, side, device="cuda")
    args = (px, pw, channels, 1, 1, 0.0, scale, bias, residual)
    with ops.forced_cuda_path("bmma"):
        fast = ops.binary_block(*args)
    with ops.forced_cuda_path("simt"):
        slow = ops.binary_block(*args)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    ref = binary_conv2d_ref(px[:2].cpu(), pw.cpu(), channels, 1, 1, 0.0, scale.cpu(), bias.cpu(),
                            residual[:2].cpu())
    assert torch.equal(fast[0][:2].cpu(), ref)


def test_opcheck_cuda():
    x = torch.randn(2, 33, 6, 5, device="cuda")
    px, pw = ops.pack_signs(x), ops.pack_signs(torch.randn(7, 33, 3, 3, device="cuda"))
    scale, bias, res = (torch.randn(7, device="cuda"), torch.randn(7, device="cuda"),
                        torch.randn(2, 7, 6, 5, device="cuda"))
    torch.library.opcheck(torch.ops.bireal.pack_signs.default, (x,))
    torch.library.opcheck(torch.ops.bireal.binary_conv2d.default, (px, pw, 33, 1, 1, 0.0, scale, bias, res))
    torch.library.opcheck(torch.ops.bireal.binary_block.default, (px, pw, 33, 1, 1, 1.0, scale, bias, res))


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
        ops.binary_conv2d(px, pw, 64)                    # weights left on the CPU
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


@pytest.mark.parametrize("name,kwargs,side", [("bireal18", {}, 224),
                                              ("bireal34", {"pad_value": -1.0}, 224),
                                              ("bireal50", {"num_classes": 10, "stem": "small", "width": 0.5}, 32)])
def test_packed_model_on_cuda_equals_reference_ops(monkeypatch, name, kwargs, side):
    """PackedBiReal on the GPU through the CUDA ops gives the same logits as the same folded model
    through the reference ops on the GPU (same float stem, shortcuts and head). ImageNet stem, 224
    crops and the 1000-way head for the basic-block nets."""
    from cuda_ext.packed import reference_ops

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    packed = _randomized_packed(name, **kwargs)
    x = torch.randn(4, 3, side, side, device="cuda")
    with torch.inference_mode():
        ours = packed(x)
        with reference_ops():
            ref = packed(x)
    assert torch.equal(ours, ref)


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
