"""Whole model directories: load and save the UNet, VAE, text encoder, tokenizer and noise schedule of a ModelScope
text-to-video model in either release layout, and a smoke CLI.

    python models.py path/to/model_dir      # which layout, what it holds, one UNet call + VAE decode
    python models.py cerspense/zeroscope_v2_576w   # the same for a Hub repository id (hub.py: cached or downloaded)
    python models.py --tiny                 # tiny random models through both layouts: the same video back
    python models.py fetch NAME...          # download a base model or an evaluator's weights in advance (hub.py)
    python models.py check                  # what the caches hold, what train / sample / evaluate still lack

  original  (damo/text-to-video-synthesis, zeroscope's zs2_576w/)      diffusers (text-to-video-ms-1.7b, zeroscope_v2_576w)
    configuration.json                                                   model_index.json (optional)
    text2video_pytorch_model.pth   plain UNet state dict                 unet/config.json + diffusion_pytorch_model[.fp16].{safetensors,bin}
    VQGAN_autoencoder.pth          Lightning checkpoint, first_stage_model.*   vae/config.json + diffusion_pytorch_model[...]
    open_clip_pytorch_model.bin    full OpenCLIP ViT-H-14 (visual.* unused)    text_encoder/config.json + model[...] (HF CLIPTextModel, 23 layers)

Reading and writing the files themselves (safe unpickling, strict assignment, atomic writes) is weights.py's job;
turning a Hub repository id into a folder of these files is hub.py's.
"""

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import hub
import layouts
import text_encoder as te
import unet3d
import vae
import wan_dit
import wan_models
from weights import WeightsError, assign_state_dict, read_json, read_state_dict, save_state_dict, write_json


# -----------------------------------------------------------------------------------------------------------------------
# a whole model directory


# The released noise schedule (modelscope.md §5.1): SD's "scaled_linear" betas, eps prediction, 1000 steps.
RELEASED_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


@dataclass
class Models:
    """Everything `load_models` returns: the three networks, the tokenizer and the diffusion constants."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    schedule: dict  # RELEASED_SCHEDULE's keys, read from the directory
    layout: str  # "original" or "diffusers"
    root: Path
    gate: object = None  # a delta.NoiseGate: customized weights at high noise only (delta.apply_delta(from_t=...))
    source: dict | None = None  # where the weights came from (hub.resolve): folder, or Hub id, revision and commit
    # The toy world's other family (load_models(denoiser="dit")): a Wan 2.1-architecture DiT trained with rectified
    # flow (flow.py) in place of the UNet, on the same VAE, text encoder and tokenizer; `unet` is then None.
    dit: nn.Module | None = None
    flow_shift: float | None = None  # the DiT's time shift, for training and sampling alike

    @property
    def denoiser(self) -> nn.Module:
        """The network a run trains and samples: the UNet, or the DiT."""
        return self.unet if self.dit is None else self.dit


def _pick(folder: Path, stems, variant: str | None, what: str) -> Path:
    """First existing `{stem}[.{variant}].{safetensors,bin}` in `folder` (safetensors preferred: no pickle at all)."""
    tried = hub.weight_names(stems, variant)  # the order hub.py also fetches by
    for name in tried:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: no {what} found (looked for {', '.join(tried)})")


def detect_layout(root) -> str:
    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"{root}: not a directory; expected a model directory in the original ModelScope layout "
                           f"(configuration.json, text2video_pytorch_model.pth, ...) or the diffusers layout "
                           f"(unet/, vae/, text_encoder/)")
    if (root / "configuration.json").is_file():
        return "original"
    if (root / "unet").is_dir() or (root / "model_index.json").is_file():
        return "diffusers"
    raise WeightsError(f"{root}: neither layout found: no configuration.json (original ModelScope release) and no "
                       f"unet/ folder (diffusers layout)")


def load_models(root, dtype: torch.dtype | None = torch.float32, variant: str | None = None,
                revision: str | None = None, denoiser: str = "unet") -> Models:
    """Load UNet, VAE, text encoder, tokenizer and schedule constants from a model directory in either layout, or
    from a Hugging Face Hub repository id (hub.resolve: from the cache, or downloaded; `revision` pins a version).

    `variant="fp16"` picks diffusers' `*.fp16.*` files; `dtype` is what the weights become (None: as stored).
    `denoiser="dit"`: the folder's `dit/` (save_dit: the toy model's DiT) replaces the UNet.
    """

    root, source = hub.resolve(str(root), revision, variant)
    layout = detect_layout(root)
    if layout == "original":
        conf = read_json(root / "configuration.json", "ModelScope configuration.json")
        try:
            args, model_cfg = conf["model"]["model_args"], conf["model"]["model_cfg"]
            unet_cfg = layouts.unet_config_from_original(model_cfg)
            # The release fixes the VAE (LDM ddconfig in text_to_video_synthesis_model.py) and the text tower
            # (ViT-H-14); optional `vae_cfg` / `text_cfg` blocks (our extension) describe other sizes, e.g. tests.
            vae_cfg = vae.VAEConfig(**model_cfg.get("vae_cfg", {}))
            text_cfg = te.TextEncoderConfig(**model_cfg["text_cfg"]) if "text_cfg" in model_cfg else \
                layouts.text_config_from_open_clip("ViT-H-14")
            steps = model_cfg.get("num_timesteps", 1000)
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{root / 'configuration.json'}: unusable ({type(e).__name__}: {e})") from None
        if model_cfg.get("mean_type", "eps") != "eps":
            raise WeightsError(f"{root / 'configuration.json'}: mean_type {model_cfg['mean_type']!r}; only eps is supported")
        files = {k: root / args.get(k, name) for k, name in hub.ORIGINAL_FILES.items()}  # the release's names
        unet = layouts.load_unet(files["ckpt_unet"], unet_cfg, dtype)
        autoencoder = layouts.load_vae(files["ckpt_autoencoder"], vae_cfg, dtype)
        text = layouts.load_text_encoder(files["ckpt_clip"], text_cfg, dtype)
        schedule = {**RELEASED_SCHEDULE, "num_train_timesteps": steps}
    else:
        def config(sub):
            return read_json(root / sub / "config.json", f"diffusers {sub} config")

        try:
            unet_cfg = layouts.unet_config_from_diffusers(config("unet"))
            vae_cfg = layouts.vae_config_from_diffusers(config("vae"))
            text_cfg = layouts.text_config_from_hf(config("text_encoder"))
        except ValueError as e:
            if isinstance(e, WeightsError):
                raise
            raise WeightsError(f"{root}: unsupported config ({e})") from None
        unet = layouts.load_unet(_pick(root / "unet", ["diffusion_pytorch_model"], variant, "UNet weights"), unet_cfg, dtype)
        autoencoder = layouts.load_vae(_pick(root / "vae", ["diffusion_pytorch_model"], variant, "VAE weights"), vae_cfg, dtype)
        text = layouts.load_text_encoder(_pick(root / "text_encoder", ["model", "pytorch_model"], variant,
                                          "text encoder weights"), text_cfg, dtype)
        schedule = dict(RELEASED_SCHEDULE)
        if (root / "scheduler" / "scheduler_config.json").is_file():
            sc = read_json(root / "scheduler" / "scheduler_config.json", "diffusers scheduler config")
            schedule.update({k: sc[k] for k in RELEASED_SCHEDULE if k in sc})
        if schedule["prediction_type"] != "epsilon" or schedule["beta_schedule"] != "scaled_linear":
            raise WeightsError(f"{root / 'scheduler'}: only epsilon prediction with scaled_linear betas is supported, "
                               f"found {schedule['prediction_type']} / {schedule['beta_schedule']}")
    tokenizer = te.Tokenizer(text.cfg.context_length)
    models = Models(unet, autoencoder, text, tokenizer, schedule, layout, root, source=source)
    if denoiser == "dit":
        models.dit, models.flow_shift = load_dit(root / "dit", dtype)
        models.unet = None
    elif denoiser != "unet":
        raise ValueError(f"denoiser must be unet or dit, not {denoiser!r}")
    return models


DIT_FILES = ("config.json", "model.safetensors")  # a DiT folder (save_dit): WanDiTConfig's fields + flow_shift


def load_dit(folder: Path, dtype: torch.dtype | None = torch.float32) -> tuple:
    """(WanDiT, its flow shift) from a folder written by save_dit."""
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder}: no DiT here (config.json missing); the toy model's is toy/model/dit/, made by "
                           f"toy/train_dit.py")
    conf = read_json(folder / "config.json", "DiT config")
    try:
        shift = float(conf.pop("flow_shift"))
        cfg = wan_dit.WanDiTConfig(**conf)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{folder / 'config.json'}: unusable ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        dit = wan_dit.WanDiT(cfg)
    sd = read_state_dict(folder / "model.safetensors", "DiT weights")
    return assign_state_dict(dit, sd, source=str(folder), dtype=dtype).eval(), shift


def save_dit(dit: nn.Module, folder, flow_shift: float, dtype: torch.dtype = torch.float16) -> Path:
    """A DiT folder: config.json (WanDiTConfig's fields and the flow shift) + model.safetensors (the original Wan
    names; half precision by default, which the loader casts back)."""
    folder = Path(folder)
    write_json({**asdict(dit.cfg), "patch_size": list(dit.cfg.patch_size), "flow_shift": flow_shift},
               folder / "config.json")
    save_state_dict({k: v.to(dtype) for k, v in dit.state_dict().items()}, folder / "model.safetensors")
    return folder


def base_metadata(models: Models) -> dict:
    """The base model's provenance as a delta file's metadata (strings): its Hub id with the revision asked for and the
    commit it resolved to, or its folder."""
    source = models.source or {"path": str(Path(models.root).resolve())}
    if "commit" not in source:
        return {"base_model": source["path"]}
    return {"base_model": source["repo_id"], "base_revision": source["revision"], "base_commit": source["commit"]}


def save_models(models: Models, root, layout: str = "diffusers") -> Path:
    """Write a complete model directory in either layout (refuses to write into an existing one)."""

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise WeightsError(f"{root}: already exists and is not empty; refusing to overwrite it")
    if layout == "original":
        model_cfg = {**layouts.unet_config_to_original(models.unet.cfg), "num_timesteps": models.schedule["num_train_timesteps"],
                     "mean_type": "eps", "var_type": "fixed_small", "loss_type": "mse",
                     "vae_cfg": asdict(models.vae.cfg), "text_cfg": asdict(models.text_encoder.cfg)}
        write_json({"framework": "pytorch", "task": "text-to-video-synthesis",
                    "model": {"type": "latent-text-to-video-synthesis",
                              "model_args": {"ckpt_clip": "open_clip_pytorch_model.bin",
                                             "ckpt_unet": "text2video_pytorch_model.pth",
                                             "ckpt_autoencoder": "VQGAN_autoencoder.pth", "max_frames": 16},
                              "model_cfg": model_cfg},
                    "pipeline": {"type": "latent-text-to-video-synthesis"}}, root / "configuration.json")
        layouts.save_unet(models.unet, root / "text2video_pytorch_model.pth", layout="original")
        layouts.save_vae(models.vae, root / "VQGAN_autoencoder.pth", layout="original")
        layouts.save_text_encoder(models.text_encoder, root / "open_clip_pytorch_model.bin", layout="open_clip")
    elif layout == "diffusers":
        write_json({"_class_name": "TextToVideoSDPipeline"}, root / "model_index.json")
        write_json(layouts.unet_config_to_diffusers(models.unet.cfg), root / "unet" / "config.json")
        layouts.save_unet(models.unet, root / "unet" / "diffusion_pytorch_model.safetensors")
        write_json(layouts.vae_config_to_diffusers(models.vae.cfg), root / "vae" / "config.json")
        layouts.save_vae(models.vae, root / "vae" / "diffusion_pytorch_model.safetensors")
        layouts.save_text_encoder(models.text_encoder, root / "text_encoder" / "model.safetensors", layout="hf")
        write_json({"_class_name": "DDIMScheduler", **models.schedule, "clip_sample": False, "set_alpha_to_one": False,
                    "steps_offset": 1}, root / "scheduler" / "scheduler_config.json")
    else:
        raise ValueError(f"layout must be 'original' or 'diffusers', not {layout!r}")
    return root


# -----------------------------------------------------------------------------------------------------------------------
# command line: check that a model directory loads and runs


def tiny_models(seed: int = 0) -> Models:
    """Random tiny models (the `tiny` presets) wired like the real ones: for smoke runs and tests, no download."""

    torch.manual_seed(seed)
    models = [unet3d.UNet3D(unet3d.UNET_PRESETS["tiny"]), vae.AutoencoderKL(vae.VAE_PRESETS["tiny"]),
              te.TextEncoder(te.TEXT_PRESETS["tiny"])]
    with torch.no_grad():  # upstream zero-inits some output layers; perturb everything so the smoke run is not trivial
        for m in models:
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return Models(*[m.eval() for m in models], te.Tokenizer(), dict(RELEASED_SCHEDULE), "memory", Path("."))


@torch.no_grad()
def check(models: Models, frames: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """One denoising call and one decode on random latents; prints what was loaded. Returns the decoded video."""
    import time

    g = torch.Generator().manual_seed(seed)
    for name in ("unet", "vae", "text_encoder"):
        m = getattr(models, name)
        n = sum(p.numel() for p in m.parameters())
        print(f"  {name:13s} {type(m).__name__:15s} {n:>14,d} params  {next(m.parameters()).dtype}")
    t0 = time.perf_counter()
    tokens = models.tokenizer(["a person doing the pll sign", ""])  # (2, 77): prompt and the unconditional ''
    context = models.text_encoder(tokens)  # (2, 77, D)
    h = size // models.vae.cfg.downsample_factor
    latents = torch.randn(2, models.unet.cfg.in_channels, frames, h, h, generator=g)
    eps = models.unet(latents, torch.tensor([981, 981]), context)  # (2, 4, F, h, w)
    video = models.vae.decode(latents - 0.1 * eps)  # (2, 3, F, H, W)
    print(f"  text {tuple(context.shape)} -> UNet {tuple(eps.shape)} -> VAE decode {tuple(video.shape)} "
          f"in {time.perf_counter() - t0:.2f} s; output mean {video.mean():+.4f} std {video.std():.4f}")
    assert torch.isfinite(video).all(), "non-finite output"
    return video


def fetch_main(argv) -> int:
    """`python models.py fetch NAME...` and `python models.py check` (hub.py does the work)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="models.py fetch", description="Download base models and the evaluators' weights "
                                "now, into the caches the runs read (hub.py), and print what is where.")
    p.add_argument("names", nargs="+", help="Hub repository ids (" + ", ".join(hub.KNOWN_MODELS) + ", or any other), "
                   "evaluators (" + ", ".join(hub.URL_FILES) + "), CLIPs as clip:MODEL:TAG (clip:ViT-B-32-quickgelu:"
                   "openai) or clip:hf-hub:org/repo")
    p.add_argument("--revision", help="branch, tag or commit of the Hub repositories")
    p.add_argument("--variant", default=None, help="diffusers weight variant, e.g. fp16 (only those files)")
    p.add_argument("--sha256", action="append", default=[], metavar="HEX",
                   help="accept a URL file with this sha256 when none is pinned (repeat for several)")
    try:
        if argv[:1] == ["check"]:
            print("\n".join(hub.check()))
            return 0
        args = p.parse_args(argv[1:])
        for name in args.names:
            print("\n".join(hub.fetch(name, args.revision, args.variant, args.sha256)), flush=True)
        return 0
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv=None):
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] in (["fetch"], ["check"]):
        return fetch_main(argv)
    p = argparse.ArgumentParser(description="Load a ModelScope text-to-video model (a directory in the original or "
                                "diffusers layout, or a Hugging Face Hub id), print what it holds and run one UNet "
                                "call + VAE decode on random latents; a Wan 2.1 folder or id: one DiT call + decode. "
                                "Also: models.py fetch NAME..., models.py check.")
    p.add_argument("model", nargs="?", help="model directory (configuration.json + *.pth, or unet/ vae/ "
                   "text_encoder/), or a Hub repository id, e.g. " + hub.SUGGESTED)
    p.add_argument("--tiny", action="store_true", help="instead: build random tiny models, save them in both layouts "
                   "to a temporary folder, load each back and check that both give the same video")
    p.add_argument("--revision", help="branch, tag or commit of a Hub repository")
    p.add_argument("--variant", default=None, help="diffusers weight variant, e.g. fp16")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="frame size in pixels for the smoke call")
    args = p.parse_args(argv)
    if bool(args.model) == args.tiny:
        p.error("give a model directory or --tiny (not both)")
    try:
        if args.model and wan_models.is_wan(args.model):  # Wan 2.1 (wan_models.py): its own networks
            models = wan_models.load_wan(args.model, revision=args.revision)
            print(f"{args.model}: {models.layout} layout")
            wan_models.check(models, 1 + 4 * max(1, (args.frames - 1) // 4), args.size)
            return 0
        if args.model:
            models = load_models(args.model, variant=args.variant, revision=args.revision)
            at = f" ({models.source['repo_id']} at {models.source['commit']})" if "commit" in models.source else ""
            print(f"{args.model}: {models.layout} layout{at}")
            check(models, args.frames, args.size)
            return 0
        videos = []
        with tempfile.TemporaryDirectory() as tmp:
            models = tiny_models()
            for layout in ("original", "diffusers"):
                folder = save_models(models, Path(tmp) / layout, layout)
                print(f"{layout} layout written to {folder} and loaded back:")
                videos.append(check(load_models(folder), args.frames, args.size))
        same = torch.equal(videos[0], videos[1])
        print(f"both layouts give {'the same' if same else 'DIFFERENT'} video")
        return 0 if same else 1
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
