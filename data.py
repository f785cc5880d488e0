"""Training clips: a folder of videos or of frame folders (or the Jester layout) -> (C, F, H, W) tensors in [-1, 1].

    ds = VideoDataset("data/drumming/", ClipSpec(frames=16, size=384, fps=24),
                      caption="a person doing a {token} sign", token="pll")
    ds = VideoDataset("20bn-jester-v1/", ClipSpec(size=384), caption="a person {class}",
                      jester_csv="jester-v1-train.csv", jester_class="Drumming Fingers", limit=10, seed=0)
    print(ds.report)           # "loaded 10 clips from 20bn-jester-v1/ ..., skipped 1: 4242 (missing frame numbers 7)"
    item = ds[0]               # {"video": (C, F, H, W) float32 in [-1, 1], "caption", "path", "key", "label"}

    python data.py cut recording.mp4 --every 2s --out clips/     # one long recording -> 2-second clips (cut_video)

Sources (method.md §2, §7.2):
  * video files `.mp4 .webm .mov .mkv .avi .gif`, decoded with PyAV (bundled FFmpeg; no system ffmpeg) as a player
    shows them: turned upright as the header says (phones store portrait video as landscape frames plus a rotation),
    non-square pixels stretched to square ones, 10-bit and HDR (PQ, HLG) as 8-bit SDR RGB, cover art and thumbnail
    tracks skipped, audio ignored;
  * frame folders: a folder holding numbered images (`00001.jpg`, `0.png`, ...; 0- or 1-based, any zero padding, jpg
    or png) is one clip, frames in numeric order; a gap in the numbers, or an unnumbered image, makes the clip bad.
    If the root itself is such a folder it is the one clip. Frame folders carry no frame rate: `ClipSpec.native_fps`
    (12 = Jester) stands in;
  * the Jester layout: `<root>/<video_id>/00001.jpg ...` plus a `;`-separated CSV `<video_id>;<class name>`; clips are
    picked by class NAME (indices differ between codebases), `limit` of them with a seeded RNG.
`recursive=False` looks at the root's direct children only; True walks every subfolder. Hidden names are ignored.

Captions, first match wins:
  1. a sidecar text file: `clip.mp4` -> `clip.txt` beside it; a frame folder `clip/` -> `clip.txt` beside it, else
     `clip/caption.txt` inside it;
  2. `<root>/metadata.jsonl`, lines `{"file": "relative/path.mp4", "text": "..."}` (a frame folder's "file" is the
     folder's relative path; `file_name` is accepted for `file`, as in Hugging Face's imagefolder);
  3. the `caption` template, e.g. "a person doing a {token} sign" (the paper's).
`{token}` (the `token` argument) and `{class}` (the Jester class name) are substituted in every caption. A clip with no
caption, or an empty one, is an error naming the file: captions are never silently empty.

Clip sampling (`ClipSpec`): frames `start, start + stride, ...` (0-based frame indices), with the stride either given or
derived from a target fps as max(1, round(native_fps / fps)) like the official code (Jester at 12 fps with fps=24 gives
consecutive frames). Indices count frames at a constant rate: a video whose frames come at varying intervals (phones
drop frames in low light) is first put on a time grid of its usual interval, each slot holding the frame a player
shows then (a dropped frame shows the one before again), and that interval is its fps. Clips shorter than needed are
padded by repeating the last frame (official), looped, or skipped; each is counted in the report. With `max_frames`,
a clip keeps every strided frame that fits (up to max_frames), and train.py draws a window of `frames` consecutive ones
from them at every step, as the official loader does. Frames are resized (bilinear, antialiased) to an aspect bucket of
about size x size pixels without cropping (official), or with resize="crop" to cover size x size and center-cropped.

Bad input never surfaces as a bare decoder traceback. Every clip is probed at construction by decoding exactly the
frames __getitem__ will use, so a zero-byte, non-video, truncated or corrupt file, or a frame folder with missing
numbers, is found before training starts and the clip count is exact. Default: skip it with a warning and list it in
`report`; `strict=True`: raise `DataError` naming the file. __getitem__ decodes again (only paths are kept, not
frames): train.py reads every clip once to cache VAE latents, so memory matters more than speed here.

Notable differences from upstream (ExponentialML/Text-To-Video-Finetuning, used by the official code):
  * buckets keep the pixel count of size x size (upstream snaps the short side in 64/128 steps, and the official
    code swaps h and w when it asks for a bucket, so landscape clips are squeezed into portrait ones);
  * `start` defaults to 0; upstream's `sample_start_idx: 1` skips the first frame;
  * no `text.json` random-caption files and no file-name or random fallback captions: a missing caption is an error.
"""

if __name__ == "__main__":  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    import omp
    omp.choose_wait_policy()

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from difflib import get_close_matches
from fractions import Fraction
from itertools import chain, count, islice
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.stream import Disposition
from av.video.reformatter import Interpolation, VideoReformatter
from PIL import Image

from weights import WeightsError, atomic_write, read_text, writable_dir

VIDEO_EXTS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
KEY_VERSION = "data.py/3"  # bump when decoding or resizing changes, so cached latents keyed by `key` go stale
NOT_MOVING = Disposition.attached_pic | Disposition.still_image | Disposition.timed_thumbnails  # cover art, thumbnails
HDR_TRANSFERS, BT2020, BT709 = {16, 18}, 9, 1  # FFmpeg's numbers: PQ (SMPTE 2084) and HLG (ARIB STD-B67); primaries


class DataError(ValueError):
    """A clip, caption or folder that cannot be used; the message starts with the file or folder it is about."""


@dataclass
class ClipSpec:
    frames: int = 16  # frames per clip (official: 16)
    size: int = 256  # buckets hold about size x size pixels; crop gives exactly size x size (official: 384)
    stride: int = 1  # take every stride-th frame (official `frame_step`); leave at 1 when fps is set
    fps: float = None  # target fps: stride = max(1, round(native_fps / fps)) per clip (official: 24)
    native_fps: float = 12.0  # frame rate assumed for frame folders (Jester: 12) and videos that do not state one
    start: int = 0  # index of the first frame taken (official `sample_start_idx`: 1)
    short: str = "repeat"  # too few frames: "repeat" the last one (official), "loop" the video, or "skip" the clip
    resize: str = "bucket"  # "bucket": keep the aspect ratio, no crop (official); "crop": a size x size centre crop
    max_frames: int = 0  # 0: exactly `frames`; N: every strided frame from `start`, up to N (windows drawn later)
    multiple: int = 64  # H and W must divide by 64 = VAE x8 times UNet x8; tests and the toy world use smaller ones

    def __post_init__(self):
        # fail at once on settings that cannot work, rather than at the first clip or inside the UNet
        if self.frames < 1 or self.stride < 1 or self.start < 0 or self.multiple < 1:
            raise ValueError(f"ClipSpec: need frames >= 1, stride >= 1, start >= 0, multiple >= 1; got {self}")
        if self.size < self.multiple or self.size % self.multiple:
            raise ValueError(f"ClipSpec: size {self.size} is not a positive multiple of {self.multiple} (the model "
                             f"needs H and W divisible by {self.multiple}; lower `multiple` only for tiny test models)")
        if self.fps is not None and (self.fps <= 0 or self.stride != 1):
            raise ValueError(f"ClipSpec: give a positive fps or a stride, not both "
                             f"(fps={self.fps}, stride={self.stride})")
        if self.short not in ("repeat", "loop", "skip"):
            raise ValueError(f"ClipSpec: short must be 'repeat', 'loop' or 'skip', not {self.short!r}")
        if self.resize not in ("bucket", "crop"):
            raise ValueError(f"ClipSpec: resize must be 'bucket' or 'crop', not {self.resize!r}")
        if self.max_frames and self.max_frames < self.frames:
            raise ValueError(f"ClipSpec: max_frames {self.max_frames} is below frames {self.frames} (0 = no windows)")

    def stride_for(self, native_fps) -> int:
        """Frame step for a source of `native_fps` (None: a frame folder, or a video that does not say)."""
        if self.fps is None:
            return self.stride
        return max(1, round((native_fps or self.native_fps) / self.fps))  # upstream's formula (method.md §2)

    def out_size(self, h: int, w: int) -> tuple:
        """(H, W) of the output for a source of h x w pixels. Buckets: of all (H, W) that are multiples of `multiple`
        with H*W within 10% of size^2 (so memory stays that of a size x size clip), the one whose aspect ratio is
        closest to the source's (e.g. 176x100 Jester frames -> 448x320 at size 384). Upstream's `sensible_buckets` snaps
        the short side instead, and the official code passes it h and w swapped (method.md §2); neither is copied."""
        if self.resize == "crop":
            return self.size, self.size
        area, m, best = self.size ** 2, self.multiple, None
        for H in range(m, 4 * self.size + 1, m):
            for W in range(m, 4 * self.size + 1, m):
                if abs(H * W / area - 1) <= 0.1:  # the square size x size always qualifies
                    score = (abs(math.log(W * h / (H * w))), abs(H * W - area))  # aspect error, then area error
                    best = min(best or (score, H, W), (score, H, W))
        return best[1], best[2]


# -----------------------------------------------------------------------------------------------------------------------
# finding clips


def _natural(p: Path):
    """Sort key that puts 2 before 10 (Jester video ids, unpadded frame numbers)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]


def _visible(folder: Path) -> list:
    # hidden names are skipped: macOS `._clip.mp4` resource forks and `.ipynb_checkpoints/` are not clips
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=_natural)


def is_frame_folder(folder: Path) -> bool:
    """A folder with at least one numbered image (00001.jpg) is a clip; its other contents are checked when probing."""
    return any(p.suffix.lower() in IMAGE_EXTS and p.stem.isdigit() for p in _visible(folder) if p.is_file())


def find_clips(root: Path, recursive: bool = False, stills: bool = False) -> list:
    """Video files and frame folders under root, in natural order; with `stills`, every image file is a clip too."""
    if is_frame_folder(root) and not stills:
        return [root]  # e.g. `data/Terracotta_Warrior/001.jpg ...`: the root is the one clip
    clips, folders = [], [root]
    exts = VIDEO_EXTS | IMAGE_EXTS if stills else VIDEO_EXTS  # a subject's photos: each one its own (static) clip
    while folders:
        for p in _visible(folders.pop(0)):
            if p.is_file() and p.suffix.lower() in exts:
                clips.append(p)
            elif p.is_dir() and is_frame_folder(p):
                clips.append(p)  # a frame folder is a leaf: its own subfolders are not searched
            elif p.is_dir() and recursive:
                folders.append(p)
    return sorted(clips, key=lambda p: [_natural(Path(part)) for part in p.relative_to(root).parts])


def read_jester_csv(csv_path) -> list:
    """[(video_id, class name)] from a Jester split CSV: no header, `;`-separated (method.md §7.2)."""
    rows = []
    for n, line in enumerate(read_text(csv_path, "Jester CSV").splitlines(), 1):
        if not line.strip():
            continue
        parts = [s.strip() for s in line.split(";")]  # class names hold spaces ("Drumming Fingers"), never ";"
        if len(parts) != 2 or not parts[0]:
            raise DataError(f"{csv_path}:{n}: expected '<video_id>;<class name>', got {line!r}")
        rows.append(tuple(parts))
    return rows


def list_frames(folder: Path) -> list:
    """The frame files of a frame folder in numeric order; raises DataError on gaps, duplicates or stray images."""
    if not folder.is_dir():
        raise DataError(f"{folder}: frame folder not found")
    images = [p for p in _visible(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if not images:
        raise DataError(f"{folder}: no frame images (.jpg, .png) in this folder")
    # Strict on purpose: a stray image or a missing number would silently become a jump in the motion we learn.
    stray = [p.name for p in images if not p.stem.isdigit()]
    if stray:
        raise DataError(f"{folder}: images that are not numbered frames: {', '.join(stray[:5])}")
    by_number = {}  # frame number -> file; 00001.jpg and 1.png would both be frame 1
    for p in images:
        if int(p.stem) in by_number:
            raise DataError(f"{folder}: two files for frame {int(p.stem)}: {by_number[int(p.stem)].name}, {p.name}")
        by_number[int(p.stem)] = p
    first, last = min(by_number), max(by_number)
    missing = sorted(set(range(first, last + 1)) - set(by_number))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{folder}: missing frame numbers {shown} (frames {first}..{last})")
    return [by_number[k] for k in range(first, last + 1)]


# -----------------------------------------------------------------------------------------------------------------------
# reading frames


def _clip_indices(n: int, spec: ClipSpec, stride: int) -> tuple:
    """Frame indices into a source of n frames, what was done if it is too short (None, "padded", "looped",
    "skipped"), and the frame count a full window of `spec.frames` needs. With `max_frames`, every strided frame
    that fits (official: `len(video) // stride` of them), up to max_frames, so that windows can be drawn from them."""
    count = spec.frames
    if spec.max_frames:
        count = max(spec.frames, min(spec.max_frames, (n - spec.start) // stride))
    idx = [spec.start + k * stride for k in range(count)]  # 16 frames, stride 2, start 1: 1, 3, ..., 31
    needed = spec.start + (spec.frames - 1) * stride + 1  # ... so a full window needs 32 frames
    if idx[-1] < n:
        return idx, None, needed
    idx = idx[:spec.frames]  # too short for one window: pad, loop or skip as one window
    if spec.short == "loop":
        return [i % n for i in idx], "looped", needed  # as if the video played again from its first frame
    if spec.short == "repeat" and spec.start < n:
        kept = [i for i in idx if i < n]
        return kept + [kept[-1]] * (spec.frames - len(kept)), "padded", needed  # upstream pads with the last frame
    return None, "skipped", needed  # "skip", or nothing to repeat because the clip ends before `start`


def _looks_like_text(path: Path) -> bool:
    """True if the file starts with readable text (a README saved as .mp4, an HTML error page from a download)."""
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        head = head.decode("utf-8")
    except UnicodeDecodeError:  # (a multi-byte character cut at byte 512 also lands here; fine for a message)
        return False
    return all(c.isprintable() or c.isspace() for c in head)


def _frames_needed(spec: ClipSpec, stride: int) -> int:
    """Frames from the start of a source that the spec can use at this stride (see _clip_indices)."""
    needed = spec.start + (spec.frames - 1) * stride + 1
    if spec.max_frames:  # enough for (n - start) // stride to reach max_frames
        needed = max(needed, spec.start + spec.max_frames * stride)
    return needed


def decode_video(path: Path, spec: ClipSpec) -> tuple:
    """The frames the spec can need from the start of a video (fewer if it is shorter) as uint8 (H, W, 3) arrays, as a
    player shows them (display_frames), and the stride for this video's fps."""
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            stream = video_stream(container, path)
            probe = _frames_needed(spec, spec.stride_for(stated_fps(stream)))
            fps, frames, timed = display_frames(container, stream, path, probe)  # a varying rate gets its own fps
            stride = spec.stride_for(fps)
            needed = _frames_needed(spec, stride)
            frames = list(islice(frames, needed))  # decode only what is used: regularization videos can be long
            # frames the header promises: the stream's count (mp4, avi; a re-timed video has its own count), else
            # duration x fps
            promised = (not timed and stream.frames) or header_seconds(container, stream) * (fps or 0)
    except (av.FFmpegError, OSError) as e:
        what = "not a video (the file holds text)" if _looks_like_text(path) else "not a video, or truncated/corrupt"
        raise DataError(f"{path}: {what}: {getattr(e, 'strerror', None) or e}") from None
    if not frames:
        raise DataError(f"{path}: no frame could be decoded")
    # A file that ends well before its header says is truncated, not merely short (a cut mp4 usually fails to open
    # above, having lost its index; a cut webm opens and just stops). Gifs have no header count: a cut gif looks short.
    if len(frames) < needed and len(frames) < 0.9 * promised - 1:  # 10% slack for rounded durations
        raise DataError(f"{path}: truncated: the header promises {round(promised)} frames, only {len(frames)} decode")
    return frames, stride


def _check_file(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: zero-byte file")


def video_stream(container, path: Path):
    """The video stream a player shows: not cover art or a thumbnail track; of several, the largest picture."""
    moving = [s for s in container.streams.video if not s.disposition & NOT_MOVING]
    if not moving:
        raise DataError(f"{path}: no video stream (streams: {[s.type for s in container.streams]})")
    return max(moving, key=lambda s: s.codec_context.width * s.codec_context.height)  # the first of equals


def stated_fps(stream) -> float | None:
    """The header's frame rate: average_rate is frames / duration; None for some odd files (native_fps stands in)."""
    return float(stream.average_rate or stream.guessed_rate or 0) or None


def header_seconds(container, stream) -> float:
    """The video's length by its header: its DURATION tag (mkv, webm: FFmpeg fills their stream durations in from the
    whole file's), else the stream's duration, else the file's if the video is all the file holds (the file's length
    covers audio too, which can run longer)."""
    tag = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", stream.metadata.get("DURATION", ""))  # 00:00:01.000000000
    if tag:
        return int(tag[1]) * 3600 + int(tag[2]) * 60 + float(tag[3])
    if stream.duration:
        return float(stream.duration * stream.time_base)
    return (container.duration or 0) / 1e6 if len(container.streams) == 1 else 0.0


def display_frames(container, stream, path: Path, probe: int) -> tuple:
    """(frames per second, an iterator of the video's frames as a player shows them (to_rgb), whether they were
    re-timed). The frames come at a constant rate: as decoded, or, if the first `probe` frames come at varying
    intervals (phones drop frames in low light), one per usual interval on the time grid a player follows (on_grid)."""
    sar, reformatter = stream.sample_aspect_ratio, VideoReformatter()  # one per video: HDR's set-up takes seconds
    decoded = ((to_rgb(f, reformatter, sar, path), f.pts) for f in container.decode(stream))
    head = list(islice(decoded, probe))
    step = varying_step([pts for _, pts in head])
    frames = chain(head, decoded)
    if step is None:  # a constant rate (or no usable timestamps): every frame, by index
        return stated_fps(stream), (rgb for rgb, _ in frames), False
    return 1 / float(step * stream.time_base), on_grid(frames, step), True


def varying_step(pts: list) -> Fraction | None:
    """The usual interval between frames (in timestamp ticks) if the intervals vary, else None: a constant rate, or no
    usable timestamps (missing, or not increasing)."""
    if len(pts) < 3 or None in pts:
        return None
    gaps = np.diff(np.array(pts, dtype=np.int64))
    if (gaps <= 0).any():
        return None
    usual = np.median(gaps)
    # a tick of rounding (webm counts milliseconds: 33, 34, 33 at 30 fps) or a little jitter is not a varying rate
    regular = np.abs(gaps - usual) <= 1 + 0.1 * usual
    return None if regular.all() else Fraction(int(gaps[regular].sum()), int(regular.sum()))


def on_grid(timed, step: Fraction):
    """From (frame, pts) in time order, what a player shows at t0, t0 + step, t0 + 2 step, ... (t0: the first pts): the
    last frame begun by then, to half a step (timestamps are rounded). A dropped frame shows the one before it again."""
    shown = None
    for frame, pts in timed:
        if shown is None:
            t0, k = pts, 0
        while shown is not None and pts > t0 + k * step + step / 2:  # the next frame starts after slot k
            yield shown
            k += 1
        shown, last = frame, pts
    while shown is not None and t0 + k * step <= last + step / 2:  # the last frame stays up for one interval
        yield shown
        k += 1


def to_rgb(frame, reformatter: VideoReformatter, sar, path: Path) -> np.ndarray:
    """One decoded frame as a player shows it: uint8 RGB (H, W, 3), HDR mapped to SDR, square pixels, upright."""
    kw = {}
    if frame.format.components[0].bits > 8:  # 10-bit 4:2:0 loses ~2 levels in swscale's default path (255 -> 253)
        kw["interpolation"] = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT
    if frame.color_trc in HDR_TRANSFERS or frame.color_primaries == BT2020:
        # as on an SDR screen: BT.709 primaries and gamma, HDR reference white (HLG 75%, PQ 203 nits) -> white
        kw.update(dst_color_trc=BT709, dst_color_primaries=BT709)
    if sar and sar != 1:  # non-square pixels: stretch to square ones (never shrink, so no detail is lost)
        kw["width"], kw["height"] = ((round(frame.width * sar), frame.height) if sar > 1 else
                                     (frame.width, round(frame.height / sar)))
    return upright(reformatter.reformat(frame, format="rgb24", **kw).to_ndarray(), frame, path)


def upright(rgb: np.ndarray, frame, path: Path) -> np.ndarray:
    """`rgb` turned as the frame's display matrix says: phones store portrait video as landscape frames plus a matrix
    in the file's header (mp4 `tkhd`), which players, and ffmpeg's command line, apply."""
    side = frame.side_data.get("DISPLAYMATRIX")
    if side is None:
        return rgb
    m = np.frombuffer(bytes(side), np.int32)[[0, 1, 3, 4]] / 65536  # a, b, c, d of the 16.16 fixed-point 3x3 matrix
    a, b, c, d = np.round(m).astype(int)
    quarter = (b == c == 0 or a == d == 0) and abs(a * d - b * c) == 1  # each axis to an axis, unscaled
    if not quarter or np.abs(m - (a, b, c, d)).max() > 1e-3:
        raise DataError(f"{path}: its header turns the picture by {math.degrees(math.atan2(-m[1], m[0])):.0f} "
                        f"degrees; only quarter turns and mirrors are supported")
    # a display pixel (x', y') = (a x + c y, b x + d y): a quarter turn swaps the axes, a negative entry reverses one
    if a == 0:
        rgb, a, d = rgb.transpose(1, 0, 2), c, b
    return np.ascontiguousarray(rgb[::d, ::a])


def read_image(path: Path) -> np.ndarray:
    """One image file as uint8 RGB (H, W, 3); a DataError naming it if it is empty or unreadable."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: zero-byte file")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for unreadable or truncated images
        raise DataError(f"{path}: not a readable image ({str(e).replace(repr(str(path)), path.name)})") from None


def read_clip(path: Path, spec: ClipSpec) -> tuple:
    """The spec's frames of one clip (video file or frame folder) as uint8 (F, H, W, 3), and how a short clip was
    handled (None, "padded", "looped", or "skipped" with frames None), the source's frame count (when short: all of
    it) and the count the spec needs. DataError if the clip is unusable."""
    if path.is_dir() or path.suffix.lower() not in VIDEO_EXTS:  # (a Jester id whose folder is missing lands here too)
        # a still image is a clip of one frame: `short` pads it (repeat: a static clip of the same image)
        files = [path] if path.is_file() and path.suffix.lower() in IMAGE_EXTS else list_frames(path)
        n = len(files)
        idx, short, needed = _clip_indices(n, spec, spec.stride_for(None))  # frame folders have no fps: native_fps
        if idx is None:
            return None, short, n, needed
        # only the selected files are read (Jester folders hold ~36 frames, 16 are used); padding reuses them
        images = {i: read_image(files[i]) for i in sorted(set(idx))}
        if len({im.shape for im in images.values()}) > 1:
            raise DataError(f"{path}: frames differ in size: {sorted({im.shape for im in images.values()})}")
        frames = [images[i] for i in idx]
    else:
        decoded, stride = decode_video(path, spec)  # the stride comes back: it depends on the file's own fps
        n = len(decoded)
        idx, short, needed = _clip_indices(n, spec, stride)
        if idx is None:
            return None, short, n, needed
        frames = [decoded[i] for i in idx]
    return np.stack(frames), short, n, needed  # (F, H, W, 3)


def to_tensor(frames: np.ndarray, spec: ClipSpec) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (C, F, H', W') in [-1, 1]: resized to the aspect bucket (no crop), or for
    resize="crop" resized to cover size x size and center-cropped."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (F, 3, H, W): frames as an image batch
    h, w = x.shape[-2:]
    oh, ow = spec.out_size(h, w)
    scale = max(oh / h, ow / w)  # crop: the smallest resize that covers (oh, ow)
    rh, rw = (oh, ow) if spec.resize == "bucket" else (max(oh, round(h * scale)), max(ow, round(w * scale)))
    if (rh, rw) != (h, w):
        # antialias matters when shrinking (e.g. 576p sources to 256): plain bilinear would alias fine detail
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - oh) // 2, (rw - ow) // 2
    x = x[:, :, top:top + oh, left:left + ow]  # (F, 3, oh, ow); a no-op for buckets
    x = (x / 127.5 - 1.0).clamp(-1.0, 1.0)  # [0, 255] -> [-1, 1], the VAE's input range
    return x.permute(1, 0, 2, 3).contiguous()  # (C, F, H, W)


# -----------------------------------------------------------------------------------------------------------------------
# captions and cache keys


def read_metadata(root: Path) -> dict:
    """{relative posix path: caption} from `<root>/metadata.jsonl`, or {} if there is none."""
    path, captions = root / "metadata.jsonl", {}
    if not path.is_file():
        return captions
    for n, line in enumerate(read_text(path, "metadata.jsonl").splitlines(), 1):
        if not line.strip():
            continue
        # a malformed line is an error even in non-strict mode: skipping it would drop that clip's caption silently
        try:
            row = json.loads(line)
            captions[Path(row.get("file", row.get("file_name"))).as_posix()] = str(row["text"])  # "./a.mp4" -> "a.mp4"
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataError(f"{path}:{n}: expected {{\"file\": \"relative/path.mp4\", \"text\": \"...\"}}, "
                            f"got {line[:100]!r}") from None
    return captions


def content_digest(path: Path) -> str:
    """sha256 over a video file's bytes, or over a frame folder's frame files in order. Names are left out, so a
    renamed or moved clip keeps its digest (and its cached latents); any changed byte changes it."""
    outer = hashlib.sha256()
    for file in list_frames(path) if path.is_dir() else [path]:
        inner = hashlib.sha256()  # per-file digests, chained: file boundaries count, so frames cannot merge
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(inner.digest())
    return outer.hexdigest()


def clip_key(digest: str, spec: ClipSpec, caption: str) -> str:
    """Cache key for a clip's latents: what was read (content), how (spec, code version) and its caption."""
    # JSON with sorted keys: the same settings always give the same bytes, whatever the dict order
    blob = json.dumps({"version": KEY_VERSION, "content": digest, "spec": asdict(spec), "caption": caption},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -----------------------------------------------------------------------------------------------------------------------
# the dataset


class VideoDataset(torch.utils.data.Dataset):
    """Clips under `root` (see the module docstring); item i is {"video": float32 (C, F, H, W) in [-1, 1], "caption",
    "path", "key", "label" (the Jester class name, else "")}.

    caption: template used when a clip has no sidecar or metadata.jsonl caption; `{token}` -> token, `{class}` -> label.
    jester_csv, jester_class: take the clips of this class (by name) from a Jester split CSV; root holds `<video_id>/`.
    limit, seed: keep at most `limit` clips, drawn in a seeded random order (bad ones are replaced by the next draw).
    strict: raise DataError on the first unusable clip instead of skipping it with a warning.
    stills: every image file (.jpg, .png) is also a clip, of one frame (a subject's photos; `short` pads it).
    After construction: `report` (one summary line), `skipped` [(path, reason)], `short` [(path, action, n, needed)].
    """

    def __init__(self, root, spec: ClipSpec = None, caption: str = None, token: str = None, recursive: bool = False,
                 strict: bool = False, jester_csv=None, jester_class: str = None, limit: int = None, seed: int = 0,
                 stills: bool = False):
        self.root, self.spec = Path(root), spec or ClipSpec()
        self.template, self.token = caption, token
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory")
        # the CSV alone would mean "every class" and a class alone has no ids to pick: ask for both
        if (jester_csv is None) != (jester_class is None):
            raise ValueError("give jester_csv and jester_class together (the CSV maps video ids to class names)")
        self.labels = {}  # clip path -> Jester class name
        if jester_csv is not None:
            candidates = self._jester(Path(jester_csv), jester_class)
        else:
            candidates = find_clips(self.root, recursive, stills)
        self.metadata = read_metadata(self.root)

        # Probe clips in order (a seeded shuffle when only `limit` are wanted) until enough are usable. Probing decodes
        # the very frames __getitem__ will use, so every failure happens here, once, and the count is exact. The RNG is
        # private and seeded, so every rank of a DDP run draws the same clips.
        order = list(candidates)
        if limit is not None:
            random.Random(seed).shuffle(order)
        self.clips, self.skipped, self.short = [], [], []
        for path in order:
            if limit is not None and len(self.clips) >= limit:
                break
            try:
                frames, short, n, needed = read_clip(path, self.spec)
            except DataError as e:
                if strict:
                    raise
                warnings.warn(f"skipping {e}", stacklevel=2)  # points at the caller's line
                self.skipped.append((path, self._reason(path, e)))
                continue
            if short:  # padded, looped or skipped: the report counts each kind
                self.short.append((path, short, n, needed))
            if frames is None:
                self.skipped.append((path, f"short: {n} frames, needs {needed}"))
                continue
            label = self.labels.get(path, "")
            text = self._caption(path, label)  # a missing caption is a setup mistake, not a bad file: never skipped
            key = clip_key(content_digest(path), self.spec, text)
            self.clips.append({"path": str(path), "caption": text, "key": key, "label": label})
        # back to natural order, whatever order they were drawn in: the dataset reads like the folder listing
        rank = {str(p): i for i, p in enumerate(candidates)}
        self.clips.sort(key=lambda c: rank[c["path"]])

        self.report = self._summary(candidates, jester_class, limit, seed)
        if not self.clips:
            raise DataError(self._empty_message(candidates, recursive))

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        clip = self.clips[i]
        # decode again rather than keep every clip's frames in RAM; decoding is deterministic, so this is the probe's
        # result (unless the file changed on disk since, which then raises a DataError naming it)
        frames, _, _, _ = read_clip(Path(clip["path"]), self.spec)
        if frames is None:
            raise DataError(f"{clip['path']}: has become too short since the dataset was built")
        return {"video": to_tensor(frames, self.spec), **clip}  # video: (C, F, H, W)

    def _jester(self, csv_path: Path, name: str) -> list:
        """Frame folders `<root>/<video_id>` of the CSV rows whose class is `name`, in numeric id order."""
        rows = read_jester_csv(csv_path)
        classes = sorted({c for _, c in rows})
        if name not in classes:  # by name only: class indices differ between codebases (method.md §7.2)
            close = get_close_matches(name, classes, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else f"; classes: {', '.join(classes)}"
            raise DataError(f"{csv_path}: no clips of class {name!r}{hint}")
        ids = sorted({vid for vid, c in rows if c == name}, key=lambda v: _natural(Path(v)))
        self.labels = {self.root / vid: name for vid in ids}
        return [self.root / vid for vid in ids]

    def _caption(self, path: Path, label: str) -> str:
        """The first of: sidecar .txt, metadata.jsonl entry, template; then {token} and {class} substituted."""
        if path.is_dir():
            sidecars = [path.parent / (path.name + ".txt"), path / "caption.txt"]
        else:
            sidecars = [path.with_suffix(".txt")]
        rel = path.relative_to(self.root).as_posix()
        found = [f for f in sidecars if f.is_file()]
        if found:  # (strip: editors add a trailing newline)
            text, source = read_text(found[0], "caption file").strip(), str(found[0])
        elif rel in self.metadata:
            text, source = self.metadata[rel].strip(), f"{self.root / 'metadata.jsonl'}"
        elif self.template is not None:
            text, source = self.template, "the caption template"
        else:
            raise DataError(f"{path}: no caption: no {' or '.join(f.name for f in sidecars)}, no {rel!r} entry in "
                            f"{self.root / 'metadata.jsonl'}, and no caption template "
                            f"(e.g. 'a person doing the {{token}} sign')")
        # plain replace, not str.format: a caption may contain other braces
        for field, value in (("{token}", self.token), ("{class}", label)):
            if field in text:
                if not value:
                    what = "token was given" if field == "{token}" else "Jester class (jester_csv/jester_class)"
                    raise DataError(f"{path}: caption {text!r} from {source} uses {field} but no {what}")
                text = text.replace(field, value)
        if not text:
            raise DataError(f"{path}: empty caption in {source}")
        return text

    def _reason(self, path: Path, e: DataError) -> str:
        """The error message without the leading path, or relative to the root when it names a file inside the clip."""
        msg = str(e)
        return msg[len(f"{path}: "):] if msg.startswith(f"{path}: ") else msg.replace(f"{self.root}{os.sep}", "")

    def _name(self, path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def _summary(self, candidates, jester_class, limit, seed) -> str:
        text = f"loaded {len(self.clips)} clips from {self.root}"
        if jester_class is not None:
            text += f" (class {jester_class!r}, {len(candidates)} listed)"
        if limit is not None:
            text += f", at most {limit} drawn with seed {seed}"
        for action, how in (("padded", "padded by repeating the last frame"), ("looped", "looped")):
            hits = [f"{self._name(p)} ({n}/{needed} frames)" for p, a, n, needed in self.short if a == action]
            if hits:
                more = " ..." if len(hits) > 20 else ""
                text += f"; {len(hits)} short clips {how}: {', '.join(hits[:20])}{more}"
        if self.skipped:
            shown = [f"{self._name(p)} ({r})" for p, r in self.skipped[:20]]  # the rest are in self.skipped
            text += f"; skipped {len(self.skipped)}: " + ", ".join(shown) + (" ..." if len(self.skipped) > 20 else "")
        return text

    def _empty_message(self, candidates, recursive) -> str:
        if self.skipped:
            return f"{self.root}: no usable clips: {self.report}"
        if candidates:  # only possible with limit=0
            return f"{self.root}: no clips kept ({self.report})"
        exts = " ".join(sorted(VIDEO_EXTS))
        msg = f"{self.root}: no clips: no video files ({exts}) and no folders of numbered frames"
        subfolders = [p.name + "/" for p in _visible(self.root) if p.is_dir()]
        if subfolders and not recursive:
            msg += f" (subfolders {', '.join(subfolders[:3])} were not searched: pass recursive=True)"
        return msg


# -----------------------------------------------------------------------------------------------------------------------
# a long recording -> clips (python data.py cut)


class _TooShort(Exception):
    """A last piece too short to keep (write_clip)."""


def cut_video(path, seconds: float, out):
    """Cut a video into clips of `seconds` each as a player shows it (display_frames: upright, square pixels, 8-bit SDR,
    a constant rate): `<out>/<stem>_000.mp4`, `_001.mp4`, ... (H.264 at crf 10, no audio). Yields each path once it is
    written (atomically). A last piece shorter than half a clip is left out."""
    path, out = Path(path), Path(out)
    _check_file(path)
    if (out / f"{path.stem}_000.mp4").exists():  # a second cut would mix with the first one's clips
        raise DataError(f"--out {out}: already holds clips of {path.name} ({path.stem}_000.mp4, ...); choose another "
                        f"folder")
    try:
        with av.open(str(path)) as container:
            stream = video_stream(container, path)
            fps, frames, _ = display_frames(container, stream, path, probe=30)  # a second of frames shows the rate
            if not fps:
                raise DataError(f"{path}: the header states no frame rate, so it cannot be cut by time")
            n = max(1, round(seconds * fps))
            for i in count():
                clip = out / f"{path.stem}_{i:03d}.mp4"
                if not write_clip(islice(frames, n), clip, fps, least=n / 2 if i else 1):
                    return
                yield clip
    except (av.FFmpegError, OSError) as e:
        raise DataError(f"{path}: cannot be read or cut: {getattr(e, 'strerror', None) or e}") from None


def write_clip(frames, path: Path, fps: float, least: float = 1) -> int:
    """uint8 RGB frames as an H.264 mp4 at `path` (atomic_write); returns their count, or 0 with nothing written if
    fewer than `least` come."""
    first = next(frames, None)
    if first is None:
        return 0
    h, w = first.shape[0] // 2 * 2, first.shape[1] // 2 * 2  # 4:2:0 needs even sizes: an odd last row or column goes
    written = 0

    def write(tmp):
        nonlocal written
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1 << 16),
                                          options={"crf": "10"})  # 29.97 -> 30000/1001
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for rgb in chain([first], frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
                container.mux(stream.encode(frame))
                written += 1
            container.mux(stream.encode())  # flush
        if written < least:
            raise _TooShort  # atomic_write removes the temporary file: nothing appears

    try:
        atomic_write(path, write)
    except _TooShort:
        return 0
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Prepare training clips: cut a long recording into clips for train.py "
                                "--videos.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cut", help="cut a long recording into clips of one length, upright, without audio")
    c.add_argument("video", help="a video file, e.g. a phone's .mp4 or .mov")
    c.add_argument("--every", required=True, help="the clips' length in seconds: 2, 2s or 1.5s")
    c.add_argument("--out", required=True, help="folder for <name>_000.mp4, <name>_001.mp4, ... (never overwritten)")
    args = p.parse_args(argv)
    every = re.fullmatch(r"(\d+\.?\d*|\.\d+)\s*s?", args.every.strip())
    if not every or float(every[1]) <= 0:
        p.error(f"--every {args.every}: expected a positive number of seconds, e.g. 2s")
    written = []
    try:
        writable_dir(args.out, "--out")
        for clip in cut_video(args.video, float(every[1]), args.out):
            written.append(clip)
            print(clip)
    except (DataError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # each clip is written whole (atomic_write) or not at all
        print(f"\ninterrupted: {len(written)} clips written to {args.out}, each complete", file=sys.stderr)
        return 130
    print(f"wrote {len(written)} clips of {float(every[1]):g} s to {args.out}; caption them with a .txt beside each "
          f"clip, a metadata.jsonl, or train.py --caption")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
