"""Evaluate a motion-customized text-to-video model with the NewMove metrics (method.md §7).

    python evaluate.py --model text-to-video-ms-1.7b --delta runs/pll/delta.safetensors \\
        --prompts prompts/appearance_100.txt --seeds 0 1 2 --token pll \\
        --target-class "Sliding Two Fingers Up" --motion-phrase "sliding two fingers up" \\
        --classifier TRN_jester_RGB_BNInception_TRNmultiscale_segment8_best.pth.tar --classes jester_categories.txt \\
        --clip ViT-B-32-quickgelu --clip-weights ViT-B-32.pt \\
        --sscd sscd_disc_mixup.torchscript.pt --train-videos data/pll/ --out report/
    torchrun --nproc-per-node 4 evaluate.py ...            # generation sharded over ranks; rank 0 scores and writes
    python evaluate.py --videos-in report/videos/ ...      # score existing videos (index.json or <stem>.txt prompts)

Metrics (each a small function below, with its definition and source):
  * motion accuracy     % of videos whose top-1 class of a Jester classifier is the target class (paper §4.2)
  * appearance score    mean raw CLIP cosine between frames and the appearance part of the prompt (paper §4.2;
                        train.py stops at 0.265)
  * text alignment      mean raw CLIP cosine between frames and a full caption (paper §4.2)
  * copy score          max SSCD cosine between any generated frame and any training frame; % of videos > 0.25;
                        per video the training clip of that frame, per training clip the % of videos copying it
  * temporal consistency  mean CLIP cosine of consecutive frames (DreamVideo / VGen, method.md §7.6)
  * subject similarity  mean CLIP image-image cosine between a video's frames and the subject's example frames
                        (--subject-videos: DreamBooth's CLIP-I), for a motion + subject run (train.py --subject-videos)

Prompt convention. Prompt lines are templates holding `{token}` once, e.g. "A female firefighter doing the {token}
sign". The *motion phrase* is the part matched by --motion-regex (default: "doing the {token}" as in the paper's test
prompts, or "doing a {token}" as in its training captions, optionally followed by " sign" or " gesture"). Appearance
text = the template with that part removed ("A female firefighter"); caption = the template with that part replaced by
--motion-phrase ("A female firefighter sliding two fingers up"); the generation prompt = the template with `{token}`
replaced by --token. A template may also name a subject taught with train.py --subject-videos: `{subject_token}` is
replaced by --subject-token everywhere ("A {subject_token} dog doing the {token} sign").

Settings the paper leaves open (method.md §7.8) are flags, and every one lands in report.json: the CLIP model, the
classifier's frame sampling, the SSCD resize. Scoring runs on rank 0 on the uint8 videos in memory; scoring the saved
mp4s later (--videos-in) gives slightly different numbers because H.264 is lossy (crf 10).
"""

import omp  # noqa: F401  (first, before torch loads OpenMP: the wait policy for this machine, omp.py)

import os
import argparse
import difflib
import hashlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import sample
from delta import apply_delta
from weights import WeightsError, atomic_write, read_state_dict, read_text, writable_dir, write_json

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation (OpenAI clip/clip.py `_transform`)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SSCD's normalisation (sscd-copy-detection README)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MOTION_REGEX = r"\s*\bdoing (?:the|a) \{token\}(?: sign| gesture)?"
COPY_THRESHOLD = 0.25  # paper §4.2: "a manually set threshold of 0.25"
STOP_SCORE = 0.265  # paper: training stops when the appearance score falls to 0.265 (raw cosine)


class EvalError(ValueError):
    """Bad input (file, class name, video) that the CLI reports as `error: ...` with exit code 2."""


# -----------------------------------------------------------------------------------------------------------------------
# image preprocessing shared by the three models: uint8 frames (F, 3, H, W) -> float batches


def resize_short(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize float (B, 3, H, W) so that its short side is `size`, keeping the aspect ratio (torchvision Resize(int))."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    s = size / min(h, w)
    # int(...) as torchvision does for the long side; antialias so that shrinking large frames does not alias
    oh, ow = (size, int(w * s)) if h <= w else (int(h * s), size)
    return F.interpolate(x, size=(oh, ow), mode=mode, antialias=True, align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision CenterCrop's rounding
    return x[..., top:top + size, left:left + size]


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """x in [0, 1], (B, 3, H, W)."""
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """uint8 (3, F, H, W) -> float (F, 3, H, W) in [0, 1]."""
    return video.permute(1, 0, 2, 3).float() / 255.0


# -----------------------------------------------------------------------------------------------------------------------
# CLIP (open_clip): model + tokenizer + preprocessing, raw cosine similarities


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips holding `<root>/code/` (torch.jit.save); plain torch.save zips hold data.pkl only."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def _check_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found; expected the {what}")
    if path.stat().st_size == 0:
        raise EvalError(f"{path}: file is empty; expected the {what}")
    return path


class Clip:
    """An open_clip CLIP with its tokenizer and the model's own eval preprocessing (short side `image_size` bicubic,
    center crop, [0, 1], mean/std from the model's preprocess_cfg: OpenAI's values for CLIP models)."""

    def __init__(self, model, tokenizer, name: str, device="cpu"):
        self.model, self.tokenizer, self.name, self.device = model.eval().to(device), tokenizer, name, device
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.size = size if isinstance(size, int) else size[0]
        self.mean, self.std = tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> model input (B, 3, S, S)."""
        x = resize_short(frames, self.size, "bicubic").clamp(0, 1)  # bicubic overshoots; PIL clips to 0..255 too
        return normalize(center_crop(x, self.size), self.mean, self.std)

    @torch.no_grad()
    def image_features(self, video: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """uint8 (3, F, H, W) -> L2-normalised (F, D)."""
        x = self.preprocess(frames_of(video))
        feats = [self.model.encode_image(x[i:i + chunk].to(self.device)).float() for i in range(0, len(x), chunk)]
        return F.normalize(torch.cat(feats), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: list) -> torch.Tensor:
        """list of n strings -> L2-normalised (n, D); the feature is the projected EOT token (open_clip encode_text)."""
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1).cpu()


def load_clip(name: str, weights=None, device="cpu") -> Clip:
    """open_clip model `name` (or a JSON file {"model_cfg": {...}} for a custom config) with weights from a local file.

    weights: an open_clip/HF state dict (.bin/.pth/.pt/.safetensors) or OpenAI's TorchScript archive (ViT-B-32.pt);
    None = random weights (tests only). OpenAI weights were trained with QuickGELU: use the `-quickgelu` names
    (ViT-B-32-quickgelu). open_clip itself only warns on a mismatch for its `openai` tag, and silently builds nn.GELU
    for a plain name with a local file, which lowers accuracy (method.md §7.4). We refuse the mismatch when the file is
    an OpenAI TorchScript archive or its name says "openai"; other OpenAI-derived files cannot be recognised: check
    the name yourself.
    """
    with torch.random.fork_rng():  # random init seeded: weights=None (tests) gives the same model on every run
        torch.manual_seed(0)
        model, tokenizer, quick = _build_clip(name)
    if weights is not None:
        _load_clip_weights(model, name, weights, quick)
    return Clip(model.float(), tokenizer, name, device)


def _build_clip(name: str):
    """(random-init model, tokenizer, whether it uses QuickGELU)."""
    import open_clip

    if name.endswith(".json"):
        cfg = json.loads(_check_file(name, "CLIP model config").read_text())
        cfg = cfg.get("model_cfg", cfg)
        model = open_clip.CLIP(**cfg)
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
        quick = cfg.get("quick_gelu", False)
    else:
        if name not in open_clip.list_models():
            close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
            raise EvalError(f"--clip {name!r} is not an open_clip model name (close: {close})")
        model = open_clip.create_model(name, pretrained=None)  # built offline; weights are assigned below
        tokenizer = open_clip.get_tokenizer(name)
        quick = "quickgelu" in name.lower()
    return model, tokenizer, quick


def _load_clip_weights(model, name, weights, quick):
    """Assign a local weights file to `model` in place (strict: every key must match)."""
    path = _check_file(weights, f"CLIP weights for {name}")
    scripted = _is_torchscript(path)
    if (scripted or "openai" in path.name.lower()) and not quick:
        raise EvalError(f"{path} looks like OpenAI CLIP weights, which need QuickGELU: use --clip "
                        f"{name}-quickgelu (open_clip would build nn.GELU and lower the scores)")
    if scripted:  # OpenAI's .pt archives: the state dict already has open_clip's key names
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        for k in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(k, None)  # buffers of the scripted model, not parameters (open_clip's load_state_dict does so)
    else:
        try:
            sd = read_state_dict(path, f"CLIP weights for {name}")
        except WeightsError as e:
            raise EvalError(str(e)) from None
        if sd and next(iter(sd)).startswith("module."):
            sd = {k[len("module."):]: v for k, v in sd.items()}
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise EvalError(f"{path}: does not match open_clip model {name}: {str(e)[:400]}") from None


# -----------------------------------------------------------------------------------------------------------------------
# prompt parsing


def motion_pattern(token: str = "{token}", regex: str = DEFAULT_MOTION_REGEX) -> re.Pattern:
    """The regex for the motion phrase, with `{token}` standing for the literal `token`."""
    return re.compile(regex.replace(r"\{token\}", re.escape(token)), re.IGNORECASE)


def appearance_text(prompt: str, token: str = "{token}", regex: str = DEFAULT_MOTION_REGEX) -> str:
    """'A female firefighter doing the {token} sign' -> 'A female firefighter' (the motion phrase removed)."""
    out, n = motion_pattern(token, regex).subn("", prompt)
    if n != 1:
        raise EvalError(f"prompt {prompt!r}: the motion regex {regex!r} (token {token!r}) matches {n} times, need 1")
    return re.sub(r"\s+", " ", out).strip(" ,")


def caption_text(prompt: str, phrase: str, token: str = "{token}", regex: str = DEFAULT_MOTION_REGEX) -> str:
    """'A female firefighter doing the {token} sign' -> 'A female firefighter sliding two fingers up'."""
    out, n = motion_pattern(token, regex).subn(" " + phrase, prompt)
    if n != 1:
        raise EvalError(f"prompt {prompt!r}: the motion regex {regex!r} (token {token!r}) matches {n} times, need 1")
    return re.sub(r"\s+", " ", out).strip()


# -----------------------------------------------------------------------------------------------------------------------
# CLIP metrics (per video; the report averages over videos)


def clip_text_score(clip: Clip, video: torch.Tensor, text: str) -> float:
    """Mean over frames of the raw cosine between CLIP(frame) and CLIP(text) (NOT x100: torchmetrics' CLIPScore is
    max(100 cos, 0)). Equals DreamVideo's CLIP-T, cos(text, mean of normalised frame features) (method.md §7.4).
    Used for the appearance score (text = appearance part) and text alignment (text = full caption)."""
    img = clip.image_features(video)  # (F, D)
    txt = clip.text_features([text])  # (1, D)
    return (img @ txt.T).mean().item()


def subject_similarity(clip: Clip, video: torch.Tensor, subject: torch.Tensor) -> float:
    """Mean CLIP image-image cosine over all pairs (frame of `video`, example frame): DreamBooth's CLIP-I against the
    subject's examples. subject: their L2-normalised features (S, D), Clip.image_features of every example frame."""
    # the mean of the pairwise dot products is the dot product of the two means
    return (clip.image_features(video).mean(0) @ subject.mean(0)).item()


def temporal_consistency(clip: Clip, video: torch.Tensor) -> float:
    """Mean over consecutive frame pairs of cos(CLIP(f_i), CLIP(f_i+1)) (VGen cal_metric_DreamVideo.py; method.md
    §7.6). NaN for a single-frame video."""
    img = clip.image_features(video)  # (F, D)
    if len(img) < 2:
        return float("nan")
    return (img[:-1] * img[1:]).sum(-1).mean().item()


def appearance_score_fn(clip: Clip, token: str = "{token}", regex: str = DEFAULT_MOTION_REGEX):
    """score_fn for train.main: (videos uint8 (N, 3, F, H, W), prompts) -> mean appearance score over the videos.
    Prompts may hold the token already substituted (train.validate does so) or still hold `{token}`."""

    def score(videos, prompts) -> float:
        vals = []
        for v, p in zip(videos, prompts):
            t = appearance_text(p, "{token}" if "{token}" in p else token, regex)
            vals.append(clip_text_score(clip, v, t))
        return sum(vals) / len(vals)

    return score


# -----------------------------------------------------------------------------------------------------------------------
# SSCD copy detection


class GeM(torch.nn.Module):
    """Generalised mean pooling, (mean x^p)^(1/p) over H, W with x clamped at 1e-6; p = 3 in SSCD (method.md §7.5)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x):  # (B, C, H, W) -> (B, C, 1, 1); ResNet.forward flattens afterwards
        return x.clamp(min=self.eps).pow(self.p).mean((-2, -1), keepdim=True).pow(1.0 / self.p)


class L2Norm(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return F.normalize(self.model(x), dim=-1)


def sscd_resnet50() -> torch.nn.Module:
    """SSCD's torchvision format: resnet50(num_classes=512) (fc = the 2048->512 projection), avgpool -> GeM(3), then
    L2-normalise. Random weights; load a `.torchvision.pt` state dict into `.model`."""
    import torchvision

    net = torchvision.models.resnet50(num_classes=512)
    net.avgpool = GeM(3.0)
    return L2Norm(net)


class Sscd:
    def __init__(self, model, size: int = 288, device="cpu"):
        self.model, self.size, self.device = model.eval().to(device), size, device

    @torch.no_grad()
    def descriptors(self, video: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """uint8 (3, F, H, W) -> (F, 512), L2-normalised. Resize(288) (short side, aspect kept, bilinear: torchvision's
        default in SSCD's DISC / Copydays evals), [0, 1], ImageNet mean/std; no crop."""
        x = normalize(resize_short(frames_of(video), self.size, "bilinear"), IMAGENET_MEAN, IMAGENET_STD)
        out = [self.model(x[i:i + chunk].to(self.device)).float() for i in range(0, len(x), chunk)]
        return F.normalize(torch.cat(out), dim=-1).cpu()  # the models already normalise; again costs nothing


def load_sscd(path, size: int = 288, device="cpu") -> Sscd:
    """`sscd_disc_mixup.torchscript.pt` (torch.jit.load) or `sscd_disc_mixup.torchvision.pt` (state dict)."""
    path = _check_file(path, "SSCD model (sscd_disc_mixup.torchscript.pt or .torchvision.pt)")
    if _is_torchscript(path):
        return Sscd(torch.jit.load(str(path), map_location="cpu"), size, device)
    try:
        sd = read_state_dict(path, "SSCD weights")
    except WeightsError as e:
        raise EvalError(str(e)) from None
    for prefix in ("module.", "backbone.", "model."):  # wrappers seen in checkpoints; the torchvision file has none
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    net = sscd_resnet50()
    try:
        net.model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise EvalError(f"{path}: not an SSCD ResNet-50 torchvision state dict: {str(e)[:400]}") from None
    return Sscd(net, size, device)


def copy_score(gen_desc: torch.Tensor, train_desc: torch.Tensor) -> tuple:
    """(max cosine between any frame of one generated video (F, D) and any training frame (T, D), the index of that
    training frame) (paper §4.2: "the maximum SSCD score between generated and training frames"; max over all frame
    pairs, method.md §7.8 point 1)."""
    best = (gen_desc @ train_desc.T).max(dim=0).values  # (T,): each training frame's best match in the video
    t = int(best.argmax())
    return best[t].item(), t


def copies_per_clip(clips: list, nearest: list, copied: list) -> dict:
    """{training clip: {"videos": k, "pct": % of all videos}}: k = videos above the copy threshold whose nearest clip
    it is; every clip listed, most copied first (ties in the given order)."""
    counts = dict.fromkeys(clips, 0)
    for c, hit in zip(nearest, copied):
        counts[c] += bool(hit)
    n = max(1, len(nearest))
    return {c: {"videos": k, "pct": 100.0 * k / n} for c, k in sorted(counts.items(), key=lambda kv: -kv[1])}


def copies_table(per_clip: dict) -> list:
    """copies_per_clip() as markdown table lines."""
    return ["| training clip | videos copying it | % of videos |", "|---|---|---|"] + \
        [f"| {c} | {v['videos']} | {v['pct']:.1f}% |" for c, v in per_clip.items()]


# -----------------------------------------------------------------------------------------------------------------------
# video classifiers: `class_names` + `predict(videos) -> logits (N, C)`


def segment_indices(n_frames: int, n: int) -> list:
    """n frames, the centre of each of n equal segments (TRN's test-time sampling, method.md §7.3)."""
    tick = n_frames / n
    return [int(tick / 2 + tick * k) for k in range(n)]


def read_class_names(path) -> list:
    path = _check_file(path, "class-names file (one class name per line)")
    names = [ln.strip() for ln in read_text(path, "class-names file").splitlines() if ln.strip()]
    if not names:
        raise EvalError(f"{path}: no class names")
    return names


class ScriptedClassifier:
    """Any TorchScript video classifier taking float (N, 3, frames, size, size): `frames` uniformly sampled frames
    (segment centres), short side -> size (bilinear) + center crop, [0, 1] RGB, then (x - mean) / std per channel."""

    def __init__(self, path, classes_path, frames: int = 8, size: int = 224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                 device="cpu"):
        path = _check_file(path, "TorchScript video classifier")
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval().to(device)
        except Exception as e:
            raise EvalError(f"{path}: not a TorchScript classifier ({type(e).__name__}: {str(e)[:200]})") from None
        self.path, self.classes_path = path, Path(classes_path)
        self.class_names = read_class_names(classes_path)
        self.frames, self.size, self.mean, self.std, self.device = frames, size, tuple(mean), tuple(std), device

    @torch.no_grad()
    def predict(self, videos) -> torch.Tensor:
        xs = []
        for v in videos:
            if v.shape[1] < self.frames:
                raise EvalError(f"a video has {v.shape[1]} frames; the classifier {self.path.name} needs "
                                f"{self.frames} (--classifier-frames)")
            x = frames_of(v[:, segment_indices(v.shape[1], self.frames)])  # (frames, 3, H, W)
            x = center_crop(resize_short(x, self.size, "bilinear"), self.size)
            xs.append(normalize(x, self.mean, self.std).permute(1, 0, 2, 3))  # (3, frames, S, S)
        out = self.model(torch.stack(xs).to(self.device)).float().cpu()
        if out.ndim != 2 or out.shape[1] != len(self.class_names):
            raise EvalError(f"{self.path}: output shape {tuple(out.shape)} does not match the "
                            f"{len(self.class_names)} classes of {self.classes_path}")
        return out


def load_classifier(args):
    kind = args.classifier_type
    if kind == "auto":
        path = _check_file(args.classifier, "video classifier")
        kind = "torchscript" if _is_torchscript(path) else "trn"
    if kind == "torchscript":
        return ScriptedClassifier(args.classifier, args.classes, args.classifier_frames, args.classifier_size,
                                  args.classifier_mean, args.classifier_std, args.device)
    import trn  # the TRN Jester model (trn.py); imported here so the rest works without it

    _check_file(args.classifier, "TRN checkpoint")
    _check_file(args.classes, "TRN class-names file (jester_categories.txt)")
    try:
        return trn.load_trn(args.classifier, args.classes, seed=0, device=args.device)
    except (ValueError, RuntimeError, KeyError) as e:  # a checkpoint that is not TRN's: name the file
        raise EvalError(f"{args.classifier}: could not be loaded as a TRN Jester checkpoint "
                        f"({type(e).__name__}: {str(e)[:300]})") from None


def class_index(names: list, target: str, source="the class file") -> int:
    """Index of `target` by name (never by position: class orders differ between codebases, method.md §7.2).
    Exact match first, then case/space-insensitive; otherwise an error listing close names."""
    if target in names:
        return names.index(target)
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    loose = [i for i, n in enumerate(names) if norm(n) == norm(target)]
    if len(loose) == 1:
        return loose[0]
    close = difflib.get_close_matches(target, names, n=5, cutoff=0.4)
    raise EvalError(f"target class {target!r} is not in {source}" + (f"; close names: {close}" if close else ""))


def motion_predictions(classifier, videos, batch: int = 8) -> tuple:
    """Top-1 class index (N,) and softmax probabilities (N, C). Accuracy = mean(top1 == target) (paper §4.2)."""
    need = getattr(classifier, "frames", getattr(classifier, "num_segments", 8))  # TRN: 8 segments
    short = [v.shape[1] for v in videos if v.shape[1] < need]
    if short:
        raise EvalError(f"{len(short)} video(s) have only {min(short)} frames; the classifier needs {need}")
    chunks = []
    for i in range(0, len(videos), batch):
        part = list(videos[i:i + batch])
        if len({tuple(v.shape) for v in part}) == 1:
            chunks.append(classifier.predict(torch.stack(part)))  # uint8 (B, 3, F, H, W)
        else:  # --videos-in folders may mix sizes: one video at a time
            chunks += [classifier.predict(v[None]) for v in part]
    logits = torch.cat(chunks)
    return logits.argmax(-1), logits.softmax(-1)


# -----------------------------------------------------------------------------------------------------------------------
# reading videos


def read_video(path: Path) -> torch.Tensor:
    """All frames of a video file or frame folder (or the one of a still image) as uint8 (3, F, H, W)."""
    spec = data.ClipSpec(frames=100000)  # decode_video stops at the end of the file; nothing is padded here
    if path.is_dir():
        frames = [data._read_image(p) for p in data.list_frames(path)]
    elif path.suffix.lower() in data.IMAGE_EXTS:  # a subject's photo
        frames = [data._read_image(path)]
    else:
        frames, _ = data.decode_video(path, spec)
    frames = np.stack(frames)
    return torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous()  # (F, H, W, 3) -> (3, F, H, W)


def read_video_folder(folder) -> list:
    """[(name, template or None, seed or None, video)] from `folder`. Prompts come from `index.json` (written by this
    script: [{"file", "template", "seed"}]) or else from a `<stem>.txt` next to each video."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"{folder}: videos folder not found")
    try:
        index = folder / "index.json"
        if index.is_file():
            rows = json.loads(read_text(index, "index.json"))
            return [(r["file"], r.get("template"), r.get("seed"), read_video(folder / r["file"])) for r in rows]
        clips, seen = [], set()
        for p in data.find_clips(folder):
            if p.stem in seen:  # sample.save_video writes .mp4 and .gif of the same video: keep the first (mp4)
                continue
            seen.add(p.stem)
            txt = p.with_suffix(".txt")
            clips.append((p.name, read_text(txt, "prompt file").strip() if txt.is_file() else None, None,
                          read_video(p)))
    except (data.DataError, WeightsError) as e:
        raise EvalError(str(e)) from None
    if not clips:
        raise EvalError(f"{folder}: no videos (.mp4, .gif, ... or frame folders)")
    return clips


def read_training_frames(folder, frames: int, stills: bool = False, flag: str = "--train-videos") -> list:
    """Up to `frames` uniformly spaced frames (0: all) of every clip in `folder` (recursive; with `stills`, each image
    file is a one-frame clip, as train.py --subject-videos reads them): [(name, uint8 (3, f, H, W))]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"{flag} {folder}: not a directory")
    out = []
    try:
        for p in data.find_clips(folder, recursive=True, stills=stills):
            v = read_video(p)
            if frames and v.shape[1] > frames:
                v = v[:, segment_indices(v.shape[1], frames)]
            out.append((str(p.relative_to(folder)), v))
    except data.DataError as e:
        raise EvalError(str(e)) from None
    if not out:
        raise EvalError(f"{flag} {folder}: no videos" + (" or images" if stills else "") + " found")
    return out


# -----------------------------------------------------------------------------------------------------------------------
# report


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files(args) -> dict:
    """sha256 of every model file the run read (model directory files, delta, classifier, classes, CLIP, SSCD)."""
    files = []
    if args.model and not args.videos_in:
        files += sorted(p for p in Path(args.model).rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in (args.delta if not args.videos_in else None, args.classifier, args.classes, args.clip_weights, args.sscd,
              args.clip if args.clip and args.clip.endswith(".json") else None):
        if f:
            files.append(Path(f))
    return {str(p): sha256(p) for p in files}


def free_folder(out: Path) -> Path:
    """`out` if it holds no report, else out-1, out-2, ...: an existing report is never overwritten."""
    k, cand = 0, out
    while (cand / "report.json").exists() or (cand / "report.md").exists():
        k += 1
        cand = out.with_name(f"{out.name}-{k}")
    return cand


def mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def sheet_row(video: torch.Tensor, height: int = 96, columns: int = 8) -> torch.Tensor:
    """Up to `columns` evenly spaced frames of uint8 (3, F, H, W), resized to `height`, as a contact sheet."""
    v = video[:, segment_indices(video.shape[1], min(columns, video.shape[1]))].permute(1, 0, 2, 3).float()
    w = max(1, round(v.shape[-1] * height / v.shape[-2]))
    v = F.interpolate(v, size=(height, w), mode="bilinear", antialias=True).round().clamp(0, 255)
    return sample.contact_sheet(v.to(torch.uint8).permute(1, 0, 2, 3), columns)


def write_stacked(sheets: list, path: Path):
    """Sheets one below the other in one PNG, narrower ones padded black on the right."""
    width = max(s.shape[-1] for s in sheets)
    sample.write_png(torch.cat([F.pad(s, (0, width - s.shape[-1])) for s in sheets], dim=1), path)


def write_sheets(out: Path, rows: list, videos: list, metrics: list, height: int = 96, columns: int = 8):
    """One PNG per metric: the best video's frames on the top row(s), the worst's below."""
    for m in metrics:
        scored = [(r[m], i) for i, r in enumerate(rows) if r.get(m) is not None and not math.isnan(r[m])]
        if scored:
            write_stacked([sheet_row(videos[i], height, columns) for i in (max(scored)[1], min(scored)[1])],
                          out / f"sheet_{m}.png")


def write_copy_sheet(out: Path, rows: list, videos: list, train: dict, top: int = 4, height: int = 96,
                     columns: int = 8):
    """sheet_copy_pairs.png: for the `top` highest copy scores, the video's frames above its nearest training clip's."""
    worst = sorted((i for i, r in enumerate(rows) if "copy_clip" in r), key=lambda i: -rows[i]["copy"])[:top]
    if worst:
        write_stacked([sheet_row(v, height, columns) for i in worst for v in (videos[i], train[rows[i]["copy_clip"]])],
                      out / "sheet_copy_pairs.png")


def write_markdown(path: Path, report: dict):
    agg, s = report["aggregate"], report["settings"]
    fmt = lambda x: "n/a" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = ["# NewMove evaluation", "", f"{agg['videos']} videos; target class: {s.get('target_class')}; "
             f"CLIP: {s.get('clip')}; token: {s.get('token')}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in agg.items() if not isinstance(v, dict)]  # the dicts get tables
    if agg.get("class_histogram"):
        lines += ["", "| predicted class | videos |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in agg["class_histogram"].items()]
    if "copies_per_training_clip" in agg:  # which clip to drop: videos above the copy threshold, by nearest clip
        lines += ["", f"Copied training clips (copy score > {s.get('copy_threshold')}, `sheet_copy_pairs.png`):", ""]
        lines += copies_table(agg["copies_per_training_clip"])
    keys = [k for k in ("motion_correct", "target_prob", "appearance", "text_alignment", "temporal", "copy", "copy_clip")
            if any(k in r for r in report["videos"])]
    lines += ["", "| video | prompt | seed | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for r in report["videos"]:
        lines.append(f"| {r['name']} | {r.get('prompt') or ''} | {fmt(r.get('seed'))} | "
                     + " | ".join(fmt(r.get(k)) for k in keys) + " |")
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"), overwrite=True)


def score(args, items: list, train=None, log=print) -> tuple:
    """Score [(name, template, seed, video uint8 (3, F, H, W))]: (per-video rows, aggregate dict). With --sscd,
    `train` = read_training_frames(...)'s [(name, video)]."""
    rows = [{"name": n, "template": t, "seed": s, "frames": v.shape[1]} for n, t, s, v in items]
    videos = [v for *_, v in items]
    for r in rows:
        if r["template"] is not None:
            r["prompt"] = r["template"].replace("{token}", args.token) if args.token else r["template"]
    agg = {"videos": len(items)}

    if args.classifier:
        clf = load_classifier(args)
        target = class_index(clf.class_names, args.target_class, args.classes)
        top1, probs = motion_predictions(clf, videos)
        hist = {}
        for r, k, p in zip(rows, top1.tolist(), probs):
            r.update(predicted=clf.class_names[k], motion_correct=float(k == target), target_prob=p[target].item())
            hist[clf.class_names[k]] = hist.get(clf.class_names[k], 0) + 1
        agg["motion_accuracy"] = mean([r["motion_correct"] for r in rows])
        agg["class_histogram"] = dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))
        del clf

    if args.clip:
        clip = load_clip(args.clip, args.clip_weights, args.device)
        for r, v in zip(rows, videos):
            r["temporal"] = temporal_consistency(clip, v)
            if r["template"] is None:
                continue  # no prompt known for this video: temporal consistency only
            r["appearance_text"] = appearance_text(r["template"], "{token}", args.motion_regex)
            r["appearance"] = clip_text_score(clip, v, r["appearance_text"])
            if args.motion_phrase:
                r["caption"] = caption_text(r["template"], args.motion_phrase, "{token}", args.motion_regex)
                r["text_alignment"] = clip_text_score(clip, v, r["caption"])
        agg["appearance_score"] = mean([r.get("appearance") for r in rows])
        agg["text_alignment"] = mean([r.get("text_alignment") for r in rows])
        agg["temporal_consistency"] = mean([r["temporal"] for r in rows])
        if args.subject_videos:  # appearance of the taught subject, next to motion accuracy
            subject = torch.cat([clip.image_features(v) for _, v in read_training_frames(
                args.subject_videos, 0, stills=True, flag="--subject-videos")])
            for r, v in zip(rows, videos):
                r["subject_similarity"] = subject_similarity(clip, v, subject)
            agg["subject_similarity"] = mean([r["subject_similarity"] for r in rows])
        del clip

    if args.sscd:
        sscd = load_sscd(args.sscd, args.sscd_size, args.device)
        train_desc = torch.cat([sscd.descriptors(v) for _, v in train])  # (T, 512)
        clip_of = [name for name, v in train for _ in range(v.shape[1])]  # training frame -> its clip
        for r, v in zip(rows, videos):
            r["copy"], t = copy_score(sscd.descriptors(v), train_desc)
            r["copy_clip"], r["copied"] = clip_of[t], r["copy"] > COPY_THRESHOLD
        agg["copy_score_mean_max"] = mean([r["copy"] for r in rows])
        agg["copy_above_threshold_pct"] = 100.0 * mean([float(r["copied"]) for r in rows])
        agg["training_frames"] = len(train_desc)
        agg["copies_per_training_clip"] = copies_per_clip([n for n, _ in train], [r["copy_clip"] for r in rows],
                                                          [r["copied"] for r in rows])
    if "motion_accuracy" in agg:
        agg["motion_accuracy_pct"] = 100.0 * agg["motion_accuracy"]
    return rows, agg


# -----------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("videos: generate them, or score a folder")
    g.add_argument("--model", help="model directory (either release layout, models.py)")
    g.add_argument("--delta", help="customized weights written by train.py")
    g.add_argument("--delta-from-t", type=float, default=None, metavar="TAU",
                   help="use --delta only for sampling steps with t >= TAU, the base model below (delta.py)")
    g.add_argument("--prompts", help="templates, one per line, each holding {token} once (prompts/appearance_100.txt)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one video per (prompt, seed)")
    g.add_argument("--token", default="pll", help="the learned token that replaces {token} in generation prompts")
    g.add_argument("--subject-token", default="", help="the subject's token (train.py --subject-token) that replaces "
                   "{subject_token} in prompts")
    g.add_argument("--videos-in", help="score this folder instead of generating (prompts: index.json or <stem>.txt)")
    g.add_argument("--frames", type=int, default=16)
    g.add_argument("--height", type=int, default=256)
    g.add_argument("--width", type=int, default=256)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=9.0)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--save-videos", action=argparse.BooleanOptionalAction, default=True,
                   help="write generated videos (mp4/gif/png) and index.json to OUT/videos")
    g = p.add_argument_group("motion accuracy")
    g.add_argument("--target-class", default="Sliding Two Fingers Up", help="matched by name in --classes")
    g.add_argument("--classifier", help="TRN Jester checkpoint (.pth.tar) or a TorchScript video classifier")
    g.add_argument("--classes", help="class names, one per line, in the classifier's output order")
    g.add_argument("--classifier-type", choices=["auto", "trn", "torchscript"], default="auto",
                   help="auto: TorchScript archives are 'torchscript', anything else 'trn'")
    g.add_argument("--classifier-frames", type=int, default=8, help="TorchScript: frames sampled (segment centres)")
    g.add_argument("--classifier-size", type=int, default=224, help="TorchScript: short side resize + center crop")
    g.add_argument("--classifier-mean", type=float, nargs=3, default=[0.0, 0.0, 0.0], help="TorchScript, 0..1 RGB")
    g.add_argument("--classifier-std", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="TorchScript, 0..1 RGB")
    g = p.add_argument_group("CLIP: appearance score, text alignment, temporal consistency")
    g.add_argument("--clip", help="open_clip model name (OpenAI weights: ViT-B-32-quickgelu) or a JSON model config")
    g.add_argument("--clip-weights", help="local weights file; omitted = random weights (testing only)")
    g.add_argument("--motion-regex", default=DEFAULT_MOTION_REGEX,
                   help="the motion phrase of a template; removed for the appearance text")
    g.add_argument("--subject-videos", help="the subject's examples (train.py --subject-videos): subject similarity")
    g.add_argument("--motion-phrase", help="replaces the motion phrase in the text-alignment caption, e.g. "
                   "'sliding two fingers up'; no text alignment without it")
    g = p.add_argument_group("copy score")
    g.add_argument("--sscd", help="sscd_disc_mixup.torchscript.pt or .torchvision.pt")
    g.add_argument("--sscd-size", type=int, default=288, help="short side before SSCD")
    g.add_argument("--train-videos", help="folder of the training clips (videos or frame folders, recursive)")
    g.add_argument("--train-frames", type=int, default=16, help="frames per training clip (uniform; 0 = all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="report", help="report folder; if it holds a report, OUT-1, OUT-2, ... is used")
    args = p.parse_args(argv)
    if not args.videos_in and not (args.model and args.prompts):
        p.error("give --model and --prompts to generate, or --videos-in to score existing videos")
    if args.delta_from_t is not None and not (args.delta and not args.videos_in):
        p.error("--delta-from-t needs --delta (and generated videos, not --videos-in)")
    if args.classifier and not args.classes:
        p.error("--classifier needs --classes (the class-names file)")
    if args.sscd and not args.train_videos:
        p.error("--sscd needs --train-videos (the training clips to compare against)")
    if args.subject_videos and not args.clip:
        p.error("--subject-videos needs --clip (subject similarity is a CLIP image-image score)")
    return args


def read_templates(path, subject_token: str = "") -> list:
    path = _check_file(path, "prompts file")
    lines = [ln.strip() for ln in read_text(path, "prompts file").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise EvalError(f"{path}: the prompts file has no prompts (blank and '#' lines are skipped)")
    if any("{subject_token}" in ln for ln in lines) and not subject_token:
        raise EvalError(f"{path}: prompts use {{subject_token}}: give --subject-token (train.py's, e.g. sks)")
    return [ln.replace("{subject_token}", subject_token) for ln in lines]


def main(argv=None) -> int:
    args = parse_args(argv)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if ddp:
        import torch.distributed as dist

        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        out = free_folder(Path(args.out))
        train = None
        if rank == 0:  # bad --out or training clips fail before the generation and scoring work, not after it
            writable_dir(out, "--out")
            train = read_training_frames(args.train_videos, args.train_frames) if args.sscd else None
        if args.videos_in:
            items = read_video_folder(args.videos_in)
        else:
            from models import load_models

            templates = read_templates(args.prompts, args.subject_token)
            pairs = [(t, s) for t in templates for s in args.seeds]
            mine = list(range(rank, len(pairs), world))  # rank r generates pairs r, r + world, ...
            try:
                models = load_models(args.model)
                if args.delta:
                    apply_delta(models, args.delta, args.delta_from_t)
            except (WeightsError, ValueError) as e:
                raise EvalError(str(e)) from None
            for m in (models.unet, models.vae, models.text_encoder):
                m.to(args.device)
            vids = sample.generate(models, [pairs[i][0].replace("{token}", args.token) for i in mine],
                                   [pairs[i][1] for i in mine], frames=args.frames, height=args.height,
                                   width=args.width, steps=args.steps, guidance=args.guidance,
                                   batch_size=args.batch_size, progress=False) if mine else []
            got = [(i, v) for i, v in zip(mine, vids)]
            if ddp:
                gathered = [None] * world
                dist.all_gather_object(gathered, got)
                got = [x for part in gathered for x in part]
            got.sort(key=lambda x: x[0])
            items = [(f"{i:04d}_{sample.slug(pairs[i][0].replace('{token}', args.token))}_seed{pairs[i][1]}",
                      pairs[i][0], pairs[i][1], v) for i, v in got]
        if rank != 0:
            return 0
        rows, agg = score(args, items, train)
        out.mkdir(parents=True, exist_ok=True)
        if not args.videos_in and args.save_videos:
            index = []
            for r, (_, _, _, v) in zip(rows, items):
                base = sample.save_video(v, out / "videos", r["name"])
                r["name"] = index_file = base.name + ".mp4"
                index.append({"file": index_file, "template": r["template"], "seed": r["seed"]})
            write_json(index, out / "videos" / "index.json", overwrite=True)
        settings = {k: v for k, v in vars(args).items()}
        settings.update(copy_threshold=COPY_THRESHOLD, clip_preprocess="short side bicubic + center crop, model mean/std",
                        classifier_sampling="segment centres", copy_max="over all frame pairs", world_size=world)
        report = {"aggregate": agg, "videos": rows, "settings": settings, "sha256": model_files(args)}
        write_json(report, out / "report.json")  # a new folder (free_folder): never over an old report
        write_markdown(out / "report.md", report)
        videos = [v for *_, v in items]
        write_sheets(out, rows, videos, [m for m in ("target_prob", "appearance", "text_alignment", "temporal", "copy")
                                         if any(m in r for r in rows)])
        if train:
            write_copy_sheet(out, rows, videos, dict(train))
        print(f"wrote {out / 'report.json'}" + (f" ({args.out} already held a report)" if out != Path(args.out) else ""))
        for k, v in agg.items():
            if not isinstance(v, dict):
                print(f"  {k}: {v}")
        return 0
    except (EvalError, WeightsError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
