"""Sampling: parity with the original ModelScope DDIM loop and with diffusers' schedulers, determinism, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

import sample
from delta import apply_delta
import layouts
import unet3d
from inprocess import run_script
from models import RELEASED_SCHEDULE, save_models, tiny_models
from oracles import TINY_ORIGINAL, max_abs_diff, modelscope_module, original_unet

ROOT = Path(__file__).resolve().parents[1]

# scheduler/scheduler_config.json of text-to-video-ms-1.7b (modelscope.md §6.1)
DDIM_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                   prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                   thresholding=False)


def test_schedule_and_timesteps_match_upstream():
    ms = modelscope_module("diffusion")
    theirs = ms.GaussianDiffusion(ms.beta_schedule("linear_sd", 1000, 0.00085, 0.012), mean_type="eps",
                                  var_type="fixed_small", loss_type="mse")
    abar = sample.alphas_cumprod(RELEASED_SCHEDULE)
    assert abar.dtype == torch.float64 and torch.equal(abar, theirs.alphas_cumprod)
    assert abs(abar[0].item() - 0.99915) < 1e-9 and abs(abar[999].item() - 0.0046601) < 1e-6
    assert sample.ddim_timesteps(50) == list(range(981, 0, -20))


# A smaller original UNet than the parity config: the original code runs two forwards per sampling step.
SAMPLER_UNET = dict(TINY_ORIGINAL, unet_dim_mult=[1, 2], unet_res_blocks=1)
STEPS = 20


def _sampler_pair(dtype):
    """The original UNetSD and our UNet3D with identical random weights, and the original GaussianDiffusion."""
    ms = modelscope_module("diffusion")
    diffusion = ms.GaussianDiffusion(ms.beta_schedule("linear_sd", 1000, 0.00085, 0.012), mean_type="eps",
                                     var_type="fixed_small", loss_type="mse")
    ref = original_unet(seed=2, cfg=SAMPLER_UNET)
    ours = unet3d.UNet3D(layouts.unet_config_from_original(SAMPLER_UNET))
    ours.load_state_dict(layouts.unet_from_original(ref.state_dict(), ours.cfg))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 2, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    cond = torch.randn(2, 77, 1024, generator=g, dtype=torch.float64).to(dtype)
    uncond = torch.randn(1, 77, 1024, generator=g, dtype=torch.float64).to(dtype).expand(2, -1, -1)
    return diffusion, ref, ours.to(dtype).eval(), noise, cond, uncond


def _run_both(diffusion, ref, ours, noise, cond, uncond, wrap=None):
    """Original `ddim_sample_loop` (guide 9, eta 0) vs our sample_ddim with batched guidance. 20 DDIM steps (the
    original's default argument; the pipeline's 50 run the same per-step formula on the list checked above): the
    original runs two UNet calls per step, ~0.3 s per step here."""
    wrap = wrap or (lambda out, x, t: out)
    with torch.no_grad():
        theirs = lambda x, t, y: wrap(ref(x, t, y), x, t)  # noqa: E731
        want = diffusion.ddim_sample_loop(noise, theirs, model_kwargs=[{"y": cond}, {"y": uncond}],
                                          guide_scale=9.0, ddim_timesteps=STEPS, eta=0.0)

        def eps_fn(x, t):  # exactly what generate() does: [cond; uncond] in one UNet call
            tt = torch.full((4,), t)
            e = wrap(ours(torch.cat([x, x]), tt, torch.cat([cond, uncond])), torch.cat([x, x]), tt)
            return sample.guide(e, 9.0)

        got = sample.sample_ddim(eps_fn, noise, sample.alphas_cumprod(RELEASED_SCHEDULE), STEPS,
                                 progress=False)
    return got, want


def test_ddim_matches_original_modelscope_sampler_exactly_in_float64():
    """The bare random UNet: an untrained eps-model drives latents to |x| ~ 50, where float32 rounding alone is ~1e-6
    relative, so the sampler's arithmetic is compared in float64, where any formula difference would show. The
    original UNetSD cannot run in float64 (its timestep embedding is hard-wired to float32), so here the original
    loop drives OUR UNet; UNet equality itself is test_unet3d's job and the float32 test below uses the original UNet."""
    diffusion, _, ours, noise, cond, uncond = _sampler_pair(torch.float64)
    got, want = _run_both(diffusion, ours, ours, noise, cond, uncond)
    err = max_abs_diff(got, want)
    assert err <= 1e-9, f"max abs diff {err}"
    assert want.abs().max() > 1  # the sampler really moved the latent


@pytest.mark.slow
def test_ddim_matches_original_modelscope_sampler_in_float32():
    """float32, with both UNets wrapped into a denoiser-like eps-model (eps = x_t / sqrt(1 - abar_t) + 0.3 UNet) so the
    latents keep the O(1) scale of a trained model; the wrapper is applied identically on both sides."""
    abar = sample.alphas_cumprod(RELEASED_SCHEDULE).float()

    def wrap(out, x, t):
        s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1, 1)
        return x / s + 0.3 * out

    got, want = _run_both(*_sampler_pair(torch.float32), wrap=wrap)
    err = max_abs_diff(got, want)
    assert err <= 1e-5, f"max abs diff {err}"
    assert 0.05 < want.abs().max() < 20


_ABAR = sample.alphas_cumprod(RELEASED_SCHEDULE)


def _toy_eps(x, t):
    """A fixed nonlinear, denoiser-like eps-model: the eps that makes the predicted x_0 equal tanh(0.7 x + 0.3 shift(x)),
    so latents keep the O(1) scale of a trained model while every step depends nonlinearly on x and t."""
    abar = _ABAR[t].item()
    x0 = torch.tanh(0.7 * x + 0.3 * torch.roll(x, 1, dims=-1))
    return (x - abar ** 0.5 * x0) / (1 - abar) ** 0.5


@pytest.mark.parametrize("solver,steps,eta", [("ddim", 50, 0.0), ("ddim", 20, 0.0), ("ddim", 20, 0.5),
                                             ("ddim", 10, 1.0), ("dpmpp-2m", 25, 0.0), ("dpmpp-2m", 10, 0.0)])
def test_matches_diffusers_schedulers(solver, steps, eta):
    """Our samplers against diffusers' schedulers on a fixed nonlinear eps-model. For DDIM with eta > 0 both loops add
    the same noise draw at each step (diffusers' `variance_noise`, our `noise_fn`), so what is compared is sigma_t
    (eta 1: DDPM's posterior std) and the shrunken direction term sqrt(1 - abar_prev - sigma^2) eps."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ddim = DDIMScheduler(**DDIM_CONFIG)
    sched = ddim if solver == "ddim" else DPMSolverMultistepScheduler.from_config(ddim.config)  # the model card's way
    sched.set_timesteps(steps)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(steps))
    # one fresh N(0, 1) draw per step, the same list for both loops (unused at eta 0)
    g = torch.Generator().manual_seed(100 + steps)
    draws = [torch.randn(x0.shape, generator=g) for _ in range(steps)]
    x = x0.clone()
    for k, t in enumerate(sched.timesteps):
        extra = dict(eta=eta, variance_noise=draws[k]) if solver == "ddim" else {}
        x = sched.step(_toy_eps(x, int(t)), t, x, **extra).prev_sample
    abar = sample.alphas_cumprod(RELEASED_SCHEDULE)
    if solver == "ddim":
        assert [int(t) for t in sched.timesteps] == sample.ddim_timesteps(steps)
        ours = iter(draws)
        got = sample.sample_ddim(_toy_eps, x0, abar, steps, eta=eta, noise_fn=lambda _: next(ours), progress=False)
        assert next(ours, None) is None or eta == 0  # with eta > 0 every step drew exactly one noise tensor
    else:
        assert [int(t) for t in sched.timesteps] == sample.dpm_timesteps(steps)
        got = sample.sample_dpmpp_2m(_toy_eps, x0, abar, steps, progress=False)
    err = max_abs_diff(got, x)
    assert err <= 1e-5, f"{solver} {steps} steps eta {eta}: max abs diff {err}"
    assert 0.3 < x.abs().max() < 5 and max_abs_diff(x, x0) > 0.1


@pytest.fixture(scope="module")
def tiny():
    return tiny_models(seed=3)


@pytest.mark.slow
def test_determinism_and_batch_independence(tiny):
    kw = dict(frames=3, height=32, width=32, steps=4, progress=False)
    prompts, seeds = ["a red circle moving left", "a blue square growing"], [5, 6]
    a = sample.generate(tiny, prompts, seeds, batch_size=2, **kw)
    b = sample.generate(tiny, prompts, seeds, batch_size=2, **kw)
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 3, 32, 32)
    assert torch.equal(a, b)
    singles = torch.cat([sample.generate(tiny, [p], [s], **kw) for p, s in zip(prompts, seeds)])
    assert (a.int() - singles.int()).abs().max() <= 1  # batching only changes float rounding
    assert not torch.equal(a[0], a[1])
    for solver, eta in [("ddim", 0.5), ("dpmpp-2m", 0.0)]:
        x = sample.generate(tiny, prompts, seeds, batch_size=2, solver=solver, eta=eta, **kw)
        y = torch.cat([sample.generate(tiny, [p], [s], solver=solver, eta=eta, **kw) for p, s in zip(prompts, seeds)])
        assert (x.int() - y.int()).abs().max() <= 1, solver
    with pytest.raises(ValueError, match="multiples of 4"):
        sample.generate(tiny, prompts[:1], seeds[:1], frames=2, height=30, width=32, steps=2, progress=False)


def test_apply_delta(tiny, tmp_path):
    """A delta's UNet tensor replaces the base one; its learned token rows come back in file order, each word of
    placeholder_words with its own row, which is what the text encoder embeds wherever that word is written."""
    import text_encoder as te
    from weights import WeightsError, save_state_dict

    models = tiny_models(seed=3)
    new = torch.randn_like(models.unet.conv_in.weight)
    rows = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    save_state_dict({"unet.conv_in.weight": new, "text_encoder.placeholder_embeddings": rows},
                    tmp_path / "delta.safetensors", metadata={"placeholder_words": json.dumps(["<pll>", "sks"])})
    apply_delta(models, tmp_path / "delta.safetensors")
    assert torch.equal(models.unet.conv_in.weight, new)
    V = te.TEXT_PRESETS["tiny"].vocab_size
    tokens = models.tokenizer("a sks <pll> sign")
    assert tokens[0, 2:4].tolist() == [V + 1, V]  # ids in the file's order: <pll> first, sks second
    with torch.no_grad():
        embedded = models.text_encoder.embed(tokens)[0]
    assert torch.equal(embedded[2], rows[1]) and torch.equal(embedded[3], rows[0])  # each word its own row
    save_state_dict({"unet.nope.weight": new}, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="nope.weight is not a parameter"):
        apply_delta(models, tmp_path / "bad.safetensors")


def test_contact_sheet_lays_frames_out_row_by_row():
    """10 frames of 2 x 3 pixels, frame i filled with 10 i + channel, on 4 columns: rows of frames 0-3, 4-7, 8-9, the
    two cells after the last frame black. Each cell is read back at the place a reader of the sheet expects it."""
    video = torch.stack([torch.full((2, 3), 10 * i + ch) for ch in range(3) for i in range(10)]).view(3, 10, 2, 3)
    sheet = sample.contact_sheet(video.to(torch.uint8), columns=4)
    assert sheet.dtype == torch.uint8 and sheet.shape == (3, 3 * 2, 4 * 3)
    for row in range(3):
        for col in range(4):
            cell = sheet[:, 2 * row:2 * row + 2, 3 * col:3 * col + 3]
            i = 4 * row + col  # left to right, then top to bottom
            want = 10 * i + torch.arange(3) if i < 10 else torch.zeros(3)
            assert torch.equal(cell, want.to(torch.uint8).view(3, 1, 1).expand(3, 2, 3)), (row, col)
    # fewer frames than columns: one row exactly as wide as the frames
    assert torch.equal(sample.contact_sheet(video[:, :3].to(torch.uint8), columns=8),
                       torch.cat(list(video[:, :3].to(torch.uint8).unbind(1)), dim=-1))


@pytest.mark.slow
def test_cli_writes_playable_videos_in_both_layouts(tmp_path, capfd):
    """The first layout runs sample.py as a user does, in a process of its own (the command line end to end); the
    second layout, the second run and the bad size run its command line in this process (inprocess.run_script)."""
    models = tiny_models(seed=4)
    for layout in ("original", "diffusers"):
        root = save_models(models, tmp_path / layout, layout)
        out = tmp_path / f"out-{layout}"
        args = ["--model", str(root), "--prompt", "a red circle moving left", "--frames", "3", "--height", "32",
                "--width", "48", "--steps", "2", "--num-samples", "2", "--batch-size", "2", "--fps", "8", "--out",
                str(out)]
        if layout == "original":
            run = subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True)
        else:
            run = run_script(capfd, "sample.py", *args)
        assert run.returncode == 0, run.stderr
        for seed in (0, 1):
            stem = out / f"a-red-circle-moving-left_seed{seed}"
            with av.open(str(stem) + ".mp4") as c:
                s = c.streams.video[0]
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
                assert s.codec_context.name == "h264" and s.average_rate == 8
            assert len(frames) == 3 and frames[0].shape == (32, 48, 3)
            from PIL import Image

            with Image.open(str(stem) + ".gif") as gif:
                assert gif.n_frames == 3 and gif.size == (48, 32)
            with Image.open(str(stem) + ".png") as png:
                assert png.size == (3 * 48, 32)
    # running again never overwrites: the second run gets new names
    before = (out / "a-red-circle-moving-left_seed0.mp4").read_bytes()
    run = run_script(capfd, "sample.py", *args)
    assert run.returncode == 0 and (out / "a-red-circle-moving-left_seed0-1.mp4").is_file()
    assert (out / "a-red-circle-moving-left_seed0.mp4").read_bytes() == before
    bad = run_script(capfd, "sample.py", "--model", str(tmp_path / "original"), "--prompt", "x", "--height", "30",
                     "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and "multiples of 4" in bad.stderr and "Traceback" not in bad.stderr


def test_generate_guidance_matches_diffusers_text_to_video_pipeline(tiny, tmp_path):
    """generate()'s classifier-free guidance + DDIM against diffusers' TextToVideoSDPipeline built from the SAME tiny
    weights (unet and vae read back from the diffusers layout we write), the same initial noise (one CPU
    generator per seed, as generate draws it) and the released DDIM scheduler config. The pipeline stacks
    [uncond; cond] and guides as uncond + g (cond - uncond) (its own code, not sample.guide), so a swapped half or a
    wrong formula in generate() shows. Our tokenizer (open_clip's) is not the pipeline's CLIPTokenizer, so the pipeline
    gets prompt_embeds / negative_prompt_embeds from our text encoder (its parity with transformers' CLIPTextModel is
    test_models'): what is compared is which embedding goes to which half, the guidance and DDIM, through diffusers'
    UNet. Guidance 7.5 (not generate's default 9) on both sides, so a hard-wired scale would show too."""
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    root = save_models(tiny, tmp_path / "diffusers", "diffusers")
    pipe = TextToVideoSDPipeline(vae=AutoencoderKL.from_pretrained(root / "vae").eval(), text_encoder=None,
                                 tokenizer=None, unet=UNet3DConditionModel.from_pretrained(root / "unet").eval(),
                                 scheduler=DDIMScheduler.from_pretrained(root / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    assert dict(pipe.scheduler.config).items() >= DDIM_CONFIG.items()  # the released config, as written
    prompts, seeds, frames, size, steps, g = ["a red circle moving left", "a blue square growing"], [5, 6], 2, 16, 3, 7.5
    video, got = sample.generate(tiny, prompts, seeds, frames=frames, height=size, width=size, steps=steps, guidance=g,
                                 batch_size=2, progress=False, return_latents=True)
    h = size // tiny.vae.cfg.downsample_factor
    noise = torch.stack([torch.randn(4, frames, h, h, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        embed = lambda p: tiny.text_encoder(tiny.tokenizer(p))
        cond, uncond = embed(prompts), embed([""]).expand(len(prompts), -1, -1)
        want = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_frames=frames, height=size,
                    width=size, num_inference_steps=steps, guidance_scale=g, eta=0.0, output_type="latent").frames
        unguided = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_frames=frames,
                        height=size, width=size, num_inference_steps=steps, guidance_scale=1.0,
                        output_type="latent").frames
    assert want.shape == got.shape == noise.shape
    # float32 throughout, but not the same arithmetic: diffusers' UNet vs ours (~1e-6 per call, test_models), its
    # schedule in float32 vs our float64 abar, and the guidance multiplies a difference of two UNet outputs by 7.5.
    # The untrained UNet drives the latents to |x| ~ 11 in 3 steps; measured max abs diff 3e-5 there (3e-6 relative,
    # ~25 float32 ulps). 1e-3 leaves a 30x margin and is 500x below what a planted guidance bug gives (0.5 for
    # eps_c + g (eps_c - eps_u), 7 for swapped halves).
    err = max_abs_diff(got, want)
    assert err <= 1e-3, f"max abs diff {err}"
    assert max_abs_diff(want, unguided) > 0.5  # guidance matters here, so the comparison can fail
    # the videos: the pipeline's own decode (1 / scaling_factor, diffusers' VAE frame by frame) and post-processing
    # (x / 2 + 0.5 clamped to [0, 1]) of its latents, against generate()'s uint8, which truncates 255 x as upstream's
    # tensor2vid does: 0 <= 255 x - got < 1, up to the ~1e-4 the latents differ by (0.05 leaves a 10x margin)
    with torch.no_grad():
        frames01 = pipe.video_processor.postprocess_video(video=pipe.decode_latents(want), output_type="pt")
    ref = 255 * frames01.permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W) -> (B, 3, F, H, W)
    assert video.dtype == torch.uint8 and video.shape == ref.shape == (2, 3, frames, size, size)
    lag = ref - video.float()
    assert -0.05 <= lag.min() and lag.max() <= 1.05, (lag.min().item(), lag.max().item())
    assert ref.std() > 30 and ((ref > 0) & (ref < 255)).float().mean() > 0.9  # spread out, hardly clamped: a wrong
    # offset or scale in the conversion shows (measured: std 48, 1.7% of values clamped)


def test_generate_builds_no_autograd_graph(tiny, monkeypatch):
    """generate() samples without autograd (a graph kept across the sampler's steps grows with every step: tens of GB
    on the toy demo's 50 videos): every UNet call it makes runs with gradients off, even when the caller has them on."""
    seen, real = [], type(tiny.unet).forward

    def forward(self, *a, **k):
        seen.append(torch.is_grad_enabled())
        return real(self, *a, **k)

    monkeypatch.setattr(type(tiny.unet), "forward", forward)
    with torch.enable_grad():
        sample.generate(tiny, ["a square"], [0], frames=2, height=32, width=32, steps=2, progress=False)
    assert seen and not any(seen)
