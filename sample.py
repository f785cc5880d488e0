"""Text-to-video sampling with the ModelScope sampler, reproduced exactly, plus DPM-Solver++(2M) as a faster option.

    python sample.py --model text-to-video-ms-1.7b --prompt "a person doing the pll sign" --out out/
    python sample.py --model zeroscope_v2_576w --width 576 --height 320 --frames 24 --solver dpmpp-2m --steps 25 \\
        --prompts prompts.txt --seed 0 --num-samples 4 --precision fp16 --out out/
    python sample.py --model text-to-video-ms-1.7b --delta runs/pll/delta.safetensors --prompt "..." --out out/
    python sample.py --model text-to-video-ms-1.7b --delta runs/pll/delta.safetensors --delta-from-t 400 ...

Defaults are the original pipeline's (modelscope.md §5): 50 DDIM steps at t = 981, 961, ..., 1, eta 0, classifier-free
guidance 9.0 against the empty prompt, 16 frames at 256x256, latents / 0.18215, per-frame VAE decode,
`x*0.5+0.5` clamped and truncated to uint8, 8 fps. Each (prompt, seed) pair gives the same video whatever the batch.

The diffusion math is a handful of pure functions (the schedule, a DDIM step, a DPM-Solver++ step) that train.py reuses;
the samplers take any `eps_fn(x, t)`. Video tensors are (B, C, F, H, W).

Notable differences from upstream:
  * Guidance runs the conditional and unconditional halves in ONE batched UNet call (upstream: two calls).
  * For step counts that do not divide 1000, timesteps follow diffusers' "leading" spacing (exactly `steps` steps);
    upstream's `arange(0, 1000, 1000 // steps)` would take one step more. Identical for 50 steps (and 10, 20, 25, ...).
  * No noise tensor is drawn per step when eta = 0 (upstream draws and multiplies it by 0).
"""

if __name__ == "__main__":  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    import omp
    omp.choose_wait_policy()

import argparse
import math
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import flow

from delta import apply_delta
from weights import WeightsError, atomic_write, autocast_dtype, read_text, writable_dir
from models import Models, load_models

# -----------------------------------------------------------------------------------------------------------------------
# diffusion math: schedule, DDIM, DPM-Solver++(2M)


def alphas_cumprod(schedule: dict) -> torch.Tensor:
    """abar_t for t = 0..T-1 in float64: SD's "scaled_linear" betas, linspace(sqrt(b0), sqrt(b1), T)^2 (upstream
    `beta_schedule('linear_sd')`)."""
    assert schedule["beta_schedule"] == "scaled_linear", schedule
    T = schedule["num_train_timesteps"]
    betas = torch.linspace(schedule["beta_start"] ** 0.5, schedule["beta_end"] ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)  # \bar{\alpha}_t


def ddim_timesteps(steps: int, T: int = 1000) -> list:
    """Descending timesteps 1 + k*(T//steps): [981, 961, ..., 1] for 50 steps (upstream = diffusers "leading" + 1)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    stride = T // steps
    return [min(1 + k * stride, T - 1) for k in reversed(range(steps))]


def ddim_step(x, eps, abar_t: float, abar_prev: float, eta: float = 0.0, noise=None):
    """One DDIM update x_t -> x_prev (Song et al. 2021, Eq. 12), eps parameterisation, no clipping.

    x0 = (x - sqrt(1-abar_t) eps) / sqrt(abar_t);  x_prev = sqrt(abar_prev) x0 + sqrt(1-abar_prev-sigma^2) eps + sigma z
    with sigma = eta * sqrt((1-abar_prev)/(1-abar_t) * (1-abar_t/abar_prev)).
    """
    x0 = math.sqrt(1.0 / abar_t) * x - math.sqrt(1.0 / abar_t - 1.0) * eps
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma ** 2) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


def sample_ddim(eps_fn, x, abar: torch.Tensor, steps: int = 50, eta: float = 0.0, noise_fn=None, progress=None):
    """The ModelScope sampler (`GaussianDiffusion.ddim_sample_loop`): the last step lands on abar[0], not 1."""
    T = len(abar)
    ts = ddim_timesteps(steps, T)
    for t in tqdm(ts, desc="DDIM", disable=progress is False, leave=False):
        t_prev = max(t - T // steps, 0)  # the final step (t=1) uses abar[0] = 0.99915 (diffusers: set_alpha_to_one=False)
        noise = noise_fn(x) if eta > 0 else None
        x = ddim_step(x, eps_fn(x, t), abar[t].item(), abar[t_prev].item(), eta, noise)
    return x


def dpm_timesteps(steps: int, T: int = 1000) -> list:
    """round(linspace(0, T-1, steps+1)) descending, without the 0: [999, 959, ..., 40] for 25 steps.

    This is what the model card's `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` does: the DDIM
    config never sets `timestep_spacing`, so the solver keeps its own default, "linspace".
    """
    return torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().long().flip(0)[:-1].tolist()


def sample_dpmpp_2m(eps_fn, x, abar: torch.Tensor, steps: int = 25, progress=None):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2, midpoint form), data prediction, final step to
    sigma = 0 with a first-order update: diffusers' DPMSolverMultistepScheduler defaults, which the model card suggests.

    In the VP parameterisation: sigma_t = sqrt((1-abar)/abar), alpha = 1/sqrt(1+sigma^2), lambda = -log(sigma).
    """
    ts = dpm_timesteps(steps, len(abar))
    sigmas = [math.sqrt((1 - abar[t].item()) / abar[t].item()) for t in ts] + [0.0]
    x0_prev, h_prev = None, None
    for i, t in enumerate(tqdm(ts, desc="DPM++2M", disable=progress is False, leave=False)):
        s, s_next = sigmas[i], sigmas[i + 1]
        alpha_s, sig_s = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)
        x0 = (x - sig_s * eps_fn(x, t)) / alpha_s  # data prediction
        if s_next == 0:  # last step: lambda = inf, so x_next = x0 exactly
            return x0
        alpha_t, sig_t = 1 / math.sqrt(1 + s_next ** 2), s_next / math.sqrt(1 + s_next ** 2)
        h = math.log(s / s_next)  # lambda_t - lambda_s
        d = x0 if x0_prev is None else x0 + 0.5 * (h / h_prev) * (x0 - x0_prev)  # D0 + D1/2 with D1 = (x0 - x0')/r
        x = (sig_t / sig_s) * x - alpha_t * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def guide(e: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): e is the UNet's output on [cond; uncond] stacked on the batch
    axis (one call for both halves, as the original pipeline). Returns eps_u + scale (eps_c - eps_u)."""
    eps_c, eps_u = e.chunk(2)
    return eps_u + scale * (eps_c - eps_u)


# -----------------------------------------------------------------------------------------------------------------------
# generation


def autocast(device: torch.device, dtype):
    """torch.autocast to `dtype` on `device`; off for dtype None (full precision)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def pixel_multiple(models: Models) -> int:
    """Frame heights and widths must be multiples of this: pixels per cell of the UNet's deepest level (8 x 8 = 64),
    or of one DiT patch (8 x 2 = 16)."""
    if models.dit is not None:
        return models.vae.cfg.downsample_factor * models.dit.cfg.patch_size[1]
    return models.vae.cfg.downsample_factor * models.unet.cfg.downsample_factor


def seeded_noise(shape: tuple, seeds: list) -> tuple:
    """(noise (N, *shape), the N generators): noise i from a CPU generator seeded with seeds[i], so a (prompt, seed)
    pair gives the same video on any batch size and device; the generators go on to draw eta > 0 noise."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """A decoded video in about [-1, 1] as uint8: upstream tensor2vid's x * 0.5 + 0.5, clamp, * 255, truncate."""
    return (video * 0.5 + 0.5).clamp(0, 1).mul(255).to(torch.uint8)


@torch.no_grad()
def generate(models: Models, prompts: list, seeds: list, *, negative_prompt: str = "", frames: int = 16,
             height: int = 256, width: int = 256, steps: int = 50, guidance: float = 9.0, eta: float = 0.0,
             solver: str = "ddim", batch_size: int = 1, dtype=None, decode_chunk: int = 8, progress: bool = True,
             return_latents: bool = False):
    """Videos for the (prompt, seed) pairs: uint8 (N, 3, F, H, W). Used by this CLI, train.py and evaluate.py.

    Initial noise comes from a CPU generator seeded per pair, so a pair gives the same video on any batch size and
    device. `dtype`: autocast dtype for UNet and VAE (None = full precision). The text encoder runs in float32.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    if not isinstance(models, Models):  # Wan 2.1 (wan_models.WanModels): its own pipeline, one video at a time
        if return_latents:
            raise ValueError("return_latents: generate_wan(..., return_latents=True) gives Wan's latents alone")
        return generate_wan(models, prompts, seeds, negative_prompt=negative_prompt or None, frames=frames,
                            height=height, width=width, steps=steps, shift=models.flow_shift, guidance=guidance,
                            solver=solver, dtype=dtype, progress=progress)
    unet, vae, text = models.denoiser, models.vae, models.text_encoder
    f = pixel_multiple(models)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f} for this model, got {height}x{width}")
    if (solver in ("unipc", "euler")) != (models.dit is not None):
        which = "DiT (unipc, euler)" if models.dit is not None else "UNet (ddim, dpmpp-2m)"
        raise ValueError(f"solver {solver!r} does not sample this model's {which}")
    device = next(unet.parameters()).device
    abar = alphas_cumprod(models.schedule)
    latent_hw = (height // vae.cfg.downsample_factor, width // vae.cfg.downsample_factor)
    uncond = text(models.tokenizer([negative_prompt]).to(device))  # (1, 77, D): upstream's '' embedding by default
    videos, latents_out = [], []
    batches = range(0, len(prompts), batch_size)
    for n, i in enumerate(batches):
        bp, bs = prompts[i:i + batch_size], seeds[i:i + batch_size]
        B = len(bp)
        cond = text(models.tokenizer(bp).to(device))  # (B, 77, D)
        context = torch.cat([cond, uncond.expand(B, -1, -1)])  # (2B, 77, D): [cond; uncond]
        channels = unet.cfg.in_dim if models.dit is not None else unet.cfg.in_channels
        x, gens = seeded_noise((channels, frames, *latent_hw), bs)
        x = x.to(device)  # (B, C, F, h, w)

        def eps_fn(x, t):
            if models.gate:  # a noise-gated delta (delta.py): the customized weights only while t >= its from_t
                models.gate.at(t)
            with autocast(device, dtype):  # both halves of the guidance in one UNet call
                e = unet(torch.cat([x, x]), torch.full((2 * B,), t, device=device), context).float()
            return guide(e, guidance)

        def noise_fn(x):  # per-sample generators keep eta > 0 batch-independent too
            return torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(device)

        show = progress and len(batches) > 1
        if show:
            print(f"batch {n + 1}/{len(batches)}", file=sys.stderr)
        if models.dit is not None:  # rectified flow (flow.py): the toy DiT's velocity, on its shifted schedule
            with autocast(device, dtype):
                x = flow.sample_latents(unet, x, cond, uncond.expand(B, -1, -1), steps, models.flow_shift, guidance,
                                        solver)
        elif solver == "ddim":
            x = sample_ddim(eps_fn, x, abar, steps, eta, noise_fn, progress)
        elif solver == "dpmpp-2m":
            x = sample_dpmpp_2m(eps_fn, x, abar, steps, progress)
        else:
            raise ValueError(f"solver must be 'ddim' or 'dpmpp-2m', got {solver!r}")
        with autocast(device, dtype):
            video = vae.decode(x, chunk_size=decode_chunk).float()  # (B, 3, F, H, W) in about [-1, 1]
        videos.append(to_uint8(video).cpu())
        latents_out.append(x.cpu())
    if models.gate:  # leave the model as it was given: customized
        models.gate.at(math.inf)
    out = torch.cat(videos)
    return (out, torch.cat(latents_out)) if return_latents else out


# -----------------------------------------------------------------------------------------------------------------------
# files


def slug(text: str, n: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].rstrip("-") or "empty"


def free_stem(folder: Path, stem: str, suffixes=(".mp4", ".gif", ".png")) -> Path:
    """`folder/stem`, or `stem-1`, `stem-2`, ... so that no existing output is ever overwritten."""
    k, name = 0, stem
    while any((folder / (name + s)).exists() for s in suffixes):
        k += 1
        name = f"{stem}-{k}"
    return folder / name


def write_mp4(video: torch.Tensor, path: Path, fps: int = 8, crf: int = 10):
    """H.264 mp4 through PyAV (its wheels bundle libx264; no system ffmpeg). video: uint8 (3, F, H, W)."""
    import av

    frames = video.permute(1, 2, 3, 0).contiguous().numpy()  # (F, H, W, 3)

    def write(tmp):
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf)})
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush

    atomic_write(path, write, overwrite=True)


def write_gif(video: torch.Tensor, path: Path, fps: int = 8):
    from PIL import Image

    frames = [Image.fromarray(f) for f in video.permute(1, 2, 3, 0).numpy()]  # F x (H, W, 3)
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=round(1000 / fps), loop=0), overwrite=True)


def contact_sheet(video: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """All frames on a grid: uint8 (3, F, H, W) -> (3, rows*H, columns*W)."""
    C, F, H, W = video.shape
    columns = min(columns, F)
    rows = math.ceil(F / columns)
    sheet = torch.zeros(C, rows * H, columns * W, dtype=torch.uint8)
    for i in range(F):
        r, c = divmod(i, columns)
        sheet[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = video[:, i]
    return sheet


def write_png(image: torch.Tensor, path: Path):
    from PIL import Image

    img = Image.fromarray(image.permute(1, 2, 0).numpy())  # (H, W, 3)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), overwrite=True)


def save_video(video: torch.Tensor, folder, stem: str, fps: int = 8) -> Path:
    """Write `stem`.mp4 / .gif / .png (contact sheet) in `folder` under a name no existing file has."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = free_stem(folder, stem)
    paths = [base.with_name(base.name + suffix) for suffix in (".mp4", ".gif", ".png")]
    try:
        write_mp4(video, paths[0], fps)
        write_gif(video, paths[1], fps)
        write_png(contact_sheet(video), paths[2])
    except BaseException:  # Ctrl-C or an error between two files: all three or none, never a partial video
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    return base


# -----------------------------------------------------------------------------------------------------------------------
# Wan 2.1 (wan_models.py): its text encoder, DiT, flow sampler (flow.py) and causal video VAE


@torch.no_grad()
def generate_wan(models, prompts: list, seeds: list, *, negative_prompt: str | None = None, frames: int = 81,
                 height: int = 480, width: int = 832, steps: int = 50, shift: float = 5.0, guidance: float = 5.0,
                 solver: str = "unipc", dtype=None, progress: bool = True, return_latents: bool = False):
    """Wan 2.1 videos for the (prompt, seed) pairs: uint8 (N, 3, F, H, W), one pair at a time (a 480p clip fills a
    GPU). Defaults are the original text2video.py's (wan_models.SAMPLE_DEFAULTS) with its negative prompt. The
    initial noise (16, 1 + (F-1)/4, H/8, W/8) comes from a CPU generator per seed (seeded_noise), so a pair gives the
    same video on any device (the original draws it on the GPU: same seed, other numbers)."""
    import wan_models
    from wan_t5 import encode_prompts

    dit, vae, text = models.dit, models.vae, models.text_encoder
    tf, sf = vae.cfg.temporal_factor, vae.cfg.spatial_factor
    multiple = sf * dit.cfg.patch_size[1]  # pixels per token side: 8 x 2 = 16
    if (frames - 1) % tf or height % multiple or width % multiple:
        raise ValueError(f"Wan needs frames = 1 + {tf}k and sides divisible by {multiple}; got {frames} frames of "
                         f"{width}x{height}")
    device = dit.patch_embedding.weight.device
    neg = wan_models.NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    shape = (vae.cfg.z_dim, 1 + (frames - 1) // tf, height // sf, width // sf)
    out = []
    for prompt, seed in tqdm(list(zip(prompts, seeds)), desc="sampling", disable=not progress):
        ctx = encode_prompts(text, models.tokenizer, [prompt, neg], dit.cfg.text_len).float()  # (2, 512, 4096)
        noise = seeded_noise(shape, [seed])[0].to(device)  # (1, 16, f, h, w)
        with autocast(device, dtype):
            z = flow.sample_latents(dit, noise, ctx[:1], ctx[1:], steps, shift, guidance, solver)
            out.append(z if return_latents else to_uint8(vae.decode(z).float()).cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------------------------------------------------
# command line


# flags whose default depends on the model family: (ModelScope / ZeroScope, Wan 2.1 = the original text2video.py's)
FAMILY_DEFAULTS = {"modelscope": dict(frames=16, height=256, width=256, steps=50, guidance=9.0, fps=8, solver="ddim",
                                      negative_prompt=""),
                   "wan": dict(frames=81, height=480, width=832, steps=50, guidance=5.0, fps=16, solver="unipc",
                               negative_prompt=None, shift=5.0)}  # None: Wan's own negative prompt
SOLVERS = {"modelscope": ("ddim", "dpmpp-2m"), "wan": ("unipc", "euler")}


def model_family(model: str, revision=None) -> str:
    """"wan" for a Wan 2.1 folder or Hub repository in either layout, else "modelscope"."""
    import hub
    import wan_models

    folder, _ = hub.resolve(model, revision)
    return "wan" if wan_models.detect_layout(folder) else "modelscope"


def check_sample_args(p, args, family: str | None = None):
    """Option values that cannot work (p.error exits with the usage line): with family None, those wrong for any
    model (flags still unset are skipped), before the model is fetched; then the family's own rules."""
    for flag in ("num_samples", "batch_size", "frames", "steps", "height", "width", "fps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.guidance is not None and not math.isfinite(args.guidance) or not 0 <= args.eta <= 1:
        p.error(f"--guidance must be a number and --eta in [0, 1], got {args.guidance} and {args.eta}")
    if args.delta_from_t is not None and not args.delta:
        p.error("--delta-from-t needs --delta")
    if family is None:
        return
    if args.solver not in SOLVERS[family]:
        p.error(f"--solver {args.solver}: {args.model} is a {family} model; its solvers are "
                f"{', '.join(SOLVERS[family])}")
    if family == "wan":
        if args.eta or args.batch_size != 1:
            p.error("--eta and --batch-size are ModelScope options; Wan samples one video at a time with UniPC")
        if not (math.isfinite(args.shift) and args.shift > 0):
            p.error(f"--shift must be a positive number, got {args.shift}")
    elif args.shift is not None:
        p.error(f"--shift is a Wan option; {args.model} is a ModelScope-family model")


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate videos from text with a ModelScope-architecture model "
                                "(original or diffusers layout), optionally with weights customized by train.py, or "
                                "with Wan 2.1 T2V (either layout). Defaults marked M / W are per family: M = the "
                                "original ModelScope pipeline's, W = the original Wan text2video.py's.")
    p.add_argument("--model", required=True, help="model directory in either release layout, or a Hugging Face Hub "
                   "repository id (cerspense/zeroscope_v2_576w, Wan-AI/Wan2.1-T2V-1.3B(-Diffusers): from the "
                   "cache, else downloaded; hub.py)")
    p.add_argument("--revision", help="branch, tag or commit of a Hub --model")
    p.add_argument("--delta", help="customized weights (.safetensors) written by train.py")
    p.add_argument("--delta-from-t", type=float, default=None, metavar="TAU", help="use --delta only for steps with "
                   "t >= TAU, the base model below: motion from the delta, appearance finished by the base model "
                   "(0 = the delta at every step; 1000 = the base model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts", help="text file with one prompt per line (blank lines and #comments ignored)")
    p.add_argument("--negative-prompt", default=None, help="the unconditional prompt (M: empty; W: Wan's default "
                   "negative prompt, wan_models.NEGATIVE_PROMPT)")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample k of a prompt uses seed + k")
    p.add_argument("--num-samples", type=int, default=1, help="videos per prompt")
    p.add_argument("--frames", type=int, default=None, help="M: 16; W: 81 (1 + 4k)")
    p.add_argument("--height", type=int, default=None, help="pixels; M: 256, a multiple of 64; W: 480, of 16")
    p.add_argument("--width", type=int, default=None, help="pixels; M: 256 (zeroscope_v2_576w: 576x320); W: 832")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; M: 50 (model card: 25 with dpmpp-2m); "
                   "W: 50")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; M: 9.0; W: 5.0")
    p.add_argument("--shift", type=float, default=None, help="W only: the flow schedule's time shift (5.0)")
    p.add_argument("--eta", type=float, default=0.0, help="M only: DDIM noise (0 = deterministic, as upstream)")
    p.add_argument("--solver", choices=[*SOLVERS["modelscope"], *SOLVERS["wan"]], default=None,
                   help="M: ddim (default) or dpmpp-2m; W: unipc (default, Wan's) or euler")
    p.add_argument("--batch-size", type=int, default=1, help="M only: videos per UNet batch (x2 for guidance)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype for the denoiser and VAE (upstream samples ModelScope in fp16 and Wan in "
                   "bf16 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", default=None, help="diffusers weight variant, e.g. fp16")
    p.add_argument("--fps", type=int, default=None, help="of the written files; M: 8; W: 16")
    p.add_argument("--out", default="out", help="output folder (existing files are never overwritten)")
    args = p.parse_args(argv)

    pairs, written = [], []  # (prompt, seed) to sample; the videos saved so far (Ctrl-C names them)
    try:
        prompts = list(args.prompt)
        if args.prompts:
            lines = [ln.strip() for ln in read_text(args.prompts, "prompts file").splitlines()]
            prompts += [ln for ln in lines if ln and not ln.startswith("#")]
            if not prompts:
                p.error(f"--prompts {args.prompts}: the file has no prompts (blank and '#' lines are skipped)")
        if not prompts:
            p.error("give at least one --prompt or a --prompts file")
        check_sample_args(p, args)  # what is wrong whatever the model
        writable_dir(args.out, "--out")  # before the sampling work, not after it
        family = model_family(args.model, args.revision)  # resolves (fetches) a Hub id once; the loaders reuse it
        for flag, value in FAMILY_DEFAULTS[family].items():
            if getattr(args, flag) is None:
                setattr(args, flag, value)
        check_sample_args(p, args, family)
        pairs = [(pr, args.seed + k) for pr in prompts for k in range(args.num_samples)]
        dtype = autocast_dtype(args.precision)
        if family == "wan":
            import wan_models

            models = wan_models.load_wan(args.model, revision=args.revision)
            if args.delta:  # train.py's delta of Wan's DiT (dit.* tensors)
                apply_delta(models, args.delta, args.delta_from_t)
            for m in (models.dit, models.vae, models.text_encoder):
                m.to(args.device)
            for prompt, seed in pairs:  # each video saved when done: a Ctrl-C keeps what was made
                video = generate_wan(models, [prompt], [seed], negative_prompt=args.negative_prompt,
                                     frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                                     shift=args.shift, guidance=args.guidance, solver=args.solver, dtype=dtype)[0]
                base = save_video(video, args.out, f"{slug(prompt)}_seed{seed}", args.fps)
                written.append(f"{base.name}.mp4")
                print(f"{base}.mp4  ({prompt!r}, seed {seed})")
            return 0
        models = load_models(args.model, variant=args.variant, revision=args.revision)
        if args.delta:
            apply_delta(models, args.delta, args.delta_from_t)
        for m in (models.unet, models.vae, models.text_encoder):
            m.to(args.device)
        for i in range(0, len(pairs), args.batch_size):  # each batch saved when done: a Ctrl-C keeps what was made
            batch = pairs[i:i + args.batch_size]
            if len(batch) < len(pairs):
                print(f"batch {i // args.batch_size + 1}/{math.ceil(len(pairs) / args.batch_size)}", file=sys.stderr)
            videos = generate(models, [q for q, _ in batch], [s for _, s in batch],
                              negative_prompt=args.negative_prompt, frames=args.frames, height=args.height,
                              width=args.width, steps=args.steps, guidance=args.guidance, eta=args.eta,
                              solver=args.solver, batch_size=args.batch_size, dtype=dtype)
            for (prompt, seed), video in zip(batch, videos):
                base = save_video(video, args.out, f"{slug(prompt)}_seed{seed}", args.fps)
                written.append(f"{base.name}.mp4")
                print(f"{base}.mp4  ({prompt!r}, seed {seed})")
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # each video is written whole (save_video) or not at all
        listed = ", ".join(written[:10]) + (" ..." if len(written) > 10 else "")
        done = f"{len(written)} of {len(pairs)} videos written to {args.out} (each with its .gif and .png): {listed}"
        print(f"\ninterrupted: {done if written else f'no videos written to {args.out}'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
