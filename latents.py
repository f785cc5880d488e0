"""The training clips as latents. Each clip is read once (data.py), VAE-encoded frame by frame and its caption
text-encoded, both cached on disk; every step then draws, as pure functions of its position in the run (so a resumed
run draws exactly what an uninterrupted one would), which clips it uses (clip_indices), which window of each clip
(window_start, as the official loader: a new start per clip and step) and a fresh posterior sample (batch_latents).
None of this is NewMove's choice; train.py holds those.

    clips = load_clips("pll_clips/", data.ClipSpec(size=384, fps=24, max_frames=240), caption, "pll", tokenizer)
    inst = encode_set(clips, vae, text, tokenizer, Path("runs/x/cache"), model_fingerprint(model_dir), device)
    x0, ctx = batch_latents([("instance", inst, i) for i in clip_indices(b, rank, world, 1, n, seed)], b, seed, 16,
                            True, generator, device)        # (1, 4, 16, h, w), (1, 77, D)
"""

import functools
import hashlib
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import config
import data
import sample
import wan_t5
import wan_vae
from weights import read_state_dict, save_state_dict


def hash_seed(*parts) -> int:
    """A 63-bit seed from any tuple of values (sha256 of its repr): the same position in a run, the same draws."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2 ** 63 - 1)


def model_fingerprint(model_dir) -> str:
    """Cheap identity of a model directory (paths, sizes, mtimes of its files): part of every cache key."""
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    desc = [(str(p.relative_to(model_dir)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return hashlib.sha256(repr(desc).encode()).hexdigest()[:16]


def load_clips(folder: str, spec: data.ClipSpec, caption: str, token: str, tokenizer, instance: bool = False,
               **dataset_kw) -> data.VideoDataset:
    """The clips of one folder (data.VideoDataset; `dataset_kw`: recursive, strict, the Jester selection). Captions
    longer than the text encoder's 77 tokens are cut: a warning names the clip, and an instance caption whose token
    falls past the cut is a DataError (the run would train without the token)."""
    dataset = data.VideoDataset(folder, spec, caption=caption or None, token=token, **dataset_kw)
    if int(os.environ.get("RANK", "0")) == 0:
        print(dataset.report)
    room, tok = tokenizer.context_length - 2, tokenizer.encode(token)  # 75 between SOT and EOT
    has = lambda ids: any(ids[i:i + len(tok)] == tok for i in range(len(ids) - len(tok) + 1))  # noqa: E731
    for clip in dataset.clips:
        ids = tokenizer.encode(clip["caption"])
        if len(ids) <= room:
            continue
        if instance and has(ids) and not has(ids[:room]):
            raise data.DataError(f"{clip['path']}: its caption is {len(ids)} tokens, the text encoder keeps {room}, "
                                 f"and the token {token!r} is in the part cut off: shorten the caption")
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"warning: {clip['path']}: its caption is {len(ids)} tokens; the text encoder keeps the first {room}",
                  file=sys.stderr)
    return dataset


@torch.no_grad()
def encode_set(dataset, vae, text, tokenizer, cache_dir: Path, fingerprint: str, device,
               master: bool = True, frames: int = 16) -> dict:
    """VAE posterior (scaled mean, std) of every frame of every clip and the text embedding, computed once, cached.

    Stored per clip as `<key>.safetensors`, key = hash(clip content + clip settings + caption, model fingerprint), so
    a second run (or the other ranks) reads instead of encoding. Returns per-clip posteriors on the CPU ("mean", "std":
    lists of (L_i, 4, h_i, w_i), frame-major so a window is a contiguous slice) and stacked "context" and "tokens" on
    `device`.
    """
    means, stds, contexts, tokens = [], [], [], []
    cache_dir.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in tqdm(range(len(dataset)), desc="encode clips", disable=not master):
        item = dataset[i]  # decodes the clip: cheap next to the VAE, and it yields the content key
        captions.append(item["caption"])
        key = hashlib.sha256(f"{item['key']}|{fingerprint}".encode()).hexdigest()[:32]
        path = cache_dir / f"{key}.safetensors"
        if path.exists():
            cached = read_state_dict(path)
        elif isinstance(vae, wan_vae.WanVAE):
            cached = encode_wan_clip(item, vae, text, tokenizer, device, frames)
            save_state_dict(cached, path, overwrite=True)
        else:
            frames = item["video"].transpose(0, 1)  # (L, 3, H, W) in [-1, 1]: the VAE encodes frame by frame
            posterior = [vae.encode_frames(frames[k:k + 16].to(device)) for k in range(0, len(frames), 16)]
            mean, logvar = (torch.cat(x) for x in zip(*posterior))  # 2 x (L, 4, h, w), unscaled
            s = vae.cfg.scaling_factor
            tok = tokenizer([item["caption"]]).to(device)
            cached = {"mean": (mean * s).cpu(), "std": (torch.exp(0.5 * logvar) * s).cpu(),  # scaled like latents
                      "context": text(tok)[0], "tokens": tok[0]}
            save_state_dict(cached, path, overwrite=True)  # atomic; ranks racing on the same key write equal bytes
        pin = device.type == "cuda"  # pinned host memory: each step copies only its windows to the GPU
        means.append(cached["mean"].pin_memory() if pin else cached["mean"])
        stds.append(cached["std"].pin_memory() if pin else cached["std"])
        contexts.append(cached["context"])
        tokens.append(cached["tokens"])
    if tokenizer.placeholders:  # captions are tokenized again: the cached ids predate the learned words (not umT5)
        tokens = list(tokenizer(captions).to(device))
    stack = lambda xs: torch.stack(xs).to(device)  # noqa: E731
    # Wan: each clip's windows were encoded one by one and laid end to end; a window is `window` latent frames
    window = latent_frames(frames, vae) if isinstance(vae, wan_vae.WanVAE) else None
    return {"mean": means, "std": stds, "context": stack(contexts), "tokens": stack(tokens), "window": window}


def latent_frames(frames: int, vae) -> int:
    """Latent frames of a `frames`-frame clip: as many for the KL VAE (frame by frame), 1 + (F - 1) / 4 for Wan's."""
    return 1 + (frames - 1) // getattr(vae.cfg, "temporal_factor", 1)


WAN_WINDOW_STRIDE = 8  # pixel frames between the starts of a clip's cached Wan windows (--window random)


def encode_wan_clip(item: dict, vae, text, tokenizer, device, frames: int) -> dict:
    """A clip for Wan 2.1: each window of `frames` (1 + 4k) frames as ONE video through the causal VAE, whose first
    latent frame encodes the window's first pixel frame alone (so a window cut from a longer encoding would not be
    what Wan trains on), at starts 0, 8, 16, ... (one window when the clip holds just `frames`); the windows' latents
    end to end, frame-major, (W * (1 + k), 16, h, w). The caption goes through umT5 as Wan's pipeline encodes prompts.
    Wan trains on the posterior mean: std is zero, so batch_latents' posterior sample is the mean itself."""
    video = item["video"].unsqueeze(0).to(device)  # (1, 3, L, H, W) in [-1, 1]
    starts = range(0, video.shape[2] - frames + 1, WAN_WINDOW_STRIDE)
    z = torch.cat([vae.encode(video[:, :, a:a + frames])[0].transpose(0, 1) for a in starts])  # (W * (1 + k), 16, h, w)
    ids, _ = tokenizer([item["caption"]])
    context = wan_t5.encode_prompts(text, tokenizer, [item["caption"]], tokenizer.seq_len)[0]  # (512, 4096)
    return {"mean": z.float().cpu(), "std": torch.zeros_like(z, dtype=torch.float32).cpu(), "context": context.float(),
            "tokens": ids[0].to(device)}


def window_report(s: dict, frames: int, max_frames: int) -> str:
    """One line on the frames cached per clip and the windows drawn from them (max_frames 0: first windows only)."""
    lengths = sorted(m.shape[0] for m in s["mean"])
    capped = sum(n == max_frames for n in lengths)
    text = (f"{frames} of {lengths[0]}-{lengths[-1]} cached frames per clip "
            f"({'a new start per clip and step' if max_frames else 'always the first'})")
    shapes = sorted({tuple(m.shape[2:]) for m in s["mean"]})
    text += f"; latent buckets (h, w): {', '.join(f'{h}x{w}' for h, w in shapes)}"
    return text + (f"; {capped} clips reach the --max-frames {max_frames} cap" if capped else "")


# -----------------------------------------------------------------------------------------------------------------------
# a training run's two sets


def encode_run_sets(cfg, models, prior: str, token_id, amp, out: Path, run) -> tuple:
    """(instance set, subject set, regularization set (each or None), the model's fingerprint) of a train.py run
    (`cfg`: its Config): every clip read and encoded once (encode_set, cached in --cache) by rank 0 while the others
    wait, then read by the others. prior: real (--reg-videos) | synthetic (generated by the base model) | none."""
    encode = dict(vae=models.vae, text=models.text_encoder, tokenizer=models.tokenizer, device=run.device,
                  cache_dir=Path(cfg.cache) if cfg.cache else out / "cache",
                  fingerprint=model_fingerprint(models.root), master=run.master, frames=cfg.frames)
    if run.ddp and not run.master:
        dist.barrier()  # rank 0 encodes and fills the cache first; the other ranks then only read it
    max_frames = cfg.max_frames if cfg.window == "random" else 0  # 0: only the first window of each clip is read
    spec = data.ClipSpec(frames=cfg.frames, size=cfg.size, stride=cfg.stride, fps=cfg.fps or None, start=cfg.start,
                         short=cfg.short, multiple=sample.pixel_multiple(models), resize=cfg.resize, max_frames=max_frames)
    kw = dict(tokenizer=models.tokenizer, recursive=cfg.recursive, strict=cfg.strict)
    jester = dict(jester_csv=cfg.jester_csv or None, jester_class=cfg.jester_class or None, limit=cfg.limit or None,
                  seed=cfg.seed)
    try:  # a bad clip, caption or folder: data.DataError, naming it
        inst = encode_set(load_clips(cfg.videos, spec, cfg.caption, cfg.token, instance=True, **kw, **jester),
                          **encode) if cfg.videos else None  # None: a subject-only run
        subj = None
        if cfg.subject_videos:  # a subject-only or motion + subject run
            dataset = subject_clips(cfg, spec, kw)
            subj = encode_set(dataset, **encode)
            if cfg.still_frames == "1":  # stills as one-frame clips: the first of the (identical) cached frames
                for i, clip in enumerate(dataset.clips):
                    if Path(clip["path"]).suffix.lower() in data.IMAGE_EXTS:
                        subj["mean"][i], subj["std"][i] = subj["mean"][i][:1], subj["std"][i][:1]
        if token_id is not None and inst is not None and not bool((inst["tokens"] == token_id).any()):
            raise data.DataError(f"{cfg.videos}: no instance caption holds the token {cfg.token!r} (a sidecar "
                                 f"caption replaces --caption), so the learned token row would get no gradient")
        reg = None
        if prior == "real":
            reg = encode_set(load_clips(cfg.reg_videos, spec, cfg.reg_caption, cfg.token, **kw), **encode)
        elif prior == "synthetic":
            reg = synthetic_prior(cfg, models, amp, encode)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if run.ddp and run.master:
        dist.barrier()
    if run.master:
        count = lambda s: 0 if s is None else len(s["mean"])  # noqa: E731
        subject = f"; subject clips: {count(subj)} ({cfg.subject_token})" if subj is not None else ""
        print(f"instance clips: {count(inst)}{subject}; regularization clips: {count(reg)} "
              f"({prior}); lambda {cfg.reg_weight}; timesteps {cfg.timesteps} (alpha {cfg.alpha}"
              f"{f', shift {config.flow_shift(cfg, models):g}' if models.dit is not None else ''}); "
              f"dropout {cfg.dropout}")
        latent = latent_frames(cfg.frames, models.vae)
        for name, s in (("instance", inst), ("subject", subj), ("regularization", reg)):
            if s is not None:
                print(f"{name} windows: {window_report(s, latent, max_frames)}", flush=True)
    return inst, subj, reg, encode["fingerprint"]


def subject_clips(cfg, spec: data.ClipSpec, kw: dict) -> data.VideoDataset:
    """The subject's examples (--subject-videos): videos, and still images (a one-frame clip padded to --frames by
    repeating it; encode_run_sets keeps one frame of it unless --still-frames static), captioned by sidecar,
    metadata.jsonl or --subject-caption; each must name the subject token, or the run would learn it under no word."""
    template = cfg.subject_caption.replace("{subject_token}", cfg.subject_token).replace("{class}", cfg.subject_class)
    clips = load_clips(cfg.subject_videos, spec, template, cfg.subject_token, instance=True, stills=True, **kw)
    word = re.compile(rf"(?<!\w){re.escape(cfg.subject_token)}(?!\w)")
    if not any(word.search(c["caption"]) for c in clips.clips):
        raise data.DataError(f"{cfg.subject_videos}: no caption holds the --subject-token {cfg.subject_token!r} (a "
                             f"sidecar caption replaces --subject-caption)")
    return clips


def synthetic_prior(cfg, models, amp, encode: dict) -> dict:
    """DreamBooth-style prior: videos of --reg-caption generated by the frozen base model, encoded like real clips."""
    prompt = cfg.reg_caption or "a person"
    videos = sample.generate(models, [prompt] * cfg.prior_count, list(range(cfg.prior_count)), frames=cfg.frames,
                             height=cfg.size, width=cfg.size, steps=cfg.val_steps, guidance=cfg.val_guidance,
                             solver=cfg.val_solver, dtype=amp, progress=encode["master"])

    class Generated:  # the dataset interface encode_set reads
        def __len__(self):
            return len(videos)

        def __getitem__(self, i):
            v = videos[i].float() / 127.5 - 1  # uint8 -> [-1, 1], (3, F, H, W)
            return {"video": v, "caption": prompt, "key": f"synthetic|{prompt}|{i}|{cfg.frames}|{cfg.size}|"
                                                          f"{cfg.val_solver}|{cfg.val_steps}|{cfg.val_guidance}"}

    return encode_set(Generated(), **encode)


# -----------------------------------------------------------------------------------------------------------------------
# per step: which clips, which window, which posterior sample


def clip_indices(batch: int, rank: int, world: int, per_rank: int, n: int, seed: int) -> list:
    """The clips rank `rank` uses in global micro-batch `batch`: a stream of reshuffled epochs dealt out across ranks.

    Stateless (a function of the position in the run), so a resumed run sees exactly the data order of an
    uninterrupted one, and within an epoch no two ranks get the same clip (the role of DistributedSampler)."""
    out = []
    for j in range(per_rank):
        i = (batch * world + rank) * per_rank + j  # position in the global stream of clips
        epoch, pos = divmod(i, n)
        out.append(int(_epoch_order(n, seed, epoch)[pos]))
    return out


def step_clips(b: int, run, seed: int, *sets) -> list:
    """[(set name, set, clip index)] that this rank trains on in global micro-batch b: `per_rank` clips of each
    (name, set, per_rank) in `sets`, each set in its own order (seed, seed + 1, ...)."""
    return [(name, s, i) for k, (name, s, per_rank) in enumerate(sets) if per_rank
            for i in clip_indices(b, run.rank, run.world, per_rank, len(s["mean"]), seed + k)]


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(hash_seed(seed, epoch)))


def window_start(seed: int, which: str, batch: int, clip: int, length: int, frames: int) -> int:
    """First cached frame of the window that clip `clip` of set `which` trains on in global micro-batch `batch`:
    uniform over 0 .. length - frames, as the official loader's `random.randint(0, effective_length - n)`, but a pure
    function of (seed, set, micro-batch, clip), so a resumed run redraws exactly the same windows."""
    return hash_seed(seed, "window", which, batch, clip) % (length - frames + 1)


def shape_groups(clips: list, frames: int) -> list:
    """Positions of the clips in the batch grouped by latent shape (frames in the window: `frames`, or 1 for a still
    as a one-frame clip; frame size: the aspect bucket), in order of first appearance: one UNet call per group.
    clips: [(set name, set, clip index)]."""
    groups = {}
    for j, (_, s, i) in enumerate(clips):
        m = s["mean"][i]  # (L, 4, h, w)
        groups.setdefault((min(m.shape[0], frames), *m.shape[1:]), []).append(j)
    return list(groups.values())


def batch_latents(clips: list, b: int, seed: int, frames: int, random_window: bool, g, device) -> tuple:
    """Latents x0 (n, 4, F, h, w) and text embeddings (n, 77, D) of same-shape clips in micro-batch b: each clip's
    window (window_start, or its first frames; a one-frame clip: its frame, F = 1), and a fresh posterior sample
    z = mean + std * noise per clip and step. clips: [(set name, set, clip index)]."""
    means, stds = [], []
    for which, s, i in clips:
        L = s["mean"][i].shape[0]
        n = min(frames, L)  # `frames`, except for a still kept as one frame (--still-frames 1)
        if s.get("window"):  # Wan: whole cached windows only, drawn as the index of one of the L / n
            w0 = n * window_start(seed, which, b, i, L // n, 1) if random_window else 0
        else:
            w0 = window_start(seed, which, b, i, L, n) if random_window else 0
        means.append(s["mean"][i][w0:w0 + n].to(device, non_blocking=True).transpose(0, 1))  # (4, F, h, w)
        stds.append(s["std"][i][w0:w0 + n].to(device, non_blocking=True).transpose(0, 1))
    mean, std = torch.stack(means), torch.stack(stds)
    ctx = torch.stack([s["context"][i] for _, s, i in clips])
    return mean + std * torch.randn(mean.shape, generator=g, device=device), ctx
