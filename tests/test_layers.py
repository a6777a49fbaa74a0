import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bireal_core import ApproxSign, BinaryConv2d, MagnitudeAwareSign, sign


@pytest.mark.parametrize("stride,padding,bias", [(1, 1, False), (2, 1, True), (1, 0, False)])
def test_without_binarizers_equals_conv2d(stride, padding, bias):
    ref = nn.Conv2d(5, 7, 3, stride=stride, padding=padding, bias=bias)
    ours = BinaryConv2d(5, 7, 3, stride=stride, padding=padding, bias=bias)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 9, 11, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(ours(x), ref(x2), rtol=0, atol=0)
    ours(x).sum().backward()
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
def test_binary_conv_is_integer_dot_product_with_pad_value(pad_value):
    conv = BinaryConv2d(
        6,
        4,
        3,
        padding=1,
        bias=False,
        input_binarizer=ApproxSign(),
        weight_binarizer=MagnitudeAwareSign("plain"),
        pad_value=pad_value,
    )
    x = torch.randn(2, 6, 5, 5)
    x[0, 0, 0, :2] = 0.0  # exact zeros binarize to +1
    out = conv(x)
    padded = F.pad(sign(x), (1, 1, 1, 1), value=pad_value)
    ref = F.conv2d(padded.double(), sign(conv.weight).double())
    assert torch.equal(out.double(), ref)
    assert torch.equal(out, out.round())  # +-1 operands give integers


def test_is_binary_requires_both_operands():
    assert BinaryConv2d(2, 2, 3, input_binarizer=ApproxSign(), weight_binarizer=MagnitudeAwareSign()).is_binary
    assert not BinaryConv2d(2, 2, 3, input_binarizer=ApproxSign()).is_binary
    assert not BinaryConv2d(2, 2, 3, input_binarizer=nn.ReLU(), weight_binarizer=MagnitudeAwareSign()).is_binary


def test_bad_pad_value_rejected():
    with pytest.raises(ValueError, match="pad_value"):
        BinaryConv2d(2, 2, 3, pad_value=0.5)
