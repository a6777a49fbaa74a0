"""bireal_core: Bi-Real Net in plain PyTorch (binarizers, layers, models, checkpoints, cost).

Imports nothing from the pipeline; everything here runs on a CPU.
"""

from . import models  # noqa: F401  (registers every model family)
from .binarizers import ApproxSign, Clip, IdentitySign, LeakyClip, MagnitudeAwareSign, SteSign, channel_scale, sign
from .checkpoint import CheckpointError, NonFiniteError, load_checkpoint, read_header, save_checkpoint
from .cost import PAPER_TABLE, CostSummary, summary
from .layers import BinaryConv2d
from .models import ConvSpec, binary_conv_bn_pairs, set_binary_weights
from .preprocess import AUGMENTS, default_input_config, input_config_problem
from .registry import create_model, list_models, register_model
from .twin import InitReport, create_twin, init_from_twin

__all__ = [
    "AUGMENTS",
    "ApproxSign",
    "BinaryConv2d",
    "binary_conv_bn_pairs",
    "CheckpointError",
    "Clip",
    "ConvSpec",
    "CostSummary",
    "IdentitySign",
    "InitReport",
    "LeakyClip",
    "MagnitudeAwareSign",
    "NonFiniteError",
    "PAPER_TABLE",
    "SteSign",
    "channel_scale",
    "create_model",
    "default_input_config",
    "create_twin",
    "init_from_twin",
    "input_config_problem",
    "list_models",
    "load_checkpoint",
    "read_header",
    "register_model",
    "save_checkpoint",
    "set_binary_weights",
    "sign",
    "summary",
]
