"""Test oracles: the ORIGINAL ModelScope model files loaded by path, and helpers to give tiny models random weights.

The `modelscope` wheel ships `unet_sd.py`, `autoencoder.py` and `diffusion.py` byte-identical to the GitHub release
(modelscope.md §8.1). Importing them through the package runs `modelscope/__init__` and fails without its heavy extras,
so they are executed directly from their file path; they need only torch, einops and numpy.
"""

import importlib.util
import math
from pathlib import Path

import torch

_cache = {}


def modelscope_module(name: str):
    """Load `modelscope/models/multi_modal/video_synthesis/{name}.py` without importing the modelscope package."""
    if name not in _cache:
        spec = importlib.util.find_spec("modelscope")  # does not execute the package
        assert spec is not None, "the test oracle `modelscope` is not installed (pip install -r requirements-test.txt)"
        root = Path(spec.submodule_search_locations[0])
        path = root / "models" / "multi_modal" / "video_synthesis" / f"{name}.py"
        mspec = importlib.util.spec_from_file_location(f"modelscope_oracle_{name}", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        _cache[name] = module
    return _cache[name]


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value, including the layers upstream initialises to zero.

    Zero-initialised output layers would make a parity test blind to everything behind them, so all-zero tensors get a
    fan-in-scaled uniform init; norm scales get 1 + noise and all other tensors a small perturbation, so no weight keeps
    a value (0 or 1) that could hide a wrong mapping.
    """
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 2 - 1  # U(-1, 1)
        if p.ndim >= 2:
            fan_in = p[0].numel()
            if torch.all(p == 0):
                p.copy_(noise / math.sqrt(fan_in))
            else:
                p.add_(noise * 0.1 / math.sqrt(fan_in))
        else:
            p.add_(noise * 0.1)
    return model.eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()
