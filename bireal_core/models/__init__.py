"""Importing this package registers every model family."""
from . import bireal, bireal_bottleneck, float_resnet  # noqa: F401  (registration side effect)
from .common import ConvSpec, set_binary_weights

__all__ = ["ConvSpec", "set_binary_weights"]
