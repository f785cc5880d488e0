"""The released files' layouts of the three networks, and one network's weights file loaded or saved in either.

The model files (unet3d.py, vae.py, text_encoder.py) hold configs and modules only; what the releases' files look like
is here. For each network: its config translated from (and to) the release's config files, its key names converted
in both directions, and `load_*` / `save_*` for one weights file. Whole model directories are in models.py; reading
and writing the files themselves (safe unpickling, strict assignment, atomic writes) is weights.py's job.

  UNet          original ModelScope (`configuration.json`, `text2video_pytorch_model.pth`: input_blocks.*, Conv1d
                temporal projections, the `temopral_conv` typo) and diffusers (`unet/config.json`,
                `diffusion_pytorch_model.*`: our own names). Facts: docs/modelscope.md §2.5, §6.2.
  VAE           original LDM (`VQGAN_autoencoder.pth`: a Lightning checkpoint, `first_stage_model.*`, 1x1-conv attention
                projections) and diffusers (`vae/`: our own names). Facts: §3, §6.3.
  text encoder  open_clip (`open_clip_pytorch_model.bin`, the full ViT-H-14 CLIP: our own names) and Hugging Face
                CLIPTextModel (diffusers' `text_encoder/`: separate q/k/v). Facts: §4, §6.4.

Every name says which network it is for: unet_from_original, vae_from_original, text_from_hf, load_vae, ...
"""

import json
import math
import re
from dataclasses import asdict, fields
from pathlib import Path

import torch

from text_encoder import TextEncoder, TextEncoderConfig, open_clip_dir
from unet3d import UNet3D, UNet3DConfig
from vae import AutoencoderKL, VAEConfig
from weights import (WeightsError, assign_state_dict, detect_format, read_json, read_state_dict, save_state_dict,
                     write_json)

# -----------------------------------------------------------------------------------------------------------------------
# UNet config: configuration.json's model_cfg block / diffusers' unet/config.json <-> UNet3DConfig


def unet_config_from_original(model_cfg: dict) -> UNet3DConfig:
    """UNet3DConfig from the `model.model_cfg` block of the original `configuration.json`."""
    if str(model_cfg.get("temporal_attention", "True")) != "True":  # a string in the released file
        raise ValueError("configuration.json: temporal_attention must be 'True' (image-only UNets are not supported)")
    dim, mult = model_cfg["unet_dim"], model_cfg["unet_dim_mult"]
    scales = [float(s) for s in model_cfg["unet_attn_scales"]]
    return UNet3DConfig(
        in_channels=model_cfg["unet_in_dim"],
        out_channels=model_cfg["unet_out_dim"],
        block_out_channels=tuple(dim * m for m in mult),
        # level i runs at scale 1/2^i; upstream gives it attention iff that scale is listed in attn_scales
        cross_attn_levels=tuple(any(math.isclose(0.5 ** i, s) for s in scales) for i in range(len(mult))),
        layers_per_block=model_cfg["unet_res_blocks"],
        head_dim=model_cfg["unet_head_dim"],
        first_temporal_heads=model_cfg["unet_num_heads"],
        cross_attention_dim=model_cfg["unet_context_dim"],
        norm_num_groups=model_cfg.get("unet_norm_num_groups", 32),  # our extension: upstream hard-codes 32
        dropout=model_cfg.get("unet_dropout", 0.1),
    )


def unet_config_to_original(cfg: UNet3DConfig) -> dict:
    c0 = cfg.block_out_channels[0]
    return {
        "unet_in_dim": cfg.in_channels, "unet_dim": c0, "unet_y_dim": 768, "unet_context_dim": cfg.cross_attention_dim,
        "unet_out_dim": cfg.out_channels, "unet_dim_mult": [c // c0 for c in cfg.block_out_channels],
        "unet_num_heads": cfg.first_temporal_heads, "unet_head_dim": cfg.head_dim, "unet_res_blocks": cfg.layers_per_block,
        "unet_attn_scales": [0.5 ** i for i, a in enumerate(cfg.cross_attn_levels) if a],
        "unet_dropout": cfg.dropout, "temporal_attention": "True",
        **({"unet_norm_num_groups": cfg.norm_num_groups} if cfg.norm_num_groups != 32 else {}),
    }


def unet_config_from_diffusers(d: dict) -> UNet3DConfig:
    """UNet3DConfig from a diffusers `unet/config.json` (UNet3DConditionModel)."""
    if d.get("num_attention_heads") is not None or not isinstance(d.get("attention_head_dim", 64), int):
        raise ValueError("unet/config.json: per-level or explicit num_attention_heads are not supported")
    down = d.get("down_block_types", ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"])
    up = d.get("up_block_types", ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3)
    levels = tuple(t == "CrossAttnDownBlock3D" for t in down)
    if tuple(t == "CrossAttnUpBlock3D" for t in reversed(up)) != levels:
        raise ValueError("unet/config.json: up_block_types must mirror down_block_types")
    if d.get("act_fn", "silu") != "silu" or d.get("norm_eps", 1e-5) != 1e-5 or d.get("time_cond_proj_dim"):
        raise ValueError("unet/config.json: only act_fn silu, norm_eps 1e-5 and no time_cond_proj_dim are supported")
    return UNet3DConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        block_out_channels=tuple(d.get("block_out_channels", (320, 640, 1280, 1280))),
        cross_attn_levels=levels,
        layers_per_block=d.get("layers_per_block", 2),
        head_dim=d.get("attention_head_dim", 64),
        first_temporal_heads=8,  # diffusers hard-codes transformer_in to 8 heads
        cross_attention_dim=d.get("cross_attention_dim", 1024),
        norm_num_groups=d.get("norm_num_groups", 32),
        dropout=0.0,  # diffusers builds its ResNets with dropout 0
    )


def unet_config_to_diffusers(cfg: UNet3DConfig) -> dict:
    if cfg.first_temporal_heads != 8:
        raise ValueError("the diffusers layout cannot store first_temporal_heads != 8 (UNet3DConditionModel hard-codes "
                         "8 heads in transformer_in); save this model in the original layout")
    return {
        "_class_name": "UNet3DConditionModel", "act_fn": "silu", "attention_head_dim": cfg.head_dim,
        "block_out_channels": list(cfg.block_out_channels), "cross_attention_dim": cfg.cross_attention_dim,
        "down_block_types": ["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in cfg.cross_attn_levels],
        "up_block_types": ["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(cfg.cross_attn_levels)],
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "layers_per_block": cfg.layers_per_block,
        "norm_eps": 1e-05, "norm_num_groups": cfg.norm_num_groups,
        "sample_size": 32,
    }


# -----------------------------------------------------------------------------------------------------------------------
# UNet key names: the original checkpoint's (text2video_pytorch_model.pth, modelscope.md §2.5 and §6.2) <-> ours


_RES_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _original_prefixes(cfg: UNet3DConfig) -> list:
    """(our prefix, original prefix) pairs, module by module, in the order upstream registers them."""
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("transformer_in.", "input_blocks.0.1.")]

    def layer(ours: str, j: int, orig: str, attention: bool):
        # one upstream ModuleList entry [ResBlock(+temopral_conv), SpatialTransformer, TemporalTransformer]
        out = [(f"{ours}.resnets.{j}.{a}.", f"{orig}.0.{b}.") for a, b in _RES_NAMES.items()]
        out.append((f"{ours}.temp_convs.{j}.", f"{orig}.0.temopral_conv."))  # sic: the typo is in the file
        if attention:
            out += [(f"{ours}.attentions.{j}.", f"{orig}.1."), (f"{ours}.temp_attentions.{j}.", f"{orig}.2.")]
        return out

    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    k = 1  # input_blocks.0 is conv_in + transformer_in
    for i, attn in enumerate(cfg.cross_attn_levels):
        for j in range(n):
            pairs += layer(f"down_blocks.{i}", j, f"input_blocks.{k}", attn)
            k += 1
        if i < levels - 1:  # the Downsample is a bare module: input_blocks.{k}.op
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.op."))
            k += 1
    # middle_block = [ResBlock, SpatialTransformer, TemporalTransformer, ResBlock]
    pairs += layer("mid_block", 0, "middle_block", True)
    pairs += [(f"mid_block.resnets.1.{a}.", f"middle_block.3.{b}.") for a, b in _RES_NAMES.items()]
    pairs.append(("mid_block.temp_convs.1.", "middle_block.3.temopral_conv."))
    k = 0
    for i, attn in enumerate(cfg.cross_attn_levels[::-1]):
        for j in range(n + 1):
            pairs += layer(f"up_blocks.{i}", j, f"output_blocks.{k}", attn)
            if j == n and i < levels - 1:  # Upsample sits after the layer's other modules: index 3, or 1 without attn
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{3 if attn else 1}.conv."))
            k += 1
    pairs += [("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    return pairs


def _is_temporal_proj(key: str) -> bool:
    """Temporal-transformer proj_in/proj_out weights: Linear here, Conv1d(k=1) in the original file."""
    return ("temp_attentions" in key or key.startswith("transformer_in.")) and key.endswith(
        ("proj_in.weight", "proj_out.weight"))


def unet_original_key_map(cfg: UNet3DConfig, our_keys) -> dict:
    """{our key: original key} for every tensor of a UNet3D with this config."""
    pairs = sorted(_original_prefixes(cfg), key=lambda p: -len(p[0]))  # longest prefix first
    out = {}
    for key in our_keys:
        hit = next((p for p in pairs if key.startswith(p[0])), None)
        assert hit is not None, f"no original name for {key}"
        out[key] = hit[1] + key[len(hit[0]):]
    assert len(set(out.values())) == len(out), "original key map must be one-to-one"
    return out


def _our_keys(cfg: UNet3DConfig):
    with torch.device("meta"):
        return list(UNet3D(cfg).state_dict().keys())


def unet_from_original(sd: dict, cfg: UNet3DConfig) -> dict:
    """Rename an original `text2video_pytorch_model.pth` state dict to our names (views, no copies)."""
    inverse = {v: k for k, v in unet_original_key_map(cfg, _our_keys(cfg)).items()}
    out = {}
    for key, v in sd.items():
        ours = inverse.get(key, key)  # unknown keys pass through; the strict load names them
        out[ours] = v.squeeze(-1) if _is_temporal_proj(ours) and v.ndim == 3 else v
    return out


def unet_to_original(sd: dict, cfg: UNet3DConfig) -> dict:
    """Our state dict in the original file's names and shapes (Conv1d temporal projections)."""
    names = unet_original_key_map(cfg, sd.keys())
    return {names[k]: v.unsqueeze(-1) if _is_temporal_proj(k) else v for k, v in sd.items()}


# -----------------------------------------------------------------------------------------------------------------------
# UNet loading and saving


def load_unet(path, cfg: UNet3DConfig, dtype: torch.dtype | None = torch.float32) -> UNet3D:
    """Build on the meta device and assign the weights of `path` (original or diffusers names), strictly.

    The file is memory-mapped where its format allows and its tensors become the parameters, so the weights are never
    held twice. `dtype=None` keeps the file's dtype.
    """
    sd = read_state_dict(path, "UNet weights (text2video_pytorch_model.pth or diffusion_pytorch_model.*)")
    if any(k.startswith("input_blocks.") for k in sd):
        sd = unet_from_original(sd, cfg)
    with torch.device("meta"):
        model = UNet3D(cfg)
    return assign_state_dict(model, sd, source=str(path), dtype=dtype).eval()


def save_unet(model: UNet3D, path, layout: str = "diffusers", overwrite: bool = False):
    """Write the weights in the diffusers names (safetensors by suffix) or the original names (`layout="original"`)."""
    sd = model.state_dict()
    if layout == "original":
        sd = unet_to_original(sd, model.cfg)
    elif layout != "diffusers":
        raise ValueError(f"layout must be 'original' or 'diffusers', not {layout!r}")
    return save_state_dict(sd, path, metadata={"config": json.dumps(asdict(model.cfg))}, overwrite=overwrite)


# -----------------------------------------------------------------------------------------------------------------------
# VAE config: diffusers' vae/config.json / the original LDM `ddconfig` <-> VAEConfig


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    """VAEConfig from the dict of a diffusers `vae/config.json`; refuses options that change the architecture."""
    n = len(d.get("block_out_channels", VAEConfig.block_out_channels))
    supported = {  # config field -> the only value our modules implement
        "_class_name": "AutoencoderKL",
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu",
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "shift_factor": None,  # SD3/Flux-style latent shift: not this model
        "latents_mean": None,  # SDXL-style per-channel latent statistics: not this model
        "latents_std": None,
    }
    bad = [f"{k}={d[k]!r}" for k, want in supported.items() if k in d and _as_list(d[k]) != _as_list(want)]
    if bad:
        raise ValueError(f"unsupported diffusers VAE config: {', '.join(bad)}")
    ours = {f.name for f in fields(VAEConfig)}
    return VAEConfig(**{k: v for k, v in d.items() if k in ours})


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """The inverse of `vae_config_from_diffusers`: a `vae/config.json` for diffusers' AutoencoderKL and our loader."""
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
            "norm_num_groups": cfg.norm_num_groups, "scaling_factor": cfg.scaling_factor,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def vae_config_from_ldm(ddconfig: dict, embed_dim: int = 4) -> VAEConfig:
    """VAEConfig from the original LDM/ModelScope `ddconfig` dict and `embed_dim` (AutoencoderKL's arguments)."""
    supported = {"double_z": True, "attn_resolutions": [], "resamp_with_conv": True, "tanh_out": False,
                 "give_pre_end": False}
    bad = [f"{k}={ddconfig[k]!r}" for k, want in supported.items() if k in ddconfig and _as_list(ddconfig[k]) != want]
    # quant_conv maps 2*z_channels -> 2*embed_dim and post_quant_conv embed_dim -> z_channels; we keep one number.
    if ddconfig["z_channels"] != embed_dim:
        bad.append(f"z_channels={ddconfig['z_channels']} != embed_dim={embed_dim}")
    if bad:
        raise ValueError(f"unsupported LDM autoencoder config: {', '.join(bad)}")
    # `resolution` and `dropout` do not change the weights; LDM's widths are a base `ch` times per-level multipliers.
    return VAEConfig(in_channels=ddconfig["in_channels"], out_channels=ddconfig["out_ch"], latent_channels=embed_dim,
                     block_out_channels=tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]),
                     layers_per_block=ddconfig["num_res_blocks"])


# -----------------------------------------------------------------------------------------------------------------------
# VAE key names: original LDM/ModelScope <-> ours (= diffusers), one table used both ways (modelscope.md §6.3).

# (original module path, our module path, 1x1 conv <-> Linear). Placeholders: {e} encoder|decoder, {i}/{j} level/block
# indices, {r} a ResnetBlock layer, {u} a decoder level, which the two layouts count from opposite ends (u <-> L-1-u).
# Modules not listed (conv_in, conv_out, quant_conv, post_quant_conv) have the same name in both.
_VAE_KEY_TABLE = [
    ("encoder.down.{i}.block.{j}.nin_shortcut", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut", False),
    ("encoder.down.{i}.block.{j}.{r}", "encoder.down_blocks.{i}.resnets.{j}.{r}", False),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv", False),
    ("{e}.mid.block_1.{r}", "{e}.mid_block.resnets.0.{r}", False),
    ("{e}.mid.block_2.{r}", "{e}.mid_block.resnets.1.{r}", False),
    ("{e}.mid.attn_1.norm", "{e}.mid_block.attentions.0.group_norm", False),
    ("{e}.mid.attn_1.q", "{e}.mid_block.attentions.0.to_q", True),
    ("{e}.mid.attn_1.k", "{e}.mid_block.attentions.0.to_k", True),
    ("{e}.mid.attn_1.v", "{e}.mid_block.attentions.0.to_v", True),
    ("{e}.mid.attn_1.proj_out", "{e}.mid_block.attentions.0.to_out.0", True),
    ("{e}.norm_out", "{e}.conv_norm_out", False),
    ("decoder.up.{u}.block.{j}.nin_shortcut", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut", False),
    ("decoder.up.{u}.block.{j}.{r}", "decoder.up_blocks.{u}.resnets.{j}.{r}", False),
    ("decoder.up.{u}.upsample.conv", "decoder.up_blocks.{u}.upsamplers.0.conv", False),
]
_VAE_GROUPS = {"e": r"(?P<e>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "u": r"(?P<u>\d+)",
               "r": r"(?P<r>norm1|conv1|norm2|conv2)"}


def _vae_compile(template: str):
    # "{e}.mid.block_1.{r}" -> ^(?P<e>encoder|decoder)\.mid\.block_1\.(?P<r>norm1|conv1|norm2|conv2)$
    return re.compile("^" + re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**_VAE_GROUPS) + "$")


_VAE_FROM_ORIGINAL = [(_vae_compile(o), d, lin) for o, d, lin in _VAE_KEY_TABLE]
_VAE_TO_ORIGINAL = [(_vae_compile(d), o, lin) for o, d, lin in _VAE_KEY_TABLE]
_VAE_PREFIX = "first_stage_model."


def _vae_rename(sd: dict, rules, num_levels: int, to_linear: bool) -> dict:
    out = {}
    for key, v in sd.items():
        module, param = key.rsplit(".", 1)  # the table is about modules; "weight"/"bias" ride along
        for pattern, target, linear in rules:
            m = pattern.match(module)
            if m:
                groups = m.groupdict()
                if "u" in groups:
                    groups["u"] = str(num_levels - 1 - int(groups["u"]))  # the level order is reversed
                module = target.format(**groups)
                if linear and param == "weight":
                    # (C, C, 1, 1) conv <-> (C, C) Linear; indexing keeps a view. Other shapes are left for the
                    # strict shape check to report rather than silently sliced.
                    if to_linear and v.shape[2:] == (1, 1):
                        v = v[:, :, 0, 0]
                    elif not to_linear and v.ndim == 2:
                        v = v[:, :, None, None]
                break
        out[f"{module}.{param}"] = v  # unmatched keys pass through; assign_state_dict reports any that do not fit
    return out


def _vae_count_levels(keys, pattern: str) -> int:
    levels = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not levels:
        raise WeightsError(f"cannot tell the number of VAE levels: no key matches {pattern!r}")
    return max(levels) + 1


def vae_from_original(sd: dict, num_levels: int | None = None) -> dict:
    """Original LDM/ModelScope VAE keys (with or without `first_stage_model.`) -> ours. Values are views, not copies.

    A Lightning checkpoint holds the whole LDM (model.*, cond_stage_model.*, ...); when the `first_stage_model.` prefix
    is present only those keys are kept. `num_levels` (len(block_out_channels)) is inferred from the keys if None.
    """
    if any(k.startswith(_VAE_PREFIX) for k in sd):
        sd = {k[len(_VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(_VAE_PREFIX)}
    num_levels = num_levels or _vae_count_levels(sd, r"decoder\.up\.(\d+)\.")
    return _vae_rename(sd, _VAE_FROM_ORIGINAL, num_levels, to_linear=True)


def vae_to_original(sd: dict, num_levels: int | None = None) -> dict:
    """Our (diffusers) VAE keys -> original LDM keys, without the `first_stage_model.` prefix. Values are views."""
    num_levels = num_levels or _vae_count_levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    return _vae_rename(sd, _VAE_TO_ORIGINAL, num_levels, to_linear=False)


# -----------------------------------------------------------------------------------------------------------------------
# VAE loading and saving

_VAE_FILES = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
              "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"]


def load_vae(path, cfg: VAEConfig | None = None, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Load a frozen AutoencoderKL (eval mode, requires_grad False) from either release layout.

    `path`: the original `VQGAN_autoencoder.pth` (Lightning pickle, read without running its code), any file with
    LDM keys, a diffusers weight file, or a diffusers `vae/` directory. `cfg` None: the `config.json` next to diffusers
    weights if there is one, else the released ModelScope config. The model is built on the meta device and the
    file's tensors are assigned to it, so the weights are never held twice.
    """
    path = Path(path)
    if path.is_dir():  # a diffusers `vae/` folder: first weight file found, in diffusers' order of preference
        found = [path / n for n in _VAE_FILES if (path / n).is_file()]  # fp32 before fp16 variants
        if not found:
            raise WeightsError(f"{path}: no VAE weights in this directory (looked for {', '.join(_VAE_FILES)})")
        path = found[0]
    sd = read_state_dict(path, what="VAE weights")
    # Layout by key names: LDM says `encoder.down.0.block.0`, diffusers `encoder.down_blocks.0.resnets.0`.
    original = any(k.startswith(_VAE_PREFIX) or k.startswith("encoder.down.") for k in sd)
    if cfg is None:
        cfg_path = path.parent / "config.json"
        if original or not cfg_path.is_file():
            cfg = VAEConfig()  # ModelScope hard-codes its ddconfig in Python; config.json there is not ours
        else:
            try:
                cfg = vae_config_from_diffusers(read_json(cfg_path, what="diffusers VAE config"))
            except ValueError as e:
                raise WeightsError(f"{cfg_path}: {e}") from None
    if original:
        # The level count comes from the file's keys, not cfg: if they disagree, the strict check below then names
        # the real keys of the file instead of keys renamed for the wrong depth.
        try:
            sd = vae_from_original(sd)
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from None
    with torch.device("meta"):
        model = AutoencoderKL(cfg)  # no memory allocated; assign_state_dict swaps in the file's tensors
    assign_state_dict(model, sd, source=str(path), dtype=dtype)
    # Always frozen in this project; eval() is a no-op today (no dropout) but keeps the contract explicit.
    return model.eval().requires_grad_(False)


def save_vae(model: AutoencoderKL, path, layout: str = "diffusers", overwrite: bool = False) -> Path:
    """Write the VAE weights: `diffusers` keys (loads into diffusers' AutoencoderKL) or `original` LDM keys.

    The original layout is written as a flat dict with `first_stage_model.*` keys, the names inside ModelScope's
    `VQGAN_autoencoder.pth`, but without its Lightning `{'state_dict': ...}` wrapper; `load_vae` reads both.
    The format follows the suffix (`.safetensors` or a torch pickle).
    """
    sd = model.state_dict()  # our names are already the diffusers names
    if layout == "original":
        sd = {_VAE_PREFIX + k: v for k, v in vae_to_original(sd, len(model.cfg.block_out_channels)).items()}
    elif layout != "diffusers":
        raise ValueError(f"layout must be 'diffusers' or 'original', got {layout!r}")
    # {"format": "pt"} is the safetensors metadata diffusers/transformers write; ignored for torch pickles.
    return save_state_dict(sd, path, metadata={"format": "pt"}, overwrite=overwrite)


# -----------------------------------------------------------------------------------------------------------------------
# text encoder config: open_clip's bundled model config / Hugging Face CLIPTextModel config.json <-> TextEncoderConfig

# open_clip text options that change the architecture; the values below are the only ones our modules implement.
_OPEN_CLIP_DEFAULTS = {"hf_model_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                       "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                       "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "act_kwargs": None}


def text_config_from_open_clip(name: str = "ViT-H-14") -> TextEncoderConfig:
    """Config from open_clip's bundled `model_configs/{name}.json` (what `open_clip.get_model_config` returns), minus
    the last block, which ModelScope's 'penultimate' setting skips."""
    d = read_json(open_clip_dir() / "model_configs" / f"{name}.json", what=f"open_clip model config {name!r}")
    t = d["text_cfg"]
    bad = [f"{k}={t[k]!r}" for k, want in _OPEN_CLIP_DEFAULTS.items() if t.get(k, want) != want]
    if t.get("block_type") not in (None, "default"):
        bad.append(f"block_type={t['block_type']!r}")
    if d.get("quick_gelu"):  # OpenAI-trained towers use x * sigmoid(1.702 x); LAION ViT-H-14 uses exact GELU
        bad.append("quick_gelu=True")
    if bad:
        raise ValueError(f"open_clip {name}: unsupported text tower options {', '.join(bad)}")
    width = t.get("width", 512)  # the fallbacks are open_clip's CLIPTextCfg defaults
    return TextEncoderConfig(vocab_size=t.get("vocab_size", 49408), context_length=t.get("context_length", 77),
                             width=width, heads=t.get("heads", 8), layers=t.get("layers", 12) - 1,
                             intermediate=int(width * t.get("mlp_ratio", 4.0)),
                             eps=(t.get("norm_kwargs") or {}).get("eps", 1e-5))


def text_config_from_hf(d: dict) -> TextEncoderConfig:
    """Config from a Hugging Face `CLIPTextModel` config.json dict (diffusers' `text_encoder/config.json`).

    Its `num_hidden_layers` already counts only the blocks that run (23 for ModelScope). The fallbacks for missing
    keys are CLIPTextConfig's defaults.
    """
    d = d.get("text_config", d)  # a full CLIPConfig nests the text part
    act = d.get("hidden_act", "quick_gelu")  # CLIPTextConfig's default is OpenAI's quick_gelu
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r} is not supported: the ModelScope (LAION ViT-H-14) text tower uses exact "
                         f"GELU ('gelu'); a quick_gelu model would run with the wrong activation")
    return TextEncoderConfig(vocab_size=d.get("vocab_size", 49408), context_length=d.get("max_position_embeddings", 77),
                             width=d.get("hidden_size", 512), heads=d.get("num_attention_heads", 8),
                             layers=d.get("num_hidden_layers", 12), intermediate=d.get("intermediate_size", 2048),
                             eps=d.get("layer_norm_eps", 1e-5))


def text_config_to_hf(cfg: TextEncoderConfig) -> dict:
    """The inverse of `text_config_from_hf`: a config.json that transformers' CLIPTextModel and our loader both read."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "gelu",
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length, "hidden_size": cfg.width,
            "num_attention_heads": cfg.heads, "num_hidden_layers": cfg.layers, "intermediate_size": cfg.intermediate,
            "layer_norm_eps": cfg.eps, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}


# -----------------------------------------------------------------------------------------------------------------------
# text encoder key names: open_clip (ours) <-> Hugging Face CLIPTextModel (diffusers port, modelscope.md §6.4)

# keys of the open_clip CLIP file that the text path never uses
_OPEN_CLIP_UNUSED = ("visual.", "text_projection", "logit_scale", "logit_bias", "attn_mask")
# HF names -> ours, outside the blocks (after removing the optional `text_model.` prefix)
_HF_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
# HF names -> ours, inside block i (q/k/v are fused separately)
_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
# HF keys to drop: the position_ids buffer (saved by transformers < 4.31) and the parts of a full CLIPModel
_HF_UNUSED = ("embeddings.position_ids", "vision_model.", "visual_projection", "text_projection", "logit_scale")


def text_from_open_clip(sd: dict, layers: int) -> dict:
    """open_clip CLIP state dict -> ours: drop the vision tower, projection, logit scale and blocks >= `layers`."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")  # checkpoints saved from DDP training
        block = re.match(r"transformer\.resblocks\.(\d+)\.", k)
        if k.startswith(_OPEN_CLIP_UNUSED) or (block and int(block.group(1)) >= layers):
            continue  # for ModelScope: resblocks.23, the block 'penultimate' skips
        out[k] = v  # anything unexpected is kept, so that assign_state_dict reports it
    return out


def text_to_open_clip(sd: dict) -> dict:
    """Ours -> open_clip names (the same names; placeholders dropped). Only the blocks we have: 23, not 24."""
    return {k: v for k, v in sd.items() if k != "placeholder_embeddings"}


def text_from_hf(sd: dict) -> dict:
    """HF CLIPTextModel state dict (with or without the `text_model.` prefix) -> ours; q/k/v fused into in_proj."""
    out, qkv = {}, {}
    for key, v in sd.items():
        k = key.removeprefix("text_model.")  # transformers 4 files have the prefix, transformers 5 writes none
        proj = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif k.startswith(_HF_UNUSED):
            continue
        elif proj:
            qkv.setdefault((proj[1], proj[3]), {})[proj[2]] = v  # ('0', 'weight') -> {'q': (D, D), ...}
        elif m and m[2] in _HF_BLOCK:
            out[f"transformer.resblocks.{m[1]}.{_HF_BLOCK[m[2]]}.{m[3]}"] = v
        else:
            out[key] = v  # unknown: kept, so that assign_state_dict reports it
    for (i, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise WeightsError(f"block {i}: found only {sorted(parts)} of the q/k/v {kind} tensors")
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])  # (3D, ...)
    return out


def text_to_hf(sd: dict) -> dict:
    """Ours -> HF CLIPTextModel keys with the `text_model.` prefix (the transformers 4 / diffusers file layout)."""
    top = {ours: hf for hf, ours in _HF_TOP.items()}
    block = {ours: hf for hf, ours in _HF_BLOCK.items()}
    out = {}
    for k, v in text_to_open_clip(sd).items():
        fused = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k)
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if k in top:
            out["text_model." + top[k]] = v
        elif fused:
            for name, part in zip("qkv", v.chunk(3)):  # rows 0:D = q, D:2D = k, 2D:3D = v
                # clone: three views of one storage cannot be written to one safetensors file
                out[f"text_model.encoder.layers.{fused[1]}.self_attn.{name}_proj.{fused[2]}"] = part.clone()
        elif m and m[2] in block:
            out[f"text_model.encoder.layers.{m[1]}.{block[m[2]]}.{m[3]}"] = v
        else:
            raise KeyError(f"no Hugging Face name for {k}")
    return out


# -----------------------------------------------------------------------------------------------------------------------
# text encoder loading and saving

_HF_FILES = ["model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"]


def load_text_encoder(path, cfg: TextEncoderConfig | None = None, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Load the frozen text encoder (eval mode, requires_grad False) from either release layout.

    `path`: the original `open_clip_pytorch_model.bin` (full CLIP; the vision tower and the last block are dropped), a
    HF/diffusers `text_encoder/` weight file, or that directory. `cfg` None: the `config.json` next to HF weights if
    there is one, else the released ModelScope config. Built on the meta device, the file's tensors are assigned.
    """
    path = Path(path)
    if path.is_dir():  # a diffusers `text_encoder/` folder: first weight file found, in transformers' preference
        found = [path / n for n in _HF_FILES if (path / n).is_file()]
        if not found:
            raise WeightsError(f"{path}: no text encoder weights in this directory (looked for {', '.join(_HF_FILES)})")
        path = found[0]
    sd = read_state_dict(path, what="text encoder weights (open_clip_pytorch_model.bin or a CLIPTextModel file)")
    if any(k.removeprefix("module.").startswith("transformer.resblocks.") for k in sd):
        cfg = cfg or TextEncoderConfig()
        sd = text_from_open_clip(sd, cfg.layers)
    elif any(k.removeprefix("text_model.").startswith("encoder.layers.") for k in sd):
        if cfg is None:
            cfg_path = path.parent / "config.json"
            try:
                cfg = text_config_from_hf(read_json(cfg_path, "CLIPTextModel config")) if cfg_path.is_file() else None
            except ValueError as e:
                raise WeightsError(f"{cfg_path}: {e}") from None
        sd = text_from_hf(sd)
    else:
        raise WeightsError(f"{path}: not a CLIP text encoder (detected layout: {detect_format(sd)})")
    with torch.device("meta"):
        model = TextEncoder(cfg or TextEncoderConfig())  # no memory allocated; the file's tensors are swapped in
    assign_state_dict(model, sd, source=str(path), dtype=dtype)
    return model.eval().requires_grad_(False)


def save_text_encoder(model: TextEncoder, path, layout: str = "hf", overwrite: bool = False) -> Path:
    """Write the base weights (never the placeholders: save those with `text_encoder.placeholder_state`).

    `hf`: `text_model.*` keys, plus a `config.json` beside the file, i.e. a diffusers `text_encoder/` folder that
    transformers' CLIPTextModel also loads. `open_clip`: our (= open_clip) names, only the 23 blocks that run, so
    `load_text_encoder` reads it but `open_clip.create_model` (which wants all 24 and the projection) does not.
    """
    if layout not in ("hf", "open_clip"):
        raise ValueError(f"layout must be 'hf' or 'open_clip', got {layout!r}")
    sd = text_to_hf(model.state_dict()) if layout == "hf" else text_to_open_clip(model.state_dict())
    path = save_state_dict(sd, path, metadata={"format": "pt", "config": json.dumps(asdict(model.cfg))},
                           overwrite=overwrite)
    if layout == "hf":  # the config goes beside the weights, where load_text_encoder and transformers look for it
        write_json(text_config_to_hf(model.cfg), path.parent / "config.json", overwrite=overwrite)
    return path
