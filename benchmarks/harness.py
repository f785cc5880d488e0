"""What the benchmarks share (compare.py, estimate.py): the UNet pair with identical random weights, train.py's
trainable selection and training step as the benchmarks run it, the FLOP counter (with the CPU flash-attention
formulas FlopCounterMode lacks), the allocator and RSS peaks, a live-tensor tracer, and the one command line of
bench.py, compare.py and estimate.py (parse_args).

diffusers is a test/benchmark oracle (requirements-test.txt): it is imported inside functions, never by our modules.
"""

import argparse
import contextlib
import math
import platform
import re
import resource
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

import layouts
import sample
import train
import weights
from memory import CHECKPOINTING
from models import RELEASED_SCHEDULE
from unet3d import UNET_PRESETS, UNet3D, UNet3DConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository root (each benchmark script puts it on sys.path)


SIDES = ("ours", "diffusers")
CALL = {"ours": lambda m, x, t, c: m(x, t, c),
        "diffusers": lambda m, x, t, c: m(x, t, c, return_dict=False)[0]}
TEXT_LEN = 77  # tokens of the text context, as the released text encoder gives
LOSS_W = train.loss_weights(1, 1, 0.5)  # 1 instance + 1 reg clip: L = MSE_inst + 0.5 MSE_reg

# performance.md numbers the estimator checks itself against (diffusers' UNet, B=1, 16 frames, 32x32 latents)
PERF_MD = {"params": 1_411_233_860, "newmove": 570_882_176, "fwd_tflop_16x32x32": 4.887,
           "saved_gib_bf16": {(1, 16, 256, "none"): 7.20, (1, 16, 256, "full"): 1.00, (2, 16, 256, "none"): 14.39}}


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
    return {k: v for k, v in layouts.unet_config_to_diffusers(cfg).items() if not k.startswith("_")}


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


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_inputs(cfg: UNet3DConfig, frames: int, hw: int, device, seed: int = 0) -> dict:
    """One batch as train.py's loop builds it: 1 instance + 1 reg clip (latents x0, text ctx), with train.py's
    coarse-noise p(t), the released schedule's alpha-bar and the loss weights of L = L_inst + 0.5 L_reg."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, cfg.in_channels, frames, hw, hw, generator=g)
    ctx = torch.randn(2, TEXT_LEN, cfg.cross_attention_dim, generator=g)
    probs, abar = train.timestep_probs("coarse", 0.5), sample.alphas_cumprod(RELEASED_SCHEDULE)
    return {k: v.to(device) for k, v in dict(x0=x0, ctx=ctx, probs=probs, abar=abar, w=LOSS_W).items()}


def newmove_loss(model, side: str, inputs: dict, amp=None, seed: int = 0) -> torch.Tensor:
    """train.newmove_loss on `model` (either side): the same t and noise for both sides (a generator seeded alike)."""
    device = inputs["x0"].device
    g = torch.Generator(device).manual_seed(seed)
    unet = lambda x, t, c: CALL[side](model, x, t, c)  # noqa: E731  (diffusers' forward returns a tuple)
    return train.newmove_loss(unet, inputs["x0"], inputs["ctx"], inputs["w"], inputs["probs"], inputs["abar"], g,
                              amp)[0]


def train_step_fn(model, side: str, names: list, inputs: dict, device, amp=None, seed: int = 0, lr: float = 5e-6):
    """One NewMove step on `model` as train.py runs it: train.newmove_loss (autocast around the UNet only, loss in
    float32), backward, train.optimizer_step (clip 1.0, AdamW with train.py's settings)."""
    params = set_trainable(model, names)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # train.py scales the loss for fp16 only

    def step():
        torch.manual_seed(seed)  # the same dropout RNG stream for both sides
        loss = newmove_loss(model, side, inputs, amp, seed)
        loss.backward()
        train.optimizer_step(opt, scaler, params, 1.0)
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


def trace_step(model, names: list, x, t, ctx, amp_scale: float = 1.0, free_grads: bool = False,
               flops: bool = True) -> dict:
    """Forward + loss + backward (grads start as None): its FLOPs, and its live-tensor bytes over time.

    amp_scale weights float32 activations (0.5 predicts bf16 autocast from a float32 meta run); the trainable
    weights' gradients always count in full (they are float32 under autocast). free_grads: each gradient is dropped as
    soon as it is complete, as train.py --free-grads does after that tensor's optimizer step (the update's
    temporaries, two tensor-sized ones for torch's unfused AdamW and none for fused CUDA AdamW, are not counted: on the
    toy preset they never coincide with the peak). Returns FLOPs of the forward and of the whole step, the peak live
    bytes (also of the forward part, up to the loss, and of the backward part, from the loss on: what the estimator
    adds autocast's weight copies to under full checkpointing), the bytes alive at the end of forward (saved
    activations + output), the gradient bytes (all of them, even if they never live at once; FLOPs None with
    flops=False, which skips their pass and halves the time)."""
    set_trainable(model, names)
    model.train()
    fwd_flops = step_flops = None
    if flops:
        with _flash_on_meta(), flop_counter() as counter:
            loss = model(x, t, ctx).float().square().mean()
            fwd_flops = counter.get_total_flops()  # dropout and the loss add none: = an eval forward's FLOPs
            loss.backward()
        step_flops = counter.get_total_flops()
        for p in model.parameters():
            p.grad = None
    # a second pass for memory: the counter's module hooks keep checkpoint-recomputed tensors alive for longer
    tracker, grad_uids = _storage_tracker(), set()

    def on_grad(p):  # the gradient is complete: note it (it counts in full, see amp_scale); --free-grads drops it
        grad_uids.add(tracker.uid_of(p.grad))
        if free_grads:
            p.grad = None

    hooks = [model.get_parameter(n).register_post_accumulate_grad_hook(on_grad) for n in names]
    with _flash_on_meta(), tracker:
        loss = model(x, t, ctx).float().square().mean()
        tracker.mark("forward")
        loss.backward()
    tracker.on = False
    for h in hooks:
        h.remove()
    grad_bytes = sum(4 * model.get_parameter(n).numel() for n in names)  # float32, as the trainable weights
    now, peaks = 0.0, [0.0, 0.0]  # the peak of the forward part (loss included), then of the backward part
    at_forward = None
    for i, (uid, n, fp32) in enumerate(tracker.events):
        if i == tracker.marks["forward"]:
            at_forward = now
        now += n * (amp_scale if fp32 and uid not in grad_uids else 1.0)
        part = int(i >= tracker.marks["forward"])
        peaks[part] = max(peaks[part], now)
    for p in model.parameters():
        p.grad = None
    at_forward = now if at_forward is None else at_forward
    return {"fwd_flops": fwd_flops, "step_flops": step_flops, "peak": max(peaks), "forward_peak": peaks[0],
            "backward_peak": max(peaks[1], at_forward), "end_of_forward": at_forward, "grads": grad_bytes}


def machine_cpu() -> str:
    try:
        return re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown"


def write_atomic(path: Path, text: str):
    weights.atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)  # no half-written file


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
    g.add_argument("--preset", default="modelscope-1.7b", choices=[*sorted(UNET_PRESETS), "wan2.1-1.3b"],
                   help="UNet preset (default modelscope-1.7b), or wan2.1-1.3b: the Wan 2.1 T2V 1.3B DiT")
    g.add_argument("--height", type=int, default=480, help="wan2.1-1.3b: frame height in pixels (default 480)")
    g.add_argument("--width", type=int, default=832, help="wan2.1-1.3b: frame width in pixels (default 832)")
    g.add_argument("--frames", type=int, default=None, help="frames per clip (default 16, wan2.1-1.3b 81; --full-size: "
                   "8)")
    g.add_argument("--size", type=int, default=256, help="frame size in pixels (default 256; also --full-size)")
    g.add_argument("--batch", type=int, default=2, help="clips per step, instance + reg (default 2)")
    g.add_argument("--train-preset", default="newmove", choices=sorted(k for k, v in train.PRESETS.items()
                                                                        if v["groups"]),
                   help="which weights train, from train.py's PRESETS (default newmove; for wan2.1-1.3b a dit- "
                   "preset, default dit-newmove)")
    g.add_argument("--checkpointing", nargs="?", const="full", default="none", choices=CHECKPOINTING,
                   help="activations recomputed in backward, as train.py --checkpointing: none (default) | selective "
                   "| full (the bare flag)")
    g.add_argument("--frozen-dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="dtype of the frozen weights (default: bf16 with bf16 precision, else fp32)")
    g.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"),
                   help="as train.py --optimizer: fp32 AdamW state (default) or bitsandbytes' 8-bit")
    g.add_argument("--free-grads", action="store_true",
                   help="as train.py --free-grads: each gradient freed once its tensor has been stepped in backward")
    g.add_argument("--delta-sizes", type=int, nargs="*", metavar="RANK", default=None,
                   help="instead: the file size of a --train-preset delta of --preset, whole and compressed to each "
                   "RANK by delta.py compress (default 4 16 64 256; 0 = whole), fp32 and bf16, from the meta device")
    g.add_argument("--table", action="store_true",
                   help="the budget of each memory option at 256^2 and 384^2, --frames (16), batch 1+1 and 2+2, with "
                   "--checkpointing as given (8 meta traces: minutes for modelscope-1.7b)")
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
