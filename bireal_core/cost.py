"""Cost accounting the paper's way (Liu et al., Table 1; larq's ``models.summary`` in spirit).

Counted, per layer and in total (one forward of one image):
- binary MACs: multiply-accumulates of convs whose input AND weight are binarized;
- real MACs: every other conv and the FC layer (stem, downsample 1x1, bottleneck adapters, head);
- OPs = binary MACs / 64 + real MACs (a 64-bit popcount does 64 binary MACs);
- memory = 1 bit per binary-conv weight + 32 bits per other parameter (BN affine, FC bias, ...);
  BN running statistics are buffers, not parameters, and are not counted (at inference they fold
  into a per-channel scale and bias); Mbit = 1e6 bits.
Not counted, as in the paper: BN, sign, pooling, shortcut additions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .layers import BinaryConv2d

# The paper's table (ImageNet stem, 1000 classes): memory in Mbit, OPs.
PAPER_TABLE = {
    "bireal18": {"memory_mbit": 33.6, "ops": 1.63e8},
    "bireal34": {"memory_mbit": 43.7, "ops": 1.93e8},
    "resnet18": {"memory_mbit": 374.1, "ops": 1.81e9},
    "resnet34": {"memory_mbit": 697.3, "ops": 3.66e9},
}


@dataclass
class LayerCost:
    name: str
    kind: str  # "binary" | "real"
    shape: str  # weight shape, e.g. "64x64x3x3"
    macs: int
    params: int


@dataclass
class CostSummary:
    arch: str
    input_size: int
    layers: list[LayerCost] = field(default_factory=list)
    binary_params: int = 0
    real_params: int = 0
    paper_setting: bool = False  # ImageNet stem, width 1, 1000 classes, 224 px: the table's setting

    @property
    def binary_macs(self) -> int:
        return sum(l.macs for l in self.layers if l.kind == "binary")

    @property
    def real_macs(self) -> int:
        return sum(l.macs for l in self.layers if l.kind == "real")

    @property
    def ops(self) -> float:
        return self.binary_macs / 64 + self.real_macs

    @property
    def params(self) -> int:
        return self.binary_params + self.real_params

    @property
    def memory_mbit(self) -> float:
        return (self.binary_params + 32 * self.real_params) / 1e6

    def totals(self) -> dict:
        return {
            "arch": self.arch,
            "input_size": self.input_size,
            "ops": self.ops,
            "memory_mbit": self.memory_mbit,
            "binary_macs": self.binary_macs,
            "real_macs": self.real_macs,
            "params": self.params,
            "binary_params": self.binary_params,
            "real_params": self.real_params,
        }

    def as_dict(self, layers: bool = False) -> dict:
        d = self.totals()
        if layers:
            d["layers"] = [asdict(l) for l in self.layers]
        return d

    def table(self, layers: bool = False) -> str:
        lines = []
        if layers:
            lines.append(f"{'layer':<34}{'kind':>7}{'weight':>16}{'MACs':>14}{'params':>11}")
            lines += [f"{l.name:<34}{l.kind:>7}{l.shape:>16}{l.macs:>14,}{l.params:>11,}" for l in self.layers]
            lines.append("")
        paper = PAPER_TABLE.get(self.arch, {}) if self.paper_setting else {}
        rows = [
            ("binary MACs", f"{self.binary_macs:.4g}", ""),
            ("real MACs", f"{self.real_macs:.4g}", ""),
            ("OPs (binary/64 + real)", f"{self.ops:.4g}", paper.get("ops", "")),
            ("memory (Mbit)", f"{self.memory_mbit:.2f}", paper.get("memory_mbit", "")),
            ("params (binary / real)", f"{self.binary_params:,} / {self.real_params:,}", ""),
        ]
        lines.append(f"{self.arch} @ {self.input_size}x{self.input_size}")
        lines.append(f"{'quantity':<26}{'ours':>26}{'paper':>12}")
        lines += [f"{k:<26}{v:>26}{(f'{p:.4g}' if p != '' else '-'):>12}" for k, v, p in rows]
        return "\n".join(lines)


def _is_binary(module: nn.Module) -> bool:
    return isinstance(module, BinaryConv2d) and module.is_binary


def summary(model: nn.Module, input_size: int | None = None, arch: str | None = None) -> CostSummary:
    """Count MACs with one forward of a single image (eval mode, no grad) and params by kind."""
    spec = getattr(model, "model_spec", {"name": type(model).__name__, "kwargs": {}})
    if input_size is None:
        input_size = 32 if spec["kwargs"].get("stem") == "small" else 224
    kw = spec["kwargs"]
    result = CostSummary(
        arch=arch or spec["name"],
        input_size=input_size,
        paper_setting=(
            kw.get("stem", "imagenet") == "imagenet"
            and kw.get("width", 1.0) == 1.0
            and kw.get("num_classes", 1000) == 1000
            and input_size == 224
        ),
    )

    def hook(name):
        def record(module, inputs, output):
            kind = "binary" if _is_binary(module) else "real"
            w = module.weight
            if isinstance(module, nn.Conv2d):
                macs = output[0].numel() * w.shape[1] * w.shape[2] * w.shape[3]
            else:  # nn.Linear
                macs = w.shape[0] * w.shape[1]
            result.layers.append(
                LayerCost(
                    name,
                    kind,
                    "x".join(map(str, w.shape)),
                    int(macs),
                    sum(p.numel() for p in module.parameters(recurse=False)),
                )
            )

        return record

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, dtype=param.dtype, device=param.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    binary_weights = {id(m.weight) for m in model.modules() if _is_binary(m)}
    for p in model.parameters():
        if id(p) in binary_weights:
            result.binary_params += p.numel()
        else:
            result.real_params += p.numel()
    return result
