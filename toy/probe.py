"""How much does the toy UNet's noise prediction depend on each word of the prompt? A diagnostic for the base model.

    python toy/probe.py                       # the committed toy/model
    python toy/probe.py --model runs/m2       # any toy model directory

For a reference prompt and variants that change one word (direction, colour, motion category), prints the relative
change ||eps(x, t, variant) - eps(x, t, reference)|| / ||eps(x, t, reference)|| on the same noisy inputs at several
timesteps. A word the model ignores changes little; docs/toy-world.md quotes this for the direction words.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `python toy/x.py` puts toy/ on sys.path, not the repository root
    import omp  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    omp.choose_wait_policy()

import argparse

import torch

from models import load_models

REFERENCE = "a red triangle moving left"
VARIANTS = {"direction: right": "a red triangle moving right", "direction: up": "a red triangle moving up",
            "colour: blue": "a blue triangle moving left", "category: growing": "a red triangle growing",
            "category: static": "a red triangle static"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "toy" / "model"), help="toy model directory")
    p.add_argument("--timesteps", type=int, nargs="+", default=[999, 900, 700, 400])
    p.add_argument("--batch", type=int, default=8, help="noisy inputs per timestep")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    m = load_models(args.model)
    prompts = [REFERENCE, *VARIANTS.values()]
    g = torch.Generator().manual_seed(0)
    rows = {}
    with torch.no_grad():
        ctx = m.text_encoder(m.tokenizer(prompts))  # (P, 77, D)
        for t in args.timesteps:
            # pure Gaussian inputs stand in for x_t: at these t the latent is mostly noise anyway
            x = torch.randn(args.batch, m.unet.cfg.in_channels, 8, 8, 8, generator=g)  # (B, C, F, h, w)
            eps = [m.unet(x, torch.full((args.batch,), t), c[None].expand(args.batch, -1, -1)) for c in ctx]
            rows[t] = [((e - eps[0]).norm() / eps[0].norm()).item() for e in eps[1:]]
    print(f"relative change of the noise prediction against {REFERENCE!r}\n")
    print("| t | " + " | ".join(VARIANTS) + " |\n|---|" + "---|" * len(VARIANTS))
    for t, vals in rows.items():
        print(f"| {t} | " + " | ".join(f"{100 * v:.1f}%" for v in vals) + " |")
    return rows


if __name__ == "__main__":
    main()
