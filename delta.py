"""Customized weights ("deltas") on a base model: load them, gate them by noise level, and shrink them to share.

    python delta.py compress --model BASE --delta run/delta.safetensors --rank 16 --out run/delta-r16.safetensors
    python delta.py compress --model BASE --delta run/delta.safetensors --energy 0.9 --dtype bf16 --out small.safetensors

A delta file (safetensors, written by train.py; sample.py/evaluate.py --delta load it) holds
    unet.<name>                           a trained UNet tensor, whole (float32, or train.py --save-dtype bf16/fp16)
    lowrank.<name>.up / lowrank.<name>.down  a compressed one: W = W_base + (up @ down).reshape(W.shape)
    text_encoder.placeholder_embeddings   learned token rows, with the metadata entry placeholder_words (JSON list)
and in its metadata the base model it was trained on: base_model (its folder or Hub id) and base_weights
(weights.weights_id of its UNet). Loading it onto other shapes is refused in one line; onto other weights of the same
shapes (ZeroScope and ModelScope share every shape) it loads with one warning line naming both (check_base).

Noise gating (`apply_delta(..., from_t=TAU)`): NewMove's premise is that high-noise steps lay down motion and layout
and low-noise steps appearance (paper §3, "coarse-noise timesteps"). With a gate the customized tensors are used for
steps with t >= TAU and the base model's below, so the learned motion is kept while the untouched base model finishes
the appearance, where the training clips' look would otherwise leak in.

Compression is not LoRA training (the paper finds LoRA learns the motion poorly, Table 2): it is a truncated SVD of the
change a full fine-tune made, per weight, after the fact. Conv kernels are matrices (out, in * kernel size).
"""

if __name__ == "__main__":  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    import omp
    omp.choose_wait_policy()

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from weights import DTYPES, WeightsError, cast, read_state_dict, save_state_dict, weights_id


# -----------------------------------------------------------------------------------------------------------------------
# loading, with an optional noise gate


class NoiseGate:
    """The customized UNet tensors for steps with t >= from_t, the base model's below. Samplers go from high t to
    low t, so a video switches to the base weights once and the next batch switches back: `at(t)` before every UNet
    call is all a sampler does. The changed tensors are held twice (the UNet holds one set), nothing else."""

    def __init__(self, unet, base: dict, from_t: float):
        self.params = {n: unet.get_parameter(n) for n in base}
        self.spare, self.from_t, self.custom, self.switches = base, from_t, True, 0

    def at(self, t: float):
        """Put the weights that step t uses in the UNet."""
        if (t >= self.from_t) == self.custom:
            return
        for n, p in self.params.items():  # exchange the storages: no copy, both sets stay bit-exact
            self.spare[n], p.data = p.data, self.spare[n].to(p.device, p.dtype)
        self.custom, self.switches = not self.custom, self.switches + 1


def apply_delta(models, path, from_t: float | None = None) -> dict:
    """Load a delta file (train.py's, or `compress`'s) onto the base models, strictly (check_base warns if they are
    not the weights it was trained on); returns its metadata.
    from_t: use the customized UNet tensors only for steps with t >= from_t (a NoiseGate in models.gate)."""
    from safetensors import safe_open

    import text_encoder as te

    path = Path(path)
    if path.suffix != ".safetensors":  # train.py writes nothing else; a .pt here is most likely a state.pt
        raise WeightsError(f"{path}: a delta must be the .safetensors file train.py writes (delta.safetensors), "
                           f"not a {path.suffix or 'suffix-less'} file")
    if from_t is not None and models.dit is not None:
        raise WeightsError(f"{path}: noise gating (--delta-from-t) switches weights at a DDIM timestep; the DiT's flow "
                           f"sampler has none of those here")
    T = models.schedule["num_train_timesteps"] if from_t is not None else None
    if from_t is not None and not 0 <= from_t <= T:  # T: the base model at every step (t <= T - 1)
        raise WeightsError(f"--delta-from-t must be in 0..{T}, got {from_t}")
    if models.gate is not None:
        raise WeightsError(f"{path}: these models already carry a noise-gated delta; load one gated delta at a time")
    sd = read_state_dict(path, "customized weights (.safetensors from train.py)")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a diverged run: applying it would give black videos
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise WeightsError(f"{path}: {bad[0]} holds NaN or Inf values{more}; this delta comes from a diverged run")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    unet_sd, base = models.denoiser.state_dict(), {}  # the UNet's, or the toy DiT's (dit.* keys)
    bases = f" (trained on {meta.get('base_model', 'a model it does not name')}, applied to {models.root})"
    kind = "unet" if models.dit is None else "dit"
    values = unet_values(sd, unet_sd, path, bases, kind)  # every tensor checked before the first is changed
    rows = sd.get("text_encoder.placeholder_embeddings")
    if rows is not None and rows.shape[-1] != (width := models.text_encoder.token_embedding.weight.shape[1]):
        raise WeightsError(f"{path}: its learned token rows are {rows.shape[-1]} wide, this text encoder's {width}: a "
                           f"delta for another base model{bases}")
    check_base(meta, unet_sd, models.root, path)  # same shapes: a warning if it was trained on other weights
    for name, value in values.items():
        if from_t is not None:
            base[name] = unet_sd[name].clone()
        unet_sd[name].copy_(value)
    if "text_encoder.placeholder_embeddings" in sd:  # the prompt is encoded once: a learned token acts at every step
        words = json.loads(meta.get("placeholder_words", "[]"))
        te.load_placeholder_state({"words": words, "embeddings": sd["text_encoder.placeholder_embeddings"]},
                                  models.tokenizer, models.text_encoder)
    if from_t is not None:
        models.gate = NoiseGate(models.denoiser, base, from_t)
    return meta


def check_base(meta: dict, unet_sd: dict, model, path):
    """One warning line on stderr if the UNet weights a delta was trained on (its metadata's base_weights, written by
    train.py) are not those of `model`, the one it is applied to: the shapes match, so it loads (ZeroScope and
    ModelScope share every shape), but the videos will be worse. weights_id reads a few bytes per tensor. A delta
    that records no base weights (older ones) is not checked."""
    recorded = meta.get("base_weights")
    here = weights_id(unet_sd) if recorded else None
    if recorded and here != recorded:
        print(f"warning: {path} was trained on {meta.get('base_model', 'another model')} (weights {recorded}), not on "
              f"{model} (weights {here}), which it is applied to: expect worse videos", file=sys.stderr)


def unet_values(sd: dict, unet_sd: dict, path, bases: str = "", denoiser: str = "unet") -> dict:
    """{UNet parameter name: its customized value} from a delta's tensors, low-rank pairs expanded on the base.
    bases: the delta's base model and this one, for the message when the names or shapes do not fit. denoiser:
    "dit" for a delta of the toy DiT (its tensors are dit.*)."""
    out = {}
    for key, value in sd.items():
        if key == "text_encoder.placeholder_embeddings":
            continue
        kind, _, name = key.partition(".")
        if kind == "lowrank":
            name, _, half = name.rpartition(".")
            if half == "down":
                continue  # read with its "up"
            down = sd.get(f"lowrank.{name}.down")
            if half != "up" or down is None:
                raise WeightsError(f"{path}: {key} has no partner (low-rank pairs are lowrank.<name>.up and .down)")
        elif kind != denoiser:
            raise WeightsError(f"{path}: unexpected tensor {key} (expected {denoiser}.*, lowrank.* or "
                               "text_encoder.placeholder_embeddings)")
        if name not in unet_sd:
            raise WeightsError(f"{path}: {name} is not a parameter of this UNet: a delta for another base model{bases}")
        base = unet_sd[name]
        if kind == "lowrank":  # W_base + up @ down, in float32 whatever the file's dtype
            value = value.float() @ down.float()  # the change as an (out, rest) matrix, conv kernels too
            if value.shape == (base.shape[0], base.numel() // base.shape[0]):
                value = base.float() + value.reshape(base.shape)
        if value.shape != base.shape:
            raise WeightsError(f"{path}: {name} is {tuple(value.shape)} in the delta but {tuple(base.shape)} in this "
                               f"UNet: a delta for a base model of other shapes{bases}")
        out[name] = value
    return out


# -----------------------------------------------------------------------------------------------------------------------
# compression: a truncated SVD of each change


def low_rank(change: torch.Tensor, rank: int = 0, energy: float = 0.0) -> tuple:
    """(up (out, r), down (r, rest)) with up @ down the best rank-r approximation of `change` as an (out, rest)
    matrix (Eckart-Young). r = `rank`, or the fewest singular values holding `energy` of the squared norm."""
    m = change.reshape(change.shape[0], -1).double()  # float64: full rank reproduces the change to ~1e-15
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    if energy:
        kept = (S ** 2).cumsum(0) / (S ** 2).sum().clamp_min(1e-300)
        rank = int((kept < energy).sum()) + 1
    r = max(1, min(rank, len(S)))
    return (U[:, :r] * S[:r]).float(), Vh[:r].float()


def compress(sd: dict, unet_sd: dict, rank: int = 0, energy: float = 0.0) -> dict:
    """A delta's tensors with every matrix (and conv kernel) change stored low-rank where that is smaller; vectors
    (biases, norms) and learned token rows are kept whole."""
    out = {}
    for key, value in sd.items():
        name = key[len("unet."):]
        if not key.startswith("unet.") or value.dim() < 2:
            out[key] = value
            continue
        up, down = low_rank(value.float() - unet_sd[name].float(), rank, energy)
        if up.numel() + down.numel() < value.numel():
            out[f"lowrank.{name}.up"], out[f"lowrank.{name}.down"] = up, down
        else:  # at this rank the factors would be larger than the tensor itself
            out[key] = value
    return out


def file_bytes(shapes: list, rank: int, itemsize: int) -> int:
    """Bytes of the tensors (not the header) of a delta of weights with these shapes, compressed at `rank` (0: whole)."""
    total = 0
    for s in shapes:
        n, rows = math.prod(s), s[0]
        lr = rank * (rows + n // rows) if rank and len(s) >= 2 else n
        total += min(n, lr)
    return total * itemsize


# -----------------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="a delta's weight changes as truncated SVDs (loads like any delta)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--model", required=True, help="the base model the delta was trained from: a folder or a Hub "
                   "repository id (hub.py)")
    c.add_argument("--revision", help="branch, tag or commit of a Hub --model (the delta's base_commit)")
    c.add_argument("--delta", required=True, help="delta.safetensors written by train.py")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="singular values kept per weight")
    g.add_argument("--energy", type=float, help="or: the share of each change's squared norm to keep, e.g. 0.9")
    c.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of the stored factors")
    c.add_argument("--out", required=True, help="the compressed file (.safetensors; never overwritten)")
    args = p.parse_args(argv)
    try:
        if args.rank is not None and args.rank < 1 or args.energy is not None and not 0 < args.energy <= 1:
            p.error(f"--rank must be >= 1 and --energy in (0, 1], got {args.rank} and {args.energy}")
        if Path(args.out).suffix != ".safetensors":
            p.error(f"--out {args.out}: the compressed delta must be a .safetensors file")
        from models import load_models
        from safetensors import safe_open

        sd = read_state_dict(args.delta, "customized weights (.safetensors from train.py)")
        with safe_open(str(args.delta), "pt") as f:
            meta = dict(f.metadata() or {})
        unet_sd = load_models(args.model, revision=args.revision).unet.state_dict()
        bases = f" (trained on {meta.get('base_model', 'a model it does not name')}, --model {args.model})"
        unet_values(sd, unet_sd, args.delta, bases)  # the same checks as loading it (names, shapes, pairs)
        check_base(meta, unet_sd, args.model, args.delta)  # the change is taken against --model's weights
        small = cast(compress(sd, unet_sd, args.rank or 0, args.energy or 0.0), args.dtype)
        meta.update(compressed_from=str(args.delta), rank=str(args.rank or ""), energy=str(args.energy or ""),
                    dtype=args.dtype)
        save_state_dict(small, args.out, metadata=meta)
        size = lambda d: sum(v.numel() * v.element_size() for v in d.values())  # noqa: E731
        print(f"wrote {args.out}: {size(small) / 1e6:.2f} MB of tensors ({size(sd) / 1e6:.2f} MB before), "
              f"{sum(k.endswith('.up') for k in small)} of {len(sd)} tensors low-rank")
        return 0
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
