"""NewMove: customize a text-to-video model to a novel motion from a few example videos (Materzynska et al.).

    python train.py --videos clips/ --token pll      (no --model: the CPU toy model with the toy world's settings)
    python train.py --model text-to-video-ms-1.7b --videos pll_clips/ --token pll --reg-videos jester_reg/
    torchrun --nproc_per_node 8 train.py --model zeroscope_v2_576w --videos pll_clips/ --token pll \\
        --reg-videos reg/ --reg-caption "a person doing other things" --precision bf16
    torchrun --nnodes 2 --node_rank 0 --master_addr host0 --nproc_per_node 8 train.py ...   (multi-node: the same)
    python train.py ... --resume                     (continue the run in --out from its last checkpoint)
    python train.py ... --preset temporal            (an ablation row; see config.PRESETS)
    python train.py --model Wan-AI/Wan2.1-T2V-1.3B --videos pll_clips/ --token pll --reg-videos reg/   (a DiT)
    python train.py --videos clips/ --token pll --denoiser dit          (the toy model's DiT)

Defaults are the official run's (adobe-research/custom_motion; docs/fidelity.md lists every setting): no
dropout, a 16-frame window drawn at a new start in every clip at every step, 24 fps, aspect buckets of about 384^2
pixels without crop, DPM-Solver++ validation videos.

The run, top to bottom: config -> distributed setup -> frozen models -> which weights train -> data, encoded ONCE to
cached VAE posteriors of every frame and text embeddings (then the VAE and text encoder are freed) -> optimizer -> the
loop, where each clip contributes a window of its cached frames:

    t_i ~ p(t) proportional to 1 - alpha*cos(pi t / T)        coarse-noise sampling, one t per clip (method.md §1)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps             one eps per clip
    L   = MSE(eps_hat(instance), eps) + lambda * MSE(eps_hat(reg), eps)    instance + reg clips in ONE UNet batch
                                                                           (one per aspect bucket if they differ)

The DiT family (Wan 2.1, or the toy model's DiT: docs/wan.md) runs the same loop with its own objective, flow_loss:

    k_i ~ p(k), the same density; s_i = shift((k_i + 1) / T)   noise levels rise with k: coarse noise carries over
    x_s = (1 - s_i) x_0 + s_i n                               rectified flow (flow.py)
    L   = MSE(v_hat(instance), n - x_0) + lambda * MSE(v_hat(reg), n - x_0)

Output in --out: `delta.safetensors` (only the trained tensors + metadata; `python sample.py --delta` loads it),
`state.pt` (resume checkpoint), `config.json`, `log.jsonl`, validation videos in `val/`.
Video tensors are (B, C, F, H, W).
"""

if __name__ == "__main__":  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    import omp
    omp.choose_wait_policy()

import contextlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import flow
import latents
import layouts
import lora
import memory
import optim
import runs
import sample
import text_encoder as te
import wan_models
from config import PRESETS, TOY_REG_CLIPS, Config, check_config, flow_shift, parse_args  # noqa: F401 (as train.X too)
from models import base_metadata, load_models
from weights import DTYPES, WeightsError, autocast_dtype, cast, save_state_dict, weights_id, writable_dir, write_json


# -----------------------------------------------------------------------------------------------------------------------
# choice 1, which weights train: the group of each UNet parameter (config.PRESETS lists the groups each preset trains)


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


def dit_param_group(name: str) -> str:
    """Family of a Wan DiT parameter (wan_dit.py, the original's names: blocks.N.self_attn.q.weight, ...)."""
    # A DiT block has no temporal layer to pick: its self-attention relates every (frame, row, column) token to every
    # other, so motion can only live in how it attends (Q/K: the attention maps) and what it moves (V/O). The text
    # cross-attention's K/V map the words to what the tokens receive, NewMove's spatial choice; the FFN, the
    # per-block modulation and the embeddings/head are the rest.
    parts = name.split(".")
    if parts[0] != "blocks":
        return "dit_rest"  # patch, text and time embeddings, the head
    module = parts[2]
    if module == "self_attn":
        return "self_qk" if parts[3] in ("q", "k", "norm_q", "norm_k") else "self_vo"
    if module == "cross_attn":
        return "cross_kv" if parts[3] in ("k", "v") else "cross_rest"
    return {"ffn": "ffn", "modulation": "modulation", "norm3": "cross_rest"}[module]


def select_trainable(net, preset: str) -> list:
    """[(name, parameter)] that `preset` trains, group by group in PRESETS order. Works on diffusers'
    UNet3DConditionModel too (same names): the one copy of the selection, used by train.py, benchmarks and tests.
    The "dit-" presets select from a Wan DiT by dit_param_group."""
    group = dit_param_group if PRESETS[preset].get("family") == "dit" else param_group
    params = list(net.named_parameters())
    return [(n, p) for g in PRESETS[preset]["groups"] for n, p in params if group(n) == g]


# -----------------------------------------------------------------------------------------------------------------------
# choices 2 and 3, in the loss: regularization clips weighted by lambda, timesteps drawn from the coarse-noise p(t)


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
    """One UNet call on a batch of same-shape clips: t_i ~ p(t) (probs: (T,), or (B, T) one per clip) and
    eps_i ~ N(0, I) per clip, then
    sum_i w_i ||eps_hat(x_t_i, t_i, c_i) - eps_i||^2 / numel. Returns (loss, per-clip MSE (B,), t (B,))."""
    # the paper's denoising objective (eq. 1, the LDM eps-prediction loss) with t drawn from p(t) rather than
    # uniformly; every clip draws its own t and noise, also in batches > 1 (the official code's batch > 1 bug,
    # method.md §6.3)
    t = draw_timesteps(probs, x0.shape[0], g)
    eps = torch.randn(x0.shape, generator=g, device=x0.device)  # one noise draw per clip
    with sample.autocast(x0.device, amp):  # bf16 on GPUs; weights stay fp32
        eps_hat = model(diffuse(x0, eps, t, abar), t, ctx.to(x0.dtype))  # (B, 4, F, h, w)
    return (*weighted_mse(eps_hat, eps, w), t)


def flow_loss(model, x0, ctx, w, probs, shift: float, g, amp=None):
    """The same for the DiT, in its own objective (rectified flow, flow.py): per clip a grid step k_i ~ p(k) (probs:
    (T,) or (B, T)) at noise level s_i = shift((k_i + 1) / T) and n_i ~ N(0, I), x_s = (1 - s) x0 + s n, then
    sum_i w_i ||v_hat(x_s, 1000 s, c_i) - (n - x0)||^2 / numel. Returns (loss, per-clip MSE (B,), k (B,))."""
    # choice 3 carries over unchanged: the noise level rises with k, so the density that favours high t favours high
    # noise here too; the shift (the sampler's) bends where on the path each grid step lies, as Wan's schedule does
    k = draw_timesteps(probs, x0.shape[0], g)
    T = probs.shape[-1]
    s = flow.shift_sigma((k.double() + 1) / T, shift).float()  # (B,)
    noise = torch.randn(x0.shape, generator=g, device=x0.device)  # one noise draw per clip
    with sample.autocast(x0.device, amp):
        v_hat = model(flow.add_noise(x0, noise, s), s * flow.NUM_TRAIN_TIMESTEPS, ctx.to(x0.dtype))
    return (*weighted_mse(v_hat, noise - x0, w), k)


def draw_timesteps(probs, n: int, g) -> torch.Tensor:
    """One timestep per clip (B,): from one p(t) (T,), or each clip from its own row of (B, T) (--subject-timesteps)."""
    if probs.dim() == 1:
        return torch.multinomial(probs, n, replacement=True, generator=g)
    return torch.multinomial(probs, 1, generator=g)[:, 0]


def weighted_mse(eps_hat, eps, w):
    """sum_i w_i MSE(eps_hat_i, eps_i) in float32, and the per-clip MSE (B,) for logging."""
    # float32 whatever the autocast dtype: a bf16 square of small residuals would lose most of its bits
    per_clip = (eps_hat.float() - eps.float()).pow(2).mean(dim=(1, 2, 3, 4))  # (B,)
    return (w * per_clip).sum(), per_clip


# -----------------------------------------------------------------------------------------------------------------------
# the run


def main(cfg: Config, score_fn=None, stop_score: float | None = None):
    """Train; returns the path of the delta file. `score_fn(videos uint8 (N,3,F,H,W), prompts) -> float` is called on
    every validation batch (metrics.py's CLIP appearance score); training stops once it falls to `stop_score`."""
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
    # a folder, or a Hub id (cached or downloaded); the toy model's DiT with --denoiser dit; Wan 2.1 in either layout
    models = wan_models.load_wan(cfg.model, revision=cfg.revision or None) if wan_models.is_wan(cfg.model) else \
        load_models(cfg.model, revision=cfg.revision or None, denoiser=cfg.denoiser)
    base_weights = weights_id(models.denoiser.state_dict())  # in the delta: applying it to other weights warns (delta.py)
    net, text = models.denoiser.to(run.device), models.text_encoder.to(run.device)
    models.vae.to(run.device)
    if models.dit is None:  # the UNet's DDPM schedule; the DiT's noise levels come from flow.py
        abar = sample.alphas_cumprod(models.schedule).to(run.device)  # (T,), the scaled-linear schedule's alpha-bar
        T = models.schedule["num_train_timesteps"]
    else:
        abar, T = None, flow.NUM_TRAIN_TIMESTEPS
    frames = latents.latent_frames(cfg.frames, models.vae)  # the clips' frames in the latent
    amp = autocast_dtype(cfg.precision)
    net.requires_grad_(False)
    text.requires_grad_(False)
    for m in net.modules():  # the official run has none; --dropout 0.1 is the base model's pretraining value
        if isinstance(m, memory.Dropout):
            m.p = cfg.dropout

    # --- choice 1, which weights train: temporal layers + spatial cross-attention K/V (PRESETS["newmove"]) ---
    chosen, trainable, token_id = make_trainable(cfg, net, text, models.tokenizer, train_token)
    learn_words = train_token or cfg.train_subject_token  # a text-encoder row trains too (--token's, --subject-token's)
    if run.master:
        print_param_table(net, trainable, cfg)
    if models.dit is None:
        net.set_recompute(cfg.checkpointing, cfg.elementwise_recompute)
    else:  # the DiT checkpoints whole blocks or nothing (check_config refuses selective)
        net.set_checkpointing(cfg.checkpointing == "full")

    # --- data: every clip encoded once (latents.py); choice 2, the regularization set, is `reg` ---
    inst, subj, reg, fingerprint = latents.encode_run_sets(cfg, models, prior, token_id, amp, out, run)
    if not cfg.val_every and not learn_words:  # validation needs the decoder and the text encoder; else free them
        del models.vae, models.text_encoder, text  # ~0.4 B frozen params gone before the loop
        if run.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- optimizer: AdamW, constant lr 5e-6, wd 0.01 (the official run's, method.md §2), fp32 or 8-bit state, stepped
    # after backward or (--free-grads) tensor by tensor inside it (optim.py); resume ---
    params = [p for _, p in trainable]
    make = lambda ps: optim.make_adamw(cfg.optimizer, ps, cfg.lr, cfg.weight_decay, run.device)  # noqa: E731
    optimizer = optim.StepInBackward(params, make) if cfg.free_grads else make(params)
    scaler = torch.amp.GradScaler(run.device.type, enabled=amp == torch.float16)  # loss scaling for fp16 only
    model = DDP(net, device_ids=[run.device.index] if run.device.type == "cuda" else None) \
        if run.ddp and any(p.requires_grad for p in net.parameters()) else net
    # the base weights' token effect, before a checkpoint replaces them (the untrained model's output already changes
    # when a word is deleted, so "the token does nothing" is judged against this; recomputed on each resume)
    base = None
    if cfg.val_every and cfg.val_token_check:
        base = token_check(cfg, models, net, 0, amp, run, save=state is None)[2]  # videos in val/step000000/
        if run.master:
            print(f"base weights: token effect {base:.4f} (mean |with - without token| per pixel, in [0, 1])",
                  flush=True)
    step = runs.resume(state, state_path, trainable, optimizer, scaler, run)
    if run.master:
        # the options, and where the base weights came from (a Hub id's resolved commit: models.source)
        write_json({**asdict(cfg), "base_model": models.source}, out / "config.json", overwrite=True)

    # --- the loop; choice 3, coarse-noise timesteps, is `probs` ---
    probs = timestep_probs(cfg.timesteps, cfg.alpha, T).to(run.device)
    shift = flow_shift(cfg, models)  # the DiT's: where on the flow path each grid step lies
    # a joint run can draw the subject's clips from their own p(t) and let their loss reach the appearance weights only
    # (docs/subject.md: the toy model settles colour at low noise; the temporal layers learn motion from motion clips)
    subject_probs = None if subj is None or cfg.subject_timesteps in ("same", cfg.timesteps) else \
        timestep_probs(cfg.subject_timesteps, cfg.alpha, T).to(run.device)
    appearance = appearance_params(trainable, cfg.subject_trains) if subj is not None and inst is not None and \
        cfg.subject_trains != "all" else None
    n_reg = cfg.batch_size * cfg.reg_ratio if reg is not None else 0
    # the subject's examples are instance data too (motion and appearance customization): batch_size more per step,
    # and the instance loss is the mean over both sets' clips; either set may be absent (motion-only, subject-only)
    n_inst, n_subj = (cfg.batch_size if s is not None else 0 for s in (inst, subj))
    w = loss_weights(n_inst + n_subj, n_reg, cfg.reg_weight, run.device)  # (B,): instance mean + lambda * reg mean
    # rank 0 logs: log.jsonl, and each of its records to the --report-to loggers (TensorBoard, wandb)
    stats = runs.Stats(out / "log.jsonl" if run.master else None, T, n_inst + n_subj, cfg.reg_weight, run, step,
                       f"lr {cfg.lr}, precision {cfg.precision}; the last good checkpoint {state_path} is untouched",
                       cfg.report_to, asdict(cfg))
    net.train()  # as upstream; with the default --dropout 0 train and eval mode compute the same thing
    bar, interrupt = tqdm(total=cfg.steps, initial=step, disable=not run.master, desc="train"), runs.Interrupt()
    while step < cfg.steps:
        for micro in range(cfg.grad_accum):
            b = step * cfg.grad_accum + micro  # global micro-batch number
            # one generator per (step, micro, rank): timesteps, noise, windows and posterior samples are a pure
            # function of the position in the run, so a resumed run redraws exactly what an uninterrupted one would
            g = torch.Generator(run.device).manual_seed(latents.hash_seed(cfg.seed, run.rank, step, micro))
            clips = latents.step_clips(b, run, cfg.seed, ("instance", inst, n_inst), ("reg", reg, n_reg),
                                       ("subject", subj, n_subj))  # each set its own order, seed + its position
            # instance clips first (w and the log); the subject set goes last into step_clips so that the reg set keeps
            # its order seed (seed + 1) and a run without --subject-videos draws exactly what it drew before
            clips = sorted(clips, key=lambda c: c[0] == "reg")
            per_clip = torch.zeros(len(clips), device=run.device)  # each clip's MSE, for the log
            # usually one group: all clips in ONE UNet call; else one per aspect bucket, and one for one-frame stills
            groups = latents.shape_groups(clips, frames)
            if appearance is not None:  # the subject's clips in UNet calls of their own, first: the last call trains all
                groups = [[j for j in pos if clips[j][0] == "subject"] for pos in groups] + \
                         [[j for j in pos if clips[j][0] != "subject"] for pos in groups]
                groups = [pos for pos in groups if pos]
            for k, pos in enumerate(groups):
                x0, ctx = latents.batch_latents([clips[j] for j in pos], b, cfg.seed, frames,
                                                cfg.window == "random", g, run.device)  # (b, 4, F, h, w), (b, 77, D)
                if learn_words:  # captions that use a learned word are re-encoded with grad through its embedding
                    tokens = torch.stack([clips[j][1]["tokens"][clips[j][2]] for j in pos])  # (b, 77)
                    ctx = te.reencode_placeholders(text, tokens, ctx)
                last = micro == cfg.grad_accum - 1 and k == len(groups) - 1  # DDP all-reduces in the last backward
                if cfg.free_grads:  # earlier backward passes only accumulate; the last one steps and frees
                    optimizer.armed = last
                subject = [clips[j][0] == "subject" for j in pos]
                p_t = probs if subject_probs is None else \
                    torch.stack([subject_probs if s else probs for s in subject])  # (b, T)
                with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
                    if models.dit is None:
                        loss, mse, t = newmove_loss(model, x0, ctx, w[pos], p_t, abar, g, amp)
                    else:  # the DiT family's piece: the same draws and weights in the flow-matching objective
                        loss, mse, t = flow_loss(model, x0, ctx, w[pos], p_t, shift, g, amp)
                    # inputs: the only tensors this call's gradient reaches (None: every trained one)
                    scaler.scale(loss / cfg.grad_accum).backward(inputs=appearance if all(subject) else None)
                per_clip[pos] = mse.detach()
                stats.by_timestep(t, mse.detach())
            stats.add(per_clip)
        if learn_words and run.ddp:  # the token rows are outside the DDP-wrapped UNet: average its gradient by hand
            dist.all_reduce(text.placeholder_embeddings.grad, op=dist.ReduceOp.AVG)
        grad_norm = optimizer.finish() if cfg.free_grads else optimizer_step(optimizer, scaler, params, cfg.grad_clip)
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
        if cfg.val_every and step % cfg.val_every == 0 and validate(cfg, models, net, step, amp, score_fn,
                                                                     stop_score, run, stats, base):
            break
    bar.close()

    # --- outputs: the delta (only the trained tensors), a final checkpoint, optionally the whole diffusers UNet ---
    if not cfg.lora_rank:  # (with LoRA the adapters are merged away below; the last periodic checkpoint stays)
        runs.save_checkpoint(state_path, trainable, optimizer, scaler, step, cfg, run)
    delta, meta = delta_tensors(cfg, net, chosen, trainable, models.tokenizer, text if learn_words else None)
    meta.update(base_fingerprint=fingerprint, base_weights=base_weights, steps=step,
                **base_metadata(models))  # base_model (+ Hub commit)
    if run.master:
        save_state_dict(delta, delta_path, metadata=meta, overwrite=cfg.resume)
        if cfg.export_diffusers:
            write_json(layouts.unet_config_to_diffusers(net.cfg), out / "unet" / "config.json", overwrite=cfg.resume)
            layouts.save_unet(net.float(), out / "unet" / "diffusion_pytorch_model.safetensors", overwrite=cfg.resume)
        print(f"wrote {delta_path} ({sum(v.numel() for v in delta.values()):,} params)", flush=True)
        stats.close()
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
    trainable = lora.add_lora(unet, chosen, cfg.lora_rank, cfg.lora_scale) if cfg.lora_rank else list(chosen)
    for _, p in trainable:
        p.requires_grad_(True)
    frozen_dtype = DTYPES[cfg.frozen_dtype]
    if frozen_dtype != torch.float32:  # frozen weights at half size; trainable ones stay fp32 (master weights)
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen_dtype)
    token_id = None
    if train_token:  # ablation (c) and the Textual Inversion / Custom Diffusion baselines: a learned token row
        token_id = te.add_placeholder_token(tokenizer, text, cfg.token, init_from=cfg.token)
    if cfg.train_subject_token:  # Custom Diffusion's other half for the subject: its word's row, from the word itself
        te.add_placeholder_token(tokenizer, text, cfg.subject_token, init_from=cfg.subject_token)
    if train_token or cfg.train_subject_token:  # one tensor holds every learned row
        text.placeholder_embeddings.requires_grad_(True)
        trainable.append(("text_encoder.placeholder_embeddings", text.placeholder_embeddings))
    if not trainable:
        raise SystemExit(f"error: preset {cfg.preset} with these options trains nothing")
    return chosen, trainable, token_id


def appearance_params(trainable: list, which: str = "appearance") -> list:
    """What --subject-trains lets the subject's clips change: appearance = the spatial cross-attention K/V (or their
    LoRA adapters) and the learned word rows; word = the learned word rows only."""
    found = [p for n, p in trainable if n == "text_encoder.placeholder_embeddings" or
             which == "appearance" and param_group(n) == "spatial_kv"]
    if not found:
        raise SystemExit(f"error: --subject-trains {which}: this run trains no "
                         f"{'spatial cross-attention K/V and no ' if which == 'appearance' else ''}subject word "
                         f"(--train-subject-token); use --subject-trains all")
    return found


def print_param_table(unet, trainable: list, cfg: Config):
    """Parameters and tensors per group, which groups train, and the trainable total."""
    total = sum(p.numel() for p in unet.parameters())
    lora = f", LoRA r={cfg.lora_rank}" if cfg.lora_rank else ""
    print(f"{'group':14s} {'params':>15s} {'tensors':>8s}  trains ({cfg.preset}{lora})")
    dit = cfg.denoiser == "dit"
    groups = ("self_qk", "self_vo", "cross_kv", "cross_rest", "ffn", "modulation", "dit_rest") if dit else \
        ("temporal", "spatial_kv", "spatial_attn", "spatial_rest")
    for g in groups:
        ps = [p for n, p in unet.named_parameters() if (dit_param_group if dit else param_group)(n) == g]
        trains = "yes" if g in PRESETS[cfg.preset]["groups"] else "no"
        print(f"{g:14s} {sum(p.numel() for p in ps):>15,d} {len(ps):>8d}  {trains}")
    n = sum(p.numel() for _, p in trainable)
    print(f"{'trainable':14s} {n:>15,d} {len(trainable):>8d}  ({100 * n / total:.1f}% of {total:,d} "
          f"{'DiT' if dit else 'UNet'} params)")


def optimizer_step(optimizer, scaler, params, clip: float) -> torch.Tensor:
    """Unscale (fp16), clip the gradient norm (clip 0: only measure it), one AdamW step, clear the gradients; the norm
    before clipping."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip or math.inf)  # inf: a factor of exactly 1
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# --val-token-check: "the token has no effect yet" while deleting it changes the videos by at most (1 + this) x what it
# changes with the base weights; a ratio, as pixel differences scale with the model, size and content. Toy world
# (docs/training.md, "Does the token do anything?"): a delta of zeros gives 1.00x, 1% and 10% of a trained change 1.00x and
# 1.05x, the working run 1.20-1.34x from step 100, with about +-15-20% of noise over 20 videos.
TOKEN_MARGIN = 0.1


def validate(cfg: Config, models, unet, step: int, amp, score_fn, stop_score, run: runs.Run, stats, base) -> bool:
    """Sample the fixed validation prompts/seeds with the current weights, with the official validation sampler
    (DPM-Solver++, 25 steps, guidance 9, size x size); rank 0 writes mp4 + contact sheets to <out>/val/. With the
    base weights' token effect `base` (--val-token-check), also without the token: rank 0 prints and logs the effect,
    flagged when it is at most (1 + TOKEN_MARGIN) x base. Returns whether the paper's stopping rule fired
    (score_fn(videos, prompts) <= stop_score; rank 0 decides)."""
    videos, prompts, effect = token_check(cfg, models, unet, step, amp, run, check=base is not None,
                                          report=stats.report)
    if base is not None and run.master:
        flat = effect <= (1 + TOKEN_MARGIN) * base
        warn = f"; warning: the token has no effect yet (not above {1 + TOKEN_MARGIN:g}x the base's)" if flat else ""
        print(f"step {step}: token effect {effect:.4f}, base weights {base:.4f}{warn}", flush=True)
        stats.note({"step": step, "token_effect": round(effect, 6), "token_effect_base": round(base, 6),
                    "token_no_effect_yet": flat})
    if score_fn is None or stop_score is None:
        return False
    score = score_fn(videos, prompts)
    if run.master:
        print(f"step {step}: validation score {score:.4f}", flush=True)
    stop = torch.tensor([float(score <= stop_score)], device=run.device)
    if run.ddp:  # rank 0 decides, so ranks cannot disagree (GPU sampling is not bit-deterministic)
        dist.broadcast(stop, 0)
    if stop.item() and run.master:
        print(f"validation score reached {stop_score}: stopping", flush=True)
    return bool(stop.item())


def token_check(cfg: Config, models, unet, step: int, amp, run: runs.Run, check=True, save=True,
                report=None) -> tuple:
    """(videos uint8 (N, 3, F, H, W) of the validation pairs, their prompts, the token effect or None): with `check`,
    each prompt holding `{token}` is also sampled with it deleted (same seeds, in the same generate call), and the
    effect is token_effect() between those with and without. Rank 0 saves every video to <out>/val/step<N>/ and
    sends it to `report`'s loggers."""
    templates = [p.strip() for p in cfg.val_prompts.split("|") if p.strip()]
    seeds = [int(s) for s in cfg.val_seeds.split(",")]
    pairs = [(p.replace("{token}", cfg.token), s) for p in templates for s in seeds]
    # deleted, not replaced by the regularization caption: every other word of the prompt stays, so the difference
    # is the token's alone (a caption would also change the appearance the prompt asks for)
    ablated = [(" ".join(p.replace("{token}", " ").split()), s) for p in templates if "{token}" in p for s in seeds] \
        if check else []
    unet.eval()
    videos = sample.generate(models, [p for p, _ in pairs + ablated], [s for _, s in pairs + ablated],
                             frames=cfg.frames, height=cfg.size, width=cfg.size, steps=cfg.val_steps,
                             guidance=cfg.val_guidance, solver=cfg.val_solver, dtype=amp, progress=False)
    unet.train()
    if run.master and save:
        stems = [sample.save_video(v, Path(cfg.out) / "val" / f"step{step:06d}", f"{sample.slug(p)}_seed{s}")
                 for (p, s), v in zip(pairs + ablated, videos)]
        if report:  # --report-to: the GIFs just written, with and without the token (reporting.Reporter.videos)
            report.videos(step, stems)
    has = torch.tensor(["{token}" in p for p in templates for _ in seeds])  # the pairs that have an ablated twin
    effect = token_effect(videos[:len(pairs)][has], videos[len(pairs):]) if ablated else None
    return videos[:len(pairs)], [p for p, _ in pairs], effect


def token_effect(with_token, without) -> float:
    """Mean absolute per-pixel difference of uint8 videos, in [0, 1] units: how much deleting the token changes them."""
    return (with_token.float() - without.float()).abs().mean().item() / 255


def delta_tensors(cfg: Config, unet, chosen, trainable, tokenizer, text) -> tuple:
    """(tensors, metadata) of the delta file: only what trained (LoRA merged into plain weights first), plus the
    learned token row and its word when `text` is given (the token ablation)."""
    prefix = "unet" if cfg.denoiser == "unet" else "dit"  # the toy DiT's tensors are dit.* (delta.apply_delta)
    if cfg.lora_rank:  # fold LoRA into the weights it adapts (W + s*up@down), so the delta is plain weights
        lora.merge_lora(unet)
        delta = {f"{prefix}.{n}": unet.get_parameter(n).detach().float()
                 for n, p in chosen if p.ndim == 2 and n.endswith(".weight")}
    else:
        delta = {f"{prefix}.{n}": p.detach() for n, p in trainable if not n.startswith("text_encoder.")}
    meta = {"token": cfg.token, "preset": cfg.preset,
            "alpha": cfg.alpha, "reg_weight": cfg.reg_weight, "config": json.dumps(asdict(cfg)), "dtype": cfg.save_dtype}
    if cfg.subject_videos:  # the word the subject was taught under (prompts name it: "a sks doing pll")
        meta["subject_token"] = cfg.subject_token
    if text is not None:
        state = te.placeholder_state(tokenizer, text)
        delta["text_encoder.placeholder_embeddings"] = state["embeddings"]
        meta["placeholder_words"] = json.dumps(state["words"])
    return cast(delta, cfg.save_dtype), meta  # the loader computes in float32 whatever the file holds


# -----------------------------------------------------------------------------------------------------------------------
# command line: one flag per Config field (config.py)


if __name__ == "__main__":
    try:
        cfg = parse_args(description=__doc__.split("\n\n")[0])
        score_fn = None
        if cfg.stop_clip:  # the paper's protocol: stop once the appearance score of validation videos hits 0.265
            import metrics

            if not cfg.val_every:
                raise SystemExit("error: --stop-clip needs --val-every N (the score is taken on validation videos)")
            clip = metrics.load_clip(cfg.stop_clip, cfg.stop_clip_weights or None)
            score_fn = metrics.appearance_score_fn(clip, cfg.token)
        main(cfg, score_fn=score_fn, stop_score=cfg.stop_score)
    except (WeightsError, ValueError) as e:  # bad files and values: one line naming the problem
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # before the loop (loading, encoding): nothing trained yet, nothing to resume
        raise SystemExit("interrupted before training started") from None
