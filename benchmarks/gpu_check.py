"""One command for anyone with a CUDA GPU (a few minutes): the 1.7B NewMove training step with each of train.py's memory
options, measured next to the estimator's prediction.

    python benchmarks/gpu_check.py                  # CUDA: the 1.7B UNet, 256^2 and 384^2, 16 frames, batch 1+1
    python benchmarks/gpu_check.py --batch 4        # batch 2+2
    python benchmarks/gpu_check.py --tiny           # CPU, seconds: the tiny UNet at 64^2, 2 frames (CI runs this)

What runs, per size: the released 1.7B UNet (unet3d.UNET_PRESETS["modelscope-1.7b"]) with random weights, built on the
meta device and materialised tensor by tensor (frozen weights bf16, the NewMove-trainable 570.9 M fp32: no fp32 copy
of all 1.4 B), then for each option of estimate.OPTIONS (--optimizer adamw | adamw8bit, each with and without
--free-grads) a fresh optimizer and 1 + --steps NewMove steps as train.py takes them: train.newmove_loss (bf16
autocast around the UNet, loss in fp32), --checkpointing (full by default: what a 12 GB GPU needs), the optimizer
step (AdamW clipped at 1.0 as the official run; --free-grads without clipping, which it requires). Recorded:
torch.cuda.max_memory_allocated over those steps (the first one creates the optimizer state), the median step time
after the first, and the estimator's total for the same step (estimate.option_budgets: weights + optimizer state +
traced step peak + autocast's bf16 weight copies, with full checkpointing where they live) with measured / predicted.
8-bit options are skipped, and say so, without bitsandbytes. Results: one JSON line per (size, option) appended to
<out>/gpu_check.jsonl, and a markdown table printed and appended to <out>/gpu_check.md.

--tiny runs the same code on the CPU (the tiny UNet, fp32 so no bf16 emulation): the peak is the CPU allocator's
(harness.allocator_peak over the steps) plus the bytes resident before them, so the file format and every code path
stay tested (tests/test_bench.py) without a GPU.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`: the repository root
    import omp  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    omp.choose_wait_policy()

import harness  # noqa: F401

import argparse
import datetime
import gc
import json
import statistics
import time

import torch

import estimate
import optim
import weights
import train
from harness import (allocator_peak, machine_cpu, meta_model, newmove_loss, set_trainable, sync,
                     train_inputs, trainable_names, write_atomic)
from memory import CHECKPOINTING
from unet3d import UNET_PRESETS


def build(preset: str, frozen_dtype, device) -> tuple:
    """(the UNet with random weights on `device`, its NewMove-trainable names), never all of it in fp32."""
    m = meta_model(UNET_PRESETS[preset])
    names = trainable_names(m)
    model = estimate.materialize_(m, set(names), frozen_dtype).to(device)
    return model, names


def run_option(model, names, inputs, device, amp, kind: str, free: bool, steps: int) -> dict:
    """1 + `steps` NewMove steps with one memory option: the peak bytes allocated (absolute) and step times."""
    params = set_trainable(model, names)
    make = lambda ps: optim.make_adamw(kind, ps, 5e-6, 0.01, device)  # noqa: E731  (train.py's lr and weight decay)
    opt = optim.StepInBackward(params, make) if free else make(params)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
    if free:
        opt.armed = True
    times = []

    def step():
        t0 = time.perf_counter()
        newmove_loss(model, "ours", inputs, amp).backward()
        if free:
            opt.finish()
        else:
            train.optimizer_step(opt, scaler, params, 1.0)
        sync(device)
        times.append(time.perf_counter() - t0)

    def all_steps():
        for _ in range(1 + steps):
            step()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        all_steps()
        peak = torch.cuda.max_memory_allocated(device)
    else:  # what is resident (weights, inputs) plus the allocator's peak above it while the steps run
        resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *inputs.values()])
        peak = resident + allocator_peak(all_steps, device)
    if free:
        opt.remove()  # (the optimizer and its state go when this function returns)
    for p in model.parameters():
        p.grad = None
    gc.collect()
    return {"peak": peak, "first_step_s": times[0], "step_s": statistics.median(times[1:]) if steps else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run in seconds: tiny UNet, 64^2, 2 frames, fp32")
    p.add_argument("--sizes", default=None, help="comma-separated frame sizes (default 256,384; --tiny 64)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 16; --tiny 2)")
    p.add_argument("--batch", type=int, default=2, help="clips per step, instance + reg (default 2 = 1+1)")
    p.add_argument("--steps", type=int, default=2,
                   help="timed steps after the first (default 2; 0: the first only, no step time)")
    p.add_argument("--checkpointing", default="full", choices=CHECKPOINTING,
                   help="as train.py --checkpointing (default full)")
    p.add_argument("--out", default=str(harness.ROOT / "benchmarks"), help="folder for gpu_check.jsonl and .md")
    args = p.parse_args(argv)
    if args.tiny:
        device, preset, precision = torch.device("cpu"), "tiny", "fp32"
        sizes, frames = [int(s) for s in (args.sizes or "64").split(",")], args.frames or 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: gpu_check.py needs a CUDA GPU (or --tiny for the CPU smoke run)")
        device, preset, precision = torch.device("cuda"), "modelscope-1.7b", "bf16"
        sizes, frames = [int(s) for s in (args.sizes or "256,384").split(",")], args.frames or 16
    if args.batch < 2 or args.batch % 2:
        raise SystemExit(f"error: --batch must be even and >= 2 (instance + reg clips), got {args.batch}")
    amp, frozen = weights.autocast_dtype(precision), weights.DTYPES[precision]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {machine_cpu()}"
    print(f"gpu_check: {preset}, {frames} frames, batch {args.batch // 2}+{args.batch // 2}, precision {precision}, "
          f"checkpointing {args.checkpointing}, on {where}", flush=True)

    t0 = time.perf_counter()
    model, names = build(preset, frozen, device)
    model.set_recompute(args.checkpointing)
    model.train()
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    records = []
    for size in sizes:
        hw = size // 8
        inputs = train_inputs(UNET_PRESETS[preset], frames, hw, device)
        if args.batch > 2:  # k instance + k reg clips: the inputs repeated, the loss weights of k + k
            k = args.batch // 2
            inputs["x0"], inputs["ctx"] = (v.repeat_interleave(k, 0) for v in (inputs["x0"], inputs["ctx"]))
            inputs["w"] = train.loss_weights(k, k, 0.5, device)
        t1 = time.perf_counter()
        predicted = estimate.option_budgets(UNET_PRESETS[preset], args.batch, frames, size, "newmove", args.checkpointing, precision,
                                            precision)
        print(f"{size}x{size}: estimator traced in {time.perf_counter() - t1:.0f} s", flush=True)
        for name, (kind, free) in estimate.OPTIONS.items():
            rec = {"date": stamp, "device": where, "preset": preset, "size": size, "frames": frames,
                   "batch": args.batch, "precision": precision, "checkpointing": args.checkpointing, "option": name,
                   "predicted_bytes": predicted[name]["total"]}
            if kind == "adamw8bit" and not optim.has_bitsandbytes():
                rec["skipped"] = "bitsandbytes not installed (pip install bitsandbytes)"
            else:
                try:
                    rec.update(run_option(model, names, inputs, device, amp, kind, free, args.steps))
                    rec["measured_over_predicted"] = round(rec["peak"] / rec["predicted_bytes"], 4)
                except torch.cuda.OutOfMemoryError:
                    rec["skipped"] = "out of memory"
                    for p_ in model.parameters():
                        p_.grad = None
                    gc.collect()
                    torch.cuda.empty_cache()
            records.append(rec)
            print(_row(rec), flush=True)
    write_results(records, Path(args.out) if args.out else None, " ".join(sys.argv[1:]))
    return records


def _row(r: dict) -> str:
    unit = 1e9 if r["predicted_bytes"] > 1e9 else 2 ** 20  # GB for the 1.7B model, MiB for --tiny
    if "skipped" in r:
        return f"| {r['size']}² | {r['option']} | {r['predicted_bytes'] / unit:.2f} | skipped: {r['skipped']} | | |"
    step = f"{r['step_s']:.2f}" if r["step_s"] is not None else "-"
    return (f"| {r['size']}² | {r['option']} | {r['predicted_bytes'] / unit:.2f} | {r['peak'] / unit:.2f} | "
            f"{r['measured_over_predicted']:.3f} | {step} |")


def write_results(records: list, out: Path | None, argv: str):
    """Append the JSON lines and a markdown table (device, command, one row per size and option)."""
    if not out:
        return
    out.mkdir(parents=True, exist_ok=True)
    r0 = records[0]
    unit = "GB" if r0["predicted_bytes"] > 1e9 else "MiB"
    head = (f"| size | option | predicted ({unit}) | max allocated ({unit}) | measured / predicted | step (s) |\n"
            f"| --- | --- | --- | --- | --- | --- |")
    text = (f"## {r0['date']}: {r0['device']}\n\n`python benchmarks/gpu_check.py {argv}`: {r0['preset']}, "
            f"{r0['frames']} frames, batch {r0['batch'] // 2}+{r0['batch'] // 2}, {r0['precision']}, checkpointing "
            f"{r0['checkpointing']}\n\n{head}\n" + "\n".join(_row(r) for r in records) + "\n")
    for name, add in (("gpu_check.jsonl", "".join(json.dumps(r) + "\n" for r in records)), ("gpu_check.md", text)):
        path = out / name
        old = path.read_text() if path.exists() else ""
        write_atomic(path, old + ("\n" if old and name.endswith(".md") else "") + add)
    print(f"\n{text}\nappended to {out / 'gpu_check.jsonl'} and {out / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
