"""The CUDA kernels are compiled and loadable wherever a CUDA torch and nvcc are present, GPU or not:
compile errors and wrong targets surface here, before any GPU time (the GPU checks: test_cuda.py)."""

import itertools
import os
import shutil
import subprocess

import pytest
import torch

from bench.sass_report import kernels_in, sass_of
from cuda_ext import ops
from cuda_ext.build_config import cuda_build_plan, fatbin_archs, find_cuobjdump

CUDA_HOME, NO_CUDA_BUILD_BECAUSE = cuda_build_plan()  # what setup.py decided from the same facts
needs_cuda_build = pytest.mark.skipif(CUDA_HOME is None, reason=f"no CUDA build here: {NO_CUDA_BUILD_BECAUSE}")


def extension_file() -> str:
    from cuda_ext import _C

    return _C.__file__


def cuobjdump() -> str | None:
    return find_cuobjdump(CUDA_HOME)


@needs_cuda_build
def test_cuda_kernels_built_and_registered():
    assert ops.cuda_built(), "a CUDA build was possible here but cuda_ext._C has no CUDA kernels"
    for op in ("pack_signs", "binary_conv2d", "binary_block"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bireal::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bireal::{op}", "CPU"), op
    assert ops.cuda_paths() == [
        "bmma", "simt", "bmma_async", "bmma_lean", "bmma_lean1", "bmma_split", "bmma_halo", "bmma_halo_w",
        "bmma_halo_p"
    ]  # fmt: skip


@needs_cuda_build
def test_machine_code_for_sm80_and_sm90a_with_native_bmma():
    """Both targets are in the binary, and the tensor-core kernel compiled to the native 1-bit MMA
    (BMMA ... AND.POPC) with nothing spilled to local memory."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to read the fat binary")
    so = extension_file()
    built = fatbin_archs(tool, so)
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    for arch in wanted.replace(" ", ";").split(";"):
        sm = "sm_" + arch.replace(".", "").replace("+PTX", "")
        assert sm in built, f"{sm} missing from {so}: it has {built}"
    for sm in ("sm_80", "sm_90a"):
        if sm not in built:
            continue
        sass = subprocess.run(
            [tool, "--dump-sass", "--gpu-architecture", sm, so], capture_output=True, text=True, check=True
        ).stdout
        tensor_core = [(name, k) for name, _, k in kernels_in(sass) if "bmma" in name]
        # bmma, bmma_async, and 8 instantiations each of bmma_lean, bmma_lean1, bmma_split, bmma_halo,
        # bmma_halo_w and bmma_halo_p; bmma_split's clusters need sm_90, and its sm_80 code is a trap alone
        assert len(tensor_core) == 2 + 8 * 6, [name for name, _ in tensor_core]
        if sm == "sm_80":
            for name, kernel in tensor_core:
                if "_split" in name:
                    assert "BPT.TRAP" in kernel and "BMMA" not in kernel and "LDG" not in kernel, name
            tensor_core = [(name, k) for name, k in tensor_core if "_split" not in name]
        for name, kernel in tensor_core:
            one_mma = "bmma_halo" in name or "bmma_lean1" in name  # one MMA per tile and k-step, not two
            per_step = 16 if one_mma else 32
            assert kernel.count("BMMA.168256.AND.POPC") == per_step, f"{sm} {name}: expected {per_step} BMMAs"
            assert "XOR.POPC" not in kernel
            assert "LDL" not in kernel and "STL" not in kernel, f"{sm} {name}: registers spilled to local memory"
        async_kernel = sass_of(sass, "binary_conv2d_bmma_async_kernel")
        assert "LDGSTS" in async_kernel, f"{sm}: the async kernel's copies are not cp.async (LDGSTS)"
        # programmatic dependent launch (sm_90+): the lean and halo kernels wait for the kernel before
        # them first thing (ACQBULK: griddepcontrol.wait) and let the next launch after their main
        # loop (PREEXIT: griddepcontrol.launch_dependents); bmma and bmma_async do neither
        for name, kernel in tensor_core:
            pdl = sm == "sm_90a" and ("_lean" in name or "_halo" in name or "_split" in name)
            assert ("ACQBULK" in kernel) == pdl and ("PREEXIT" in kernel) == pdl, f"{sm} {name}"
            if pdl:
                first = kernel.index("ACQBULK")
                assert all(kernel.index(op) > first for op in ("LDG", "STG") if op in kernel), f"{sm} {name}"


def test_paths_that_lost_the_context_are_left_out(monkeypatch):
    """BIREAL_SKIP_CUDA_PATHS (set by the GPU scripts after a path's kernel lost the CUDA context)
    takes those paths out of the CUDA paths every benchmark, smoke and test iterates; never a CPU path."""
    monkeypatch.setenv("BIREAL_SKIP_CUDA_PATHS", "bmma_halo_p,,bmma_split")
    assert ops.skipped_cuda_paths() == {"bmma_halo_p", "bmma_split"}
    assert ops.kernel_paths("cuda") == [p for p in ops.cuda_paths() if p not in ("bmma_halo_p", "bmma_split")]
    assert ops.kernel_paths("cpu") == ops.cpu_paths()
    monkeypatch.delenv("BIREAL_SKIP_CUDA_PATHS")
    assert ops.skipped_cuda_paths() == set() and ops.kernel_paths("cuda") == ops.cuda_paths()


def test_cuda_helpers_without_a_gpu():
    """Path switching works (and rejects unknown names) on any build; so does bmma_halo_p's cap on
    its grid (scoped, 0 = as many blocks as fit, a negative count refused naming it)."""
    from cuda_ext import _C

    with ops.forced_cuda_path("simt"):
        assert _C.cuda_path() == "simt"
    assert ops.cuda_paths()[0] == "bmma"
    with ops.persistent_blocks(3):
        assert _C.persistent_blocks() == 3
    assert _C.persistent_blocks() == 0
    with pytest.raises(RuntimeError, match="blocks must be >= 0 .*got -1"):
        _C.set_persistent_blocks(-1)


def test_split_k_plan_covers_every_k_step_once():
    """bmma_split's plan (ops.split_k_plan, the host code that sizes its clusters): Bi-Real-18's
    batch-1 layers on an H100's 132 SMs split 3 to 6 ways; for any grid, the splits' k-steps
    [z * per, min((z + 1) * per, steps)) cover every k-step once, none is empty, at most 8 blocks
    (the portable cluster) and about one block per multiprocessor, the longest split as short as
    that allows; where the tiles fill the device (batch 256) nothing is split."""
    # (tiles of 128 pixels x 64 channels, k-steps of 256 bits) of the 3 x 3 convs at batch 1:
    # 64 x 56 (25, 3), 128 x 28 (14, 5), 256 x 14 (8, 9), 512 x 7 (8, 18)
    assert ops.split_k_plan(25, 3, 132) == (3, 1)
    assert ops.split_k_plan(14, 5, 132) == (5, 1)
    assert ops.split_k_plan(8, 9, 132) == (5, 2)
    assert ops.split_k_plan(8, 18, 132) == (6, 3)
    assert ops.split_k_plan(256 * 25, 3, 132) == (1, 3)  # batch 256
    for blocks, steps, sms in itertools.product([1, 2, 7, 8, 25, 66, 67, 132, 500], [1, 2, 3, 5, 9, 17, 18, 72],
                                                [1, 108, 132]):  # fmt: skip
        splits, per = ops.split_k_plan(blocks, steps, sms)
        covered = [s for z in range(splits) for s in range(z * per, min((z + 1) * per, steps))]
        assert covered == list(range(steps)), (blocks, steps, sms)
        assert all(z * per < steps for z in range(splits)), (blocks, steps, sms)  # none empty
        wanted = max(1, min(8, steps, sms // blocks))
        assert 1 <= splits <= wanted and per == -(-steps // wanted), (blocks, steps, sms)
    with pytest.raises(RuntimeError, match="blocks, steps and sms must be positive"):
        ops.split_k_plan(0, 3, 132)


def test_debug_fill_switch():
    """The switch is scoped, and outputs computed under it are still exact (every element written)."""
    from cuda_ext import _C
    from cuda_ext.reference import binary_block_ref, pack_signs_ref

    x, w = torch.randn(2, 70, 5, 6), torch.randn(9, 70, 3, 3)
    assert not _C.debug_fill()
    with ops.debug_fill():
        assert _C.debug_fill()
        px, pw = ops.pack_signs(x), ops.pack_signs(w)
        out, packed = ops.binary_block(px, pw, 70, 1, 1, 0.0)
    assert not _C.debug_fill()
    ref_out, ref_packed = binary_block_ref(pack_signs_ref(x), pack_signs_ref(w), 70, 1, 1, 0.0)
    assert torch.equal(out, ref_out) and torch.equal(packed, ref_packed)
    with pytest.raises(RuntimeError, match="unknown path 'wgmma2'"):
        with ops.forced_cuda_path("wgmma2"):
            pass


def _popcount(words: torch.Tensor) -> torch.Tensor:
    """Bit count of each int64 word (bits as 64 lanes)."""
    shifts = torch.arange(64, dtype=torch.int64)
    return ((words.unsqueeze(-1) >> shifts) & 1).sum(-1)


def valid_words_and_padded(px, channels, padding, pad_value):
    """(the valid bits of each of a pixel's Cw words (Cw,), the packed input (N, H, W, Cw) padded by
    ``padding`` pixels of the fill word: all valid bits for pad value +1, else 0)."""
    n, h, w, cw = px.shape
    tail = (1 << (channels - 64 * (cw - 1))) - 1 if channels % 64 else -1
    valid = torch.tensor([-1] * (cw - 1) + [tail if tail < 2**63 else tail - 2**64], dtype=torch.int64)
    fill = valid if pad_value == 1.0 else torch.zeros_like(valid)
    padded = fill.repeat(n, h + 2 * padding, w + 2 * padding, 1)
    padded[:, padding : padding + h, padding : padding + w] = px
    return valid, padded


def and_popc_conv_model(px, pw, channels, stride, padding, pad_value, one_mma=False):
    """The tensor-core kernels' arithmetic, word for word, in torch: border taps read the fill word,
    agreements = popc(a & b) + popc(~a & nb) with b and nb masked to the valid channels, dot =
    2 * agree - K (bmma, bmma_lean); or with ``one_mma`` (bmma_halo) both = popc(a & b) and the +1
    counts P_a = popc(a & valid) per pixel and P_b = popc(b) per filter, dot = 4 * both - 2 * P_a -
    2 * P_b + K; plus S[tap][o] for taps outside the image under zero padding."""
    n, h, w, cw = px.shape
    o, kh, kw, _ = pw.shape
    valid, padded = valid_words_and_padded(px, channels, padding, pad_value)
    inside = torch.zeros(n, h + 2 * padding, w + 2 * padding, dtype=torch.bool)
    inside[:, padding : padding + h, padding : padding + w] = True
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    b, nb = pw & valid, ~pw & valid  # (O, KH, KW, Cw)
    agree = torch.zeros(n, ho, wo, o, dtype=torch.int64)
    both, plus_a = torch.zeros(n, ho, wo, o, dtype=torch.int64), torch.zeros(n, ho, wo, 1, dtype=torch.int64)
    corr = torch.zeros(n, ho, wo, o, dtype=torch.int64)
    taps_sum = 2 * _popcount(b).sum(-1) - channels  # S: (O, KH, KW)
    for i in range(kh):
        for j in range(kw):
            a = padded[:, i : i + stride * ho : stride, j : j + stride * wo : stride]  # (N, Ho, Wo, Cw)
            agree += _popcount(a.unsqueeze(3) & b[:, i, j]).sum(-1) + _popcount(~a.unsqueeze(3) & nb[:, i, j]).sum(-1)
            both += _popcount(a.unsqueeze(3) & b[:, i, j]).sum(-1)
            plus_a += _popcount(a & valid).sum(-1, keepdim=True)
            if pad_value == 0.0:
                outside = ~inside[:, i : i + stride * ho : stride, j : j + stride * wo : stride]
                corr += outside.unsqueeze(-1) * taps_sum[:, i, j]
    K = kh * kw * channels
    if one_mma:
        dot = 4 * both - 2 * plus_a - 2 * _popcount(b).sum((1, 2, 3)) + K + corr
    else:
        dot = 2 * agree - K + corr
    return dot.permute(0, 3, 1, 2).double()


@pytest.mark.parametrize(
    "channels,stride,kernel,pad_value",
    [(3, 1, 3, 0.0), (33, 2, 3, 1.0), (64, 1, 3, -1.0), (100, 2, 1, 0.0), (130, 1, 3, 0.0)],
)
@pytest.mark.parametrize("one_mma", [False, True])
def test_tensor_core_arithmetic_matches_reference(channels, stride, kernel, pad_value, one_mma):
    """The AND-popc identities (two MMAs per k-step: bmma, bmma_lean; one with +1 counts:
    bmma_halo), fill words and border corrections of the CUDA kernels give the reference's dot
    products exactly, here on the CPU (tail bits of inputs and weights deliberately set to garbage)."""
    from cuda_ext.reference import binary_conv2d_ref, pack_signs_ref, pack_weight_ref

    x, w = torch.randn(2, channels, 7, 6), torch.randn(9, channels, kernel, kernel)
    px, pw = pack_signs_ref(x), pack_weight_ref(w)
    px_dirty, pw_dirty = px.clone(), pw.clone()
    if channels % 64:  # garbage past C
        px_dirty[..., -1] |= torch.tensor(-1 << (channels % 64), dtype=torch.int64)
        pw_dirty[..., -1] |= torch.tensor(-1 << (channels % 64), dtype=torch.int64)
    expected = binary_conv2d_ref(px, pw, channels, stride, kernel // 2, pad_value).double()
    got = and_popc_conv_model(px_dirty, pw_dirty, channels, stride, kernel // 2, pad_value, one_mma)
    assert torch.equal(got, expected)


def border_class_conv_model(px, pw, channels, stride, padding):
    """bmma_lean's zero padding, word for word in torch: the dot products with every border tap read
    as the fill word 0 (all -1), plus the table entry of the pixel's border class (a, b, c, d): the
    tap rows above and below the image and the tap columns left and right of it, each at most
    ``padding``; the entry sums S[tap][o] over the taps with kh < a, kh >= KH - b, kw < c or kw >= KW - d."""
    n, h, w, _ = px.shape
    o, kh, kw, _ = pw.shape
    cw = pw.shape[-1]
    tail = (1 << (channels - 64 * (cw - 1))) - 1 if channels % 64 else -1
    valid = torch.tensor([-1] * (cw - 1) + [tail if tail < 2**63 else tail - 2**64], dtype=torch.int64)
    taps_sum = 2 * _popcount(pw & valid).sum(-1) - channels  # S: (O, KH, KW)
    P = padding + 1
    table = torch.zeros(P, P, P, P, o, dtype=torch.int64)
    for a, b, c, d in itertools.product(range(P), repeat=4):
        outside = torch.zeros(kh, kw, dtype=torch.bool)
        outside[:a], outside[kh - b :], outside[:, :c], outside[:, kw - d :] = True, True, True, True  # [KH:] is empty
        table[a, b, c, d] = (taps_sum * outside).sum((1, 2))
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    assert torch.equal(ops.border_classes(pw, channels, padding), table.reshape(P**4, o).int())  # the one made once
    dot = and_popc_conv_model(px, pw, channels, stride, padding, -1.0)  # (N, O, Ho, Wo)
    for oh, ow in itertools.product(range(ho), range(wo)):
        ih0, iw0 = oh * stride - padding, ow * stride - padding
        a, b, c, d = max(0, -ih0), max(0, ih0 + kh - h), max(0, -iw0), max(0, iw0 + kw - w)
        assert max(a, b, c, d) <= padding  # so P^4 classes cover every pixel
        dot[:, :, oh, ow] += table[a, b, c, d].double()
    return dot


@pytest.mark.parametrize(
    "channels,stride,kernel,padding,side",
    [(3, 1, 3, 1, (7, 6)), (70, 2, 3, 1, (7, 6)), (64, 1, 5, 2, (6, 9)), (33, 3, 7, 3, (8, 5)), (130, 1, 3, 1, (2, 1)),
     (100, 1, 5, 2, (3, 2)), (65, 2, 3, 2, (4, 4))],
)  # fmt: skip
def test_the_lean_kernels_border_classes_match_the_reference(channels, stride, kernel, padding, side):
    """binary_conv_lean.cu's correction of zero padding from a table of border classes gives the
    reference's dot products, also on images smaller than the kernel (rows cut above and below);
    ``ops.border_classes`` (the table made once for a packed model) is that table."""
    from cuda_ext.reference import binary_conv2d_ref, pack_signs_ref, pack_weight_ref

    x, w = torch.randn(2, channels, *side), torch.randn(9, channels, kernel, kernel)
    px, pw = pack_signs_ref(x), pack_weight_ref(w)
    expected = binary_conv2d_ref(px, pw, channels, stride, padding, 0.0).double()
    assert torch.equal(border_class_conv_model(px, pw, channels, stride, padding), expected)


def split_k_conv_model(px, pw, channels, stride, padding, pad_value, sms):
    """bmma_split's decomposition, word for word in torch: the implicit im2col rows (k-word = tap *
    Cw + channel word, border taps as the fill word), two-MMA agreements per k-word, k-steps of 4
    words; the blocks of a tile (ops.split_k_plan for its grid of 128 x 64 tiles) sum k-steps
    [z * per, (z + 1) * per) clipped at the last, as warp_agreements_with's StepRange does; warp w
    of a tile is finished by block w % splits, which adds the other blocks' partial counts; dot =
    2 * agree - K. (N, O, Ho, Wo), and the plan."""
    n, h, w, cw = px.shape
    o, kh, kw, _ = pw.shape
    valid, padded = valid_words_and_padded(px, channels, padding, pad_value)
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    taps = [padded[:, i : i + stride * ho : stride, j : j + stride * wo : stride] for i in range(kh) for j in range(kw)]
    rows = torch.cat(taps, -1).reshape(n * ho * wo, kh * kw * cw)  # (M, K_words)
    k_words = rows.shape[1]
    mask = valid.repeat(kh * kw)
    cols = pw.reshape(o, k_words) & mask  # (O, K_words)
    steps = -(-k_words // 4)
    blocks = -(-rows.shape[0] // 128) * -(-o // 64)
    splits, per = ops.split_k_plan(blocks, steps, sms)
    partial = torch.zeros(splits, rows.shape[0], o, dtype=torch.int64)  # each block's counts, (M, O)
    for z in range(splits):
        for kword in range(4 * z * per, min(4 * (z + 1) * per, k_words)):
            a, b = rows[:, kword, None], cols[None, :, kword]
            partial[z] += _popcount(a & b) + _popcount(~a & ~b & mask[kword])
    agree = torch.empty(rows.shape[0], o, dtype=torch.int64)
    for row0 in range(0, rows.shape[0], 32):  # a warp's 32 rows, its tile's warp (row0 // 32) % 4
        finisher = (row0 // 32) % 4 % splits
        warp_rows = slice(row0, row0 + 32)
        agree[warp_rows] = partial[finisher, warp_rows]
        for other in range(splits):
            if other != finisher:
                agree[warp_rows] += partial[other, warp_rows]
    dot = 2 * agree - kh * kw * channels
    return dot.reshape(n, ho, wo, o).permute(0, 3, 1, 2).double(), (splits, per)


@pytest.mark.parametrize(
    "channels,stride,side,out_channels,sms,plan",
    [(64, 1, (12, 12), 72, 132, (3, 1)), (130, 1, (12, 12), 72, 132, (7, 1)), (200, 2, (9, 7), 64, 5, (5, 2)),
     (512, 1, (5, 4), 64, 132, (6, 3)), (33, 1, (20, 20), 8, 132, (3, 1)), (100, 1, (30, 30), 8, 4, (1, 5))],
)  # fmt: skip
@pytest.mark.parametrize("pad_value", [1.0, -1.0])
def test_bmma_splits_partial_counts_sum_to_the_convs(channels, stride, side, out_channels, sms, plan, pad_value):
    """bmma_split's k-step ranges and cluster reduction (split_k_conv_model) give the reference's
    dot products: splits that divide the k-steps and ones whose last split is shorter (9 k-steps in
    5 blocks), k-words not a multiple of 4 (9, 27), several tiles each way, and a grid that fills the
    device (no split). (Zero padding's correction is the lean epilogue's, checked above.)"""
    from cuda_ext.reference import binary_conv2d_ref, pack_signs_ref, pack_weight_ref

    x, w = torch.randn(1, channels, *side), torch.randn(out_channels, channels, 3, 3)
    px, pw = pack_signs_ref(x), pack_weight_ref(w)
    got, used = split_k_conv_model(px, pw, channels, stride, 1, pad_value, sms)
    assert used == plan
    assert torch.equal(got, binary_conv2d_ref(px, pw, channels, stride, 1, pad_value).double())


HALO_TILE = (8, 16)  # binary_conv_halo.cu: a block's output pixels, kTileRows x kTileCols


def halo_a_words(px, kernel, stride, padding, fill):
    """bmma_halo's A operands, index for index as binary_conv_halo.cu computes them: per image and
    8 x 16 tile of output pixels, the halo of (7 * stride + KH) x (15 * stride + KW) input pixels
    copied as the kernel copies it (flat word i -> row, pixel, word; the fill word outside the
    image), then word w of tap (kh, kw) of tile pixel (r, c) read at
    (r * stride * HC + c * stride) * Cw + (kh * HC + kw) * Cw + w. (N, Ho, Wo, KH, KW, Cw)."""
    n, h, w, cw = px.shape
    kh, kw = kernel
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    tile_rows, tile_cols = HALO_TILE
    hr, hc = (tile_rows - 1) * stride + kh, (tile_cols - 1) * stride + kw
    i = torch.arange(hr * hc * cw)
    row, rest = i // (hc * cw), i % (hc * cw)
    col, word = rest // cw, rest % cw
    taps_h, taps_w, words = torch.meshgrid(torch.arange(kh), torch.arange(kw), torch.arange(cw), indexing="ij")
    offset = (taps_h * hc + taps_w) * cw + words  # (KH, KW, Cw)
    out = torch.empty(n, ho, wo, kh, kw, cw, dtype=torch.int64)
    for image, th, tw in itertools.product(range(n), range(-(-ho // tile_rows)), range(-(-wo // tile_cols))):
        oh0, ow0 = th * tile_rows, tw * tile_cols
        ih, iw = oh0 * stride - padding + row, ow0 * stride - padding + col
        inside = (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
        halo = torch.where(inside, px[image, ih.clamp(0, h - 1), iw.clamp(0, w - 1), word], fill[word])
        for r, c in itertools.product(range(tile_rows), range(tile_cols)):
            if oh0 + r < ho and ow0 + c < wo:  # the kernel reads the halo for the others too, and stores nothing
                out[image, oh0 + r, ow0 + c] = halo[(r * stride * hc + c * stride) * cw + offset]
    return out


@pytest.mark.parametrize(
    "channels,stride,kernel,padding,side,pad_value",
    [(70, 1, (3, 3), 1, (19, 37), 0.0), (130, 2, (3, 3), 1, (17, 33), 1.0), (64, 3, (5, 5), 2, (30, 31), -1.0),
     (33, 1, (1, 1), 0, (9, 20), 0.0), (100, 2, (7, 7), 3, (13, 11), 1.0), (200, 1, (3, 5), 2, (8, 16), 0.0)],
)  # fmt: skip
def test_the_halo_kernels_input_words_are_the_convs(channels, stride, kernel, padding, side, pad_value):
    """binary_conv_halo.cu's halo and the addresses it reads its A operands at give every output
    pixel exactly the input words of its taps (border taps: the pad value's fill word), over tiles
    cut at the right and bottom edges, strides 1-3 and kernels 1x1 to 7x7: the index arithmetic of
    the kernel, checked without a GPU (tests/test_cuda.py checks its outputs on one)."""
    from cuda_ext.reference import pack_signs_ref

    x = torch.randn(2, channels, *side)
    px = pack_signs_ref(x)
    n, h, w, cw = px.shape
    tail = (1 << (channels - 64 * (cw - 1))) - 1 if channels % 64 else -1
    valid = torch.tensor([-1] * (cw - 1) + [tail if tail < 2**63 else tail - 2**64], dtype=torch.int64)
    fill = valid if pad_value == 1.0 else torch.zeros(cw, dtype=torch.int64)
    padded = fill.expand(n, h + 2 * padding, w + 2 * padding, cw).clone()
    padded[:, padding : padding + h, padding : padding + w] = px
    kh, kw = kernel
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    # (N, Ho, Wo, KH, KW, Cw): tap (a, b) of output pixel (oh, ow) is padded pixel (oh * stride + a, ow * stride + b)
    rows = [padded[:, a : a + (ho - 1) * stride + 1 : stride] for a in range(kh)]
    expected = torch.stack([torch.stack([r[:, :, b : b + (wo - 1) * stride + 1 : stride] for b in range(kw)], 3)
                            for r in rows], 3)  # fmt: skip
    assert torch.equal(halo_a_words(px, kernel, stride, padding, fill), expected)


def tile_copies(shape: tuple, oh0: int, ow0: int, col0: int, elem_bytes: int):
    """binary_conv_halo.cu's copies of a block's residuals into its staged tile (tile_copy): for each
    copy, (its first element in the tile, (oh, ow, col) of its first element or None outside the
    output, elements per copy)."""
    ho, wo, o = shape
    per_copy, stride = 16 // elem_bytes, 64 + (8 if elem_bytes == 2 else 4)  # staged_stride<Elem>
    for i in range(128 * 64 * elem_bytes // 16):  # copies_per_tile
        pixel, copy = divmod(i, 64 // per_copy)
        oh, ow, col = oh0 + pixel // 16, ow0 + pixel % 16, col0 + copy * per_copy
        yield pixel * stride + copy * per_copy, ((oh, ow, col) if oh < ho and ow < wo and col < o else None), per_copy


def staged_tile_model(residual: torch.Tensor, oh0: int, ow0: int, col0: int, elem_bytes: int):
    """bmma_halo's staged tile for one block (tile origin (oh0, ow0), channel group col0) of one
    image's residual (Ho, Wo, O), as its index arithmetic builds, reads, writes and copies it:
    the residual copied in (stage_residual); each thread's pairs read from it and, with bf16, its
    outputs (here: the residual + 0.5) written over them (store_lean with a StagedTile); then the
    tile copied out, a thread per (tile column, 16 bytes of channels) (store_staged_outputs).
    -> ({(oh, ow, o): residual read}, the output tensor written (NaN: never written; None without
    bf16), per warp instruction (warp, mt, h, nt) the 32 lanes' byte addresses in the tile)."""
    ho, wo, o = residual.shape
    stride = 64 + (8 if elem_bytes == 2 else 4)
    tile = torch.full((128 * stride,), float("nan"))
    for first, at, per_copy in tile_copies(residual.shape, oh0, ow0, col0, elem_bytes):
        tile[first : first + per_copy] = residual[at[0], at[1], at[2] : at[2] + per_copy] if at else 0.0
    reads, addresses = {}, {}
    for warp, mt, h, nt in itertools.product(range(4), range(2), range(2), range(8)):
        lanes = []
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            at = (32 * warp + g + mt * 16 + 8 * h) * stride + 2 * t + nt * 8  # StagedTile row + nt * 8
            lanes.append(at * elem_bytes)
            oh, ow = oh0 + 2 * warp + mt, ow0 + 8 * h + g  # the thread's output row (bmma_halo)
            for j in range(2):
                col = col0 + nt * 8 + 2 * t + j
                if oh < ho and ow < wo and col < o:
                    reads[(oh, ow, col)] = tile[at + j].item()
                    tile[at + j] = tile[at + j] + 0.5  # the output, where its residual was
        addresses[(warp, mt, h, nt)] = lanes
    if elem_bytes != 2:
        return reads, None, addresses
    out = torch.full(residual.shape, float("nan"))
    for thread in range(128):  # store_staged_outputs: thread (column, copy), row after row
        column, copy = divmod(thread, 8)
        ow, col = ow0 + column, col0 + copy * 8
        if ow >= wo or col >= o:
            continue
        for r in range(min(8, ho - oh0)):
            first = (r * 16 + column) * stride + copy * 8
            out[oh0 + r, ow, col : col + 8] = tile[first : first + 8]
    return reads, out, addresses


@pytest.mark.parametrize("elem_bytes", [2, 4], ids=["bf16", "float32"])
@pytest.mark.parametrize("origin", [(0, 0, 0), (8, 16, 64), (16, 32, 64)], ids=["first", "inner", "edge"])
def test_the_halo_kernels_staged_tile_is_each_outputs_own(elem_bytes, origin):
    """The staged tile of bmma_halo (tests/test_cuda.py checks the outputs on a GPU): every output
    pair of the block reads its own residual, and (bf16) its output reaches its own place in the
    output tensor and nothing outside the block's outputs is written, over tiles cut by the image's
    bottom and right edges and a channel group past O; the copies are 16-byte aligned; and with bf16
    a warp's reads of one (mt, h, nt) hit 32 different banks (pixel rows 144 bytes apart: 4 banks)."""
    ho, wo, o = 20, 40, 72  # the "edge" tile: 4 of its 8 rows and 8 of its 16 columns; 8 of 64 channels
    residual = torch.arange(ho * wo * o, dtype=torch.float32).reshape(ho, wo, o)
    oh0, ow0, col0 = origin
    reads, out, addresses = staged_tile_model(residual, oh0, ow0, col0, elem_bytes)
    block = (slice(oh0, oh0 + 8), slice(ow0, ow0 + 16), slice(col0, col0 + 64))
    expected = {
        (oh, ow, c): residual[oh, ow, c].item()
        for oh in range(oh0, min(oh0 + 8, ho))
        for ow in range(ow0, min(ow0 + 16, wo))
        for c in range(col0, min(col0 + 64, o))
    }
    assert reads == expected and len(reads) > 0
    stride_bytes = (64 + (8 if elem_bytes == 2 else 4)) * elem_bytes
    assert stride_bytes % 16 == 0  # every copy's destination is 16-byte aligned
    if elem_bytes == 2:
        assert torch.equal(out[block], residual[block] + 0.5)
        written = ~out.isnan()
        written[block] = False
        assert not written.any()  # nothing outside the block's outputs
        for lanes in addresses.values():
            assert len({a // 4 % 32 for a in lanes}) == 32  # 4-byte pairs in 32 distinct banks


def weight_stride(k_words: int) -> int:
    """binary_conv_halo.cu's weight_stride: K_words padded to 4 mod 16."""
    return k_words + ((4 - k_words) % 16 + 16) % 16


@pytest.mark.parametrize("k_words", [1, 9, 18, 25, 36, 72, 200])
@pytest.mark.parametrize("out_channels,col0", [(64, 0), (72, 64), (512, 448)])
def test_bmma_halo_w_weights_in_shared_memory(k_words, out_channels, col0):
    """bmma_halo_w's weight tile, as its index arithmetic builds and reads it (stage_weights, then
    the main loop's reads): every (column, k-word) of the block's 64 columns holds its weight word,
    zeros past O; and the 16 8-byte reads of a half warp (columns g .. g + 3, words t = 0..3 of a
    k-step) fall in 32 different banks at every k-step."""
    w = torch.arange(out_channels * k_words).reshape(out_channels, k_words)  # (O, K_words) words
    stride = weight_stride(k_words)
    assert stride >= k_words and stride % 16 == 4
    tile = torch.full((64 * stride,), -1)
    flat = w.flatten()[col0 * k_words :]
    words = min(64, out_channels - col0) * k_words
    for i in range(64 * k_words):  # stage_weights, whichever thread copies word i
        col, kword = divmod(i, k_words)
        tile[col * stride + kword] = flat[i] if i < words else 0
    for nt, g, kword in itertools.product(range(8), range(8), range(k_words)):
        col = nt * 8 + g
        want = w[col0 + col, kword] if col0 + col < out_channels else 0
        assert tile[col * stride + kword] == want
    for step, nt, half in itertools.product(range((k_words + 3) // 4), range(8), range(2)):
        lanes = [(4 * half + lane // 4, lane % 4) for lane in range(16)]  # (g, t)
        banks = set()
        for g, t in lanes:
            word = (nt * 8 + g) * stride + step * 4 + t
            banks |= {(2 * word) % 32, (2 * word + 1) % 32}
        assert len(banks) == 32


def halo_p_trace(block, grid, items):
    """What block ``block`` of binary_conv2d_bmma_halo_p_kernel does, in order, as its loop does it:
    ("stage", item, buffer) starts the copies of an item's halo and residuals, ("compute", item,
    buffer) reads them (main loop and epilogue), ("barrier",) is the __syncthreads that ends an item."""
    item, b = block, 0
    trace = [("stage", item, 0)]
    while True:
        following = item + grid
        if following < items:
            trace.append(("stage", following, b ^ 1))
        trace.append(("compute", item, b))
        if following >= items:
            return trace
        trace.append(("barrier",))
        item, b = following, b ^ 1


@pytest.mark.parametrize("items,grid", [(1, 1), (7, 3), (8, 4), (396, 396), (1000, 396), (7168 * 1, 528), (5, 8)])
def test_bmma_halo_p_computes_every_item_once_from_its_own_copies(items, grid):
    """bmma_halo_p's persistent loop (halo_p_trace, the grid at most the items as the host sizes it):
    every work item is computed once; an item is computed from the buffer its own copies went to,
    and a buffer is refilled only after a barrier that follows the last read of it; item i is image
    tile i // col_blocks, channel block i % col_blocks (channels fastest: blocks running together
    share a tile's input), every (tile, channel block) once."""
    grid = min(grid, items)
    computed = []
    for block in range(grid):
        last_staged, read_since_barrier = {}, set()
        for event in halo_p_trace(block, grid, items):
            if event[0] == "stage":
                _, item, b = event
                assert b not in read_since_barrier, (block, event)  # no refill while it may be read
                last_staged[b] = item
            elif event[0] == "compute":
                _, item, b = event
                assert last_staged[b] == item, (block, event)  # its own halo and residuals
                read_since_barrier.add(b)
                computed.append(item)
            else:
                read_since_barrier.clear()
    assert sorted(computed) == list(range(items))
    col_blocks = 3
    places = [(i // col_blocks, i % col_blocks) for i in sorted(computed)]
    assert len(set(places)) == items and places[:3] == [(0, c) for c in range(min(3, items))]


def test_extension_uses_the_shared_libstdcxx():
    """The extension resolves the C++ library from the libstdc++ the process loads: a copy linked in
    by a -static-libstdc++ compiler driver breaks number formatting in every error message (cut short
    here, a segfault on the H100 machine's toolchain). setup.py links the shared library first."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to read the symbol table")
    symbols = subprocess.run(
        [nm, "-C", "--defined-only", extension_file()], capture_output=True, text=True, check=True
    ).stdout
    assert "std::ostream::_M_insert<long>" not in symbols
    with pytest.raises(RuntimeError, match="in_channels=65 needs 2 words per pixel, packed_x has 1"):
        ops.binary_conv2d(ops.pack_signs(torch.randn(1, 64, 2, 2)), ops.pack_signs(torch.randn(3, 64, 3, 3)), 65)


def test_smoke_script_on_the_cpu_paths(capsys, monkeypatch):
    """`python -m cuda_ext.smoke`, the GPU run's first step, exercised here on the CPU paths: every
    check exact, and each row names the path, the case and where the first wrong element is."""
    from cuda_ext import smoke

    assert smoke.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if " ok " in line]
    # pack_signs x 4 dtypes, max_pool_signs x 2, the cases per path
    assert len(rows) == 4 + 2 + len(smoke.QUICK) * len(ops.cpu_paths())
    assert sum(r.lstrip().startswith("max_pool_signs") for r in rows) == 2
    assert all("first (n,h,w,word)=None" in r for r in rows)
    assert out.strip().endswith(f"smoke: {len(rows)} of {len(rows)} checks exact")
    wrong, first = smoke.first_mismatch(
        torch.tensor([[1.0, 2.0], [3.0, float("nan")]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    )
    assert (wrong, first) == (1, [1, 1])  # an unwritten (NaN) element is found

    # the rerun after a path lost the CUDA context leaves out what BIREAL_SKIP_CUDA_PATHS names,
    # kernel paths and ops alike, on the CUDA device (the list is made here; nothing runs)
    all_cuda = [name for name, _ in smoke.checks("cuda", quick=True)]
    lost = ops.cuda_paths()[-1]
    monkeypatch.setenv("BIREAL_SKIP_CUDA_PATHS", f"{lost},max_pool_signs")
    rerun = [name for name, _ in smoke.checks("cuda", quick=True)]
    assert {name.split()[0] for name in all_cuda} - {name.split()[0] for name in rerun} == {lost, "max_pool_signs"}
    assert len(rerun) == len(all_cuda) - 2 - len(smoke.QUICK)
    cpu_checks = [name.split()[0] for name, _ in smoke.checks("cpu", quick=True)]
    assert cpu_checks == [line.split()[0] for line in rows]  # never a CPU path or op


@needs_cuda_build
def test_the_sass_report_reads_every_kernel_of_both_targets():
    """bench/sass_report.py (what the kernels compiled to, without a GPU): both targets' tensor-core
    kernels with their 32 BMMAs per k-step (the one-MMA ones: 16), nothing spilled, and an epilogue
    size per output; the lean epilogue's instantiations (the lean and halo kernels') about a third of
    bmma's (plus what the one-MMA counts and the halo's copies add), in at most 168 registers (3
    blocks of 4 warps per SM, as bmma); cp.async copies (LDGSTS) in bmma_async, in the halo kernels'
    instantiations with a residual (its staged tile) and in all of bmma_halo_w's (its weights), in no
    other; 16-byte stores in the halo kernels' instantiations with bf16 outputs (copied out of the
    tile); cluster barriers in bmma_split's alone."""
    from bench.sass_report import report

    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to read the fat binary")
    rows = {(r["sm"], r["kernel"]): r for r in report(extension_file(), tool)}
    for sm in ("sm_80", "sm_90a"):
        for kernel in ("binary_conv2d_bmma_kernel", "binary_conv2d_bmma_async_kernel"):
            row = rows[(sm, kernel)]
            assert row["bmma"] == 32 and row["local"] == 0 and row["stack"] == 0 and 0 < row["reg"] <= 255, row
            assert (row["cp_async"] > 0) == (kernel == "binary_conv2d_bmma_async_kernel"), row
            assert 0 < row["epilogue"] < row["instructions"] and row["epilogue_per_output"] > 0
        assert rows[(sm, "binary_conv2d_simt_kernel")]["bmma"] == 0
        reference = rows[(sm, "binary_conv2d_bmma_kernel")]["epilogue_per_output"]
        # (variant, BMMAs per k-step, epilogue instructions per output beyond a third of bmma's, the
        # training conv's epilogue at most): bmma_lean1 and bmma_halo also turn their one-MMA counts
        # into dot products (dots_from_and_counts: about 2-3 instructions per output), and bmma_halo
        # copies bf16 outputs out of its tile (about 1.5) in fewer instructions than it had stored them;
        # bmma_halo_p's count after its k-step loop also holds its loop over work items' tail (the
        # item's place found again, three divisions, and the barrier: about 3 per output)
        # bmma_split also stores its partial counts and adds the other blocks' (about 3-4.5 per
        # output), on sm_90a; on sm_80 (no clusters) it is a trap, never launched
        variants = (("binary_conv2d_bmma_lean_kernel", 32, 0, 12), ("binary_conv2d_bmma_lean1_kernel", 16, 3, 14),
                    ("binary_conv2d_bmma_halo_kernel", 16, 3.5, 12),
                    ("binary_conv2d_bmma_halo_w_kernel", 16, 3.5, 12),
                    ("binary_conv2d_bmma_halo_p_kernel", 16, 6, 15))  # fmt: skip
        split = {k: r for (s, k), r in rows.items() if s == sm and k.startswith("binary_conv2d_bmma_split_kernel<")}
        assert len(split) == 8, sorted(split)
        if sm == "sm_80":
            assert all(r["bmma"] == 0 and r["instructions"] < 50 for r in split.values()), split
        else:
            variants += (("binary_conv2d_bmma_split_kernel", 32, 5, 16),)
            # the cluster's two barriers: partial counts written, and read before any block exits
            assert all(r["cluster_sync"] == 2 for r in split.values()), split
        assert all(r["cluster_sync"] == 0 for (s, k), r in rows.items() if "_split" not in k)
        for variant, mmas, extra, training_conv in variants:
            lean = {k: r for (s, k), r in rows.items() if s == sm and k.startswith(variant + "<")}
            assert len(lean) == 8, sorted(lean)
            for kernel, row in lean.items():
                assert row["bmma"] == mmas and row["reg"] <= 168 and row["local"] == 0 and row["stack"] == 0, row
                assert 0 < row["epilogue_per_output"] <= reference * 0.34 + extra, (kernel, row, reference)
                halo = "_halo" in variant
                # cp.async: bmma_halo's residual tile; bmma_halo_w's weights and bmma_halo_p's halos, always
                copies = "residual" in kernel or variant.endswith(("halo_w_kernel", "halo_p_kernel"))
                assert (row["cp_async"] > 0) == (halo and copies), (kernel, row)
                stages_outputs = halo and "bf16" in kernel
                assert (row["stg128"] > 0) == stages_outputs, (kernel, row)
            assert lean[variant + "<scale|bf16>"]["epilogue_per_output"] <= training_conv
