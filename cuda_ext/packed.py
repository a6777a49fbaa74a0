"""The packed (really 1-bit) Bi-Real model: export from a checkpoint, load, run.

Artifact = one ``.safetensors`` file (no pickle), format ``bireal-packed`` version 1:
- every binary conv as sign bits, int64 (O, KH, KW, ceil(C/64)) (docs/packed_format.md), with
  alpha and its BatchNorm folded into a per-output-channel ``scale`` and ``bias``:
      BN(alpha * dot) = dot * (alpha * g) + (beta - mean * g),   g = gamma / sqrt(var + eps)
- the real layers kept in float32, each real conv with its BatchNorm folded into weight and bias:
  the stem, the downsampling shortcuts, the bottleneck's real 1x1s, the FC head;
- a JSON header in the safetensors metadata: format, version, arch and constructor arguments,
  class names, input geometry and normalisation, the sign / bit / padding conventions, and the
  sha256 of the tensors, checked on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import bireal_core as bc
from bireal_core.checkpoint import read_safetensors_header, shape_mismatch, write_safetensors
from bireal_core.models.bireal import BiRealBlock
from bireal_core.models.bireal_bottleneck import BiRealBottleneck

from . import ops
from .float_parts import fused_shortcut, pools_then_mixes, space_to_depth_conv, space_to_depth_input
from .reference import binary_block_ref, max_pool_signs_ref, pack_signs_ref

FORMAT = "bireal-packed"
VERSION = 1
CONVENTIONS = {
    "sign_of_zero": "+1",
    "word_bits": 64,
    "bit_order": "bit j (LSB = 0) of word k holds channel 64k + j; 1 = +1, 0 = -1; tail bits 0",
    "activation_layout": "NHWC words (N, H, W, ceil(C/64))",
    "weight_layout": "(O, KH, KW, ceil(C/64))",
    "epilogue": "out = dot * scale + bias + residual",
}


class ArtifactError(ValueError):
    """A file that is not a valid packed artifact (the message names the file and the problem)."""


# ----------------------------------------------------------------------------- folding


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = x * g + b: (g, b), each (C,)."""
    g = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return g, bn.bias.detach() - bn.running_mean * g


def fold_real_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> dict[str, torch.Tensor]:
    w = conv.weight.detach()
    if bn is None:
        return {"weight": w.clone(), "bias": torch.zeros(w.shape[0])}
    g, b = bn_affine(bn)
    return {"weight": w * g.view(-1, 1, 1, 1), "bias": b}


def fold_binary_conv(conv: bc.BinaryConv2d, bn: nn.BatchNorm2d) -> dict[str, torch.Tensor]:
    if not conv.is_binary:
        raise ValueError(
            "only convs with binary input and weights can be packed; "
            "train (or finetune) with binary_weights=True before export"
        )
    w = conv.weight.detach()
    alpha = conv.weight_binarizer.scale(w).flatten()  # (O,); 1 for the 'plain' binarizer
    g, b = bn_affine(bn)
    return {"packed": ops.pack_signs(w), "scale": alpha * g, "bias": b}


# ----------------------------------------------------------------------------- modules


class PackedBinaryConv(nn.Module):
    """sign -> pack -> 1-bit conv -> (* scale + bias + residual) -> sign -> pack, one fused kernel call.

    Returns the real output and its packed signs, so the next binary conv starts from bits instead
    of re-reading the real tensor."""

    def __init__(self, conv: bc.BinaryConv2d):
        super().__init__()
        self.in_channels, self.stride, self.padding = conv.in_channels, conv.stride[0], conv.padding[0]
        self.pad_value = conv.pad_value
        o, c, kh, kw = conv.weight.shape
        self.register_buffer("packed", torch.zeros(o, kh, kw, (c + 63) // 64, dtype=torch.int64))
        self.register_buffer("scale", torch.ones(o))
        self.register_buffer("bias", torch.zeros(o))
        # ops.border_classes of the packed weights under zero padding (make_border_classes), so the
        # CUDA kernel does not make it every call; not saved: it follows from the weights
        self.register_buffer("border_classes", None, persistent=False)
        self.out_dtype: torch.dtype | None = None  # None: float32; PackedBiReal.set_activation_dtype
        self.kernel_path: str | None = None  # None: the process's path; PackedBiReal.tune_kernel_paths

    def make_border_classes(self) -> None:
        """Make ``border_classes`` from the weights as they are now (call again if they change)."""
        if self.pad_value == 0.0 and self.padding > 0:
            self.border_classes = ops.border_classes(self.packed, self.in_channels, self.padding)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, packed_x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) real, or ``packed_x`` its signs (N, H, W, C/64) when already packed.
        Returns out (N, O, Ho, Wo) channels_last (float32, or ``out_dtype``) and its signs
        (N, Ho, Wo, O/64)."""
        pack, block = (pack_signs_ref, binary_block_ref) if _USE_REFERENCE else (ops.pack_signs, ops.binary_block)
        if packed_x is None:
            packed_x = pack(x)
        path = contextlib.nullcontext()
        if self.kernel_path is not None and not _USE_REFERENCE:
            path = ops.forced_kernel_path(self.packed.device, self.kernel_path)
        with path:
            return block(
                packed_x,
                self.packed,
                self.in_channels,
                self.stride,
                self.padding,
                self.pad_value,
                self.scale,
                self.bias,
                residual,
                self.out_dtype,
                self.border_classes,
            )


_USE_REFERENCE = False


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Run PackedBiReal through the pure-torch reference ops (the exactness check's other side)."""
    global _USE_REFERENCE
    previous, _USE_REFERENCE = _USE_REFERENCE, True
    try:
        yield
    finally:
        _USE_REFERENCE = previous


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 convs and matmuls in IEEE float32, not TF32, inside. PyTorch lets cuDNN run float32
    convs in TF32 (a 10-bit mantissa) on Ampere and newer GPUs by default; a 1-bit net turns such
    rounding differences into flipped signs: on CIFAR-10 the packed model on an H200 agreed with its
    float graph on 95.4% of the test images with TF32, where the CPU agrees on 99.97%. Process-wide
    flags, restored on exit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def real_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A float conv with bias, the shape of ``conv``, to receive a folded conv + BN."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)


def stem_pool_args(pool: nn.MaxPool2d) -> tuple[int, int, int] | None:
    """(kernel_size, stride, padding) of a square max-pool that ``max_pool_signs`` runs (dilation 1,
    floor mode), else None."""

    def single(v):
        return v if isinstance(v, int) else (v[0] if len(set(v)) == 1 else None)

    args = single(pool.kernel_size), single(pool.stride), single(pool.padding)
    plain = single(pool.dilation) == 1 and not pool.ceil_mode and not pool.return_indices
    return args if plain and None not in args else None


def packed_shortcut(downsample: nn.Sequential | None) -> nn.Sequential | None:
    if downsample is None:
        return None
    pool, conv, _bn = downsample
    return nn.Sequential(pool, real_conv(conv))


class PackedBasicBlock(nn.Module):
    def __init__(self, block: BiRealBlock):
        super().__init__()
        self.conv = PackedBinaryConv(block.conv)
        self.downsample = packed_shortcut(block.downsample)

    def forward(self, x: torch.Tensor, packed_x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv(x, residual=shortcut, packed_x=packed_x)


class PackedBottleneck(nn.Module):
    def __init__(self, block: BiRealBottleneck):
        super().__init__()
        self.first = block.first
        self.conv1 = real_conv(block.conv1) if block.first else PackedBinaryConv(block.conv1)
        self.mid_adapt = block.mid_adapt and nn.Conv2d(
            block.mid_adapt.in_channels, block.mid_adapt.out_channels, 1, bias=True
        )
        self.conv2 = PackedBinaryConv(block.conv2)
        self.mid_pool = block.mid_pool
        self.conv3 = PackedBinaryConv(block.conv3)
        self.downsample = packed_shortcut(block.downsample)

    def forward(
        self, mid_prev: torch.Tensor, x: torch.Tensor, packed_x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (m2, out, packed signs of out); m2 feeds the next block's mid shortcut."""
        if self.first:
            m1, packed_m1 = self.conv1(bc.LeakyClip()(x)), None
        else:
            adapted = mid_prev if self.mid_adapt is None else self.mid_adapt(mid_prev)
            m1, packed_m1 = self.conv1(x, residual=adapted, packed_x=packed_x)
        m2, packed_m2 = self.conv2(m1, residual=m1 if self.mid_pool is None else self.mid_pool(m1), packed_x=packed_m1)
        shortcut = x if self.downsample is None else self.downsample(x)
        return (m2, *self.conv3(m2, residual=shortcut, packed_x=packed_m2))


class PackedBiReal(nn.Module):
    """Inference-only Bi-Real net running every binary conv through the bireal ops.

    Built with the topology of ``bireal_core`` model ``spec`` (constructed on the meta device, so
    no float weights are ever allocated), then filled from an artifact's tensors."""

    def __init__(self, spec: dict[str, Any], materialize: bool = True):
        super().__init__()
        with torch.device("meta"):  # every module: nothing is allocated until ``to_empty``
            ref = bc.create_model(spec["name"], **spec["kwargs"])
            stem_conv, _stem_bn, *rest = ref.stem
            self.stem = nn.Sequential(real_conv(stem_conv), *rest)  # maxpool kept for the ImageNet stem
            self.bottleneck = isinstance(ref.blocks[0], BiRealBottleneck)
            wrap = PackedBottleneck if self.bottleneck else PackedBasicBlock
            self.blocks = nn.ModuleList(wrap(b) for b in ref.blocks)
            self.fc = nn.Linear(ref.fc.in_features, ref.fc.out_features)
        self.in_channels = stem_conv.in_channels  # the images' (3); pad_stem_input widens the conv only
        self.activation_dtype = torch.float32
        self.stem_space_to_depth = False  # space_to_depth_stem
        self._float32_weights: dict[nn.Module, list[torch.Tensor]] = {}  # while in bfloat16
        if materialize:
            self.to_empty(device="cpu")

    def set_activation_dtype(self, dtype: torch.dtype) -> "PackedBiReal":
        """float32 (default, bit-exact with the exported float model's folded graph) or bfloat16: the
        real-valued activations (stem, shortcuts, the blocks' outputs, the head) in bfloat16, which
        halves the bytes every block reads and writes. The binary convs' dot products stay exact.

        In bfloat16 the real-valued convs (stem, shortcuts) hold their weights in bfloat16, cast once
        here rather than by autocast in every forward (the same rounding, so the same outputs); their
        float32 weights are kept and put back by ``set_activation_dtype(float32)``. The head stays
        float32 (``head``)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"activation dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        for m in self.modules():
            if isinstance(m, PackedBinaryConv):
                m.out_dtype = None if dtype == torch.float32 else dtype
        if dtype != self.activation_dtype:
            with torch.no_grad():
                if dtype == torch.bfloat16:
                    self._float32_weights = {m: [p.clone() for p in m.parameters()] for m in self.real_layers()}
                    for m in self._float32_weights:
                        m.to(torch.bfloat16)
                else:
                    for m, saved in self._float32_weights.items():
                        m.to(torch.float32)
                        for p, kept in zip(m.parameters(), saved):
                            p.copy_(kept)
                    self._float32_weights = {}
        self.activation_dtype = dtype
        return self

    def _check_still_float32(self, switch: str) -> None:
        """The float-part switches are made from the float32 weights (set_activation_dtype keeps a
        copy of the real layers' float32 weights, which a switch would leave stale)."""
        if self.activation_dtype != torch.float32:
            raise ValueError(f"{switch}: call it while the activations are float32 (before set_activation_dtype)")

    def real_layers(self) -> list[nn.Module]:
        """The real-valued convs, which run in the activation dtype (every nn.Conv2d of the net)."""
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)]

    def space_to_depth_stem(self) -> "PackedBiReal":
        """Run the ImageNet stem's 7x7/2 conv on 3 channels as a 4x4/1 conv on 16 channels of 2x2
        blocks of the input (``space_to_depth_conv``, ``space_to_depth_input``): the same products in
        a shape tensor cores take (a channel count that is a multiple of 8, a reduction of 256 per
        output against 147 real and 392 with ``pad_stem_input(8)``), as MLPerf's ResNet-50 stems do.
        The input must have an even height and width. Equal to float rounding, not bit for bit.
        Whether it is faster is a GPU measurement (``bireal bench model --device cuda``:
        ``stem_s2d_bf16_ms``), so it is a switch, off by default."""
        self._check_still_float32("space_to_depth_stem")
        if self.stem_space_to_depth:
            return self
        if self.stem[0].in_channels != 3:
            raise ValueError("space_to_depth_stem: the stem conv is padded (pad_stem_input); use one or the other")
        self.stem[0] = space_to_depth_conv(self.stem[0])
        self.stem_space_to_depth = True
        return self

    def fuse_shortcuts(self) -> "PackedBiReal":
        """Run each stage entry's shortcut, AvgPool 2x2/2 then a 1x1 conv + bias, as one 2x2 stride-2
        conv (``fused_shortcut``) whose bias the block's binary conv adds in its epilogue (its
        ``bias`` + the shortcut's, summed once here). On a GPU that is two kernel launches fewer per
        stage entry (the pool and cuDNN's bias add; 6 in Bi-Real-18, which count at batch 1 as a CUDA
        graph), and the shortcut's input read once. Equal to float rounding, not bit for bit: the sums
        no longer run in the exported float graph's order. Whether it is faster is a GPU measurement
        (``bireal bench model --device cuda``: ``shortcut2x2_bf16_ms``), so it is a switch, off by
        default."""
        self._check_still_float32("fuse_shortcuts")
        for block in self.blocks:
            if block.downsample is not None and pools_then_mixes(block.downsample):
                block.downsample, bias = fused_shortcut(block.downsample)
                adds_the_shortcut = block.conv3 if self.bottleneck else block.conv  # its residual
                adds_the_shortcut.bias += bias
        return self

    def pad_stem_input(self, channels: int) -> "PackedBiReal":
        """Give the stem conv ``channels`` input channels: the extra ones are zero in its weights and
        in every input (appended by ``run_stem``), so it is the same convolution in a shape that
        cuDNN's bf16 NHWC tensor-core kernels take (a channel count that is a multiple of 8; an
        image's 3 is not). Whether that is faster is a GPU measurement (``bireal bench model
        --device cuda``: ``stem8_bf16_ms``), so it is a switch, off by default."""
        self._check_still_float32("pad_stem_input")
        if self.stem_space_to_depth:
            raise ValueError("pad_stem_input: the stem runs space to depth (space_to_depth_stem); use one or the other")
        conv = self.stem[0]
        extra = channels - conv.in_channels
        if extra < 0:
            raise ValueError(f"pad_stem_input({channels}): the stem conv already takes {conv.in_channels} channels")
        if extra == 0:
            return self
        padded = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
        padded = padded.to(conv.weight.device, memory_format=torch.channels_last)
        with torch.no_grad():
            padded.weight.copy_(F.pad(conv.weight, (0, 0, 0, 0, 0, extra)))  # (O, C + extra, KH, KW)
            padded.bias.copy_(conv.bias)
        self.stem[0] = padded
        return self

    def check_images(self, x: torch.Tensor) -> None:
        """Refuse what the stem's cast and padding would otherwise take without a word: uint8 pixels
        (0..255, not normalized) cast to float, or 1 or 2 channels zero-padded up to a padded stem's."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(
                f"expected normalized float images (bireal_core.preprocess.eval_transform, as the artifact's "
                f"header['input'] says), got {x.dtype}"
            )

    def run_stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The real-valued stem; -> (its output, the output's packed signs or None). The ImageNet
        stem's max-pool (3x3, stride 2) runs as ``max_pool_signs``, which also adds the conv's bias
        (after the max, to a quarter of the values: cuDNN would add it in a pass of its own over the
        conv's whole output) and packs the first block's input in the same pass; the CIFAR stem has
        no pool (its first block packs)."""
        self.check_images(x)
        if self.stem_space_to_depth:  # the cast in the copy that makes the blocks
            x = space_to_depth_input(x, self.activation_dtype)
        else:  # the one cast of a forward, to channels_last in the same copy (no copy if x is already so)
            x = x.to(self.activation_dtype, memory_format=torch.channels_last)
        extra = self.stem[0].in_channels - x.shape[1]
        if extra > 0:  # pad_stem_input: zero channels appended, (N, C + extra, H, W) channels_last
            zeros = x.new_zeros(x.shape[0], extra, *x.shape[2:])
            x = torch.cat([x, zeros], 1).contiguous(memory_format=torch.channels_last)
        conv, pool = self.stem[0], self.stem[-1]
        pool_args = stem_pool_args(pool) if isinstance(pool, nn.MaxPool2d) and len(self.stem) == 2 else None
        if pool_args is None:
            return self.stem(x), None
        pool_signs = max_pool_signs_ref if _USE_REFERENCE else ops.max_pool_signs
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
        return pool_signs(y, *pool_args, conv.bias.detach().to(y.dtype))  # (no cast but under autocast)

    def binary_convs(self) -> dict[str, PackedBinaryConv]:
        """The binary convs by module name (``blocks.3.conv``)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, PackedBinaryConv)}

    def tune_kernel_paths(self, x: torch.Tensor, repeats: int = 5) -> dict[str, str]:
        """Give each binary conv the code path that runs it fastest on inputs like ``x`` (as
        ``cudnn.benchmark`` picks cuDNN's algorithms per shape): one forward records every conv's
        arguments, then each conv is timed alone on each path of the device (``ops.kernel_paths``,
        the CUDA-core cross-check ``simt`` left out) and keeps the fastest (``kernel_path``). Every
        path computes the same bits, so the outputs do not change. -> {conv name: path}."""
        convs = self.binary_convs()
        calls: dict[str, tuple] = {}

        def record(name):
            return lambda module, args, kwargs: calls.setdefault(name, (args, kwargs))

        hooks = [conv.register_forward_pre_hook(record(name), with_kwargs=True) for name, conv in convs.items()]
        try:
            with torch.inference_mode():
                self(x)
        finally:
            for hook in hooks:
                hook.remove()
        from .benchmarks import time_ms  # the project's timer (median; CUDA events on a GPU)

        paths = [p for p in ops.kernel_paths(x.device) if p != "simt"]
        chosen = {}
        with torch.inference_mode():
            for name, conv in convs.items():
                args, kwargs = calls[name]
                times = {}
                for path in paths:
                    conv.kernel_path = path
                    times[path] = time_ms(lambda: conv(*args, **kwargs), x.device, repeats, warmup=1)
                conv.kernel_path = chosen[name] = min(times, key=times.get)
        return chosen

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> the last block's output (N, C, H', W'), channels_last, in the
        activation dtype."""
        x, packed = self.run_stem(x)
        mid = x  # packed: signs of x, made by the stem's pool or the previous block's kernel
        for block in self.blocks:
            if self.bottleneck:
                mid, x, packed = block(mid, x, packed)
            else:
                x, packed = block(x, packed)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """features (N, C, H', W') -> float32 logits (N, classes): the global average taken in float32
        (a bfloat16 x is widened inside the reduction, not by a cast of its own), then the float32 FC."""
        return self.fc(x.mean((2, 3), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last throughout: the kernels read and write NHWC, and oneDNN's conv and
        # max-pool are several times faster on NHWC than on NCHW here.
        # bfloat16: every conv holds bfloat16 weights (set_activation_dtype), so run_stem casts the
        # input once and nothing else is cast
        bf16 = self.activation_dtype == torch.bfloat16
        exact = contextlib.nullcontext() if bf16 else ieee_float32()  # float32 means float32 on a GPU too
        with exact:
            return self.head(self.features(x))


# ----------------------------------------------------------------------------- export / load


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The artifact's tensors, named as the state dict of ``PackedBiReal`` expects them."""
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, tensors: dict[str, torch.Tensor]):
        out.update({f"{prefix}.{k}": v.contiguous().cpu() for k, v in tensors.items()})

    put("stem.0", fold_real_conv(model.stem[0], model.stem[1]))
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        if isinstance(block, BiRealBottleneck):
            put(
                f"{p}.conv1",
                fold_real_conv(block.conv1, block.bn1) if block.first else fold_binary_conv(block.conv1, block.bn1),
            )
            put(f"{p}.conv2", fold_binary_conv(block.conv2, block.bn2))
            put(f"{p}.conv3", fold_binary_conv(block.conv3, block.bn3))
            if block.mid_adapt is not None:
                put(f"{p}.mid_adapt", fold_real_conv(block.mid_adapt, None))
        else:
            put(f"{p}.conv", fold_binary_conv(block.conv, block.bn))
        if block.downsample is not None:
            put(f"{p}.downsample.1", fold_real_conv(block.downsample[1], block.downsample[2]))
    put("fc", {"weight": model.fc.weight.detach(), "bias": model.fc.bias.detach()})
    return out


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# The header's parts that change a prediction or its label; its "source" (provenance) does not.
SCORED_HEADER = ("model", "class_names", "input", "conventions")


def header_digest(header: dict) -> str:
    """sha256 (16 hex) of the canonical JSON of the header's ``SCORED_HEADER`` parts. The tensors'
    sha256 does not cover the header, so ``bireal evaluate`` records this beside it, and the
    registry refuses an artifact whose mean, std, class names, ... changed after it was scored and
    tags each version with it (the same tensors under another header are another model)."""
    scored = {part: header.get(part) for part in SCORED_HEADER}
    return hashlib.sha256(json.dumps(scored, sort_keys=True).encode()).hexdigest()[:16]


def export_model(
    model: nn.Module,
    out_path: str | os.PathLike,
    class_names: list[str] | None = None,
    input_config: dict | None = None,
    source: dict | None = None,
) -> Path:
    """Write the packed artifact of a ``bireal_core`` Bi-Real model (eval-mode BN statistics)."""
    spec = model.model_spec
    if not spec["name"].startswith("bireal"):
        raise ValueError(f"only Bi-Real models can be packed, got {spec['name']!r}")
    num_classes = spec["kwargs"].get("num_classes", 1000)
    class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    problem = class_names_problem(class_names, num_classes)
    if problem:
        raise ValueError(problem)
    input_config = input_config or bc.default_input_config(spec["kwargs"].get("stem", "imagenet"))
    problem = bc.input_config_problem(input_config)
    if problem:
        raise ArtifactError(f"{out_path}: not written: the model's {problem}")
    tensors = packed_tensors(model.eval())
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": spec,
        "class_names": class_names,
        "input": input_config,
        "conventions": {
            **CONVENTIONS,
            "pad_value": next(m.pad_value for m in model.modules() if isinstance(m, bc.BinaryConv2d)),
        },
        "source": source or {},
        "sha256": tensors_sha256(tensors),
    }
    return write_safetensors(out_path, tensors, "bireal_packed", header)


def export_checkpoint(
    checkpoint: str | os.PathLike, out_path: str | os.PathLike, class_names: list[str] | None = None
) -> Path:
    """``bireal export``: a ``bireal_core`` checkpoint -> packed artifact."""
    if Path(out_path).resolve() == Path(checkpoint).resolve():
        raise ArtifactError(f"{out_path}: is the checkpoint itself; the artifact would replace it (another --out)")
    model, header = bc.load_checkpoint(checkpoint)
    config = header.get("config", {})
    problem = config.get("input") is not None and bc.input_config_problem(config["input"])
    if problem:
        raise ArtifactError(f"{checkpoint}: config.{problem}; nothing exported")
    names = class_names or config.get("class_names")
    problem = names is not None and class_names_problem(names, model.fc.out_features)
    if problem:  # named where the names came from: the command line's, or the checkpoint's config
        where = "the class names given" if class_names else f"{checkpoint} (config.class_names)"
        raise ArtifactError(f"{where}: {problem}; nothing exported")
    return export_model(
        model,
        out_path,
        names,
        config.get("input"),
        {"checkpoint": str(checkpoint), "stage": header.get("stage"), "metrics": header.get("metrics", {})},
    )


def read_artifact_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of an artifact (format and version checked), without loading its tensors."""
    header = read_safetensors_header(path, "bireal_packed", ArtifactError, "packed bireal artifact")
    if header.get("format") != FORMAT or header.get("version", 0) > VERSION:
        raise ArtifactError(
            f"{path}: format {header.get('format')!r} version {header.get('version')}; "
            f"this code reads {FORMAT!r} up to version {VERSION}"
        )
    return header


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and header of an artifact, verified (format, version, sha256)."""
    header = read_artifact_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if tensors_sha256(tensors) != header.get("sha256"):
        raise ArtifactError(
            f"{path}: sha256 of the tensors does not match the header: the file was modified or corrupted"
        )
    return tensors, header


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[PackedBiReal, dict]:
    """The artifact as a ``PackedBiReal`` on ``device``. The header is checked against the tensors
    the file holds before any memory is allocated for it: a small file whose header claims a
    billion classes is an ``ArtifactError``, not a 0.5 TB allocation."""
    tensors, header = read_artifact(path)
    try:
        model = PackedBiReal(header["model"], materialize=False)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: the header's model {header.get('model')!r} cannot be built: {e}") from e
    check_header(path, header, model, tensors)
    model.to_empty(device="cpu")
    model.load_state_dict(tensors, strict=True)
    for conv in model.modules():
        if isinstance(conv, PackedBinaryConv):
            conv.make_border_classes()  # once per weight tensor, not per call
    return model.eval().to(device), header


def class_names_problem(names: object, classes: int) -> str:
    """'' or what is wrong with an artifact's ``class_names`` for a ``classes``-way head: one
    distinct, non-empty string per output (what ``predict`` prints and the served model returns
    as ``label``; two outputs under one name could not be told apart)."""
    if not isinstance(names, list) or len(names) != classes:
        return f"{len(names) if isinstance(names, list) else names!r} class names for {classes} outputs"
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            return f"class_names[{i}]={name!r}: each output's name is a non-empty string"
        if name in first:
            return f"class_names[{i}]={name!r} repeats class_names[{first[name]}]: each output needs its own name"
        first[name] = i
    return ""


def check_header(path, header: dict, model: PackedBiReal, tensors: dict[str, torch.Tensor]) -> None:
    """The model the header describes (still on the meta device) has exactly the file's tensors,
    one class name per output, a usable input config (bounded geometry, one mean and one std > 0
    per channel) and the bit conventions this code packs."""
    mismatch = shape_mismatch(
        {k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: tuple(v.shape) for k, v in tensors.items()}
    )
    if mismatch:
        raise ArtifactError(f"{path}: the header's model does not match the stored tensors ({mismatch})")
    problem = class_names_problem(header.get("class_names"), model.fc.out_features)
    if problem:
        raise ArtifactError(f"{path}: {problem}")
    problem = bc.input_config_problem(header.get("input"), model.in_channels)
    if problem:
        raise ArtifactError(f"{path}: {problem}")
    pad_value = next(iter(model.binary_convs().values())).pad_value
    expected_conventions = {**CONVENTIONS, "pad_value": pad_value}
    conventions = header.get("conventions")
    if conventions != expected_conventions:
        found = conventions if isinstance(conventions, dict) else {}
        key = next(k for k in [*expected_conventions, *found] if found.get(k) != expected_conventions.get(k))
        if key not in expected_conventions:  # an extra key: a convention of other code
            raise ArtifactError(f"{path}: conventions.{key}: not a convention this code packs or reads")
        raise ArtifactError(
            f"{path}: conventions.{key}={found.get(key)!r}: this code packs and reads "
            f"{expected_conventions[key]!r} (the header describes bits these kernels would misread)"
        )


def artifact_size(path: str | os.PathLike) -> dict[str, float]:
    """File size, and the paper's memory measure of what the file stores (1-bit weights as bits)."""
    tensors, _ = read_artifact(path)
    bits = sum(t.numel() * (64 if t.dtype == torch.int64 else 32) for t in tensors.values())
    return {"bytes": Path(path).stat().st_size, "mbit": Path(path).stat().st_size * 8 / 1e6, "payload_mbit": bits / 1e6}


def compare_with_float(
    model: nn.Module, packed: PackedBiReal, images: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Top-1 agreement and max logit difference of the packed model vs the training graph (eval).

    Folding alpha and BN changes float rounding, so a pre-sign value within rounding distance of 0
    can flip a bit downstream; ``disagreements`` counts the images whose top-1 class changed."""
    model.eval()
    diffs, agree = [], 0
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            a, b = model(chunk), packed(chunk)
            diffs.append((a - b).abs().max())
            agree += int((a.argmax(1) == b.argmax(1)).sum())
    n = images.shape[0]
    return {
        "images": n,
        "top1_agreement": agree / n,
        "disagreements": n - agree,
        "max_logit_diff": float(torch.stack(diffs).max()),
    }
