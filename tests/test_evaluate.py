"""metrics.py: each metric on cases with a known answer; evaluate.py: the CLI end to end, bad input. CPU, no
downloads.

    cd /work/main && python -m pytest -q tests/test_evaluate.py
"""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate as ev
import metrics
import models
import weights

# a tiny open_clip CLIP (random weights) as a JSON model config: builds in well under a second
TINY_CLIP = {"model_cfg": {"embed_dim": 32, "quick_gelu": True,
                           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                        "layers": 1}}}
CLASSES = ["Getting Darker", "Getting Brighter", "Sliding Two Fingers Up"]


class Brightness(torch.nn.Module):
    """Toy video classifier on (N, 3, T, H, W): 'Getting Brighter' if the last frame is brighter than the first."""

    def forward(self, x):
        m = x.mean(dim=(1, 3, 4))  # (N, T)
        d = m[:, -1] - m[:, 0]
        return torch.stack([-d, d, torch.zeros_like(d)], dim=1)  # (N, 3)


class Pixels(torch.nn.Module):
    """Toy SSCD descriptor: each channel minus its mean, 16x16-pooled; unrelated textures have cosine near 0."""

    def forward(self, x):
        return F.normalize(F.adaptive_avg_pool2d(x - x.mean((2, 3), keepdim=True), 16).flatten(1), dim=-1)


def ramp(up: bool, frames=8, size=32, seed=0) -> torch.Tensor:
    """uint8 (3, F, H, W): random texture whose brightness rises (or falls) over frames."""
    g = torch.Generator().manual_seed(seed)
    tex = torch.rand(3, 1, size, size, generator=g) * 80
    level = torch.linspace(40, 160, frames).view(1, frames, 1, 1)
    return (tex + (level if up else level.flip(1))).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    torch.jit.script(Brightness()).save(str(d / "toy.pt"))
    (d / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (d / "clip.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    clip = metrics.load_clip(str(d / "clip.json"))
    with torch.no_grad():  # differ from the seeded random init, so the test sees that the file was loaded
        for p in clip.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(clip.model.state_dict(), d / "clip.pth")
    torch.manual_seed(0)
    net = metrics.sscd_resnet50()
    torch.save(net.model.state_dict(), d / "sscd.torchvision.pt")
    return d


def scripted_clf(assets, **kw):
    return metrics.ScriptedClassifier(assets / "toy.pt", assets / "classes.txt", frames=4, size=16, **kw)


def test_motion_accuracy_toy_classifier(assets):
    clf = scripted_clf(assets)
    target = metrics.class_index(clf.class_names, "Getting Brighter")
    up = [ramp(True, seed=i) for i in range(3)]
    down = [ramp(False, seed=i) for i in range(3)]
    top1, probs = metrics.motion_predictions(clf, up)
    assert (top1 == target).float().mean().item() == 1.0 and probs.shape == (3, 3)
    top1, _ = metrics.motion_predictions(clf, down)
    assert (top1 == target).float().mean().item() == 0.0
    assert metrics.segment_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]  # TRN: 1-based 2, 4, ..., 16


def test_class_names_by_name_and_errors(assets):
    assert metrics.class_index(CLASSES, "sliding two  fingers up") == 2  # case/space-insensitive fallback
    with pytest.raises(metrics.EvalError, match="'Sliding Two Fingers Down'.*close names.*Sliding Two Fingers Up"):
        metrics.class_index(CLASSES, "Sliding Two Fingers Down", "classes.txt")
    with pytest.raises(metrics.EvalError, match="has 2 frames.*needs 4"):
        scripted_clf(assets).predict([ramp(True, frames=2)])
    with pytest.raises(metrics.EvalError, match="not a TorchScript classifier"):
        metrics.ScriptedClassifier(assets / "clip.json", assets / "classes.txt")


def test_prompt_rule():
    t = "A female firefighter doing the {token} sign"
    assert metrics.appearance_text(t) == "A female firefighter"
    assert metrics.caption_text(t, "sliding two fingers up") == "A female firefighter sliding two fingers up"
    assert metrics.appearance_text("A chef doing the pll sign in a kitchen", "pll") == "A chef in a kitchen"
    with pytest.raises(metrics.EvalError, match="matches 0 times"):
        metrics.appearance_text("A chef waving")
    lines = Path(__file__).resolve().parents[1].joinpath("prompts/appearance_100.txt").read_text().splitlines()
    assert len(lines) == 100 == len(set(lines)) and all(ln.count("{token}") == 1 for ln in lines)
    assert all(metrics.appearance_text(ln) for ln in lines)


def test_clip_metrics_match_direct_computation(assets):
    clip = metrics.load_clip(str(assets / "clip.json"), assets / "clip.pth")
    ref = metrics.load_clip(str(assets / "clip.json"))  # random, different weights: loading must have changed them
    assert not torch.equal(ref.model.visual.conv1.weight, clip.model.visual.conv1.weight)
    v = ramp(True, frames=4, size=32)  # already 32x32: preprocessing is only the normalisation
    x = (v.permute(1, 0, 2, 3).float() / 255 - torch.tensor(metrics.OPENAI_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(metrics.OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = F.normalize(clip.model.encode_image(x), dim=-1)
        txt = F.normalize(clip.model.encode_text(clip.tokenizer(["A female firefighter"])), dim=-1)
    want = (img @ txt.T).mean().item()
    assert metrics.clip_text_score(clip, v, "A female firefighter") == pytest.approx(want, abs=1e-5)
    fn = metrics.appearance_score_fn(clip, "pll")
    got = fn(v[None], ["A female firefighter doing the pll sign"])
    assert got == pytest.approx(want, abs=1e-5) and -1 <= got <= 1  # raw cosine, not x100
    # temporal consistency on the real (tiny) CLIP: the cosine of each consecutive pair, from the unnormalised
    # features and F.cosine_similarity, one pair at a time
    with torch.no_grad():
        raw = clip.model.encode_image(x)
    pairs = [F.cosine_similarity(raw[i], raw[i + 1], dim=0).item() for i in range(3)]
    assert metrics.temporal_consistency(clip, v) == pytest.approx(sum(pairs) / 3, abs=1e-5)
    still = v[:, :1].expand(-1, 4, -1, -1).contiguous()
    assert metrics.temporal_consistency(clip, still) == pytest.approx(1.0, abs=1e-5)
    # other frame sizes: short side -> 32 bicubic (antialiased), then the central 32 x 32, as torchvision's
    # Resize(32) + CenterCrop(32) (open_clip's eval transform) do it on uint8 frames. Random pixels, so a swapped
    # height and width, a squash or a crop one pixel off differ by far more than the half level torchvision's uint8
    # rounding leaves (0.5 / 255 / std; 1 level allowed). 48 x 65: the crop offset (43 - 32) / 2 rounds; 67 x 48: the
    # long side 44.67 truncates to 44, as torchvision does.
    import torchvision.transforms as T

    tv = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32)])
    level = 1 / 255 / min(metrics.OPENAI_STD)
    g = torch.Generator().manual_seed(0)
    for h, w in [(48, 65), (67, 48), (20, 24)]:  # landscape, portrait, upscaled
        frames = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=g)
        want = metrics.normalize(tv(frames).float() / 255, metrics.OPENAI_MEAN, metrics.OPENAI_STD)
        pre = clip.preprocess(frames.float() / 255)
        err = (pre - want).abs().max().item()
        assert pre.shape == (2, 3, 32, 32) and err <= level, (h, w, err)


class FixedFeatures:
    """A stand-in for metrics.Clip whose frame features are given: unit vectors in the plane at these angles."""

    def __init__(self, degrees):
        t = torch.tensor(degrees, dtype=torch.float64).deg2rad()
        self.feats = torch.stack([t.cos(), t.sin()], dim=1)

    def image_features(self, video):
        assert video.shape[1] == len(self.feats)
        return self.feats


@pytest.mark.parametrize("degrees, want", [
    ([0, 60, 60, 150], (0.5 + 1.0 + 0.0) / 3),  # consecutive cosines 1/2, 1, 0 (all pairs: 0.19; vs frame 0: 0.04)
    ([0, 0, 0], 1.0),  # a still video
    ([0, 90], 0.0),  # orthogonal consecutive frames
    ([0, 180, 0], -1.0),  # opposite: a raw cosine, not clamped or rescaled
])
def test_temporal_consistency_on_known_cosines(degrees, want):
    video = torch.zeros(3, len(degrees), 4, 4, dtype=torch.uint8)
    assert metrics.temporal_consistency(FixedFeatures(degrees), video) == pytest.approx(want, abs=1e-9)


def test_temporal_consistency_of_one_frame_is_nan():
    import math

    assert math.isnan(metrics.temporal_consistency(FixedFeatures([30]), torch.zeros(3, 1, 4, 4, dtype=torch.uint8)))


@pytest.mark.slow
def test_clip_openai_weights_need_quickgelu(tmp_path):
    bad = tmp_path / "openai_vit.pth"
    bad.write_bytes(b"x")
    with pytest.raises(metrics.EvalError, match="QuickGELU.*ViT-B-32-quickgelu"):
        metrics.load_clip("ViT-B-32", bad)
    with pytest.raises(metrics.EvalError, match="not an open_clip model name"):
        metrics.load_clip("ViT-B-33")


def test_sscd_descriptors_and_copy_score(assets):
    sscd = metrics.load_sscd(assets / "sscd.torchvision.pt", size=64)
    torch.manual_seed(0)
    net = metrics.sscd_resnet50().eval()
    v = ramp(True, frames=3, size=48)
    x = v.permute(1, 0, 2, 3).float() / 255
    x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(metrics.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(metrics.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = F.normalize(net(x), dim=-1)
    got = sscd.descriptors(v)
    assert got.shape == (3, 512) and torch.allclose(got, want, atol=1e-5)
    # the scripted form gives the same descriptors
    torch.jit.script(net).save(str(assets / "sscd.torchscript.pt"))
    scripted = metrics.load_sscd(assets / "sscd.torchscript.pt", size=64)
    assert torch.allclose(scripted.descriptors(v), want, atol=1e-5)
    # generated == training: max cosine is 1
    other = ramp(False, frames=3, size=48, seed=5)
    train = torch.cat([sscd.descriptors(v), sscd.descriptors(other)])
    score, t = metrics.copy_score(sscd.descriptors(v), train)
    assert score == pytest.approx(1.0, abs=1e-5) and t < 3  # one of v's own frames
    with pytest.raises(metrics.EvalError, match="not an SSCD ResNet-50"):
        torch.save({"w": torch.zeros(1)}, assets / "bad_sscd.pt")
        metrics.load_sscd(assets / "bad_sscd.pt")


def write_mp4(video, path, fps=8):
    frames = video.permute(1, 2, 3, 0).numpy()
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "10"})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


@pytest.fixture
def video_dirs(tmp_path):
    gen, train = tmp_path / "gen", tmp_path / "train"
    gen.mkdir()
    train.mkdir()
    index = []
    for i, up in enumerate([True, True, False]):
        write_mp4(ramp(up, frames=6, size=32, seed=i), gen / f"v{i}.mp4")
        index.append({"file": f"v{i}.mp4", "template": f"A person number {i} doing the {{token}} sign", "seed": i})
    (gen / "index.json").write_text(json.dumps(index))
    write_mp4(ramp(True, frames=6, size=32, seed=0), train / "t0.mp4")  # = generated video 0
    return gen, train


def cli_args(assets, gen, train, out):
    return ["--videos-in", str(gen), "--target-class", "Getting Brighter", "--classifier", str(assets / "toy.pt"),
            "--classes", str(assets / "classes.txt"), "--classifier-frames", "4", "--classifier-size", "16",
            "--clip", str(assets / "clip.json"), "--clip-weights", str(assets / "clip.pth"),
            "--motion-phrase", "sliding two fingers up", "--sscd", str(assets / "sscd.torchvision.pt"),
            "--sscd-size", "64", "--train-videos", str(train), "--token", "pll", "--device", "cpu", "--out", str(out)]


@pytest.mark.slow
def test_cli_videos_in_end_to_end(assets, video_dirs, tmp_path, capsys):
    gen, train = video_dirs
    out = tmp_path / "report"
    subject = ["--subject-videos", str(train)]  # the training clip as a subject's example too: subject similarity
    assert ev.main(cli_args(assets, gen, train, out) + subject) == 0
    assert ev.main(cli_args(assets, gen, train, out) + subject) == 0  # never overwrites: second report goes to report-1
    a = json.loads((out / "report.json").read_text())
    b = json.loads((tmp_path / "report-1" / "report.json").read_text())
    assert a["aggregate"] == b["aggregate"] and a["videos"] == b["videos"]
    agg = a["aggregate"]
    assert agg["videos"] == 3 and agg["motion_accuracy"] == pytest.approx(2 / 3)
    assert agg["class_histogram"] == {"Getting Brighter": 2, "Getting Darker": 1}
    assert a["videos"][0]["copy"] == pytest.approx(1.0, abs=1e-5)  # the training video itself
    assert a["videos"][0]["copy_clip"] == "t0.mp4" and a["videos"][0]["copied"]
    assert a["videos"][0]["appearance_text"] == "A person number 0"
    assert a["videos"][0]["caption"] == "A person number 0 sliding two fingers up"
    # each aggregate is the mean of its per-video values (copies: the percentage of copied videos) ...
    rows = a["videos"]
    per_video = {"appearance_score": "appearance", "text_alignment": "text_alignment",
                 "temporal_consistency": "temporal", "copy_score_mean_max": "copy",
                 "subject_similarity": "subject_similarity"}
    for k, rk in per_video.items():
        assert agg[k] == pytest.approx(sum(r[rk] for r in rows) / 3, abs=1e-9), k
    assert agg["copy_above_threshold_pct"] == pytest.approx(100 * sum(r["copied"] for r in rows) / 3)
    assert rows[0]["copied"] and agg["copy_above_threshold_pct"] >= 100 / 3
    # ... and the per-video values are the metrics of the decoded videos with the right texts (recomputed here)
    clip = metrics.load_clip(str(assets / "clip.json"), assets / "clip.pth")
    decoded = dict(ev.read_training_frames(gen, 0))
    subject = torch.cat([clip.image_features(v) for _, v in ev.read_training_frames(train, 0, stills=True)])
    for i, r in enumerate(rows):
        v = decoded[f"v{i}.mp4"]
        assert r["appearance"] == pytest.approx(metrics.clip_text_score(clip, v, f"A person number {i}"), abs=1e-5)
        caption = f"A person number {i} sliding two fingers up"
        assert r["text_alignment"] == pytest.approx(metrics.clip_text_score(clip, v, caption), abs=1e-5)
        assert r["temporal"] == pytest.approx(metrics.temporal_consistency(clip, v), abs=1e-5)
        assert r["subject_similarity"] == pytest.approx(metrics.subject_similarity(clip, v, subject), abs=1e-5)
        assert -1 <= r["appearance"] <= 1 and -1 <= r["temporal"] <= 1
    assert rows[0]["appearance"] != rows[1]["appearance"]  # the texts differ per video
    assert str(assets / "toy.pt") in a["sha256"] and len(a["sha256"][str(assets / "clip.pth")]) == 64
    assert (out / "report.md").read_text().startswith("# NewMove evaluation")
    assert (out / "sheet_appearance.png").is_file() and (out / "sheet_copy.png").is_file()
    assert (out / "sheet_copy_pairs.png").is_file()


def write_frames(video, folder):
    """uint8 (3, F, H, W) as a lossless frame folder (00000.png, ...)."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i, f in enumerate(video.permute(1, 2, 3, 0).numpy()):
        Image.fromarray(f).save(folder / f"{i:05d}.png")


def test_copy_attribution_names_the_copied_training_clip(tmp_path):
    """A generated video that is training clip c2 is traced to c2 (not to the clip of the same frame index: the clips
    have 3, 5, 4 frames), counted for c2 only, and drawn above c2 in sheet_copy_pairs.png; an unrelated video is not
    counted. Lossless frame folders and a toy descriptor on which unrelated textures score near 0."""
    from PIL import Image

    torch.jit.script(Pixels()).save(str(tmp_path / "sscd.pt"))
    clips = {f"c{k}": ramp(True, frames=n, size=32, seed=10 + k) for k, n in enumerate((3, 5, 4))}
    for name, v in clips.items():
        write_frames(v, tmp_path / "train" / name)
    write_frames(ramp(True, frames=4, size=32, seed=20), tmp_path / "gen" / "v0")  # copies nothing
    write_frames(clips["c2"], tmp_path / "gen" / "v1")
    out = tmp_path / "report"
    assert ev.main(["--videos-in", str(tmp_path / "gen"), "--sscd", str(tmp_path / "sscd.pt"), "--sscd-size", "32",
                    "--train-videos", str(tmp_path / "train"), "--device", "cpu", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    v0, v1 = rep["videos"]
    assert v1["copy"] == pytest.approx(1.0, abs=1e-5) and v1["copy_clip"] == "c2" and v1["copied"] is True
    assert v0["copy"] < metrics.COPY_THRESHOLD and v0["copied"] is False
    per_clip = rep["aggregate"]["copies_per_training_clip"]
    assert per_clip == {"c2": {"videos": 1, "pct": 50.0}, "c0": {"videos": 0, "pct": 0.0},
                        "c1": {"videos": 0, "pct": 0.0}}
    assert list(per_clip) == ["c2", "c0", "c1"]  # most copied first
    assert "| c2 | 1 | 50.0% |" in (out / "report.md").read_text()
    # sheet rows (96 px each): v1, its clip c2 (the same frames), v0, v0's nearest clip
    sheet = torch.from_numpy(np.array(Image.open(out / "sheet_copy_pairs.png")))
    assert sheet.shape[0] == 4 * 96
    assert torch.equal(sheet[:96], sheet[96:192]) and not torch.equal(sheet[192:288], sheet[288:])


def test_aggregates_skip_missing_values_and_training_clips_are_sampled_evenly(tmp_path):
    """A report's aggregate is the mean of the values that exist: a one-frame video's NaN temporal consistency and a
    video with no prompt (None) are left out, not counted as 0 or turned into NaN. --train-frames N keeps the centres
    of N equal segments of a longer clip (frames 2, 6, 10, 14 of 16), a shorter clip whole. Lossless frame folders
    whose frame i is the flat gray level 10 i, so the frames kept are read back exactly."""
    assert ev.mean([0.5, float("nan"), None, 0.25]) == pytest.approx(0.375)
    assert ev.mean([None, float("nan")]) is None and ev.mean([]) is None
    for name, n in (("long", 16), ("short", 3)):
        write_frames(torch.arange(n).mul(10).to(torch.uint8).view(1, n, 1, 1).expand(3, n, 4, 4).contiguous(),
                     tmp_path / name)
    levels = lambda v: (v[0, :, 0, 0].long() // 10).tolist()  # noqa: E731
    got = {name: levels(v) for name, v in ev.read_training_frames(tmp_path, 4)}
    assert got == {"long": [2, 6, 10, 14], "short": [0, 1, 2]}
    assert {name: levels(v) for name, v in ev.read_training_frames(tmp_path, 0)} == {"long": list(range(16)),
                                                                                    "short": [0, 1, 2]}
    (tmp_path / "empty").mkdir()
    with pytest.raises(metrics.EvalError, match="--train-videos .*empty: no videos found"):
        ev.read_training_frames(tmp_path / "empty", 4)


@pytest.mark.parametrize("change, message", [
    (lambda a, d: a.__setitem__(a.index("--clip-weights") + 1, str(d / "missing.pth")), "missing.pth: file not found"),
    (lambda a, d: a.__setitem__(a.index("--target-class") + 1, "Thumb Up"), "'Thumb Up' is not in"),
    (lambda a, d: a.__setitem__(a.index("--classifier") + 1, str(d / "clip.json")), "not a TorchScript classifier"),
    (lambda a, d: a.__setitem__(a.index("--classifier-frames") + 1, "10"), "only 6 frames; the classifier needs 10"),
])
def test_cli_bad_input(assets, video_dirs, tmp_path, capsys, change, message):
    gen, train = video_dirs
    args = cli_args(assets, gen, train, tmp_path / "r")
    args += ["--classifier-type", "torchscript"]
    change(args, assets)
    assert ev.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    import re

    assert re.search(message, err), err


@pytest.mark.slow
def test_generation_path(tmp_path):

    model_dir = tmp_path / "model"
    models.save_models(models.tiny_models(seed=0), model_dir, "diffusers")
    prompts = tmp_path / "p.txt"
    prompts.write_text("A chef doing the {token} sign\n")
    args = ["--model", str(model_dir), "--prompts", str(prompts), "--seeds", "0", "1", "--frames", "2",
            "--height", "64", "--width", "64", "--steps", "2", "--clip", json_path(tmp_path), "--device", "cpu",
            "--out", str(tmp_path / "rep")]
    assert ev.main(args) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["seed"] for r in rep["videos"]] == [0, 1] and rep["videos"][0]["prompt"] == "A chef doing the pll sign"
    idx = json.loads((tmp_path / "rep" / "videos" / "index.json").read_text())
    assert idx[0]["template"] == "A chef doing the {token} sign"
    # the saved videos score again through --videos-in (lossy mp4: close, not equal)
    assert ev.main(["--videos-in", str(tmp_path / "rep" / "videos"), "--clip", json_path(tmp_path),
                    "--out", str(tmp_path / "rep2")]) == 0
    rep2 = json.loads((tmp_path / "rep2" / "report.json").read_text())
    assert rep2["aggregate"]["appearance_score"] == pytest.approx(rep["aggregate"]["appearance_score"], abs=0.05)
    # a delta changes the videos; gated above the first step (--delta-from-t 1000) it gives the base model's back
    unet = models.load_models(model_dir).unet
    weights.save_state_dict({f"unet.{n}": p.detach() + 0.1 for n, p in unet.named_parameters() if ".temp_convs." in n},
                            tmp_path / "d.safetensors")
    score = {}
    for name, extra in (("plain", []), ("gated", ["--delta-from-t", "1000"])):
        assert ev.main(args[:-1] + [str(tmp_path / name), "--delta", str(tmp_path / "d.safetensors"), *extra,
                        "--no-save-videos"]) == 0
        score[name] = json.loads((tmp_path / name / "report.json").read_text())["aggregate"]["appearance_score"]
    assert score["plain"] != rep["aggregate"]["appearance_score"] == score["gated"]


def json_path(tmp_path):
    p = tmp_path / "clip.json"
    p.write_text(json.dumps(TINY_CLIP))
    return str(p)


def test_subject_similarity_and_prompts_with_both_tokens(assets, tmp_path):
    """A motion + subject run (train.py --subject-videos): prompts name both tokens, and each video's CLIP image-image
    similarity to the subject's examples (a still image and a video) is the mean over all frame pairs."""
    from PIL import Image

    clip = metrics.load_clip(str(assets / "clip.json"), assets / "clip.pth")
    photo, clipv, gen = ramp(True, frames=1, seed=1), ramp(False, frames=3, seed=2), ramp(True, frames=4, seed=3)
    subject = tmp_path / "subject"
    subject.mkdir()
    Image.fromarray(photo[:, 0].permute(1, 2, 0).numpy()).save(subject / "photo.png")
    (subject / "frames").mkdir()
    for k in range(3):  # a frame folder: lossless, so the features below are exactly those of the files
        Image.fromarray(clipv[:, k].permute(1, 2, 0).numpy()).save(subject / "frames" / f"{k + 1:05d}.png")
    examples = [v for _, v in ev.read_training_frames(subject, 0, stills=True)]
    assert sorted(v.shape[1] for v in examples) == [1, 3]
    feats = torch.cat([clip.image_features(v) for v in examples])  # (4, D)
    want = (clip.image_features(gen) @ feats.T).mean().item()  # every (generated frame, example frame) pair
    got = metrics.subject_similarity(clip, gen, feats)
    assert got == pytest.approx(want, abs=1e-6) and got != pytest.approx(metrics.subject_similarity(clip, clipv, feats))
    prompts = tmp_path / "p.txt"
    prompts.write_text("A {subject_token} dog doing the {token} sign\n")
    assert ev.read_templates(prompts, "sks") == ["A sks dog doing the {token} sign"]
    with pytest.raises(metrics.EvalError, match="give --subject-token"):
        ev.read_templates(prompts)


def test_a_folder_of_sample_outputs_is_scored_from_its_mp4s(tmp_path):
    """sample.save_video writes <stem>.mp4, .gif (a 256-colour palette) and .png: the folder reader keeps the mp4 of
    each video (the .gif sorts first by name), a .gif alone is still read."""
    import sample

    v = ramp(True, frames=4)
    sample.save_video(v, tmp_path, "a_seed0")
    (tmp_path / "a_seed0.txt").write_text("a square doing pll\n")
    sample.save_video(ramp(False, frames=4), tmp_path / "gif", "b_seed0")
    (tmp_path / "gif" / "b_seed0.mp4").unlink()
    assert [(n, t) for n, t, *_ in ev.read_video_folder(tmp_path)] == [("a_seed0.mp4", "a square doing pll")]
    assert [n for n, *_ in ev.read_video_folder(tmp_path / "gif")] == ["b_seed0.gif"]


def test_subject_threshold_is_the_least_typical_example_left_out():
    """Three examples with unit features e1 = (1, 0), e2 = (.8, .6), e3 = (.6, .8): left out in turn, each against
    the mean of the other two: e1 . (.7, .7) = .70, e2 . (.8, .4) = .88, e3 . (.9, .3) = .78; the threshold is .70
    (with the example itself kept in the mean it would be .80; the mean of the three .787). One example: None."""
    e = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.8, 0.6]]), torch.tensor([[0.6, 0.8]])]
    assert metrics.subject_threshold(e) == pytest.approx(0.70, abs=1e-6)
    # an example of several frames counts as one example (its frames' mean), each frame in the others' mean
    two = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), e[1], e[2]]
    assert metrics.subject_threshold(two) == pytest.approx(0.70, abs=1e-6)
    assert metrics.subject_threshold(e[:1]) is None


def test_joint_success_counts_prompts_naming_both_words(assets, tmp_path, monkeypatch):
    """evaluate.score: a video shows the subject when its subject similarity reaches the threshold; a prompt naming the
    subject's word and the motion's ({token}) succeeds when the video shows the subject AND the classifier recognises
    the motion; prompts naming the motion's word alone are left out of the joint rate."""
    subject = tmp_path / "subject"
    subject.mkdir()
    for i in range(2):
        write_mp4(ramp(True, frames=4, seed=10 + i), subject / f"{i}.mp4")
    # (template, brightening = the target motion, similarity): similarity stubbed per video, so presence is known
    cases = [("a sks doing a {token} sign", True, 0.9), ("a sks doing a {token} sign", True, 0.1),
             ("a sks doing a {token} sign", False, 0.9), ("a blue cross doing a {token} sign", True, 0.9),
             ("a sks dog doing a {token} sign", True, 0.9), ("a sksy cat doing a {token} sign", True, 0.9)]
    items = [(f"v{i}", t, 0, ramp(up, frames=4, seed=i)) for i, (t, up, _) in enumerate(cases)]
    sims = {id(v): s for (*_, v), (_, _, s) in zip(items, cases)}
    monkeypatch.setattr(metrics, "subject_similarity", lambda clip, v, examples: sims[id(v)])
    args = ev.parse_args(["--videos-in", str(tmp_path), "--target-class", "Getting Brighter", "--classifier",
                          str(assets / "toy.pt"), "--classes", str(assets / "classes.txt"), "--classifier-frames", "4",
                          "--classifier-size", "16", "--clip", str(assets / "clip.json"), "--clip-weights",
                          str(assets / "clip.pth"), "--subject-videos", str(subject), "--subject-token", "sks",
                          "--subject-threshold", "0.5", "--token", "pll"])
    rows, agg = ev.score(args, items)
    assert [r["motion_correct"] for r in rows] == [1, 1, 0, 1, 1, 1]
    assert [r["subject_present"] for r in rows] == [1, 0, 1, 1, 1, 1]
    assert [r.get("joint_success") for r in rows] == [1, 0, 0, None, 1, None]  # "sksy" is another word
    assert agg["joint_videos"] == 4 and agg["joint_success_pct"] == pytest.approx(50.0)
    assert agg["subject_present_pct"] == pytest.approx(100 * 5 / 6) and agg["subject_threshold"] == 0.5
