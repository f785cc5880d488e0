"""The options of a training run: the presets (which weights each ablation row and baseline trains), one dataclass
field per command-line flag with its help text and allowed values, the toy model's settings (no --model), and the
checks that stop a bad combination before anything loads. train.py reads a Config; `python train.py --help` prints
these fields.

    cfg = Config(videos="clips/", token="pll", steps=100)      # from Python (check_config fills in the toy settings)
    cfg = parse_args(["--videos", "clips/", "--token", "pll"])  # from a command line
"""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import reporting
import runs
import wan_models
from runs import opt


# Which denoiser parameters each preset trains (groups: train.param_group, train.dit_param_group for the Wan DiT's
# "dit-" presets). Rows of the paper's Table 2, baselines, and the DiT's candidate sets.
PRESETS = {
    "newmove": dict(groups=("temporal", "spatial_kv")),  # the method: 570,882,176 params on the 1.7B UNet
    "temporal": dict(groups=("temporal",)),  # Table 2(a) "spatial: None"
    "spatial-none": dict(groups=("temporal",)),  # alias of temporal, named after the ablation row
    "spatial-all": dict(groups=("temporal", "spatial_kv", "spatial_attn")),  # Table 2(a) "spatial: All"
    "temporal-none": dict(groups=("spatial_kv",)),  # Table 2(b) "temporal: None"
    "all": dict(groups=("temporal", "spatial_kv", "spatial_attn", "spatial_rest")),  # every UNet weight
    # baselines (paper §4.3): their defining choices override --train-token and --prior
    "textual-inversion": dict(groups=(), train_token=True, prior="none"),
    "dreambooth": dict(groups=("spatial_kv", "spatial_attn", "spatial_rest"), prior="synthetic"),
    "custom-diffusion": dict(groups=("spatial_kv",), train_token=True, prior="real"),
    # the Wan DiT (wan_dit.py; groups: train.dit_param_group). It has no temporal layers: each block's self-attention
    # mixes space and time in one operation, so which weights carry a motion is an open question these rows ask
    "dit-newmove": dict(groups=("self_qk", "self_vo", "cross_kv"), family="dit"),  # the frame-mixing layer + text K/V
    "dit-self-attn": dict(groups=("self_qk", "self_vo"), family="dit"),  # self-attention, all of it
    "dit-self-qk": dict(groups=("self_qk",), family="dit"),  # only Q/K: the attention maps, where motion is drawn
    "dit-self-qk+cross-kv": dict(groups=("self_qk", "cross_kv"), family="dit"),
    "dit-cross-kv": dict(groups=("cross_kv",), family="dit"),  # NewMove's spatial choice alone
    "dit-ffn": dict(groups=("ffn",), family="dit"),
    "dit-linear-all": dict(groups=("self_qk", "self_vo", "cross_kv", "cross_rest", "ffn"), family="dit"),  # every
    # Linear of the blocks (and their q/k norms): with --lora-rank R, the community's "LoRA on all" default
    "dit-all": dict(groups=("self_qk", "self_vo", "cross_kv", "cross_rest", "ffn", "modulation", "dit_rest"),
                    family="dit"),
}


@dataclass
class Config:
    # model and data
    model: str = opt("", "base model: a directory in the original or diffusers layout, or a Hugging Face Hub "
                     "repository id (cerspense/zeroscope_v2_576w, ali-vilab/text-to-video-ms-1.7b: from the cache, "
                     "else downloaded; hub.py); '' = the CPU toy model in toy/model, with the toy world's settings "
                     "(see TOY_SETTINGS)")
    revision: str = opt("", "branch, tag or commit of a Hub --model ('' = main); the commit it resolves to is "
                        "recorded in config.json and the delta's metadata")
    videos: str = opt("", "folder of example videos of the new motion (official: 10 Jester clips of one class); '' "
                      "with --subject-videos: a subject-only run")
    token: str = opt("pll", "rare word that names the motion in captions (paper: 'pll'; official config: 'sks')")
    caption: str = opt("a person doing a {token} sign", "caption for clips without a sidecar .txt/metadata.jsonl "
                       "(the paper's Jester captions)")
    jester_csv: str = opt("", "Jester layout: --videos is the frames root and this `<id>;<class>` CSV picks the clips")
    jester_class: str = opt("", "Jester class name to train on, e.g. 'Drumming Fingers' (matched by name)")
    limit: int = opt(0, "use at most this many instance clips, chosen with --seed (paper: 10); 0 = all", low=0)
    subject_videos: str = opt("", "folder of example videos or still images (each a clip: see --still-frames) "
                              "of a new subject, trained in the same run as --videos (motion and appearance "
                              "customization, paper Table 1); alone: a subject-only run ('' = none)")
    still_frames: str = opt("static", "a still image in --subject-videos becomes: static = a clip of --frames copies "
                            "of it | 1 = a clip of one frame, in a UNet call of its own (1/--frames of the compute; "
                            "the joint recipe's, JOINT_SETTINGS, with --videos too). In a subject-only run a static "
                            "clip also teaches 'does not move' (docs/subject.md)", choices=("static", "1"))
    subject_timesteps: str = opt("same", "timestep distribution of the --subject-videos clips: same (as --timesteps) | "
                                 "coarse | uniform | fine. Appearance is settled at low noise, motion at high noise "
                                 "(docs/subject.md)", choices=("same", "coarse", "uniform", "fine"))
    subject_trains: str = opt("auto", "what the --subject-videos clips' loss trains, next to --videos: all (every "
                              "trained weight) | appearance (only the spatial cross-attention K/V and the subject "
                              "word's row: the temporal layers learn from the motion and regularization clips alone) "
                              "| word (only the subject word's row, --train-subject-token) | auto = with --videos, "
                              "the joint recipe (JOINT_SETTINGS) for this and the options not given; all otherwise",
                              choices=("auto", "all", "appearance", "word"))
    subject_token: str = opt("sks", "rare word that names the subject in captions (official config's token: 'sks')")
    subject_class: str = opt("", "the subject's class word for {class} in --subject-caption, e.g. 'dog'")
    subject_caption: str = opt("a {subject_token} {class}", "caption for subject examples without a sidecar "
                               ".txt/metadata.jsonl ({subject_token} -> --subject-token, {class} -> --subject-class)")
    reg_videos: str = opt("", "folder of real videos of related motions for regularization ('' = none)")
    reg_caption: str = opt("", "caption for reg clips without their own (paper: 'a person doing other things')")
    prior: str = opt("real", "regularization set: real (--reg-videos) | synthetic (generated by the base model) | none",
                     choices=("real", "synthetic", "none"))
    prior_count: int = opt(8, "synthetic prior: number of videos generated from --reg-caption before training", low=1)
    frames: int = opt(16, "frames per training window (official 16)", low=1)
    size: int = opt(384, "frames are resized to an aspect bucket of about size x size pixels, both sides multiples of "
                    "64, without cropping (official 384; a 176x100 Jester clip -> 448x320)", low=1)
    resize: str = opt("bucket", "bucket (keep the aspect ratio, no crop; official) | crop (short side to --size, then "
                      "a centre-cropped square)", choices=("bucket", "crop"))
    fps: float = opt(24.0, "target fps: stride = max(1, round(native fps / fps)) per clip (official 24; Jester's 12 fps "
                     "gives consecutive frames); 0 = use --stride", low=0)
    stride: int = opt(1, "frame step inside a clip when --fps 0", low=1)
    window: str = opt("random", "random: every step trains on --frames consecutive (strided) frames starting anywhere "
                      "in the clip, drawn per clip and step (official) | first: always the first --frames",
                      choices=("random", "first"))
    max_frames: int = opt(240, "--window random caches every strided frame of a clip from --start on, at most this many "
                          "(240 = 10 s at 24 fps; Jester clips have ~36); windows are drawn inside them", low=1)
    start: int = opt(0, "index of the first frame of each clip (official sample_start_idx 1 is never read upstream)",
                     low=0)
    short: str = opt("repeat", "clips shorter than needed: repeat the last frame (official) | loop | skip",
                     choices=("repeat", "loop", "skip"))
    recursive: bool = opt(False, "also read videos in subfolders")
    strict: bool = opt(False, "fail on the first unreadable video instead of skipping it with a warning")
    # the method
    denoiser: str = opt("unet", "the toy model's denoiser: unet (ModelScope's architecture, DDPM eps loss) | dit "
                        "(Wan 2.1's diffusion transformer in a toy config, toy/model/dit/, rectified flow; its presets "
                        "are the dit- ones, dit-newmove unless --preset is given; see DIT_SETTINGS)",
                        choices=("unet", "dit"))
    preset: str = opt("newmove", "which weights train; see PRESETS (newmove = temporal layers + spatial cross-attn K/V)",
                      choices=PRESETS)
    train_token: bool = opt(False, "also learn an embedding for --token (ablation; not NewMove)")
    train_subject_token: bool = opt(False, "also learn an embedding for --subject-token, as Custom Diffusion does for "
                                    "its new word (starts as the word's own embedding; the delta carries the row)")
    lora_rank: int = opt(0, "0 = full fine-tuning of the preset (NewMove); R > 0 = LoRA of rank R on its Linear layers",
                         low=0)
    lora_scale: float = opt(1.0, "LoRA output scale (paper ablation: rank 32, scale 1)")
    timesteps: str = opt("coarse", "timestep distribution: coarse (NewMove) | uniform | fine (the mirror of coarse)",
                         choices=("coarse", "uniform", "fine"))
    alpha: float = opt(0.5, "skew of the coarse/fine distribution, f(t) = 1 -/+ alpha*cos(pi t/T) (official 0.5)",
                       low=0, high=1)
    flow_shift: float = opt(0.0, "--denoiser dit: the time shift of the training noise levels, sigma = s t / (1 + "
                            "(s - 1) t) at grid step t in (0, 1]; 0 = the model's own, its sampler's (Wan 2.1: 5.0, "
                            "the toy DiT: 3.0; Wan's training shift is not published). 1 = no shift", low=0)
    reg_weight: float = opt(0.5, "lambda in L = L_instance + lambda * L_reg (official 0.5)", low=0)
    reg_ratio: int = opt(1, "regularization clips per instance clip in each step (official 1)", low=1)
    dropout: float = opt(0.0, "dropout in the UNet's ResBlocks and temporal convs while customizing (official run: "
                         "none; 0.1 is the base model's own pretraining value)", low=0, high=0.99)
    # optimization
    steps: int = opt(3000, "optimizer steps (official 3000)", low=1)
    batch_size: int = opt(1, "instance clips per process per step (official 1); reg clips = batch_size * reg_ratio",
                          low=1)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", low=1)
    lr: float = opt(5e-6, "AdamW learning rate, constant (official 5e-6)", above=0)
    weight_decay: float = opt(0.01, "AdamW weight decay (official 0.01)", low=0)
    grad_clip: float = opt(1.0, "max gradient norm (official 1.0); 0 = no clipping (needed by --free-grads)", low=0)
    optimizer: str = opt("adamw", "adamw: torch's AdamW, fp32 m and v, 8 B per trained param (official run) | "
                         "adamw8bit: bitsandbytes' blockwise 8-bit AdamW (the official code's use_8bit_adam; chosen "
                         "over torchao's as it runs eagerly on CPU too and its state is plain tensors; pip install "
                         "bitsandbytes): ~2 B per param. Saves 3.40 GB on the 1.7B model (state 4.57 -> 1.17 GB, "
                         "estimated); measured on the CPU, tiny UNet: allocator peak 43.7 -> 37.9 MiB; step time "
                         "1.13-1.26x on the toy CPU step. Within 3% of fp32 AdamW's weights after 300 steps of a small "
                         "regression (docs/memory.md)", choices=("adamw", "adamw8bit"))
    free_grads: bool = opt(False, "each trained tensor's optimizer step runs inside backward as soon as its gradient "
                           "is complete, and the gradient is freed: the same weights bit for bit, without holding all "
                           "gradients. Saves memory with --checkpointing full only: 1.7B, 16 frames, 256^2 1+1: 13.07 "
                           "-> 12.04 GB, 384^2 1+1: 15.86 -> 15.06 GB (estimated); measured on the CPU, tiny UNet: "
                           "43.7 -> 40.5 MiB; step time 1.23-1.29x on the toy CPU step (one optimizer call per tensor). "
                           "Needs --grad-clip 0; not with fp16 or torchrun")
    precision: str = opt("auto", "autocast dtype: bf16 | fp16 | fp32 | auto = bf16 on CUDA, fp32 on CPU (CPUs without "
                         "native bf16 emulate it ~100x slower); trainable weights are always fp32",
                         choices=("auto", "bf16", "fp16", "fp32"))
    frozen_dtype: str = opt("fp32", "dtype of the frozen UNet weights: fp32 | bf16 | fp16 (must match --precision)",
                            choices=("fp32", "bf16", "fp16"))
    checkpointing: str = opt("none", "activations recomputed in backward: none (step peak already 0.77x diffusers') | "
                             "selective = all element-wise work between matmuls/convs/attention (a further -8%, "
                             "+0-40% time in CPU benchmarks) | full = every layer (~7x less activation memory, "
                             "~1.2-1.3x the step time)", choices=("none", "selective", "full"))
    elementwise_recompute: bool = opt(True, "GroupNorm->SiLU and GEGLU keep only their input for backward and "
                                      "recompute the rest there (bit-identical gradients); --no-elementwise-recompute "
                                      "keeps the intermediates: more activation memory (1.7B, 16 x 256^2, 1+1, bf16, "
                                      "no checkpointing: step peak 12.66 -> 15.31 GB estimated), ~1.2x faster toy "
                                      "steps on the CPU (toy/speed.md)")
    seed: int = opt(64, "base seed; process r uses seed + r (official 64)")
    device: str = opt("", "'' = cuda if available else cpu")
    # outputs
    out: str = opt("runs/newmove", "output folder; an existing run there is continued only with --resume")
    resume: bool = opt(False, "continue from --out/state.pt")
    ckpt_every: int = opt(500, "steps between resume checkpoints (0 = only at the end)", low=0)
    log_every: int = opt(10, "steps between log lines (loss is synchronised to the host only then)", low=1)
    report_to: str = opt("none", "where else the log goes, besides log.jsonl: none | tensorboard (<out>/tb/) | wandb "
                         "(<out>/wandb/; WANDB_MODE=offline needs no account); several: --report-to tensorboard wandb "
                         "or comma-separated. Each needs its package: pip install tensorboard / wandb "
                         "(docs/training.md, 'Logs')", choices=("none", "tensorboard", "wandb"), several=True)
    val_every: int = opt(0, "steps between validation videos (0 = never)", low=0)
    val_prompts: str = opt("a person doing a {token} sign", "validation prompts separated by '|'")
    val_seeds: str = opt("0", "validation seeds, comma-separated")
    val_token_check: bool = opt(True, "each validation also samples the prompts holding {token} with it deleted "
                                "(same seeds) and logs how much the token changes the videos; warns 'the token has "
                                "no effect yet' while that is at most 1.1x the change with the base weights. Doubles "
                                "validation time, plus one validation of the base weights before training")
    val_solver: str = opt("dpmpp-2m", "sampler of validation videos (and of --prior synthetic): dpmpp-2m (official "
                          "validation: DPM-Solver++) | ddim; the DiT's: unipc | euler",
                          choices=("dpmpp-2m", "ddim", "unipc", "euler"))
    val_steps: int = opt(25, "sampling steps for validation videos (official 25)", low=1)
    val_guidance: float = opt(9.0, "classifier-free guidance of validation videos (official 9; the DiT: 5, Wan's)")
    stop_clip: str = opt("", "open_clip model for the paper's stopping rule, e.g. ViT-B-32-quickgelu ('' = off)")
    stop_clip_weights: str = opt("", "local weights file for --stop-clip")
    stop_score: float = opt(0.265, "stop when the validation appearance CLIP score falls to this (paper: 0.265)",
                            low=-1, high=1)
    cache: str = opt("", "folder for cached latents/text embeddings ('' = <out>/cache)")
    export_diffusers: bool = opt(False, "also write the full customized UNet in the diffusers layout to <out>/unet/")
    save_dtype: str = opt("fp32", "dtype of the tensors in delta.safetensors: fp32 | bf16 | fp16 (half the file; "
                          "training itself is unchanged; toy-world effect in docs/sampling.md; smaller still: delta.py "
                          "compress)", choices=("fp32", "bf16", "fp16"))


TOY_MODEL = Path(__file__).resolve().parent / "toy" / "model"  # the committed toy base model (toy/train_base.py)
# With no --model, the toy world's settings replace the 1.7B ones (toy/demo.py uses the same): 8-frame 32x32 clips,
# a toy-scale lr and step count, and 24 base-motion regularization clips from toy/world.py unless --reg-videos is given.
TOY_SETTINGS = dict(frames=8, size=32, lr=6e-4, steps=200, batch_size=4, log_every=25)
TOY_REG_CLIPS = 24
# With --videos and --subject-videos (a new subject doing a new motion), the options not given take these values: the
# subject word's embedding row learns the subject from its stills, kept as one-frame clips (no motion in them to
# learn), and their loss trains that row only, so every UNet weight learns from the motion and regularization clips
# alone. In toy/joint.py (docs/subject.md) it draws the subject (56% of "a sks doing pll" videos; the earlier
# defaults: 0%) and costs the motion on other subjects least of the recipes measured; both in one video: 12.5%.
JOINT_SETTINGS = dict(train_subject_token=True, still_frames="1", subject_trains="word", subject_timesteps="same")


# With --denoiser dit, the options not given take these values: the DiT's NewMove analogue (its self-attention, which
# mixes frames, + the text cross-attention's K/V), and Wan's sampler and guidance for validation videos.
DIT_SETTINGS = dict(preset="dit-newmove", val_solver="unipc", val_guidance=5.0)
# A Wan 2.1 --model (wan_models.is_wan) trains its DiT (--denoiser dit, DIT_SETTINGS); the options not given take these:
# 33-frame clips (1 + 4k: Wan's VAE keeps frame 0 apart) of about 480^2 pixels and per-block checkpointing (docs/wan.md:
# 1+1 clips at 480x832 need 12.5 GB with it, 63 GB without). --window random (the default) draws one of each clip's
# windows per step, each encoded once as a video of its own (latents.encode_wan_clip).
WAN_SETTINGS = dict(denoiser="dit", frames=33, size=480, checkpointing="full")


def flow_shift(cfg: Config, models) -> float:
    """The DiT's training shift: --flow-shift, else the model's own (its sampler's, which sampling always keeps)."""
    return cfg.flow_shift or models.flow_shift


def check_config(cfg: Config, given=None):
    """Clear errors for bad option values before anything heavy happens. With no --model: the toy model and its
    settings (TOY_SETTINGS) for every option not in `given` (the flags set on the command line; from Python: the
    fields that differ from their defaults); with --videos and --subject-videos, the joint recipe (JOINT_SETTINGS)
    likewise, unless --subject-trains is given."""
    runs.check_fields(cfg)  # each option's choices and range, as the parser checks them
    reporting.check(cfg.report_to)  # a logger's missing package, named before anything loads
    if given is None:
        given = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
    if cfg.subject_trains == "auto":  # resolved once: config.json and a resume see the values used
        joint = bool(cfg.videos and cfg.subject_videos)
        changed = {k: v for k, v in JOINT_SETTINGS.items() if k not in given} if joint else {}
        for k, v in changed.items():
            setattr(cfg, k, v)
        cfg.subject_trains = changed.get("subject_trains", JOINT_SETTINGS["subject_trains"] if joint else "all")
        if changed and int(os.environ.get("RANK", "0")) == 0:
            flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
            print(f"motion + subject: the joint recipe's settings ({flags}; docs/subject.md)", flush=True)
    wan = bool(cfg.model) and wan_models.is_wan(cfg.model)
    if wan:
        for k, v in WAN_SETTINGS.items():
            if k not in given:
                setattr(cfg, k, v)
        check_wan(cfg)
    if cfg.denoiser == "dit":
        check_dit(cfg, given, wan)
    elif cfg.flow_shift:
        raise SystemExit(f"error: --flow-shift {cfg.flow_shift:g} bends the DiT's flow-matching noise levels; the "
                         f"UNet's are its DDPM schedule's (it needs --denoiser dit)")
    elif PRESETS[cfg.preset].get("family") == "dit":
        raise SystemExit(f"error: --preset {cfg.preset} selects DiT weights; it needs --denoiser dit")
    elif cfg.val_solver in ("unipc", "euler"):
        raise SystemExit(f"error: --val-solver {cfg.val_solver} samples the DiT; the UNet's are dpmpp-2m and ddim")
    prior = PRESETS[cfg.preset].get("prior", cfg.prior)
    toy = not cfg.model or Path(cfg.model).resolve() == TOY_MODEL
    if not cfg.model:
        if not TOY_MODEL.is_dir():
            raise SystemExit("error: --model is required (a model directory in either release layout)")
        changed = {k: v for k, v in TOY_SETTINGS.items() if k not in given}
        for k, v in changed.items():
            setattr(cfg, k, v)
        cfg.model = str(TOY_MODEL)
        flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items()) or "all given"
        reg = f"; regularization: {TOY_REG_CLIPS} base-motion clips of toy/world.py" \
            if prior == "real" and not cfg.reg_videos else ""
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"no --model: the CPU toy model in {TOY_MODEL} with the toy world's settings ({flags}{reg})",
                  flush=True)
    elif prior == "real" and not cfg.reg_videos and not toy:
        raise SystemExit(
            "error: no regularization set. NewMove trains on real videos of related motions next to the examples "
            "(L = L_instance + 0.5 L_reg). Choose one: --reg-videos DIR, real videos (the method; paper Table 2: "
            "70.6% motion accuracy with Jester's 'Doing other things' + 'No gesture', 66.7% with WebVid clips); "
            "--prior synthetic, videos the base model generates from --reg-caption (48.3%); or --prior none, no "
            "regularization (43.9%, and the model forgets more of what it knew)")
    if not cfg.videos and not cfg.subject_videos:
        raise SystemExit("error: --videos is required (a folder of example videos of the new motion; or "
                         "--subject-videos alone for a subject-only run)")
    if cfg.subject_videos or cfg.train_subject_token:
        check_subject(cfg)
    if cfg.frozen_dtype != "fp32" and cfg.precision != "auto" and cfg.frozen_dtype != cfg.precision:
        raise SystemExit("error: --frozen-dtype bf16/fp16 needs the same --precision (autocast)")
    if cfg.fps and cfg.stride != 1:
        raise SystemExit(f"error: --stride {cfg.stride} needs --fps 0 (with --fps the stride comes from each clip's "
                         f"frame rate)")
    try:
        seeds = [int(s) for s in cfg.val_seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds:
        raise SystemExit(f"error: --val-seeds must be comma-separated integers, e.g. 0,1,2; got {cfg.val_seeds!r}")
    if not any(p.strip() for p in cfg.val_prompts.split("|")):
        raise SystemExit("error: --val-prompts is empty (prompts separated by '|')")
    if cfg.val_every and cfg.val_token_check and "{token}" not in cfg.val_prompts:
        raise SystemExit("error: --val-token-check deletes {token} from the --val-prompts, but none holds it; write "
                         "the token as {token} there, or pass --no-val-token-check")
    check_memory_options(cfg)
    if cfg.window == "random" and cfg.max_frames < cfg.frames:
        raise SystemExit(f"error: --max-frames {cfg.max_frames} must be at least --frames {cfg.frames}")


def check_wan(cfg: Config):
    """What a Wan 2.1 run cannot do here (yet), before anything loads."""
    if cfg.denoiser != "dit":
        raise SystemExit(f"error: {cfg.model} is Wan 2.1: its denoiser is a DiT (--denoiser dit), not a UNet")
    if (cfg.frames - 1) % 4:
        raise SystemExit(f"error: --frames {cfg.frames}: Wan's VAE takes 1 + 4k frames (e.g. 33, 49, 81)")
    if cfg.train_token or cfg.train_subject_token or cfg.subject_videos:
        raise SystemExit("error: learned words and --subject-videos are not supported with Wan's umT5 here")


def check_dit(cfg: Config, given, wan: bool = False):
    """--denoiser dit: DIT_SETTINGS for the options not given, then what the DiT cannot do here."""
    for k, v in DIT_SETTINGS.items():
        if k not in given:
            setattr(cfg, k, v)
    if PRESETS[cfg.preset].get("family") != "dit":
        raise SystemExit(f"error: --preset {cfg.preset} selects UNet weights; with --denoiser dit choose a dit- preset "
                         f"({', '.join(k for k, v in PRESETS.items() if v.get('family') == 'dit')})")
    if cfg.val_solver not in ("unipc", "euler"):
        raise SystemExit(f"error: --val-solver {cfg.val_solver} samples the UNet; the DiT's are unipc and euler")
    if cfg.checkpointing == "selective":
        raise SystemExit("error: --checkpointing selective is the UNet's; the DiT checkpoints whole blocks: full")
    if cfg.export_diffusers:
        raise SystemExit("error: --export-diffusers writes a diffusers UNet; the DiT's delta is its output")
    folder = Path(cfg.model) if cfg.model else TOY_MODEL
    if not wan and not (folder / "dit" / "config.json").is_file():
        raise SystemExit(f"error: --denoiser dit trains the DiT in a model folder's dit/ (the toy model's: "
                         f"toy/model/dit/, made by toy/train_dit.py), or Wan 2.1's; {folder} is neither")


def check_memory_options(cfg: Config):
    """--free-grads steps each tensor as soon as its gradient exists: refuse what needs all gradients first."""
    if not cfg.free_grads:
        return
    if cfg.grad_clip:  # clipping scales every gradient by the norm of all of them
        raise SystemExit(f"error: --free-grads cannot clip by the global gradient norm (--grad-clip {cfg.grad_clip:g}): "
                         f"pass --grad-clip 0 (no clipping), or drop --free-grads")
    if cfg.precision == "fp16":  # GradScaler unscales and checks all gradients for inf before any step
        raise SystemExit("error: --free-grads does not work with --precision fp16 (loss scaling checks every gradient "
                         "before the step); use --precision bf16 or fp32")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # DDP all-reduces a gradient after its hook has already fired
        raise SystemExit("error: --free-grads does not work under torchrun (DDP averages the gradients after they are "
                         "complete on each process); run one process, or drop --free-grads")


def check_subject(cfg: Config):
    """The subject options: a token distinct from the motion's, and a class word when the caption template uses one."""
    if not cfg.subject_token.strip() or cfg.subject_token.split() != [cfg.subject_token]:
        raise SystemExit(f"error: --subject-token must be one word, got {cfg.subject_token!r}")
    if cfg.videos and cfg.subject_token == cfg.token:  # one word cannot name both the motion and the subject
        raise SystemExit(f"error: --subject-token {cfg.subject_token!r} is the motion's --token too; choose another")
    if not cfg.videos and PRESETS[cfg.preset].get("train_token", cfg.train_token):  # it would get no gradient
        raise SystemExit(f"error: --train-token (or --preset {cfg.preset}) learns the embedding of --token, the "
                         f"motion's word, and a subject-only run (no --videos) has no caption with it")
    if cfg.train_subject_token and not cfg.subject_videos:
        raise SystemExit("error: --train-subject-token learns the embedding of --subject-token: give --subject-videos")
    if "{class}" in cfg.subject_caption and not cfg.subject_class.strip():
        raise SystemExit(f"error: --subject-caption {cfg.subject_caption!r} uses {{class}}: give --subject-class "
                         f"(e.g. dog), or a caption without it")


def parse_args(argv=None, description: str = "NewMove training.") -> Config:
    """The command line: one flag per Config field (runs.parse_options), then check_config with the flags typed."""
    cfg, given = runs.parse_options(Config, argv, description + " Defaults are the official NewMove settings.")
    check_config(cfg, given)
    return cfg
