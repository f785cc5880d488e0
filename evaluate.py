"""Evaluate a motion-customized text-to-video model with the NewMove metrics (method.md §7).

    python evaluate.py --model text-to-video-ms-1.7b --delta runs/pll/delta.safetensors \\
        --prompts prompts/appearance_100.txt --seeds 0 1 2 --token pll \\
        --target-class "Sliding Two Fingers Up" --motion-phrase "sliding two fingers up" \\
        --classifier TRN_jester_RGB_BNInception_TRNmultiscale_segment8_best.pth.tar --classes jester_categories.txt \\
        --clip ViT-B-32-quickgelu --clip-weights ViT-B-32.pt \\
        --sscd sscd_disc_mixup.torchscript.pt --train-videos data/pll/ --out report/
    python evaluate.py --model cerspense/zeroscope_v2_576w ... --classifier trn-jester --sscd sscd_disc_mixup \\
        --clip ViT-B-32 --clip-pretrained openai --sha256 HEX ...   # weights by name, downloaded once (hub.py)
    torchrun --nproc-per-node 4 evaluate.py ...            # generation sharded over ranks; rank 0 scores and writes
    python evaluate.py --videos-in report/videos/ ...      # score existing videos (index.json or <stem>.txt prompts)

The metrics, and the models behind them, are metrics.py's (its docstring lists each with its definition and source):
motion accuracy, appearance score, text alignment, copy score, temporal consistency, subject similarity (with
--subject-videos). This script makes the videos (or reads them), scores them and writes the report: report.json,
report.md, and contact sheets of the best and worst video per metric.

Prompt templates follow metrics.py's convention: each line holds `{token}` once, e.g. "A female firefighter doing the
{token} sign". --motion-regex matches the motion phrase, removed for the appearance text; --motion-phrase replaces it in
the text-alignment caption ("A female firefighter sliding two fingers up"); the generation prompt = the template with
`{token}` replaced by --token. A template may also name a subject taught with train.py --subject-videos:
`{subject_token}` is replaced by --subject-token everywhere ("A {subject_token} dog doing the {token} sign").

Settings the paper leaves open (method.md §7.8) are flags, and every one lands in report.json: the CLIP model, the
classifier's frame sampling, the SSCD resize. Scoring runs on rank 0 on the uint8 videos in memory; scoring the saved
mp4s later (--videos-in) gives slightly different numbers because H.264 is lossy (crf 10).
"""

if __name__ == "__main__":  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    import omp
    omp.choose_wait_policy()

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import hub
import metrics
import runs
import sample
from delta import apply_delta
from metrics import EvalError
from weights import WeightsError, atomic_write, read_text, sha256, writable_dir, write_json


# -----------------------------------------------------------------------------------------------------------------------
# reading videos


def read_video(path: Path) -> torch.Tensor:
    """All frames of a video file or frame folder (or the one of a still image) as uint8 (3, F, H, W)."""
    spec = data.ClipSpec(frames=100000)  # decode_video stops at the end of the file; nothing is padded here
    if path.is_dir():
        frames = [data.read_image(p) for p in data.list_frames(path)]
    elif path.suffix.lower() in data.IMAGE_EXTS:  # a subject's photo
        frames = [data.read_image(path)]
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
        clips, found = [], data.find_clips(folder)
        # sample.save_video writes an .mp4 and a .gif (256-colour palette) of each video: score the mp4
        mp4 = {p.with_suffix("") for p in found if p.suffix.lower() == ".mp4"}
        for p in found:
            if p.suffix.lower() != ".mp4" and p.with_suffix("") in mp4:
                continue
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
                v = v[:, metrics.segment_indices(v.shape[1], frames)]
            out.append((str(p.relative_to(folder)), v))
    except data.DataError as e:
        raise EvalError(str(e)) from None
    if not out:
        raise EvalError(f"{flag} {folder}: no videos" + (" or images" if stills else "") + " found")
    return out


# -----------------------------------------------------------------------------------------------------------------------
# report


def model_files(args, root=None, clip_file=None) -> dict:
    """sha256 of every model file the run read (the model folder `root`'s files, delta, classifier, classes, CLIP,
    SSCD; `clip_file`: the weights open_clip fetched for --clip-pretrained)."""
    files = []
    if root is not None:
        files += sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in (args.delta if not args.videos_in else None, args.classifier, args.classes, args.clip_weights, args.sscd,
              args.clip if args.clip and args.clip.endswith(".json") else None, clip_file):
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
    """Mean of the values that are neither None nor NaN; None if there are none."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def sheet_row(video: torch.Tensor, height: int = 96, columns: int = 8) -> torch.Tensor:
    """Up to `columns` evenly spaced frames of uint8 (3, F, H, W), resized to `height`, as a contact sheet."""
    v = video[:, metrics.segment_indices(video.shape[1], min(columns, video.shape[1]))].permute(1, 0, 2, 3).float()
    w = max(1, round(v.shape[-1] * height / v.shape[-2]))
    v = F.interpolate(v, size=(height, w), mode="bilinear", antialias=True).round().clamp(0, 255)
    return sample.contact_sheet(v.to(torch.uint8).permute(1, 0, 2, 3), columns)


def write_stacked(sheets: list, path: Path):
    """Sheets one below the other in one PNG, narrower ones padded black on the right."""
    width = max(s.shape[-1] for s in sheets)
    sample.write_png(torch.cat([F.pad(s, (0, width - s.shape[-1])) for s in sheets], dim=1), path)


def write_sheets(out: Path, rows: list, videos: list, keys: list, height: int = 96, columns: int = 8):
    """One PNG per metric (`keys` of the rows): the best video's frames on the top row(s), the worst's below."""
    for m in keys:
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


def copies_table(per_clip: dict) -> list:
    """metrics.copies_per_clip() as markdown table lines."""
    return ["| training clip | videos copying it | % of videos |", "|---|---|---|"] + \
        [f"| {c} | {v['videos']} | {v['pct']:.1f}% |" for c, v in per_clip.items()]


def write_markdown(path: Path, report: dict):
    """report.md: the aggregate metrics, the class histogram, the copied training clips, one row per video."""
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
    keys = [k for k in ("motion_correct", "target_prob", "appearance", "text_alignment", "temporal",
                        "subject_similarity", "subject_present", "joint_success", "copy", "copy_clip")
            if any(k in r for r in report["videos"])]
    lines += ["", "| video | prompt | seed | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for r in report["videos"]:
        lines.append(f"| {r['name']} | {r.get('prompt') or ''} | {fmt(r.get('seed'))} | "
                     + " | ".join(fmt(r.get(k)) for k in keys) + " |")
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"), overwrite=True)


def names_both(template, args) -> bool:
    """Whether a prompt template names the motion's word ({token}) and the subject's (--subject-token)."""
    return template is not None and "{token}" in template and bool(args.subject_token) and \
        args.subject_token in template.replace("{token}", " ").split()


def score(args, items: list, train=None) -> tuple:
    """Score [(name, template, seed, video uint8 (3, F, H, W))]: (per-video rows, aggregate dict). With --sscd,
    `train` = read_training_frames(...)'s [(name, video)]."""
    rows = [{"name": n, "template": t, "seed": s, "frames": v.shape[1]} for n, t, s, v in items]
    videos = [v for *_, v in items]
    for r in rows:
        if r["template"] is not None:
            r["prompt"] = r["template"].replace("{token}", args.token) if args.token else r["template"]
    agg = {"videos": len(items)}

    if args.classifier:
        clf = metrics.load_classifier(args.classifier, args.classes, args.classifier_type, args.device,
                                      frames=args.classifier_frames, size=args.classifier_size,
                                      mean=args.classifier_mean, std=args.classifier_std)
        target = metrics.class_index(clf.class_names, args.target_class, args.classes)
        top1, probs = metrics.motion_predictions(clf, videos)
        hist = {}
        for r, k, p in zip(rows, top1.tolist(), probs):
            r.update(predicted=clf.class_names[k], motion_correct=float(k == target), target_prob=p[target].item())
            hist[clf.class_names[k]] = hist.get(clf.class_names[k], 0) + 1
        agg["motion_accuracy"] = mean([r["motion_correct"] for r in rows])
        agg["class_histogram"] = dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))
        del clf

    if args.clip:
        clip = metrics.load_clip(args.clip, args.clip_weights, args.device, args.clip_pretrained)
        for r, v in zip(rows, videos):
            r["temporal"] = metrics.temporal_consistency(clip, v)
            if r["template"] is None:
                continue  # no prompt known for this video: temporal consistency only
            r["appearance_text"] = metrics.appearance_text(r["template"], "{token}", args.motion_regex)
            r["appearance"] = metrics.clip_text_score(clip, v, r["appearance_text"])
            if args.motion_phrase:
                r["caption"] = metrics.caption_text(r["template"], args.motion_phrase, "{token}", args.motion_regex)
                r["text_alignment"] = metrics.clip_text_score(clip, v, r["caption"])
        agg["appearance_score"] = mean([r.get("appearance") for r in rows])
        agg["text_alignment"] = mean([r.get("text_alignment") for r in rows])
        agg["temporal_consistency"] = mean([r["temporal"] for r in rows])
        if args.subject_videos:  # appearance of the taught subject, next to motion accuracy
            examples = [clip.image_features(v) for _, v in read_training_frames(
                args.subject_videos, 0, stills=True, flag="--subject-videos")]
            threshold = metrics.subject_threshold(examples) if args.subject_threshold is None else \
                args.subject_threshold
            subject = torch.cat(examples)  # (S, D): every example frame
            for r, v in zip(rows, videos):
                r["subject_similarity"] = metrics.subject_similarity(clip, v, subject)
                if threshold is not None:
                    r["subject_present"] = float(r["subject_similarity"] >= threshold)
            agg["subject_similarity"] = mean([r["subject_similarity"] for r in rows])
            agg["subject_threshold"] = threshold
            if threshold is None:
                print("note: one subject example: no threshold to calibrate whether a video shows the subject "
                      "(give 2 or more, or --subject-threshold); subject similarity only")
            else:
                agg["subject_present_pct"] = 100.0 * mean([r["subject_present"] for r in rows])
        del clip
    # a new subject doing the new motion: a prompt naming both words succeeds when the video shows both
    both = [r for r in rows if "subject_present" in r and "motion_correct" in r and names_both(r["template"], args)]
    for r in both:
        r["joint_success"] = r["subject_present"] * r["motion_correct"]
    if both:
        agg["joint_success_pct"] = 100.0 * mean([r["joint_success"] for r in both])
        agg["joint_videos"] = len(both)

    if args.sscd:
        sscd = metrics.load_sscd(args.sscd, args.sscd_size, args.device)
        train_desc = torch.cat([sscd.descriptors(v) for _, v in train])  # (T, 512)
        clip_of = [name for name, v in train for _ in range(v.shape[1])]  # training frame -> its clip
        for r, v in zip(rows, videos):
            r["copy"], t = metrics.copy_score(sscd.descriptors(v), train_desc)
            r["copy_clip"], r["copied"] = clip_of[t], r["copy"] > metrics.COPY_THRESHOLD
        agg["copy_score_mean_max"] = mean([r["copy"] for r in rows])
        agg["copy_above_threshold_pct"] = 100.0 * mean([float(r["copied"]) for r in rows])
        agg["training_frames"] = len(train_desc)
        agg["copies_per_training_clip"] = metrics.copies_per_clip([n for n, _ in train],
                                                                  [r["copy_clip"] for r in rows],
                                                                  [r["copied"] for r in rows])
    if "motion_accuracy" in agg:
        agg["motion_accuracy_pct"] = 100.0 * agg["motion_accuracy"]
    return rows, agg


# -----------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("videos: generate them, or score a folder")
    g.add_argument("--model", help="model directory (either release layout, models.py) or a Hugging Face Hub "
                   "repository id (from the cache, else downloaded; hub.py)")
    g.add_argument("--revision", help="branch, tag or commit of a Hub --model (report.json records the commit)")
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
    g.add_argument("--classifier", help="TRN Jester checkpoint (.pth.tar) or a TorchScript video classifier; or by "
                   "name: trn-jester, the published TRN (downloaded once, hub.py; see --sha256)")
    g.add_argument("--classes", help="class names, one per line, in the classifier's output order (with --classifier "
                   "trn-jester: jester-categories, its published file, unless given)")
    g.add_argument("--classifier-type", choices=["auto", "trn", "torchscript"], default="auto",
                   help="auto: TorchScript archives are 'torchscript', anything else 'trn'")
    g.add_argument("--classifier-frames", type=int, default=8, help="TorchScript: frames sampled (segment centres)")
    g.add_argument("--classifier-size", type=int, default=224, help="TorchScript: short side resize + center crop")
    g.add_argument("--classifier-mean", type=float, nargs=3, default=[0.0, 0.0, 0.0], help="TorchScript, 0..1 RGB")
    g.add_argument("--classifier-std", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="TorchScript, 0..1 RGB")
    g = p.add_argument_group("CLIP: appearance score, text alignment, temporal consistency")
    g.add_argument("--clip", help="open_clip model name (OpenAI weights: ViT-B-32-quickgelu), hf-hub:org/repo "
                   "(open_clip downloads it) or a JSON model config")
    g.add_argument("--clip-pretrained", metavar="TAG", help="a tag of open_clip's pretrained registry, e.g. openai or "
                   "laion2b_s34b_b79k: open_clip downloads and caches the weights (python models.py fetch "
                   "clip:NAME:TAG)")
    g.add_argument("--clip-weights", help="local weights file; omitted (and no --clip-pretrained) = random weights "
                   "(testing only)")
    g.add_argument("--motion-regex", default=metrics.DEFAULT_MOTION_REGEX,
                   help="the motion phrase of a template; removed for the appearance text")
    g.add_argument("--subject-videos", help="the subject's examples (train.py --subject-videos): subject similarity, "
                   "whether each video shows the subject (similarity >= --subject-threshold), and with a classifier "
                   "the joint success of prompts naming both words (subject shown and motion recognised)")
    g.add_argument("--subject-threshold", type=float, default=None, help="subject similarity a video needs to count "
                   "as showing the subject; default: calibrated on the examples (the lowest similarity of one example "
                   "to the others)")
    g.add_argument("--motion-phrase", help="replaces the motion phrase in the text-alignment caption, e.g. "
                   "'sliding two fingers up'; no text alignment without it")
    g = p.add_argument_group("copy score")
    g.add_argument("--sscd", help="sscd_disc_mixup.torchscript.pt or .torchvision.pt; or by name: sscd_disc_mixup, "
                   "the published TorchScript file (downloaded once, hub.py; see --sha256)")
    g.add_argument("--sha256", action="append", default=[], metavar="HEX", help="accept a file downloaded by name "
                   "(trn-jester, jester-categories, sscd_disc_mixup) with this sha256: none is published, so none is "
                   "pinned; a refused download prints its hash (repeat for several; or NEWMOVE_SHA256)")
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
    if args.classifier == "trn-jester" and not args.classes:
        args.classes = "jester-categories"  # the published TRN's published class names
    if args.classifier and not args.classes:
        p.error("--classifier needs --classes (the class-names file)")
    if args.clip_pretrained and (not args.clip or args.clip_weights):
        p.error("--clip-pretrained needs --clip (an open_clip model name) and no --clip-weights")
    if args.sscd and not args.train_videos:
        p.error("--sscd needs --train-videos (the training clips to compare against)")
    if args.subject_videos and not args.clip:
        p.error("--subject-videos needs --clip (subject similarity is a CLIP image-image score)")
    return args


def fetch_named_weights(args) -> dict:
    """The evaluators' weights given by name (hub.py), made files before any video is made: --classifier, --classes
    and --sscd names become their cached, hash-checked files (downloaded first if absent); --clip-pretrained and
    hf-hub: CLIPs are fetched by open_clip. {option: what the name stood for}, for report.json."""
    named = {}
    for opt in ("classifier", "classes", "sscd"):
        name = getattr(args, opt)
        if name in hub.URL_FILES and not Path(name).exists():  # a file of that name wins, as a --model folder does
            setattr(args, opt, str(hub.url_file(name, args.sha256)))
            named[opt] = {"name": name, "url": hub.URL_FILES[name][0], "path": getattr(args, opt)}
    if args.clip and (args.clip_pretrained or args.clip.startswith("hf-hub:")):
        path = hub.clip_file(args.clip, args.clip_pretrained) or hub.fetch_clip(args.clip, args.clip_pretrained)
        named["clip"] = {"name": args.clip, "pretrained": args.clip_pretrained, "path": str(path)}
    return named


def read_templates(path, subject_token: str = "") -> list:
    """The prompt templates of a prompts file (blank and '#' lines skipped), `{subject_token}` filled in."""
    path = metrics.check_file(path, "prompts file")
    lines = [ln.strip() for ln in read_text(path, "prompts file").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise EvalError(f"{path}: the prompts file has no prompts (blank and '#' lines are skipped)")
    if any("{subject_token}" in ln for ln in lines) and not subject_token:
        raise EvalError(f"{path}: prompts use {{subject_token}}: give --subject-token (train.py's, e.g. sks)")
    return [ln.replace("{subject_token}", subject_token) for ln in lines]


def main(argv=None) -> int:
    args = parse_args(argv)
    run = runs.setup_distributed(args.device)  # torchrun's rank: its GPU, the process group
    args.device = str(run.device)  # a string, as report.json's settings hold it
    out, saved = None, []  # the report folder; the videos written to it so far (Ctrl-C names them)
    try:
        out = free_folder(Path(args.out))
        train = None
        named = {}
        if run.master:  # bad --out or training clips fail before the generation and scoring work, not after it
            writable_dir(out, "--out")
            train = read_training_frames(args.train_videos, args.train_frames) if args.sscd else None
            named = fetch_named_weights(args)  # evaluators' weights by name: downloaded (or refused) now, not later
        if args.videos_in:
            items = read_video_folder(args.videos_in)
        else:
            from models import load_models

            templates = read_templates(args.prompts, args.subject_token)
            pairs = [(t, s) for t in templates for s in args.seeds]
            mine = list(range(run.rank, len(pairs), run.world))  # rank r generates pairs r, r + world, ...
            try:
                models = load_models(args.model, revision=args.revision)
                if args.delta:
                    apply_delta(models, args.delta, args.delta_from_t)
            except (WeightsError, ValueError) as e:
                raise EvalError(str(e)) from None
            for m in (models.unet, models.vae, models.text_encoder):
                m.to(args.device)
            vids = sample.generate(models, [pairs[i][0].replace("{token}", args.token) for i in mine],
                                   [pairs[i][1] for i in mine], frames=args.frames, height=args.height,
                                   width=args.width, steps=args.steps, guidance=args.guidance,
                                   batch_size=args.batch_size, progress=run.master) if mine else []
            got = [(i, v) for i, v in zip(mine, vids)]
            if run.ddp:
                gathered = [None] * run.world
                dist.all_gather_object(gathered, got)
                got = [x for part in gathered for x in part]
            got.sort(key=lambda x: x[0])
            items = [(f"{i:04d}_{sample.slug(pairs[i][0].replace('{token}', args.token))}_seed{pairs[i][1]}",
                      pairs[i][0], pairs[i][1], v) for i, v in got]
        if not run.master:
            return 0
        rows, agg = score(args, items, train)
        out.mkdir(parents=True, exist_ok=True)
        if not args.videos_in and args.save_videos:
            index = []
            for r, (_, _, _, v) in zip(rows, items):
                base = sample.save_video(v, out / "videos", r["name"])
                r["name"] = index_file = base.name + ".mp4"
                index.append({"file": index_file, "template": r["template"], "seed": r["seed"]})
                write_json(index, out / "videos" / "index.json", overwrite=True)  # after each: --videos-in can read it
                saved.append(index_file)
        settings = {k: v for k, v in vars(args).items()}
        settings.update(copy_threshold=metrics.COPY_THRESHOLD,
                        clip_preprocess="short side bicubic + center crop, model mean/std",
                        classifier_sampling="segment centres", copy_max="over all frame pairs", world_size=run.world)
        root = None if args.videos_in else models.root
        report = {"aggregate": agg, "videos": rows, "settings": settings, "named_weights": named,
                  "base_model": None if args.videos_in else models.source,  # a Hub id's resolved commit
                  "sha256": model_files(args, root, named.get("clip", {}).get("path"))}
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
    except KeyboardInterrupt:  # videos are written whole (sample.save_video); the report comes last
        if run.master:
            made = f"{len(saved)} videos written to {out / 'videos'} (in its index.json)" if saved else "no videos"
            done = "the report written" if out and (out / "report.json").is_file() else "no report"
            print(f"\ninterrupted: {made}, {done}", file=sys.stderr)
        return 130
    finally:
        runs.end_distributed(run)


if __name__ == "__main__":
    raise SystemExit(main())
