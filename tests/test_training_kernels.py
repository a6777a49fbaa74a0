"""Training through the binary kernels (cuda_ext.training, ``kernels: auto``) against the float
simulation it replaces: one conv over every estimator, weight-gradient rule, pad value, stride and
channel count; every binary conv of whole nets (basic, bottleneck, no-shortcut); what autograd
saves; torch.compile; and seeded training runs on the demo data."""

import copy
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bireal_core as bc
from bireal_core.binarizers import SIGN_ACTIVATIONS, WEIGHT_GRADIENTS, MagnitudeAwareSign, make_activation
from bireal_core.layers import PAD_VALUES, BinaryConv2d
from cuda_ext import ops
from cuda_ext.reference import unpack_signs_ref
from cuda_ext.training import saved_activation_bytes, unsupported, use_kernels


def binary_conv(c_in, c_out, activation, gradient, pad_value=0.0, stride=1, k=3, bias=False):
    return BinaryConv2d(
        c_in,
        c_out,
        k,
        stride=stride,
        padding=k // 2,
        bias=bias,
        input_binarizer=make_activation(activation),
        weight_binarizer=MagnitudeAwareSign(gradient),
        pad_value=pad_value,
    )


def both_paths(conv: BinaryConv2d, x: torch.Tensor, grad: torch.Tensor | None = None):
    """(output, dL/dx, dL/dW, dL/db) of the float path and of the packed path, same input and dL/dout,
    on ``x``'s device (tests/test_cuda.py runs it on a GPU)."""
    results = []
    for kernels in ("float", "auto"):
        layer = copy.deepcopy(conv).to(x.device)
        assert use_kernels(layer, kernels, x.device) == (kernels == "auto")
        xi = x.detach().clone().requires_grad_()
        out = layer(xi)
        if grad is None:  # the same dL/dout on both paths (randn_like would follow the output's layout)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        out.backward(grad)
        results.append((out.detach(), xi.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad))
    return results


def close_to_float(got, want, rtol=2e-5):
    """Within float32 rounding of the float path, relative to the tensor's size: the packed forward
    sums integers exactly and scales once; the float path rounds at each of C*k*k adds."""
    scale = want.detach().abs().max().clamp(min=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=float(scale) * rtol)


@pytest.mark.parametrize(
    "activation,gradient,pad_value,stride",
    list(itertools.product(SIGN_ACTIVATIONS, WEIGHT_GRADIENTS, PAD_VALUES, (1, 2))),
)
def test_one_conv_matches_the_float_path(activation, gradient, pad_value, stride):
    conv = binary_conv(64, 32, activation, gradient, pad_value, stride)
    x = torch.randn(2, 64, 9, 10) * 0.8  # |x| on both sides of 1: the estimators' clip is exercised
    (out_f, gx_f, gw_f, _), (out_k, gx_k, gw_k, _) = both_paths(conv, x)
    assert out_k.shape == out_f.shape
    close_to_float(out_k, out_f)
    close_to_float(gx_k, gx_f)
    close_to_float(gw_k, gw_f)
    if activation == "approx_sign":
        assert (gx_f == 0).any() and (gx_f != 0).any()  # the estimator's zero region is in play


@pytest.mark.parametrize("channels", [3, 16, 100, 128, 200])
@pytest.mark.parametrize("k,bias", [(3, True), (1, False)])
def test_channel_counts_kernel_sizes_and_bias(channels, k, bias):
    conv = binary_conv(channels, 24, "ste_sign", "paper", 0.0, 1, k=k, bias=bias)
    x = torch.randn(3, channels, 7, 6)
    (out_f, gx_f, gw_f, gb_f), (out_k, gx_k, gw_k, gb_k) = both_paths(conv, x)
    close_to_float(out_k, out_f)
    close_to_float(gx_k, gx_f)
    close_to_float(gw_k, gw_f)
    if bias:
        close_to_float(gb_k, gb_f)


def test_the_packed_forward_is_the_exact_one():
    """Against a float64 convolution of the same signs, the packed output is exact up to its one
    float32 rounding of dot * alpha; the float path's float32 sums are further off or equal."""
    torch.manual_seed(3)
    conv = binary_conv(256, 64, "approx_sign", "paper")
    x = torch.randn(2, 256, 8, 8)
    (out_f, *_), (out_k, *_) = both_paths(conv, x)
    w = conv.weight.detach().double()
    alpha = w.abs().mean(dim=(1, 2, 3)).view(1, -1, 1, 1)
    exact = torch.nn.functional.conv2d(bc.sign(x).double(), bc.sign(w), padding=1) * alpha
    err_k, err_f = (out_k.double() - exact).abs().max(), (out_f.double() - exact).abs().max()
    assert err_k <= float(exact.abs().max()) * 2**-23  # one rounding to float32
    assert err_k <= err_f


def test_frozen_weights_and_inputs_without_grad():
    """finetune freezes the binary convs' weights: no weight gradient, the input one unchanged."""
    conv = binary_conv(64, 64, "approx_sign", "paper")
    x = torch.randn(2, 64, 6, 6)
    frozen = copy.deepcopy(conv).requires_grad_(False)
    (_, gx_f, _, _), (_, gx_k, gw_k, _) = both_paths(frozen, x)
    assert gw_k is None
    close_to_float(gx_k, gx_f)
    packed = copy.deepcopy(conv)
    use_kernels(packed)
    packed(x).sum().backward()  # x needs no grad: only the weight's
    assert packed.weight.grad is not None


@pytest.mark.parametrize("channels", [1, 7, 64, 65, 130])
def test_unpack_signs_inverts_pack_signs(channels):
    x = torch.randn(2, channels, 3, 5)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    packed = ops.pack_signs(x)
    unpacked = ops.unpack_signs(packed, channels)
    assert torch.equal(unpacked, bc.sign(x))
    assert torch.equal(unpacked, unpack_signs_ref(packed, channels))
    with pytest.raises(ValueError, match="words"):
        ops.unpack_signs(packed, channels + 64)


def test_which_convs_go_packed():
    twin = bc.create_twin("bireal18", activation="relu", num_classes=10, stem="small", width=0.25)
    assert use_kernels(twin) == 0  # the real-valued twin has no binary conv
    assert "not binary" in unsupported(next(m for m in twin.modules() if isinstance(m, BinaryConv2d)))
    net = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25)
    binary = [m for m in net.modules() if isinstance(m, BinaryConv2d) and m.is_binary]
    assert use_kernels(net) == len(binary) == 16
    assert all(m.kernel is not None for m in binary) and "kernel=packed" in repr(binary[0])
    assert use_kernels(net, "float") == 0 and all(m.kernel is None for m in binary)
    use_kernels(net)
    bc.set_binary_weights(net, False)  # two-step's first step: real weights, the float path
    assert all(m.kernel is None for m in binary) and use_kernels(net) == 0
    grouped = BinaryConv2d(
        4, 4, 3, groups=2, input_binarizer=make_activation("approx_sign"), weight_binarizer=MagnitudeAwareSign()
    )
    assert "groups" in unsupported(grouped) and use_kernels(grouped) == 0
    with pytest.raises(ValueError, match="kernels must be one of"):
        use_kernels(net, "packed")


def record_binary_conv_inputs(model):
    """Forward pre-hooks that keep every binary conv's input, in call order."""
    seen = []
    for m in model.modules():
        if isinstance(m, BinaryConv2d) and m.is_binary:
            m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach())))
    return seen


NETS = [
    ("bireal18", "small", 32),
    ("bireal34", "small", 32),
    ("bireal50", "imagenet", 64),  # bottleneck: 1x1 binary convs, padding 0
    ("binary_resnet18", "small", 32),  # no shortcut around each conv
]


@pytest.mark.parametrize("arch,stem,size", NETS)
def test_every_binary_conv_of_a_net_matches_on_its_real_inputs(arch, stem, size):
    """Each binary conv, fed the input it sees in a training forward of the float net, gives the
    float path's output and gradients: the nets' shapes, strides and activations, conv by conv."""
    model = bc.create_model(arch, num_classes=10, stem=stem, width=0.25)
    inputs = record_binary_conv_inputs(model)
    model(torch.randn(2, 3, size, size))
    assert len(inputs) == sum(isinstance(m, BinaryConv2d) and m.is_binary for m in model.modules())
    for conv, x in inputs:
        conv._forward_pre_hooks.clear()
        (out_f, gx_f, gw_f, _), (out_k, gx_k, gw_k, _) = both_paths(conv, x)
        close_to_float(out_k, out_f)
        close_to_float(gx_k, gx_f)
        close_to_float(gw_k, gw_f)


@pytest.mark.parametrize("arch,stem,size", NETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_whole_nets_agree_but_for_signs_of_rounding_ties(arch, stem, size, seed):
    """End to end, the two paths differ only where the float path's rounding decides the sign of a
    value that is 0 up to rounding (a tie: common in the no-shortcut net, where BN of an integer dot
    product sits on its batch mean). Where no sign differs, logits and gradients agree closely."""
    torch.manual_seed(seed)
    float_net = bc.create_model(arch, num_classes=10, stem=stem, width=0.25)
    packed_net = copy.deepcopy(float_net)
    assert use_kernels(packed_net) > 0
    seen_f, seen_k = record_binary_conv_inputs(float_net), record_binary_conv_inputs(packed_net)
    x = torch.randn(4, 3, size, size)
    logits_f, logits_k = float_net(x), packed_net(x)
    flips, signs = 0, 0
    for (_, a), (_, b) in zip(seen_f, seen_k):
        differ = (a >= 0) != (b >= 0)
        flips, signs = flips + int(differ.sum()), signs + a.numel()
        if differ.any():  # each one a tie: both values within rounding of 0
            tie = a.abs().max() * 1e-5
            assert a[differ].abs().max() <= tie and b[differ].abs().max() <= tie
            break  # after the first tie, the two forwards see different inputs
    assert flips <= 1e-3 * signs
    if flips:  # a different (equally valid) sign downstream: the nets' outputs now legitimately differ
        return
    close_to_float(logits_k, logits_f, rtol=1e-5)
    logits_f.logsumexp(1).sum().backward()
    logits_k.logsumexp(1).sum().backward()
    for (name, p_f), p_k in zip(float_net.named_parameters(), packed_net.parameters()):
        torch.testing.assert_close(p_k.grad, p_f.grad, rtol=0, atol=float(p_f.grad.abs().max()) * 1e-3, msg=name)


@pytest.mark.parametrize(
    "activation,channels,float_bits,packed_bits",
    [
        ("approx_sign", 64, 64, 33),  # real x for the estimator + 1-bit signs
        ("ste_sign", 64, 64, 2),  # 1-bit mask |x| <= 1 + 1-bit signs
        ("identity_sign", 64, 64, 1),
        ("ste_sign", 128, 64, 2),
        ("ste_sign", 16, 64, 8),  # one 64-bit word per pixel holds 16 channels: 4 bits per sign, twice
    ],
)
def test_saved_for_backward_per_element(activation, channels, float_bits, packed_bits):
    """Bits autograd keeps per input element of one binary conv; the per-image part is what grows
    from batch 2 to batch 4 (the weights' own saved tensors do not)."""
    conv = binary_conv(channels, 32, activation, "paper")

    def bits_per_element(kernels):
        use_kernels(conv, kernels)
        saved = {
            n: saved_activation_bytes(conv, lambda n=n: conv(torch.randn(n, channels, 8, 8, requires_grad=True)))
            for n in (2, 4)
        }
        return (saved[4] - saved[2]) * 8 / (2 * channels * 8 * 8)

    assert bits_per_element("float") == float_bits
    assert bits_per_element("auto") == packed_bits


def test_saved_bytes_of_a_whole_net_shrink():
    model = bc.create_model("bireal18", num_classes=10, stem="small", width=0.5)
    x = torch.randn(2, 3, 32, 32)
    saved = {}
    for kernels in ("float", "auto"):
        use_kernels(model, kernels)
        saved[kernels] = saved_activation_bytes(model, lambda: model(x))
    # 16 binary convs, each saving 33 instead of 64 bits per input element: at least 1/4 less overall
    assert saved["auto"] < 0.75 * saved["float"]


def test_torch_compile_of_a_packed_net():
    """The ops' fake kernels let torch.compile trace the packed convs, forward and backward."""
    model = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25)
    use_kernels(model)
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    eager.logsumexp(1).sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled.logsumexp(1).sum().backward()
    close_to_float(compiled, eager, rtol=1e-5)
    for p, want in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=float(want.abs().max()) * 1e-3)


class ConvBackwardDtypes(TorchDispatchMode):
    """Records the dtype every ``aten.convolution_backward`` runs in."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation", SIGN_ACTIVATIONS)
def test_under_bf16_autocast_the_packed_conv_runs_in_bf16_like_a_float_conv(activation):
    """``precision: bf16``: the packed op returns bfloat16 and its backward convolves in bfloat16,
    as autocast runs the float path; the gradients come back in x's and W's dtypes and agree with
    the float path's to bfloat16's precision (tests/test_cuda.py runs it on a GPU)."""
    bf16_autocast_case(activation, torch.device("cpu"))


def bf16_autocast_case(activation: str, device: torch.device) -> None:
    conv = binary_conv(64, 32, activation, "paper", 1.0, 1)
    x = (torch.randn(2, 64, 9, 10) * 0.8).to(device)
    grad = torch.randn(2, 32, 9, 10, generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for kernels in ("float", "auto"):
        layer = copy.deepcopy(conv).to(device)
        use_kernels(layer, kernels, device)
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, torch.bfloat16):
            out = layer(xi)
        with ConvBackwardDtypes() as seen:
            out.backward(grad.to(out.dtype))
        results[kernels] = (out.detach().float(), xi.grad, layer.weight.grad, out.dtype, seen.dtypes)
    (out_f, gx_f, gw_f, dtype_f, seen_f), (out_k, gx_k, gw_k, dtype_k, seen_k) = results["float"], results["auto"]
    assert dtype_k == dtype_f == torch.bfloat16
    assert seen_k == [torch.bfloat16] and set(seen_f) == {torch.bfloat16}
    assert gx_k.dtype == gw_k.dtype == torch.float32
    close_to_float(out_k, out_f, rtol=1e-2)  # bfloat16 keeps 8 bits of mantissa
    close_to_float(gx_k, gx_f, rtol=2e-2)
    close_to_float(gw_k, gw_f, rtol=2e-2)
