"""The memory/FLOP budget estimator (--estimate) and the full-size 1.7B check (--full-size); what compare.py shares.

    python benchmarks/bench.py --estimate --preset modelscope-1.7b --frames 16 --size 256 --batch 2 --checkpointing selective
    python benchmarks/bench.py --estimate --optimizer adamw8bit --free-grads --size 384 --checkpointing full
    python benchmarks/bench.py --estimate --table --checkpointing full   # each memory option, 256^2/384^2, 1+1/2+2
    python benchmarks/bench.py --full-size     # BY HAND, never in CI: one 1.7B training step on CPU (~15 GB RAM, see below)
    python benchmarks/bench.py --full-size --precision fp32    # the same with fp32 frozen weights: fast on CPUs without bf16

bench.py sends --estimate and --full-size here (python benchmarks/estimate.py runs the same; with neither flag it
estimates). What this file and the side-by-side comparison (compare.py) both need (the models with
random weights, the training step, the FLOP counter, the allocator and RSS peaks, the command line) is in harness.py.

--estimate: parameter counts (total / trainable / frozen), FLOPs per forward and per training step, and a GPU memory
budget for one configuration, all on the meta device (no weights, seconds even for 1.7B):
  * FLOPs: FlopCounterMode (matmuls and convolutions; no norms or element-wise ops). It has no formula for the CPU
    flash-attention op and would count its attention as 0, so formulas are registered for it (custom_mapping) that
    count what the math/bmm path counts: forward q k^T and P v, backward the four gradient bmm's. That is the method of
    performance.md §2 (verified equal to a run under SDPBackend.MATH), so the numbers compare with its table.
  * activations: a TorchDispatchMode logs every storage an op creates (views and in-place results excluded) and a
    weakref finalizer logs its release, so the live bytes are known after every op of forward + backward; on meta,
    attention is routed to the CPU flash op, which has meta kernels, so no attention probabilities are kept (as with
    flash attention on a GPU). The meta run is float32; for bf16 autocast, float32 activations count half (real
    autocast keeps norm outputs in float32, so expect somewhat more) and gradients stay float32. Not included: one
    op's internal workspace, allocator fragmentation, the CUDA context. Checked against real CPU runs (the
    cross-check below): toy preset, fp32, with no, selective and full checkpointing, within 0.5 % of the allocator's
    peak (tests/test_bench.py asserts 2 %).
  * static: trainable weights fp32 (master), frozen weights in --frozen-dtype, AdamW m and v fp32 (--optimizer adamw8bit:
    bitsandbytes' 8-bit state, optim.state_bytes); with bf16 autocast also its cached bf16 copies of the trainable
    weights (2 bytes each), which the matmul/conv nodes keep for backward. Except under full checkpointing: there
    the copies live in the forward (autocast's cache, cleared when train.py's autocast region exits) and, in
    backward, those of the trainable weights outside the checkpointed layers (transformer_in) and of one recomputed
    layer at a time (bounded by the largest), so the step term is max(forward peak + all copies, backward peak +
    those). Real CPU run, tiny preset, bf16, full checkpointing: 0.971 of that (0.860 of peak + all copies).
  * --free-grads (train.py's): each gradient is dropped in the trace as soon as it is complete, as the optimizer step
    per tensor in backward does; it lowers the peak only where the peak comes after gradients exist (with full
    checkpointing; without, the peak is at the start of backward). The cross-check runs that step for real.
  For the small presets it also runs the real step on this CPU and prints predicted vs measured (allocator) peak (in
  fp32 if this CPU emulates bf16); for modelscope-1.7b it checks the counts against performance.md, including
  diffusers' own UNet counted the same way on the meta device.

--full-size: the released 1.7B UNet (unet3d.UNET_PRESETS["modelscope-1.7b"]) with random weights, built on the meta
device and materialised tensor by tensor in its final dtype (frozen bf16, NewMove-trainable fp32: no fp32 copy of all
1.4B), gradient checkpointing on, bf16 autocast as train.py --precision bf16 --frozen-dtype bf16 does, one training
step at 8 frames x 256x256 (32x32 latents), batch 1 instance + 1 reg, on CPU. Records time, the allocator peak and the
resident-set peak next to the estimator's prediction; appends to benchmarks/full_size.md. It first prints the expected
duration from this CPU's matmul speed: CPUs without native bf16 (no AVX512-BF16 / AMX; e.g. AVX2-only) emulate bf16
matmuls ~50-100x slower than fp32, which makes the bf16 step take hours; --precision fp32 (frozen weights fp32 too,
+1.7 GB) is then the practical choice.

diffusers is a test/benchmark oracle (requirements-test.txt): it is imported inside functions, here only by the
1.7B count check against performance.md (and by compare.py's side-by-side run), never by our modules.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`: the repository root
    import omp  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    omp.choose_wait_policy()

import harness  # noqa: F401

import datetime
import gc
import math
import os
import time

import torch

import delta
import optim
import sample
import train
import weights
from unet3d import UNET_PRESETS, Level, UNet3D, UNet3DConfig
from wan_dit import WanDiT, WanDiTConfig
from harness import (PERF_MD, TEXT_LEN, allocator_peak, machine_cpu, meta_flops, meta_model,
                     parse_args, random_value, randomize_, reset_rss_peak, rss_now_bytes, rss_peak_bytes,
                     set_trainable, start, trace_step, train_inputs, train_step_fn, trainable_names, write_atomic)

# -----------------------------------------------------------------------------------------------------------------------
# the estimator


def count_params(cfg: UNet3DConfig, train_preset: str) -> dict:
    m = meta_model(cfg)
    names = set(trainable_names(m, train_preset))
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for n, p in m.named_parameters() if n in names)
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "tensors": len(names)}


def estimate(cfg: UNet3DConfig, batch: int, frames: int, size: int, train_preset: str = "newmove",
             checkpointing: str = "none", precision: str = "bf16", frozen_dtype: str = "bf16", optimizer: str = "adamw",
             free_grads: bool = False, flops: bool = True) -> dict:
    """Params, FLOPs and the memory budget of one training step, on the meta device, with train.py's memory options
    --optimizer (the state's bytes, optim.state_bytes) and --free-grads (each gradient dropped once complete)."""
    hw = size // 8  # the VAE's factor
    counts = count_params(cfg, train_preset)
    m = meta_model(cfg)
    m.set_recompute(checkpointing)
    names = trainable_names(m, train_preset)
    x = torch.empty(batch, cfg.in_channels, frames, hw, hw, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    ctx = torch.empty(batch, TEXT_LEN, cfg.cross_attention_dim, device="meta")
    mem = trace_step(m, names, x, t, ctx, amp_scale=0.5 if precision != "fp32" else 1.0, free_grads=free_grads,
                     flops=flops)
    units = [unit for level in m.modules() if isinstance(level, Level) for group in level.children() for unit in group]
    return budget(m, names, counts, mem, units, checkpointing, precision, frozen_dtype, optimizer, free_grads)


def estimate_wan(cfg: WanDiTConfig, batch: int, frames: int, height: int, width: int,
                 train_preset: str = "dit-newmove", checkpointing: str = "none", precision: str = "bf16",
                 frozen_dtype: str = "bf16", optimizer: str = "adamw", free_grads: bool = False,
                 flops: bool = True) -> dict:
    """The same for the Wan 2.1 DiT: `frames` x height x width pixels become 1 + (frames - 1) / 4 latent frames of
    (height / 8) x (width / 8) (the Wan VAE's factors), prompts the full text_len context; checkpointing none or full
    (each block recomputed in backward, WanDiT.set_checkpointing)."""
    if checkpointing not in ("none", "full"):
        raise ValueError(f"--checkpointing {checkpointing}: the DiT has none or full (every block)")
    with torch.device("meta"):
        m = WanDiT(cfg)
    m.set_checkpointing(checkpointing == "full")
    names = [n for n, _ in train.select_trainable(m, train_preset)]
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(m.get_parameter(n).numel() for n in names)
    counts = {"total": total, "trainable": trainable, "frozen": total - trainable, "tensors": len(names)}
    x = torch.empty(batch, cfg.in_dim, 1 + (frames - 1) // 4, height // 8, width // 8, device="meta")
    t = torch.zeros(batch, device="meta")
    ctx = torch.empty(batch, cfg.text_len, cfg.text_dim, device="meta")
    mem = trace_step(m, names, x, t, ctx, amp_scale=0.5 if precision != "fp32" else 1.0, free_grads=free_grads,
                     flops=flops)
    return budget(m, names, counts, mem, list(m.blocks), checkpointing, precision, frozen_dtype, optimizer, free_grads)


def budget(m, names: list, counts: dict, mem: dict, units: list, checkpointing: str, precision: str,
           frozen_dtype: str, optimizer: str, free_grads: bool) -> dict:
    """The budget's terms from a traced step: weights, optimizer state, autocast's weight copies and the step peak.
    `units`: the layers full checkpointing recomputes one at a time."""
    bf16 = precision != "fp32"
    frozen_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}[frozen_dtype]
    state = optim.state_bytes(optimizer, [m.get_parameter(n).shape for n in names])
    budget = {
        f"trainable weights, fp32 ({counts['trainable']:,} x 4 B)": 4 * counts["trainable"],
        f"frozen weights, {frozen_dtype} ({counts['frozen']:,} x {frozen_bytes} B)": frozen_bytes * counts["frozen"],
        {"adamw": "AdamW m + v, fp32 (8 B per trainable param)",
         "adamw8bit": f"8-bit AdamW m + v ({state / counts['trainable']:.2f} B per trainable param: codes, block "
                      f"scales, fp32 for tensors < 4096 values)"}[optimizer]: state,
    }
    step = ("step peak: activations + gradients + transients (traced" if not free_grads else
            "step peak: activations + the gradients not yet consumed + transients (traced, --free-grads")
    cache = 2 * counts["trainable"] if bf16 else 0  # autocast's bf16 copy of each trainable weight, 2 B a value
    if bf16 and checkpointing == "full":
        # full checkpointing: the copies are cached while the forward runs (the cache is cleared when train.py's
        # autocast region around the model exits); in backward each checkpointed layer re-casts its own under its own
        # autocast region, kept by its recomputed graph until its backward is done. Outside those layers (the UNet's
        # transformer_in) the copies are saved for backward as usual.
        copies = {"forward": mem["forward_peak"], "all copies": cache, "backward": mem["backward_peak"],
                  "copies held in backward": 2 * copies_in_backward(m, names, units)}
        budget[f"{step}) + autocast's bf16 weight copies where they live: max(forward + all copies, backward + "
               f"copies held in backward)"] = max(
            mem["forward_peak"] + cache, mem["backward_peak"] + copies["copies held in backward"])
        cache = 0
    else:  # without checkpointing or with selective, matmul/conv nodes keep the copies for backward: resident
        if bf16:
            budget["autocast's cached bf16 copies of the trainable weights (2 B each; kept for backward)"] = cache
        budget[step + ")"] = mem["peak"]
    step_bytes = list(budget.values())[-1]
    return {"counts": counts, "fwd_flops": mem["fwd_flops"], "step_flops": mem["step_flops"], "memory": mem,
            "budget": budget, "optimizer_state": state, "shapes": [m.get_parameter(n).shape for n in names],
            "step": step_bytes, "in_step": step_bytes + cache, "total": sum(budget.values()),
            "copies": copies if bf16 and checkpointing == "full" else None}


def copies_in_backward(model, names: list, units: list) -> int:
    """Trainable values whose autocast copies can be alive at once in backward under full checkpointing: those outside
    every checkpointed layer (their copies are saved for backward as usual) + those of the largest one of `units`
    (the UNet's Level._run calls: a ResBlock, TemporalConv, transformer or resampler; the DiT's blocks), recomputed
    one after the other."""
    trainable = {id(model.get_parameter(n)) for n in names}
    per_unit = [{id(p): p.numel() for p in u.parameters() if id(p) in trainable} for u in units]
    inside = set().union(*per_unit)
    outside = sum(model.get_parameter(n).numel() for n in names if id(model.get_parameter(n)) not in inside)
    return outside + max(sum(u.values()) for u in per_unit)


# train.py's memory options, as the table and benchmarks/gpu_check.py run them: (--optimizer, --free-grads)
OPTIONS = {"adamw": ("adamw", False), "adamw8bit": ("adamw8bit", False), "free-grads": ("adamw", True),
           "adamw8bit+free-grads": ("adamw8bit", True)}


def option_budgets(cfg, batch: int, frames: int, size, train_preset: str, checkpointing, precision: str,
                   frozen_dtype: str) -> dict:
    """{option: {"static", "peak", "total"} bytes} for each of OPTIONS: two traces (gradients kept or freed); the
    optimizer state is swapped by count (it is not in the traced step). `size`: the UNet's square side, or (height,
    width) for a WanDiTConfig."""
    def trace(free_grads):
        if isinstance(cfg, WanDiTConfig):
            return estimate_wan(cfg, batch, frames, *size, train_preset, checkpointing, precision, frozen_dtype,
                                free_grads=free_grads, flops=False)
        return estimate(cfg, batch, frames, size, train_preset, checkpointing, precision, frozen_dtype,
                        free_grads=free_grads, flops=False)

    traces = {fg: trace(fg) for fg in (False, True)}
    out = {}
    for name, (kind, fg) in OPTIONS.items():
        e = traces[fg]
        total = e["total"] - e["optimizer_state"] + optim.state_bytes(kind, e["shapes"])
        out[name] = {"peak": e["step"], "static": total - e["step"], "total": total}
    return out


def print_table(args, precision: str, frozen: str):
    """--table: the GPU budget of each memory option at 256^2 and 384^2, batch 1+1 and 2+2 (docs/memory.md)."""
    cfg, frames, GB = UNET_PRESETS[args.preset], args.frames or 16, 1e9
    print(f"GPU memory budget per train.py memory option: UNet3D {args.preset}, {frames} frames, precision "
          f"{precision}, frozen weights {frozen}, checkpointing {args.checkpointing} (GB = 1e9 B; + CUDA context "
          f"~0.5-1 GB and fragmentation)\n")
    full = args.checkpointing == "full" and precision != "fp32"  # the autocast copies go with the step, not the static
    print(f"| size | batch | option | weights + optimizer state{'' if full else ' + autocast cache'} | step peak "
          f"(traced{' + autocast copies where they live' if full else ''}) | total |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in (256, 384):
        for batch in (2, 4):
            t0 = time.time()
            for name, b in option_budgets(cfg, batch, frames, size, args.train_preset, args.checkpointing, precision,
                                          frozen).items():
                print(f"| {size}² | {batch // 2}+{batch // 2} | {name} | {b['static'] / GB:.2f} | {b['peak'] / GB:.2f} | "
                      f"{b['total'] / GB:.2f} |", flush=True)
            print(f"(traced in {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


def real_step_peak(cfg: UNet3DConfig, batch: int, frames: int, size: int, train_preset: str, checkpointing: str,
                   precision: str, frozen_dtype: str, free_grads: bool = False, optimizer: str = "adamw") -> dict:
    """The same step really run on this CPU (as train.py: frozen weights cast, autocast): allocator peak and time.
    With free_grads, as train.py --free-grads: each tensor's `optimizer` step in backward, its gradient freed there
    (the warm-up step makes the optimizer state, so the measured step holds only the update's temporaries)."""
    hw = size // 8
    model = randomize_(UNet3D(cfg), seed=0)
    names = trainable_names(model, train_preset)
    dtype = weights.DTYPES[frozen_dtype]
    keep = set(names)
    for n, p in model.named_parameters():
        if n not in keep:
            p.data = p.data.to(dtype)
    params = set_trainable(model, names)
    if free_grads:
        cpu = torch.device("cpu")
        optim.StepInBackward(params, lambda ps: optim.make_adamw(optimizer, ps, 1e-6, 0.01, cpu)).armed = True
    model.set_recompute(checkpointing)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, frames, hw, hw, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, TEXT_LEN, cfg.cross_attention_dim, generator=g)
    amp = weights.autocast_dtype(precision)

    def step():
        with sample.autocast(torch.device("cpu"), amp):
            out = model(x, t, ctx)
        out.float().square().mean().backward()
        for p in model.parameters():
            p.grad = None

    step()  # warm-up
    seen = {}

    def timed_step():
        t0 = time.perf_counter()
        step()
        seen["seconds"] = time.perf_counter() - t0

    return {"peak": allocator_peak(timed_step, torch.device("cpu")), "seconds": seen["seconds"]}


WAN_PRESET = "wan2.1-1.3b"  # --preset: the Wan 2.1 T2V 1.3B DiT (wan_dit.WanDiTConfig's defaults)


def print_wan(args, precision: str, frozen: str):
    """--preset wan2.1-1.3b: the DiT's training step (one clip of --frames x --height x --width, default the release's
    81 x 480 x 832), or with --table each memory option at 81 and 33 frames, batch 1 and 2."""
    cfg, GB = WanDiTConfig(), 1e9
    train_preset = args.train_preset if args.train_preset.startswith("dit-") else "dit-newmove"
    if args.table:
        print(f"GPU memory budget per train.py memory option: Wan 2.1 T2V 1.3B DiT, train preset {train_preset}, "
              f"{args.height}x{args.width} px, precision {precision}, frozen weights {frozen}, checkpointing "
              f"{args.checkpointing} (GB = 1e9 B; + CUDA context ~0.5-1 GB and fragmentation; umT5 and the VAE are "
              f"not resident)\n")
        print("| frames | batch | option | weights + optimizer state | step peak (traced) | total |")
        print("| --- | --- | --- | --- | --- | --- |")
        for frames in (81, 33):
            for batch in (1, 2):
                for name, b in option_budgets(cfg, batch, frames, (args.height, args.width), train_preset,
                                              args.checkpointing, precision, frozen).items():
                    print(f"| {frames} | {batch} | {name} | {b['static'] / GB:.2f} | {b['peak'] / GB:.2f} | "
                          f"{b['total'] / GB:.2f} |", flush=True)
        return
    frames, t0 = args.frames or 81, time.time()
    e = estimate_wan(cfg, args.batch, frames, args.height, args.width, train_preset, args.checkpointing, precision,
                     frozen, args.optimizer, args.free_grads)
    c = e["counts"]
    lat = (1 + (frames - 1) // 4, args.height // 8, args.width // 8)
    tokens = lat[0] * (lat[1] // 2) * (lat[2] // 2)
    print(f"Wan 2.1 T2V 1.3B DiT, train preset {train_preset}; batch {args.batch}, {frames} frames, {args.height}x"
          f"{args.width} px ({lat[0]}x{lat[1]}x{lat[2]} latents, {tokens:,} tokens); checkpointing "
          f"{args.checkpointing}; precision {precision}, frozen weights {frozen}; --optimizer {args.optimizer}"
          f"{', --free-grads' if args.free_grads else ''}")
    print(f"\nparameters: total {c['total']:,}; trainable {c['trainable']:,} ({100 * c['trainable'] / c['total']:.1f} "
          f"%, {c['tensors']} tensors); frozen {c['frozen']:,}")
    print(f"\nFLOPs: forward {e['fwd_flops'] / 1e12:.1f} TFLOP, training step {e['step_flops'] / 1e12:.1f} TFLOP")
    print("\nGPU memory budget (GB = 1e9 B):")
    for k, v in e["budget"].items():
        print(f"  {v / GB:9.3f}  {k}")
    print(f"  {e['total'] / GB:9.3f}  total (+ CUDA context ~0.5-1 GB and allocator fragmentation; umT5 and the VAE "
          f"are not resident once the clips are encoded)")
    print(f"(meta-device estimate in {time.time() - t0:.1f} s)")


def print_estimate(args):
    precision = args.precision if args.precision != "auto" else "bf16"
    if args.preset == WAN_PRESET:
        return print_wan(args, precision, args.frozen_dtype or ("bf16" if precision == "bf16" else "fp32"))
    cfg = UNET_PRESETS[args.preset]
    frames, precision = args.frames or 16, args.precision if args.precision != "auto" else "bf16"
    frozen = args.frozen_dtype or ("bf16" if precision == "bf16" else "fp32")
    GB, GiB = 1e9, 2 ** 30
    if args.table:
        return print_table(args, precision, frozen)
    t0 = time.time()
    e = estimate(cfg, args.batch, frames, args.size, args.train_preset, args.checkpointing, precision, frozen,
                 args.optimizer, args.free_grads)
    c = e["counts"]
    print(f"UNet3D preset {args.preset}, train preset {args.train_preset}; batch {args.batch}, {frames} frames, "
          f"{args.size}x{args.size} px ({args.size // 8}x{args.size // 8} latents); checkpointing "
          f"{args.checkpointing}; precision {precision}, frozen weights {frozen}; --optimizer {args.optimizer}"
          f"{', --free-grads' if args.free_grads else ''}")
    share = 100 * c["trainable"] / c["total"]
    print(f"\nparameters: total {c['total']:,}; trainable {c['trainable']:,} ({share:.1f} %, {c['tensors']} tensors); "
          f"frozen {c['frozen']:,}")
    print("\nFLOPs (matmul + conv; attention counted as its bmm's, as performance.md §2):")
    print(f"  forward, batch {args.batch}: {e['fwd_flops'] / 1e12:.4f} TFLOP")
    print(f"  training step (forward + backward, grads for the trainable set"
          f"{', + checkpoint recompute' if args.checkpointing != 'none' else ''}): {e['step_flops'] / 1e12:.4f} TFLOP "
          f"({e['step_flops'] / e['fwd_flops']:.2f}x forward)")
    print(f"\nGPU memory budget (GB = 1e9 B; {'fused AdamW' if args.optimizer == 'adamw' else '8-bit AdamW'}"
          f"{', stepped per tensor in backward' if args.free_grads else ''}, no CPU offload):")
    for k, v in e["budget"].items():
        print(f"  {v / GB:9.3f}  {k}")
    mem = e["memory"]
    if e["copies"]:
        print("             (" + ", ".join(f"{k} {v / GB:.3f}" for k, v in e["copies"].items()) + "; held: those "
              "outside the checkpointed layers, of transformer_in, + those of the largest one)")
    print(f"  {e['total'] / GB:9.3f}  total (+ CUDA context ~0.5-1 GB and allocator fragmentation; the text encoder and "
          f"VAE are freed by train.py after caching)")
    print(f"  of the step peak: gradients {mem['grads'] / GB:.3f} GB; alive at the end of forward (saved activations + "
          f"output) {mem['end_of_forward'] / GiB:.3f} GiB")
    print(f"(meta-device estimate in {time.time() - t0:.1f} s)")

    if args.preset == "modelscope-1.7b":
        check_against_performance_md(cfg, args, e, precision)
    else:
        hw = args.size // 8
        if cfg.downsample_factor > hw:
            return
        cross, pred = precision, e["in_step"]
        if precision != "fp32" and matmul_gflops(weights.autocast_dtype(precision)) < 0.2 * matmul_gflops(torch.float32):
            # without native bf16 (AVX512-BF16 / AMX) the real run would take ages: check the fp32 prediction instead
            print(f"\n(this CPU ({torch.backends.cpu.get_cpu_capability()}) emulates {precision} matmuls far slower than "
                  f"fp32, so the cross-check runs in fp32)")
            cross, frozen = "fp32", "fp32"
            pred = estimate(cfg, args.batch, frames, args.size, args.train_preset, args.checkpointing, cross,
                            frozen, free_grads=args.free_grads)["in_step"]
        print(f"\ncross-check: the same step ({cross}) run for real on this CPU ({torch.get_num_threads()} threads)...")
        r = real_step_peak(cfg, args.batch, frames, args.size, args.train_preset, args.checkpointing, cross, frozen,
                           args.free_grads, args.optimizer)
        print(f"  fwd+bwd peak above the resident model: predicted {pred / 2 ** 20:.2f} MiB, measured (allocator) "
              f"{r['peak'] / 2 ** 20:.2f} MiB, measured / predicted {r['peak'] / pred:.3f}")
        print(f"  step time {r['seconds'] * 1e3:.0f} ms = {e['step_flops'] / r['seconds'] / 1e9:.1f} GFLOP/s on this CPU")
        if cross != "fp32":
            print("  (bf16: autocast keeps norm and softmax outputs in float32, so measured > predicted is expected)")


def check_against_performance_md(cfg, args, e, precision):
    c = e["counts"]
    print("\nchecks against performance.md (measured there on diffusers' UNet3DConditionModel):")
    ok = lambda b: "OK" if b else "MISMATCH"  # noqa: E731
    print(f"  params {c['total']:,} vs {PERF_MD['params']:,}: {ok(c['total'] == PERF_MD['params'])}")
    if args.train_preset == "newmove":
        same = c["trainable"] == PERF_MD["newmove"]
        print(f"  NewMove subset {c['trainable']:,} vs {PERF_MD['newmove']:,}: {ok(same)}")
    shape = (1, 16, 32, 32)
    ours = meta_flops(cfg, "ours", shape, "forward") / 1e12
    line = f"  forward B=1 16x32x32: ours {ours:.3f} TFLOP"
    try:
        theirs = meta_flops(cfg, "diffusers", shape, "forward") / 1e12
        line += (f", diffusers {theirs:.3f} TFLOP vs performance.md {PERF_MD['fwd_tflop_16x32x32']}: "
                 f"{ok(abs(theirs - PERF_MD['fwd_tflop_16x32x32']) < 5e-4)}")
    except SystemExit:
        line += " (diffusers not installed: its count not checked)"
    print(line + ";\n    ours is lower because cross-attention K/V are computed once per video, not once per frame "
          "(unet3d.py docstring)")
    key = (args.batch, args.frames or 16, args.size, args.checkpointing)
    ref = PERF_MD["saved_gib_bf16"].get(key)
    if ref is not None and precision == "bf16":
        print(f"  alive at the end of forward {e['memory']['end_of_forward'] / 2 ** 30:.2f} GiB vs performance.md's "
              f"{ref:.2f} GiB of saved activations (diffusers cast to bf16, attention probabilities subtracted; "
              f"{'per-sublayer checkpointing; ' if args.checkpointing == 'full' else ''}it counts saved tensors only, this "
              f"counts every live one, output and dropout masks included)")


# -----------------------------------------------------------------------------------------------------------------------
# the full-size check (by hand)


def materialize_(model: torch.nn.Module, trainable: set, frozen_dtype, seed: int = 0) -> torch.nn.Module:
    """Give a meta-device model random weights one tensor at a time, each allocated in its final dtype (trainable fp32,
    frozen `frozen_dtype`), so the whole model never exists in fp32 (1.4B params would be 5.6 GB)."""
    g = torch.Generator().manual_seed(seed)
    for prefix, mod in model.named_modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            dtype = torch.float32 if full in trainable else frozen_dtype
            mod._parameters[name] = torch.nn.Parameter(random_value(full, p.shape, dtype, g),
                                                       requires_grad=full in trainable)
    assert not any(b.is_meta for b in model.buffers()), "a buffer was left on the meta device"
    return model


def matmul_gflops(dtype, n: int = 256) -> float:
    """This CPU's matmul throughput in `dtype`: CPUs without native bf16 (no AVX512-BF16 / AMX) emulate it slowly."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def full_size(args):
    preset, precision = args.full_size_preset, "bf16" if args.precision == "auto" else args.precision
    cfg = UNET_PRESETS[preset]
    frames, hw = args.frames or 8, args.size // 8
    amp = weights.autocast_dtype(precision)
    frozen = "fp32" if amp is None else precision  # train.py: --frozen-dtype bf16 needs --precision bf16
    device = torch.device("cpu")
    setting = (f"batch 2 (1 instance + 1 reg), {frames} frames, {args.size}x{args.size} px ({hw}x{hw} latents), "
               f"frozen weights {frozen} + trainable fp32, {'autocast ' + precision if amp else 'no autocast'}, "
               f"gradient checkpointing on, "
               f"AdamW (foreach, as train.py on CPU)")
    print(f"full-size check: {preset}, one NewMove training step: {setting}; {torch.get_num_threads()} threads",
          flush=True)
    # what the estimator predicts for this very step, and how long it should take at this CPU's matmul speed
    e = estimate(cfg, 2, frames, args.size, "newmove", "full", precision, frozen)
    speed = matmul_gflops(amp or torch.float32)
    print(f"predicted: step {e['step_flops'] / 1e12:.2f} TFLOP; at this CPU's {precision} matmul speed "
          f"({speed:.1f} GFLOP/s) at least {_duration(e['step_flops'] / speed / 1e9)}"
          + (f" (bf16 is emulated here: fp32 runs {matmul_gflops(torch.float32):.0f} GFLOP/s; --precision fp32 keeps "
             f"the frozen weights in fp32 and is far faster)" if amp is not None and speed < 10 else ""), flush=True)

    t0 = time.perf_counter()
    m = meta_model(cfg)
    names = trainable_names(m)
    model = materialize_(m, set(names), weights.DTYPES[frozen])
    model.set_recompute("full")
    model.train()  # dropout on, as train.py
    build_s = time.perf_counter() - t0
    inputs = train_inputs(cfg, frames, hw, device)
    step, params = train_step_fn(model, "ours", names, inputs, device, amp)
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    hwm_reset = reset_rss_peak()
    rss0 = rss_now_bytes()
    print(f"built in {build_s:.0f} s: weights {resident / 1e9:.2f} GB, RSS {rss0 / 1e9:.2f} GB; running the step...",
          flush=True)
    seen = {}

    def run():
        t1 = time.perf_counter()
        step()
        seen["seconds"], seen["rss_peak"] = time.perf_counter() - t1, rss_peak_bytes()  # before the profiler's report

    alloc = allocator_peak(run, device)  # the step runs once, under the profiler's allocation log
    gib = lambda n: f"{n / 2 ** 30:.3f} GiB"  # noqa: E731
    adam = 8 * sum(p.numel() for p in params)
    rows = [("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
            ("command", "python benchmarks/bench.py " + " ".join(sys.argv[1:])),
            ("torch / threads / CPU", f"{torch.__version__} / {torch.get_num_threads()} / {machine_cpu()} "
                                      f"({torch.backends.cpu.get_cpu_capability()})"),
            ("config", f"{preset}: {sum(p.numel() for p in model.parameters()):,} params, "
                       f"{sum(p.numel() for p in params):,} trainable (NewMove)"),
            ("step", setting),
            ("build time (meta, then tensor by tensor)", f"{build_s:.1f} s"),
            ("step time (first step, under the allocation profiler)", f"{seen['seconds']:.1f} s "
             f"({e['step_flops'] / seen['seconds'] / 1e9:.1f} GFLOP/s)"),
            ("weights resident before the step", gib(resident)),
            ("RSS before the step", gib(rss0)),
            ("peak RSS" + ("" if hwm_reset else " (high-water mark not reset: may be the build's)"),
             gib(seen["rss_peak"])),
            ("peak RSS growth in the step", gib(seen["rss_peak"] - rss0)),
            ("allocator peak above the resident weights (measured)", gib(alloc)),
            ("predicted by --estimate: fwd+bwd peak (activations + grads) + autocast weight copies where they live",
             gib(e["in_step"])),
            ("AdamW state allocated by this first step (8 B per trainable param)", gib(adam)),
            ("load average at the end", f"{os.getloadavg()[0]:.2f}")]
    text = "\n".join([f"## {rows[0][1]}", "", "| quantity | value |", "|---|---|"]
                     + [f"| {k} | {v} |" for k, v in rows[1:]]) + "\n"
    print("\n" + text)
    if args.out:
        out = Path(args.out) / "full_size.md"
        head = ("# Full-size memory check (python benchmarks/bench.py --full-size, run by hand)\n\n"
                "The allocator peak is the highest running sum of PyTorch CPU-allocator events during the step (the "
                "profiler's profile_memory log), above the weights already resident; it includes the AdamW state the "
                "first step creates and the foreach optimizer's temporaries. RSS is the kernel's resident-set "
                "high-water mark (VmHWM, reset just before the step).\n")
        old = out.read_text() if out.exists() else head
        write_atomic(out, old.rstrip("\n") + "\n\n" + text)
        print(f"appended to {out}")


# -----------------------------------------------------------------------------------------------------------------------
# command line: harness.parse_args


def print_delta_sizes(args) -> int:
    """--delta-sizes: a customization's delta file (train.py --save-dtype, delta.py compress --rank) at each rank."""
    ranks = args.delta_sizes or [4, 16, 64, 256]
    ranks = sorted(set(ranks) - {0}) + [0]  # the whole delta last
    shapes = [tuple(p.shape) for _, p in train.select_trainable(meta_model(UNET_PRESETS[args.preset]), args.train_preset)]
    print(f"{args.train_preset} delta of {args.preset}: {len(shapes)} tensors, "
          f"{sum(math.prod(s) for s in shapes):,} values")
    print("| rank | " + " | ".join(str(r or "whole") for r in ranks) + " |\n| --- |" + " --- |" * len(ranks))
    for name, itemsize in (("fp32", 4), ("bf16", 2)):
        print(f"| {name} | " + " | ".join(f"{delta.file_bytes(shapes, r, itemsize) / 1e6:,.1f} MB" for r in ranks) + " |")
    return 0


def main(argv=None):
    """--estimate (also what a direct run without the flag does) or --full-size; --estimate wins if both are given."""
    args = start(parse_args(argv))
    if args.delta_sizes is not None:
        return print_delta_sizes(args)
    if args.full_size and not args.estimate:
        return full_size(args)
    return print_estimate(args)


if __name__ == "__main__":
    main()
