"""LoRA: low-rank adapters on chosen Linear weights (Hu et al. 2021), for the paper's ablation (f) and the LoRA
baselines (train.py --lora-rank). NewMove itself trains full weights."""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


class LoRA(nn.Module):
    """weight -> weight + scale * up @ down, as a parametrization of a frozen nn.Linear. `up` starts at zero so
    training starts from the base model."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float):
        super().__init__()
        out_f, in_f = weight.shape
        self.down = nn.Parameter(torch.randn(rank, in_f, device=weight.device) / math.sqrt(in_f))
        self.up = nn.Parameter(torch.zeros(out_f, rank, device=weight.device))
        self.scale = scale

    def forward(self, weight):
        return weight + (self.scale * self.up @ self.down).to(weight.dtype)


def add_lora(model: nn.Module, params: list, rank: int, scale: float) -> list:
    """A LoRA on every 2-D weight among `params` [(name, parameter)], in module order; returns the adapters'
    [(name, parameter)] (the only ones that then train)."""
    linear = {n[: -len(".weight")] for n, p in params if n.endswith(".weight") and p.ndim == 2}
    for name, module in model.named_modules():
        if name in linear:
            parametrize.register_parametrization(module, "weight", LoRA(module.weight, rank, scale))
    return [(n, p) for n, p in model.named_parameters() if ".parametrizations.weight.0." in n]


def merge_lora(model: nn.Module):
    """Fold every LoRA into the weight it adapts (W + scale * up @ down): plain weights again, same outputs."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
