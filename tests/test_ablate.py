"""toy/ablate.py and the toy copy score: the bootstrap statistics on runs with a known answer, the leakage score on
clips that do and do not copy a training clip, and the runner's resume (a killed runner neither repeats nor loses
runs)."""

import json

import numpy as np
import pytest

from toy import ablate, demo, world
from toy import scorer as toy_scorer


def test_bootstrap_intervals_cover_the_truth_and_pairing_resolves_shared_run_effects():
    # a constant has a point interval
    assert ablate.bootstrap(np.full((4, 5), 0.3)) == pytest.approx((0.3, 0.3, 0.3))
    # coverage: runs with their own effect (sd 0.1) plus video noise (sd 0.2) around a true mean of 0.5
    rng = np.random.default_rng(0)
    hits = 0
    for k in range(60):
        x = 0.5 + rng.normal(0, 0.1, (12, 1)) + rng.normal(0, 0.2, (12, 20))
        _, lo, hi = ablate.bootstrap(x, n=1000, seed=k)
        hits += lo <= 0.5 <= hi
    assert 0.85 <= hits / 60 <= 1.0, hits
    # pairing: two rows share large per-run effects and differ by 0.05 everywhere; the paired difference resolves it,
    # the rows' own intervals overlap
    runs = rng.normal(0, 0.3, (12, 1)) + rng.normal(0, 0.01, (12, 20))
    a, b = runs + 0.05, runs
    m, lo, hi = ablate.bootstrap(a - b)
    assert m == pytest.approx(0.05) and ablate.verdict(lo, hi) == "higher"
    assert ablate.bootstrap(a)[1] < ablate.bootstrap(b)[2]  # unpaired: overlapping intervals
    assert ablate.verdict(-0.1, 0.2) == "unresolved" and ablate.verdict(-0.3, -0.1) == "lower"
    # against the paper's direction (its Table 2 cell "lower: 62.3"): a resolved difference holds or is reversed
    assert ablate.reading("lower", "lower: 62.3") == "lower (holds)"
    assert ablate.reading("higher", "lower (fails)") == "higher (reversed)"
    assert ablate.reading("unresolved", "higher: 17.0") == "unresolved" and ablate.reading("lower", "") == "lower"


@pytest.mark.slow
def test_copy_score_separates_a_copied_training_clip_from_an_independent_one():
    motion = "moving in a circle"
    cal = toy_scorer.calibrate_leakage(motion, sets=2, per_set=10)
    assert cal["detected"] >= 0.9 and cal["copy_mean"] > cal["threshold"] > cal["null_mean"]
    train = world.make_dataset(8, [motion], seed=7, exclude_combos=world.HELD_OUT_COMBOS)  # a set calibration never saw
    look = ("red", "triangle")  # an evaluation look: no training clip has it
    # a "generated" video that redraws training clip 3 (its background, size and path) in the asked look
    copy = world.degrade(world.make_clip(np.random.SeedSequence([7, 3]), motion=motion, look=look,
                                         exclude_combos=world.HELD_OUT_COMBOS).video, seed=1)
    fresh = world.degrade(world.make_clip(np.random.SeedSequence([12345, 0]), motion=motion, look=look).video, seed=1)
    scores, nearest = toy_scorer.copy_scores([copy, fresh], [c.video for c in train])
    assert scores[0] > cal["threshold"] > scores[1], (scores, cal)
    assert nearest[0] == 3  # traced to the clip it copies
    # the demo's per-clip count: the copy for clip 3 only, listed first; the fresh video for none
    names = [f"clip{k}" for k in range(8)]
    copies = demo.copies_per_clip({"leak": scores.tolist(), "nearest": nearest.tolist()}, names, cal["threshold"])
    assert [v["videos"] for v in copies.values()] == [1] + [0] * 7 and next(iter(copies)) == "clip3"


def _fake_record(row, motion, seed):
    rng = np.random.default_rng(abs(hash((row, motion, seed))) % 2 ** 32)
    novel = {"motion": rng.integers(0, 2, 4).astype(float).tolist(), "colour": [1.0] * 4, "copy": [0.0] * 4,
             "leak": rng.uniform(0.5, 1.0, 4).tolist(), "nearest": [0] * 4}
    return {"novel": novel, "base": {"motion": [1.0] * 3, "colour": [1.0] * 3, "copy": [0.0] * 3}}


class Killed(Exception):
    pass


def test_runner_resumes_without_repeating_or_losing_runs(tmp_path, monkeypatch):
    calls, kill = [], [True]

    def customized(row, motion, seed, s, threads):
        calls.append((row, motion, seed))
        if kill[0] and len(calls) == 3:
            raise Killed  # the runner is stopped during its third run
        return _fake_record(row, motion, seed)

    monkeypatch.setattr(ablate, "customized_run", customized)
    monkeypatch.setattr(ablate, "base_runs", lambda motion, seeds, s, threads: [_fake_record(ablate.BASE, motion, k)
                                                                        for k in seeds])
    monkeypatch.setattr(toy_scorer, "calibrate_leakage",
                        lambda m: {"threshold": 0.8, "detected": 1.0})
    results, out = tmp_path / "runs.jsonl", tmp_path / "table.md"
    argv = ["--rows", "newmove", "uniform", "--motions", "zigzagging", "--seeds", "2", "--steps", "5", "--jobs", "1",
            "--results", str(results), "--out", str(out)]  # one process: the fakes above are not in a worker
    with pytest.raises(Killed):
        ablate.main(argv)
    # seed-major: the base model (both seeds), then every row on seed 0, then seed 1; killed during newmove seed 1
    assert [(r["row"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())] == [
        ("base model", 0), ("base model", 1), ("newmove", 0), ("uniform", 0)]
    with open(results, "a") as f:
        f.write('{"row": "uniform", "motion": "zig')  # a record cut off by a kill mid-write
    calls.clear()
    kill[0] = False
    ablate.main(argv)
    assert calls == [("newmove", "zigzagging", 1), ("uniform", "zigzagging", 1)]  # only what was missing
    records = ablate.read_results(results)
    assert sorted((r["row"], r["seed"]) for r in records) == sorted(
        [(row, k) for row in ("base model", "newmove", "uniform") for k in (0, 1)])
    text = out.read_text()
    assert "| uniform | (d) uniform timestep sampling | 2 |" in text and "| uniform | 2 |" in text
    # other settings are other runs: never mixed into this table
    ablate.main([*argv[:-4], "--steps", "6", "--results", str(results), "--out", str(tmp_path / "other.md")])
    assert "| newmove |" in (tmp_path / "other.md").read_text() and len(ablate.read_results(results)) == 12


def test_dit_table_runs_the_dit_rows_against_dit_newmove(tmp_path, monkeypatch):
    """--denoiser dit: the DiT's rows, the denoiser in the settings (the UNet table's records never mix in) and in the
    demo's arguments, its own default files, and paired differences to dit-newmove."""
    seen = []

    def customized(row, motion, seed, s, threads):
        seen.append((row, ablate.demo_argv(motion, seed, s)[-1], ablate.rows_of(s)[row][1]))
        return _fake_record(row, motion, seed)

    monkeypatch.setattr(ablate, "customized_run", customized)
    monkeypatch.setattr(ablate, "base_runs", lambda motion, seeds, s, threads: [_fake_record(ablate.BASE, motion, k)
                                                                        for k in seeds])
    monkeypatch.setattr(toy_scorer, "calibrate_leakage", lambda m: {"threshold": 0.8, "detected": 1.0})
    results, out = tmp_path / "dit.jsonl", tmp_path / "dit.md"
    ablate.main(["--denoiser", "dit", "--rows", "dit-newmove", "dit-self-qk", "--motions", "zigzagging", "--seeds",
                 "1", "--jobs", "1", "--results", str(results), "--out", str(out)])
    assert seen == [("dit-newmove", "dit", {"denoiser": "dit"}),
                    ("dit-self-qk", "dit", {"denoiser": "dit", "preset": "dit-self-qk"})]
    assert {r["settings"]["denoiser"] for r in ablate.read_results(results)} == {"dit"}
    text = out.read_text()
    assert "Paired differences to dit-newmove" in text and "| dit-self-qk | 1 |" in text and "--denoiser dit" in text
    with pytest.raises(SystemExit):  # a UNet row is not in the DiT's table
        ablate.main(["--denoiser", "dit", "--rows", "uniform", "--results", str(results), "--out", str(out)])


def test_a_versus_row_is_also_compared_with_its_own_reference(monkeypatch):
    """ablate.VERSUS: dit-uniform-shift1 gets a line against dit-newmove and one against dit-shift1 (coarse vs uniform
    at the same shift), each the paired mean of its own reference's runs."""
    monkeypatch.setattr(toy_scorer, "calibrate_leakage", lambda m: {"threshold": 0.8, "detected": 1.0})
    settings = {"steps": 200, "lr": 0.002, "sample_seeds": 4, "base_seeds": 1, "denoiser": "dit"}
    accuracy = {"base model": 0.0, "dit-newmove": 0.25, "dit-shift1": 0.5, "dit-uniform-shift1": 1.0}
    records = [{"row": row, "motion": "zigzagging", "seed": k, "settings": settings, "seconds": 1.0,
                "novel": {"motion": [a] * 4, "colour": [1.0] * 4, "copy": [0.0] * 4, "leak": [0.5] * 4},
                "base": {"motion": [1.0] * 3, "colour": [1.0] * 3, "copy": [0.0] * 3}}
               for row, a in accuracy.items() for k in (0, 1)]
    text = ablate.table(records, settings)
    assert "| dit-uniform-shift1 | 2 | 75.0 [75.0, 75.0] | higher |" in text
    assert "| dit-uniform-shift1 minus dit-shift1 | 2 | 50.0 [50.0, 50.0] | higher |" in text
    assert "| dit-shift1 minus" not in text and "'A minus B'" in text


def fake_task(task):
    """A run in a worker process: a fake record naming the process it ran in."""
    import os
    row, motion, seeds, s, threads = task
    return [{"row": row, "motion": motion, "seed": k, "settings": s, **_fake_record(row, motion, k), "seconds": 0.0,
             "threads": threads, "pid": os.getpid()} for k in seeds]


@pytest.mark.slow
def test_parallel_runner_runs_in_worker_processes_with_one_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "run_task", fake_task)  # looked up at submit: the workers import it from this module
    monkeypatch.setattr(toy_scorer, "calibrate_leakage", lambda m: {"threshold": 0.8, "detected": 1.0})
    results = tmp_path / "runs.jsonl"
    argv = ["--rows", "newmove", "token", "--motions", "zigzagging", "bouncing", "--seeds", "2", "--jobs", "2",
            "--results", str(results), "--out", str(tmp_path / "table.md")]
    ablate.main(argv)
    records = ablate.read_results(results)
    assert sorted((r["row"], r["motion"], r["seed"]) for r in records) == sorted(
        (row, m, k) for row in ("base model", "newmove", "token") for m in ("zigzagging", "bouncing") for k in (0, 1))
    import os
    assert os.getpid() not in {r["pid"] for r in records} and {r["threads"] for r in records} == {1}
    ablate.main(argv)  # nothing left to do
    assert len(ablate.read_results(results)) == 12


def test_joint_table_means_intervals_and_paired_differences():
    """toy/joint.py's table on records with known per-video values: a row's cell is its mean over runs and videos
    with a bootstrap interval (constant values: a zero-width interval), a paired difference is taken run by run
    against "joint" on the runs both rows have, and its verdict follows the interval's sign."""
    from toy import joint

    def record(row, seed, both, motion):
        per_video = {"joint: both": both, "joint: subject": [1.0] * 4, "joint: motion": motion,
                     "other subject: motion": motion, "other motion: motion": [0.0] * 4,
                     "other motion: subject": [1.0] * 4, "other motion: both": [0.0] * 4, "base: motion": [1.0] * 4}
        return {"row": row, "motion": "zigzagging", "seed": seed, "settings": {"steps": 1}, "per_video": per_video}

    records = [record("joint", s, [0.0] * 4, [1.0, 0.0, 1.0, 0.0]) for s in range(2)] + \
        [record("split-coarse", s, [1.0] * 4, [1.0] * 4) for s in range(3)]
    text = joint.table(records)
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| split-coarse | 3 | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] |" in text
    assert rows["joint"].startswith("| joint | 2 | 0.0 [0.0, 0.0] | 100.0 [100.0, 100.0] | 50.0 [")
    diff = [ln for ln in text.splitlines() if ln.startswith("| split-coarse | 2 |")]  # paired: the 2 shared runs
    assert len(diff) == 1 and diff[0].split(" | ")[2] == "+100.0 [+100.0, +100.0] higher"
    assert diff[0].split(" | ")[3] == "+0.0 [+0.0, +0.0] unresolved"  # subject: equal in both rows


@pytest.mark.slow  # the copy-score calibration of 4 motions: ~8 s
@pytest.mark.parametrize("denoiser, stem, rows, lr", [
    ("unet", "ablation", ablate.ROWS, []), ("dit", "ablation-dit", ablate.DIT_ROWS, []),
    ("dit", "ablation-dit-lr5e-3", ["dit-newmove", "dit-uniform", "dit-self-qk", "dit-cross-kv", "dit-lora-all"],
     ["--lr", "0.005"]),
    ("dit", "ablation-dit-lr2e-2", ["dit-newmove", "dit-lora-all"], ["--lr", "0.02"])])
def test_committed_tables_are_their_results_files_and_complete(tmp_path, denoiser, stem, rows, lr):
    """toy/ablation.md, toy/ablation-dit.md and the DiT's tables at other learning rates (whose numbers the README and
    docs quote) are what the runner writes from the committed JSON-lines records, and every row has all 4 motions x
    3 seeds."""
    out = tmp_path / f"{stem}.md"
    ablate.main(["--denoiser", denoiser, "--table", "--out", str(out), *lr])
    rows = {row: ablate.rows_of({"denoiser": denoiser})[row] for row in rows}
    text = out.read_text()
    assert text == (ablate.ROOT / "toy" / f"{stem}.md").read_text()
    for row in rows:
        assert f"| {row} | {rows[row][0]} | 12 |" in text, row


def test_readme_dit_table_quotes_the_committed_table():
    """The README's DiT table (its answer) is toy/ablation-dit.md's numbers: each row's three means, its paired
    differences to dit-newmove, and a ▲/▼ exactly where that difference is resolved higher/lower."""
    readme = (ablate.ROOT / "README.md").read_text()
    section = readme.split("## NewMove on a diffusion transformer")[1].split("\n## ")[0]
    quoted = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    md = (ablate.ROOT / "toy" / "ablation-dit.md").read_text().split("\n\n")
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    means = {c[0]: c for c in map(cells, md[0].splitlines()[2:])}  # row -> its cells (means [lo, hi])
    paired = {c[0]: c for c in map(cells, next(b for b in md if b.startswith("| row | pairs")).splitlines()[2:])}
    assert len(quoted) == len(ablate.DIT_ROWS) + 1  # every row, and the base model
    for line in quoted:
        c = cells(line.replace("**", ""))
        row = "base model" if c[0].startswith("base DiT") else c[0].split(":")[0]
        for j, (mean_col, diff_col) in enumerate(((3, 2), (4, 4), (7, 6))):  # novel, copy > threshold, base motions
            value = c[1 + j].split(" (")[0]
            assert float(value) == float(means[row][mean_col].split(" [")[0]), (row, j)
            if row in ("base model", "dit-newmove"):
                continue
            diff = c[1 + j].split(" (")[1].rstrip(")")
            d, verdict = paired[row][diff_col], paired[row][diff_col + 1]
            assert float(diff.split(" ")[0]) == float(d.split(" [")[0]), (row, j)
            assert ("▲" in diff, "▼" in diff) == (verdict == "higher", verdict == "lower"), (row, j)
