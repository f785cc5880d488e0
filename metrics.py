"""The NewMove metrics (method.md §7): the models that judge a generated video and the scores computed from them.

Three models judge a video: CLIP (open_clip) for appearance, text and frame-to-frame similarity, SSCD for copies of
training frames, and a Jester gesture classifier (TRN, trn.py, or any TorchScript video classifier) for the motion. Each
loads from a local file (hub.py turns the names trn-jester, jester-categories and sscd_disc_mixup into downloaded,
hash-checked files), or for CLIP from open_clip's pretrained registry (load_clip's `pretrained` tag, or an hf-hub:
model: open_clip downloads and caches it), and preprocesses uint8 videos (3, F, H, W) as its own release does. Each
metric is a small function of one video, with its definition and source; evaluate.py runs them over a set of videos and
writes the report, train.py stops training on the appearance score (appearance_score_fn). A bad file, class name or
video is an EvalError naming it.

Metrics:
  * motion accuracy     % of videos whose top-1 class of a Jester classifier is the target class (paper §4.2)
  * appearance score    mean raw CLIP cosine between frames and the appearance part of the prompt (paper §4.2;
                        train.py stops at 0.265)
  * text alignment      mean raw CLIP cosine between frames and a full caption (paper §4.2)
  * copy score          max SSCD cosine between any generated frame and any training frame; % of videos > 0.25;
                        per video the training clip of that frame, per training clip the % of videos copying it
  * temporal consistency  mean CLIP cosine of consecutive frames (DreamVideo / VGen, method.md §7.6)
  * subject similarity  mean CLIP image-image cosine between a video's frames and the subject's example frames
                        (DreamBooth's CLIP-I), for a motion + subject run (train.py --subject-videos)

Prompt convention. Prompt templates hold `{token}` once, e.g. "A female firefighter doing the {token} sign". The
*motion phrase* is the part matched by the motion regex (DEFAULT_MOTION_REGEX: "doing the {token}" as in the paper's
test prompts, or "doing a {token}" as in its training captions, optionally followed by " sign" or " gesture").
Appearance text = the template with that part removed ("A female firefighter"); caption = the template with that part
replaced by a phrase naming the motion ("A female firefighter sliding two fingers up").
"""

import difflib
import json
import re
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from weights import WeightsError, read_state_dict, read_text

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation (OpenAI clip/clip.py `_transform`)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SSCD's normalisation (sscd-copy-detection README)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MOTION_REGEX = r"\s*\bdoing (?:the|a) \{token\}(?: sign| gesture)?"
COPY_THRESHOLD = 0.25  # paper §4.2: "a manually set threshold of 0.25"


class EvalError(ValueError):
    """Bad input (file, class name, video); evaluate.py's CLI reports it as `error: ...` with exit code 2."""


# -----------------------------------------------------------------------------------------------------------------------
# model files: local only, each checked before it loads


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips holding `<root>/code/` (torch.jit.save); plain torch.save zips hold data.pkl only."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def check_file(path, what: str) -> Path:
    """`path` as a Path if it is a non-empty file; else an EvalError naming `what` was expected there."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found; expected the {what}")
    if path.stat().st_size == 0:
        raise EvalError(f"{path}: file is empty; expected the {what}")
    return path


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
    """The central size x size window of (..., H, W) (torchvision CenterCrop)."""
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


class Clip:
    """An open_clip CLIP with its tokenizer and the model's own eval preprocessing (short side `image_size` bicubic,
    center crop, [0, 1], mean/std from the model's preprocess_cfg: OpenAI's values for CLIP models)."""

    def __init__(self, model, tokenizer, device="cpu"):
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, device
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


def load_clip(name: str, weights=None, device="cpu", pretrained: str | None = None) -> Clip:
    """open_clip model `name` (or a JSON file {"model_cfg": {...}} for a custom config) with weights from a local file,
    or (`pretrained`, a tag of open_clip's registry such as "openai"; or `name` "hf-hub:org/repo") from open_clip.

    weights: an open_clip/HF state dict (.bin/.pth/.pt/.safetensors) or OpenAI's TorchScript archive (ViT-B-32.pt);
    None = random weights (tests only). OpenAI weights were trained with QuickGELU: use the `-quickgelu` names
    (ViT-B-32-quickgelu). open_clip itself only warns on a mismatch for its `openai` tag, and silently builds nn.GELU
    for a plain name with a local file, which lowers accuracy (method.md §7.4). We refuse the mismatch when the file is
    an OpenAI TorchScript archive or its name says "openai"; other OpenAI-derived files cannot be recognised: check
    the name yourself. A `pretrained` tag builds QuickGELU when open_clip's registry says its weights need it.
    """
    if pretrained or name.startswith("hf-hub:"):
        if weights is not None:
            raise EvalError(f"--clip {name}: give --clip-weights FILE or a pretrained tag / hf-hub: name, not both")
        return Clip(*_pretrained_clip(name, pretrained), device)
    with torch.random.fork_rng():  # random init seeded: weights=None (tests) gives the same model on every run
        torch.manual_seed(0)
        model, tokenizer, quick = _build_clip(name)
    if weights is not None:
        _load_clip_weights(model, name, weights, quick)
    return Clip(model.float(), tokenizer, device)


def _build_clip(name: str):
    """(random-init model, tokenizer, whether it uses QuickGELU)."""
    import open_clip

    if name.endswith(".json"):
        cfg = json.loads(check_file(name, "CLIP model config").read_text())
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


def _pretrained_clip(name: str, tag: str | None) -> tuple:
    """(model, tokenizer) made by open_clip itself: its registry's weights for `tag` (or an hf-hub: repository's),
    downloaded into and read from its caches (python models.py fetch clip:NAME:TAG does it in advance)."""
    import open_clip

    if tag and not open_clip.get_pretrained_cfg(name, tag):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise EvalError(f"--clip {name} --clip-pretrained {tag}: not in open_clip's pretrained registry (tags of "
                        f"{name}: {', '.join(tags) or 'none; is it an open_clip model name?'})")
    quick = bool(tag and open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))  # OpenAI weights (method.md §7.4)
    try:
        model = open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick, require_pretrained=True)
        return model.float(), open_clip.get_tokenizer(name)
    except Exception as e:  # open_clip's download and load errors: one line, and how to fetch in advance
        first = (str(e).strip().splitlines() or [""])[0][:300]
        fetch = f"clip:{name}" + (f":{tag}" if tag else "")
        raise EvalError(f"--clip {name}{f' --clip-pretrained {tag}' if tag else ''}: {type(e).__name__}: {first}; "
                        f"to download it in advance: python models.py fetch {fetch}") from None


def _load_clip_weights(model, name, weights, quick):
    """Assign a local weights file to `model` in place (strict: every key must match)."""
    path = check_file(weights, f"CLIP weights for {name}")
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
# prompt convention (module docstring): a template's appearance text and caption


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


def subject_threshold(examples: list) -> float | None:
    """The subject similarity a video needs to count as showing the subject, calibrated on its examples [(S_i, D)
    normalised features of each example's frames]: the lowest similarity of one example to all the others (leave one
    out, the formula of subject_similarity), i.e. as close to the examples as their least typical one is. None for a
    single example (nothing to calibrate on)."""
    if len(examples) < 2:
        return None
    return min((f.mean(0) @ torch.cat(examples[:i] + examples[i + 1:]).mean(0)).item() for i, f in enumerate(examples))


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
    """`model`'s output L2-normalised: the last step of SSCD's torchvision format."""

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
    """An SSCD descriptor model (TorchScript or sscd_resnet50) with its eval preprocessing (short side `size`)."""

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
    path = check_file(path, "SSCD model (sscd_disc_mixup.torchscript.pt or .torchvision.pt)")
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


# -----------------------------------------------------------------------------------------------------------------------
# video classifiers: `class_names` + `predict(videos) -> logits (N, C)`


def segment_indices(n_frames: int, n: int) -> list:
    """n frames, the centre of each of n equal segments (TRN's test-time sampling, method.md §7.3)."""
    tick = n_frames / n
    return [int(tick / 2 + tick * k) for k in range(n)]


def read_class_names(path) -> list:
    """One class name per line (blank lines skipped), in the classifier's output order."""
    path = check_file(path, "class-names file (one class name per line)")
    names = [ln.strip() for ln in read_text(path, "class-names file").splitlines() if ln.strip()]
    if not names:
        raise EvalError(f"{path}: no class names")
    return names


class ScriptedClassifier:
    """Any TorchScript video classifier taking float (N, 3, frames, size, size): `frames` uniformly sampled frames
    (segment centres), short side -> size (bilinear) + center crop, [0, 1] RGB, then (x - mean) / std per channel."""

    def __init__(self, path, classes_path, frames: int = 8, size: int = 224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                 device="cpu"):
        path = check_file(path, "TorchScript video classifier")
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


def load_classifier(path, classes, kind: str = "auto", device="cpu", **sampling):
    """The motion classifier in `path` with its class names in `classes`: TRN's Jester checkpoint (kind "trn", trn.py,
    its own sampling) or a ScriptedClassifier (kind "torchscript", `sampling` = its frames, size, mean, std); "auto"
    tells them apart by the file."""
    if kind == "auto":
        kind = "torchscript" if _is_torchscript(check_file(path, "video classifier")) else "trn"
    if kind == "torchscript":
        return ScriptedClassifier(path, classes, device=device, **sampling)
    import trn  # the TRN Jester model (trn.py); imported here so the rest works without it

    check_file(path, "TRN checkpoint")
    check_file(classes, "TRN class-names file (jester_categories.txt)")
    try:
        return trn.load_trn(path, classes, seed=0, device=device)
    except (ValueError, RuntimeError, KeyError) as e:  # a checkpoint that is not TRN's: name the file
        raise EvalError(f"{path}: could not be loaded as a TRN Jester checkpoint "
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
