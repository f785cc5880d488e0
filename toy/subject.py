"""Motion and appearance in one run (issue 19): teach the toy model the circle motion as `pll` AND a subject it has
never drawn (a violet ring: neither the colour nor the shape is in any pretraining clip) as `sks`, then score.

    python toy/subject.py --out subject_out/        # base model + 3 customizations: both, motion only, subject only

The subject's examples are 8 still images (PNG, captioned "a sks" by --subject-caption), read by train.py as static
clips; the motion's are the demo's 8 circle clips ("a <colour> <shape> doing pll"); the regularization set, lambda,
steps and lr are the demo's. Each model samples 3 prompts x --seeds seeds, scored by toy/scorer.py: the motion asked
for, and whether the subject is there (the foreground's hue within HUE_TOL of violet's, a colour no named colour is
near). Each finished model is one JSON file in --out (a rerun skips it); the table is printed and written to
--out/table.md.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import omp  # noqa: E402, F401

import argparse
import concurrent.futures as cf
import json
import multiprocessing

import numpy as np
import torch
from PIL import Image

import sample
import train
from delta import apply_delta
from models import load_models
from toy import world
from toy.demo import examples_for
from toy.scorer import ToyScorer, hsv

SUBJECT = ("violet", "ring")
HUE_TOL = 17  # degrees around violet's hue; blue and magenta, its neighbours, read 221-231 and 300-307 when degraded
RUNS = {"base": (), "both": ("motion", "subject"), "motion": ("motion",), "subject": ("subject",)}
# (prompt, motion asked for, subject asked for)
PROMPTS = (("a {s} doing {m}", "moving in a circle", True), ("a {s} moving left", "moving left", True),
           ("a red circle doing {m}", "moving in a circle", False))


def subject_present(rgb) -> bool:
    """The shape's colour (scorer.analyse's rgb) is the subject's violet: saturated and within HUE_TOL of its hue."""
    h, s, _ = hsv(rgb)
    target = hsv(world.NEW_COLOURS[SUBJECT[0]])[0]
    return s >= 0.35 and min(abs(h - target), 360 - abs(h - target)) <= HUE_TOL


def write_stills(folder: Path, n: int, seed: int) -> Path:
    """n still images of the subject (one frame of a static world clip each: its own place, size and background)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        clip = world.make_clip(np.random.SeedSequence([3000 + seed, i]), motion="static", frames=1, look=SUBJECT)
        Image.fromarray(clip.frames()[0]).save(folder / f"{i:02d}.png")
    return folder


def customize(name: str, args, work: Path):
    """train.py on this run's example sets (the demo's settings); returns the delta's path (None: the base model)."""
    if not RUNS[name]:
        return None
    sets = RUNS[name]
    cfg = train.Config(model=args.model, videos=str(work / "motion") if "motion" in sets else "",
                       subject_videos=str(work / "subject") if "subject" in sets else "",
                       subject_caption="a {subject_token}", reg_videos=str(work / "reg"), reg_caption="a shape moving",
                       token="pll", subject_token="sks", frames=8, size=32, steps=args.steps, lr=args.lr,
                       batch_size=4, precision="fp32", log_every=25, ckpt_every=0, preset=args.preset,
                       out=str(work / "runs" / label(name, args)), seed=args.seed, cache=str(work / "cache"))
    return train.main(cfg)


def score(args, delta) -> dict:
    """Per prompt: the share of videos with the motion asked for and the share showing the subject, and each video's
    reading."""
    models = load_models(args.model)
    if delta is not None:
        apply_delta(models, delta)
    prompts = [p.format(s="sks", m="pll") for p, _, _ in PROMPTS for _ in range(args.seeds)]
    seeds = [k for _ in PROMPTS for k in range(args.seeds)]
    videos = torch.cat([sample.generate(models, prompts[i:i + 16], seeds[i:i + 16], frames=8, height=32, width=32,
                                        steps=25, guidance=7.5, batch_size=16, progress=False)
                        for i in range(0, len(prompts), 16)])
    found = [ToyScorer().analyse(v) for v in videos]
    out = {}
    for k, (p, motion, _) in enumerate(PROMPTS):
        mine = found[k * args.seeds:(k + 1) * args.seeds]
        out[p.format(s="sks", m="pll")] = {
            "motion": sum(a["motion"] == motion for a in mine) / len(mine),
            "subject": sum(subject_present(a["rgb"]) for a in mine) / len(mine),
            "colour": [a["colour"] for a in mine], "motions": [a["motion"] for a in mine]}
    return out


def label(name: str, args) -> str:
    """A run's name in --out: its example sets, and the preset unless it is NewMove's."""
    return name if args.preset == "newmove" or not RUNS[name] else f"{name}-{args.preset}"


def run_one(name: str, args, work: Path) -> dict:
    """Customize (unless base) and score one run; its JSON in --out is the record (an existing one is reused)."""
    path = Path(args.out) / f"{label(name, args)}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    result = {"run": label(name, args), "sets": list(RUNS[name]), "preset": args.preset, "steps": args.steps, "lr": args.lr, "seed": args.seed,
              "seeds": args.seeds, "scores": score(args, customize(name, args, work))}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(results: dict) -> str:
    """Markdown: per run, motion accuracy and subject presence for each prompt."""
    heads = [p.format(s="sks", m="pll") for p, _, _ in PROMPTS]
    lines = ["| run | " + " | ".join(f'"{h}": motion / sks' for h in heads) + " |", "| --- |" + " --- |" * len(heads)]
    for r in results.values():
        cells = [f"{100 * r['scores'][h]['motion']:.0f}% / {100 * r['scores'][h]['subject']:.0f}%" for h in heads]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "toy" / "model"))
    p.add_argument("--out", required=True, help="folder for the runs, their JSON records and table.md")
    p.add_argument("--runs", default="base,both,motion,subject", help="comma-separated, of " + ", ".join(RUNS))
    p.add_argument("--preset", default="newmove", choices=train.PRESETS, help="which weights train (train.py)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seeds", type=int, default=10, help="sampling seeds per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    args = p.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    if bad := [n for n in names if n not in RUNS]:
        raise SystemExit(f"error: --runs: unknown {', '.join(bad)}; choose from {', '.join(RUNS)}")
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    # the data, written once: the demo's circle examples, the subject's stills, the demo's regularization set
    if not (work / "motion").is_dir():
        world.write_folder(examples_for("moving in a circle", 8, args.seed, "pll"), work / "motion")
    if not (work / "subject").is_dir():
        write_stills(work / "subject", 8, args.seed)
    world.write_regularization_set(work / "reg", 24, args.seed)
    with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {n: pool.submit(run_one, n, args, work) for n in names}
        results = {n: f.result() for n, f in futures.items()}
    text = table(results)
    (work / f"table{'' if args.preset == 'newmove' else '-' + args.preset}.md").write_text(f"python toy/subject.py {' '.join(sys.argv[1:] if argv is None else argv)}\n\n"
                                   f"{text}\n")
    print(text)


if __name__ == "__main__":
    main()
