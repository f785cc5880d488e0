"""Files: read weights safely, assign them strictly, write anything atomically, hash them; read text files and check
output folders with errors that name the file. Imports nothing of the project (models.py loads whole model directories
and lists the files of the two release layouts).

Security: nothing here unpickles arbitrary code. Pickles are read with `torch.load(weights_only=True)`; the one legacy
file that needs more (the Lightning VAE checkpoint names `pytorch_lightning` and numpy classes) goes through
`_RestrictedUnpickler`, which rebuilds tensors and replaces every other global by an inert placeholder, so a malicious
`__reduce__` in a checkpoint is never called.

Memory: models are built on the meta device and the loaded tensors are assigned (`load_state_dict(assign=True)`), and
pickles are memory-mapped, so a 1.4 B-parameter UNet never exists twice in RAM.
"""

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn

# the command lines' precision names (--precision, --frozen-dtype, --save-dtype, delta.py --dtype)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a --precision name; None for fp32, which runs without autocast."""
    return None if precision == "fp32" else DTYPES[precision]


def cast(sd: dict, precision: str) -> dict:
    """The floating tensors of a state dict in a precision name's dtype (a delta file's --save-dtype / --dtype)."""
    return {k: v.to(DTYPES[precision]) if v.is_floating_point() else v for k, v in sd.items()}


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


def sha256(path) -> str:
    """The file's SHA-256 (hex), read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_id(tensors: dict) -> str:
    """A cheap identity of a model's weights (16 hex digits): sha256 over each tensor's name, shape and first and last
    8 values, rounded to fp16 so that a release's fp16 copy matches its fp32 weights. It reads a few bytes per tensor
    (never the gigabytes), and whatever folder, layout or copy the weights were loaded from, the same weights give it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        h.update(f"{name}{tuple(tensors[name].shape)}".encode())
        h.update(torch.cat([flat[:8], flat[-8:]]).to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]


def read_json(path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found; expected the {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e}); expected the {what}") from None
