"""Analytic scorer for the toy world: reads the shape's colour, kind and motion back from a (possibly degraded) video.

    scorer = ToyScorer()
    logits = scorer.predict(videos)          # uint8 (N, 3, F, H, W) -> (N, len(MOTIONS)); argmax = predicted motion
    scorer.class_names[logits.argmax(-1)[0]] # "moving in a circle"
    scorer.appearance(videos)                # [("red", "circle"), ...]
    scorer.analyse(video)                    # everything for one video: centroid path, areas, features, decisions

This is the "classifier interface" of metrics.py (`class_names` + `predict`), with class names exactly the generator's
motion names (toy.world.MOTIONS), so it can stand in for a learned video classifier on toy-world samples.

How it works, per video (no learning, no parameters fitted to data):
  1. background: a plane (a + b x + c y per channel) fitted to the 2-pixel border of all frames; shapes never touch
     the border, and the generator's backgrounds are dark linear gradients plus faint texture;
  2. foreground "alpha" per pixel: the colour distance from that plane, minus a noise floor measured on the border,
     divided by the shape's own distance (a high percentile). Linear mixing (blur, anti-aliasing) keeps the alpha sum
     equal to the area, so areas and centroids stay right on blurry videos;
  3. colour: the median of confidently-foreground pixels, named by hue (white: low saturation);
  4. shape: soft IoU of the alpha mask with each shape's template, drawn at the measured centroid and at the radius
     that gives the measured area, summed over frames;
  5. motion: a short decision list on the per-frame centroid path and area (see `motion_of`).
The scores returned by `predict` are a hard decision (10 for the pick, 0 elsewhere), not calibrated probabilities.
"""

import functools
import math

import numpy as np
import torch

from toy import world
from toy.world import COLOURS, MOTIONS, SHAPES, shape_coverage


def hsv(rgb) -> tuple:
    """(hue in degrees, saturation, value) of one RGB colour in [0, 255]."""
    r, g, b = (float(v) / 255 for v in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    if mx - mn < 1e-6:
        return 0.0, 0.0, mx
    if mx == r:
        h = ((g - b) / (mx - mn)) % 6
    elif mx == g:
        h = (b - r) / (mx - mn) + 2
    else:
        h = (r - g) / (mx - mn) + 4
    return 60 * h, (mx - mn) / mx, mx


# hue in degrees of each chromatic named colour (chroma above 0.3); white is told apart by saturation, not hue
_HUES = {name: hsv(rgb)[0] for name, rgb in COLOURS.items() if (max(rgb) - min(rgb)) / 255 > 0.3}


def colour_name(rgb) -> str:
    """The named colour of an RGB triple: white if washed out, else the nearest hue (robust to dimming and to the
    brightness shifts a generator or VAE makes, which nearest-RGB matching would not be)."""
    h, s, v = hsv(rgb)
    if s < 0.35:
        return "white"
    return min(_HUES, key=lambda n: min(abs(h - _HUES[n]), 360 - abs(h - _HUES[n])))


def as_frames(video) -> np.ndarray:
    """One video as float64 (F, H, W, 3). Accepts uint8 (3, F, H, W) (the project's layout, taken whenever the first
    dimension is 3) or (F, H, W, 3), as a torch tensor or numpy array."""
    x = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if x.ndim != 4:
        raise ValueError(f"expected one video of 4 dims, (3, F, H, W) or (F, H, W, 3); got shape {x.shape}")
    if x.shape[0] == 3:
        x = x.transpose(1, 2, 3, 0)  # (3, F, H, W) -> (F, H, W, 3)
    elif x.shape[-1] != 3:
        raise ValueError(f"no RGB axis first or last in shape {x.shape}")
    return x.astype(np.float64)


# -----------------------------------------------------------------------------------------------------------------------
# foreground


def foreground(x: np.ndarray) -> tuple:
    """Alpha (F, H, W) in [0, 1] of the shape in frames x (F, H, W, 3), and the fitted background (H, W, 3)."""
    F_, H, W, _ = x.shape
    ring = np.zeros((H, W), bool)
    ring[:2], ring[-2:], ring[:, :2], ring[:, -2:] = True, True, True, True  # the 2-pixel border
    yy, xx = np.mgrid[0:H, 0:W]
    design = np.stack([np.ones(H * W), xx.ravel() / W - 0.5, yy.ravel() / H - 0.5], 1)  # (H*W, 3): a plane
    A = np.tile(design[ring.ravel()], (F_, 1))  # (F * ring, 3): every frame's border samples the same plane
    y = x[:, ring].reshape(-1, 3)  # (F * ring, 3) colours
    keep = np.ones(len(y), bool)
    for _ in range(2):  # refit without outliers, in case a (blurred or badly generated) shape reaches the border
        coef, *_ = np.linalg.lstsq(A[keep], y[keep], rcond=None)  # (3, 3): plane coefficients per colour channel
        res = np.linalg.norm(y - A @ coef, axis=1)
        keep = res <= 3 * np.median(res) + 10
    bg = (design @ coef).reshape(H, W, 3)
    d = np.linalg.norm(x - bg[None], axis=-1)  # (F, H, W) colour distance from the background
    floor = 2 * np.median(res[keep]) + 8  # ~2.5 noise std of the border's distances, plus a margin for JPEG ringing
    peak = max(np.percentile(d, 99.5), floor + 30)  # the shape's own distance; an empty video still gives finite alpha
    alpha = np.clip((d - floor) / (peak - floor), 0, 1)
    return alpha, bg


# -----------------------------------------------------------------------------------------------------------------------
# shape

# area of each shape at radius 1, measured on the same renderer the generator uses (so r = sqrt(area / unit area))
_UNIT_AREA = {s: shape_coverage(s, 50.0, 50.0, 40.0, 100, 100, ss=2).sum() / 40.0 ** 2 for s in SHAPES}


@functools.lru_cache(maxsize=64)
def gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) row-normalised Gaussian weights between pixel indices (cached: every video of a size reuses them)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    g = np.exp(-d ** 2 / (2 * sigma ** 2))
    return g / g.sum(1, keepdims=True)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-d array as G_h @ img @ G_w^T (zero padding: templates are zero at the border anyway)."""
    if sigma <= 0:
        return img
    H, W = img.shape
    return gauss_matrix(H, sigma) @ img @ gauss_matrix(W, sigma).T


# Templates are compared sharp and blurred: a blurry video's alpha is a blurred mask, and against a sharp template
# the round shape (circle) wins too often. The best blur is chosen per video, the same for every shape.
TEMPLATE_BLURS = (0.0, 0.8, 1.4)


def shape_scores(alpha: np.ndarray, areas: np.ndarray, centres: np.ndarray) -> dict:
    """Area-weighted mean soft IoU of the alpha masks (F, H, W) with each shape's template (at the best blur)."""
    F_, H, W = alpha.shape
    scores = np.zeros((len(SHAPES), len(TEMPLATE_BLURS)))
    weight = 0.0
    for f in range(F_):
        if areas[f] < 6:  # a few pixels carry no shape information (end of "shrinking", an empty frame)
            continue
        for i, s in enumerate(SHAPES):
            r = math.sqrt(areas[f] / _UNIT_AREA[s])  # the radius at which this shape has the measured area
            sharp = shape_coverage(s, centres[f, 0], centres[f, 1], r, H, W, ss=2)
            for j, sigma in enumerate(TEMPLATE_BLURS):
                t = blur(sharp, sigma)
                scores[i, j] += areas[f] * np.minimum(alpha[f], t).sum() / np.maximum(alpha[f], t).sum()
        weight += areas[f]
    best = scores.sum(0).argmax()  # the blur that fits this video best overall
    return {s: scores[i, best] / max(weight, 1e-9) for i, s in enumerate(SHAPES)}


# -----------------------------------------------------------------------------------------------------------------------
# motion


def reversals(y: np.ndarray, h: float) -> int:
    """Direction changes of a 1-d path, counting only moves back by more than h from the running extreme (hysteresis),
    so noise of a pixel or so is not counted as a turn."""
    count, direction = 0, 0  # direction: +1 rising, -1 falling, 0 not yet known
    hi = lo = y[0]  # the running extremes since the last turn
    for v in y[1:]:
        hi, lo = max(hi, v), min(lo, v)
        if direction >= 0 and v < hi - h:  # fell back from the high by more than h
            count, direction, lo = count + (direction > 0), -1, v
        elif direction <= 0 and v > lo + h:  # rose from the low by more than h
            count, direction, hi = count + (direction < 0), 1, v
    return count


def motion_features(centres: np.ndarray, areas: np.ndarray, size: int) -> dict:
    """Path and area features, lengths in pixels of a 32-pixel frame (so thresholds hold at any frame size)."""
    c = centres * 32 / size  # (F, 2) (x, y), y down
    k = max(1, len(areas) // 4)
    rel = c - c.mean(0)  # positions about the path's mean centre
    rad = np.linalg.norm(rel, axis=1)
    ang = np.unwrap(np.arctan2(rel[:, 1], rel[:, 0]))
    return dict(
        scale=math.sqrt(max(areas[-k:].mean(), 1e-6) / max(areas[:k].mean(), 1e-6)),  # radius ratio, last / first
        deviation=float(rad.max()),  # how far the centre ever is from its mean position
        net_x=float(c[-1, 0] - c[0, 0]), net_y=float(c[-1, 1] - c[0, 1]),
        range_x=float(np.ptp(c[:, 0])), range_y=float(np.ptp(c[:, 1])),
        turns_y=reversals(c[:, 1], 1.5),
        swept=float(abs(ang[-1] - ang[0])),  # angle swept about the mean centre, radians
        roundness=float(rad.min() / max(rad.mean(), 1e-6)),  # 1 for a circle about the mean centre, ~0 for a line
        path_radius=float(rad.mean()),
    )


def motion_of(f: dict) -> str:
    """The decision list. Thresholds sit between what the generator's ranges produce (px at 32 x 32): translations
    move >= 14 px, growth is >= 2x in radius, circles have a 6-8 px path radius and sweep ~5.5 rad, zigzags drift
    >= 12 px with 3-4.5 px swings, bounces go up and down >= 5 px in place."""
    if f["scale"] > 1.4:
        return "growing"
    if f["scale"] < 1 / 1.4:
        return "shrinking"
    if f["deviation"] < 2.0:
        return "static"
    # a circle sweeps most of a turn at a steady distance from its centre, and is as wide as it is tall
    if (f["swept"] > 1.2 * math.pi and f["roundness"] > 0.4 and f["path_radius"] > 3.0
            and 0.5 < f["range_x"] / max(f["range_y"], 1e-6) < 2.0):
        return "moving in a circle"
    if abs(f["net_x"]) > 5.0 and abs(f["net_x"]) >= abs(f["net_y"]):
        # horizontal drift: with a vertical back-and-forth it is a zigzag
        if f["turns_y"] >= 2 and f["range_y"] > 3.0:
            return "zigzagging"
        return "moving right" if f["net_x"] > 0 else "moving left"
    # vertical: a bounce turns at least twice (or once and ends near where it started), up/down go one way
    if f["turns_y"] >= 2 or (f["turns_y"] == 1 and abs(f["net_y"]) < 0.5 * f["range_y"]):
        return "bouncing"
    if abs(f["net_y"]) > 3.0:
        return "moving down" if f["net_y"] > 0 else "moving up"
    return "static"  # moves, but in no way the generator makes: the least committal answer


# -----------------------------------------------------------------------------------------------------------------------
# the classifier interface


def layout(video) -> dict:
    """Where the shape is in one video: frames x (F, H, W, 3), alpha and its denoised mask (F, H, W), area and
    centroid per frame, the fitted background bg (H, W, 3). The part of ToyScorer.analyse the leak score needs."""
    x = as_frames(video)  # (F, H, W, 3)
    F_, H, W, _ = x.shape
    alpha, bg = foreground(x)
    mask = np.where(alpha > 0.1, alpha, 0.0)  # drop faint noise: over ~900 pixels it would add up to real area
    areas = mask.sum(axis=(1, 2))  # (F,)
    yy, xx = np.mgrid[0:H, 0:W]
    total = np.maximum(areas, 1e-6)
    centres = np.stack([(mask * xx).sum(axis=(1, 2)) / total, (mask * yy).sum(axis=(1, 2)) / total], 1)  # (F, 2)
    return dict(x=x, alpha=alpha, mask=mask, areas=areas, centres=centres, bg=bg)


class ToyScorer:
    """`class_names` (= toy.world.MOTIONS) and `predict(videos) -> (N, C)` as metrics.py expects of a motion
    classifier, plus `appearance(videos) -> [(colour, shape)]` and `analyse(video) -> dict`."""

    def __init__(self):
        self.class_names = list(MOTIONS)

    def analyse(self, video) -> dict:
        a = layout(video)
        x, alpha, mask, areas, centres = a["x"], a["alpha"], a["mask"], a["areas"], a["centres"]
        H, W = alpha.shape[1:]
        solid = alpha > 0.7  # the shape's interior: its true colour, without edge blending into the background
        pixels = x[solid] if solid.sum() >= 3 else x.reshape(-1, 3)[np.argsort(alpha.ravel())[-3:]]
        rgb = np.median(pixels, axis=0)
        shapes = shape_scores(mask, areas, centres)
        features = motion_features(centres, areas, min(H, W))
        return dict(colour=colour_name(rgb), rgb=rgb, shape=max(shapes, key=shapes.get), shape_scores=shapes,
                    motion=motion_of(features), features=features, centres=centres, areas=areas, background=a["bg"])

    def predict(self, videos) -> torch.Tensor:
        """uint8 (N, 3, F, H, W) (or a list of single videos) -> float32 (N, len(class_names)), 10 at the pick."""
        out = torch.zeros(len(videos), len(self.class_names))
        for i, video in enumerate(videos):
            out[i, self.class_names.index(self.analyse(video)["motion"])] = 10.0
        return out

    def appearance(self, videos) -> list:
        """[(colour, shape)] per video."""
        results = []
        for video in videos:
            a = self.analyse(video)
            results.append((a["colour"], a["shape"]))
        return results


# -----------------------------------------------------------------------------------------------------------------------
# leakage: how close a video comes to a training clip in what its prompt did not ask for
#
# The paper's copy score (SSCD) asks whether a generated video reproduces a training video. In the toy world a prompt
# names a colour, a shape and a motion; everything else is drawn at random for every clip: the background (grey level,
# tint, gradient), the shape's size and where it moves. A model that has memorised its examples brings that unasked
# appearance along. So each video is reduced to those unasked features (leak_features), compared with every training
# clip in units of the world's own spread of each feature (leak_similarity, 1 = identical), and scored by its nearest
# training clip. Colour is not among them: every evaluation prompt asks for one (the colour+shape copy rate covers a
# training look that replaces the asked one). The threshold comes from held-out clips (calibrate_leakage).

LEAK_FEATURES = ("background R", "background G", "background B", "gradient x", "gradient y", "size", "x", "y")


def leak_features(a: dict) -> np.ndarray:
    """(8,) unasked appearance of one video's layout(): the background's mean colour and its grey-level
    change across the frame (x, y), the shape's size (sqrt of its mean area, px) and position (mean centroid, px)."""
    bg = a["bg"]  # (H, W, 3), the plane fitted to the border
    grey = bg.mean(-1)  # (H, W)
    gx, gy = grey[:, -1].mean() - grey[:, 0].mean(), grey[-1].mean() - grey[0].mean()
    return np.array([*bg.mean((0, 1)), gx, gy, math.sqrt(a["areas"].mean()), *a["centres"].mean(0)])


@functools.lru_cache(maxsize=4)
def leak_scale(frames: int = 8, size: int = 32) -> np.ndarray:
    """(8,) the spread (std) of each leak feature over 200 random clips of every motion: the unit of leak_similarity."""
    clips = world.make_dataset(200, MOTIONS, seed=31_337, frames=frames, height=size)
    return np.stack([leak_features(layout(c.video)) for c in clips]).std(0)


def leak_similarity(gen: np.ndarray, train: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, M) exp(-mean_k ((g_k - t_k) / scale_k)^2 / 2) between N videos' and M clips' leak features: 1 = the same
    unasked appearance, ~0.4 = one world-std apart in every feature."""
    z = (gen[:, None, :] - train[None, :, :]) / scale  # (N, M, 8)
    return np.exp(-0.5 * (z ** 2).mean(-1))


def copy_scores(videos, train_videos) -> tuple:
    """(score (N,), nearest training clip (N,)): each video's highest leak_similarity to any training clip."""
    gen = np.stack([leak_features(layout(v)) for v in videos])
    train = np.stack([leak_features(layout(v)) for v in train_videos])
    frames, size = int(videos[0].shape[1]), int(min(videos[0].shape[2:]))  # (3, F, H, W)
    sim = leak_similarity(gen, train, leak_scale(frames, size))
    return sim.max(1), sim.argmax(1)


@functools.lru_cache(maxsize=16)
def calibrate_leakage(motion: str, examples: int = 8, sets: int = 6, per_set: int = 20, frames: int = 8,
                      size: int = 32, fpr: float = 0.05) -> dict:
    """The copy threshold for training sets of `examples` clips of `motion`, from held-out clips: for `sets` training
    sets (seeds no demo uses), `per_set` independent clips in the evaluation looks (HELD_OUT_COMBOS) and as many
    copies (a training clip redrawn in an evaluation look: same background, size and path), all degraded like a
    model's samples (world.degrade). Threshold = the (1 - fpr) quantile of the independent clips' scores, so `fpr`
    of videos that copy nothing score above it; also returned: the share of copies above it (detection rate)."""
    looks = sorted(world.HELD_OUT_COMBOS)
    null, copies = [], []
    for k in range(sets):
        seed = 90_000 + k
        train = [c.video for c in world.make_dataset(examples, [motion], seed=seed, frames=frames, height=size,
                                                     exclude_combos=world.HELD_OUT_COMBOS)]
        indep = [world.degrade(world.make_clip(np.random.SeedSequence([seed + 1_000, j]), motion=motion, frames=frames,
                                               height=size, look=looks[j % len(looks)]).video, seed=j)
                 for j in range(per_set)]
        copy = [world.degrade(world.make_clip(np.random.SeedSequence([seed, j % examples]), motion=motion, frames=frames,
                                              height=size, exclude_combos=world.HELD_OUT_COMBOS,
                                              look=looks[j % len(looks)]).video, seed=j)
                for j in range(per_set)]
        null += list(copy_scores(indep, train)[0])
        copies += list(copy_scores(copy, train)[0])
    threshold = float(np.quantile(null, 1 - fpr))
    return {"threshold": threshold, "fpr": fpr, "detected": float(np.mean(np.array(copies) > threshold)),
            "null_mean": float(np.mean(null)), "copy_mean": float(np.mean(copies))}
