"""Training through the binary kernels (the ``kernels: auto`` setting).

With ``use_kernels(model)``, every binary conv of a ``bireal_core`` model runs its forward on the
packed 1-bit op (``bireal::pack_signs`` + ``bireal::binary_conv2d``: integer dot products, times
alpha once) inside one autograd function, and keeps for backward the packed signs instead of float
copies. Per binary conv and input element, what autograd holds until backward:

    float path (bireal_core)   the binarizer's real x (32 bits) + the conv's float sign(x) (32) = 64
    kernel path, ApproxSign    real x (32; its gradient needs |x|)   + packed sign(x) (1)    = 33
    kernel path, STE           packed mask |x| <= 1 (1)              + packed sign(x) (1)    =  2
    kernel path, identity                                              packed sign(x) (1)    =  1

(a packed word holds 64 channels, so a conv with C channels pays 64 * ceil(C/64) / C bits per sign:
4 bits at 16 channels). The weights' signs are saved packed too; the latent weights are parameters
(held anyway, nothing per image). The backward stays floating-point: the signs are unpacked and
``aten.convolution_backward`` gives the input and weight gradients, which then go through the
estimator and the weight-gradient rule exactly as in ``bireal_core.binarizers``. Under bf16
autocast (``precision: bf16``) the op returns bfloat16 and the backward unpacks the signs straight
to bfloat16 and runs its convs there, as autocast runs a float conv; the gradients come back in the
dtypes of x and W.

The forward is the more exact of the two paths: the float path sums C*KH*KW products alpha * (+-1)
in float32 (rounding at every add), the op sums integers exactly and multiplies by alpha once. They
differ by float32 rounding: relative ~1e-6 of the output's size (tests/test_training_kernels.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bireal_core.binarizers import approx_sign_grad, latent_weight_grad
from bireal_core.layers import BinaryConv2d

from . import ops

KERNELS = ("auto", "float")
ESTIMATORS = ("approx", "ste", "identity")


class _PackedBinaryConv(torch.autograd.Function):
    """conv(sign(x), alpha * sign(W)) + bias on the packed op; the backward of bireal_core's float
    path (estimator on x, weight-gradient rule on W) from 1-bit saved signs."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        alpha,
        bias,
        estimator: str,
        gradient: str,
        stride: int,
        padding: int,
        pad_value: float,
        out_dtype: torch.dtype | None,
    ):
        """alpha (O,): the weight binarizer's per-channel scale (ones for the rules without one);
        out_dtype: bfloat16 under bf16 autocast (what a float conv returns there), else None (fp32)."""
        channels = x.shape[1]
        packed_x = ops.pack_signs(x)  # (N, H, W, ceil(C/64)) int64: sign(x), 1 bit each
        packed_w = ops.pack_signs(weight)  # (O, KH, KW, ceil(C/64)) int64
        out = ops.binary_conv2d(
            packed_x, packed_w, channels, stride, padding, pad_value, scale=alpha, bias=bias, out_dtype=out_dtype
        )
        if estimator == "approx":
            estimator_input = x  # max(0, 2 - 2|x|) needs the real value
        elif estimator == "ste":
            estimator_input = ops.pack_signs(1.0 - x.abs())  # bit = (1 - |x| >= 0) = the mask |x| <= 1
        else:
            estimator_input = None
        ctx.save_for_backward(packed_x, packed_w, weight, alpha, estimator_input)
        ctx.geometry = (channels, x.shape, x.dtype, stride, padding, pad_value, bias is not None)
        ctx.rules = (estimator, gradient)
        ctx.compute_dtype = out_dtype or torch.float32  # the backward's convs run in the forward's precision
        return out

    @staticmethod
    def backward(ctx, grad_out):
        packed_x, packed_w, weight, alpha, estimator_input = ctx.saved_tensors
        channels, x_shape, x_dtype, stride, padding, pad_value, has_bias = ctx.geometry
        estimator, gradient = ctx.rules
        need_x, need_w, need_b = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        dtype = ctx.compute_dtype  # float32, or bfloat16 under autocast: signs unpacked straight to it
        w_b = ops.unpack_signs(packed_w, channels, dtype) * alpha.view(-1, 1, 1, 1).to(dtype)  # (O, C, KH, KW)
        grad_out = grad_out.to(dtype)
        # A constant border (pad_value +-1) is part of the input: pad it and convolve unpadded.
        border = pad_value != 0.0 and padding > 0
        conv_padding = 0 if border else padding
        if need_w:
            x_b = ops.unpack_signs(packed_x, channels, dtype)  # (N, C, H, W) +-1
            x_b = F.pad(x_b, (padding,) * 4, value=pad_value) if border else x_b
        else:  # only its shape is read: nothing to unpack
            n, c, h, w = x_shape
            grow = 2 * padding if border else 0
            x_b = grad_out.new_empty(()).expand(n, c, h + grow, w + grow)
        grad_xb, grad_wb, grad_bias = torch.ops.aten.convolution_backward(
            grad_out,
            x_b,
            w_b,
            [w_b.shape[0]] if has_bias else None,
            [stride, stride],
            [conv_padding, conv_padding],
            [1, 1],
            False,
            [0, 0],
            1,
            [need_x, need_w, need_b and has_bias],
        )
        grad_x = grad_w = None
        if need_x:
            if border:  # crop the constant border back off
                grad_xb = grad_xb[:, :, padding:-padding, padding:-padding]
            grad_x = _estimator_grad(estimator, grad_xb, estimator_input, channels).to(x_dtype)
        if need_w:
            grad_w = latent_weight_grad(gradient, grad_wb, weight, alpha.view(-1, 1, 1, 1)).to(weight.dtype)
        return grad_x, grad_w, None, grad_bias if need_b else None, None, None, None, None, None, None


def _estimator_grad(estimator: str, grad: torch.Tensor, saved: torch.Tensor | None, channels: int) -> torch.Tensor:
    """dL/dx from dL/d sign(x): bireal_core.binarizers' estimators, from what the forward saved."""
    if estimator == "approx":
        return grad * approx_sign_grad(saved.float())
    if estimator == "ste":
        return grad * ops.unpack_signs(saved, channels).clamp_(min=0.0)  # +-1 -> the 1/0 mask
    return grad


def packed_conv(conv: BinaryConv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` on the packed op: the function ``use_kernels`` puts in ``conv.kernel``. Under
    bf16 autocast it returns bfloat16 and its backward runs in bfloat16, as a float conv's would."""
    alpha = conv.weight_binarizer.scale(conv.weight.detach()).flatten()  # (O,): no gradient through it
    where = x.device.type
    low = torch.is_autocast_enabled(where) and torch.get_autocast_dtype(where) == torch.bfloat16
    return _PackedBinaryConv.apply(
        x,
        conv.weight,
        alpha,
        conv.bias,
        conv.input_binarizer.estimator,
        conv.weight_binarizer.gradient,
        conv.stride[0],
        conv.padding[0],
        conv.pad_value,
        torch.bfloat16 if low else None,
    )


def device_has_kernels(device: torch.device | str) -> bool:
    """Whether the binary ops run on ``device``: the CPU always, CUDA when the extension was built
    with its kernels."""
    device = torch.device(device)
    return device.type == "cpu" or (device.type == "cuda" and ops.cuda_built())


def unsupported(conv: BinaryConv2d) -> str | None:
    """Why ``conv`` must stay on the float path, or None when the packed op runs it."""
    if not conv.is_binary:
        return "not binary (a real-valued twin, or two-step's first step with real weights)"
    if getattr(conv.input_binarizer, "estimator", None) not in ESTIMATORS:
        return f"input binarizer {type(conv.input_binarizer).__name__} has no known estimator"
    if not (hasattr(conv.weight_binarizer, "gradient") and hasattr(conv.weight_binarizer, "scale")):
        return f"weight binarizer {type(conv.weight_binarizer).__name__} has no weight-gradient rule and scale"
    if conv.groups != 1 or conv.dilation != (1, 1):
        return "groups or dilation other than 1"
    if conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]:
        return "unequal strides or paddings along H and W"
    return None


def use_kernels(model: nn.Module, kernels: str = "auto", device: torch.device | str = "cpu") -> int:
    """Route every binary conv of ``model`` the op can run through the packed kernels (``auto``,
    where ``device`` has them) or back to the float path (``float``). Returns how many convs now
    run packed. Call it again after the binarizers change (two-step's switch resets it)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    on = kernels == "auto" and device_has_kernels(device)
    packed = 0
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            m.kernel = packed_conv if on and unsupported(m) is None else None
            packed += m.kernel is not None
    return packed


def saved_activation_bytes(model: nn.Module, step) -> int:
    """Bytes autograd saves for backward while ``step()`` runs a forward of ``model``: each distinct
    storage once, the model's parameters and buffers left out (held anyway, not per image)."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())
