"""Toy world: clips of ONE coloured shape doing ONE motion on a dark background, deterministic from a seed.

    clip = make_clip(seed=3, colour="red", motion="moving left")   # unspecified attributes are drawn from the seed
    clip.video     # uint8 torch tensor (3, F, H, W), the project's per-clip layout (C, F, H, W); default 3 x 8 x 32 x 32
    clip.caption   # "a red cross moving left" = f"a {colour} {shape} {motion}"
    clip.centres   # (F, 2) float (x, y) of the shape's centre in pixels per frame; clip.radii (F,) its radius in pixels
    clips = make_dataset(600, BASE_MOTIONS, seed=0, exclude_combos=HELD_OUT_COMBOS)
    write_folder(clips, "toy_data/")  # 00000.mp4 + 00000.txt ...: what data.VideoDataset reads

Why it looks the way it does (see the toy-calibration notes): a tiny CPU model learns large, salient motions first, and
translations of 0.5-1 px per frame were barely learned. So every motion here moves the shape by about 2-3 px per frame
at 32 x 32 (scaled with the frame size), growth is at least 2x in radius, and every clip shows its motion over its
whole length. Colours are saturated, well-separated hues (plus white) and backgrounds are dark, desaturated greys, so
that an analytic scorer (toy/scorer.py) can tell colour and foreground apart even after a lossy VAE or a blurry model.

Motions: BASE_MOTIONS are what a base model is pretrained on; NOVEL_MOTIONS are never in that set and serve as the
motions to customise. Appearance combinations (colour x shape) in HELD_OUT_COMBOS can be excluded from training data
to test "unseen appearance" prompts.
"""

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------------------------------------------------
# vocabulary

# Saturated colours whose hues are >= 26 degrees apart (red 0, orange 28, yellow 54, green 120, cyan 183, blue 221,
# magenta 300) plus white, the only achromatic one: the scorer classifies by hue, and by low saturation for white.
COLOURS = {
    "red": (225, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (235, 220, 30),
    "green": (40, 200, 40),
    "cyan": (30, 210, 220),
    "blue": (40, 80, 240),
    "magenta": (220, 40, 220),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Never in any pretraining clip: the toy subject taught under its own word (toy/subject.py; make_clip(look=...)).
# Violet's hue (267) is 46 degrees from blue and 33 from magenta, so the scorer can tell it from every named colour.
NEW_COLOURS = {"violet": (140, 60, 235)}
NEW_SHAPES = ("ring",)
# radius (half the shape's extent) as a fraction of the frame's short side: at 32 x 32, 3.5, 4.5 and 5.8 pixels
SIZES = {"small": 0.11, "medium": 0.14, "large": 0.18}

BASE_MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "static")
NOVEL_MOTIONS = ("moving in a circle", "zigzagging", "bouncing", "shrinking")
MOTIONS = BASE_MOTIONS + NOVEL_MOTIONS

# Held out for "unseen appearance" evaluation: no colour and no shape appears twice, so every colour and every shape
# is still seen in training, only these pairings are not.
HELD_OUT_COMBOS = frozenset({("red", "triangle"), ("blue", "cross"), ("yellow", "circle"), ("green", "diamond"),
                             ("magenta", "square")})

# A moving shape leaves a fading trail: ghosts of itself where it was TRAIL[k][0] frames ago, at TRAIL[k][1] opacity
# (like a long-exposure streak, but one-sided). Why: ModelScope's UNet3D reads the prompt per frame (spatial
# cross-attention) and has no frame position encoding, and one frame of a plain clip looks the same moving left or
# right, up or down. A tiny CPU-trained model measurably failed to bind the direction words to the motion (the
# base model's samples for "moving left" and "moving right" were scored identically). With a trail the direction is
# visible in every frame, as the colour is. Measured: it did not help. A model trained from scratch on trail clips
# (2,000 UNet steps from scratch, frozen text encoder, high-noise timesteps) still ignored the direction words (motion 38%,
# the same confusion between left/right/up/down), so the committed model and the default world have no trail. With
# trails the scorer still reads motion and colour (100% on clean and degraded clips) but shape worse (86% clean).
TRAIL = ((0.5, 0.4), (1.0, 0.25), (1.5, 0.12))
SPEED = (2.0, 3.0)  # translation speed range in px/frame at a 32-pixel frame (scaled with the frame size)
EXTENT = 1.3  # every shape fits in a box of +-EXTENT radii around its centre (the triangle's apex is the widest)


def caption_for(colour: str, shape: str, motion: str) -> str:
    return f"a {colour} {shape} {motion}"


@dataclass
class Clip:
    video: torch.Tensor  # uint8 (3, F, H, W)
    caption: str
    colour: str
    shape: str
    size: str  # a key of SIZES; the radius in pixels per frame is in `radii` (it changes for growing/shrinking)
    motion: str
    centres: np.ndarray  # (F, 2) float64, (x, y) in pixels, x to the right, y down, pixel centres at integers
    radii: np.ndarray  # (F,) float64, pixels
    seed: object = None  # what make_clip was given (int, or a SeedSequence for dataset members)
    background: dict = field(default_factory=dict)  # the background's parameters, for the record

    def frames(self) -> np.ndarray:
        """uint8 (F, H, W, 3), the layout of image and video files."""
        return self.video.permute(1, 2, 3, 0).numpy()


# -----------------------------------------------------------------------------------------------------------------------
# drawing


def shape_coverage(shape: str, cx: float, cy: float, r: float, h: int, w: int, ss: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float (h, w) in [0, 1]: an ss x ss supersampled inside test, so
    edges are anti-aliased and sub-pixel motion is visible (a hard mask would move in 1-pixel jumps)."""
    # sample points at the centre of each sub-pixel; pixel (i, j) covers [j - 0.5, j + 0.5] x [i - 0.5, i + 0.5]
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    ys = (np.arange(h)[:, None] + offs[None, :]).reshape(-1)  # (h*ss,)
    xs = (np.arange(w)[:, None] + offs[None, :]).reshape(-1)  # (w*ss,)
    u = (xs[None, :] - cx) / r  # (h*ss, w*ss) coordinates in radii, v points down
    v = (ys[:, None] - cy) / r
    au, av = np.abs(u), np.abs(v)
    # all shapes have roughly the area of the circle (pi r^2 = 3.14 r^2), so "size" means the same for each of them
    if shape == "circle":
        inside = u * u + v * v <= 1.0
    elif shape == "square":
        inside = np.maximum(au, av) <= 0.87  # area 3.03 r^2
    elif shape == "diamond":
        inside = au + av <= 1.22  # area 2.98 r^2
    elif shape == "cross":
        # a plus sign: two bars 0.8 r wide and 2.3 r long; area 3.04 r^2
        inside = ((au <= 0.4) & (av <= 1.15)) | ((av <= 0.4) & (au <= 1.15))
    elif shape == "ring":
        inside = (u * u + v * v <= 1.21) & (u * u + v * v >= 0.36)  # an annulus, radii 0.6 r to 1.1 r; area 2.67 r^2
    elif shape == "triangle":
        # pointing up, apex (0, -1.3), base corners (+-1.3, 0.7); centroid at v = 0, area 2.6 r^2
        inside = (v <= 0.7) & (au <= 1.3 * (v + 1.3) / 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES + NEW_SHAPES}")
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))  # (h, w)


def make_background(rng: np.random.Generator, h: int, w: int) -> tuple:
    """A dark, desaturated background, float (h, w, 3) in [0, 255], constant over the clip, and its parameters.
    Varied (grey level, tint, gradient, faint texture) so a model cannot key on it, but always far darker and less
    saturated than any shape colour, so it is never confused with one."""
    grey = rng.uniform(15, 65)
    tint = rng.uniform(-8, 8, size=3)  # small per-channel offsets: dark slate, dark olive, dark plum ...
    angle, amp = rng.uniform(0, 2 * math.pi), rng.uniform(0, 20)  # a faint linear gradient in a random direction
    texture = rng.uniform(0, 3)  # std of a static per-pixel texture
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = ((xx / max(w - 1, 1) - 0.5) * math.cos(angle) + (yy / max(h - 1, 1) - 0.5) * math.sin(angle)) * amp
    bg = grey + tint[None, None, :] + ramp[..., None] + rng.normal(0, texture, size=(h, w, 3))
    params = dict(grey=grey, tint=tint.round(2).tolist(), gradient_angle=angle, gradient=amp, texture=texture)
    return np.clip(bg, 0, 90), params  # <= 90: the darkest shape colour channel maximum is 220+


# -----------------------------------------------------------------------------------------------------------------------
# motions


def trajectory(motion: str, rng: np.random.Generator, r: float, frames: int, h: int, w: int) -> tuple:
    """Centres (F, 2) as (x, y) and radii (F,) in pixels. Random start, speed, amplitude and phase, within ranges that
    keep the whole shape inside the frame (1 pixel margin) and make the motion obvious over the clip."""
    s = min(h, w) / 32  # ranges below are stated for a 32-pixel frame and scale with it
    t = np.arange(frames, dtype=np.float64)
    steps = max(frames - 1, 1)

    def span(rad, n):  # the range of allowed centre coordinates along an axis of n pixels, for a radius rad
        return EXTENT * rad + 1.0, n - 1.0 - EXTENT * rad

    (xlo, xhi), (ylo, yhi) = span(r, w), span(r, h)
    radii = np.full(frames, r)

    if motion in ("moving left", "moving right", "moving up", "moving down"):
        horizontal = motion in ("moving left", "moving right")
        lo, hi = (xlo, xhi) if horizontal else (ylo, yhi)
        # speed in px/frame, capped so the whole path fits: a large shape at 32 x 32 gets ~2.2 px/frame
        speed = min(rng.uniform(*SPEED) * s, (hi - lo) / steps)
        travel = speed * steps
        start = rng.uniform(lo, hi - travel)
        sign = 1.0 if motion in ("moving right", "moving down") else -1.0
        along = start + speed * t if sign > 0 else (start + travel) - speed * t
        across = rng.uniform(*((ylo, yhi) if horizontal else (xlo, xhi)))
        centres = np.stack([along, np.full(frames, across)] if horizontal else [np.full(frames, across), along], 1)
    elif motion in ("growing", "shrinking"):
        # radius from ~0.55x to ~1.4x the size's radius (>= 2x change) about a fixed centre
        small, big = r * rng.uniform(0.5, 0.65), r * rng.uniform(1.3, 1.5)
        radii = small + (big - small) * t / steps
        if motion == "shrinking":
            radii = radii[::-1].copy()
        (bxlo, bxhi), (bylo, byhi) = span(big, w), span(big, h)  # the biggest frame must fit too
        centres = np.tile([rng.uniform(bxlo, max(bxlo, bxhi)), rng.uniform(bylo, max(bylo, byhi))], (frames, 1))
    elif motion == "static":
        centres = np.tile([rng.uniform(xlo, xhi), rng.uniform(ylo, yhi)], (frames, 1))
    elif motion == "moving in a circle":
        # one full turn over the clip (last frame one step before the start angle), either direction:
        # a path radius of 6-8 px at 32 x 32 moves the shape ~5-6 px per frame
        room = min(xhi - xlo, yhi - ylo) / 2
        R = min(rng.uniform(0.2, 0.26) * min(h, w), room)
        cx, cy = rng.uniform(xlo + R, xhi - R), rng.uniform(ylo + R, yhi - R)
        angle = rng.uniform(0, 2 * math.pi) + rng.choice([-1.0, 1.0]) * 2 * math.pi * t / frames
        centres = np.stack([cx + R * np.cos(angle), cy + R * np.sin(angle)], 1)
    elif motion == "zigzagging":
        # drift left or right at ~2 px/frame while the height follows a triangle wave of period 4 frames:
        # 0, +A, 0, -A, ... so the path is a zigzag line with a turn every second frame
        speed = min(rng.uniform(1.8, 2.5) * s, (xhi - xlo) / steps)
        travel = speed * steps
        start = rng.uniform(xlo, xhi - travel)
        x = start + speed * t if rng.random() < 0.5 else (start + travel) - speed * t
        A = min(rng.uniform(0.11, 0.14) * min(h, w), (yhi - ylo) / 2)
        wave = np.array([0.0, 1.0, 0.0, -1.0])[(t.astype(int) + rng.integers(0, 4)) % 4] * rng.choice([-1.0, 1.0])
        centres = np.stack([x, rng.uniform(ylo + A, yhi - A) + A * wave], 1)
    elif motion == "bouncing":
        # a ball under gravity bouncing in place: parabolic arcs up from a floor, about 1.5 bounces per clip
        floor = rng.uniform(yhi - 2 * s, yhi)
        height = min(rng.uniform(0.35, 0.5) * min(h, w), floor - ylo)
        period = steps / rng.uniform(1.3, 1.7)  # frames per bounce: 4.1-5.4 at 8 frames
        u = ((t + rng.uniform(0, period)) / period) % 1.0  # phase within the bounce, 0 = on the floor
        y = floor - height * 4 * u * (1 - u)  # the parabola, peak at u = 0.5
        centres = np.stack([np.full(frames, rng.uniform(xlo, xhi)), y], 1)
    else:
        raise ValueError(f"unknown motion {motion!r}; choose from {MOTIONS}")
    return centres, radii


# -----------------------------------------------------------------------------------------------------------------------
# clips and datasets


def _choose_appearance(rng, colour, shape, exclude_combos) -> tuple:
    """Draw the unspecified colour/shape uniformly among the pairs that are not excluded."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES
             if (colour is None or c == colour) and (shape is None or s == shape) and (c, s) not in exclude_combos]
    if not pairs:
        raise ValueError(f"no allowed appearance for colour={colour!r}, shape={shape!r}: check the names "
                         f"({list(COLOURS)}, {SHAPES}) and exclude_combos")
    return pairs[rng.integers(len(pairs))]


def past_positions(x: np.ndarray, lag: float) -> np.ndarray:
    """Where a per-frame quantity x (F, D) was `lag` frames earlier, by linear interpolation between frames; before
    frame 0 the first step is extrapolated (the motion started before the clip did)."""
    t = np.arange(len(x)) - lag
    if len(x) < 2:
        return x.copy()
    i = np.clip(np.floor(t).astype(int), 0, len(x) - 2)  # the segment [i, i+1] used for each frame
    w = (t - i)[:, None]  # < 0 before frame 0: extrapolation along the first segment
    return x[i] * (1 - w) + x[i + 1] * w


def make_clip(seed=0, colour: str = None, shape: str = None, size: str = None, motion: str = None, frames: int = 8,
              height: int = 32, width: int = None, exclude_combos=(), trail: bool = False, look: tuple = None) -> Clip:
    """One clip, deterministic from `seed` (int, SeedSequence or a np.random.Generator, which is advanced).
    Attributes left as None are drawn: the appearance among pairs not in `exclude_combos`, motion among MOTIONS.
    trail=True adds a fading trail behind a moving shape (see TRAIL); the committed toy model was trained without.
    look=(colour, shape) draws that appearance over exactly the clip the other arguments make (same background, size,
    path): a copy of that clip in another look, what a model that leaks its training clips would produce."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    width = width or height
    # size and motion are drawn even when given, so fixing one of them does not shift the draws that follow
    colour, shape = _choose_appearance(rng, colour, shape, frozenset(exclude_combos))
    colour, shape = look or (colour, shape)
    size_draw, motion_draw = list(SIZES)[rng.integers(len(SIZES))], MOTIONS[rng.integers(len(MOTIONS))]
    size, motion = size or size_draw, motion or motion_draw
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {list(SIZES)}")

    r = SIZES[size] * min(height, width)
    centres, radii = trajectory(motion, rng, r, frames, height, width)
    bg, bg_params = make_background(rng, height, width)
    rgb = np.array({**COLOURS, **NEW_COLOURS}[colour], dtype=np.float64)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    ghosts = []
    for lag, opacity in TRAIL if trail else ():
        gr = past_positions(radii[:, None], lag)[:, 0]  # (F,)
        # kept inside the frame like the shape (1 pixel margin): the scorer reads the background off the border
        lo = EXTENT * gr[:, None] + 1.0
        gc = np.clip(past_positions(centres, lag), lo, np.array([width, height]) - lo)  # (F, 2)
        ghosts.append((gc, gr, opacity))
    for f in range(frames):
        img = bg
        # "over" compositing, flat colour: the oldest ghost first, the shape itself last
        for gc, gr, opacity in reversed(ghosts):
            if np.allclose(gc[f], centres[f]) and np.isclose(gr[f], radii[f]):
                continue  # no motion, no trail (drawn under the shape it would still tint its anti-aliased edge)
            alpha = opacity * shape_coverage(shape, gc[f, 0], gc[f, 1], gr[f], height, width)[..., None]  # (H, W, 1)
            img = img * (1 - alpha) + rgb * alpha
        alpha = shape_coverage(shape, centres[f, 0], centres[f, 1], radii[f], height, width)[..., None]
        video[f] = np.round(img * (1 - alpha) + rgb * alpha).astype(np.uint8)
    return Clip(video=torch.from_numpy(video).permute(3, 0, 1, 2).contiguous(),  # (F, H, W, 3) -> (3, F, H, W)
                caption=caption_for(colour, shape, motion), colour=colour, shape=shape, size=size, motion=motion,
                centres=centres, radii=radii, seed=seed if not isinstance(seed, np.random.Generator) else None,
                background=bg_params)


def make_dataset(n: int, motions=BASE_MOTIONS, seed: int = 0, exclude_combos=(), **kwargs) -> list:
    """n clips cycling through `motions` (balanced: clip i has motions[i % len]); appearance random among the pairs
    not in exclude_combos. Clip i depends only on (seed, i), so the first k clips are the same for any n >= k.
    kwargs go to make_clip (frames, height, width, colour, shape, size)."""
    motions = list(motions)
    return [make_clip(np.random.SeedSequence([seed, i]), motion=motions[i % len(motions)],
                      exclude_combos=exclude_combos, **kwargs) for i in range(n)]


# -----------------------------------------------------------------------------------------------------------------------
# files


def write_mp4(video: torch.Tensor, path, fps: int = 8, crf: int = 0, pix_fmt: str = "yuv444p"):
    """uint8 (3, F, H, W) -> H.264 mp4 via PyAV. Defaults are lossless (crf 0) without chroma subsampling (yuv444p):
    at 32 x 32 a shape edge is a large part of the shape, and 4:2:0 would smear its colour into the background. Use
    pix_fmt="yuv420p" for files that every player shows (the scorer still reads those: see tests)."""
    import av

    frames = video.permute(1, 2, 3, 0).contiguous().numpy()  # (F, H, W, 3)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def write_folder(clips, folder, fps: int = 8, crf: int = 0, pix_fmt: str = "yuv444p") -> list:
    """Each clip as `<folder>/<i:05d>.mp4` + a sidecar `<i:05d>.txt` with its caption (data.py: the sidecar wins).
    Returns the mp4 paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, clip in enumerate(clips):
        path = folder / f"{i:05d}.mp4"
        write_mp4(clip.video, path, fps, crf, pix_fmt)
        path.with_suffix(".txt").write_text(clip.caption + "\n")
        paths.append(path)
    return paths


def write_regularization_set(folder, n: int, seed: int = 0) -> Path:
    """n base-motion clips with their captions (appearance pairs held out, as toy/demo.py's regularization set),
    written once to `folder` through a temporary folder and one rename; an existing folder is kept as it is."""
    folder = Path(folder)
    if not folder.is_dir():
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written set from a killed run
        write_folder(make_dataset(n, BASE_MOTIONS, seed=2000 + seed, exclude_combos=HELD_OUT_COMBOS), tmp)
        os.replace(tmp, folder)
    return folder


# -----------------------------------------------------------------------------------------------------------------------
# degradation: what a tiny generative model's output looks like, to test the scorer against


def degrade(video: torch.Tensor, seed=0, blur: float = 0.7, noise: float = 10.0, jpeg: int = 50,
            colour_gain: float = 0.08) -> torch.Tensor:
    """uint8 (3, F, H, W) -> the same, blurred (Gaussian, sigma in px), with per-channel colour gains off by up to
    +-colour_gain, Gaussian noise (std in 0-255 units) and per-frame JPEG compression at quality `jpeg` (0 = none)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    x = video.float()  # (3, F, H, W)
    if blur > 0:
        k = int(math.ceil(3 * blur))
        g = torch.exp(-torch.arange(-k, k + 1, dtype=torch.float32) ** 2 / (2 * blur ** 2))
        g = g / g.sum()
        C, Fr, H, W = x.shape
        y = x.reshape(C * Fr, 1, H, W)  # frames as a batch of 1-channel images
        # separable blur with replicate padding, so the border keeps the background colour
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (k, k, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (0, 0, k, k), mode="replicate"), g.view(1, 1, -1, 1))
        x = y.reshape(C, Fr, H, W)
    gains = torch.from_numpy(1 + rng.uniform(-colour_gain, colour_gain, size=3)).float()
    x = x * gains.view(3, 1, 1, 1)
    x = x + torch.from_numpy(rng.normal(0, noise, size=tuple(x.shape))).float()
    x = x.round().clamp(0, 255).to(torch.uint8)
    if jpeg:
        frames = []
        for frame in x.permute(1, 2, 3, 0).numpy():  # (H, W, 3) each
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=jpeg)
            frames.append(np.asarray(Image.open(buf).convert("RGB")))
        x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).contiguous()
    return x
