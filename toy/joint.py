"""A new subject doing a new motion: the joint run's recipes (train.py --videos + --subject-videos), measured in the toy
world over motions and customization seeds, with bootstrap intervals and paired differences to today's recipe.

    python toy/joint.py                        # the measured rows (MEASURED): 2 motions x 3 seeds; reruns resume
    python toy/joint.py --rows joint-word split split-uniform fine-all split-static --motions "moving in a circle" --seeds 1
    python toy/joint.py --rows split-uniform --motions zigzagging --seeds 1
    python toy/joint.py --table                # only the table, from the records

Each run teaches a novel motion as `pll` (the demo's 8 clips of it, "a <colour> <shape> doing pll") and, in the same
train.py run, the subject (toy/subject.py's red triangle, a look no pretraining clip has) as `sks` from 8 still images
captioned "a sks"; the regularization set, lambda, 200 steps, lr 6e-4 and batch 4 are the demo's. A row is a recipe:
train.py options for the joint run, or a single-set run (motion only, subject only) to compare against. Each run's
model samples --videos-per-prompt videos of each prompt, read by toy/scorer.py:

    "a sks doing pll"        the subject drawn (its colour and shape), the motion, and BOTH in the same video
    "a blue cross doing pll" the motion on another subject
    "a sks moving left"      the subject in another motion (drawn, and moving left)
    base prompts             a base motion on a seen look (what the model knew before: forgetting)

Records are appended to --results (toy/joint.jsonl) as runs finish, a rerun skipping what is there; the table, with
bootstrap intervals and paired differences to "joint", goes to --out (toy/joint.md; docs/subject.md reads it).
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
import contextlib
import json
import multiprocessing
import shutil
import time

import numpy as np

from toy import world
from toy.ablate import append_result, bootstrap, read_results, verdict
from weights import atomic_write

# row: (what it is, the example sets it trains on, train.Config options). "joint" is train.py's joint recipe as it was
# before the per-set options existed (static stills, no learned word, one p(t), every weight from every clip).
BOTH = ("motion", "subject")


def recipe(trains: str, timesteps: str = "same", stills: str = "1") -> dict:
    """A joint run's options: the learned subject word, the still kind, what the subject's clips train, their p(t)."""
    return {"train_subject_token": True, "still_frames": stills, "subject_trains": trains,
            "subject_timesteps": timesteps}


ROWS = {
    "motion": ("motion only", ("motion",), {}),
    "subject": ("subject only, learned word, one-frame stills", ("subject",),
                {"train_subject_token": True, "still_frames": "1"}),
    "joint": ("joint, the earlier defaults", BOTH,
              {"still_frames": "static", "subject_timesteps": "same", "subject_trains": "all"}),
    "joint-word": ("joint, learned word, one-frame stills", BOTH, recipe("all")),
    "split": ("joint, learned word, one-frame stills; subject clips: fine p(t), appearance weights only", BOTH,
              recipe("appearance", "fine")),
    "split-coarse": ("as split, subject clips at the coarse p(t)", BOTH, recipe("appearance")),
    "split-uniform": ("as split, subject clips at the uniform p(t)", BOTH, recipe("appearance", "uniform")),
    "split-word": ("as split-coarse, the subject clips training the subject word's row only (train.py's joint "
                   "default, config.JOINT_SETTINGS)", BOTH, recipe("word")),
    "fine-all": ("as split, subject clips training every weight", BOTH, recipe("all", "fine")),
    "split-static": ("as split, static stills", BOTH, recipe("appearance", "fine", "static")),
}
MEASURED = ("motion", "subject", "joint", "split-coarse", "split-word")  # each on MOTIONS x 3 seeds
MOTIONS = ("moving in a circle", "zigzagging")
OTHER = ("blue", "cross")  # "the motion on another subject": an evaluation look the examples never show
BASE_LOOKS = (("green", "square"), ("white", "circle"), ("orange", "diamond"), ("cyan", "triangle"))


def prompts(motion: str, n: int) -> dict:
    """name -> ([prompt] * n or n base prompts, [motion asked for], subject asked for?)."""
    base = [(world.caption_for(*BASE_LOOKS[k % len(BASE_LOOKS)], m), m)
            for k, m in enumerate(world.BASE_MOTIONS[i % len(world.BASE_MOTIONS)] for i in range(n))]
    return {"joint": (["a sks doing pll"] * n, [motion] * n, True),
            "other subject": ([f"a {OTHER[0]} {OTHER[1]} doing pll"] * n, [motion] * n, False),
            "other motion": (["a sks moving left"] * n, ["moving left"] * n, True),
            "base": ([p for p, _ in base], [m for _, m in base], False)}


def data_folder(out, motion: str, seed: int) -> Path:
    return Path(out) / "data" / f"{motion.replace(' ', '-')}-{seed}"


def write_data(out, motion: str, seed: int):
    """A run's example sets, per motion and seed (as toy/demo.py and toy/ablate.py): the motion's 8 clips, the
    subject's 8 stills, 24 regularization clips. Written once, before the runs start."""
    from toy import subject
    from toy.demo import examples_for

    data = data_folder(out, motion, seed)
    if not (data / "motion").is_dir():
        world.write_folder(examples_for(motion, 8, seed, "pll"), data / "motion")
    if not (data / "subject").is_dir():
        subject.write_stills(data / "subject", 8, seed, subject.SUBJECT)
    world.write_regularization_set(data / "reg", 24, seed)


def run_one(task: tuple) -> dict:
    """Customize (row, motion, seed) with train.py and score it; its record. One thread, output to the run's log."""
    row, motion, seed, s, out = task
    import torch

    import train
    from delta import apply_delta
    from models import load_models
    from toy import subject

    torch.set_num_threads(1)
    t0 = time.time()
    sets, options = ROWS[row][1], ROWS[row][2]
    data = data_folder(out, motion, seed)
    run = Path(out) / "runs" / f"{row}-{motion.replace(' ', '-')}-{seed}"
    model = str(ROOT / s["model"])  # (an absolute --model stays as it is)
    cfg = train.Config(model=model, videos=str(data / "motion") if "motion" in sets else "",
                       subject_videos=str(data / "subject") if "subject" in sets else "",
                       subject_caption="a {subject_token}", reg_videos=str(data / "reg"), reg_caption="a shape moving",
                       token="pll", subject_token="sks", frames=8, size=32, steps=s["steps"], lr=s["lr"],
                       batch_size=4, precision="fp32", log_every=50, ckpt_every=50, seed=seed, out=str(run),
                       resume=(run / "state.pt").exists(), cache=str(Path(out) / "cache"), **options)
    if run.is_dir() and not (run / "state.pt").exists():  # a run killed before its first checkpoint: start again
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        delta = train.main(cfg)
    models = load_models(model)
    apply_delta(models, delta)
    asked = prompts(motion, s["videos"])
    # every prompt's videos in one sampling pass (full batches; a (prompt, seed) pair's video does not depend on them)
    found = subject.sample_and_read(models, [x for texts, _, _ in asked.values() for x in texts],
                                    [k for texts, _, _ in asked.values() for k in range(len(texts))],
                                    argparse.Namespace(sample_steps=s["sample_steps"]))
    per_video = {}
    for i, (name, (texts, want, has_subject)) in enumerate(asked.items()):
        mine = found[i * s["videos"]:(i + 1) * s["videos"]]
        moved = [float(a["motion"] == m) for a, m in zip(mine, want)]
        per_video[name + ": motion"] = moved
        if has_subject:
            drawn = [float(subject.subject_present(a)) for a in mine]
            per_video[name + ": subject"] = drawn
            per_video[name + ": both"] = [a * b for a, b in zip(moved, drawn)]
    return {"row": row, "motion": motion, "seed": seed, "settings": s, "per_video": per_video,
            "seconds": round(time.time() - t0, 1)}


# the table's columns: (heading, per-video key)
COLUMNS = (("both, 'a sks doing pll'", "joint: both"), ("subject, 'a sks doing pll'", "joint: subject"),
           ("motion, 'a sks doing pll'", "joint: motion"), ("motion, 'a blue cross doing pll'", "other subject: motion"),
           ("subject, 'a sks moving left'", "other motion: subject"),
           ("moving left, 'a sks moving left'", "other motion: motion"), ("base motions", "base: motion"))


def cells(records: list) -> dict:
    """row -> {(motion, seed): {key: per-video array}}."""
    out = {}
    for r in records:
        out.setdefault(r["row"], {})[(r["motion"], r["seed"])] = {k: np.array(v) for k, v in r["per_video"].items()}
    return out


def table(records: list, reference: str = "joint") -> str:
    """Markdown: per row, each column's mean over runs and videos [95% two-level bootstrap interval], then the paired
    differences to `reference` on the runs both have."""
    c = cells(records)
    fmt = lambda m, lo, hi: f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"  # noqa: E731
    lines = ["| row | runs | " + " | ".join(h for h, _ in COLUMNS) + " |", "| --- | --- |" + " --- |" * len(COLUMNS)]
    for row in (r for r in ROWS if r in c):
        runs = sorted(c[row])
        vals = [fmt(*bootstrap(np.stack([c[row][k][key] for k in runs]))) if key in c[row][runs[0]] else "-"
                for _, key in COLUMNS]
        lines.append(f"| {row} | {len(runs)} | " + " | ".join(vals) + " |")
    lines += ["", f"Paired differences to {reference} (row minus {reference}, percentage points, same motions, seeds, "
                  "prompts and sampling seeds; 95% bootstrap interval; 'higher'/'lower' = the interval excludes 0):", "",
              "| row | pairs | " + " | ".join(h for h, _ in COLUMNS) + " |", "| --- | --- |" + " --- |" * len(COLUMNS)]
    for row in (r for r in ROWS if r in c and r != reference and reference in c):
        shared = sorted(set(c[row]) & set(c[reference]))
        vals = []
        for _, key in COLUMNS:
            if not shared or key not in c[row][shared[0]] or key not in c[reference][shared[0]]:
                vals.append("-")
                continue
            m, lo, hi = bootstrap(np.stack([c[row][k][key] - c[reference][k][key] for k in shared]))
            vals.append(f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] {verdict(lo, hi)}")
        lines.append(f"| {row} | {len(shared)} | " + " | ".join(vals) + " |")
    settings = json.dumps(records[0]["settings"], sort_keys=True) if records else "{}"
    lines += ["", "Rows: " + "; ".join(f"{k}: {v[0]}" for k, v in ROWS.items() if k in c) + ".",
              f"Settings: {settings}."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="*", default=list(MEASURED), choices=list(ROWS),
                   help="recipes to run (default: the measured set; the others ran on one motion and seed)")
    p.add_argument("--motions", nargs="*", default=list(MOTIONS), choices=list(world.NOVEL_MOTIONS))
    p.add_argument("--seeds", type=int, default=3, help="customization seeds per motion (0, 1, ...)")
    p.add_argument("--videos-per-prompt", type=int, default=8, help="sampling seeds per prompt")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per sampled video")
    p.add_argument("--model", default="toy/model", help="base model (relative paths: from the repository root)")
    p.add_argument("--work", default="joint_work", help="folder for the runs' data, caches and deltas")
    p.add_argument("--results", default=str(ROOT / "toy" / "joint.jsonl"), help="JSON-lines records (appended)")
    p.add_argument("--out", default=str(ROOT / "toy" / "joint.md"), help="the markdown table (rewritten)")
    p.add_argument("--table", action="store_true", help="only write the table from --results")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    args = p.parse_args(argv)
    for flag in ("seeds", "videos_per_prompt", "steps", "sample_steps", "jobs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    s = {"steps": args.steps, "lr": args.lr, "videos": args.videos_per_prompt, "sample_steps": args.sample_steps,
         "model": args.model}
    results = Path(args.results)
    done = {(r["row"], r["motion"], r["seed"]) for r in read_results(results) if r["settings"] == s}
    # seed-major: a runner stopped early leaves every row measured on the same first seeds
    tasks = [(row, m, k, s, args.work) for k in range(args.seeds) for m in args.motions for row in args.rows
             if (row, m, k) not in done]
    if not args.table:
        print(f"{len(tasks)} runs to do, {len(done)} in {results}", flush=True)
        for m, k in sorted({(t[1], t[2]) for t in tasks}):
            write_data(args.work, m, k)
        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in cf.as_completed([pool.submit(run_one, t) for t in tasks]):
                r = f.result()
                append_result(results, r)
                print(f"{r['row']} {r['motion']} seed {r['seed']}: {r['seconds']} s; both "
                      f"{np.mean(r['per_video'].get('joint: both', [np.nan])):.2f}", flush=True)
    records = [r for r in read_results(results) if r["settings"] == s]
    text = table(records)
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"), overwrite=True)
    print(text)
    return records


if __name__ == "__main__":
    main()
