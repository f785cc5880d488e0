"""Our UNet3D, DDIM sampler and NewMove training step timed against diffusers side by side; their memory.

    python benchmarks/bench.py                 # the side-by-side table, ~5-10 min on 2 CPU cores -> benchmarks/results.md
    python benchmarks/bench.py --quick         # 1-2 minute smoke run of the same table
    OMP_WAIT_POLICY=ACTIVE python benchmarks/bench.py     # libgomp spinning (the default here is PASSIVE: a busy CPU)
    python benchmarks/bench.py --device cuda --threads 8 --reps 20

bench.py sends every command without --estimate / --full-size here (python benchmarks/compare.py runs the same);
those two are estimate.py's, which also holds what both files use (model building, train.py's training step, the FLOP
counter, the allocator and RSS peaks, the command line).

ONE process holds our UNet3D and diffusers' UNet3DConditionModel with identical weights (our state dict loaded into
theirs with strict=True: the key names are the same), gives both identical inputs and settings, and alternates them
within every repetition (ours, diffusers, then diffusers, ours, ...), so background load and clock drift hit both sides
alike. Before timing, every case checks that the two sides compute the same numbers (the "max rel diff" column), so
the table provably compares one computation. Reported: median and p25-p75 of each side's wall time and of the
per-repetition ratio ours / diffusers (< 1: we are faster); GFLOP per call of each side (counted on the meta device
as --estimate does: estimate.meta_flops).
  1. UNet forward, eval + no_grad, batch 1: "small" (the performance.md §7 config, 16x16 latents) and "mid" (the
     released widths 320/640, 64-dim heads, 1024-dim text, on 2 levels with one layer each, 16x16 latents);
     1/8/16 frames.
     The parity check of each case is also each side's first (warm-up) run.
  2. One NewMove training step, train.py's own code on both models: its selection (train.select_trainable(model,
     "newmove"): temporal layers + spatial cross-attention K/V) applied by name, requires_grad_(False) on the rest,
     train() with dropout, batch 2 (1 instance + 1 reg clip), train.newmove_loss (coarse-noise t, lambda 0.5) +
     backward + train.optimizer_step (clip 1.0, AdamW with train.py's settings), the same seeds before each side's
     step (harness.train_step_fn). The parity check runs in eval() (no dropout) on the gradients.
  3. 25-step DDIM with classifier-free guidance 9 (batch 2: cond + uncond in one call), latents only: ours =
     sample.sample_ddim as sample.generate drives it; theirs = DDIMScheduler configured like the released
     scheduler_config.json (RELEASED_SCHEDULE + no clipping, set_alpha_to_one False, steps_offset 1).
  4. Peak memory of one step of (2), measured, two ways:
     * allocator: the torch profiler's allocation events (profile_memory=True) log every allocation and free of
       PyTorch's CPU allocator; their running sum from the start of a steady-state step (the model, its gradients set to
       None and the AdamW state already resident) peaks at the step's extra memory: activations, gradients, optimizer
       temporaries. Exact for tensors; blind to memory libraries allocate themselves (oneDNN scratch, thread stacks).
       On CUDA: torch.cuda.max_memory_allocated over the same step.
     * RSS: each side runs its FIRST step in a fresh subprocess; the peak resident set (VmHWM, reset just before the
       step through /proc/self/clear_refs, else ru_maxrss) minus the resident set just before it. Sees everything the
       process touches, but at page granularity, through malloc's caching, and including the first AdamW state
       allocation (8 bytes per trainable parameter).
  5. Where the time of (2) goes: two more steps per side under the torch profiler, split into the matmul /
     convolution / attention kernels (the ops that do the FLOPs, the same library calls on both sides) and everything
     else; ours' kernel time over diffusers' total is the floor of the ratio: its value if nothing else cost any time.

diffusers is a test/benchmark oracle (requirements-test.txt): it is imported inside functions, only by this
side-by-side run and estimate.py's count check, never by our modules.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`: the repository root
    import omp  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    omp.choose_wait_policy()

import harness  # noqa: F401

import os
import datetime
import functools
import gc
import json
import platform
import statistics
import subprocess
import time

import torch


import layouts
import sample
import vae as vae_lib
import weights
from models import RELEASED_SCHEDULE
from harness import (CALL, ROOT, SIDES, TEXT_LEN, allocator_peak, diffusers_kwargs, newmove_loss,
                      diffusers_module, machine_cpu, meta_flops, meta_model, parse_args, randomize_, reset_rss_peak,
                      rss_now_bytes, rss_peak_bytes, set_trainable, start, sync, train_inputs, train_step_fn,
                      trainable_names, write_atomic)
from estimate import main as estimate_main
from unet3d import UNet3D, UNet3DConfig

# The released scheduler/scheduler_config.json: RELEASED_SCHEDULE plus DDIM's own settings (as tests/test_sample.py).
DDIM_CONFIG = dict(RELEASED_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                   thresholding=False)

BENCH_CONFIGS = {
    # performance.md §7: the tiny diffusers config with a recorded CPU baseline there (1,328,900 params)
    "small": UNet3DConfig(block_out_channels=(32, 64), cross_attn_levels=(True, False), layers_per_block=1, head_dim=8,
                          first_temporal_heads=8, cross_attention_dim=32, norm_num_groups=8, dropout=0.0),
    # the released layer widths (320/640 channels, 64-dim heads, 1024-dim text, 32 groups) on fewer levels and layers,
    # so per-op costs are those of the real model while a call still takes seconds on a CPU
    # (the released pattern cut to 2 levels: transformers on every level but the last, and in the middle block)
    "mid": UNet3DConfig(block_out_channels=(320, 640), cross_attn_levels=(True, False), layers_per_block=1, head_dim=64,
                        first_temporal_heads=8, cross_attention_dim=1024, norm_num_groups=32, dropout=0.0),
}
# ResBlock dropout is 0 above because diffusers builds its ResNets without dropout; both keep the temporal convs' 0.1.


# -----------------------------------------------------------------------------------------------------------------------
# models with identical weights


def build_pair(cfg: UNet3DConfig, seed: int = 0, device="cpu", sides=SIDES) -> dict:
    """{"ours": UNet3D, "diffusers": UNet3DConditionModel} with the same random weights (strict load), eval mode."""
    ours = randomize_(UNet3D(cfg), seed)
    models = {}
    if "diffusers" in sides:
        theirs = diffusers_module().UNet3DConditionModel(**diffusers_kwargs(cfg))
        theirs.load_state_dict(ours.state_dict(), strict=True)  # raises on any missing/unexpected/mis-shaped key
        models["diffusers"] = theirs.to(device).eval()
    if "ours" in sides:
        models["ours"] = ours.to(device).eval()
    return models


# -----------------------------------------------------------------------------------------------------------------------
# timing


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def race(fns: dict, device, warmup: int = 2, reps: int | None = None, budget: float = 25.0,
         per_rep: float | None = None) -> dict:
    """Wall times of every side of `fns`, interleaved. The order flips every repetition (A B, B A, ...) so neither side
    always runs right after the other (caches, allocator state). reps=None: as many as fit in `budget` seconds, 5..30;
    per_rep: seconds of one round of all sides if already known."""
    sides = list(fns)
    for _ in range(warmup):
        per_rep = sum(timed(fns[s], device) for s in sides)
        if per_rep > 2.0:
            break  # calls of seconds are warm after one run
    if reps is None:
        if per_rep is None:
            per_rep = sum(timed(fns[s], device) for s in sides)  # one untimed round, to size the run
        reps = max(5, min(30, int(budget / max(per_rep, 1e-6))))
    times = {s: [] for s in sides}
    for r in range(reps):
        for s in sides if r % 2 == 0 else sides[::-1]:
            times[s].append(timed(fns[s], device))
    return times


def quartiles(xs: list) -> tuple:
    """(p25, median, p75), linear interpolation between order statistics."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def summarize(times: dict) -> dict:
    """Quartiles of each side and of the per-repetition ratio ours / diffusers (paired: both ran back to back)."""
    out = {s: quartiles(v) for s, v in times.items()}
    out["ratio"] = quartiles([a / b for a, b in zip(times["ours"], times["diffusers"])])
    out["reps"] = len(times["ours"])
    return out


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: scale-free, so one column serves outputs, gradients and sampled latents."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# -----------------------------------------------------------------------------------------------------------------------
# the cases: each returns the two sides' callables plus the parity check, on the models of build_pair


def forward_case(models: dict, cfg: UNet3DConfig, frames: int, hw: int, device, amp=None, batch: int = 1,
                 seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, hw, hw, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ctx = torch.randn(batch, TEXT_LEN, cfg.cross_attention_dim, generator=g).to(device)

    def fn(side):
        @torch.no_grad()
        def run():
            with sample.autocast(device, amp):
                return CALL[side](models[side], x, t, ctx)
        return run

    for m in models.values():
        m.eval()
    fns = {s: fn(s) for s in SIDES}
    return {"fns": fns, "diff": max_rel_diff(fns["ours"](), fns["diffusers"]()), "shape": (batch, frames, hw, hw)}


def train_case(models: dict, cfg: UNet3DConfig, frames: int, hw: int, device, amp=None, seed: int = 0,
               ours_checkpointing="none") -> dict:
    """(2) and (4). ours_checkpointing="selective" runs ours as train.py does by default (diffusers' UNet3D has no
    recomputation of any kind: its `gradient_checkpointing` flag is never read by its 3-D blocks' forward)."""
    models["ours"].set_recompute(ours_checkpointing)
    names = trainable_names(models["ours"])
    assert set(names) == set(trainable_names(models["diffusers"])), "the trainable sets must be the same tensors"
    inputs = train_inputs(cfg, frames, hw, device, seed)
    # parity: loss gradients of the trainable tensors, dropout off (train mode draws different masks per side)
    grads = {}
    for s in SIDES:
        m = models[s].eval()
        set_trainable(m, names)
        newmove_loss(m, s, inputs, amp, seed).backward()
        grads[s] = torch.cat([m.get_parameter(n).grad.flatten() for n in names])
        m.zero_grad(set_to_none=True)
    fns = {}
    for s in SIDES:
        models[s].train()
        fns[s], _ = train_step_fn(models[s], s, names, inputs, device, amp, seed)
    return {"fns": fns, "diff": max_rel_diff(grads["ours"], grads["diffusers"]), "shape": (2, frames, hw, hw),
            "trainable": sum(models["ours"].get_parameter(n).numel() for n in names)}


def vae_pair(device, seed: int = 0) -> dict:
    """vae.py's AutoencoderKL and diffusers' on identical random weights (the tiny preset: 2 levels, latents at 1/2 of
    the frame size), ours loaded from diffusers' own save_pretrained files as a user's would be."""
    import tempfile

    cfg = vae_lib.VAE_PRESETS["tiny"]
    kwargs = {k: v for k, v in layouts.vae_config_to_diffusers(cfg).items() if not k.startswith("_")}
    theirs = randomize_(diffusers_module().AutoencoderKL(**kwargs), seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp, safe_serialization=True)
        ours = layouts.load_vae(tmp)
    return {"ours": ours.to(device).eval(), "diffusers": theirs.to(device).eval(), "scale": cfg.scaling_factor}


def sampling_case(models: dict, cfg: UNet3DConfig, frames: int, hw: int, device, amp=None, steps: int = 25,
                  guidance: float = 9.0, seed: int = 0) -> dict:
    """Batched classifier-free guidance, [cond; uncond] in one UNet call, as sample.generate and diffusers' pipeline,
    then the VAE decode of every frame (vae.py against diffusers' AutoencoderKL, tiny preset)."""
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, frames, hw, hw, generator=g).to(device)
    ctx = torch.randn(2, TEXT_LEN, cfg.cross_attention_dim, generator=g).to(device)  # [cond; uncond]
    abar = sample.alphas_cumprod(RELEASED_SCHEDULE)
    scheduler = DDIMScheduler(**DDIM_CONFIG)
    for m in models.values():
        m.eval()

    def guided(side, lat, t):
        with sample.autocast(device, amp):
            e = CALL[side](models[side], torch.cat([lat, lat]), t, ctx).float()
        return sample.guide(e, guidance)

    vaes = vae_pair(device, seed)

    @torch.no_grad()
    def ours():
        lat = sample.sample_ddim(lambda lat, t: guided("ours", lat, torch.full((2,), t, device=device)), x, abar,
                                 steps, progress=False)
        return vaes["ours"].decode(lat)  # (1, 3, F, H, W)

    @torch.no_grad()
    def theirs():
        scheduler.set_timesteps(steps, device=device)
        lat = x
        for t in scheduler.timesteps:
            lat = scheduler.step(guided("diffusers", lat, t), t, lat).prev_sample
        frames_ = lat.permute(0, 2, 1, 3, 4).flatten(0, 1) / vaes["scale"]  # (B*F, C, h, w), as diffusers' pipeline
        video = vaes["diffusers"].decode(frames_).sample  # (B*F, 3, H, W)
        return video.unflatten(0, (lat.shape[0], frames)).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)

    fns = {"ours": ours, "diffusers": theirs}
    return {"fns": fns, "diff": max_rel_diff(ours(), theirs()), "shape": (2, frames, hw, hw)}


# -----------------------------------------------------------------------------------------------------------------------
# where the time goes


# The ops that do the FLOPs FlopCounterMode counts: matmuls, convolutions (forward and backward) and attention kernels.
# On CPU and CUDA their run time is set by the FLOPs and the BLAS/oneDNN/cuDNN kernels, which both sides share.
KERNEL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution_backward",
              "aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::slow_conv3d", "aten::_slow_conv2d",
              "aten::slow_conv_dilated", "aten::_scaled_dot_product", "aten::_flash_attention",
              "aten::_efficient_attention")


def is_kernel_op(name: str) -> bool:
    return name.startswith(KERNEL_OPS)


def time_breakdown(fn, device, calls: int = 2) -> dict:
    """Where fn's time goes, from the torch profiler over `calls` calls: seconds per call in the matmul / convolution /
    attention kernels (KERNEL_OPS) and in everything else (element-wise ops, norms, copies, the optimizer, Python).
    Self times of the profiled ops (CPU), or of the kernels they launch (CUDA); 'total' is their sum."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    kernel = total = 0.0
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        total += us
        kernel += us if is_kernel_op(e.key) else 0.0
    return {"kernel": kernel / 1e6 / calls, "total": total / 1e6 / calls}


# -----------------------------------------------------------------------------------------------------------------------
# the side-by-side run


def case_plan(quick: bool) -> list:
    """(section, config, frames, latent size). --quick keeps the small config and one mid forward."""
    if quick:
        return [("forward", "small", 1, 16), ("forward", "small", 8, 16), ("forward", "mid", 1, 16),
                ("train", "small", 8, 16), ("train-selective", "small", 8, 16), ("sample", "small", 8, 16)]
    return ([("forward", "small", f, 16) for f in (1, 8, 16)] + [("forward", "mid", f, 16) for f in (1, 8, 16)]
            + [("train", "small", 8, 16), ("train-selective", "small", 8, 16), ("train", "mid", 4, 16),
               ("train-selective", "mid", 4, 16), ("sample", "small", 8, 16)])


def rss_child(args):
    """Hidden entry point: one side's FIRST training step in this fresh process; prints its RSS growth as JSON."""
    device = torch.device(args.device)
    cfg = BENCH_CONFIGS[args.rss_config]
    side = args.rss_child
    models = build_pair(cfg, device=device, sides=(side,))  # diffusers' weights come from ours either way
    model = models.pop(side).train()
    if side == "ours":
        model.set_recompute(args.rss_checkpointing)
    names = trainable_names(model)
    inputs = train_inputs(cfg, args.rss_frames, args.rss_hw, device)
    step, params = train_step_fn(model, side, names, inputs, device, weights.autocast_dtype(args.precision))
    gc.collect()
    reset = reset_rss_peak()  # forget the high-water mark of imports and model building
    before = rss_now_bytes()
    step()
    print(json.dumps({"rss_delta": rss_peak_bytes() - before, "hwm_reset": reset,
                      "adam_state": 8 * sum(p.numel() for p in params)}))


def measure_rss(side: str, config: str, frames: int, hw: int, args, checkpointing: str = "none") -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", side, "--rss-config", config,
           "--rss-frames", str(frames), "--rss-hw", str(hw), "--threads", str(args.threads), "--device", args.device,
           "--precision", args.precision, "--rss-checkpointing", checkpointing]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        print(f"warning: RSS subprocess for {side} failed:\n{run.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def step_memory(fns: dict, config: str, frames: int, hw: int, device, args, checkpointing: str = "none") -> dict:
    """(4) for a train case that has just been timed (so AdamW state is resident and gradients are None): allocator
    peak of one more step per side, here; then, on CPU, the RSS growth of a first step, each side in a fresh process."""
    out = {}
    for s in SIDES:
        gc.collect()
        out[f"alloc_{s}"] = allocator_peak(fns[s], device)
    if device.type == "cpu" and not args.no_rss:
        for s in SIDES:
            r = measure_rss(s, config, frames, hw, args, checkpointing)
            out[f"rss_{s}"] = None if r is None else r["rss_delta"]
            if r is not None:
                out["hwm_reset"], out["adam_state"] = r["hwm_reset"], r["adam_state"]
    return out


def run_case(section: str, config: str, frames: int, hw: int, device, amp, args, pairs: dict) -> dict:
    cfg = BENCH_CONFIGS[config]
    if config not in pairs:
        pairs.clear()  # one config's models at a time
        gc.collect()
        pairs[config] = build_pair(cfg, device=device)
    make = {"forward": forward_case, "train": train_case, "sample": sampling_case,
            "train-selective": functools.partial(train_case, ours_checkpointing="selective")}[section]
    t0 = time.perf_counter()
    case = make(pairs[config], cfg, frames, hw, device, amp)
    parity_s = time.perf_counter() - t0
    print(f"{section} {config} {frames} frames: parity {case['diff']:.1e}; timing...", flush=True)
    # the parity check ran each side's timed call once (forward, sample): for calls of seconds that is the warm-up
    warm = not section.startswith("train") and parity_s > 4.0
    times = race(case["fns"], device, warmup=0 if warm else args.warmup, reps=args.reps, budget=args.budget,
                 per_rep=parity_s if warm else None)
    row = {"section": section, "config": config, "shape": case["shape"], "diff": case["diff"],
           "flops": {s: meta_flops(cfg, s, case["shape"], section.split("-")[0]) for s in SIDES}, **summarize(times)}
    print(f"  ours {1e3 * row['ours'][1]:.1f} ms, diffusers {1e3 * row['diffusers'][1]:.1f} ms, "
          f"ratio {row['ratio'][1]:.3f} ({row['reps']} reps)", flush=True)
    if section.startswith("train"):
        print("  peak memory of one step...", flush=True)
        ckpt = "selective" if section == "train-selective" else "none"
        row["memory"] = {"trainable": case["trainable"], "ours": "selective recompute" if ckpt == "selective" else
                         "no recompute", **step_memory(case["fns"], config, frames, hw, device, args, ckpt)}
        if ckpt == "none":
            print("  where the time goes (profiler)...", flush=True)
            row["breakdown"] = {s: time_breakdown(case["fns"][s], device) for s in SIDES}
    return row


def machine_info(args, device) -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch.__version__,
            "diffusers": diffusers_module().__version__, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(), "cpu": machine_cpu(), "cores": os.cpu_count(),
            "precision": args.precision, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp's default)")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _time(q) -> str:
    if q[1] >= 10:
        return f"{q[1]:.2f} s ({q[0]:.2f}–{q[2]:.2f})"
    return f"{1e3 * q[1]:.1f} ({1e3 * q[0]:.0f}–{1e3 * q[2]:.0f})"


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2 ** 20:.1f}"


WHAT = {"forward": "UNet forward (eval, no_grad)", "train": "NewMove train step (fwd+loss+bwd+clip+AdamW)",
        "train-selective": "same step, ours with selective recompute (train.py --checkpointing selective)",
        "sample": "25-step DDIM, CFG 9, + VAE decode (tiny VAE)"}


def render(rows: list, info: dict, load: tuple, command: str, elapsed: float) -> str:
    load_note = (f"Load average (1 min) at start {load[0]:.2f}, at end {load[1]:.2f}; threads used by this benchmark: "
                 f"{info['threads']}.")
    if load[0] > 0.5:  # something else was running when we started
        load_note += (f" **The CPU was shared**: other processes kept about {load[0]:.1f} cores busy before it "
                      "started, so absolute times are inflated and noisy; the ratios, measured interleaved, are the "
                      "meaningful part.")
    lines = [
        "# Benchmark: ours vs diffusers, side by side", "",
        f"`{command}` — {info['date']}, {elapsed / 60:.1f} min. torch {info['torch']}, diffusers {info['diffusers']}, "
        f"Python {info['python']}; device {info['device']}{' (' + info['gpu'] + ')' if 'gpu' in info else ''}, "
        f"threads: {info['threads']}, OMP_WAIT_POLICY {info['omp_wait_policy']}; CPU: {info['cpu']} ({info['cores']} "
        f"logical cores); precision {info['precision']}.",
        "", load_note, "",
        "Ratio = ours / diffusers per interleaved repetition (median, p25–p75); < 1 means ours is faster. Times in ms "
        "(or s): median (p25–p75). GFLOP = matmul + conv FLOPs per call (FlopCounterMode on the meta device, "
        "attention counted as its bmm's). Max rel diff = max |ours − diffusers| / max |diffusers| of the outputs "
        "(train: of the trainable tensors' gradients, dropout off; sample: of the decoded videos) on the identical "
        "weights and inputs.", "",
        "| case | config | B×F×H×W | GFLOP ours / diffusers | ours | diffusers | ratio | reps | max rel diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fl = f"{r['flops']['ours'] / 1e9:.2f} / {r['flops']['diffusers'] / 1e9:.2f}"
        ratio = f"**{r['ratio'][1]:.3f}** ({r['ratio'][0]:.3f}–{r['ratio'][2]:.3f})"
        lines.append(f"| {WHAT[r['section']]} | {r['config']} | {'×'.join(map(str, r['shape']))} | {fl} | "
                     f"{_time(r['ours'])} | {_time(r['diffusers'])} | {ratio} | {r['reps']} | {r['diff']:.1e} |")
    mem = [r for r in rows if "memory" in r]
    if mem:
        lines += ["", "Peak memory of one NewMove training step, MiB (methods below).", "",
                  "| config | B×F×H×W | ours | trainable params | allocator peak: ours | diffusers | ratio | "
                  "RSS growth of a first step: ours | diffusers |", "|---|---|---|---|---|---|---|---|---|"]
        for r in mem:
            m = r["memory"]
            ratio = m["alloc_ours"] / m["alloc_diffusers"] if m["alloc_diffusers"] else float("nan")
            lines.append(f"| {r['config']} | {'×'.join(map(str, r['shape']))} | {m['ours']} | {m['trainable']:,} | "
                         f"{_mib(m['alloc_ours'])} | {_mib(m['alloc_diffusers'])} | **{ratio:.3f}** | "
                         f"{_mib(m.get('rss_ours'))} | {_mib(m.get('rss_diffusers'))} |")
    prof = [r for r in rows if "breakdown" in r]
    if prof:
        lines += ["", "Where a NewMove training step's time goes: seconds per step under the torch profiler (self times of "
                  "the ops, 2 steps per side; the profiler's own overhead inflates the many small ops somewhat). "
                  "Kernels = matmuls, convolutions and attention (`compare.KERNEL_OPS`): the ops that do the counted "
                  "FLOPs, the same library calls on both sides. Floor = ours' kernel time / diffusers' total: the ratio "
                  "ours would reach if everything outside those kernels cost nothing.", "",
                  "| config | B×F×H×W | ours: kernels | rest | diffusers: kernels | rest | kernel share (diffusers) | "
                  "floor |", "|---|---|---|---|---|---|---|---|"]
        for r in prof:
            o, d = r["breakdown"]["ours"], r["breakdown"]["diffusers"]
            lines.append(f"| {r['config']} | {'×'.join(map(str, r['shape']))} | {o['kernel']:.3f} | "
                         f"{o['total'] - o['kernel']:.3f} | {d['kernel']:.3f} | {d['total'] - d['kernel']:.3f} | "
                         f"{d['kernel'] / d['total']:.0%} | **{o['kernel'] / d['total']:.3f}** |")
    cfgs = "; ".join(f"**{k}**: block_out_channels {c.block_out_channels}, transformers at levels "
                     f"{c.cross_attn_levels} (+ middle), layers_per_block {c.layers_per_block}, head dim {c.head_dim}, "
                     f"text dim {c.cross_attention_dim}, {c.norm_num_groups} groups, "
                     f"{sum(p.numel() for p in meta_model(c).parameters()):,} params" for k, c in BENCH_CONFIGS.items())
    lines += ["", "## Configs and methods", "", f"Configs: {cfgs}. Text context: {TEXT_LEN} tokens.", "",
              "* One process; both models built once per config. Ours gets random weights (nothing zero-initialised); "
              "diffusers' `UNet3DConditionModel(**layouts.unet_config_to_diffusers(cfg))` loads our state dict with "
              "`strict=True`. Each case's parity check is also each side's first run; then warm-up runs; then the "
              "timed repetitions, alternating the order (ours, diffusers / diffusers, ours).",
              "* Train step: train.py's `select_trainable(model, 'newmove')` selects the trainable tensors by name in "
              "both models (`requires_grad_(False)` on the rest); batch 2 = 1 instance + 1 reg clip; "
              "`train.newmove_loss` (lambda 0.5) and `train.optimizer_step`: clip 1.0; AdamW lr 5e-6, wd 0.01 (foreach on CPU, fused on CUDA, as "
              "train.py); `train()` mode with dropout, the same seed before each side's step.",
              "* Selective recompute (`UNet3D.set_recompute('selective')`, train.py "
              "`--checkpointing selective`): each layer runs under torch's selective activation "
              "checkpointing; outputs of matmuls, convolutions and attention kernels are kept, the element-wise work "
              "between them (norms, activations, dropout, adds, copies) is recomputed in backward. Same gradients "
              "(tests/test_unet3d.py). diffusers' UNet3D has nothing comparable to turn on.",
              "* Sampling: ours = `sample.sample_ddim` with batched guidance as `sample.generate` runs it; diffusers = "
              "`DDIMScheduler` with the released scheduler config, `set_timesteps(25)`, `step()` per step; then every frame "
              "decoded by vae.py / diffusers' `AutoencoderKL` (tiny preset, identical weights via save_pretrained).",
              "* Allocator peak: one steady-state step (AdamW state resident, gradients None at its start) under the "
              "torch profiler with `profile_memory=True`; the running sum of its CPU-allocator events peaks at the "
              "step's extra memory: activations, gradients, optimizer temporaries (CUDA: `max_memory_allocated`). "
              "RSS growth: each side's first step in a fresh subprocess, VmHWM (reset through /proc/self/clear_refs "
              "just before the step) minus VmRSS before it; it includes the AdamW state that first step allocates "
              "(8 B per trainable parameter) and malloc's own caching.",
              ""]
    return "\n".join(lines)


def side_by_side(args) -> list:
    device = torch.device(args.device)
    amp = weights.autocast_dtype(args.precision)
    info = machine_info(args, device)  # also fails early, with a clear message, without diffusers
    load0, t0 = os.getloadavg()[0], time.time()
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    if device.type == "cpu" and args.threads > 1 and not passive and load0 + args.threads > (os.cpu_count() or 1) + 0.5:
        # every parallel op waits for its slowest thread, and OpenMP's default busy-waiting burns the core that the
        # other thread needs: measured on a 2-core machine next to a training job, a forward took 4.9 s with 2
        # threads, 0.14 s with 1, 0.17 s with 2 and OMP_WAIT_POLICY=PASSIVE (this script's default unless set)
        print(f"warning: load average {load0:.1f} on {os.cpu_count()} cores: {args.threads} threads will wait on each "
              f"other; while other work runs use OMP_WAIT_POLICY=PASSIVE or --threads 1", file=sys.stderr)
    rows, pairs = [], {}
    for section, config, frames, hw in case_plan(args.quick):
        rows.append(run_case(section, config, frames, hw, device, amp, args, pairs))
    command = ("python benchmarks/bench.py " + " ".join(sys.argv[1:])).strip()
    text = render(rows, info, (load0, os.getloadavg()[0]), command, time.time() - t0)
    print("\n" + text)
    if args.out:
        path = Path(args.out) / ("results_quick.md" if args.quick else "results.md")
        write_atomic(path, text)
        print(f"wrote {path}")
    return rows


# -----------------------------------------------------------------------------------------------------------------------
# command line (harness.parse_args: the options of all three files)


def main(argv=None):
    """The side-by-side run (or its --rss-child subprocess); --estimate and --full-size go to estimate.py's main."""
    args = parse_args(argv)
    if args.estimate or args.full_size:  # a direct run of this file: bench.py sends them to estimate.py itself
        return estimate_main(argv)
    start(args)
    if args.precision == "auto":
        args.precision = "fp32"
    if args.rss_child:
        return rss_child(args)
    return side_by_side(args)


if __name__ == "__main__":
    main()
