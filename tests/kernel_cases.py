"""Kernel inputs shared by the CPU tests (test_kernels.py) and the GPU tests (test_cuda.py)."""

import torch

from cuda_ext.reference import pack_signs_ref, pack_weight_ref


def signed_zero_nan_subnormal_case(out_dtype):
    """A block whose outputs include +0, -0, NaN and +-2^-130 (subnormal in float32 and bf16): in
    channels 0-15 scale 0 and bias -0 leave dot * 0 (+-0 by the dot's sign) plus the residual, which
    is -0 (channels 0-3), NaN (4-7), -2^-130 (8-11) or +2^-130 (12-15). Their signs: +1 for +-0 (x >=
    0), -1 for NaN, and the subnormals' own (flushed to -0, the negative one would read +1)."""
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(2, 64, 9, 8, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    args = (pack_signs_ref(x), pack_weight_ref(w), 64, 1, 1, 0.0)
    scale, bias = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    scale[:16], bias[:16] = 0.0, -0.0
    residual = torch.randn(2, 64, 9, 8, generator=g)
    for first, value in ((0, -0.0), (4, float("nan")), (8, -(2.0**-130)), (12, 2.0**-130)):
        residual[:, first : first + 4] = value
    return args, scale, bias, residual.to(out_dtype)


def has_the_edge_outputs(out: torch.Tensor) -> bool:
    """Whether a block output of signed_zero_nan_subnormal_case holds what its docstring says."""
    edge = out[:, :16]
    zeros = edge[:, :4]
    return bool(
        (zeros == 0).all() and zeros.signbit().any() and (~zeros.signbit()).any() and edge[:, 4:8].isnan().all()
        and (edge[:, 8:12] < 0).all() and (edge[:, 12:] > 0).all()
    )  # fmt: skip


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit where not NaN (so -0 differs from +0), NaN in the same places."""
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(ints)[~nan], b.view(ints)[~nan])
