"""The paper's Table 2 (ablations) and its baselines at toy scale, with enough runs to tell rows apart.

    python toy/ablate.py                                  # every row x motion x seed not yet in the results file
    python toy/ablate.py --rows newmove uniform --motions "moving in a circle" --seeds 1     # a subset
    python toy/ablate.py --table                          # only (re)write the markdown table from the results file

Two runs go at a time by default (--jobs 2: worker processes with one torch thread each, 3.3x the runs per hour of
the old 600-step recipe in one process, toy/speed.md); the order is seed-major (every row and motion on seed 0 first),
so a runner stopped early leaves a table over all motions.

Each run customizes the toy model (toy/demo.py: train.py with one change to its NewMove defaults) on one novel motion
with one customization seed (its example clips, initial noise and data order), then samples and scores the same
evaluation prompts: every unseen appearance pair (world.HELD_OUT_COMBOS) with --sample-seeds sampling seeds for the
novel motion, and with every base motion for forgetting. The base model ("base model" row) is scored once per motion
and seed on the same prompts. Every finished run is appended to --results as one JSON line holding its settings and
every per-video score, so a stopped runner continues where it stopped, and the table is always regenerated from that
file: per row the mean and a 95% bootstrap interval over runs (resampling runs, then videos within each run), and the
paired difference to the NewMove row (same motions, seeds, prompts and sampling seeds), marked resolved when its
interval excludes 0. The copy score is toy/scorer.py's leakage score (nearest training clip in unasked appearance),
with the threshold from held-out clips (scorer.calibrate_leakage).
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
import os
import time

import numpy as np

import weights
from toy import demo, world
from toy import scorer as toy_scorer

# row name -> (paper Table 2 row, train.Config overrides, the paper's finding vs NewMove: accuracy, copy)
# (paper numbers: docs/method.md §5.3; NewMove 70.6% accuracy / 8.7% copy; baselines §5.4, Table 3 not in our text)
ROWS = {
    "newmove": ("(ours) temporal all + spatial K,V, coarse t, real prior, full", {}, None),
    "spatial-none": ("(a) spatial layers: none", {"preset": "temporal"}, ("lower: 62.3", "lower: 5.9")),
    "spatial-all": ("(a) spatial layers: all", {"preset": "spatial-all"}, ("lower: 68.7", "higher: 17.0")),
    "temporal-none": ("(b) temporal layers: none", {"preset": "temporal-none"}, ("lower: 22.7", "lower: 1.4")),
    "token": ("(c) text token trained", {"train_token": True}, ("higher: 75.5", "higher: 22.7")),
    "uniform": ("(d) uniform timestep sampling", {"timesteps": "uniform"}, ("lower: 66.9", "higher: 15.4")),
    "prior-none": ("(e) regularization prior: none", {"prior": "none"}, ("lower: 43.9", "lower: 1.2")),
    "prior-synthetic": ("(e) regularization prior: synthetic", {"prior": "synthetic"}, ("lower: 48.3", "lower: 3.7")),
    "lora-all": ("(f) LoRA, all (spatial + temporal transformers)", {"preset": "spatial-all", "lora_rank": 4},
                 ("lower: 17.4", "lower: 0.5")),
    "lora-ours": ("(f) LoRA, NewMove layers", {"lora_rank": 4}, ("lower: 10.6", "lower: 3.3")),
    "textual-inversion": ("baseline: Textual Inversion", {"preset": "textual-inversion"}, ("lower (fails)", "")),
    "dreambooth": ("baseline: DreamBooth (all spatial, synthetic prior)", {"preset": "dreambooth"}, ("lower", "")),
    "custom-diffusion": ("baseline: Custom Diffusion (spatial K,V + token, real prior)", {"preset": "custom-diffusion"},
                         ("lower", "")),
}
# The same questions of the toy DiT (train.py --denoiser dit; config.PRESETS' dit- sets): which weights, when a DiT has
# no temporal layers; whether coarse-noise sampling still helps under flow matching; which prior. The paper has no
# numbers for these (its model is a UNet), so there is no expected direction: the reference row is dit-newmove.
DIT = {"denoiser": "dit"}
DIT_ROWS = {
    "dit-newmove": ("self-attention all + cross-attention K,V (NewMove's choice, read for a DiT)", DIT, None),
    "dit-self-attn": ("self-attention all", {**DIT, "preset": "dit-self-attn"}, None),
    "dit-self-qk": ("self-attention Q,K only (the attention maps)", {**DIT, "preset": "dit-self-qk"}, None),
    "dit-self-qk+cross-kv": ("self-attention Q,K + cross-attention K,V", {**DIT, "preset": "dit-self-qk+cross-kv"},
                             None),
    "dit-cross-kv": ("cross-attention K,V only (NewMove's spatial choice alone)", {**DIT, "preset": "dit-cross-kv"},
                     None),
    "dit-ffn": ("FFN only", {**DIT, "preset": "dit-ffn"}, None),
    "dit-lora-all": ("LoRA r=4 on every block Linear (the community's default)",
                     {**DIT, "preset": "dit-linear-all", "lora_rank": 4}, None),
    "dit-uniform": ("uniform timesteps (flow grid)", {**DIT, "timesteps": "uniform"}, None),
    # the shifted grid already puts 75% of uniform draws above sigma 0.5: without the shift, does coarse noise help?
    "dit-shift1": ("coarse timesteps, training shift 1 (sigma = grid step; sampling keeps 3)",
                   {**DIT, "flow_shift": 1.0}, None),
    "dit-uniform-shift1": ("uniform timesteps, training shift 1", {**DIT, "timesteps": "uniform", "flow_shift": 1.0},
                           None),
    "dit-prior-none": ("regularization prior: none", {**DIT, "prior": "none"}, None),
    "dit-prior-synthetic": ("regularization prior: synthetic", {**DIT, "prior": "synthetic"}, None),
}
# Rows also compared with another row than the first (row -> that row): coarse against uniform at the same shift.
VERSUS = {"dit-uniform-shift1": "dit-shift1"}
BASE = "base model"  # the row of the uncustomized model


def rows_of(settings: dict) -> dict:
    """The rows of a table: the UNet's (the paper's Table 2) or, with settings' denoiser dit, the DiT's. The first
    row is the reference of the paired differences."""
    return DIT_ROWS if settings.get("denoiser") == "dit" else ROWS


# -----------------------------------------------------------------------------------------------------------------------
# statistics: two-level bootstrap over runs (customization seeds x motions) and the videos within each run


def bootstrap(x: np.ndarray, n: int = 4000, seed: int = 0, level: float = 0.95) -> tuple:
    """(mean, low, high) of the grand mean of x (R runs, V videos per run): each replicate draws R runs with
    replacement, then V videos with replacement within each drawn run. For paired differences pass x = a - b with
    the runs and videos of a and b aligned (the same motion, seed, prompt and sampling seed in each cell)."""
    x = np.asarray(x, dtype=np.float64)
    R, V = x.shape
    rng = np.random.default_rng(seed)
    runs = rng.integers(R, size=(n, R))  # (n, R)
    vids = rng.integers(V, size=(n, R, V))  # (n, R, V)
    means = x[runs[..., None], vids].mean(axis=(1, 2))  # (n,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(x.mean()), float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    """Whether a difference's interval excludes 0, and its sign."""
    return "higher" if lo > 0 else "lower" if hi < 0 else "unresolved"


def agreement(v: str, paper: str) -> str:
    """A verdict against the paper's direction ("lower: 62.3" -> lower): holds / reversed / unresolved; "" when the
    paper gives no direction."""
    direction = paper.split(":")[0].split(" ")[0]
    if direction not in ("lower", "higher"):
        return ""
    return "unresolved" if v == "unresolved" else "holds" if v == direction else "reversed"


def reading(v: str, paper: str) -> str:
    """The table's verdict cell: a resolved verdict with its agreement with the paper ("lower (holds)")."""
    a = agreement(v, paper)
    return f"{v} ({a})" if a and v != "unresolved" else v


# -----------------------------------------------------------------------------------------------------------------------
# the results file: one JSON object per line, appended as each run finishes


def read_results(path: Path) -> list:
    """The records of the results file; a last line cut off by a kill mid-write is skipped (the run is redone)."""
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path}:{i + 1} is not a complete record (a run killed while writing?): skipped",
                  file=sys.stderr)
    return out


def append_result(path: Path, record: dict):
    """One line, flushed to disk before the runner moves on (a kill then loses at most the run in progress)."""
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(record, allow_nan=False) + "\n")  # after a torn line, a fresh one
        f.flush()
        os.fsync(f.fileno())


def key(r: dict) -> tuple:
    return r["row"], r["motion"], r["seed"], json.dumps(r["settings"], sort_keys=True)


# -----------------------------------------------------------------------------------------------------------------------
# one run


def demo_argv(motion: str, seed: int, s: dict, threads: int = 2) -> list:
    return ["--motion", motion, "--seed", str(seed), "--steps", str(s["steps"]), "--lr", str(s["lr"]),
            "--seeds", str(s["sample_seeds"]), "--base-seeds", str(s["base_seeds"]), "--no-before", "--samples", "",
            "--jobs", "1", "--threads", str(threads), "--denoiser", s.get("denoiser", "unet")]


def customized_run(row: str, motion: str, seed: int, s: dict, threads: int = 2) -> dict:
    """Customize with the row's overrides, then score the evaluation prompts (toy/demo.py)."""
    r = demo.main(demo_argv(motion, seed, s, threads), overrides=rows_of(s)[row][1], quiet=True, full=True)
    return {"novel": r["novel"]["after"]["per_video"], "base": r["base"]["after"]["per_video"], "parts": r["seconds"]}


def base_runs(motion: str, seeds: list, s: dict, threads: int = 2) -> list:
    """The base model on the same prompts, once; its leakage scored against each seed's training clips."""
    import torch

    from models import load_models

    args = demo.parse_args(demo_argv(motion, 0, s, threads))
    torch.set_num_threads(args.threads)
    models, scorer = load_models(args.model, denoiser=args.denoiser), toy_scorer.ToyScorer()
    novel, base, base_want = demo.prompts_for(motion, args.token, args.seeds, args.base_seeds)
    n = demo.score(models, [p for p, _ in novel], [k for _, k in novel], [motion] * len(novel), args, scorer,
                   quiet=True)
    b = demo.score(models, [p for p, _ in base], [k for _, k in base], base_want, args, scorer, quiet=True)
    out = []
    for seed in seeds:
        examples = demo.examples_for(motion, args.examples, seed, args.token)
        leak, nearest = toy_scorer.copy_scores(n["videos"], [c.video for c in examples])
        looks = {(c.colour, c.shape) for c in examples}
        asked = [tuple(p.split()[1:3]) for p, _ in novel]
        per_video = dict(n["per_video"], leak=leak.tolist(), nearest=nearest.tolist(),
                         copy=[float(lk in looks and lk != a) for lk, a in zip(n["looks"], asked)])
        out.append({"novel": per_video, "base": b["per_video"]})
    return out


def run_task(task: tuple) -> list:
    """One unit of work, in the runner or a worker process: (row, motion, seeds, settings, threads) -> one record per
    seed (the base model: every seed of a motion from one sampling pass; a customized row: one seed)."""
    row, motion, seeds, s, threads = task
    t0 = time.time()
    recs = base_runs(motion, seeds, s, threads) if row == BASE else [customized_run(row, motion, seeds[0], s, threads)]
    seconds = round((time.time() - t0) / len(seeds), 1)
    return [{"row": row, "motion": motion, "seed": k, "settings": s, **rec, "seconds": seconds, "threads": threads}
            for k, rec in zip(seeds, recs)]


# -----------------------------------------------------------------------------------------------------------------------
# the table


METRICS = (("novel-motion accuracy", "novel", "motion"), ("copy score > threshold", "novel", "leaked"),
           ("copy score (mean, x100)", "novel", "leak"), ("colour+shape copy rate", "novel", "copy"),
           ("base-motion accuracy", "base", "motion"))


def cells(records: list, thresholds: dict) -> dict:
    """row -> {(motion, seed): {metric: per-video array}}, with `leaked` = leak > the motion's threshold."""
    out = {}
    for r in records:
        per = {name: np.asarray(r[part][field], dtype=np.float64) for name, part, field in METRICS if field != "leaked"}
        per["copy score > threshold"] = (per["copy score (mean, x100)"] > thresholds[r["motion"]]).astype(np.float64)
        out.setdefault(r["row"], {})[(r["motion"], r["seed"])] = per
    return out


def table(records: list, settings: dict) -> str:
    """The markdown report: every row's metrics with 95% intervals, and paired differences to NewMove (the DiT's
    table: to dit-newmove)."""
    rows = rows_of(settings)
    ref = next(iter(rows))
    label = "NewMove" if ref == "newmove" else ref
    motions = sorted({r["motion"] for r in records})
    thresholds = {m: toy_scorer.calibrate_leakage(m)["threshold"] for m in motions}
    data = cells(records, thresholds)
    fmt = lambda m, lo, hi: f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"  # noqa: E731
    has_paper = any(paper for _, _, paper in rows.values())  # the DiT's rows have no paper to compare with
    lines = [f"| row | {'paper row' if has_paper else 'what trains / changes'} | runs | "
             + " | ".join(name for name, _, _ in METRICS) + " |",
             "| --- | --- | --- |" + " --- |" * len(METRICS)]
    for row in [BASE, *rows]:
        if row not in data:
            continue
        runs = sorted(data[row])
        stats = [fmt(*bootstrap(np.stack([data[row][k][name] for k in runs]))) for name, _, _ in METRICS]
        lines.append(f"| {row} | {rows[row][0] if row in rows else 'no customization'} | {len(runs)} | "
                     + " | ".join(stats) + " |")
    lines += ["", "A row's motions and seeds are the cells it has run (the runs column; the base model is scored on every "
              "motion and seed). With one run the interval resamples only its videos and says nothing about seed-to-seed "
              "variation; rows are compared in the paired table below, on shared cells only."]
    lines += ["", f"Paired differences to {label} (row minus {label}, percentage points, same motions, seeds, prompts and "
              "sampling seeds; 95% bootstrap interval); 'resolved' = the interval excludes 0"
              + ("; 'A minus B': row A against row B, likewise" if any(r in rows for r in VERSUS) else "")
              + ("; '(holds)' / '(reversed)' = a resolved difference in / against the paper's direction:" if has_paper
                 else ":"), ""]
    heads = ["novel-motion accuracy", "verdict", "paper", "copy score > threshold", "verdict", "paper",
             "base-motion accuracy", "verdict"]
    keep = [i for i, h in enumerate(heads) if has_paper or h != "paper"]
    lines += ["| row | pairs | " + " | ".join(heads[i] for i in keep) + " |", "| --- | --- |" + " --- |" * len(keep)]
    tally = {}  # holds / reversed / unresolved -> the paper's comparisons
    compared = [(row, ref, paper) for row, (_, _, paper) in rows.items()] + \
        [(row, other, None) for row, other in VERSUS.items() if row in rows]
    for row, base, paper in compared:
        if row == base or row not in data or base not in data:
            continue
        pairs = sorted(set(data[row]) & set(data[base]))
        if not pairs:
            continue
        cols = []
        paper = paper or ("", "")
        for name, claim in (("novel-motion accuracy", paper[0]), ("copy score > threshold", paper[1]),
                            ("base-motion accuracy", "")):
            d = np.stack([data[row][k][name] - data[base][k][name] for k in pairs])
            m, lo, hi = bootstrap(d)
            v = verdict(lo, hi)
            cols += [fmt(m, lo, hi), reading(v, claim)]
            if a := agreement(v, claim):  # a comparison the paper reports: tallied below the table
                tally.setdefault(a, []).append(
                    f"{row} {'accuracy' if name == 'novel-motion accuracy' else 'copying'}")
        cells_ = [cols[0], cols[1], paper[0], cols[2], cols[3], paper[1], cols[4], cols[5]]
        name = row if base == ref else f"{row} minus {base}"
        lines.append(f"| {name} | {len(pairs)} | " + " | ".join(cells_[i] for i in keep) + " |")
    if tally:
        lines += ["", "The paper's comparisons (its direction vs NewMove in accuracy and copying): " + "; ".join(
            f"{k} {len(tally[k])}: {', '.join(tally[k])}" for k in ("holds", "reversed", "unresolved") if k in tally)
            + "."]
    cal = [f"{m}: threshold {c['threshold']:.3f}, copies detected {100 * c['detected']:.0f}%"
           for m in motions for c in [toy_scorer.calibrate_leakage(m)]]
    lines += ["", f"Settings: {json.dumps(settings, sort_keys=True)}; motions: {', '.join(motions)}.",
              f"Copy-score thresholds (5% of held-out independent clips above; scorer.calibrate_leakage): "
              f"{'; '.join(cal)}."]
    custom = [r["seconds"] for r in records if r["row"] != BASE]
    if custom:
        lines.append(f"Compute: {len(custom)} customization runs, {sum(custom) / 3600:.1f} h of run time in all "
                     f"(mean {np.mean(custom):.0f} s per run, as timed in its process; with --jobs 2 two run at once)"
                     f"; the base model {sum(r['seconds'] for r in records if r['row'] == BASE) / 60:.0f} min.")
    dit = " --denoiser dit" if settings.get("denoiser") == "dit" else ""
    lines.append("Command (resumes; every row x motion x seed not yet in the results file): python toy/ablate.py"
                 f"{dit} --steps {settings['steps']} --lr {settings['lr']} --sample-seeds {settings['sample_seeds']} "
                 f"--base-seeds {settings['base_seeds']}")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--denoiser", default="unet", choices=("unet", "dit"), help="unet: the paper's Table 2 on the toy "
                   "UNet (toy/ablation.*); dit: the same questions of the toy DiT (DIT_ROWS, toy/ablation-dit.*)")
    p.add_argument("--rows", nargs="*", default=None, choices=[*ROWS, *DIT_ROWS], help="default: every row of the "
                   "--denoiser's table")
    p.add_argument("--motions", nargs="*", default=list(world.NOVEL_MOTIONS), choices=list(world.NOVEL_MOTIONS))
    p.add_argument("--seeds", type=int, default=3, help="customization seeds per (row, motion) (default 3)")
    p.add_argument("--steps", type=int, default=200, help="customization steps (the demo's 200)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (the demo's 6e-4; --denoiser dit: 2e-3, at "
                   "which the toy DiT learns the novel motion in 200 steps at all: docs/wan.md)")
    p.add_argument("--sample-seeds", type=int, default=4, help="sampling seeds per novel prompt: x 5 looks = videos")
    p.add_argument("--base-seeds", type=int, default=1, help="sampling seeds per base-motion prompt (x 30)")
    p.add_argument("--results", default=None, help="JSON-lines results, appended (default toy/ablation.jsonl; "
                   "--denoiser dit: toy/ablation-dit.jsonl)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, in separate processes with one torch thread "
                   "each (2 on a 2-core machine: about twice the runs per hour, toy/speed.md)")
    p.add_argument("--table", action="store_true", help="only write the markdown table from --results")
    p.add_argument("--out", default=None, help="the markdown table, rewritten (default toy/ablation.md; --denoiser "
                   "dit: toy/ablation-dit.md)")
    args = p.parse_args(argv)
    stem = "ablation-dit" if args.denoiser == "dit" else "ablation"
    args.lr = args.lr or (2e-3 if args.denoiser == "dit" else 6e-4)
    args.results = args.results or str(ROOT / "toy" / f"{stem}.jsonl")
    args.out = args.out or str(ROOT / "toy" / f"{stem}.md")
    family = DIT_ROWS if args.denoiser == "dit" else ROWS
    args.rows = list(family) if args.rows is None else args.rows
    if any(r not in family for r in args.rows):
        p.error(f"--rows: {', '.join(r for r in args.rows if r not in family)} not in the {args.denoiser} table")
    for flag in ("seeds", "steps", "sample_seeds", "base_seeds", "jobs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    settings = {"steps": args.steps, "lr": args.lr, "sample_seeds": args.sample_seeds, "base_seeds": args.base_seeds}
    if args.denoiser == "dit":  # (the UNet's settings stay as they were: its records keep matching)
        settings["denoiser"] = "dit"
    results, out = Path(args.results), Path(args.out)

    def write_table():
        records = [r for r in read_results(results) if r["settings"] == settings]
        if records:
            text = table(records, settings)
            weights.atomic_write(out, lambda tmp: Path(tmp).write_text(text), overwrite=True)
            print(f"wrote {out} ({len(records)} runs)")

    if args.table:
        return write_table()
    # the work not yet in the results file, seed-major (every row and motion on seed 0 first), so a runner stopped
    # early leaves a table over all motions; the base model first, once per motion for all its seeds
    done = {key(r) for r in read_results(results)}
    missing = lambda row, m, s: (row, m, s, json.dumps(settings, sort_keys=True)) not in done  # noqa: E731
    threads = 1 if args.jobs > 1 else 2  # the toy's ops are too small for 2 threads each (toy/speed.md)
    tasks = [(BASE, m, [s for s in range(args.seeds) if missing(BASE, m, s)], settings, threads) for m in args.motions]
    tasks = [t for t in tasks if t[2]] + [(row, m, [s], settings, threads) for s in range(args.seeds)
                                          for m in args.motions for row in args.rows if missing(row, m, s)]
    print(f"{len(tasks)} tasks to run ({len(done)} records in {results}), {args.jobs} at a time", flush=True)

    def finished(recs):
        for rec in recs:
            append_result(results, rec)
            print(f"{rec['row']} | {rec['motion']} | seed {rec['seed']}: novel-motion accuracy "
                  f"{100 * np.mean(rec['novel']['motion']):.0f}%, {rec['seconds']:.0f} s", flush=True)

    # separate processes for --jobs > 1 (spawned: a fresh interpreter each, no forked torch state); records are
    # appended here, in the order runs finish
    pool = cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) if args.jobs > 1 else None
    try:
        outs = map(run_task, tasks) if pool is None else \
            (f.result() for f in cf.as_completed([pool.submit(run_task, t) for t in tasks]))
        for n, recs in enumerate(outs):
            finished(recs)
            if (n + 1) % 10 == 0:
                write_table()  # now and then, so a stopped runner still leaves a table of what it finished
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)  # a failed run or Ctrl-C: start nothing new
    write_table()


if __name__ == "__main__":
    main()
