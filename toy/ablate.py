"""The paper's Table 2 ablations and baselines at toy scale: each row customizes the toy model (toy/demo.py) with one
change to train.py's NewMove defaults, over several seeds, and reports novel-motion accuracy and copy rate.

    python toy/ablate.py --seeds 2                                        # every row, the demo's 600 steps (long)
    python toy/ablate.py --rows newmove uniform prior-none --seeds 2      # a subset
    python toy/ablate.py --seeds 2 -- --steps 150 --lr 2e-4 --seeds 2 --base-seeds 1   # the setting of toy/ablation.md

On 2 CPU cores a row takes about 3.5 min per seed at 150 steps (toy/ablation.md: 13 rows x 2 seeds in 84 min) and
about 4x that at the demo's 600 steps.
"""

import sys
from pathlib import Path

# `python toy/x.py` puts toy/ on sys.path, not the repository root: the root goes on first, then omp.py (before torch
# loads OpenMP: the wait policy for this machine).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import omp  # noqa: E402, F401

import argparse
import statistics
import time


import weights
from toy import demo

# row name -> (paper Table 2 row, train.Config overrides)
ROWS = {
    "newmove": ("(ours) temporal all + spatial K,V, coarse t, real prior, full", {}),
    "spatial-none": ("(a) spatial layers: none", {"preset": "temporal"}),
    "spatial-all": ("(a) spatial layers: all", {"preset": "spatial-all"}),
    "temporal-none": ("(b) temporal layers: none", {"preset": "temporal-none"}),
    "token": ("(c) text token trained", {"train_token": True}),
    "uniform": ("(d) uniform timestep sampling", {"timesteps": "uniform"}),
    "prior-none": ("(e) regularization prior: none", {"prior": "none"}),
    "prior-synthetic": ("(e) regularization prior: synthetic", {"prior": "synthetic"}),
    "lora-all": ("(f) LoRA, all (spatial + temporal transformers)", {"preset": "spatial-all", "lora_rank": 4}),
    "lora-ours": ("(f) LoRA, NewMove layers", {"lora_rank": 4}),
    "textual-inversion": ("baseline: Textual Inversion", {"preset": "textual-inversion"}),
    "dreambooth": ("baseline: DreamBooth (all spatial, synthetic prior)", {"preset": "dreambooth"}),
    "custom-diffusion": ("baseline: Custom Diffusion (spatial K,V + token, real prior)", {"preset": "custom-diffusion"}),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", type=int, default=2, help="customization seeds per row (data, init and noise)")
    p.add_argument("--out", default=f"toy/ablation-{time.strftime('%Y%m%d-%H%M%S')}.md",
                   help="markdown table to write; an existing file is never overwritten (default: a new, dated file)")
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help="after --: options for toy/demo.py")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose another --out")
    lines = ["| row | paper row | novel-motion accuracy | copy rate | base-motion accuracy |", "| --- | --- | --- | --- | --- |"]
    t0 = time.time()
    for name in args.rows:
        label, overrides = ROWS[name]
        runs = [demo.main(["--seed", str(s), "--no-before", *[a for a in args.demo_args if a != "--"]],
                          overrides=overrides, quiet=True) for s in range(args.seeds)]

        def stat(key):
            vals = [100 * r[key][1] for r in runs]
            spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.0f} ± {spread:.0f}"

        lines.append(f"| {name} | {label} | {stat('novel-motion accuracy')} | {stat('copy rate, novel prompts')} | "
                     f"{stat('base-motion accuracy (forgetting)')} |")
        print(lines[-1], flush=True)
        # rewritten after every row (atomically), so a long run that is stopped still leaves its finished rows
        footer = (f"\n{args.seeds} seeds per row (mean ± sample std, %); {len(lines) - 2} of {len(args.rows)} rows; "
                  f"{time.time() - t0:.0f} s; command: python toy/ablate.py {' '.join(sys.argv[1:])}")
        text = "\n".join(lines) + "\n" + footer + "\n"
        weights.atomic_write(out, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
