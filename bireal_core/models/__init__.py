"""Importing this package registers every model family."""

from . import binary_resnet, bireal, bireal_bottleneck, float_resnet  # noqa: F401  (registration side effect)
from .common import ConvSpec, binary_conv_bn_pairs, set_binary_weights

__all__ = ["ConvSpec", "binary_conv_bn_pairs", "set_binary_weights"]
