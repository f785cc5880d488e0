"""The figures in docs/images (toy/figures.py) from a samples folder as toy/demo.py keeps it, and the demo keeping its
samples only where it is told to.

    pytest tests/test_figures.py -q
"""

import numpy as np
import pytest
import torch
from PIL import Image

import train
from toy import demo, figures

INFO = {"motion": "moving in a circle", "token": "pll", "steps": 3, "seed": 0, "frames": 8, "height": 32, "width": 32}
PAIRS = [("red", "triangle"), ("blue", "cross"), ("yellow", "circle")]


def fake_samples(folder, seeds=(0, 1), before=True):
    """A samples folder written by demo.keep_samples (the demo's own writer) from random uint8 clips; returns the
    {when: score()-like result} it was given."""
    g = torch.Generator().manual_seed(0)
    pairs = [(f"a {c} {s} doing pll", k) for c, s in PAIRS for k in seeds]
    n = len(pairs)
    results = {when: {"videos": torch.randint(0, 256, (n, 3, 8, 32, 32), dtype=torch.uint8, generator=g),
                      "motions": ["static", "moving in a circle"] * (n // 2) + ["static"] * (n % 2),
                      "looks": [(c, s) for c, s in PAIRS for _ in seeds], "motion": 0.5}
               for when in (("before", "after") if before else ("after",))}
    demo.keep_samples(folder, INFO, {"novel": ([p for p, _ in pairs], [k for _, k in pairs], [INFO["motion"]] * n,
                                               {"before": results.get("before", {"motion": float("nan")}),
                                                "after": results["after"]})})
    return results


@pytest.mark.slow
def test_keep_samples_writes_clips_and_an_index_the_figures_read_back_exactly(tmp_path):
    results = fake_samples(tmp_path)
    index = figures.load_index(tmp_path)
    assert [(v["prompt"], v["seed"]) for v in index["videos"]][:2] == [("a red triangle doing pll", 0),
                                                                       ("a red triangle doing pll", 1)]
    first = index["videos"][0]
    assert first["after"] == {"stem": "after/a-red-triangle-doing-pll-seed0", "motion": "static", "colour": "red",
                              "shape": "triangle"}
    for i, v in enumerate(index["videos"]):  # every clip, both times: gif + png sheet + mp4, png lossless
        for when in ("before", "after"):
            assert all((tmp_path / f"{v[when]['stem']}{ext}").is_file() for ext in (".gif", ".png", ".mp4"))
            clip = figures.read_clip(tmp_path, v[when]["stem"], 8, 32, 32)  # (F, H, W, 3)
            assert torch.equal(torch.from_numpy(clip).permute(3, 0, 1, 2), results[when]["videos"][i])


@pytest.mark.slow
def test_figures_have_their_sizes_and_fit_the_budget(tmp_path):
    fake_samples(tmp_path / "samples")
    sizes = figures.main(["--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "img"), "--rows", "3"])
    assert {p.name for p in sizes} == {figures.GRID, figures.ANIMATED["png"], figures.TIMESTEPS}
    assert sum(sizes.values()) < figures.BUDGET  # random noise clips: the worst case for compression
    grid = Image.open(tmp_path / "img" / figures.GRID)
    panel = 8 * 32 * 2 + 7 * 2  # 8 frames x2, 2 px apart
    line = 11 + 5  # font size + spacing
    assert grid.size == (10 + panel + 24 + panel + 10, 10 + 2 * line + 4 + 3 * (line + 64 + 2 + line + 8) + line + 10)
    assert grid.mode == "P"  # a palette png
    anim = Image.open(tmp_path / "img" / figures.ANIMATED["png"])
    assert anim.is_animated and anim.n_frames == 8
    assert anim.size[1] == 2 * 8 + 2 * 16 + 2 * (96 + 6)  # margins, 2 text lines, 2 rows of x3 clips
    assert Image.open(tmp_path / "img" / figures.TIMESTEPS).size == (640, 300)


@pytest.mark.slow
def test_grid_rows_are_one_seed_in_index_order_and_need_before_samples(tmp_path):
    fake_samples(tmp_path / "a")
    index = figures.load_index(tmp_path / "a")
    assert [(v["prompt"], v["seed"]) for v in figures.pick(index, seed=1, rows=2)] == [
        ("a red triangle doing pll", 1), ("a blue cross doing pll", 1)]
    fake_samples(tmp_path / "b", before=False)  # a --no-before run: nothing to compare with
    with pytest.raises(SystemExit):
        figures.pick(figures.load_index(tmp_path / "b"))


def curve_pixels(img, box, colour, tol=60):
    """(x, y) of the pixels inside the plot box within `tol` (RGB distance) of a curve colour."""
    rgb = np.asarray(img.convert("RGB")).astype(int)[box[1]:box[3] + 1, box[0]:box[2] + 1]
    ys, xs = np.nonzero(np.linalg.norm(rgb - np.array(colour), axis=-1) < tol)
    return xs + box[0], ys + box[1]


def test_timestep_figure_draws_train_timestep_probs(monkeypatch):
    curves = figures.timestep_curves(0.5)
    assert all(np.array_equal(curves[m], train.timestep_probs(m, 0.5, 1000).numpy()) for m in figures.CURVES)
    assert curves["coarse"].argmax() == 999 and curves["fine"].argmax() == 0  # coarse: most often at pure noise
    box = figures.plot_box(640, 300)
    xs, ys = curve_pixels(figures.timestep_figure(curves, 0.5), box, figures.CURVES["coarse"])
    top, bottom = xs[ys == ys.min()].mean(), xs[ys == ys.max()].mean()  # where the drawn curve is highest / lowest
    assert top > box[2] - 0.1 * (box[2] - box[0]) and bottom < box[0] + 0.1 * (box[2] - box[0])  # t = 999 / t = 0

    def peaked(mode, alpha, T=1000):  # another p(t): the figure must follow whatever train.py draws from
        w = torch.exp(-((torch.arange(T, dtype=torch.float64) - 250) / 40) ** 2) + 0.2
        return w / w.sum() if mode == "coarse" else torch.full((T,), 1 / T, dtype=torch.float64)

    monkeypatch.setattr(train, "timestep_probs", peaked)
    xs, ys = curve_pixels(figures.timestep_figure(figures.timestep_curves(0.5), 0.5), box, figures.CURVES["coarse"])
    peak = box[0] + 250 / 999 * (box[2] - box[0])  # t = 250 in pixels
    assert abs(xs[ys == ys.min()].mean() - peak) < 6


def test_samples_folder_is_fresh_and_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.samples_folder(None, quiet=True) is None and demo.samples_folder("", quiet=False) is None
    a, b = demo.samples_folder(None, quiet=False), demo.samples_folder(None, quiet=False)
    assert a != b and a.parent.name == b.parent.name == "demo_out" and a.is_dir() and b.is_dir()
    (b / "index.json").write_text("{}")
    with pytest.raises(SystemExit):  # an explicit folder holding something is never written into
        demo.samples_folder(str(b), quiet=True)
    assert demo.samples_folder(str(tmp_path / "new"), quiet=True) == tmp_path / "new"
