"""The toy-world demo: teach the toy text-to-video model a motion it has never seen, with NewMove, on a CPU.

    python toy/demo.py                                   # novel motion "moving in a circle", token "pll"
    python toy/demo.py --motion zigzagging --steps 800 --seeds 4

1. 8 example clips of the novel motion, each a random (colour, shape), captioned "a <colour> <shape> doing pll",
   plus a regularization set of base-motion clips with their own captions (toy/world.py);
2. the base model (--model, default toy/model) samples prompts with appearance pairs it never saw in training
   ("a red triangle doing pll", "a red triangle moving left", ...), scored by the analytic scorer (toy/scorer.py);
3. train.py customizes it with the NewMove defaults (temporal layers + cross-attention K/V, coarse-noise timesteps,
   real-video regularization) at toy-scale learning rate and steps;
   (with --jobs 2, the default, step 2 runs in a second process while this one trains, one thread each);
4. the same prompts and seeds are sampled again and scored (--jobs 2: half the videos in each process). The table:
   novel-motion accuracy before/after, appearance (colour) accuracy, copy rate (the video shows the colour+shape of
   a training example although the prompt asked for another), the share above the toy copy score's threshold, and
   base-motion accuracy before/after (forgetting); then how many customized novel-motion videos copy each example clip
   (toy copy score above its threshold);
5. every sampled video is kept (mp4, gif and png contact sheet, before/ and after/) with an index.json of prompt, seed
   and the scorer's reading, in --samples (default: a new folder demo_out/<date-time>), named at the end;
   `python toy/figures.py --samples <that folder>` draws the before/after figures in docs/images/ from it.
The same unet3d.py / vae.py / text_encoder.py / train.py / sample.py code as the 1.7B model, only smaller.
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
import math
import multiprocessing
import shlex
import tempfile
import time

import torch
from tqdm import tqdm

import evaluate
import metrics
import sample
import train
from delta import apply_delta
import weights
from models import load_models
from toy import world
from toy import scorer as toy_scorer
from toy.scorer import ToyScorer


def score(models, prompts, seeds, want_motions, args, scorer, train_looks=(), desc="sampling", quiet=False,
          train_videos=None, keep=None):
    """Sample (prompt, seed) pairs and score them: motion accuracy, colour accuracy, copy rate (a training clip's
    colour+shape instead of the asked one) and, given the training clips' videos, each video's leakage score (the
    leak_similarity of its nearest training clip, toy/scorer.py). Per-video lists under "per_video"; with a `keep`
    folder, every video is also written there (sample.save_video) and its file stem listed under "stems"."""
    chunks = range(0, len(prompts), 16)
    solver = "unipc" if models.dit is not None else "ddim"  # the DiT: Wan's sampler; the UNet: ModelScope's
    videos = torch.cat([sample.generate(models, prompts[i:i + 16], seeds[i:i + 16], frames=8, height=32, width=32,
                                        steps=args.sample_steps, guidance=args.guidance, batch_size=16, solver=solver,
                                        progress=False)
                        for i in tqdm(chunks, desc=desc, unit="batch", disable=quiet)])  # (N, 3, F, H, W) uint8
    found = [scorer.analyse(v) for v in videos]  # one analysis per video: motion, colour and shape
    motions, looks = [a["motion"] for a in found], [(a["colour"], a["shape"]) for a in found]
    asked = [tuple(p.split()[1:3]) for p in prompts]  # "a red triangle ..." -> ("red", "triangle")
    per_video = {"motion": [float(m == w) for m, w in zip(motions, want_motions)],
                 "colour": [float(lk[0] == a[0]) for lk, a in zip(looks, asked)],
                 "copy": [float(lk in train_looks and lk != a) for lk, a in zip(looks, asked)]}
    if train_videos is not None:
        leak, nearest = toy_scorer.copy_scores(videos, train_videos)
        per_video.update(leak=leak.tolist(), nearest=nearest.tolist())
    stems = [sample.save_video(v, keep, f"{sample.slug(p)}-seed{k}") for v, p, k in zip(videos, prompts, seeds)] \
        if keep else None  # (writing draws no random numbers: it changes no result)
    return with_means({"per_video": per_video, "videos": videos, "motions": motions, "looks": looks, "stems": stems})


def with_means(r: dict) -> dict:
    """score()'s result with the set's motion / colour / copy rates (the means of its per-video lists)."""
    return {**r, **{k: sum(v) / len(v) for k, v in r["per_video"].items() if k in ("motion", "colour", "copy")}}


def joined(first: dict, second: dict) -> dict:
    """One score() result from the results of two consecutive slices of a prompt set (the after-scoring split)."""
    per_video = {k: first["per_video"][k] + second["per_video"][k] for k in first["per_video"]}
    stems = first["stems"] + second["stems"] if first["stems"] is not None else None
    return with_means({"per_video": per_video, "videos": torch.cat([first["videos"], second["videos"]]),
                       "motions": first["motions"] + second["motions"], "looks": first["looks"] + second["looks"],
                       "stems": stems})


def copies_per_clip(per_video: dict, clip_names: list, threshold: float) -> dict:
    """metrics.copies_per_clip on score()'s leakage scores: per example clip, the videos above `threshold` nearest it."""
    return metrics.copies_per_clip(clip_names, [clip_names[k] for k in per_video["nearest"]],
                                   [x > threshold for x in per_video["leak"]])


def score_sets(args, sets: dict, delta_path, when: str, quiet: bool, keep=None) -> dict:
    """score() of each set {name: (prompts, seeds, wanted motions, score() extras)} with the model plus the delta
    (None: the base model; noise-gated with --delta-from-t), in this process (or a worker's: everything it needs
    comes in the arguments); videos written to `keep`, if given."""
    models = load_models(args.model, denoiser=args.denoiser)
    if delta_path is not None:
        apply_delta(models, delta_path, args.delta_from_t)
    scorer = ToyScorer()
    return {name: score(models, prompts, seeds, wants, args, scorer, desc=f"{when}: {name} prompts", quiet=quiet,
                        keep=keep, **extra)
            for name, (prompts, seeds, wants, extra) in sets.items()}


def split_after(sets: dict) -> tuple:
    """The customized model's prompt sets in two halves of equal work, (the worker's, this process's): the novel set
    and the tail of the base set there, the head of the base set here (joined() puts the base set back together)."""
    if "base" not in sets:
        return sets, {}
    prompts, seeds, wants, extra = sets["base"]
    k = min(len(prompts), (len(prompts) + len(sets["novel"][0])) // 2)  # this process's share of all videos
    there = {"novel": sets["novel"], "base tail": (prompts[k:], seeds[k:], wants[k:], extra)}
    return ({n: v for n, v in there.items() if v[0]}, {"base": (prompts[:k], seeds[:k], wants[:k], extra)})


def train_config(args, work: Path, **overrides):
    """The demo's customization run: train.py's defaults (the three choices) at toy scale, on the folders main writes
    in `work`; `overrides` are train.Config fields (toy/ablate.py's rows). The element-wise intermediates are kept
    rather than recomputed, for speed only: the same gradients bit for bit (toy/speed.md)."""
    return train.Config(**{**dict(
        model=args.model, videos=str(work / "videos"), reg_videos=str(work / "reg"), reg_caption="a shape moving",
        token=args.token, frames=8, size=32, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        precision="fp32", log_every=25, ckpt_every=0, out=str(work / "run"), seed=args.seed, prior_count=8,
        val_steps=args.sample_steps, elementwise_recompute=False, optimizer=args.optimizer, denoiser=args.denoiser),
        **overrides})


def examples_for(motion: str, n: int, seed: int, token: str) -> list:
    """The demo's example clips of `motion` (world clips, never in an evaluation look), captioned with the token."""
    clips = world.make_dataset(n, [motion], seed=1000 + seed, exclude_combos=world.HELD_OUT_COMBOS)
    for c in clips:
        c.caption = f"a {c.colour} {c.shape} doing {token}"
    return clips


def prompts_for(motion: str, token: str, seeds: int, base_seeds: int) -> tuple:
    """([(novel prompt, sampling seed)], [(base-motion prompt, seed)], the base prompts' motions): every evaluation
    look (HELD_OUT_COMBOS, appearance pairs the base model never saw) with the token, and with each base motion."""
    combos = sorted(world.HELD_OUT_COMBOS)
    novel = [(f"a {c} {s} doing {token}", k) for c, s in combos for k in range(seeds)]
    base = [(world.caption_for(c, s, m), k) for m in world.BASE_MOTIONS for c, s in combos for k in range(base_seeds)]
    return novel, base, [" ".join(pr.split()[3:]) for pr, _ in base]


def prompt_sets(args, examples: list) -> dict:
    """The sets scored before and after customization, {name: (prompts, seeds, wanted motions, extras)}: "novel" (the
    token on every evaluation look; extras: the examples' looks and videos, for the copy scores) and "base" (each base
    motion on those looks; absent with --base-seeds 0)."""
    novel, base, base_want = prompts_for(args.motion, args.token, args.seeds, args.base_seeds)
    sets = {"novel": ([p for p, _ in novel], [k for _, k in novel], [args.motion] * len(novel),
                      {"train_looks": {(c.colour, c.shape) for c in examples},
                       "train_videos": [c.video for c in examples]})}
    if base:
        sets["base"] = ([p for p, _ in base], [k for _, k in base], base_want, {})
    return sets


def samples_folder(arg, quiet: bool):
    """The folder to keep the samples in: --samples as given ('' = none), unset = a new demo_out/<date-time> (none when
    quiet: tests and toy/ablate.py). Created (and checked writable) here, before the work; never an existing one."""
    if (arg is None and quiet) or arg == "":
        return None
    if arg is None:  # a fresh name: demo_out/20261129-204500, or -1, -2, ... if a run in the same second took it
        stem = Path("demo_out") / time.strftime("%Y%m%d-%H%M%S")
        folder = next(f for k in range(1000) if not (f := Path(f"{stem}-{k}" if k else stem)).exists())
    else:
        folder = Path(arg)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise SystemExit(f"error: --samples {folder} exists and is not an empty folder; choose another")
    try:
        return weights.writable_dir(folder, "--samples")
    except weights.WeightsError as e:
        raise SystemExit(f"error: {e}") from None


def keep_samples(folder: Path, info: dict, sets: dict) -> Path:
    """Write every sampled video to folder/<when>/<prompt>-seed<k> (sample.save_video: mp4, gif, png contact sheet;
    a result whose "stems" score() wrote is only indexed) and folder/index.json: `info` plus per video its set,
    prompt, seed, wanted motion and, per `when`, the file stem and the scorer's motion, colour and shape.
    sets: name -> (prompts, seeds, wanted motions, {when: score() result}); a result without videos (not sampled:
    --no-before) is left out. Returns the index path."""
    entries = []
    for name, (prompts, seeds, wants, results) in sets.items():
        for i, (prompt, seed, want) in enumerate(zip(prompts, seeds, wants)):
            entry = {"set": name, "prompt": prompt, "seed": seed, "want": want}
            for when, r in results.items():
                if "videos" not in r:
                    continue
                stem = r["stems"][i] if r.get("stems") else sample.save_video(  # (score() wrote it already)
                    r["videos"][i], folder / when, f"{sample.slug(prompt)}-seed{seed}")
                colour, shape = r["looks"][i]
                entry[when] = {"stem": stem.relative_to(folder).as_posix(), "motion": r["motions"][i],
                               "colour": colour, "shape": shape}
                per_video = r.get("per_video", {})  # (a result built by hand, as toy/figures.py's tests do, has none)
                entry[when].update({k: per_video[k][i] for k in ("leak", "nearest") if k in per_video})
            entries.append(entry)
    text = json.dumps({**info, "videos": entries}, indent=1, allow_nan=False) + "\n"
    return weights.atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(text), overwrite=True)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "toy" / "model"), help="toy base model directory")
    p.add_argument("--motion", default="moving in a circle", choices=world.NOVEL_MOTIONS, help="the motion to teach")
    p.add_argument("--token", default="pll")
    p.add_argument("--examples", type=int, default=8, help="example clips of the new motion")
    p.add_argument("--reg", type=int, default=24, help="regularization clips of base motions")
    p.add_argument("--steps", type=int, default=200, help="customization steps (toy/speed.md: 600 at lr 2e-4 scores "
                   "the same, 3x slower)")
    p.add_argument("--lr", type=float, default=6e-4, help="toy-scale learning rate (the 1.7B model uses 5e-6)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"),
                   help="train.py --optimizer (adamw8bit: bitsandbytes' 8-bit AdamW; docs/memory.md)")
    p.add_argument("--seeds", type=int, default=4, help="sampling seeds per novel-motion prompt")
    p.add_argument("--base-seeds", type=int, default=1, help="sampling seeds per base-motion prompt (0: skip the "
                   "forgetting check)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default 7.5; with "
                   "--denoiser dit 5.0, Wan's)")
    p.add_argument("--denoiser", default="unet", choices=("unet", "dit"), help="the toy model's UNet, or its "
                   "Wan-architecture DiT (toy/model/dit/: rectified flow, sampled with UniPC; train.py --denoiser)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="2: score the base model in a second process "
                   "while this one trains (one thread each); 1: everything in this process with --threads")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads with --jobs 1")
    p.add_argument("--out", default="", help="keep the run here ('' = a temporary folder)")
    p.add_argument("--no-before", action="store_true", help="skip scoring the base model (the ablation runner)")
    p.add_argument("--delta", default=None, help="score this delta (e.g. a kept run's --out/run/delta.safetensors) "
                   "instead of training one; the other options must match the run's")
    p.add_argument("--delta-from-t", type=float, default=None, metavar="TAU", help="customized weights only for "
                   "sampling steps with t >= TAU, the base model below (delta.py)")
    p.add_argument("--samples", default=None, help="keep the sampled videos and their index.json here (a new or "
                   "empty folder; default: a new demo_out/<date-time>; '' = do not keep them). Videos are written as "
                   "they are scored, index.json last: a folder without it is an interrupted run")
    return p


def parse_args(argv=None):
    """parser()'s arguments, the per-denoiser defaults filled in."""
    args = parser().parse_args(argv)
    if args.guidance is None:
        args.guidance = 5.0 if args.denoiser == "dit" else 7.5
    return args


def main(argv=None, overrides=None, quiet=False, full=False):
    """Run the demo; `overrides` are train.Config fields (the ablation runner uses them). Returns the table rows
    {name: (before, after)}; with full=True {"rows": those, "novel": {"before", "after"}, "base": {...}}: score()'s
    results, with leakage scores for the novel prompts (toy/ablate.py), and "copies_per_training_clip"."""
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
    keep = samples_folder(args.samples, quiet)  # before the work: a bad --samples fails now, not after 15 min
    t0 = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        # 1. data: novel-motion examples bound to the token, base-motion regularization clips
        examples = examples_for(args.motion, args.examples, args.seed, args.token)
        paths = world.write_folder(examples, work / "videos")
        clip_names = [f"{p.name} ({c.colour} {c.shape})" for p, c in zip(paths, examples)]  # the copy table's names
        world.write_regularization_set(work / "reg", args.reg, args.seed)

        # 2. prompts with appearance pairs the base model never saw: (prompts, seeds, wanted motions, extras) per set
        sets = prompt_sets(args, examples)
        novel, base, base_want = prompts_for(args.motion, args.token, args.seeds, args.base_seeds)  # (the table's)
        # --jobs 2: a second process (one thread each: the toy's ops gain little from a second thread, toy/speed.md)
        # scores the base model while this one trains, then half of the customized model's videos while this one
        # scores the other half; --jobs 1: all here, with --threads
        pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                                      initargs=(1,)) if args.jobs > 1 else None
        torch.set_num_threads(1 if pool else args.threads)
        try:
            def run(f, *a):  # a future: run by the worker (--jobs 2) or here, at once (--jobs 1)
                if pool:
                    return pool.submit(f, *a)
                done = cf.Future()
                done.set_result(f(*a))
                return done

            # the worker's queue, in order: the base model's videos (written to before/ as they are scored), then the
            # copy score's threshold, both while this process trains
            before = None if args.no_before else run(score_sets, args, sets, None, "base model", quiet,
                                                     keep and keep / "before")
            calibration = run(toy_scorer.calibrate_leakage, args.motion, args.examples)

            # 3. NewMove customization with train.py's defaults, toy-scale lr/steps (and, for speed only, the
            # element-wise intermediates kept rather than recomputed: the same gradients bit for bit, toy/speed.md)
            t_train = time.time()
            delta = args.delta or train.main(train_config(args, work, **(overrides or {})))
            t_train = time.time() - t_train

            # 4. the same prompts and seeds, customized: with --jobs 2 half the videos each (split_after), else the
            # novel set, then the base set
            t_after = time.time()
            there_sets, here_sets = split_after(sets) if pool else ({"novel": sets["novel"]}, {
                k: v for k, v in sets.items() if k != "novel"})
            there = run(score_sets, args, there_sets, delta, "customized", quiet, keep and keep / "after")
            here = score_sets(args, here_sets, delta, "customized", quiet, keep and keep / "after")
            after = {**there.result(), **here}
            if "base tail" in after:
                after["base"] = joined(after["base"], after.pop("base tail"))
            t_after = time.time() - t_after
            before = before.result() if before else {}
            threshold = calibration.result()["threshold"]
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    nan = {"motion": float("nan"), "colour": float("nan"), "copy": float("nan")}
    before_novel, before_base = before.get("novel", nan), before.get("base", nan)
    after_novel, after_base = after["novel"], after.get("base", nan)
    # the toy copy score's threshold (5% of held-out videos that copy nothing score above it) and, per example clip,
    # the customized novel videos above it that are nearest to that clip: the clip a user would drop
    copies = copies_per_clip(after_novel["per_video"], clip_names, threshold)

    def leaked(r):  # the share of novel videos above the threshold (NaN: not scored, --no-before)
        return sum(x > threshold for x in r["per_video"]["leak"]) / len(novel) if "per_video" in r else float("nan")

    rows = [("novel-motion accuracy", before_novel["motion"], after_novel["motion"]),
            ("appearance (colour) accuracy, novel prompts", before_novel["colour"], after_novel["colour"]),
            ("copy rate, novel prompts", before_novel["copy"], after_novel["copy"]),
            ("copy score > threshold, novel prompts", leaked(before_novel), leaked(after_novel)),
            ("base-motion accuracy (forgetting)", before_base["motion"], after_base["motion"]),
            ("appearance (colour) accuracy, base prompts", before_base["colour"], after_base["colour"])]
    if not quiet:
        print(f"\nNewMove on the toy world: teach '{args.motion}' as '{args.token}' from {args.examples} clips, "
              f"{args.steps} steps; unseen appearance pairs, {args.seeds} seeds\n")
        print("| metric | base model | customized |\n| --- | --- | --- |")
        for name, a, b in rows:
            print(f"| {name} | {100 * a:.0f}% | {100 * b:.0f}% |")
        print(f"\n(chance for motion: {100 / len(world.MOTIONS):.0f}%; {time.time() - t0:.0f} s in all: training "
              f"{t_train:.0f} s, scoring the customized model {t_after:.0f} s, --jobs {args.jobs})")
        print(f"\nExample clips copied by the customized model's {len(novel)} novel-motion videos (toy copy score > "
              f"{threshold:.3f}, nearest clip):\n")
        print("\n".join(evaluate.copies_table(copies)))

    # 5. keep the samples: the index (score() wrote the videos as it went, keep_samples any it did not)
    if keep:
        info = {"command": "python toy/demo.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                "motion": args.motion, "token": args.token, "steps": args.steps, "seed": args.seed,
                "sample_steps": args.sample_steps, "guidance": args.guidance, "frames": 8, "height": 32, "width": 32,
                "table": {name: [None if math.isnan(x) else x for x in (a, b)] for name, a, b in rows},  # NaN: not run
                "copy_threshold": threshold, "copies_per_training_clip": copies}
        sets = {"novel": ([p for p, _ in novel], [k for _, k in novel], [args.motion] * len(novel),
                          {"before": before_novel, "after": after_novel}),
                "base": ([p for p, _ in base], [k for _, k in base], base_want,
                         {"before": before_base, "after": after_base})}
        keep_samples(keep, info, sets)
        if not quiet:
            print(f"samples: {keep}")
    table = {name: (a, b) for name, a, b in rows}
    if full:
        drop = lambda r: {k: v for k, v in r.items() if k not in ("videos", "stems")}  # noqa: E731
        return {"rows": table, "novel": {"before": drop(before_novel), "after": drop(after_novel)},
                "seconds": {"train": round(t_train, 1), "after": round(t_after, 1), "all": round(time.time() - t0, 1)},
                "base": {"before": drop(before_base), "after": drop(after_base)}, "copies_per_training_clip": copies}
    return table


if __name__ == "__main__":
    main()
