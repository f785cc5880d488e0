"""Wan 2.1 text-to-video model directories: load and save the DiT, VAE, text encoder and tokenizer in either release
layout, and the released sampler's settings.

  wan (Wan-AI/Wan2.1-T2V-1.3B)                          wan-diffusers (Wan-AI/Wan2.1-T2V-1.3B-Diffusers)
    config.json               the DiT's (WanModel)        model_index.json
    diffusion_pytorch_model.safetensors  DiT               transformer/config.json + diffusion_pytorch_model*.safetensors
    Wan2.1_VAE.pth            VAE state dict               vae/config.json + diffusion_pytorch_model.safetensors
    models_t5_umt5-xxl-enc-bf16.pth  umT5 encoder          text_encoder/config.json + model*.safetensors
    google/umt5-xxl/tokenizer.json                         tokenizer/tokenizer.json
                                                           scheduler/scheduler_config.json
Large networks may come sharded: `<name>.index.json` maps each tensor to its shard (both layouts). The release's
config.json describes only the DiT (the VAE and umT5 are fixed by the code); files written by `save_wan` may add
`vae_cfg` / `t5_cfg` blocks there, and `text_len` to transformer/config.json when it is not 512 (our extensions, for
other sizes: tests), which the loader reads when present.

Reading the files themselves (safe unpickling, strict assignment) is weights.py's job; a Hub id becomes a folder of
these files through hub.py (`hub.WAN_FILES`, `hub.WAN_DIFFUSERS_FILES`: only what this file reads is fetched).
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

import hub
import wan_dit
import wan_t5
import wan_vae
from weights import WeightsError, assign_state_dict, read_json, read_state_dict, save_state_dict, write_json

# The released sampler's settings (the original generate.py / text2video.py for T2V): 50 UniPC steps, shift 5.0,
# guidance 5.0, 81 frames of 832x480 at 16 fps, and this negative prompt for the unconditional branch (Wan's
# shared_config.sample_neg_prompt; diffusers' WanPipeline uses "" unless given one).
SAMPLE_DEFAULTS = dict(steps=50, shift=5.0, guidance=5.0, frames=81, height=480, width=832, fps=16)
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                   "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                   "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
ORIGINAL_DIT_KEYS = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim", "text_len")


@dataclass
class WanModels:
    """What `load_wan` returns: the three networks, the tokenizer, and where they came from."""

    dit: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    layout: str  # "wan" or "wan-diffusers"
    root: Path
    source: dict | None = None  # hub.resolve's provenance: folder, or Hub id, revision and commit
    # The time shift of training (train.flow_loss) and sampling: the original sampler's 5.0, or the diffusers
    # scheduler config's flow_shift when the folder has one. (Wan's own training shift is not published.)
    flow_shift: float = SAMPLE_DEFAULTS["shift"]
    gate: object = None  # as models.Models: delta.apply_delta's noise gate (not supported for the DiT: always None)

    @property
    def unet(self):  # the loaders' common interface: train.py and delta.py ask for the denoiser
        return None

    @property
    def denoiser(self) -> nn.Module:
        return self.dit


def detect_layout(root) -> str | None:
    """"wan" (the original release's files), "wan-diffusers" (a transformer/ folder), or None (not Wan)."""
    root = Path(root)
    if (root / "Wan2.1_VAE.pth").is_file():
        return "wan"
    if (root / "transformer" / "config.json").is_file():
        return "wan-diffusers"
    return None


def is_wan(model: str) -> bool:
    """Whether a --model names Wan 2.1, without downloading: a folder's files, a known Hub id, or its cached copy."""
    path = Path(model).expanduser()
    if path.is_dir():
        return detect_layout(path) is not None
    layout = hub.KNOWN_MODELS.get(model, (None,))[0]
    if layout is not None:
        return layout.startswith("wan")
    folder = hub.snapshot(model) if hub.REPO_ID.fullmatch(model) else None
    return bool(folder and detect_layout(folder))


def read_weights(path: Path, what: str) -> dict:
    """One safetensors/pickle file, or the shards its `<file>.index.json` names, merged into one state dict."""
    index = path.with_name(path.name + ".index.json")
    if path.is_file() or not index.is_file():
        return read_state_dict(path, what)
    shards = sorted(set((read_json(index, f"{what} index").get("weight_map") or {}).values()))
    if not shards:
        raise WeightsError(f"{index}: no weight_map; expected the shard list of the {what}")
    sd = {}
    for shard in shards:
        sd.update(read_state_dict(path.parent / shard, f"{what} (shard {shard})"))
    return sd


def _build(cls, cfg, sd: dict, source: str, dtype) -> nn.Module:
    """The network built on the meta device (no init, no memory) and assigned the file's tensors strictly. Buffers
    that are not in the files (the VAE's latent statistics) are made on the CPU by the constructors themselves."""
    with torch.device("meta"):
        model = cls(cfg)
    model = assign_state_dict(model, sd, source=source, dtype=dtype)
    if dtype is not None:
        model.to(dtype)  # the buffers too, as upstream builds them in its compute dtype
    return model.eval().requires_grad_(False)


def _config(cls, d: dict):
    """A config dataclass from the keys of `d` it has (others are ignored)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def load_wan(root, dtype: torch.dtype | None = torch.float32, revision: str | None = None) -> WanModels:
    """Load the Wan 2.1 DiT, VAE, umT5 encoder and tokenizer from a folder in either layout, or a Hub id (hub.resolve:
    from the cache, or downloaded; `revision` pins a version). `dtype`: what the weights become (None: as stored)."""
    root, source = hub.resolve(str(root), revision)
    layout = detect_layout(root)
    if layout == "wan":
        conf = read_json(root / "config.json", "Wan config.json")
        if conf.get("model_type", "t2v") != "t2v":
            raise WeightsError(f"{root / 'config.json'}: model_type {conf['model_type']!r}; only t2v is supported")
        dit_cfg = _config(wan_dit.WanDiTConfig, conf)
        vae_cfg = _config(wan_vae.WanVAEConfig, conf.get("vae_cfg", {}))
        t5_cfg = _config(wan_t5.UMT5Config, conf.get("t5_cfg", {}))
        dit_sd = read_weights(root / "diffusion_pytorch_model.safetensors", "Wan DiT weights")
        vae_sd = read_state_dict(root / "Wan2.1_VAE.pth", "Wan VAE weights")
        t5_sd = read_state_dict(root / "models_t5_umt5-xxl-enc-bf16.pth", "umT5 encoder weights")
        tokenizer_dir, flow_shift = root / "google" / "umt5-xxl", SAMPLE_DEFAULTS["shift"]
    elif layout == "wan-diffusers":
        def config(sub):
            return read_json(root / sub / "config.json", f"diffusers {sub} config")

        try:
            conf = config("transformer")  # text_len: the pipeline's max_sequence_length, 512 unless save_wan wrote one
            dit_cfg = wan_dit.dit_config_from_diffusers(conf, text_len=conf.get("text_len", 512))
            vae_cfg = wan_vae.vae_config_from_diffusers(config("vae"))
            t5_cfg = wan_t5.umt5_config_from_hf(config("text_encoder"))
        except (KeyError, ValueError) as e:
            raise WeightsError(f"{root}: unsupported Wan config ({type(e).__name__}: {e})") from None
        dit_sd = wan_dit.dit_from_diffusers(read_weights(root / "transformer" / "diffusion_pytorch_model.safetensors",
                                                         "Wan DiT weights"))
        vae_sd = wan_vae.vae_from_diffusers(read_weights(root / "vae" / "diffusion_pytorch_model.safetensors",
                                                         "Wan VAE weights"))
        t5_sd = wan_t5.umt5_from_hf(read_weights(root / "text_encoder" / "model.safetensors", "umT5 encoder weights"))
        tokenizer_dir = root / "tokenizer"
        scheduler = root / "scheduler" / "scheduler_config.json"
        flow_shift = read_json(scheduler, "scheduler config").get("flow_shift") if scheduler.is_file() else None
        flow_shift = SAMPLE_DEFAULTS["shift"] if flow_shift is None else float(flow_shift)
    else:
        raise WeightsError(f"{root}: not a Wan 2.1 model folder (no Wan2.1_VAE.pth, no transformer/config.json)")
    dit = _build(wan_dit.WanDiT, dit_cfg, dit_sd, f"{root} (DiT)", dtype)
    vae = _build(wan_vae.WanVAE, vae_cfg, vae_sd, f"{root} (VAE)", dtype)
    text = _build(wan_t5.UMT5Encoder, t5_cfg, t5_sd, f"{root} (umT5)", dtype)
    try:
        tokenizer = wan_t5.UMT5Tokenizer(tokenizer_dir, seq_len=dit_cfg.text_len)
    except (FileNotFoundError, ValueError) as e:
        raise WeightsError(str(e)) from None
    return WanModels(dit, vae, text, tokenizer, layout, root, source, flow_shift)


def save_wan(models: WanModels, root, layout: str = "wan-diffusers", tokenizer_json: Path | None = None) -> Path:
    """Write the three networks (and a copy of `tokenizer_json`) as a folder in `layout`; refuses to overwrite."""
    root = Path(root)
    dit_sd, vae_sd, t5_sd = (m.state_dict() for m in (models.dit, models.vae, models.text_encoder))
    if layout == "wan":
        conf = {"_class_name": "WanModel", "model_type": "t2v", **asdict(models.dit.cfg)}
        conf["patch_size"] = list(models.dit.cfg.patch_size)
        conf["vae_cfg"], conf["t5_cfg"] = asdict(models.vae.cfg), asdict(models.text_encoder.cfg)
        write_json(conf, root / "config.json")
        save_state_dict(dit_sd, root / "diffusion_pytorch_model.safetensors")
        save_state_dict(vae_sd, root / "Wan2.1_VAE.pth")
        save_state_dict(t5_sd, root / "models_t5_umt5-xxl-enc-bf16.pth")
        tokenizer_dir = root / "google" / "umt5-xxl"
    elif layout == "wan-diffusers":
        write_json({"_class_name": "WanPipeline"}, root / "model_index.json")
        conf = wan_dit.dit_config_to_diffusers(models.dit.cfg)
        if models.dit.cfg.text_len != 512:  # our extension (diffusers' pipeline pads prompts to 512)
            conf["text_len"] = models.dit.cfg.text_len
        write_json(conf, root / "transformer" / "config.json")
        save_state_dict(wan_dit.dit_to_diffusers(dit_sd), root / "transformer" / "diffusion_pytorch_model.safetensors")
        write_json(wan_vae.vae_config_to_diffusers(models.vae.cfg), root / "vae" / "config.json")
        save_state_dict(wan_vae.vae_to_diffusers(vae_sd), root / "vae" / "diffusion_pytorch_model.safetensors")
        write_json(wan_t5.umt5_config_to_hf(models.text_encoder.cfg), root / "text_encoder" / "config.json")
        hf = wan_t5.umt5_to_hf(t5_sd)
        hf.pop(wan_t5.HF_TIED, None)  # one tensor under two names: safetensors stores it once (as transformers does)
        save_state_dict(hf, root / "text_encoder" / "model.safetensors")
        tokenizer_dir = root / "tokenizer"
    else:
        raise ValueError(f"layout must be wan or wan-diffusers, not {layout!r}")
    if tokenizer_json is not None:
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        (tokenizer_dir / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    return root


@torch.no_grad()
def check(models: WanModels, frames: int = 5, size: int = 32, seed: int = 0) -> torch.Tensor:
    """`python models.py <Wan folder or id>`: what was loaded, then one DiT call and one decode on random latents."""
    import time

    for name in ("dit", "vae", "text_encoder"):
        m = getattr(models, name)
        n = sum(p.numel() for p in m.parameters())
        print(f"  {name:13s} {type(m).__name__:15s} {n:>14,d} params  {next(m.parameters()).dtype}")
    t0 = time.perf_counter()
    context = wan_t5.encode_prompts(models.text_encoder, models.tokenizer, ["a person doing the pll sign", ""],
                                    models.dit.cfg.text_len)  # (2, text_len, D)
    cfg = models.vae.cfg
    shape = (2, cfg.z_dim, 1 + (frames - 1) // cfg.temporal_factor, size // 8, size // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    v = models.dit(latents, torch.tensor([999.0, 999.0]), context.float())  # (2, 16, f, h, w)
    video = models.vae.decode(latents - 0.1 * v)  # (2, 3, F, H, W)
    print(f"  text {tuple(context.shape)} -> DiT {tuple(v.shape)} -> VAE decode {tuple(video.shape)} "
          f"in {time.perf_counter() - t0:.2f} s; output mean {video.mean():+.4f} std {video.std():.4f}")
    assert torch.isfinite(video).all(), "non-finite output"
    return video
