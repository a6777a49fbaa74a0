"""``BinaryConv2d``: the float simulation of a 1-bit convolution that every kernel reproduces."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .binarizers import is_binarizer

PAD_VALUES = (0.0, 1.0, -1.0)


class BinaryConv2d(nn.Conv2d):
    """``nn.Conv2d`` that binarizes its input and weight before convolving.

    ``input_binarizer`` is applied to the input (for the real-valued twin it is the twin's
    activation, e.g. ReLU, so both nets share one layer type and parameter names);
    ``weight_binarizer`` to the weight. ``pad_value`` is what the border holds *after* the input
    binarizer: 0 is the official zero padding (a value no bit can hold: the kernels correct for
    it exactly), +1 / -1 pad with a representable sign. With both binarizers ``None`` and
    ``pad_value=0`` this module is exactly ``nn.Conv2d``.
    """

    def __init__(
        self,
        *args,
        input_binarizer: nn.Module | None = None,
        weight_binarizer: nn.Module | None = None,
        pad_value: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if float(pad_value) not in PAD_VALUES:
            raise ValueError(f"pad_value must be one of {PAD_VALUES}, got {pad_value!r}")
        if self.padding_mode != "zeros":
            raise ValueError("BinaryConv2d supports padding_mode='zeros' only (pad_value sets the border)")
        self.input_binarizer = input_binarizer
        self.weight_binarizer = weight_binarizer
        self.pad_value = float(pad_value)
        # Set by ``cuda_ext.training.use_kernels``: (conv, x) -> out, this conv run on the packed
        # 1-bit kernels with a backward of its own. None: the float simulation below.
        self.kernel: Callable[[BinaryConv2d, torch.Tensor], torch.Tensor] | None = None

    @property
    def is_binary(self) -> bool:
        """True when both operands are +-1 (times a per-channel scale): a 1-bit conv."""
        return is_binarizer(self.input_binarizer) and self.weight_binarizer is not None

    def binary_weight(self) -> torch.Tensor:
        w = self.weight
        return self.weight_binarizer(w) if self.weight_binarizer is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(self, x)
        if self.input_binarizer is not None:
            x = self.input_binarizer(x)
        w = self.binary_weight()
        if self.pad_value == 0.0:
            return self._conv_forward(x, w, self.bias)
        ph, pw = self.padding  # (left, right, top, bottom) for F.pad
        x = F.pad(x, (pw, pw, ph, ph), value=self.pad_value)
        return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        kernel = ", kernel=packed" if self.kernel is not None else ""
        return super().extra_repr() + f", pad_value={self.pad_value:g}{kernel}"
