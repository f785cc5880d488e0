"""Test oracles: the ORIGINAL ModelScope and Wan model files loaded by path, and helpers to give tiny models random weights.

The `modelscope` wheel ships `unet_sd.py`, `autoencoder.py` and `diffusion.py` byte-identical to the GitHub release
(modelscope.md §8.1). Importing them through the package runs `modelscope/__init__` and fails without its heavy extras,
so they are executed directly from their file path; they need only torch, einops and numpy.
"""

import gzip
import importlib
import importlib.util
import json
import math
import sys
import types
import unittest.mock
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


def wan_module(name: str):
    """Load `wan/{name}.py` of the ORIGINAL Wan code (the `wan22` wheel of the Wan team, Wan2.2's `wan/` package:
    its `modules/model.py`, `vae2_1.py`, `t5.py` and `utils/fm_solvers_unipc.py` are the Wan 2.1 networks and sampler)
    without running `wan/__init__`, which imports every pipeline and their extras (flash_attn, cv2, dashscope).

    The parent packages are registered as bare namespaces over the real folders, so the files' relative imports
    (`from .attention import ...`) resolve; `name` is dotted, e.g. "modules.model" or "utils.fm_solvers_unipc".
    """
    if "wan_oracle" not in sys.modules:
        spec = importlib.util.find_spec("wan")  # locates the folder without executing the package
        assert spec is not None, "the test oracle `wan22` is not installed (pip install --no-deps wan22==2.2.11)"
        root = Path(spec.submodule_search_locations[0])
        for pkg, folder in (("wan_oracle", root), ("wan_oracle.modules", root / "modules"),
                            ("wan_oracle.utils", root / "utils")):
            module = types.ModuleType(pkg)
            module.__path__ = [str(folder)]
            sys.modules[pkg] = module
    # t5.py evaluates torch.cuda.current_device() in a default argument at import time: answer 0 on a CPU machine
    with unittest.mock.patch("torch.cuda.current_device", lambda: 0):
        return importlib.import_module(f"wan_oracle.{name}")


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


# A tiny original UNet config that still has every kind of block: 3 levels (the last without attention, so its Upsample
# sits at sub-module index 1), 2 ResBlocks per level, an inner width != channels in input_blocks.0.1.
# context_dim must be 1024: upstream hard-codes it in the decoder.
TINY_ORIGINAL = dict(unet_in_dim=4, unet_dim=32, unet_y_dim=768, unet_context_dim=1024, unet_out_dim=4,
                     unet_dim_mult=[1, 2, 2], unet_num_heads=2, unet_head_dim=32, unet_res_blocks=2,
                     unet_attn_scales=[1, 0.5], unet_dropout=0.0, temporal_attention="True")


def original_unet(seed: int = 0, cfg: dict = TINY_ORIGINAL):
    """The original `UNetSD` built from a configuration.json-style dict, with random weights, eval mode."""
    c = cfg
    ref = modelscope_module("unet_sd").UNetSD(
        in_dim=c["unet_in_dim"], dim=c["unet_dim"], y_dim=c["unet_y_dim"], context_dim=c["unet_context_dim"],
        out_dim=c["unet_out_dim"], dim_mult=c["unet_dim_mult"], num_heads=c["unet_num_heads"],
        head_dim=c["unet_head_dim"], num_res_blocks=c["unet_res_blocks"], attn_scales=c["unet_attn_scales"],
        dropout=c["unet_dropout"], temporal_attention=True)
    return randomize_(ref, seed)


ASSETS = Path(__file__).resolve().parent / "assets"


def release_keys(name: str) -> list:
    """Rows of a tab-separated key list of the released checkpoints, shipped gzipped in tests/assets/: key names and
    shapes read off `text2video_pytorch_model.pth` / `VQGAN_autoencoder.pth` (ModelScope text-to-video-ms-1.7b), and
    diffusers' conversion table for the UNet (original key, diffusers key, transform, diffusers shape)."""
    with gzip.open(ASSETS / f"{name}.tsv.gz", "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def tiny_umt5_tokenizer(path, variant: str = "umt5", vocab_size: int = 64):
    """A tiny umT5-style tokenizer folder (tokenizer.json + tokenizer_config.json) built with `tokenizers`.

    `umt5`: laid out as the release is read by transformers 5's T5Tokenizer (Metaspace, `$A </s>`, no normalizer
    other than the charsmap, which a test cannot build). `verbatim`: a generic fast tokenizer with its own normalizer,
    which transformers loads as-is (as transformers 4's T5TokenizerFast loaded the release)."""
    pieces = ["\u2581", "\u2581a", "\u2581photo", "\u2581of", "\u2581dog", "\u2581cat", "\u2581the", "\u2581on",
              "\u2581mat", "\u2581caf\u00e9", "\u2581cafe", "\u2581<", ">", ".", "!", "&", '"', "\u00e9", "\u2581\u00e9"]
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -3.0 - 0.1 * i) for i, p in enumerate(pieces)] + [(c, -8.0) for c in letters]
    assert len(vocab) <= vocab_size  # the ids must fit the tiny model's embedding table
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    if variant == "verbatim":
        tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase(),
                                               normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cls = "T5Tokenizer" if variant == "umt5" else "PreTrainedTokenizerFast"
    config = {"tokenizer_class": cls, "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
              "extra_ids": 0, "model_max_length": 512}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path
