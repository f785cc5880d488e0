"""Weight files: read them safely, assign them strictly, write them atomically, and load a model directory.

Two release layouts of the same ModelScope text-to-video model are understood (facts: docs/modelscope.md):

  original  (damo/text-to-video-synthesis, zeroscope's zs2_576w/)      diffusers (text-to-video-ms-1.7b, zeroscope_v2_576w)
    configuration.json                                                   model_index.json (optional)
    text2video_pytorch_model.pth   plain UNet state dict                 unet/config.json + diffusion_pytorch_model[.fp16].{safetensors,bin}
    VQGAN_autoencoder.pth          Lightning checkpoint, first_stage_model.*   vae/config.json + diffusion_pytorch_model[...]
    open_clip_pytorch_model.bin    full OpenCLIP ViT-H-14 (visual.* unused)    text_encoder/config.json + model[...] (HF CLIPTextModel, 23 layers)

Security: nothing here unpickles arbitrary code. Pickles are read with `torch.load(weights_only=True)`; the one legacy
file that needs more (the Lightning VAE checkpoint names `pytorch_lightning` and numpy classes) goes through
`_RestrictedUnpickler`, which rebuilds tensors and replaces every other global by an inert placeholder, so a malicious
`__reduce__` in a checkpoint is never called.

Memory: models are built on the meta device and the loaded tensors are assigned (`load_state_dict(assign=True)`), and
pickles are memory-mapped, so a 1.4 B-parameter UNet never exists twice in RAM.
"""

import json
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

# -----------------------------------------------------------------------------------------------------------------------
# errors


class WeightsError(ValueError):
    """A weight file or model directory that cannot be used; the message names the file and the problem."""


def _first(names, n=8):
    names = sorted(names)
    more = f" ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def detect_format(keys) -> str:
    """Human-readable name of the layout a state dict's keys look like (used in error messages)."""
    keys = list(keys)
    probes = [  # (substring, description), first hit wins
        ("input_blocks.", "original ModelScope UNet (input_blocks.*)"),
        ("down_blocks.0.temp_convs", "diffusers UNet3DConditionModel (down_blocks.*.temp_convs)"),
        ("down_blocks.0.resnets", "diffusers 2-D model (down_blocks.* without temporal layers)"),
        ("first_stage_model.", "Lightning LDM checkpoint (first_stage_model.*)"),
        ("encoder.down.", "original LDM autoencoder (encoder.down.*)"),
        ("encoder.down_blocks.", "diffusers AutoencoderKL (encoder.down_blocks.*)"),
        ("transformer.resblocks.", "OpenCLIP (transformer.resblocks.*)"),
        ("encoder.layers.", "Hugging Face CLIPTextModel (encoder.layers.*)"),
    ]
    for probe, name in probes:
        if any(probe in k for k in keys):
            return name
    return f"unknown (first keys: {_first(keys, 4)})"


# -----------------------------------------------------------------------------------------------------------------------
# reading


class _Inert:
    """Placeholder for any global a legacy checkpoint names that is not needed to rebuild tensors.

    Whatever the pickle does with it (call it, build it, set its state, fill it), nothing runs and nothing is imported.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def __repr__(self):
        return f"<inert {type(self).__name__}>"


# Only these globals are resolved for real; torch.load's own wrapper resolves the `*Storage` classes before us.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        # Anything else (pytorch_lightning callbacks, numpy scalars, os.system, ...) becomes a harmless class.
        return type(f"{module}.{name}", (_Inert,), {})


class _RestrictedPickleModule:
    """The `pickle_module` torch.load expects: an object with an `Unpickler` (and `load`) attribute."""

    Unpickler = _RestrictedUnpickler
    __name__ = "restricted_pickle"

    @staticmethod
    def load(f, **kwargs):
        return _RestrictedUnpickler(f, **kwargs).load()


def _torch_load(path: Path):
    """torch.load with weights_only=True (memory-mapped when the file is a zip archive); legacy checkpoints that
    weights_only refuses are read by the restricted unpickler instead. Any failure names the file."""
    zipped = _is_zip(path)  # pre-1.6 (non-zip) files cannot be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError:
        pass  # e.g. a Lightning checkpoint naming pytorch_lightning / numpy classes: see _RestrictedUnpickler
    except Exception as e:  # a corrupt or foreign file: name it, do not dump the unpickler's traceback
        raise WeightsError(f"{path}: could not be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule,
                          mmap=zipped)
    except Exception as e:
        raise WeightsError(f"{path}: could not be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_state_dict(path, what: str = "weights") -> dict:
    """Read a `.safetensors` or torch pickle file into a flat {name: tensor} dict on the CPU, without running code.

    A Lightning-style `{'state_dict': {...}}` wrapper is unwrapped. `what` describes the file for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found; expected the {what}")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: file is empty; expected the {what}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:
            raise WeightsError(f"{path}: not a valid safetensors file ({e})") from None
    else:
        sd = _torch_load(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # PyTorch-Lightning checkpoint
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        bad = type(sd).__name__ if not isinstance(sd, dict) else "a dict with non-tensor values"
        raise WeightsError(f"{path}: expected a state dict of tensors for the {what}, found {bad}")
    return dict(sd)


# -----------------------------------------------------------------------------------------------------------------------
# assigning


def assign_state_dict(model: nn.Module, sd: dict, *, source: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Strictly load `sd` (already in our key names) into `model`, which may live on the meta device.

    Key sets must match exactly and every shape must agree; errors name the source, the first offending keys, the
    detected layout and both shapes. Tensors are assigned, not copied (cast only if `dtype` differs).
    """
    own = model.state_dict()
    missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
    if missing or unexpected:
        lines = [f"{source}: the weights do not fit {type(model).__name__} "
                 f"({len(sd)} tensors given, {len(own)} expected; detected layout: {detect_format(sd)})"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_first(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_first(unexpected)}")
        raise WeightsError("\n".join(lines))
    for k, v in own.items():
        if v.shape != sd[k].shape:
            raise WeightsError(f"{source}: shape mismatch for {k}: file has {tuple(sd[k].shape)}, "
                               f"model expects {tuple(v.shape)} (wrong config for these weights?)")
    if dtype is not None:
        sd = {k: v if v.dtype == dtype else v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model


# -----------------------------------------------------------------------------------------------------------------------
# writing


def atomic_write(path, write, overwrite: bool = False) -> Path:
    """Create `path` by `write(tmp)` on a temporary file in the same folder, then one rename: a crash or a reader never
    sees a half-written file. Refuses to replace an existing file unless `overwrite`. The file gets the user's usual
    mode (0666 minus the umask), not the 0600 of the temporary file. The one copy of this idiom in the project."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise WeightsError(f"{path}: already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)  # (reading the umask means setting it; restored at once)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_text(path, what: str = "text file") -> str:
    """A UTF-8 text file (captions, prompts, CSVs, class names); a missing, unreadable or non-UTF-8 file is a
    WeightsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {what} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise WeightsError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the "
                           f"{what} as UTF-8") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def writable_dir(path, flag: str = "--out") -> Path:
    """Create folder `path` if needed and check that a file can be written in it (a read-only place, a file in the
    way): a one-line error before the heavy work, not a traceback after it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise WeightsError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


def save_state_dict(sd: dict, path, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a state dict atomically (atomic_write) as safetensors (by suffix) or a torch file."""
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        write = lambda tmp: save_file(sd, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})  # noqa: E731
    else:
        write = lambda tmp: torch.save(sd, tmp)  # noqa: E731
    return atomic_write(path, write, overwrite)


def write_json(obj, path, overwrite: bool = False) -> Path:
    """Atomic JSON write with the same no-silent-overwrite rule as save_state_dict."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"), overwrite)


def read_json(path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found; expected the {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e}); expected the {what}") from None


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


def _pick(folder: Path, stems, variant: str | None, what: str) -> Path:
    """First existing `{stem}[.{variant}].{safetensors,bin}` in `folder` (safetensors preferred: no pickle at all)."""
    tried = []
    for stem in stems:
        for ext in ("safetensors", "bin"):
            name = f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"
            tried.append(name)
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


def load_models(root, dtype: torch.dtype | None = torch.float32, variant: str | None = None) -> Models:
    """Load UNet, VAE, text encoder, tokenizer and schedule constants from a model directory in either layout.

    `variant="fp16"` picks diffusers' `*.fp16.*` files; `dtype` is what the weights become (None: as stored).
    """
    import text_encoder as te  # imported here: the model files import this module for their I/O
    import unet3d
    import vae

    root = Path(root)
    layout = detect_layout(root)
    if layout == "original":
        conf = read_json(root / "configuration.json", "ModelScope configuration.json")
        try:
            args, model_cfg = conf["model"]["model_args"], conf["model"]["model_cfg"]
            unet_cfg = unet3d.config_from_original(model_cfg)
            # The release fixes the VAE (LDM ddconfig in text_to_video_synthesis_model.py) and the text tower
            # (ViT-H-14); optional `vae_cfg` / `text_cfg` blocks (our extension) describe other sizes, e.g. tests.
            vae_cfg = vae.VAEConfig(**model_cfg.get("vae_cfg", {}))
            text_cfg = te.TextEncoderConfig(**model_cfg["text_cfg"]) if "text_cfg" in model_cfg else \
                te.config_from_open_clip("ViT-H-14")
            steps = model_cfg.get("num_timesteps", 1000)
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{root / 'configuration.json'}: unusable ({type(e).__name__}: {e})") from None
        if model_cfg.get("mean_type", "eps") != "eps":
            raise WeightsError(f"{root / 'configuration.json'}: mean_type {model_cfg['mean_type']!r}; only eps is supported")
        unet = unet3d.load_unet(root / args.get("ckpt_unet", "text2video_pytorch_model.pth"), unet_cfg, dtype)
        autoencoder = vae.load_vae(root / args.get("ckpt_autoencoder", "VQGAN_autoencoder.pth"), vae_cfg, dtype)
        text = te.load_text_encoder(root / args.get("ckpt_clip", "open_clip_pytorch_model.bin"), text_cfg, dtype)
        schedule = {**RELEASED_SCHEDULE, "num_train_timesteps": steps}
    else:
        def config(sub):
            return read_json(root / sub / "config.json", f"diffusers {sub} config")

        try:
            unet_cfg = unet3d.config_from_diffusers(config("unet"))
            vae_cfg = vae.config_from_diffusers(config("vae"))
            text_cfg = te.config_from_hf(config("text_encoder"))
        except ValueError as e:
            if isinstance(e, WeightsError):
                raise
            raise WeightsError(f"{root}: unsupported config ({e})") from None
        unet = unet3d.load_unet(_pick(root / "unet", ["diffusion_pytorch_model"], variant, "UNet weights"), unet_cfg, dtype)
        autoencoder = vae.load_vae(_pick(root / "vae", ["diffusion_pytorch_model"], variant, "VAE weights"), vae_cfg, dtype)
        text = te.load_text_encoder(_pick(root / "text_encoder", ["model", "pytorch_model"], variant,
                                          "text encoder weights"), text_cfg, dtype)
        schedule = dict(RELEASED_SCHEDULE)
        if (root / "scheduler" / "scheduler_config.json").is_file():
            sc = read_json(root / "scheduler" / "scheduler_config.json", "diffusers scheduler config")
            schedule.update({k: sc[k] for k in RELEASED_SCHEDULE if k in sc})
        if schedule["prediction_type"] != "epsilon" or schedule["beta_schedule"] != "scaled_linear":
            raise WeightsError(f"{root / 'scheduler'}: only epsilon prediction with scaled_linear betas is supported, "
                               f"found {schedule['prediction_type']} / {schedule['beta_schedule']}")
    tokenizer = te.Tokenizer(text.cfg.context_length)
    return Models(unet, autoencoder, text, tokenizer, schedule, layout, root)


def save_models(models: Models, root, layout: str = "diffusers") -> Path:
    """Write a complete model directory in either layout (refuses to write into an existing one)."""
    import text_encoder as te
    import unet3d
    import vae

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise WeightsError(f"{root}: already exists and is not empty; refusing to overwrite it")
    if layout == "original":
        model_cfg = {**unet3d.config_to_original(models.unet.cfg), "num_timesteps": models.schedule["num_train_timesteps"],
                     "mean_type": "eps", "var_type": "fixed_small", "loss_type": "mse",
                     "vae_cfg": asdict(models.vae.cfg), "text_cfg": asdict(models.text_encoder.cfg)}
        write_json({"framework": "pytorch", "task": "text-to-video-synthesis",
                    "model": {"type": "latent-text-to-video-synthesis",
                              "model_args": {"ckpt_clip": "open_clip_pytorch_model.bin",
                                             "ckpt_unet": "text2video_pytorch_model.pth",
                                             "ckpt_autoencoder": "VQGAN_autoencoder.pth", "max_frames": 16},
                              "model_cfg": model_cfg},
                    "pipeline": {"type": "latent-text-to-video-synthesis"}}, root / "configuration.json")
        unet3d.save_unet(models.unet, root / "text2video_pytorch_model.pth", layout="original")
        vae.save_vae(models.vae, root / "VQGAN_autoencoder.pth", layout="original")
        te.save_text_encoder(models.text_encoder, root / "open_clip_pytorch_model.bin", layout="open_clip")
    elif layout == "diffusers":
        write_json({"_class_name": "TextToVideoSDPipeline"}, root / "model_index.json")
        write_json(unet3d.config_to_diffusers(models.unet.cfg), root / "unet" / "config.json")
        unet3d.save_unet(models.unet, root / "unet" / "diffusion_pytorch_model.safetensors")
        write_json(vae.config_to_diffusers(models.vae.cfg), root / "vae" / "config.json")
        vae.save_vae(models.vae, root / "vae" / "diffusion_pytorch_model.safetensors")
        te.save_text_encoder(models.text_encoder, root / "text_encoder" / "model.safetensors", layout="hf")
        write_json({"_class_name": "DDIMScheduler", **models.schedule, "clip_sample": False, "set_alpha_to_one": False,
                    "steps_offset": 1}, root / "scheduler" / "scheduler_config.json")
    else:
        raise ValueError(f"layout must be 'original' or 'diffusers', not {layout!r}")
    return root


# -----------------------------------------------------------------------------------------------------------------------
# command line: check that a model directory loads and runs


def _tiny_models(seed: int = 0) -> Models:
    """Random tiny models (the `tiny` presets) wired like the real ones: for smoke runs and tests, no download."""
    import text_encoder as te
    import unet3d
    import vae

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
    factor = 2 ** (len(models.vae.cfg.block_out_channels) - 1)
    latents = torch.randn(2, models.unet.cfg.in_channels, frames, size // factor, size // factor, generator=g)
    eps = models.unet(latents, torch.tensor([981, 981]), context)  # (2, 4, F, h, w)
    video = models.vae.decode(latents - 0.1 * eps)  # (2, 3, F, H, W)
    print(f"  text {tuple(context.shape)} -> UNet {tuple(eps.shape)} -> VAE decode {tuple(video.shape)} "
          f"in {time.perf_counter() - t0:.2f} s; output mean {video.mean():+.4f} std {video.std():.4f}")
    assert torch.isfinite(video).all(), "non-finite output"
    return video


def main(argv=None):
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Load a ModelScope text-to-video model directory (original or diffusers "
                                "layout), print what it holds and run one UNet call + VAE decode on random latents.")
    p.add_argument("model", nargs="?", help="model directory (configuration.json + *.pth, or unet/ vae/ text_encoder/)")
    p.add_argument("--tiny", action="store_true", help="instead: build random tiny models, save them in both layouts "
                   "to a temporary folder, load each back and check that both give the same video")
    p.add_argument("--variant", default=None, help="diffusers weight variant, e.g. fp16")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="frame size in pixels for the smoke call")
    args = p.parse_args(argv)
    if bool(args.model) == args.tiny:
        p.error("give a model directory or --tiny (not both)")
    try:
        if args.model:
            print(f"{args.model}: {detect_layout(args.model)} layout")
            check(load_models(args.model, variant=args.variant), args.frames, args.size)
            return 0
        videos = []
        with tempfile.TemporaryDirectory() as tmp:
            models = _tiny_models()
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
    import weights  # run from the importable module, so its WeightsError is the one the model files raise

    raise SystemExit(weights.main())
