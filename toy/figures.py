"""The figures in docs/images/, remade from a toy demo run's kept samples (toy/demo.py) and from train.py's own p(t).

    python toy/demo.py                                     # ends with "samples: demo_out/<date-time>"
    python toy/figures.py --samples demo_out/<date-time> --out docs/images/

Writes, in --out:
* toy-before-after.png: one row per novel-motion prompt (the held-out colour/shape pairs, one sampling seed each, the
  same seed for every row: nothing is picked by its result), base model | customized, the 8 frames left to right,
  upscaled nearest-neighbour, with the scorer's reading (toy/scorer.py) under each clip;
* toy-before-after-animated.png: the same clips playing (an animated png: browsers and GitHub play it, and at a third
  of a gif's size; --animated gif writes toy-before-after.gif), prompts in columns, base model / customized in rows;
* timesteps.png: the three timestep distributions p(t) of train.timestep_probs (coarse / uniform / fine).
Pillow only (no matplotlib); 256-colour palette images, ~110 KB together for the demo's 5 prompts (budget 300 KB).
Clips are read back from the demo's lossless png contact sheets, not from its gif/mp4. Without --samples only
timesteps.png is drawn.
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
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import train
import weights

PAPER, INK, MUTED, GOOD = (255, 255, 255), (25, 25, 25), (120, 120, 120), (0, 125, 60)  # background, text colours
CURVES = {"coarse": (214, 39, 40), "uniform": (110, 110, 110), "fine": (31, 119, 180)}  # p(t) curve colours
NAMES = {"coarse": "coarse (NewMove)", "uniform": "uniform", "fine": "fine (mirror)"}  # curve labels (train.py modes)
SHEET_COLUMNS = 8  # frames per row of sample.contact_sheet (its default), as the demo writes its png sheets
BUDGET = 300_000  # bytes, all images together (the README and docs should load fast)
GRID, TIMESTEPS = "toy-before-after.png", "timesteps.png"  # file names in --out
ANIMATED = {"png": "toy-before-after-animated.png", "gif": "toy-before-after.gif"}  # by --animated


# ----------------------------------------------------------------------------------------------------------------------
# reading the demo's samples


def load_index(folder) -> dict:
    """The demo's samples index (folder/index.json)."""
    return json.loads((Path(folder) / "index.json").read_text(encoding="utf-8"))  # written by demo.keep_samples


def read_clip(folder, stem: str, frames: int, height: int, width: int) -> np.ndarray:
    """A clip back from its png contact sheet: uint8 (F, H, W, 3)."""
    sheet = np.asarray(Image.open(Path(folder) / f"{stem}.png").convert("RGB"))  # lossless: the sampled pixels
    cols = min(SHEET_COLUMNS, frames)  # sample.contact_sheet: frame i at row i // cols, column i % cols
    return np.stack([sheet[i // cols * height:(i // cols + 1) * height, i % cols * width:(i % cols + 1) * width]
                     for i in range(frames)])


def pick(index: dict, seed: int = 0, rows: int = 5, kind: str = "novel") -> list:
    """The first `rows` prompts of set `kind` sampled with `seed` both before and after (index order, not by result)."""
    found = [v for v in index["videos"] if v["set"] == kind and v["seed"] == seed and "before" in v and "after" in v]
    if not found:  # a wrong --seed, or nothing to compare with
        seeds = sorted({v["seed"] for v in index["videos"] if v["set"] == kind})
        raise SystemExit(f"error: no {kind} prompt sampled with seed {seed} both before and after in this index "
                         f"(its seeds: {seeds}; a --no-before run has no base-model samples)")
    return found[:rows]  # the demo's prompt order: sorted held-out (colour, shape) pairs


# ----------------------------------------------------------------------------------------------------------------------
# drawing helpers


def font(size: int = 11):
    """PIL's default font at `size` (its bundled TrueType face; the fixed bitmap face on old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def text_width(text: str, f) -> int:
    """Width in pixels of `text` in font `f`."""
    return math.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=f))  # measured on a 1x1 canvas


def upscale(frame: np.ndarray, scale: int) -> Image.Image:
    """One (H, W, 3) frame, `scale` times larger with nearest-neighbour (every pixel a visible square)."""
    return Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)


def film(clip: np.ndarray, scale: int, gap: int = 2) -> Image.Image:
    """The frames of a clip (F, H, W, 3) side by side, upscaled, `gap` background pixels apart."""
    F, H, W, _ = clip.shape
    strip = Image.new("RGB", (F * W * scale + (F - 1) * gap, H * scale), PAPER)
    for i, frame in enumerate(clip):  # frame i at x = i (frame width + gap)
        strip.paste(upscale(frame, scale), (i * (W * scale + gap), 0))
    return strip


def to_palette(image: Image.Image, colours: int = 256, palette: Image.Image | None = None) -> Image.Image:
    """An RGB image as a palette image of at most `colours` colours (or the palette of `palette`), no dithering."""
    if palette is not None:
        return image.quantize(palette=palette, dither=Image.Dither.NONE)
    # octree keeps the shapes' saturated colours (max error ~45/255 on the demo's clips; median cut: ~115)
    return image.quantize(colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)


def save_png(image: Image.Image, path, colours: int = 256) -> Path:
    """Write `image` as a small palette png (atomically; an earlier figure of the same name is replaced)."""
    small = to_palette(image, colours)  # a palette png is ~1/4 of the RGB one
    return weights.atomic_write(path, lambda tmp: small.save(tmp, format="PNG", optimize=True), overwrite=True)


def save_animation(frames: list, path, fps: float, colours: int = 256) -> Path:
    """Write RGB `frames` as a looping animated png or gif (by the suffix), one palette for all frames (no flicker)."""
    palette = to_palette(Image.fromarray(np.concatenate([np.asarray(f) for f in frames])), colours)  # all frames
    small = [to_palette(f, colours, palette) for f in frames]
    kind = "GIF" if Path(path).suffix == ".gif" else "PNG"  # png: deflate with row filters, ~1/3 of the gif's size

    def write(tmp):  # frame k shown for 1/fps s, looping forever
        small[0].save(tmp, format=kind, save_all=True, append_images=small[1:], duration=round(1000 / fps), loop=0,
                      optimize=True)

    return weights.atomic_write(path, write, overwrite=True)


def verdict(entry: dict, when: str) -> tuple:
    """The scorer's reading of one clip as (text, colour): green when it is the motion the prompt asked for."""
    motion = entry[when]["motion"]  # toy/scorer.py's reading, stored by the demo
    return f"scorer: {motion}", GOOD if motion == entry["want"] else MUTED


# ----------------------------------------------------------------------------------------------------------------------
# the before/after figures


def before_after_grid(folder, index: dict, entries: list, scale: int = 2, size: int = 11) -> Image.Image:
    """Rows = prompts; per row the base model's clip | the customized model's clip, frames left to right."""
    f, F, H, W = font(size), index["frames"], index["height"], index["width"]
    line, margin, gap, col_gap = size + 5, 10, 2, 24  # text line height, outer margin, frame gap, panel gap
    panel = F * W * scale + (F - 1) * gap  # width of one clip's film strip
    title = (f'the novel motion "{index["motion"]}", taught as "{index["token"]}" in {index["steps"]} steps; '
             f"colour/shape pairs never seen in training; seed {entries[0]['seed']}")
    width = max(2 * margin + 2 * panel + col_gap, 2 * margin + text_width(title, f))  # the panels, or a long title
    row_h = line + H * scale + 2 + line + 8  # prompt, clips, scorer line, space
    img = Image.new("RGB", (width, margin + 2 * line + 4 + len(entries) * row_h + line + margin), PAPER)
    d = ImageDraw.Draw(img)
    d.text((margin, margin), title, fill=INK, font=f)  # what was taught, and how
    left, right, y = margin, margin + panel + col_gap, margin + line + 4
    d.text((left, y), "base model", fill=INK, font=f)  # column headers
    d.text((right, y), f"customized (NewMove, {index['steps']} steps)", fill=INK, font=f)
    y += line
    for e in entries:  # one prompt per row: its text, then the two clips with the scorer's reading under each
        d.text((left, y), f'"{e["prompt"]}"', fill=MUTED, font=f)
        for x, when in ((left, "before"), (right, "after")):
            img.paste(film(read_clip(folder, e[when]["stem"], F, H, W), scale, gap), (x, y + line))
            text, colour = verdict(e, when)
            d.text((x, y + line + H * scale + 2), text, fill=colour, font=f)
        y += row_h
    d.text((left, y), f"frames 1-{F} left to right ({W}x{H} px, shown x{scale}); scorer: toy/scorer.py's analytic "
           "reading of each clip", fill=MUTED, font=f)
    return img


def before_after_frames(folder, index: dict, entries: list, scale: int = 3, size: int = 11) -> list:
    """The same clips animated: columns = prompts (colour + shape), rows = base model / customized; F RGB frames."""
    f, F, H, W = font(size), index["frames"], index["height"], index["width"]
    line, margin, gap = size + 5, 8, 6  # text line height, outer margin, gap between clips
    clips = {when: [read_clip(folder, e[when]["stem"], F, H, W) for e in entries] for when in ("before", "after")}
    heads = [" ".join(e["prompt"].split()[1:3]) for e in entries]  # "a red triangle doing pll" -> "red triangle"
    cell = max(W * scale, *(text_width(h, f) for h in heads))  # column width: the clip or its label
    label = max(text_width(t, f) for t in ("base model", "customized")) + gap  # row labels' column
    caption = f'prompt: "a <colour> <shape> doing {index["token"]}"'
    width = max(2 * margin + label + len(entries) * (cell + gap), 2 * margin + text_width(caption, f))
    height = 2 * margin + line + 2 * (H * scale + gap) + line  # headers, two rows of clips, caption
    frames = []
    for k in range(F):  # frame k of every clip at once
        img = Image.new("RGB", (width, height), PAPER)
        d = ImageDraw.Draw(img)
        for j, h in enumerate(heads):  # column headers: the appearance pair asked for
            d.text((margin + label + j * (cell + gap), margin), h, fill=INK, font=f)
        for r, (when, name) in enumerate((("before", "base model"), ("after", "customized"))):
            y = margin + line + r * (H * scale + gap)
            d.text((margin, y + (H * scale - size) // 2), name, fill=INK, font=f)  # row label, vertically centred
            for j, clip in enumerate(clips[when]):
                img.paste(upscale(clip[k], scale), (margin + label + j * (cell + gap), y))
        d.text((margin, height - margin - line + 2), caption, fill=MUTED, font=f)
        frames.append(img)
    return frames


# ----------------------------------------------------------------------------------------------------------------------
# the timestep distributions


def timestep_curves(alpha: float, T: int = 1000) -> dict:
    """p(t), t = 0..T-1, per mode, from train.timestep_probs itself (the distribution training draws from)."""
    return {mode: train.timestep_probs(mode, alpha, T).numpy() for mode in CURVES}


def to_y(v: float, box: tuple, top: float) -> float:
    """Pixel row of value v (p(t) in units of 1/T) in plot box (x0, y0, x1, y1): 0 at its bottom, `top` at its top."""
    return box[3] - v / top * (box[3] - box[1])


def curve_xy(p: np.ndarray, box: tuple, top: float) -> list:
    """Pixel points (x, y) of p(t), t = 0..T-1 from the box's left edge to its right edge."""
    T = len(p)  # p(t) * T: 1 for uniform, whatever T
    return [(box[0] + t * (box[2] - box[0]) / (T - 1), to_y(p[t] * T, box, top)) for t in range(T)]


def plot_box(width: int, height: int) -> tuple:
    """The plot area (x0, y0, x1, y1) of the p(t) figure: room left for y ticks, right for curve names, below for the
    x ticks and the caption."""
    return 52, 44, width - 140, height - 62


def timestep_figure(curves: dict, alpha: float, width: int = 640, height: int = 300, size: int = 11,
                    ss: int = 3) -> Image.Image:
    """The p(t) curves on axes with labels; lines drawn at `ss` x and scaled down (smooth), text drawn after."""
    f = font(size)
    T = len(next(iter(curves.values())))  # number of timesteps (1000)
    box = plot_box(width, height)
    top = math.ceil(max(p.max() for p in curves.values()) * T * 4 + 0.5) / 4  # y range with some headroom, in 1/4s
    yticks = [k / 2 for k in range(int(top * 2) + 1)]  # 0, 0.5, 1.0, 1.5
    xticks = [0, T // 4, T // 2, 3 * T // 4, T - 1]  # both ends and the quarters
    big = Image.new("RGB", (width * ss, height * ss), PAPER)  # supersampled canvas for the lines
    d = ImageDraw.Draw(big)

    def X(x):  # figure pixels -> supersampled pixels
        return round(x * ss)

    for v in yticks:  # light grid lines at the y ticks
        y = to_y(v, box, top)
        d.line([(X(box[0]), X(y)), (X(box[2]), X(y))], fill=(225, 225, 225), width=ss)
    for mode, p in curves.items():  # the curves, and a short swatch right of the plot at the end of each
        pts = curve_xy(p, box, top)
        d.line([(X(x), X(y)) for x, y in pts], fill=CURVES[mode], width=round(2.5 * ss), joint="curve")
        d.line([(X(box[2] + 6), X(pts[-1][1])), (X(box[2] + 22), X(pts[-1][1]))], fill=CURVES[mode], width=3 * ss)
    d.line([(X(box[0]), X(box[1])), (X(box[0]), X(box[3])), (X(box[2]), X(box[3]))], fill=INK, width=ss)  # axes
    img = big.resize((width, height), Image.LANCZOS)  # smooth lines; the text below is drawn at full size
    d = ImageDraw.Draw(img)
    for v in yticks:  # y tick labels
        d.text((box[0] - 6, to_y(v, box, top)), f"{v:.1f}", fill=INK, font=f, anchor="rm")
    for t in xticks:  # x tick marks and labels
        x = box[0] + t * (box[2] - box[0]) / (T - 1)
        d.line([(x, box[3]), (x, box[3] + 3)], fill=INK)
        d.text((x, box[3] + 5), str(t), fill=INK, font=f, anchor="mt")
    for mode, p in curves.items():  # curve names at the curves' right ends
        d.text((box[2] + 26, curve_xy(p, box, top)[-1][1]), NAMES[mode], fill=INK, font=f, anchor="lm")
    d.text((box[0], box[3] + 19), "t = 0: the clean video", fill=MUTED, font=f, anchor="lt")
    d.text((box[2], box[3] + 19), f"t = {T - 1}: nearly pure noise", fill=MUTED, font=f, anchor="rt")
    d.text((10, 6), f"p(t): how often customization trains on timestep t (train.timestep_probs, T {T}, alpha "
           f"{alpha:g})", fill=INK, font=f)  # title
    d.text((10, box[1] - 10), f"p(t) x {T}", fill=INK, font=f, anchor="lb")  # y axis unit, above its ticks
    ratio = curves["coarse"][-1] / curves["coarse"][0]  # 3.0 at alpha 0.5
    d.text((10, height - 18), f"coarse draws t = {T - 1} {ratio:.1f}x as often as t = 0, so training dwells on high "
           "noise, where a clip's layout and motion are decided", fill=INK, font=f)  # the caption: why coarse
    return img


# ----------------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> dict:
    """Draw the figures into --out; returns {path: size in bytes}."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default="", help="a toy/demo.py samples folder (index.json); '' = p(t) figure only")
    p.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the images (replaced there)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed shown for every prompt")
    p.add_argument("--rows", type=int, default=5, help="prompts (rows of the still figure, columns of the animation)")
    p.add_argument("--scale", type=int, default=2, help="pixel upscale of the png's frames")
    p.add_argument("--anim-scale", type=int, default=3, help="pixel upscale of the animation's frames")
    p.add_argument("--fps", type=float, default=4, help="animation frame rate (the demo's clips play at 8)")
    p.add_argument("--animated", default="png", choices=["png", "gif", "none"],
                   help="the animated figure as an animated png (default), a gif (~3x larger) or none")
    p.add_argument("--alpha", type=float, default=train.Config().alpha, help="skew of coarse/fine (train.py's default)")
    args = p.parse_args(argv)
    out = weights.writable_dir(args.out)  # a one-line error for an unwritable --out
    written = [save_png(timestep_figure(timestep_curves(args.alpha), args.alpha), out / TIMESTEPS, colours=64)]
    if args.samples:  # the before/after figures need a demo run's samples
        index = load_index(args.samples)
        entries = pick(index, args.seed, args.rows)
        written.append(save_png(before_after_grid(args.samples, index, entries, args.scale), out / GRID))
        if args.animated != "none":
            frames = before_after_frames(args.samples, index, entries, args.anim_scale)
            written.append(save_animation(frames, out / ANIMATED[args.animated], args.fps))
    sizes = {path: path.stat().st_size for path in written}
    for path, n in sizes.items():  # report what was written, with its pixel size and bytes
        w, h = Image.open(path).size
        print(f"{path}: {w}x{h}, {n / 1000:.0f} KB")
    total = sum(sizes.values())
    print(f"{total / 1000:.0f} KB in all" + ("" if total <= BUDGET else
          f" - over the {BUDGET // 1000} KB budget: try --rows 4, --anim-scale 2, --animated none"))
    return sizes


if __name__ == "__main__":
    main()
