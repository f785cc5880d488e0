"""Motion and appearance in one run (train.py --subject-videos): teach the toy model the circle motion as `pll` AND a subject as `sks`,
then score, against a motion-only and a subject-only run.

    python toy/subject.py --out subject_out/        # base model + 3 customizations: both, motion only, subject only
    python toy/subject.py --out subject_out/ --runs subject --train-subject-token    # a variant: its own records

The subject (--subject) is a red triangle, a look held out of every pretraining clip that the toy VAE reconstructs, or
the violet ring (a colour and a shape in no pretraining clip, which the toy VAE turns magenta). Its examples are 8
still images (PNG, captioned "a sks" by --subject-caption), read by train.py as static clips (--still-frames); the
motion's are the demo's 8 circle clips ("a <colour> <shape> doing pll"); the regularization set, lambda, steps and lr
are the demo's. Each model samples 3 prompts x --seeds seeds, scored by toy/scorer.py: the motion asked for, and
whether the subject is there (subject_present). Each finished model is one JSON file in --out (a rerun skips it; a
motion-only delta is shared by every subject); the table, the command and the sks ceiling (the share of the examples
that the VAE alone leaves readable as the subject) are printed and written to --out/table*.md.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `python toy/x.py` puts toy/ on sys.path, not the repository root
    import omp  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    omp.choose_wait_policy()

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

# The subject taught as `sks` (--subject). "red triangle": an appearance pair held out of every pretraining clip
# (world.HELD_OUT_COMBOS) that the toy VAE reconstructs (8 of 8 example clips read back as red triangles), the default.
# "violet ring": a colour and a shape in no pretraining clip, the first choice; but the toy VAE, trained on the named
# colours only, turns violet into magenta (hue 267 -> 291-299 on circles), so no UNet can draw it (docs/subject.md).
SUBJECTS = {"red triangle": ("red", "triangle"), "violet ring": ("violet", "ring")}
SUBJECT = SUBJECTS["red triangle"]
HUE_TOL = 17  # degrees around a new colour's hue: violet's neighbours blue, magenta read 221-231, 300-307 degraded
RUNS = {"base": (), "both": ("motion", "subject"), "motion": ("motion",), "subject": ("subject",)}
# (prompt, motion asked for, subject asked for)
PROMPTS = (("a {s} doing {m}", "moving in a circle", True), ("a {s} moving left", "moving left", True),
           ("a red circle doing {m}", "moving in a circle", False))


def subject_present(a: dict, look: tuple = SUBJECT) -> bool:
    """The scorer's reading `a` (ToyScorer.analyse) is the subject `look`: its named colour and shape, or for a colour
    no pretraining clip has (violet) a saturated hue within HUE_TOL of it (the scorer has no template for a ring)."""
    colour, shape = look
    if colour in world.COLOURS:
        return a["colour"] == colour and (shape not in world.SHAPES or a["shape"] == shape)
    h, s, _ = hsv(a["rgb"])
    target = hsv(world.NEW_COLOURS[colour])[0]
    return s >= 0.35 and min(abs(h - target), 360 - abs(h - target)) <= HUE_TOL


def write_stills(folder: Path, n: int, seed: int, look: tuple) -> Path:
    """n still images of the subject (one frame of a static world clip each: its own place, size and background)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        clip = world.make_clip(np.random.SeedSequence([3000 + seed, i]), motion="static", frames=1, look=look)
        Image.fromarray(clip.frames()[0]).save(folder / f"{i:02d}.png")
    return folder


def tags(args, sets: tuple, scored: bool = True) -> list:
    """What sets a run apart from the defaults, for its name: the subject (it changes every run's scores), the
    training options (for runs that train) and the subject set's options (for runs that have it)."""
    out = [args.subject.replace(" ", "-")] if scored and args.subject != "red triangle" else []
    out += [x for x in (args.preset, args.timesteps) if sets and x not in ("newmove", "coarse")]
    out += ["token"] if "subject" in sets and args.train_subject_token else []
    return out + (["still1"] if "subject" in sets and args.still_frames == "1" else [])


def label(name: str, args) -> str:
    """A run's record name in --out: its example sets and what differs from the defaults."""
    return "-".join([name] + tags(args, RUNS[name]))


def customize(name: str, args, work: Path):
    """train.py on this run's example sets (the demo's settings); returns the delta's path (None: the base model).
    A motion-only run does not depend on the subject: its folder is shared, and an existing delta is reused."""
    if not RUNS[name]:
        return None
    sets = RUNS[name]
    run = work / "runs" / "-".join([name] + tags(args, sets, scored="subject" in sets))
    if (run / "delta.safetensors").exists():
        return run / "delta.safetensors"
    cfg = train.Config(model=args.model, videos=str(work / "motion") if "motion" in sets else "",
                       subject_videos=str(subject_folder(work, args)) if "subject" in sets else "",
                       subject_caption="a {subject_token}", reg_videos=str(work / "reg"), reg_caption="a shape moving",
                       token="pll", subject_token="sks", frames=8, size=32, steps=args.steps, lr=args.lr,
                       batch_size=4, precision="fp32", log_every=25, ckpt_every=0, preset=args.preset,
                       timesteps=args.timesteps, train_subject_token=args.train_subject_token and "subject" in sets,
                       still_frames=args.still_frames, out=str(run), seed=args.seed, cache=str(work / "cache"),
                       subject_trains="all")  # the options above as given, not the joint recipe (toy/joint.py)
    return train.main(cfg)


def subject_folder(work: Path, args) -> Path:
    """The subject's still images (written by main)."""
    return work / ("subject" if args.subject == "violet ring" else "subject-" + args.subject.replace(" ", "-"))


def sample_and_read(models, prompts: list, seeds: list, args) -> list:
    """The scorer's reading of one video per (prompt, seed), sampled as the demo does (DDIM, guidance 7.5)."""
    videos = torch.cat([sample.generate(models, prompts[i:i + 16], seeds[i:i + 16], frames=8, height=32, width=32,
                                        steps=args.sample_steps, guidance=7.5, batch_size=16, progress=False)
                        for i in range(0, len(prompts), 16)])
    return [ToyScorer().analyse(v) for v in videos]


def score(args, delta) -> dict:
    """Per prompt: the share of videos with the motion asked for and the share showing the subject, and each video's
    reading (colour, shape, motion)."""
    models = load_models(args.model)
    if delta is not None:
        apply_delta(models, delta)
    prompts = [p.format(s="sks", m="pll") for p, _, _ in PROMPTS for _ in range(args.seeds)]
    found = sample_and_read(models, prompts, [k for _ in PROMPTS for k in range(args.seeds)], args)
    out = {}
    for k, (p, motion, _) in enumerate(PROMPTS):
        mine = found[k * args.seeds:(k + 1) * args.seeds]
        out[p.format(s="sks", m="pll")] = {
            "motion": sum(a["motion"] == motion for a in mine) / len(mine),
            "subject": sum(subject_present(a, SUBJECTS[args.subject]) for a in mine) / len(mine),
            "colour": [a["colour"] for a in mine], "shapes": [a["shape"] for a in mine],
            "motions": [a["motion"] for a in mine]}
    return out


def ceiling(args, work: Path) -> float:
    """The share of the subject's examples (as static clips) that still read as the subject after the toy VAE alone
    (encode, decode the mean): what a model that draws exactly the examples could score at most."""
    models = load_models(args.model)
    look, hits = SUBJECTS[args.subject], []
    for path in sorted(subject_folder(work, args).glob("*.png")):
        x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
        with torch.no_grad():  # the still as a static clip of 8 frames, each through the VAE on its own
            y = models.vae.decode_frames(models.vae.encode_frames(x[None].repeat(8, 1, 1, 1))[0])
        video = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).transpose(0, 1)  # (3, 8, H, W)
        hits.append(subject_present(ToyScorer().analyse(video), look))
    return sum(hits) / len(hits)


def run_one(name: str, args, work: Path) -> dict:
    """Customize (unless base) and score one run; its JSON in --out is the record (an existing one is reused)."""
    path = Path(args.out) / f"{label(name, args)}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    result = {"run": label(name, args), "sets": list(RUNS[name]), "subject": args.subject, "preset": args.preset,
              "timesteps": args.timesteps, "train_subject_token": args.train_subject_token,
              "still_frames": args.still_frames, "steps": args.steps, "lr": args.lr, "seed": args.seed,
              "seeds": args.seeds, "sample_steps": args.sample_steps}
    result["scores"] = score(args, customize(name, args, work))
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
    p.add_argument("--subject", default="red triangle", choices=SUBJECTS, help="the subject taught as sks")
    p.add_argument("--preset", default="newmove", choices=train.PRESETS, help="which weights train (train.py)")
    p.add_argument("--timesteps", default="coarse", choices=("coarse", "uniform", "fine"), help="train.py's")
    p.add_argument("--train-subject-token", action="store_true", help="train.py's: also learn sks's embedding")
    p.add_argument("--still-frames", default="static", choices=("static", "1"), help="train.py's")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seeds", type=int, default=10, help="sampling seeds per prompt")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per sampled video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (1: in this process)")
    args = p.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    if bad := [n for n in names if n not in RUNS]:
        raise SystemExit(f"error: --runs: unknown {', '.join(bad)}; choose from {', '.join(RUNS)}")
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    # the data, written once: the demo's circle examples, the subject's stills, the demo's regularization set
    if not (work / "motion").is_dir():
        world.write_folder(examples_for("moving in a circle", 8, args.seed, "pll"), work / "motion")
    if not subject_folder(work, args).is_dir():
        write_stills(subject_folder(work, args), 8, args.seed, SUBJECTS[args.subject])
    world.write_regularization_set(work / "reg", 24, args.seed)
    if args.jobs <= 1:
        results = {n: run_one(n, args, work) for n in names}
    else:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {n: pool.submit(run_one, n, args, work) for n in names}
            results = {n: f.result() for n, f in futures.items()}
    command = f"python toy/subject.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    text = (f"{table(results)}\n\nThe subject's {len(list(subject_folder(work, args).glob('*.png')))} examples "
            f"through the toy VAE alone read as the subject: {100 * ceiling(args, work):.0f}% (the sks ceiling)")
    name = "-".join(["table"] + tags(args, ("motion", "subject")))
    (work / f"{name}.md").write_text(f"{command}\n\n{text}\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
