"""The memory/FLOP budget estimator (--estimate) and the full-size 1.7B check (--full-size); what compare.py shares.

    python benchmarks/bench.py --estimate --preset modelscope-1.7b --frames 16 --size 256 --batch 2 --checkpointing selective
    python benchmarks/bench.py --full-size     # BY HAND, never in CI: one 1.7B training step on CPU (~15 GB RAM, see below)
    python benchmarks/bench.py --full-size --precision fp32    # the same with fp32 frozen weights: fast on CPUs without bf16

bench.py sends --estimate and --full-size here (python benchmarks/estimate.py runs the same; with neither flag it
estimates). The side-by-side comparison (compare.py) imports from here what both need: the models with random weights,
train.py's trainable selection and training step, the FLOP counter, the allocator and RSS peaks, and the one command
line of all three files (parse_args).

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
  * static: trainable weights fp32 (master), frozen weights in --frozen-dtype, AdamW m and v fp32; with bf16 autocast
    also its cached bf16 copies of the trainable weights (2 bytes each).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: run as a script from anywhere
import omp  # noqa: E402, F401  (before torch loads OpenMP: the wait policy for this machine, omp.py)

import os
import argparse
import contextlib
import datetime
import gc
import math
import platform
import re
import resource
import time
import weakref

import torch
import torch.nn.functional as F


import sample
import train
import unet3d
import weights
from models import RELEASED_SCHEDULE
from unet3d import UNET_PRESETS, UNet3D, UNet3DConfig

ROOT = Path(__file__).resolve().parents[1]

SIDES = ("ours", "diffusers")
CALL = {"ours": lambda m, x, t, c: m(x, t, c),
        "diffusers": lambda m, x, t, c: m(x, t, c, return_dict=False)[0]}
TEXT_LEN = 77  # tokens of the text context, as the released text encoder gives
LOSS_W = train.loss_weights(1, 1, 0.5)  # 1 instance + 1 reg clip: L = MSE_inst + 0.5 MSE_reg

# performance.md numbers the estimator checks itself against (diffusers' UNet, B=1, 16 frames, 32x32 latents)
PERF_MD = {"params": 1_411_233_860, "newmove": 570_882_176, "fwd_tflop_16x32x32": 4.887,
           "saved_gib_bf16": {(1, 16, 256, False): 7.20, (1, 16, 256, True): 1.00, (2, 16, 256, False): 14.39}}


# -----------------------------------------------------------------------------------------------------------------------
# models and the training step: compare.py's side-by-side run builds and steps the same ones


def diffusers_module():
    """diffusers, or a clear exit: it is the reference this benchmark compares against, not a dependency of ours."""
    try:
        import diffusers
    except ImportError:
        raise SystemExit("error: the side-by-side benchmark needs diffusers as its reference: pip install -r "
                         "requirements-test.txt (bench.py --estimate works without it)") from None
    return diffusers


def random_value(name: str, shape, dtype, g: torch.Generator) -> torch.Tensor:
    """A random tensor for parameter `name`. Nothing stays zero: upstream zero-initialises proj_out and the last temporal
    conv, which would make outputs (and a parity check) blind to every layer behind them."""
    u = torch.rand(shape, generator=g, dtype=dtype).mul_(2).sub_(1)  # U(-1, 1)
    if len(shape) >= 2:
        return u.div_(math.sqrt(math.prod(shape[1:])))  # fan-in scaled: activations stay O(1) through the residuals
    return u.mul_(0.1).add_(1) if name.endswith("weight") else u.mul_(0.1)  # norm scales near 1, small biases


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(random_value(name, p.shape, p.dtype, g))
    return model


def diffusers_kwargs(cfg: UNet3DConfig) -> dict:
    return {k: v for k, v in unet3d.config_to_diffusers(cfg).items() if not k.startswith("_")}


def meta_model(cfg: UNet3DConfig, side: str = "ours"):
    with torch.device("meta"):
        if side == "ours":
            return UNet3D(cfg)
        return diffusers_module().UNet3DConditionModel(**diffusers_kwargs(cfg))


def trainable_names(model: torch.nn.Module, preset: str = "newmove") -> list:
    """The parameters train.py trains for `preset` (train.select_trainable; the names are shared with diffusers')."""
    return [n for n, _ in train.select_trainable(model, preset)]


def set_trainable(model: torch.nn.Module, names: list) -> list:
    """requires_grad only on `names` (frozen weights then get no weight-gradient GEMMs), as train.py does."""
    model.requires_grad_(False)
    params = [model.get_parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    return params


def amp_dtype(precision: str):
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, amp):
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_inputs(cfg: UNet3DConfig, frames: int, hw: int, device, seed: int = 0) -> dict:
    """One batch as train.py's loop builds it: 1 instance + 1 reg clip, coarse-noise timesteps, x_t = diffuse(x0, eps)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, cfg.in_channels, frames, hw, hw, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.multinomial(train.timestep_probs("coarse", 0.5), 2, replacement=True, generator=g)
    abar = sample.alphas_cumprod(RELEASED_SCHEDULE)
    ctx = torch.randn(2, TEXT_LEN, cfg.cross_attention_dim, generator=g)
    xt = train.diffuse(x0, eps, t, abar).float()
    return {k: v.to(device) for k, v in dict(xt=xt, eps=eps, t=t, ctx=ctx).items()}


def train_step_fn(model, side: str, names: list, inputs: dict, device, amp=None, seed: int = 0, lr: float = 5e-6):
    """One NewMove step on `model` as train.py runs it (autocast around the UNet only, loss in float32, clip, AdamW)."""
    params = set_trainable(model, names)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                            fused=device.type == "cuda")

    def step():
        torch.manual_seed(seed)  # the same dropout RNG stream for both sides
        with autocast(device, amp):
            eps_hat = CALL[side](model, inputs["xt"], inputs["t"], inputs["ctx"])
        loss = train.weighted_mse(eps_hat, inputs["eps"], LOSS_W)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, params


# -----------------------------------------------------------------------------------------------------------------------
# FLOPs and memory instruments (compare.py's GFLOP column and memory table use them too)


def _attention_flop_formulas() -> dict:
    """FLOP formulas for the CPU flash-attention ops, which FlopCounterMode does not know (it would count 0).

    They count what the math (bmm) path counts, as performance.md §2 does: forward q k^T and P v; backward the four
    gradient bmm's (dP, dV, dQ, dK), not flash's recomputation of q k^T. The counter passes shapes, not tensors."""
    aten = torch.ops.aten

    def forward(q, k, v, *args, out_val=None, **kwargs):
        (b, h, sq, d), sk, dv = q, k[-2], v[-1]
        return 2 * b * h * sq * sk * (d + dv)

    def backward(grad_out, q, k, v, *args, out_val=None, **kwargs):
        (b, h, sq, d), sk, dv = q, k[-2], v[-1]
        return 2 * b * h * sq * sk * (2 * dv + 2 * d)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention ops (and, under _flash_on_meta, meta attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_attention_flop_formulas())


def count_flops(fn) -> int:
    """Matmul + conv FLOPs of fn() (norms and element-wise ops are not counted)."""
    with _flash_on_meta(), flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def meta_flops(cfg: UNet3DConfig, side: str, shape: tuple, kind: str, steps: int = 25) -> int:
    """FLOPs of one case on a weightless meta copy: 'forward', 'train' (fwd + bwd, NewMove grads) or 'sample'."""
    B, frames, hw, _ = shape
    m = meta_model(cfg, side)
    x = torch.empty(B, cfg.in_channels, frames, hw, hw, device="meta")
    t = torch.zeros(B, dtype=torch.long, device="meta")
    ctx = torch.empty(B, TEXT_LEN, cfg.cross_attention_dim, device="meta")
    if kind == "train":
        set_trainable(m, trainable_names(m))
        return count_flops(lambda: CALL[side](m.train(), x, t, ctx).float().square().mean().backward())
    m.requires_grad_(False)
    per_call = count_flops(lambda: CALL[side](m.eval(), x, t, ctx))
    return per_call * (steps if kind == "sample" else 1)


def allocator_peak(fn, device) -> int:
    """Peak bytes allocated while fn() runs, above the level at its start: measured by the allocator, not estimated.

    CPU: the profiler logs each allocation/free of PyTorch's CPU allocator; the running sum of their sizes (negative for
    frees) in time order starts at 0 and its maximum is the peak. CUDA: the caching allocator's own peak counter."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    now = peak = 0
    for _, size in sorted(allocs, key=lambda a: a[0]):
        now += size
        peak = max(peak, now)
    return peak


def _proc_status_kb(field: str) -> int | None:
    try:
        return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))
    except (OSError, AttributeError):
        return None


def reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0), so the next peak belongs to what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    hwm = _proc_status_kb("VmHWM")
    return 1024 * (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def rss_now_bytes() -> int:
    kb = _proc_status_kb("VmRSS")
    return 1024 * kb if kb is not None else rss_peak_bytes()


def _storage_tracker():
    """A TorchDispatchMode that logs the storages ops create and (via weakref finalizers) release: live tensor bytes
    after every op, on any device including meta. Views and in-place results reuse an input's storage and are skipped."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class StorageTracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.events = []  # (allocation id, signed bytes, float32?) in order
            self.live = {}  # storage key -> (allocation id, bytes, float32?)
            self.marks = {}  # name -> index into events
            self.on = True

        def _free(self, key):
            if self.on and key in self.live:
                uid, n, fp32 = self.live.pop(key)
                self.events.append((uid, -n, fp32))

        def mark(self, name):
            self.marks[name] = len(self.events)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                key = st._cdata
                if key in inputs or key in self.live:
                    continue
                uid, fp32 = len(self.events), t.dtype == torch.float32
                self.live[key] = (uid, st.nbytes(), fp32)
                self.events.append((uid, st.nbytes(), fp32))
                weakref.finalize(st, self._free, key)
            return out

        def uid_of(self, t: torch.Tensor):
            entry = self.live.get(t.untyped_storage()._cdata)
            return None if entry is None else entry[0]

    return StorageTracker()


@contextlib.contextmanager
def _flash_on_meta():
    """Route scaled_dot_product_attention on the meta device to the CPU flash op (it has meta kernels), so a meta run
    keeps (q, k, v, out, logsumexp) for backward, as flash attention does, instead of the math path's probabilities.

    A patch of torch.nn.functional for the duration, not a TorchFunctionMode: checkpoint recomputation runs in the
    autograd engine's thread, which a (thread-local) mode would not reach, and must take the same path as forward."""
    original = F.scaled_dot_product_attention
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.device.type == "meta" and attn_mask is None and not dropout_p and not kw:
            return flash(q, k, v, is_causal=is_causal, scale=scale)[0]
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def trace_step(model, names: list, x, t, ctx, amp_scale: float = 1.0) -> dict:
    """Forward + loss + backward (grads start as None): its FLOPs, and its live-tensor bytes over time.

    amp_scale weights float32 activations (0.5 predicts bf16 autocast from a float32 meta run); the trainable
    weights' gradients always count in full (they are float32 under autocast). Returns FLOPs of the forward and of the
    whole step, the peak live bytes, the bytes alive at the end of forward (saved activations + output), the gradient
    bytes."""
    set_trainable(model, names)
    model.train()
    with _flash_on_meta(), flop_counter() as counter:
        loss = model(x, t, ctx).float().square().mean()
        fwd_flops = counter.get_total_flops()  # dropout and the loss add none: = an eval forward's FLOPs
        loss.backward()
    for p in model.parameters():
        p.grad = None
    # a second pass for memory: the counter's module hooks keep checkpoint-recomputed tensors alive for longer
    tracker = _storage_tracker()
    with _flash_on_meta(), tracker:
        loss = model(x, t, ctx).float().square().mean()
        tracker.mark("forward")
        loss.backward()
        grad_uids = {tracker.uid_of(model.get_parameter(n).grad) for n in names}
    tracker.on = False
    grad_bytes = sum(model.get_parameter(n).grad.untyped_storage().nbytes() for n in names)
    now = peak = 0.0
    at_forward = None
    for i, (uid, n, fp32) in enumerate(tracker.events):
        if i == tracker.marks["forward"]:
            at_forward = now
        now += n * (amp_scale if fp32 and uid not in grad_uids else 1.0)
        peak = max(peak, now)
    for p in model.parameters():
        p.grad = None
    return {"fwd_flops": fwd_flops, "step_flops": counter.get_total_flops(), "peak": peak,
            "end_of_forward": now if at_forward is None else at_forward, "grads": grad_bytes}


# -----------------------------------------------------------------------------------------------------------------------
# the estimator


def count_params(cfg: UNet3DConfig, train_preset: str) -> dict:
    m = meta_model(cfg)
    names = set(trainable_names(m, train_preset))
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for n, p in m.named_parameters() if n in names)
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "tensors": len(names)}


def estimate(cfg: UNet3DConfig, batch: int, frames: int, size: int, train_preset: str = "newmove",
             checkpointing: bool = False, precision: str = "bf16", frozen_dtype: str = "bf16") -> dict:
    """Params, FLOPs and the memory budget of one training step, on the meta device."""
    hw = size // 8  # the VAE's factor
    counts = count_params(cfg, train_preset)
    m = meta_model(cfg)
    m.set_gradient_checkpointing(checkpointing)
    names = trainable_names(m, train_preset)
    x = torch.empty(batch, cfg.in_channels, frames, hw, hw, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    ctx = torch.empty(batch, TEXT_LEN, cfg.cross_attention_dim, device="meta")
    bf16 = precision != "fp32"
    mem = trace_step(m, names, x, t, ctx, amp_scale=0.5 if bf16 else 1.0)
    frozen_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}[frozen_dtype]
    budget = {
        f"trainable weights, fp32 ({counts['trainable']:,} x 4 B)": 4 * counts["trainable"],
        f"frozen weights, {frozen_dtype} ({counts['frozen']:,} x {frozen_bytes} B)": frozen_bytes * counts["frozen"],
        "AdamW m + v, fp32 (8 B per trainable param)": 8 * counts["trainable"],
    }
    if bf16:
        budget["autocast's cached bf16 copies of the trainable weights (2 B each)"] = 2 * counts["trainable"]
    budget["step peak: activations + gradients + transients (traced)"] = mem["peak"]
    return {"counts": counts, "fwd_flops": mem["fwd_flops"], "step_flops": mem["step_flops"], "memory": mem,
            "budget": budget,
            "total": sum(budget.values())}


def real_step_peak(cfg: UNet3DConfig, batch: int, frames: int, size: int, train_preset: str, checkpointing: bool,
                   precision: str, frozen_dtype: str) -> dict:
    """The same step really run on this CPU (as train.py: frozen weights cast, autocast): allocator peak and time."""
    hw = size // 8
    model = randomize_(UNet3D(cfg), seed=0)
    names = trainable_names(model, train_preset)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[frozen_dtype]
    keep = set(names)
    for n, p in model.named_parameters():
        if n not in keep:
            p.data = p.data.to(dtype)
    set_trainable(model, names)
    model.set_gradient_checkpointing(checkpointing)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, frames, hw, hw, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, TEXT_LEN, cfg.cross_attention_dim, generator=g)
    amp = amp_dtype(precision)

    def step():
        with autocast(torch.device("cpu"), amp):
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


# --checkpointing / train.py --checkpointing -> UNet3D.set_gradient_checkpointing's argument
CHECKPOINTING = {"none": False, "selective": "selective", "full": True}


def print_estimate(args):
    cfg = UNET_PRESETS[args.preset]
    frames, precision = args.frames or 16, args.precision if args.precision != "auto" else "bf16"
    frozen = args.frozen_dtype or ("bf16" if precision == "bf16" else "fp32")
    GB, GiB = 1e9, 2 ** 30
    t0 = time.time()
    e = estimate(cfg, args.batch, frames, args.size, args.train_preset, args.checkpointing, precision, frozen)
    c = e["counts"]
    print(f"UNet3D preset {args.preset}, train preset {args.train_preset}; batch {args.batch}, {frames} frames, "
          f"{args.size}x{args.size} px ({args.size // 8}x{args.size // 8} latents); checkpointing "
          f"{args.checkpointing_name}; precision {precision}, frozen weights {frozen}")
    share = 100 * c["trainable"] / c["total"]
    print(f"\nparameters: total {c['total']:,}; trainable {c['trainable']:,} ({share:.1f} %, {c['tensors']} tensors); "
          f"frozen {c['frozen']:,}")
    print("\nFLOPs (matmul + conv; attention counted as its bmm's, as performance.md §2):")
    print(f"  forward, batch {args.batch}: {e['fwd_flops'] / 1e12:.4f} TFLOP")
    print(f"  training step (forward + backward, grads for the trainable set"
          f"{', + checkpoint recompute' if args.checkpointing else ''}): {e['step_flops'] / 1e12:.4f} TFLOP "
          f"({e['step_flops'] / e['fwd_flops']:.2f}x forward)")
    print("\nGPU memory budget (GB = 1e9 B; optimizer fused AdamW, no CPU offload):")
    for k, v in e["budget"].items():
        print(f"  {v / GB:9.3f}  {k}")
    mem = e["memory"]
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
        cross, pred = precision, mem["peak"]
        if precision != "fp32" and matmul_gflops(amp_dtype(precision)) < 0.2 * matmul_gflops(torch.float32):
            # without native bf16 (AVX512-BF16 / AMX) the real run would take ages: check the fp32 prediction instead
            print(f"\n(this CPU ({torch.backends.cpu.get_cpu_capability()}) emulates {precision} matmuls far slower than "
                  f"fp32, so the cross-check runs in fp32)")
            cross, frozen = "fp32", "fp32"
            pred = estimate(cfg, args.batch, frames, args.size, args.train_preset, args.checkpointing, cross,
                            frozen)["memory"]["peak"]
        print(f"\ncross-check: the same step ({cross}) run for real on this CPU ({torch.get_num_threads()} threads)...")
        r = real_step_peak(cfg, args.batch, frames, args.size, args.train_preset, args.checkpointing, cross, frozen)
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
              f"{'per-sublayer checkpointing; ' if args.checkpointing is True else ''}it counts saved tensors only, this "
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


def machine_cpu() -> str:
    try:
        return re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown"


def write_atomic(path: Path, text: str):
    weights.atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)  # no half-written file


def full_size(args):
    preset, precision = args.full_size_preset, "bf16" if args.precision == "auto" else args.precision
    cfg = UNET_PRESETS[preset]
    frames, hw = args.frames or 8, args.size // 8
    amp = amp_dtype(precision)
    frozen = "fp32" if amp is None else precision  # train.py: --frozen-dtype bf16 needs --precision bf16
    device = torch.device("cpu")
    setting = (f"batch 2 (1 instance + 1 reg), {frames} frames, {args.size}x{args.size} px ({hw}x{hw} latents), "
               f"frozen weights {frozen} + trainable fp32, {'autocast ' + precision if amp else 'no autocast'}, "
               f"gradient checkpointing on, "
               f"AdamW (foreach, as train.py on CPU)")
    print(f"full-size check: {preset}, one NewMove training step: {setting}; {torch.get_num_threads()} threads",
          flush=True)
    # what the estimator predicts for this very step, and how long it should take at this CPU's matmul speed
    e = estimate(cfg, 2, frames, args.size, "newmove", True, precision, frozen)
    speed = matmul_gflops(amp or torch.float32)
    print(f"predicted: step {e['step_flops'] / 1e12:.2f} TFLOP; at this CPU's {precision} matmul speed "
          f"({speed:.1f} GFLOP/s) at least {_duration(e['step_flops'] / speed / 1e9)}"
          + (f" (bf16 is emulated here: fp32 runs {matmul_gflops(torch.float32):.0f} GFLOP/s; --precision fp32 keeps "
             f"the frozen weights in fp32 and is far faster)" if amp is not None and speed < 10 else ""), flush=True)

    t0 = time.perf_counter()
    m = meta_model(cfg)
    names = trainable_names(m)
    model = materialize_(m, set(names), {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[frozen])
    model.set_gradient_checkpointing(True)
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
    cache = e["budget"].get("autocast's cached bf16 copies of the trainable weights (2 B each)", 0)
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
            ("predicted by --estimate: fwd+bwd peak (activations + grads) + autocast weight cache",
             gib(e["memory"]["peak"] + cache)),
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
# command line: one parser for bench.py, compare.py and this file


def parse_args(argv=None):
    """The options of bench.py, compare.py and estimate.py alike (bench.py picks the file by --estimate / --full-size)."""
    p = argparse.ArgumentParser(description="Benchmarks: our UNet3D, DDIM sampler and NewMove training step timed "
                                "against diffusers; memory; a budget estimator. See the docstrings of "
                                "benchmarks/compare.py and benchmarks/estimate.py for the methods.",
                                usage="python benchmarks/bench.py [--quick | --estimate ... | --full-size] [options]")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda: timings synchronize around every call")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per case and side (default: as many as fit in --budget, 5..30)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds before timing, after the parity run (default 2, 1 with --quick; one for "
                        "calls of seconds)")
    p.add_argument("--budget", type=float, default=25.0, help="seconds of timed runs per case without --reps (25)")
    p.add_argument("--quick", action="store_true", help="1-2 minute smoke run: fewer cases, 3 repetitions")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="autocast dtype; auto: fp32 for the side-by-side run, bf16 for --estimate and --full-size")
    p.add_argument("--no-rss", action="store_true", help="skip the RSS subprocesses of the memory table")
    p.add_argument("--out", default=str(ROOT / "benchmarks"),
                   help="folder for results.md / full_size.md (default: benchmarks/ here; '' = write nothing)")
    g = p.add_argument_group("--estimate: params, FLOPs and a GPU memory budget of one training step")
    g.add_argument("--estimate", action="store_true", help="print the estimate and exit")
    g.add_argument("--preset", default="modelscope-1.7b", choices=sorted(UNET_PRESETS),
                   help="UNet preset (default modelscope-1.7b)")
    g.add_argument("--frames", type=int, default=None, help="frames per clip (default 16; --full-size: 8)")
    g.add_argument("--size", type=int, default=256, help="frame size in pixels (default 256; also --full-size)")
    g.add_argument("--batch", type=int, default=2, help="clips per step, instance + reg (default 2)")
    g.add_argument("--train-preset", default="newmove", choices=sorted(k for k, v in train.PRESETS.items()
                                                                        if v["groups"]),
                   help="which weights train, from train.py's PRESETS (default newmove)")
    g.add_argument("--checkpointing", nargs="?", const="full", default="none", choices=tuple(CHECKPOINTING),
                   help="activations recomputed in backward, as train.py --checkpointing: none (default) | selective "
                   "| full (the bare flag)")
    g.add_argument("--frozen-dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="dtype of the frozen weights (default: bf16 with bf16 precision, else fp32)")
    g = p.add_argument_group("--full-size: by hand, never in CI")
    g.add_argument("--full-size", action="store_true",
                   help="one 1.7B NewMove training step on CPU: time and peak memory -> benchmarks/full_size.md")
    # hidden: a smaller preset for --full-size (to test the code path), and the RSS subprocess entry point
    p.add_argument("--full-size-preset", default="modelscope-1.7b", choices=sorted(UNET_PRESETS), help=argparse.SUPPRESS)
    p.add_argument("--rss-child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--rss-config", default="small", help=argparse.SUPPRESS)
    p.add_argument("--rss-frames", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--rss-hw", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--rss-checkpointing", default="none", choices=("none", "selective"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.checkpointing_name, args.checkpointing = args.checkpointing, CHECKPOINTING[args.checkpointing]
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.quick and args.reps is None:
        args.reps = 3
    return args


def start(args):
    """torch's thread count and the device check, before any work: the first step of both files' main."""
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    return args


def main(argv=None):
    """--estimate (also what a direct run without the flag does) or --full-size; --estimate wins if both are given."""
    args = start(parse_args(argv))
    if args.full_size and not args.estimate:
        return full_size(args)
    return print_estimate(args)


if __name__ == "__main__":
    main()
