"""Pretrain the toy DiT: Wan 2.1's diffusion transformer (wan_dit.py) in a tiny config, on the toy world's BASE motions.

    python toy/train_dit.py --work toy/runs/dit --minutes 60             # a budget of wall-clock minutes
    python toy/train_dit.py --work toy/runs/dit --minutes 60 --resume    # continue (same data, same RNG stream)
    python toy/train_dit.py --work toy/runs/dit --export-only          # -> toy/model/dit/

The DiT family's toy stand-in, beside the toy UNet (toy/train_base.py): the same clips and captions, and the committed
toy model's frozen VAE and text encoder (toy/model: 32x32 frames -> 8x8x4 latents, 77 CLIP-like tokens of width 64),
so the only thing that differs between the two families in the toy world is the denoiser and its objective. The
denoiser is Wan's block (adaLN-modulated 3-D self-attention with RoPE, text cross-attention, FFN) with Wan's
objective: rectified flow, x_s = (1 - s) x0 + s n, target v = n - x0 (flow.py), with s drawn uniformly on the
1000-step grid and bent by the same time shift the sampler uses (TOY_SHIFT). 10% empty captions train the
unconditional velocity for classifier-free guidance; an EMA of the weights is what gets exported.

Every step's data is a function of (--seed, step), so --resume continues exactly; checkpoints every 250 steps and at
the end; `log.jsonl` gets the running loss, and every --eval-every steps the base-motion accuracy of a fixed set of
prompts on held-out colour/shape pairs (the toy scorer), sampled with the EMA weights.
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
from tqdm import tqdm

import flow
import sample
import wan_dit
import weights
from models import load_models, save_dit
from toy import world
from toy.scorer import ToyScorer
from toy.train_base import clip_pool, ema_update, encode_pool, log

# The toy DiT: 8 latent frames x 8x8 -> 8 x 4 x 4 = 128 tokens of width 128; 6 blocks, 4 heads of 32 (RoPE pairs
# 6 / 5 / 5 over frames / rows / columns); the toy text encoder's 77 x 64 features as its context.
TOY_DIT = wan_dit.WanDiTConfig(patch_size=(1, 2, 2), text_len=77, in_dim=4, dim=128, ffn_dim=384, freq_dim=64,
                               text_dim=64, out_dim=4, num_heads=4, num_layers=6)
TOY_SHIFT = 3.0  # the time shift of training and sampling (Wan samples 480p with 5.0; the toy latents are tiny)
TOY_MODEL = ROOT / "toy" / "model"  # the frozen VAE and text encoder


def train_sigmas(g, n: int, shift: float = TOY_SHIFT, probs=None) -> torch.Tensor:
    """n noise levels: a grid index k in 0..999 (uniform, or from `probs` (1000,)), s = shift((k + 1) / 1000)."""
    k = torch.randint(0, 1000, (n,), generator=g) if probs is None else \
        torch.multinomial(probs, n, replacement=True, generator=g)
    return flow.shift_sigma((k.double() + 1) / 1000, shift).float()


@torch.no_grad()
def eval_base(dit, base, prompts, seeds, steps: int = 20, guidance: float = 5.0) -> float:
    """Base-motion accuracy of (prompt, seed) pairs: sampled as sample.generate samples the toy DiT (UniPC on the
    shifted schedule, the toy VAE), scored by the toy scorer."""
    dit.eval()
    models = dataclasses.replace(base, unet=None, dit=dit, flow_shift=TOY_SHIFT)
    videos = sample.generate(models, prompts, seeds, frames=8, height=32, width=32, steps=steps, guidance=guidance,
                             solver="unipc", batch_size=len(prompts), progress=False)
    scorer = ToyScorer()
    want = [" ".join(p.split()[3:]) for p in prompts]  # "a red triangle moving left" -> "moving left"
    dit.train()
    return sum(scorer.analyse(v)["motion"] == w for v, w in zip(videos, want)) / len(prompts)


def eval_prompts(n_per_motion: int = 4) -> tuple:
    """Base-motion prompts on held-out colour/shape pairs, with fixed seeds."""
    looks = sorted(world.HELD_OUT_COMBOS)
    prompts = [world.caption_for(c, s, m) for m in world.BASE_MOTIONS for (c, s) in looks[:n_per_motion]]
    return prompts, list(range(len(prompts)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="toy/runs/dit", help="checkpoints and log")
    p.add_argument("--out", default="toy/model", help="--export-only writes the EMA DiT into <out>/dit/")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this invocation")
    p.add_argument("--steps", type=int, default=0, help="stop at this step (0: only the time budget)")
    p.add_argument("--clips", type=int, default=12000, help="size of the base-motion training pool")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=200, help="linear lr warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1000, help="base-motion accuracy every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from --work/state.pt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--export-only", action="store_true", help="only write --out from the checkpoint in --work")
    args = p.parse_args()
    work = Path(args.work)
    state_path = work / "state.pt"
    if args.export_only:
        print(f"wrote {export(state_path, Path(args.out))}")
        return
    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    logfile = work / "log.jsonl"
    if state_path.exists() and not args.resume:
        raise SystemExit(f"error: {state_path} exists; pass --resume or choose another --work")
    t0 = time.time()

    # --- data: the base-motion pool through the committed toy model's frozen VAE; captions through its text encoder
    base = load_models(TOY_MODEL)
    base.vae.eval().requires_grad_(False)
    base.text_encoder.eval().requires_grad_(False)
    videos, captions = clip_pool(args.clips, args.seed, frames=8, size=32)
    means, stds = encode_pool(base.vae, videos)  # (n, 4, 8, 8, 8) each
    with torch.no_grad():
        unique = sorted(set(captions) | {""})
        feats = base.text_encoder(base.tokenizer(unique))  # (U, 77, 64)
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in captions])
    empty = index[""]
    log(f"pool: {len(videos)} clips, {len(unique)} captions, latents {tuple(means.shape)} in {time.time() - t0:.0f} s",
        logfile)

    # --- the model, its EMA and the optimizer (resumed when asked)
    torch.manual_seed(args.seed + 1)
    dit = wan_dit.WanDiT(TOY_DIT)
    ema = copy.deepcopy(dit).requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, weight_decay=0.01)
    step = 0
    if args.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        dit.load_state_dict(state["dit"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"resumed at step {step}", logfile)
    log(f"toy DiT: {sum(p.numel() for p in dit.parameters()):,} params", logfile)
    prompts, seeds = eval_prompts()

    def save_state():
        state = {"dit": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                 "config": json.dumps(vars(TOY_DIT))}
        weights.atomic_write(state_path, lambda tmp: torch.save(state, tmp), overwrite=True)

    # --- the loop: rectified flow, uniform s on the shifted grid, 10% unconditional
    deadline = time.time() + 60 * args.minutes
    bar = tqdm(desc="toy DiT", initial=step)
    running = None
    dit.train()
    while time.time() < deadline and (args.steps == 0 or step < args.steps):
        g = torch.Generator().manual_seed(hash((args.seed, step)) & 0x7FFFFFFF)  # data of step k: a function of k
        idx = torch.randint(len(means), (args.batch,), generator=g)
        x0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)  # a posterior sample per clip
        caps = cap_idx[idx].clone()
        caps[torch.rand(args.batch, generator=g) < 0.1] = empty
        s = train_sigmas(g, args.batch)
        noise = torch.randn(x0.shape, generator=g)
        v = dit(flow.add_noise(x0, noise, s), s * 1000, feats[caps])
        loss = (v - (noise - x0)).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        step += 1
        ema_update(ema, dit, step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 100 == 0:
            log({"step": step, "loss": running, "minutes": (time.time() - t0) / 60}, logfile)
        if step % 250 == 0:
            save_state()
        if args.eval_every and step % args.eval_every == 0:
            acc = eval_base(ema, base, prompts, seeds)
            log({"step": step, "base_motion_accuracy": acc, "n": len(prompts)}, logfile)
    bar.close()
    save_state()
    log(f"stopped at step {step} after {(time.time() - t0) / 60:.1f} min", logfile)


def export(state_path: Path, out: Path) -> Path:
    """The EMA DiT into `out`/dit/ (models.save_dit: fp16, config with the flow shift), beside the toy model's VAE and
    text encoder: `load_models("toy/model", denoiser="dit")` loads them together. Refuses to overwrite."""
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    dit = wan_dit.WanDiT(wan_dit.WanDiTConfig(**json.loads(state["config"])))
    dit.load_state_dict(state["ema"])
    return save_dit(dit, out / "dit", TOY_SHIFT)


if __name__ == "__main__":
    main()
