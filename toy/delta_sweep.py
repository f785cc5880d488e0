"""What noise gating and compression (delta.py) cost and buy, measured in the toy world.

    python toy/delta_sweep.py                        # circle and zigzag, customization seed 0 (~10 min a variant here)
    python toy/delta_sweep.py --table                # only rewrite toy/delta_sweep.md from toy/delta_sweep.jsonl

For each (motion, seed) one NewMove delta is trained with the demo's recipe (toy/demo.py, kept in --work), then the
demo's prompts are scored with it under each variant: gated at TAU (customized weights for t >= TAU, base below;
TAU = 0 is the plain delta, 1000 the base model), compressed to rank r (delta.py compress), saved in bf16. Columns:
novel-motion accuracy, colour accuracy and leakage (toy/scorer.py copy score: mean, and % of videos above the
calibrated threshold) on the 20 novel prompts, base-motion accuracy on the 30 base prompts. Finished variants are
appended to --results (JSON lines) and skipped when the sweep is run again.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `python toy/x.py` puts toy/ on sys.path, not the repository root
    import omp  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    omp.choose_wait_policy()

import argparse
import json
import shlex
import time

import torch

import delta
from models import load_models
from toy import demo, world
from weights import cast, read_state_dict, save_state_dict


def variants(taus, ranks) -> list:
    """[(name, delta.py option)] in table order."""
    return ([(f"gate TAU={t}", {"tau": t}) for t in taus] + [(f"rank {r}", {"rank": r}) for r in ranks]
            + [("bf16 file", {"dtype": "bf16"})])


def delta_file(run: Path, option: dict, base_sd: dict) -> Path:
    """The delta a variant loads: the trained one, or a compressed / bf16 copy written next to it once."""
    plain = run / "run" / "delta.safetensors"
    if "tau" in option:
        return plain
    path = run / f"delta-{option.get('rank', option.get('dtype'))}.safetensors"
    if not path.exists():
        sd = read_state_dict(plain)
        small = delta.compress(sd, base_sd, rank=option["rank"]) if "rank" in option else cast(sd, option["dtype"])
        save_state_dict(small, path)
    return path


def measure(motion: str, seed: int, name: str, option: dict, args, base_sd: dict) -> dict:
    """One variant of one (motion, seed): the demo's scores (training the delta first if --work has none; its own
    scores are the plain delta's, which TAU = 0 reproduces bit for bit, tests/test_delta.py)."""
    run = Path(args.work) / f"{motion.replace(' ', '-')}-seed{seed}"
    common = ["--motion", motion, "--seed", str(seed), "--no-before", "--samples", "", "--jobs", "1", "--threads",
              str(args.threads), *shlex.split(args.demo_args)]
    t0, res = time.time(), None
    if not (run / "run" / "delta.safetensors").exists():
        res = demo.main(common + ["--out", str(run)], quiet=True, full=True)
    path = delta_file(run, option, base_sd)
    if res is None or option != {"tau": 0}:
        extra = ["--delta-from-t", str(option["tau"])] if "tau" in option else []
        res = demo.main(common + ["--delta", str(path)] + extra, quiet=True, full=True)
    novel, base = res["novel"]["after"], res["base"]["after"]
    leak = novel["per_video"]["leak"]
    return {"motion": motion, "seed": seed, "variant": name, **option, "novel": novel["motion"],
            "colour": novel["colour"], "leak_mean": sum(leak) / len(leak),
            "leak_above": res["rows"]["copy score > threshold, novel prompts"][1], "base": base["motion"],
            "bytes": path.stat().st_size, "seconds": round(time.time() - t0, 1)}


def table(records: list, names: list) -> str:
    """Markdown: per variant, the mean over the (motion, seed) runs of each column (and each run's novel accuracy)."""
    lines = ["| variant | runs | novel motion (per run) | colour | leakage mean | leak above threshold | base motion | "
             "file |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        rs = [r for r in records if r["variant"] == name]
        if rs:
            m = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
            each = ", ".join(f"{100 * r['novel']:.0f}" for r in rs)
            lines.append(f"| {name} | {len(rs)} | {100 * m('novel'):.0f}% ({each}) | {100 * m('colour'):.0f}% | "
                         f"{m('leak_mean'):.3f} | {100 * m('leak_above'):.0f}% | {100 * m('base'):.0f}% | "
                         f"{m('bytes') / 1e6:.2f} MB |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--motions", nargs="+", default=["moving in a circle", "zigzagging"], choices=world.NOVEL_MOTIONS)
    p.add_argument("--seeds", type=int, default=1, help="customization seeds per motion")
    p.add_argument("--tau", type=int, nargs="+", default=[0, 200, 400, 600, 800, 1000])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--demo-args", default="", help="more toy/demo.py options (the same for every run), e.g. '--steps 2'")
    p.add_argument("--work", default="delta_sweep_runs", help="the trained deltas (kept: a rerun reuses them)")
    p.add_argument("--results", default=str(ROOT / "toy" / "delta_sweep.jsonl"))
    p.add_argument("--out", default=str(ROOT / "toy" / "delta_sweep.md"))
    p.add_argument("--table", action="store_true", help="only write --out from --results")
    args = p.parse_args(argv)
    names = [n for n, _ in variants(args.tau, args.ranks)]
    results = Path(args.results)
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if not args.table:
        base_sd = load_models(demo.parser().get_default("model")).unet.state_dict()
        torch.set_num_threads(args.threads)
        for seed in range(args.seeds):
            for motion in args.motions:
                for name, option in variants(args.tau, args.ranks):
                    if any((r["motion"], r["seed"], r["variant"]) == (motion, seed, name) for r in done):
                        continue
                    rec = measure(motion, seed, name, option, args, base_sd)
                    done.append(rec)
                    with open(results, "a") as f:  # appended as it goes: a stopped sweep loses one variant at most
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps(rec), flush=True)
    head = (f"# Noise gating and compression of a toy NewMove delta\n\n{len(done)} measurements from "
            f"`{results.name}`; runs: {sorted({(r['motion'], r['seed']) for r in done})}.\n"
            f"Command: `python toy/delta_sweep.py {shlex.join(sys.argv[1:] if argv is None else argv)}` (demo recipe: "
            f"200 steps at lr 6e-4; 20 novel and 30 base-motion prompts per run; DDIM 25 steps, t = 961 ... 1).\n\n")
    Path(args.out).write_text(head + table(done, names))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
