"""What train.py's memory options cost in step time, side by side on the CPU (docs/memory.md):

    python benchmarks/options_time.py                          # toy preset, 8 frames at 64^2, 1+1 clips, 15 rounds
    python benchmarks/options_time.py --checkpointing full --rounds 15

One copy of the model per option of estimate.OPTIONS (same random weights), each with its own optimizer; every round
takes one NewMove step (fp32, no clipping, as --free-grads needs, for all) on each copy in turn, so a busy CPU slows
all of them alike. Prints each option's median step time and the paired median ratio to plain AdamW (p25-p75).
CPU only: on a GPU four copies of the 1.7B model with their optimizer states would not fit (gpu_check.py times each
option on its own there).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`: the repository root
    import omp  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    omp.choose_wait_policy()

import harness  # noqa: F401

import argparse
import copy
import statistics
import time

import torch

import estimate
import optim
import train
from memory import CHECKPOINTING
from unet3d import UNET_PRESETS, UNet3D


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy", choices=("toy", "tiny"), help="UNet preset (default toy)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="frame size in pixels (latents: size / 8)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--checkpointing", default="none", choices=CHECKPOINTING)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, cpu = UNET_PRESETS[args.preset], torch.device("cpu")
    base = harness.randomize_(UNet3D(cfg), seed=0)
    names = harness.trainable_names(base)
    inputs = harness.train_inputs(cfg, args.frames, args.size // 8, cpu)
    steps = {name: step_fn(copy.deepcopy(base), names, inputs, kind, free, args.checkpointing)
             for name, (kind, free) in estimate.OPTIONS.items() if kind == "adamw" or optim.has_bitsandbytes()}
    for step in steps.values():  # warm-up: the optimizer states exist before timing
        step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    print(f"{args.preset}, {args.frames} frames at {args.size}^2, 1+1 clips, fp32, checkpointing {args.checkpointing}, "
          f"{args.threads} thread(s), {args.rounds} rounds")
    for name, ts in times.items():
        r = [a / b for a, b in zip(ts, times["adamw"])]
        q = statistics.quantiles(r, n=4)
        print(f"  {name:22s} median {statistics.median(ts):.3f} s; / adamw (paired) {statistics.median(r):.3f} "
              f"(p25-p75 {q[0]:.3f}-{q[2]:.3f})")


def step_fn(model, names, inputs, kind: str, free: bool, checkpointing: str):
    """One NewMove step with this option on `model`, as train.py takes it (grad clipping off for every option)."""
    model.set_recompute(checkpointing)
    model.train()
    params = harness.set_trainable(model, names)
    make = lambda ps: optim.make_adamw(kind, ps, 5e-6, 0.01, torch.device("cpu"))  # noqa: E731
    opt = optim.StepInBackward(params, make) if free else make(params)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    if free:
        opt.armed = True

    def step():
        harness.newmove_loss(model, "ours", inputs).backward()
        if free:
            opt.finish()
        else:
            train.optimizer_step(opt, scaler, params, 0.0)
    return step


if __name__ == "__main__":
    main()
