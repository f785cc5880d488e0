"""Train the toy base text-to-video model from scratch on the BASE motions of toy/world.py (never the novel ones).

    python toy/train_base.py --out toy/model --minutes 80          # ~80 minutes on 2 CPU cores
    python toy/train_base.py --out toy/model --minutes 40 --resume # continue a run (same seed: same data)

The committed toy/model came from six invocations on 2026-11-24, each continuing the previous one's weights (about
3 h 45 min in all on 2 shared cores):
    python toy/train_base.py --text joint --steps 2542 --work runs/b1 --out runs/m1                 # 74 min
    python toy/train_base.py --init runs/m1 --timesteps coarse --steps 500 --work runs/b2 --out runs/m2
    python toy/train_base.py --resume --timesteps high --steps 2000 --work runs/b2 --out runs/m2    # 58 min
    python toy/train_base.py --init runs/m2 --timesteps high --loss-weight x0 --lr 3e-4 --steps 1000 --work runs/b3 \
        --out runs/m3                                                                              # 30 min
    python toy/train_base.py --resume --timesteps high --loss-weight x0 --max-weight 100 --lr 3e-4 --steps 1500 \
        --work runs/b3 --out runs/m3
    python toy/train_base.py --resume --timesteps high --loss-weight x0 --max-weight 100 --signal-free 0.25 \
        --lr 3e-4 --steps 3000 --work runs/b3 --out toy/model

The same modules as the real model, in tiny configs: a 3-level KL VAE (32x32 frames -> 8x8x4 latents), the `tiny`
text encoder and the `toy` UNet3D. Two stages:
  1. the VAE, as an autoencoder on single frames (MSE + a small KL term); its latent scale is then measured
     (scaling_factor = 1 / std of the latents, as LDM chose 0.18215 for SD);
  2. the UNet with the standard eps-prediction DDPM loss, 10% empty captions for classifier-free guidance, and an
     EMA of the weights (what gets saved). The text encoder is, as in ModelScope, frozen: here a random draw from the
     seed (`--text frozen`, the default). Training it jointly (`--text joint`, run 1 above) let the colour words grow
     large embeddings while "left"/"right"/"up"/"down" collapsed onto nearly one (output distance 0.4 against 12 for
     a colour change). A random frozen encoder keeps every word equally distinct.

Direction words (left/right vs up/down, and which way along the axis) were the hard part; measured with the base
prompts after each stage (docs/toy-world.md): after run 3 the model ignored them (motion 55%: its translations
went where the initial noise suggested). The eps loss barely sees a clip at high t (its x0 error is scaled by
abar / (1 - abar) = 1/26 at t = 800, 1/214 at t = 999), which is where the prompt has to decide the path, so runs 4-5
weight each clip's loss by clamp(1/SNR, 1, max) (= the x0 error there): the axis was learned (left/right give
horizontal, up/down vertical paths) but not the sign, 68%. The sign came with run 6 (`--signal-free`): the released
schedule leaves 6.8% of the clip in x_999, enough to read a path's direction off the input, so the model never had
to take it from the prompt, and DDIM's first step, from pure noise, got a guess. Training a quarter of each batch on
inputs of pure noise fixes that mismatch. `--trail` (moving shapes leave a fading trail) is an earlier experiment
that did not help. `python toy/probe.py` measures the prompt sensitivity.

Everything is a function of --seed. The result is written with save_models in the diffusers layout (fp16
files, which the loaders cast back to float32), so `--model toy/model` works everywhere.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `python toy/x.py` puts toy/ on sys.path, not the repository root
    import omp  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    omp.choose_wait_policy()

import argparse
import copy
import dataclasses
import json
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm


import sample
import text_encoder as te
import train
import unet3d
import vae as vae_lib
import weights
from models import Models, load_models, RELEASED_SCHEDULE, save_models
from toy import world

VAE_CONFIG = vae_lib.VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1)  # x4 down: 32x32 -> 8x8


def log(msg, path=None):
    print(msg, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(msg) + "\n" if not isinstance(msg, str) else msg + "\n")


def clip_pool(n: int, seed: int, frames: int, size: int, trail: bool = False):
    """n base-motion clips (balanced over motions, never the held-out appearance pairs): uint8 (n, 3, F, H, W)."""
    clips = world.make_dataset(n, world.BASE_MOTIONS, seed=seed, exclude_combos=world.HELD_OUT_COMBOS,
                               frames=frames, height=size, trail=trail)
    return torch.stack([c.video for c in clips]), [c.caption for c in clips]


def train_vae(videos, steps, seed, logfile):
    """Stage 1: the VAE as a frame autoencoder. Small KL weight: we want a sharp, smooth-enough latent, not a prior."""
    torch.manual_seed(seed)
    model = vae_lib.AutoencoderKL(dataclasses.replace(VAE_CONFIG))  # a copy: scaling_factor is set below
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    frames = videos.transpose(1, 2).flatten(0, 1)  # (n*F, 3, H, W) uint8
    g = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc="VAE"):
        x = frames[torch.randint(len(frames), (32,), generator=g)].float() / 127.5 - 1  # (32, 3, H, W) in [-1, 1]
        mean, logvar = model.encode_frames(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        rec = model.decode_frames(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log({"stage": "vae", "step": step, "mse": F.mse_loss(rec, x).item(), "kl": kl.item()}, logfile)
    with torch.no_grad():  # scale so latents have unit std, like LDM's 0.18215 for SD's VAE
        mean, _ = model.encode_frames(frames[:2048].float() / 127.5 - 1)
        model.cfg.scaling_factor = float(1.0 / mean.std())
    return model.eval().requires_grad_(False)


@torch.no_grad()
def ema_update(ema, model, step: int):
    """One step of the weights' exponential moving average, decay min(0.999, (1 + step) / (10 + step)) (a short
    memory at the start, so early weights do not linger)."""
    decay = min(0.999, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


@torch.no_grad()
def encode_pool(vae, videos):
    """Every clip's VAE posterior once, scaled: (mean, std), each (n, 4, F, h, w)."""
    means, stds = [], []
    for chunk in videos.split(256):
        x = chunk.float() / 127.5 - 1  # (b, 3, F, H, W)
        b, c, f, h, w = x.shape
        m, lv = vae.encode_frames(x.transpose(1, 2).flatten(0, 1))  # (b*F, 4, h', w')
        s = vae.cfg.scaling_factor
        means.append((m * s).unflatten(0, (b, f)).transpose(1, 2))  # (b, 4, F, h', w')
        stds.append((torch.exp(0.5 * lv) * s).unflatten(0, (b, f)).transpose(1, 2))
    return torch.cat(means), torch.cat(stds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="toy/model", help="model directory to write (must not exist)")
    p.add_argument("--work", default="toy/runs/base", help="checkpoints and log")
    p.add_argument("--minutes", type=float, default=80.0, help="wall-clock budget for stage 2 in this run")
    p.add_argument("--steps", type=int, default=0, help="stop at this UNet step (0: only the time budget); with "
                   "a step count the result no longer depends on the machine's speed")
    p.add_argument("--clips", type=int, default=12000, help="size of the base-motion training pool")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --work/state.pt (same machine)")
    p.add_argument("--init", default="", help="start from a model directory (e.g. the committed toy/model) with a "
                   "fresh optimizer: how training continues from a committed model, since state.pt is not committed")
    p.add_argument("--text", choices=("frozen", "joint"), default="frozen",
                   help="frozen: a random text encoder drawn from --seed, never trained (replaces --init's); "
                   "joint: trained with the UNet")
    p.add_argument("--timesteps", choices=("uniform", "coarse", "high"), default="uniform",
                   help="t distribution of the DDPM loss; coarse = train.py's 1 - 0.5 cos(pi t / T); high = half "
                   "coarse, half uniform on t >= 800, where the prompt has to decide the motion (see below)")
    p.add_argument("--loss-weight", choices=("eps", "x0"), default="eps",
                   help="eps: the plain eps-prediction MSE; x0: each sample's MSE times clamp(1/SNR(t), 1, "
                   "--max-weight), i.e. the x0 error at high t, where the eps loss barely sees the clip (see below)")
    p.add_argument("--max-weight", type=float, default=20.0, help="the clamp of --loss-weight x0")
    p.add_argument("--signal-free", type=float, default=0.0, help="fraction of each batch trained as the sampler's "
                   "first steps see it: t >= 900 and an input of pure noise, with no trace of the clip (see below)")
    p.add_argument("--trail", action="store_true", help="train on clips whose moving shapes leave a fading trail "
                   "(world.TRAIL; an experiment that did not help, see there)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--export-only", action="store_true", help="only write --out from the checkpoint in --work")
    args = p.parse_args()
    if args.export_only:
        print(f"wrote {export(Path(args.work) / 'state.pt', Path(args.out))}")
        return
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logfile = work / "log.jsonl"
    state_path = work / "state.pt"
    t0 = time.time()

    videos, captions = clip_pool(args.clips, args.seed, frames=8, size=32, trail=args.trail)
    log(f"pool: {len(videos)} clips in {time.time() - t0:.0f} s", logfile)
    init = None
    if args.init:  # continue from a committed model directory: its (EMA) weights, a fresh optimizer
        init = load_models(args.init)
        state = None
        vae = init.vae.eval().requires_grad_(False)
        log(f"initialised from {args.init}", logfile)
    elif args.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        vae_cfg = vae_lib.VAEConfig(**{**vars(VAE_CONFIG), "scaling_factor": state["vae_scale"]})
        vae = vae_lib.AutoencoderKL(vae_cfg)
        vae.load_state_dict(state["vae"])
        vae.eval().requires_grad_(False)
    else:
        if state_path.exists():
            raise SystemExit(f"error: {state_path} exists; pass --resume or choose another --work")
        vae = train_vae(videos, args.vae_steps, args.seed, logfile)
        state = None

    # stage 2 inputs: every clip encoded once (posterior mean/std, scaled), every caption tokenized
    tokenizer = te.Tokenizer()
    means, stds = encode_pool(vae, videos)
    tokens = tokenizer(captions)  # (n, 77)
    empty = tokenizer([""])[0]
    log(f"encoded pool: latents {tuple(means.shape)}, scale {vae.cfg.scaling_factor:.4f}", logfile)

    torch.manual_seed(args.seed + 1)
    unet = unet3d.UNet3D(unet3d.UNET_PRESETS["toy"])
    if args.text == "frozen":  # the frozen tower's own draw, the same whether or not the UNet is initialised
        torch.manual_seed(args.seed + 2)
    text = te.TextEncoder(te.TEXT_PRESETS["tiny"])
    with torch.no_grad():  # CLIP-like init: small token and position embeddings
        text.token_embedding.weight.normal_(0, 0.02)
        text.positional_embedding.normal_(0, 0.01)
    text.requires_grad_(args.text == "joint")
    params = list(unet.parameters()) + (list(text.parameters()) if args.text == "joint" else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    if init is not None:
        unet.load_state_dict(init.unet.state_dict())
        if args.text == "joint":
            text.load_state_dict(init.text_encoder.state_dict())
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    step = 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"resumed at step {step}", logfile)
    abar = sample.alphas_cumprod(RELEASED_SCHEDULE).float()
    # Why "high": ModelScope's schedule leaves sqrt(abar) = 0.068 of the clean latent in x_999, and a blob's path over
    # 8 frames is a strong, low-frequency signal, so even at high t the UNet can mostly read the trajectory off its
    # input instead of the prompt. At sampling the input is pure noise and the path follows the noise's whim. The
    # prompt only pays in the first steps (t >= ~800), so those get half of every batch.
    t_probs = {"uniform": torch.ones(1000, dtype=torch.float64),
               "coarse": train.timestep_probs("coarse", 0.5, 1000),
               "high": 0.5 * train.timestep_probs("coarse", 0.5, 1000)
               + 0.5 * torch.cat([torch.zeros(800), torch.ones(200)]).double() / 200}[args.timesteps].float()

    def save_state():
        state = {"vae": vae.state_dict(), "vae_scale": vae.cfg.scaling_factor, "unet": unet.state_dict(),
                 "text": text.state_dict(), "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                 "opt": opt.state_dict(), "step": step}
        weights.atomic_write(state_path, lambda tmp: torch.save(state, tmp), overwrite=True)

    unet.train()
    text.train(args.text == "joint")
    deadline = time.time() + 60 * args.minutes
    bar = tqdm(desc="base model", initial=step)
    running = None
    while time.time() < deadline and (args.steps == 0 or step < args.steps):
        g = torch.Generator().manual_seed(hash((args.seed, step)) & 0x7FFFFFFF)  # data of step k: a function of k
        idx = torch.randint(len(means), (args.batch,), generator=g)
        x0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)
        tok = tokens[idx].clone()
        drop = torch.rand(args.batch, generator=g) < 0.1  # 10% unconditional, for classifier-free guidance
        tok[drop] = empty
        if args.timesteps == "uniform":  # (randint, as run 1 of the committed model drew it)
            t = torch.randint(0, 1000, (args.batch,), generator=g)
        else:
            t = torch.multinomial(t_probs, args.batch, replacement=True, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        k = round(args.signal_free * args.batch)
        if k:
            # The released schedule keeps sqrt(abar_999) = 6.8% of the clip in x_999, enough for a model to read a
            # shape's path (even its direction) off its input instead of the prompt; DDIM's first step starts from
            # pure noise, where that reading is a guess. So for k clips: t >= 900, input = pure noise n, target = the
            # eps that n implies for this clip, (n - sqrt(abar) x0) / sqrt(1 - abar). Its optimum is the prompt's
            # mean clip as the x0 estimate, which is what the sampler's first steps need (Lin et al. 2024, sec. 3.1).
            t[:k] = 900 + torch.randint(0, 100, (k,), generator=g)
            a = abar[t].view(-1, 1, 1, 1, 1)
            xt[:k] = torch.randn(xt[:k].shape, generator=g)
            eps[:k] = (xt[:k] - a[:k].sqrt() * x0[:k]) / (1 - a[:k]).sqrt()
        err = (unet(xt, t, text(tok)) - eps).pow(2).mean(dim=(1, 2, 3, 4))  # (B,) per-clip eps MSE
        if args.loss_weight == "x0":  # |x0 error|^2 = (1 - abar) / abar * |eps error|^2 (the DDPM forward process)
            err = err * ((1 - abar[t]) / abar[t]).clamp(1.0, args.max_weight)
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for e, m in ((ema_unet, unet), (ema_text, text)):
            ema_update(e, m, step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 100 == 0:
            log({"stage": "unet", "step": step, "loss": running, "minutes": (time.time() - t0) / 60}, logfile)
        if step % 500 == 0:
            save_state()
    bar.close()
    save_state()
    log(f"stage 2 stopped at step {step} after {(time.time() - t0) / 60:.1f} min", logfile)

    log(f"wrote {export(state_path, Path(args.out))}", logfile)


def export(state_path: Path, out: Path) -> Path:
    """The model directory from a checkpoint: EMA weights, fp16 files (the loaders cast back to float32)."""
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    vae = vae_lib.AutoencoderKL(dataclasses.replace(VAE_CONFIG, scaling_factor=state["vae_scale"]))
    vae.load_state_dict(state["vae"])
    unet, text = unet3d.UNet3D(unet3d.UNET_PRESETS["toy"]), te.TextEncoder(te.TEXT_PRESETS["tiny"])
    unet.load_state_dict(state["ema_unet"])
    text.load_state_dict(state["ema_text"])
    models = Models(unet.half(), vae.half(), text.half(), te.Tokenizer(), dict(RELEASED_SCHEDULE),
                            "memory", Path("."))
    if out.exists():
        out = out.with_name(out.name + f"-step{state['step']}")
    return save_models(models, out, "diffusers")


if __name__ == "__main__":
    main()
