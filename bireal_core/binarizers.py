"""Binarizers: forward sign functions with the gradient estimators of Bi-Real Net.

Every binarizer is a small ``nn.Module`` whose forward is ``sign`` (with +1 at 0: a bit cannot
hold 0, and the kernels in ``cuda_ext`` use the same convention) and whose backward is the
estimator it is named after. References: Liu et al., ECCV 2018, Sec. 3.2-3.3 (ApproxSign,
magnitude-aware weights); ``../docs/science.md`` says which of the paper's / official code's
choices each setting reproduces.
"""

from __future__ import annotations

import torch
from torch import nn


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0, -1 elsewhere (``torch.sign`` would return 0 at 0)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _SignWithGrad(torch.autograd.Function):
    """sign forward; backward multiplies by ``kind``'s derivative of the smooth surrogate."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.kind = kind
        return sign(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        if ctx.kind == "approx":
            return grad_out * approx_sign_grad(x), None
        if ctx.kind == "ste":
            return grad_out * (x.abs() <= 1.0).to(grad_out.dtype), None
        return grad_out, None  # identity


def approx_sign_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of ApproxSign's piecewise polynomial F: 2 + 2x on [-1, 0), 2 - 2x on [0, 1), else 0."""
    return torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)


class ApproxSign(nn.Module):
    """sign(x) forward; backward through ApproxSign, dF/dx = max(0, 2 - 2|x|) (paper Eq. 7)."""

    binary = True
    estimator = "approx"  # the backward's name in _SignWithGrad and cuda_ext.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignWithGrad.apply(x, self.estimator)


class SteSign(nn.Module):
    """sign(x) forward; straight-through gradient clipped to |x| <= 1 (BinaryNet's STE)."""

    binary = True
    estimator = "ste"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignWithGrad.apply(x, self.estimator)


class IdentitySign(nn.Module):
    """sign(x) forward; the incoming gradient passes unchanged (the weakest ablation baseline)."""

    binary = True
    estimator = "identity"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignWithGrad.apply(x, self.estimator)


class _MagnitudeAwareSign(torch.autograd.Function):
    """W_b = alpha * sign(W), alpha = mean|W| per output channel; the paper's gradient.

    Backward: dL/dW = dL/dW_b * alpha * 1{|W| < 1}. The term through d alpha / dW is
    dropped, as in the paper's Eq. 9.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        alpha = channel_scale(w)  # (C_out, 1, 1, 1)
        ctx.save_for_backward(w, alpha)
        return alpha * sign(w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w, alpha = ctx.saved_tensors
        return latent_weight_grad("paper", grad_out, w, alpha)


class _ClippedSte(torch.autograd.Function):
    """Forward ``scale * sign(W)`` with a constant scale; backward dL/dW_b * 1{|W| <= 1}."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return scale * sign(w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (w,) = ctx.saved_tensors
        return latent_weight_grad("plain", grad_out, w), None


class _Ste(torch.autograd.Function):
    """Forward sign(W); backward passes dL/dW_b unchanged (the Caffe model: no alpha, no clip)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        return sign(w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out


def channel_scale(w: torch.Tensor) -> torch.Tensor:
    """alpha = mean |W| over every dim but the first: (C_out, C_in, k, k) -> (C_out, 1, 1, 1)."""
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


WEIGHT_GRADIENTS = ("paper", "official", "plain", "caffe")


def latent_weight_grad(
    gradient: str, grad_wb: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor | None = None
) -> torch.Tensor:
    """dL/dW from dL/dW_b under weight-gradient rule ``gradient`` (see ``MagnitudeAwareSign``);
    ``alpha`` (C_out, 1, 1, 1) is needed by ``paper`` only. The float path's autograd functions and
    the kernel path (cuda_ext.training) both call this."""
    if gradient == "paper":
        return grad_wb * alpha * (w.abs() < 1.0).to(grad_wb.dtype)
    if gradient in ("official", "plain"):
        return grad_wb * (w.abs() <= 1.0).to(grad_wb.dtype)
    return grad_wb  # caffe


class MagnitudeAwareSign(nn.Module):
    """Weight binarizer of Bi-Real Net with the weight gradient as a setting.

    - ``paper``: W_b = alpha * sign(W), dL/dW = dL/dW_b * alpha * 1{|W| < 1} (paper Eq. 9).
    - ``official``: the authors' PyTorch code: alpha detached, dL/dW = dL/dW_b * 1{|W| <= 1}.
    - ``plain``: W_b = sign(W) without alpha, clipped STE (XNOR/BinaryNet style baseline).
    - ``caffe``: the authors' Caffe model: W_b = sign(W), dL/dW = dL/dW_b (no alpha, no clip).
    """

    binary = True

    def __init__(self, gradient: str = "paper"):
        super().__init__()
        if gradient not in WEIGHT_GRADIENTS:
            raise ValueError(f"weight gradient must be one of {WEIGHT_GRADIENTS}, got {gradient!r}")
        self.gradient = gradient

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.gradient == "paper":
            return _MagnitudeAwareSign.apply(w)
        if self.gradient == "official":
            return _ClippedSte.apply(w, channel_scale(w).detach())
        if self.gradient == "caffe":
            return _Ste.apply(w)
        return _ClippedSte.apply(w, torch.ones((), dtype=w.dtype, device=w.device))

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-output-channel factor the forward multiplies sign(W) by: (C_out, 1, 1, 1)."""
        if self.gradient in ("plain", "caffe"):
            return torch.ones_like(channel_scale(w))
        return channel_scale(w)

    def extra_repr(self) -> str:
        return f"gradient={self.gradient!r}"


class LeakyClip(nn.Module):
    """Identity on [-1, 1], slope 0.1 outside: the second phase of the paper's initialization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x < -1, 0.1 * x - 0.9, torch.where(x > 1, 0.1 * x + 0.9, x))


class Clip(nn.Module):
    """clip(x, -1, 1): the last phase of the initialization, closest to sign."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, -1.0, 1.0)


# The activation in front of every binary conv, by name. Sign-type entries binarize
# (``binary = True``); the rest are the real-valued twin's activations.
ACTIVATIONS = {
    "approx_sign": ApproxSign,
    "ste_sign": SteSign,
    "identity_sign": IdentitySign,
    "relu": nn.ReLU,
    "leaky_clip": LeakyClip,
    "clip": Clip,
}
SIGN_ACTIVATIONS = ("approx_sign", "ste_sign", "identity_sign")
TWIN_ACTIVATIONS = ("relu", "leaky_clip", "clip")


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def is_binarizer(module: nn.Module | None) -> bool:
    return module is not None and getattr(module, "binary", False)
