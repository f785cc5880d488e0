"""NewMove: customize a text-to-video model to a novel motion from a few example videos (Materzynska et al.).

    python train.py --videos clips/ --token pll      (no --model: the CPU toy model with the toy world's settings)
    python train.py --model text-to-video-ms-1.7b --videos pll_clips/ --token pll --reg-videos jester_reg/
    torchrun --nproc_per_node 8 train.py --model zeroscope_v2_576w --videos pll_clips/ --token pll \\
        --reg-videos reg/ --reg-caption "a person doing other things" --precision bf16
    torchrun --nnodes 2 --node_rank 0 --master_addr host0 --nproc_per_node 8 train.py ...   (multi-node: the same)
    python train.py ... --resume                     (continue the run in --out from its last checkpoint)
    python train.py ... --preset temporal            (an ablation row; see PRESETS)

Defaults are the official run's (adobe-research/custom_motion; the README's fidelity table lists every setting): no
dropout, a 16-frame window drawn at a new start in every clip at every step, 24 fps, aspect buckets of about 384^2
pixels without crop, DPM-Solver++ validation videos.

The run, top to bottom: config -> distributed setup -> frozen models -> which weights train -> data, encoded ONCE to
cached VAE posteriors of every frame and text embeddings (then the VAE and text encoder are freed) -> optimizer -> the
loop, where each clip contributes a window of its cached frames:

    t_i ~ p(t) proportional to 1 - alpha*cos(pi t / T)        coarse-noise sampling, one t per clip (method.md §1)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps             one eps per clip
    L   = MSE(eps_hat(instance), eps) + lambda * MSE(eps_hat(reg), eps)    instance + reg clips in ONE UNet batch
                                                                           (one per aspect bucket if they differ)

Output in --out: `delta.safetensors` (only the trained tensors + metadata; `python sample.py --delta` loads it),
`state.pt` (resume checkpoint), `config.json`, `log.jsonl`, validation videos in `val/`.
Video tensors are (B, C, F, H, W).
"""

import omp  # noqa: F401  (first, before torch loads OpenMP: the wait policy for this machine, omp.py)

import os
import argparse
import contextlib
import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import latents
import runs
import sample
import text_encoder as te
import unet3d
from models import load_models
from weights import WeightsError, save_state_dict, writable_dir, write_json


def opt(default, help: str, choices=(), low=None, high=None, above=None):
    """A Config field: its --help text, and the values it allows (checked by the parser and by check_config)."""
    return field(default=default, metadata=dict(help=help, choices=tuple(choices), low=low, high=high, above=above))


def bad_value(f: dataclasses.Field, v) -> str:
    """Why value v is not allowed for option f ('' if it is)."""
    m = f.metadata
    if m["choices"]:
        return "" if v in m["choices"] else f"must be one of {', '.join(m['choices'])}, got {v!r}"
    if isinstance(v, float) and not math.isfinite(v):
        return f"must be a finite number, got {v}"
    lo, hi = m["low"], m["high"]
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        return f"must be in [{lo}, {hi}], got {v}" if hi is not None else f"must be >= {lo}, got {v}"
    if m["above"] is not None and not v > m["above"]:
        return f"must be > {m['above']}, got {v}"
    return ""


# Which UNet parameters each preset trains (group names: see param_group). Rows of the paper's Table 2 and baselines.
PRESETS = {
    "newmove": dict(groups=("temporal", "spatial_kv")),  # the method: 570,882,176 params on the 1.7B UNet
    "temporal": dict(groups=("temporal",)),  # Table 2(a) "spatial: None"
    "spatial-none": dict(groups=("temporal",)),  # alias of temporal, named after the ablation row
    "spatial-all": dict(groups=("temporal", "spatial_kv", "spatial_attn")),  # Table 2(a) "spatial: All"
    "temporal-none": dict(groups=("spatial_kv",)),  # Table 2(b) "temporal: None"
    "all": dict(groups=("temporal", "spatial_kv", "spatial_attn", "spatial_rest")),  # every UNet weight
    # baselines (paper §4.3): their defining choices override --train-token and --prior
    "textual-inversion": dict(groups=(), train_token=True, prior="none"),
    "dreambooth": dict(groups=("spatial_kv", "spatial_attn", "spatial_rest"), prior="synthetic"),
    "custom-diffusion": dict(groups=("spatial_kv",), train_token=True, prior="real"),
}


@dataclass
class Config:
    # model and data
    model: str = opt("", "base model directory, original or diffusers layout (ModelScope 1.7B, zeroscope_v2_576w); "
                     "'' = the CPU toy model in toy/model, with the toy world's settings (see TOY_SETTINGS)")
    videos: str = opt("", "folder of example videos of the new motion (official: 10 Jester clips of one class)")
    token: str = opt("pll", "rare word that names the motion in captions (paper: 'pll'; official config: 'sks')")
    caption: str = opt("a person doing a {token} sign", "caption for clips without a sidecar .txt/metadata.jsonl "
                       "(the paper's Jester captions)")
    jester_csv: str = opt("", "Jester layout: --videos is the frames root and this `<id>;<class>` CSV picks the clips")
    jester_class: str = opt("", "Jester class name to train on, e.g. 'Drumming Fingers' (matched by name)")
    limit: int = opt(0, "use at most this many instance clips, chosen with --seed (paper: 10); 0 = all", low=0)
    reg_videos: str = opt("", "folder of real videos of related motions for regularization ('' = none)")
    reg_caption: str = opt("", "caption for reg clips without their own (paper: 'a person doing other things')")
    prior: str = opt("real", "regularization set: real (--reg-videos) | synthetic (generated by the base model) | none",
                     choices=("real", "synthetic", "none"))
    prior_count: int = opt(8, "synthetic prior: number of videos generated from --reg-caption before training", low=1)
    frames: int = opt(16, "frames per training window (official 16)", low=1)
    size: int = opt(384, "frames are resized to an aspect bucket of about size x size pixels, both sides multiples of "
                    "64, without cropping (official 384; a 176x100 Jester clip -> 448x320)", low=1)
    resize: str = opt("bucket", "bucket (keep the aspect ratio, no crop; official) | crop (short side to --size, then "
                      "a centre-cropped square)", choices=("bucket", "crop"))
    fps: float = opt(24.0, "target fps: stride = max(1, round(native fps / fps)) per clip (official 24; Jester's 12 fps "
                     "gives consecutive frames); 0 = use --stride", low=0)
    stride: int = opt(1, "frame step inside a clip when --fps 0", low=1)
    window: str = opt("random", "random: every step trains on --frames consecutive (strided) frames starting anywhere "
                      "in the clip, drawn per clip and step (official) | first: always the first --frames",
                      choices=("random", "first"))
    max_frames: int = opt(240, "--window random caches every strided frame of a clip from --start on, at most this many "
                          "(240 = 10 s at 24 fps; Jester clips have ~36); windows are drawn inside them", low=1)
    start: int = opt(0, "index of the first frame of each clip (official sample_start_idx 1 is never read upstream)",
                     low=0)
    short: str = opt("repeat", "clips shorter than needed: repeat the last frame (official) | loop | skip",
                     choices=("repeat", "loop", "skip"))
    recursive: bool = opt(False, "also read videos in subfolders")
    strict: bool = opt(False, "fail on the first unreadable video instead of skipping it with a warning")
    # the method
    preset: str = opt("newmove", "which weights train; see PRESETS (newmove = temporal layers + spatial cross-attn K/V)",
                      choices=PRESETS)
    train_token: bool = opt(False, "also learn an embedding for --token (ablation; not NewMove)")
    lora_rank: int = opt(0, "0 = full fine-tuning of the preset (NewMove); R > 0 = LoRA of rank R on its Linear layers",
                         low=0)
    lora_scale: float = opt(1.0, "LoRA output scale (paper ablation: rank 32, scale 1)")
    timesteps: str = opt("coarse", "timestep distribution: coarse (NewMove) | uniform | fine (the mirror of coarse)",
                         choices=("coarse", "uniform", "fine"))
    alpha: float = opt(0.5, "skew of the coarse/fine distribution, f(t) = 1 -/+ alpha*cos(pi t/T) (official 0.5)",
                       low=0, high=1)
    reg_weight: float = opt(0.5, "lambda in L = L_instance + lambda * L_reg (official 0.5)", low=0)
    reg_ratio: int = opt(1, "regularization clips per instance clip in each step (official 1)", low=1)
    dropout: float = opt(0.0, "dropout in the UNet's ResBlocks and temporal convs while customizing (official run: "
                         "none; 0.1 is the base model's own pretraining value)", low=0, high=0.99)
    # optimization
    steps: int = opt(3000, "optimizer steps (official 3000)", low=1)
    batch_size: int = opt(1, "instance clips per process per step (official 1); reg clips = batch_size * reg_ratio",
                          low=1)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", low=1)
    lr: float = opt(5e-6, "AdamW learning rate, constant (official 5e-6)", above=0)
    weight_decay: float = opt(0.01, "AdamW weight decay (official 0.01)", low=0)
    grad_clip: float = opt(1.0, "max gradient norm (official 1.0)", above=0)
    precision: str = opt("auto", "autocast dtype: bf16 | fp16 | fp32 | auto = bf16 on CUDA, fp32 on CPU (CPUs without "
                         "native bf16 emulate it ~100x slower); trainable weights are always fp32",
                         choices=("auto", "bf16", "fp16", "fp32"))
    frozen_dtype: str = opt("fp32", "dtype of the frozen UNet weights: fp32 | bf16 | fp16 (must match --precision)",
                            choices=("fp32", "bf16", "fp16"))
    checkpointing: str = opt("none", "activations recomputed in backward: none (step peak already 0.77x diffusers') | "
                             "selective = all element-wise work between matmuls/convs/attention (a further -8%, "
                             "+0-40% time in CPU benchmarks) | full = every layer (~7x less activation memory, "
                             "~1.2-1.3x the step time)", choices=("none", "selective", "full"))
    seed: int = opt(64, "base seed; process r uses seed + r (official 64)")
    device: str = opt("", "'' = cuda if available else cpu")
    # outputs
    out: str = opt("runs/newmove", "output folder; an existing run there is continued only with --resume")
    resume: bool = opt(False, "continue from --out/state.pt")
    ckpt_every: int = opt(500, "steps between resume checkpoints (0 = only at the end)", low=0)
    log_every: int = opt(10, "steps between log lines (loss is synchronised to the host only then)", low=1)
    val_every: int = opt(0, "steps between validation videos (0 = never)", low=0)
    val_prompts: str = opt("a person doing a {token} sign", "validation prompts separated by '|'")
    val_seeds: str = opt("0", "validation seeds, comma-separated")
    val_solver: str = opt("dpmpp-2m", "sampler of validation videos (and of --prior synthetic): dpmpp-2m (official "
                          "validation: DPM-Solver++) | ddim", choices=("dpmpp-2m", "ddim"))
    val_steps: int = opt(25, "sampling steps for validation videos (official 25)", low=1)
    val_guidance: float = opt(9.0, "classifier-free guidance of validation videos (official 9)")
    stop_clip: str = opt("", "open_clip model for the paper's stopping rule, e.g. ViT-B-32-quickgelu ('' = off)")
    stop_clip_weights: str = opt("", "local weights file for --stop-clip")
    stop_score: float = opt(0.265, "stop when the validation appearance CLIP score falls to this (paper: 0.265)",
                            low=-1, high=1)
    cache: str = opt("", "folder for cached latents/text embeddings ('' = <out>/cache)")
    export_diffusers: bool = opt(False, "also write the full customized UNet in the diffusers layout to <out>/unet/")


TOY_MODEL = Path(__file__).resolve().parent / "toy" / "model"  # the committed toy base model (toy/train_base.py)
# With no --model, the toy world's settings replace the 1.7B ones (toy/demo.py uses the same): 8-frame 32x32 clips,
# a toy-scale lr and step count, and 24 base-motion regularization clips from toy/world.py unless --reg-videos is given.
TOY_SETTINGS = dict(frames=8, size=32, lr=2e-4, steps=600, batch_size=4, log_every=25)
TOY_REG_CLIPS = 24



def param_group(name: str) -> str:
    """Family of a UNet parameter (our = diffusers names). `attn2` of a TEMPORAL transformer is a second
    self-attention, so spatial K/V must be matched under `.attentions.` only (method.md §3)."""
    # the temporal layers model motion across frames: the 3x1x1 convs after each ResBlock, the temporal transformers,
    # and the first one right after conv_in (paper §3, "Choice of customization parameters")
    if ".temp_convs." in name or ".temp_attentions." in name or name.startswith("transformer_in."):
        return "temporal"
    # spatial cross-attention K/V map the text to per-frame appearance: the paper trains them too, so the new token
    # can change what the frames show while they move (Custom Diffusion's image-customization choice)
    if ".attentions." in name:
        return "spatial_kv" if (".attn2.to_k." in name or ".attn2.to_v." in name) else "spatial_attn"
    return "spatial_rest"


def select_trainable(unet, preset: str) -> list:
    """[(name, parameter)] that `preset` trains, group by group in PRESETS order. Works on diffusers'
    UNet3DConditionModel too (same names): the one copy of the selection, used by train.py, benchmarks and tests."""
    params = list(unet.named_parameters())
    return [(n, p) for g in PRESETS[preset]["groups"] for n, p in params if param_group(n) == g]


# -----------------------------------------------------------------------------------------------------------------------
# small pure pieces of the method


def timestep_probs(mode: str, alpha: float, T: int = 1000) -> torch.Tensor:
    """p(t), t = 0..T-1 (T-1 = noisiest). coarse: 1 - alpha cos(pi t/T) (ReVersion / NewMove 'high-level');
    fine: 1 + alpha cos(pi t/T) ('low-level'); uniform. Normalised, float64."""
    # Early denoising steps (high t) decide a video's layout and motion, late ones its fine appearance (paper §3,
    # "Disentangling motion from appearance"), so NewMove draws t from a density rising towards t = T: at alpha 0.5,
    # p(999) = 3 p(0), mean t 600.9 instead of 499.5 (method.md §1.2). float64: the 1000 terms sum to 1 exactly.
    t = torch.arange(T, dtype=torch.float64)
    w = {"coarse": 1 - alpha * torch.cos(math.pi * t / T), "fine": 1 + alpha * torch.cos(math.pi * t / T),
         "uniform": torch.ones(T, dtype=torch.float64)}[mode]
    return w / w.sum()


def diffuse(x0, eps, t, abar):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per sample (DDPM forward process). x0, eps: (B, C, F, H, W)."""
    a = abar[t].to(x0.dtype).view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def loss_weights(n_instance: int, n_reg: int, reg_weight: float, device=None) -> torch.Tensor:
    """w (B,) with sum_i w_i MSE_i = mean(instance MSEs) + lambda * mean(reg MSEs): the paper's
    L = L_instance + lambda L_reg (method.md §4) as one weight per clip, so clips of different shapes can run in
    separate UNet calls and still add up to exactly this loss."""
    # the regularization videos show related motions with their own captions; their loss keeps the model's prior
    # (paper §3, "Video regularization": real videos beat generated ones and no prior, Table 2(e))
    w = [1 / n_instance] * n_instance + ([reg_weight / n_reg] * n_reg if n_reg else [])
    return torch.tensor(w, device=device)


def newmove_loss(model, x0, ctx, w, probs, abar, g, amp=None):
    """One UNet call on a batch of same-shape clips: t_i ~ p(t) and eps_i ~ N(0, I) per clip, then
    sum_i w_i ||eps_hat(x_t_i, t_i, c_i) - eps_i||^2 / numel. Returns (loss, per-clip MSE (B,), t (B,))."""
    # the paper's denoising objective (eq. 1, the LDM eps-prediction loss) with t drawn from p(t) rather than
    # uniformly; every clip draws its own t and noise, also in batches > 1 (the official code's batch > 1 bug,
    # method.md §6.3)
    t = torch.multinomial(probs, x0.shape[0], replacement=True, generator=g)  # (B,), one timestep per clip
    eps = torch.randn(x0.shape, generator=g, device=x0.device)  # one noise draw per clip
    with torch.autocast(x0.device.type, dtype=amp, enabled=amp is not None):  # bf16 on GPUs; weights stay fp32
        eps_hat = model(diffuse(x0, eps, t, abar), t, ctx.to(x0.dtype))  # (B, 4, F, h, w)
    return (*weighted_mse(eps_hat, eps, w), t)


def weighted_mse(eps_hat, eps, w):
    """sum_i w_i MSE(eps_hat_i, eps_i) in float32, and the per-clip MSE (B,) for logging."""
    # float32 whatever the autocast dtype: a bf16 square of small residuals would lose most of its bits
    per_clip = (eps_hat.float() - eps.float()).pow(2).mean(dim=(1, 2, 3, 4))  # (B,)
    return (w * per_clip).sum(), per_clip


# -----------------------------------------------------------------------------------------------------------------------
# the run


def main(cfg: Config, score_fn=None, stop_score: float | None = None):
    """Train; returns the path of the delta file. `score_fn(videos uint8 (N,3,F,H,W), prompts) -> float` is called on
    every validation batch (evaluate.py's CLIP appearance score); training stops once it falls to `stop_score`."""
    # --- setup: processes (torchrun sets RANK/WORLD_SIZE; `python train.py` is a world of one), options, run folder ---
    run = runs.setup_distributed(cfg.device)
    check_config(cfg)
    preset = PRESETS[cfg.preset]
    train_token, prior = preset.get("train_token", cfg.train_token), preset.get("prior", cfg.prior)
    out = Path(cfg.out)
    state_path, delta_path = out / "state.pt", out / "delta.safetensors"
    state = prepare_out(cfg, out, prior, run)  # the checkpoint to resume from (None: a new run), checked first
    torch.manual_seed(cfg.seed + run.rank)  # dropout/LoRA RNG, per rank (its state is saved in the checkpoint)

    # --- the frozen base model: NewMove fine-tunes without dropout (method.md §6.8) ---
    models = load_models(cfg.model)
    unet, vae, text = (m.to(run.device) for m in (models.unet, models.vae, models.text_encoder))
    abar = sample.alphas_cumprod(models.schedule).to(run.device)  # (T,), the scaled-linear schedule's alpha-bar
    T = models.schedule["num_train_timesteps"]
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.precision]
    unet.requires_grad_(False)
    text.requires_grad_(False)
    for m in unet.modules():  # the official run has none; --dropout 0.1 is the base model's pretraining value
        if isinstance(m, unet3d.Dropout):
            m.p = cfg.dropout

    # --- choice 1, which weights train: temporal layers + spatial cross-attention K/V (PRESETS["newmove"]) ---
    chosen, trainable, token_id = make_trainable(cfg, unet, text, models.tokenizer, train_token)
    if run.master:
        print_param_table(unet, trainable, cfg)
    unet.set_gradient_checkpointing({"none": False, "selective": "selective", "full": True}[cfg.checkpointing])

    # --- data: every clip encoded once (latents.py); choice 2, the regularization set, is `reg` ---
    inst, reg, fingerprint = encode_data(cfg, models, unet, vae, text, token_id, prior, amp, out, run)
    if not cfg.val_every and not train_token:  # validation needs the decoder and the text encoder; else free them
        del models.vae, models.text_encoder, vae, text  # ~0.4 B frozen params gone before the loop
        if run.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- optimizer: AdamW, constant lr 5e-6, wd 0.01 (the official run's, method.md §2); resume ---
    params = [p for _, p in trainable]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                  fused=run.device.type == "cuda")
    scaler = torch.amp.GradScaler(run.device.type, enabled=amp == torch.float16)  # loss scaling for fp16 only
    model = DDP(unet, device_ids=[run.device.index] if run.device.type == "cuda" else None) \
        if run.ddp and any(p.requires_grad for p in unet.parameters()) else unet
    step = runs.resume(state, state_path, trainable, optimizer, scaler, run)
    if run.master:
        write_json(asdict(cfg), out / "config.json", overwrite=True)

    # --- the loop; choice 3, coarse-noise timesteps, is `probs` ---
    probs = timestep_probs(cfg.timesteps, cfg.alpha, T).to(run.device)
    n_inst, n_reg = cfg.batch_size, (cfg.batch_size * cfg.reg_ratio if reg is not None else 0)
    w = loss_weights(n_inst, n_reg, cfg.reg_weight, run.device)  # (B,): mean over instance + lambda * mean over reg
    stats = runs.Stats(out / "log.jsonl" if run.master else None, T, n_inst, cfg.reg_weight, run, step,
                       f"lr {cfg.lr}, precision {cfg.precision}; the last good checkpoint {state_path} is untouched")
    unet.train()  # as upstream; with the default --dropout 0 train and eval mode compute the same thing
    bar, interrupt = tqdm(total=cfg.steps, initial=step, disable=not run.master, desc="train"), runs.Interrupt()
    while step < cfg.steps:
        for micro in range(cfg.grad_accum):
            b = step * cfg.grad_accum + micro  # global micro-batch number
            # one generator per (step, micro, rank): timesteps, noise, windows and posterior samples are a pure
            # function of the position in the run, so a resumed run redraws exactly what an uninterrupted one would
            g = torch.Generator(run.device).manual_seed(latents.hash_seed(cfg.seed, run.rank, step, micro))
            clips = [("instance", inst, i) for i in latents.clip_indices(b, run.rank, run.world, n_inst,
                                                                          len(inst["mean"]), cfg.seed)]
            if n_reg:
                clips += [("reg", reg, i) for i in latents.clip_indices(b, run.rank, run.world, n_reg,
                                                                        len(reg["mean"]), cfg.seed + 1)]
            per_clip = torch.zeros(len(clips), device=run.device)  # each clip's MSE, for the log
            groups = latents.shape_groups(clips)  # usually one: all clips in ONE UNet call; else one per bucket
            for k, pos in enumerate(groups):
                x0, ctx = latents.batch_latents([clips[j] for j in pos], b, cfg.seed, cfg.frames,
                                                cfg.window == "random", g, run.device)  # (b, 4, F, h, w), (b, 77, D)
                if train_token:  # captions that use the token are re-encoded with grad through its embedding
                    tokens = torch.stack([clips[j][1]["tokens"][clips[j][2]] for j in pos])  # (b, 77)
                    ctx = te.reencode_placeholders(text, tokens, ctx)
                last = micro == cfg.grad_accum - 1 and k == len(groups) - 1  # DDP all-reduces in the last backward
                with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
                    loss, mse, t = newmove_loss(model, x0, ctx, w[pos], probs, abar, g, amp)
                    scaler.scale(loss / cfg.grad_accum).backward()
                per_clip[pos] = mse.detach()
                stats.by_timestep(t, mse.detach())
            stats.add(per_clip)
        if train_token and run.ddp:  # the token row is outside the DDP-wrapped UNet: average its gradient by hand
            dist.all_reduce(text.placeholder_embeddings.grad, op=dist.ReduceOp.AVG)
        grad_norm = optimizer_step(optimizer, scaler, params, cfg.grad_clip)
        step += 1
        bar.update(1)

        stopping = interrupt.agreed(run) and step < cfg.steps  # Ctrl-C: checkpoint this step, then exit
        ckpt_due = (cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps) or stopping
        if step % cfg.log_every == 0 or step == cfg.steps or ckpt_due:  # never checkpoint an unchecked loss
            stats.write(step, grad_norm, cfg.lr, bar)
        if ckpt_due:
            runs.save_checkpoint(state_path, trainable, optimizer, scaler, step, cfg, run)
        if stopping:
            interrupt.exit(step, state_path, cfg.resume, run.master)
        if cfg.val_every and step % cfg.val_every == 0 and validate(cfg, models, unet, step, amp, score_fn,
                                                                     stop_score, run):
            break
    bar.close()

    # --- outputs: the delta (only the trained tensors), a final checkpoint, optionally the whole diffusers UNet ---
    if not cfg.lora_rank:  # (with LoRA the adapters are merged away below; the last periodic checkpoint stays)
        runs.save_checkpoint(state_path, trainable, optimizer, scaler, step, cfg, run)
    delta, meta = delta_tensors(cfg, unet, chosen, trainable, models.tokenizer, text if train_token else None)
    meta.update(base_fingerprint=fingerprint, steps=step)
    if run.master:
        save_state_dict(delta, delta_path, metadata=meta, overwrite=cfg.resume)
        if cfg.export_diffusers:
            write_json(unet3d.config_to_diffusers(unet.cfg), out / "unet" / "config.json", overwrite=cfg.resume)
            unet3d.save_unet(unet.float(), out / "unet" / "diffusion_pytorch_model.safetensors", overwrite=cfg.resume)
        print(f"wrote {delta_path} ({sum(v.numel() for v in delta.values()):,} params)", flush=True)
        stats.log.close()
    if run.ddp:
        runs.check_replicas(trainable, run)
    return delta_path


# -----------------------------------------------------------------------------------------------------------------------
# helpers, in the order main() uses them


def prepare_out(cfg: Config, out: Path, prior: str, run: runs.Run):
    """Resolve --precision auto, check the run folder and any checkpoint (open_run) before anything heavy, make the
    toy regularization set if the toy model runs without one. Returns the checkpoint to resume from, or None."""
    if cfg.precision == "auto":  # resolved first: the checkpoint's config holds the resolved value
        cfg.precision = "bf16" if run.device.type == "cuda" else "fp32"
        if cfg.frozen_dtype not in ("fp32", cfg.precision):
            raise SystemExit(f"error: --frozen-dtype {cfg.frozen_dtype} needs --precision {cfg.frozen_dtype}")
    toy_reg = prior == "real" and not cfg.reg_videos  # only the toy model gets here (check_config)
    if toy_reg:
        cfg.reg_videos = str(out / "toy-reg")  # the toy world's base motions, made below
    state = runs.open_run(cfg, out)
    if run.master:
        writable_dir(out, "--out")
        if toy_reg:
            from toy import world

            world.write_regularization_set(out / "toy-reg", TOY_REG_CLIPS, cfg.seed)
    if run.ddp:
        dist.barrier()  # the other ranks read what rank 0 wrote
    return state


def make_trainable(cfg: Config, unet, text, tokenizer, train_token: bool) -> tuple:
    """(the preset's parameters, what actually trains: those or their LoRA adapters (+ the token row), the
    placeholder's token id or None). Everything else is frozen, optionally in bf16/fp16 (--frozen-dtype)."""
    chosen = select_trainable(unet, cfg.preset)
    # LoRA (ablation (f)) adapts the chosen Linear weights only; norms, convs and biases of the preset stay frozen
    trainable = unet3d.add_lora(unet, chosen, cfg.lora_rank, cfg.lora_scale) if cfg.lora_rank else list(chosen)
    for _, p in trainable:
        p.requires_grad_(True)
    frozen_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.frozen_dtype]
    if frozen_dtype != torch.float32:  # frozen weights at half size; trainable ones stay fp32 (master weights)
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen_dtype)
    token_id = None
    if train_token:  # ablation (c) and the Textual Inversion / Custom Diffusion baselines: a learned token row
        token_id = te.add_placeholder_token(tokenizer, text, cfg.token, init_from=cfg.token)
        text.placeholder_embeddings.requires_grad_(True)
        trainable.append(("text_encoder.placeholder_embeddings", text.placeholder_embeddings))
    if not trainable:
        raise SystemExit(f"error: preset {cfg.preset} with these options trains nothing")
    return chosen, trainable, token_id


def encode_data(cfg: Config, models, unet, vae, text, token_id, prior: str, amp, out: Path, run: runs.Run) -> tuple:
    """(instance set, regularization set or None, the model's fingerprint): every clip read and encoded once
    (latents.encode_set, cached in --cache) by rank 0 while the others wait, then read by the others."""
    encode = dict(vae=vae, text=text, tokenizer=models.tokenizer, device=run.device, token_id=token_id,
                  cache_dir=Path(cfg.cache) if cfg.cache else out / "cache",
                  fingerprint=latents.model_fingerprint(cfg.model), master=run.master)
    if run.ddp and not run.master:
        dist.barrier()  # rank 0 encodes and fills the cache first; the other ranks then only read it
    multiple = 2 ** (len(vae.cfg.block_out_channels) - 1) * unet.cfg.downsample_factor  # 8 x 8 = 64 pixels
    max_frames = cfg.max_frames if cfg.window == "random" else 0  # 0: only the first window of each clip is read
    spec = data.ClipSpec(frames=cfg.frames, size=cfg.size, stride=cfg.stride, fps=cfg.fps or None, start=cfg.start,
                         short=cfg.short, multiple=multiple, resize=cfg.resize, max_frames=max_frames)
    kw = dict(tokenizer=models.tokenizer, recursive=cfg.recursive, strict=cfg.strict)
    jester = dict(jester_csv=cfg.jester_csv or None, jester_class=cfg.jester_class or None, limit=cfg.limit or None,
                  seed=cfg.seed)
    try:  # a bad clip, caption or folder: data.DataError, naming it
        inst = latents.encode_set(latents.load_clips(cfg.videos, spec, cfg.caption, cfg.token, instance=True, **kw,
                                                     **jester), **encode)
        reg = None
        if prior == "real":
            reg = latents.encode_set(latents.load_clips(cfg.reg_videos, spec, cfg.reg_caption, cfg.token, **kw),
                                     **encode)
        elif prior == "synthetic":
            reg = synthetic_prior(cfg, models, amp, encode)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if run.ddp and run.master:
        dist.barrier()
    if run.master:
        print(f"instance clips: {len(inst['mean'])}; regularization clips: {0 if reg is None else len(reg['mean'])} "
              f"({prior}); lambda {cfg.reg_weight}; timesteps {cfg.timesteps} (alpha {cfg.alpha}); "
              f"dropout {cfg.dropout}")
        for name, s in (("instance", inst), ("regularization", reg)):
            if s is not None:
                print(f"{name} windows: {latents.window_report(s, cfg.frames, max_frames)}", flush=True)
    return inst, reg, encode["fingerprint"]


def check_config(cfg: Config, given=None):
    """Clear errors for bad option values before anything heavy happens. With no --model: the toy model and its
    settings (TOY_SETTINGS) for every option not in `given` (the flags set on the command line; from Python: the
    fields that differ from their defaults)."""
    for f in dataclasses.fields(cfg):  # each option's choices and range, as the parser checks them
        why = bad_value(f, getattr(cfg, f.name))
        if why:
            raise SystemExit(f"error: --{f.name.replace('_', '-')} {why}")
    prior = PRESETS[cfg.preset].get("prior", cfg.prior)
    toy = not cfg.model or Path(cfg.model).resolve() == TOY_MODEL
    if not cfg.model:
        if not TOY_MODEL.is_dir():
            raise SystemExit("error: --model is required (a model directory in either release layout)")
        if given is None:
            given = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
        changed = {k: v for k, v in TOY_SETTINGS.items() if k not in given}
        for k, v in changed.items():
            setattr(cfg, k, v)
        cfg.model = str(TOY_MODEL)
        flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items()) or "all given"
        reg = f"; regularization: {TOY_REG_CLIPS} base-motion clips of toy/world.py" \
            if prior == "real" and not cfg.reg_videos else ""
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"no --model: the CPU toy model in {TOY_MODEL} with the toy world's settings ({flags}{reg})",
                  flush=True)
    elif prior == "real" and not cfg.reg_videos and not toy:
        raise SystemExit(
            "error: no regularization set. NewMove trains on real videos of related motions next to the examples "
            "(L = L_instance + 0.5 L_reg). Choose one: --reg-videos DIR, real videos (the method; paper Table 2: "
            "70.6% motion accuracy with Jester's 'Doing other things' + 'No gesture', 66.7% with WebVid clips); "
            "--prior synthetic, videos the base model generates from --reg-caption (48.3%); or --prior none, no "
            "regularization (43.9%, and the model forgets more of what it knew)")
    if not cfg.videos:
        raise SystemExit("error: --videos is required (a folder of example videos of the new motion)")
    if cfg.frozen_dtype != "fp32" and cfg.precision != "auto" and cfg.frozen_dtype != cfg.precision:
        raise SystemExit("error: --frozen-dtype bf16/fp16 needs the same --precision (autocast)")
    if cfg.fps and cfg.stride != 1:
        raise SystemExit(f"error: --stride {cfg.stride} needs --fps 0 (with --fps the stride comes from each clip's "
                         f"frame rate)")
    try:
        seeds = [int(s) for s in cfg.val_seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds:
        raise SystemExit(f"error: --val-seeds must be comma-separated integers, e.g. 0,1,2; got {cfg.val_seeds!r}")
    if not any(p.strip() for p in cfg.val_prompts.split("|")):
        raise SystemExit("error: --val-prompts is empty (prompts separated by '|')")
    if cfg.window == "random" and cfg.max_frames < cfg.frames:
        raise SystemExit(f"error: --max-frames {cfg.max_frames} must be at least --frames {cfg.frames}")


def print_param_table(unet, trainable: list, cfg: Config):
    """Parameters and tensors per group, which groups train, and the trainable total."""
    total = sum(p.numel() for p in unet.parameters())
    lora = f", LoRA r={cfg.lora_rank}" if cfg.lora_rank else ""
    print(f"{'group':14s} {'params':>15s} {'tensors':>8s}  trains ({cfg.preset}{lora})")
    for g in ("temporal", "spatial_kv", "spatial_attn", "spatial_rest"):
        ps = [p for n, p in unet.named_parameters() if param_group(n) == g]
        trains = "yes" if g in PRESETS[cfg.preset]["groups"] else "no"
        print(f"{g:14s} {sum(p.numel() for p in ps):>15,d} {len(ps):>8d}  {trains}")
    n = sum(p.numel() for _, p in trainable)
    print(f"{'trainable':14s} {n:>15,d} {len(trainable):>8d}  ({100 * n / total:.1f}% of {total:,d} UNet params)")


def synthetic_prior(cfg, models, amp, encode: dict) -> dict:
    """DreamBooth-style prior: videos of --reg-caption generated by the frozen base model, encoded like real clips."""
    prompt = cfg.reg_caption or "a person"
    videos = sample.generate(models, [prompt] * cfg.prior_count, list(range(cfg.prior_count)), frames=cfg.frames,
                             height=cfg.size, width=cfg.size, steps=cfg.val_steps, guidance=cfg.val_guidance,
                             solver=cfg.val_solver, dtype=amp, progress=encode["master"])

    class Generated:  # the dataset interface encode_set reads
        def __len__(self):
            return len(videos)

        def __getitem__(self, i):
            v = videos[i].float() / 127.5 - 1  # uint8 -> [-1, 1], (3, F, H, W)
            return {"video": v, "caption": prompt, "key": f"synthetic|{prompt}|{i}|{cfg.frames}|{cfg.size}|"
                                                          f"{cfg.val_solver}|{cfg.val_steps}|{cfg.val_guidance}"}

    return latents.encode_set(Generated(), **encode)


def optimizer_step(optimizer, scaler, params, clip: float) -> torch.Tensor:
    """Unscale (fp16), clip the gradient norm, one AdamW step, clear the gradients; the norm before clipping."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def validate(cfg: Config, models, unet, step: int, amp, score_fn, stop_score, run: runs.Run) -> bool:
    """Sample the fixed validation prompts/seeds with the current weights, with the official validation sampler
    (DPM-Solver++, 25 steps, guidance 9, size x size); rank 0 writes mp4 + contact sheets to <out>/val/. Returns
    whether the paper's stopping rule fired (score_fn(videos, prompts) <= stop_score; rank 0 decides)."""
    prompts = [p.strip().replace("{token}", cfg.token) for p in cfg.val_prompts.split("|") if p.strip()]
    pairs = [(p, int(s)) for p in prompts for s in cfg.val_seeds.split(",")]
    unet.eval()
    videos = sample.generate(models, [p for p, _ in pairs], [s for _, s in pairs], frames=cfg.frames,
                             height=cfg.size, width=cfg.size, steps=cfg.val_steps, guidance=cfg.val_guidance,
                             solver=cfg.val_solver, dtype=amp, progress=False)
    unet.train()
    if run.master:
        for (p, s), v in zip(pairs, videos):
            sample.save_video(v, Path(cfg.out) / "val" / f"step{step:06d}", f"{sample.slug(p)}_seed{s}")
    if score_fn is None or stop_score is None:
        return False
    score = score_fn(videos, [p for p, _ in pairs])
    if run.master:
        print(f"step {step}: validation score {score:.4f}", flush=True)
    stop = torch.tensor([float(score <= stop_score)], device=run.device)
    if run.ddp:  # rank 0 decides, so ranks cannot disagree (GPU sampling is not bit-deterministic)
        dist.broadcast(stop, 0)
    if stop.item() and run.master:
        print(f"validation score reached {stop_score}: stopping", flush=True)
    return bool(stop.item())


def delta_tensors(cfg: Config, unet, chosen, trainable, tokenizer, text) -> tuple:
    """(tensors, metadata) of the delta file: only what trained (LoRA merged into plain weights first), plus the
    learned token row and its word when `text` is given (the token ablation)."""
    if cfg.lora_rank:  # fold LoRA into the weights it adapts (W + s*up@down), so the delta is plain weights
        unet3d.merge_lora(unet)
        delta = {f"unet.{n}": unet.get_parameter(n).detach().float()
                 for n, p in chosen if p.ndim == 2 and n.endswith(".weight")}
    else:
        delta = {f"unet.{n}": p.detach() for n, p in trainable if not n.startswith("text_encoder.")}
    meta = {"base_model": str(Path(cfg.model).resolve()), "token": cfg.token, "preset": cfg.preset,
            "alpha": cfg.alpha, "reg_weight": cfg.reg_weight, "config": json.dumps(asdict(cfg))}
    if text is not None:
        state = te.placeholder_state(tokenizer, text)
        delta["text_encoder.placeholder_embeddings"] = state["embeddings"]
        meta["placeholder_words"] = json.dumps(state["words"])
    return delta, meta


# -----------------------------------------------------------------------------------------------------------------------
# command line: one flag per Config field


def checked(f: dataclasses.Field):
    """The argparse type of option f: convert the text, then refuse what bad_value refuses (a one-line error)."""
    def convert(text):
        v = type(f.default)(text)
        why = bad_value(f, v)
        if why:
            raise argparse.ArgumentTypeError(why)
        return v

    convert.__name__ = type(f.default).__name__  # argparse names it in "invalid int value: 'x'"
    return convert


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Defaults are the official NewMove settings.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata["help"].replace("%", "%%")  # argparse %-formats help strings
        if f.type is bool or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
        else:
            p.add_argument(flag, type=checked(f), default=f.default, help=helptext,
                           choices=f.metadata["choices"] or None)
    args = p.parse_args(argv)  # argparse itself rejects unknown flags
    # the flags actually typed: a second pass whose defaults are left out (the toy settings keep these)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    cfg = Config(**vars(args))
    check_config(cfg, given=set(vars(p.parse_args(argv))))
    return cfg


if __name__ == "__main__":
    try:
        cfg = parse_args()
        score_fn = None
        if cfg.stop_clip:  # the paper's protocol: stop once the appearance score of validation videos hits 0.265
            import evaluate

            if not cfg.val_every:
                raise SystemExit("error: --stop-clip needs --val-every N (the score is taken on validation videos)")
            clip = evaluate.load_clip(cfg.stop_clip, cfg.stop_clip_weights or None)
            score_fn = evaluate.appearance_score_fn(clip, cfg.token)
        main(cfg, score_fn=score_fn, stop_score=cfg.stop_score)
    except (WeightsError, ValueError) as e:  # bad files and values: one line naming the problem
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # before the loop (loading, encoding): nothing trained yet, nothing to resume
        raise SystemExit("interrupted before training started") from None
