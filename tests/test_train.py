"""train.py: timestep distributions, trainable presets, the regularized loss, caching, atomic outputs, exact resume
after SIGKILL, and CPU smoke runs with one process and with torchrun (gloo)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open

import latents
import sample
from delta import apply_delta
import train
import layouts
import unet3d
import wan_dit
import weights
from inprocess import run_script, run_scripts_in_one_process, threads
from models import load_models, save_dit, save_models, tiny_models

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- pure pieces


def test_timestep_distributions():
    p = train.timestep_probs("coarse", 0.5)
    t = torch.arange(1000, dtype=torch.float64)
    # exact values (method.md §1.1): sum_t cos(pi t/T) = 1, so p(0) = (1 - a) / (T - a)
    assert abs(p.sum().item() - 1) < 1e-12
    assert abs(p[0].item() - 0.5 / 999.5) < 1e-12 and abs(p[999].item() - 0.00150075) < 1e-7
    assert torch.allclose(p, (1 - 0.5 * torch.cos(torch.pi * t / 1000)) / 999.5, atol=0, rtol=1e-12)
    assert abs((p * t).sum().item() - 600.9) < 0.1
    assert abs((train.timestep_probs("fine", 0.5) * t).sum().item() - 398.2) < 0.1
    assert torch.equal(train.timestep_probs("uniform", 0.5), torch.full((1000,), 1e-3, dtype=torch.float64))
    # empirical: 10^6 draws as the loop draws them
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p.float(), 1_000_000, replacement=True, generator=g).double()
    assert abs(draws.mean().item() - 600.9) < 1.0
    assert abs((draws >= 500).double().mean().item() - 0.659) < 0.003


def _full_size_unet():
    with torch.device("meta"):
        return unet3d.UNet3D()


@pytest.mark.parametrize("preset,params,tensors", [
    ("newmove", 570_882_176, 826), ("temporal", 545_323_136, 794), ("temporal-none", 25_559_040, 32),
    ("all", 1_411_233_860, 1480)])
def test_preset_parameter_counts_full_size(preset, params, tensors):
    chosen = [p for _, p in train.select_trainable(_full_size_unet(), preset)]
    assert (sum(p.numel() for p in chosen), len(chosen)) == (params, tensors)


def test_spatial_kv_is_not_the_naive_attn2_filter():
    unet = _full_size_unet()
    naive = [p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    assert sum(p.numel() for p in naive) == 50_864_128  # includes the temporal transformers' second self-attention
    kv = train.select_trainable(unet, "temporal-none")  # the spatial K/V group alone
    assert sum(p.numel() for _, p in kv) == 25_559_040 and all(".attentions." in n for n, _ in kv)


@pytest.mark.parametrize("preset,params,tensors", [
    ("dit-newmove", 425_041_920, 420), ("dit-self-qk", 141_742_080, 180), ("dit-cross-kv", 141_649_920, 120),
    ("dit-ffn", 826_068_480, 120), ("dit-linear-all", 1_392_944_640, 780), ("dit-all", 1_418_996_800, 825)])
def test_dit_preset_parameter_counts_full_size(preset, params, tensors):
    """Wan 2.1 T2V 1.3B on the meta device: each candidate set's size (dit-all = every parameter, once)."""
    with torch.device("meta"):
        dit = wan_dit.WanDiT()
    chosen = train.select_trainable(dit, preset)
    assert (sum(p.numel() for _, p in chosen), len(chosen)) == (params, tensors)
    assert len({id(p) for _, p in chosen}) == len(chosen)


def test_dit_groups_put_each_projection_where_its_role_is():
    g = train.dit_param_group
    assert [g(f"blocks.3.self_attn.{m}.weight") for m in ("q", "k", "norm_q", "norm_k", "v", "o")] == \
        ["self_qk"] * 4 + ["self_vo"] * 2
    # the text K/V only: the cross-attention's queries come from the video tokens, its key norm stays with the rest
    assert [g(f"blocks.0.cross_attn.{m}.weight") for m in ("k", "v", "q", "o", "norm_k")] == \
        ["cross_kv"] * 2 + ["cross_rest"] * 3
    assert (g("blocks.29.norm3.bias"), g("blocks.1.ffn.2.weight"), g("blocks.1.modulation")) == \
        ("cross_rest", "ffn", "modulation")
    assert {g(n) for n in ("patch_embedding.weight", "text_embedding.0.weight", "time_projection.1.bias",
                           "head.head.weight", "head.modulation")} == {"dit_rest"}


def test_loss_weights_give_instance_mean_plus_lambda_reg_mean():
    eps = torch.zeros(3, 4, 2, 2, 2)
    eps_hat = torch.zeros_like(eps)
    eps_hat[0] += 1.0  # instance clip: MSE 1
    eps_hat[1] += 2.0  # reg clips: MSE 4 and 0 -> mean 2
    w = train.loss_weights(1, 2, reg_weight=0.5)
    loss, per = train.weighted_mse(eps_hat, eps, w)
    assert w.tolist() == [1.0, 0.25, 0.25] and loss.item() == 1.0 + 0.5 * 2.0
    assert per.tolist() == [1.0, 4.0, 0.0]


def test_clip_indices_cover_each_epoch_once_across_ranks():
    n, world = 10, 2
    seen = [i for b in range(5) for r in range(world) for i in latents.clip_indices(b, r, world, 1, n, seed=3)]
    assert sorted(seen) == list(range(n))  # 5 batches x 2 ranks x 1 clip = one epoch, no clip twice
    assert latents.clip_indices(7, 1, 2, 3, n, 3) == latents.clip_indices(7, 1, 2, 3, n, 3)  # stateless


# --------------------------------------------------------------------------------------------------- runs


def _write_mp4(path, frames):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


def _moving_square(seed, n=8, size=32, direction=1):
    rng = np.random.default_rng(seed)
    frames = np.full((n, size, size, 3), rng.integers(0, 80), dtype=np.uint8)
    color = rng.integers(120, 255, 3)
    y = rng.integers(4, size - 12)
    for i in range(n):
        x = (4 + direction * 2 * i) % (size - 8)
        frames[i, y:y + 8, x:x + 8] = color
    return frames


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = save_models(tiny_models(seed=5), root / "model", "diffusers")
    (root / "videos").mkdir()
    (root / "reg").mkdir()
    for i in range(3):
        _write_mp4(root / "videos" / f"clip{i}.mp4", _moving_square(i))
        _write_mp4(root / "reg" / f"reg{i}.mp4", _moving_square(10 + i, direction=-1))
    return root, model


def _cfg(root, model, out, **kw):
    base = dict(model=str(model), videos=str(root / "videos"), reg_videos=str(root / "reg"),
                reg_caption="a square moving", frames=4, size=32, steps=3, lr=1e-3, precision="fp32",
                log_every=1, ckpt_every=0, out=str(out), seed=1)
    base.update(kw)
    return train.Config(**base)


@pytest.mark.slow
def test_train_smoke_delta_changes_samples(world, tmp_path):
    root, model = world
    delta = train.main(_cfg(root, model, tmp_path / "run", batch_size=2, precision="auto"))
    # auto precision: no bf16 autocast on a CPU (emulated there, ~100x slower), recorded as resolved
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "fp32"
    tensors = weights.read_state_dict(delta)
    assert tensors and all(k.startswith("unet.") for k in tensors)
    assert all(train.param_group(k[5:]) in ("temporal", "spatial_kv") for k in tensors)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    kw = dict(frames=4, height=32, width=32, steps=3, progress=False)
    base = load_models(model)
    before = sample.generate(base, ["a person doing the pll sign"], [0], **kw)
    apply_delta(base, delta)
    after = sample.generate(base, ["a person doing the pll sign"], [0], **kw)
    assert not torch.equal(before, after)
    with pytest.raises(SystemExit, match="already holds a run"):  # never overwrites a finished run
        train.main(_cfg(root, model, tmp_path / "run"))


@pytest.mark.slow
def test_each_clip_gets_its_own_timestep_and_noise_and_cache_is_reused(world, tmp_path, monkeypatch):
    import text_encoder
    import vae

    root, model = world
    seen, calls = [], {"vae": 0, "text": 0}
    real_forward = unet3d.UNet3D.forward

    def spy(self, x, t, context):
        seen.append((x.detach().clone(), t.clone()))
        return real_forward(self, x, t, context)

    def count(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(unet3d.UNet3D, "forward", spy)
    monkeypatch.setattr(vae.AutoencoderKL, "encode_frames", count("vae", vae.AutoencoderKL.encode_frames))
    monkeypatch.setattr(text_encoder.TextEncoder, "forward", count("text", text_encoder.TextEncoder.forward))
    cache = tmp_path / "cache"
    train.main(_cfg(root, model, tmp_path / "a", steps=1, batch_size=2, reg_ratio=2, cache=str(cache)))
    x, t = seen[0]
    assert x.shape[0] == 6 and t.shape == (6,)  # 2 instance + 4 reg clips in ONE UNet batch
    assert len(set(t.tolist())) > 1
    flat = x.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(6) for j in range(i))
    assert calls["vae"] == 6 and calls["text"] == 6  # 3 instance + 3 reg clips encoded once each
    train.main(_cfg(root, model, tmp_path / "b", steps=1, batch_size=2, reg_ratio=2, cache=str(cache)))
    assert calls == {"vae": 6, "text": 6}, "second run must read the cache"


def _interruptible_run(root, model, subject, out, *extra):
    """A two-set run for the interruption tests: 2-frame windows (half the cost of a step); the motion set, the
    regularization set and a subject set of two stills (one-frame clips: their own UNet call) and a captioned video, so
    each set's order, windows and noise must resume exactly."""
    return ["--model", str(model), "--videos", str(root / "videos"), "--reg-videos", str(root / "reg"),
            "--reg-caption", "a square moving", "--frames", "2", "--size", "32", "--steps", "8", "--lr", "1e-3",
            "--precision", "fp32", "--log-every", "1", "--seed", "2", "--subject-videos", str(subject),
            "--subject-class", "square", "--still-frames", "1", "--out", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def uninterrupted(world, subject, tmp_path_factory):
    """The delta of _interruptible_run trained without interruption (with a checkpoint at every step), once for both
    interruption tests. It runs in this process on one thread like the interrupted processes (OMP_NUM_THREADS=1), so
    all of them compute with the same kernels and compare bit for bit."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    with threads(1):
        train.main(train.parse_args(_interruptible_run(*world, subject, out, "--ckpt-every", "1")))
    return weights.read_state_dict(out / "delta.safetensors")


def _same_delta(reference, run_dir):
    got = weights.read_state_dict(run_dir / "delta.safetensors")
    return got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)


def _run(args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_exact_resume_after_sigkill(world, subject, uninterrupted, tmp_path, capfd):
    """SIGKILL needs a real process; the resume runs in this process on one thread. Killed after the 3rd of 8
    checkpoints, the resumed run ends with the uninterrupted run's delta, bit for bit."""
    args = _interruptible_run(*world, subject, tmp_path / "killed", "--ckpt-every", "1")
    killed = _run(args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = tmp_path / "killed" / "state.pt"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill somewhere after the 3rd checkpoint, mid-run
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 3:
            break
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert 3 <= step < 8, step
    resumed = run_script(capfd, "train.py", *args, "--resume", num_threads=1)
    assert resumed.returncode == 0, resumed.text[-3000:]
    assert _same_delta(uninterrupted, tmp_path / "killed")


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_resume_reaches_the_same_weights(world, subject, uninterrupted, tmp_path,
                                                                        capfd):
    """Ctrl-C needs a real process. With no periodic checkpoint (--ckpt-every 0) the interrupted run writes one as it
    stops, says how to resume, and exits 130; the resume (in this process, one thread) ends with the uninterrupted
    run's delta, which was trained with a checkpoint at every step: checkpointing changes nothing either."""
    args = _interruptible_run(*world, subject, tmp_path / "int", "--ckpt-every", "0")
    proc = _run(args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "int" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # after the 3rd logged step: the run stops at step 4 or so, well before the 8th
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130 and "Traceback" not in text, text[-3000:]
    step = torch.load(tmp_path / "int" / "state.pt", weights_only=True)["step"]
    assert 3 <= step < 8 and f"interrupted at step {step}" in text and "--resume" in text
    resumed = run_script(capfd, "train.py", *args, "--resume", num_threads=1)
    assert resumed.returncode == 0, resumed.text[-3000:]
    assert _same_delta(uninterrupted, tmp_path / "int")


@pytest.mark.slow
def test_torchrun_two_processes(world, tmp_path):
    root, model = world
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train.py"), "--model", str(model), "--videos", str(root / "videos"), "--reg-videos",
           str(root / "reg"), "--reg-caption", "a square moving", "--frames", "4", "--size", "32", "--steps", "2",
           "--lr", "1e-3", "--precision", "fp32", "--log-every", "1", "--out", str(tmp_path / "ddp")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "DDP ranks hold identical trained weights" in run.stdout
    tensors = weights.read_state_dict(tmp_path / "ddp" / "delta.safetensors")
    base = load_models(model).unet.state_dict()
    assert any(not torch.equal(v, base[k[5:]]) for k, v in tensors.items())  # it trained


def test_bad_options_are_clear_errors(world, tmp_path, capfd):
    root, model = world
    for kw, msg in [(dict(preset="nope"), "--preset must be one of"), (dict(alpha=2.0), "--alpha must be in"),
                    (dict(frozen_dtype="bf16"), "--frozen-dtype"), (dict(checkpointing="yes"), "--checkpointing"),
                    (dict(dropout=1.0), "--dropout must be in"), (dict(window="middle"), "--window must be one of"),
                    (dict(stride=2), "--stride 2 needs --fps 0"), (dict(max_frames=2), "--max-frames 2 must be"),
                    (dict(val_solver="heun"), "--val-solver must be one of")]:
        with pytest.raises(SystemExit, match=msg):
            train.main(dataclasses.replace(_cfg(root, model, tmp_path / "x"), **kw))
    run = run_script(capfd, "train.py", "--no-such-flag")  # the command line, in this process
    assert run.returncode == 2 and "unrecognized arguments: --no-such-flag" in run.stderr


@pytest.mark.slow
def test_ablation_presets_lora_token_and_baselines(world, tmp_path):
    import text_encoder as te

    root, model = world
    base = load_models(model)
    # LoRA on the NewMove set: the delta holds merged full weights of its Linear layers only (here saved in bf16,
    # --save-dtype, which loads as the bf16 values)
    path = train.main(_cfg(root, model, tmp_path / "lora", steps=2, lora_rank=4, save_dtype="bf16"))
    d = weights.read_state_dict(path)
    assert d and all(v.ndim == 2 and v.dtype == torch.bfloat16 for v in d.values())
    assert any(not torch.equal(v.float(), base.unet.get_parameter(k[5:])) for k, v in d.items())
    apply_delta(base, path)
    assert all(torch.equal(base.unet.get_parameter(k[5:]), v.float()) for k, v in d.items())
    # the token ablation: the delta carries the learned row, and sample.py restores the placeholder
    path = train.main(_cfg(root, model, tmp_path / "tok", steps=2, train_token=True, export_diffusers=True))
    d = weights.read_state_dict(path)
    assert d["text_encoder.placeholder_embeddings"].shape == (1, te.TEXT_PRESETS["tiny"].width)
    m = load_models(model)
    apply_delta(m, path)
    assert m.tokenizer("a person doing the pll sign")[0, 5].item() == te.TEXT_PRESETS["tiny"].vocab_size
    exported = layouts.load_unet(tmp_path / "tok" / "unet" / "diffusion_pytorch_model.safetensors", m.unet.cfg)
    assert all(torch.equal(exported.get_parameter(k[5:]), v) for k, v in d.items() if k.startswith("unet."))
    # Textual Inversion trains the token row only; DreamBooth generates its own prior first
    d = weights.read_state_dict(train.main(_cfg(root, model, tmp_path / "ti", steps=1, preset="textual-inversion")))
    assert list(d) == ["text_encoder.placeholder_embeddings"]
    # ... and refuses, naming the folder, captions that never say the token (the row would get no gradient)
    with pytest.raises(SystemExit, match=r"videos: no instance caption holds the token 'pll'"):
        train.main(_cfg(root, model, tmp_path / "ti2", steps=1, preset="textual-inversion", caption="a square"))
    d = weights.read_state_dict(train.main(_cfg(root, model, tmp_path / "db", steps=1, preset="dreambooth",
                                                prior_count=2, val_steps=2)))
    assert d and all(train.param_group(k[5:]) != "temporal" for k in d)


@pytest.mark.slow
def test_validation_videos_early_stop_and_nan_guard(world, tmp_path, monkeypatch):
    root, model = world
    scores = iter([0.30, 0.20])
    train.main(_cfg(root, model, tmp_path / "val", steps=5, val_every=1, val_steps=2, val_seeds="0,1"),
               score_fn=lambda videos, prompts: next(scores), stop_score=0.265)
    log = [json.loads(line) for line in (tmp_path / "val" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2  # stopped when the score fell to the threshold, not at step 5
    # with the token and (--val-token-check, on by default) without it; step 0 = the base weights
    names = [f"a-person-doing-a-{w}sign_seed{s}.{e}" for w in ("pll-", "") for s in (0, 1)
             for e in ("gif", "mp4", "png")]
    for step in ("step000000", "step000001"):
        assert sorted(p.name for p in (tmp_path / "val" / "val" / step).iterdir()) == names
    real_forward = unet3d.UNet3D.forward
    calls = {"n": 0}

    def nan_on_third_step(self, x, t, context):
        calls["n"] += 1
        out = real_forward(self, x, t, context)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(unet3d.UNet3D, "forward", nan_on_third_step)
    with pytest.raises(SystemExit, match="non-finite loss at step 3"):
        train.main(_cfg(root, model, tmp_path / "nan", steps=6, ckpt_every=1, log_every=5))
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["trained"].values())


@pytest.mark.slow
def test_grad_accumulation_and_jester_selection(world, tmp_path):
    """--grad-accum runs and trains (a smoke check: micro-batches draw their own timesteps and noise, so it is not
    bit-equal to one larger batch); --jester-* picks clips by class name and rejects a near-miss name."""
    from PIL import Image

    root, model = world
    jester = tmp_path / "jester"
    rows = []
    for vid, cls in [(1, "Drumming Fingers"), (2, "No gesture"), (3, "Drumming Fingers"), (4, "Doing other things")]:
        (jester / str(vid)).mkdir(parents=True)
        for i, frame in enumerate(_moving_square(vid)):
            Image.fromarray(frame).save(jester / str(vid) / f"{i + 1:05d}.jpg")
        rows.append(f"{vid};{cls}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    kw = dict(videos=str(jester), jester_csv=str(tmp_path / "train.csv"), jester_class="Drumming Fingers",
              prior="none", steps=1, weight_decay=0.0)
    one = weights.read_state_dict(train.main(dataclasses.replace(_cfg(root, model, tmp_path / "b2", batch_size=2), **kw)))
    two = weights.read_state_dict(train.main(dataclasses.replace(_cfg(root, model, tmp_path / "a2", batch_size=1,
                                                                      grad_accum=2), **kw)))
    base = load_models(model).unet.state_dict()
    for d in (one, two):
        assert any(not torch.equal(v, base[k[5:]]) for k, v in d.items())
    log = (tmp_path / "b2" / "log.jsonl").read_text()
    assert json.loads(log.splitlines()[-1])["loss_reg"] == 0.0  # prior none: no regularization term
    with pytest.raises(SystemExit, match="did you mean 'Drumming Fingers'"):
        train.main(dataclasses.replace(_cfg(root, model, tmp_path / "bad"), **{**kw, "jester_class": "Drumming fingers"}))


@pytest.mark.slow
def test_cli_stopping_rule_with_a_clip_model(world, tmp_path, capfd):
    """--stop-clip wires evaluate.py's appearance score into validation; a threshold of 1.0 is met at once. (train.py's
    command line, run in this process: the wiring is in its `__main__` block, which inprocess.run_script runs.)"""
    from test_evaluate import TINY_CLIP

    root, model = world
    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    args = ["--model", str(model), "--videos", str(root / "videos"), "--prior", "none", "--frames", "4", "--size",
            "32", "--steps", "5", "--precision", "fp32", "--log-every", "1", "--val-every", "1", "--val-steps", "2",
            "--stop-clip", str(tmp_path / "clip.json"), "--stop-score", "1.0", "--out", str(tmp_path / "run")]
    run = run_script(capfd, "train.py", *args)
    assert run.returncode == 0, run.stderr
    assert "validation score reached 1.0: stopping" in run.stdout
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["step"] == 1
    bad = run_script(capfd, "train.py", *args[:-2], "--val-every", "0", "--out", str(tmp_path / "run2"))
    assert bad.returncode != 0 and "--stop-clip needs --val-every" in bad.stderr


SCRIPTS = ["train.py", "sample.py", "evaluate.py", "delta.py", "models.py", "data.py", "benchmarks/bench.py",
           "toy/demo.py", "toy/train_base.py", "toy/train_dit.py", "toy/ablate.py", "toy/probe.py"]


@pytest.fixture(scope="module")
def help_outputs():
    """`python script --help` of every script, run in one new interpreter (inprocess.run_scripts_in_one_process: each
    script on its own sys.path, the repository's modules imported afresh; torch imported once, not eight times)."""
    return dict(zip(SCRIPTS, run_scripts_in_one_process([(script, "--help") for script in SCRIPTS])))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_line_help_works(script, help_outputs):
    """`--help` of each script prints its usage (argparse %-formats help texts: a bare % breaks it)."""
    r = help_outputs[script]
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


# ------------------------------------------------------------------------------------ fidelity to the official run


def test_defaults_are_the_official_run():
    """The official run's settings, as read from adobe-research/custom_motion (method.md §2, §5.1, §6.8)."""
    c = train.Config()
    assert (c.size, c.resize, c.fps, c.window, c.frames, c.dropout) == (384, "bucket", 24.0, "random", 16, 0.0)
    assert (c.val_solver, c.val_steps, c.val_guidance) == ("dpmpp-2m", 25, 9.0)
    assert c.caption == "a person doing a {token} sign"  # the paper's Jester captions
    assert (c.lr, c.weight_decay, c.grad_clip, c.steps, c.batch_size, c.reg_weight, c.seed) == (
        5e-6, 0.01, 1.0, 3000, 1, 0.5, 64)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_customization_runs_without_dropout_by_default(world, tmp_path, monkeypatch, dropout):
    """In the training loop (train mode), a second forward pass of the same input gives the same output unless
    --dropout is set: the official fine-tuning has no dropout although the released config pretrained with 0.1."""
    root, model = world
    real_forward, seen = unet3d.UNet3D.forward, []

    def twice(self, x, t, context):
        with torch.no_grad():
            seen.append((self.training, torch.equal(real_forward(self, x, t, context), real_forward(self, x, t, context))))
        return real_forward(self, x, t, context)

    monkeypatch.setattr(unet3d.UNet3D, "forward", twice)
    train.main(_cfg(root, model, tmp_path / "run", steps=1, dropout=dropout))
    assert seen == [(True, dropout == 0.0)]


def test_windows_are_contiguous_varied_and_a_pure_function_of_the_position():
    """A 40-frame clip, 16-frame windows: over 200 micro-batches the windows start at many offsets, each is 16
    consecutive cached frames, and the draw depends only on (seed, micro-batch, clip)."""
    L, F = 40, 16
    frames = torch.arange(L, dtype=torch.float32).view(L, 1, 1, 1).expand(L, 4, 2, 3)  # cached frame j holds j
    s = {"mean": [frames.clone(), frames.clone()], "std": [torch.zeros(L, 4, 2, 3)] * 2,
         "context": torch.zeros(2, 77, 8)}
    starts = []
    for b in range(200):
        x0, ctx = latents.batch_latents([("instance", s, 0), ("instance", s, 1)], b, 3, F, True, torch.Generator(),
                                        "cpu")
        assert x0.shape == (2, 4, F, 2, 3) and ctx.shape == (2, 77, 8)
        for clip in x0[:, 0, :, 0, 0]:  # (F,) frame numbers of one window
            assert torch.equal(clip - clip[0], torch.arange(F, dtype=torch.float32))  # contiguous
            starts.append(int(clip[0]))
    assert min(starts) == 0 and max(starts) == L - F and len(set(starts)) == L - F + 1  # every start, 0 .. 24
    assert starts[0::2] != starts[1::2]  # two clips in one batch draw their own windows
    again = [latents.window_start(3, "instance", b, c, L, F) for b in range(200) for c in (0, 1)]
    assert again == starts  # pure: the same (seed, micro-batch, clip) gives the same window
    assert again != [latents.window_start(4, "instance", b, c, L, F) for b in range(200) for c in (0, 1)]
    first = latents.batch_latents([("reg", s, 0)], 7, 3, F, False, torch.Generator(), "cpu")  # --window first
    assert first[0][0, 0, :, 0, 0].tolist() == list(range(F))


def test_landscape_clip_trains_at_its_bucket_and_mixed_buckets_give_the_same_loss(world, tmp_path, monkeypatch):
    """A 176x100 (Jester-shaped) instance clip is cached at its aspect bucket, uncropped; next to a square reg clip it
    runs in its own UNet call, and the two calls add up to L = MSE_inst + 0.5 MSE_reg exactly as one clip at a time."""
    root, model = world
    (tmp_path / "wide").mkdir()
    wide = np.stack([np.kron(f, np.ones((4, 6, 1), np.uint8))[:100, :176] for f in _moving_square(3, n=8, size=32)])
    _write_mp4(tmp_path / "wide" / "jester.mp4", wide)
    shapes = []
    real_forward = unet3d.UNet3D.forward

    def spy(self, x, t, context):
        shapes.append(tuple(x.shape))
        return real_forward(self, x, t, context)

    monkeypatch.setattr(unet3d.UNet3D, "forward", spy)
    cache = tmp_path / "cache"
    train.main(_cfg(root, model, tmp_path / "run", videos=str(tmp_path / "wide"), steps=1, cache=str(cache)))
    spec = __import__("data").ClipSpec(size=32, multiple=4)
    h, w = spec.out_size(100, 176)
    assert (h, w) == (24, 44) and abs(h * w / 32 ** 2 - 1) <= 0.1  # landscape, ~32^2 pixels, both sides / 4
    latent_shapes = {tuple(weights.read_state_dict(p)["mean"].shape) for p in cache.glob("*.safetensors")}
    assert (8, 4, h // 2, w // 2) in latent_shapes and (8, 4, 16, 16) in latent_shapes  # every frame, uncropped
    assert shapes == [(1, 4, 4, h // 2, w // 2), (1, 4, 4, 16, 16)]  # one UNet call per bucket

    # the loss of the two calls (newmove_loss per group, weights 1 and 0.5) = computing each clip on its own
    unet = load_models(model).unet
    unet.requires_grad_(False)
    kv = [p for n, p in unet.named_parameters() if train.param_group(n) == "spatial_kv"]
    for p in kv:
        p.requires_grad_(True)
    abar, probs = torch.linspace(0.99, 0.01, 1000), train.timestep_probs("coarse", 0.5)
    xa, xb, ctx = torch.randn(1, 4, 4, 12, 22), torch.randn(1, 4, 4, 16, 16), torch.randn(2, 77, 64)
    w = train.loss_weights(1, 1, 0.5)
    g = torch.Generator().manual_seed(0)
    la, _, _ = train.newmove_loss(unet, xa, ctx[:1], w[:1], probs, abar, g)
    lb, _, _ = train.newmove_loss(unet, xb, ctx[1:], w[1:], probs, abar, g)
    grouped = torch.autograd.grad(la + lb, kv)
    g = torch.Generator().manual_seed(0)  # the same draws, in the same order, one clip at a time by hand
    mse = []
    for x, c in ((xa, ctx[:1]), (xb, ctx[1:])):
        t = torch.multinomial(probs, 1, replacement=True, generator=g)
        eps = torch.randn(x.shape, generator=g)
        mse.append((unet(train.diffuse(x, eps, t, abar), t, c) - eps).pow(2).mean())
    separate = mse[0] + 0.5 * mse[1]
    assert torch.allclose(la + lb, separate, rtol=1e-6, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grouped, torch.autograd.grad(separate, kv)))


@pytest.mark.slow
def test_validation_uses_the_official_sampler(world, tmp_path, monkeypatch):
    root, model = world
    calls = []
    real = sample.generate

    def spy(*a, **k):
        calls.append({key: k[key] for key in ("solver", "guidance", "steps", "height", "width")})
        return real(*a, **k)

    monkeypatch.setattr(sample, "generate", spy)
    train.main(_cfg(root, model, tmp_path / "run", steps=1, val_every=1, val_steps=2))
    # the token check's base-weights validation before training, then step 1's (each with and without the token)
    assert calls == [dict(solver="dpmpp-2m", guidance=9.0, steps=2, height=32, width=32)] * 2


def _token_checks(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "token_effect" in r]


@pytest.mark.slow
def test_token_check_flags_a_delta_of_zeros(world, tmp_path, monkeypatch, capsys):
    """Weights that never change give bit-identical videos with and without the token to the base weights', so the
    effect equals the base effect and the run is flagged, in the log and on stdout."""
    root, model = world
    monkeypatch.setattr(train, "optimizer_step", lambda optimizer, *a: optimizer.zero_grad() or torch.zeros(()))
    train.main(_cfg(root, model, tmp_path / "run", steps=1, val_every=1, val_steps=2))
    [rec] = _token_checks(tmp_path / "run")
    assert rec["step"] == 1 and rec["token_effect"] == rec["token_effect_base"] > 0 and rec["token_no_effect_yet"]
    assert "step 1: token effect" in capsys.readouterr().out.split("warning: the token has no effect yet")[0]


@pytest.mark.slow
def test_token_check_logs_a_changed_effect(world, tmp_path, capsys):
    """A high learning rate changes the weights a lot in one step: the token's effect is logged and differs from the
    base weights', which a resumed run measures again before loading the checkpoint. --no-val-token-check samples
    only the prompts with the token and logs no check."""
    root, model = world
    cfg = _cfg(root, model, tmp_path / "run", steps=1, lr=3e-2, val_every=1, val_steps=2)
    train.main(cfg)
    [rec] = _token_checks(tmp_path / "run")
    assert rec["step"] == 1 and abs(rec["token_effect"] - rec["token_effect_base"]) > 1e-3
    assert f"step 1: token effect {rec['token_effect']:.4f}, base weights" in capsys.readouterr().out
    train.main(dataclasses.replace(cfg, steps=2, resume=True))
    assert [r["token_effect_base"] for r in _token_checks(tmp_path / "run")] == [rec["token_effect_base"]] * 2
    capsys.readouterr()
    train.main(_cfg(root, model, tmp_path / "off", steps=1, val_every=1, val_steps=2, val_token_check=False))
    assert not _token_checks(tmp_path / "off") and "token effect" not in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "off" / "val").iterdir()] == ["step000001"]
    with pytest.raises(SystemExit, match="--val-token-check deletes"):
        train.main(_cfg(root, model, tmp_path / "x", val_every=1, val_prompts="a square moving"))


@pytest.mark.slow
def test_the_design_cards_command_runs_on_the_toy_model(tmp_path, capfd):
    """`python train.py --videos dir/ --token pll` with no --model: the toy model with the toy world's settings and
    a toy regularization set, to completion (steps shortened here). The command line runs in this process."""
    from toy import world

    clips = world.make_dataset(4, ["moving in a circle"], seed=5)
    world.write_folder(clips, tmp_path / "clips")
    for f in (tmp_path / "clips").glob("*.txt"):
        f.unlink()  # no captions of their own: the paper's template
    run = run_script(capfd, "train.py", "--videos", tmp_path / "clips", "--token", "pll", "--steps", "2", "--out",
                     tmp_path / "run")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "no --model: the CPU toy model" in run.stdout and "24 base-motion clips" in run.stdout
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["frames"], cfg["size"], cfg["lr"], cfg["steps"]) == (8, 32, 6e-4, 2)  # toy settings; --steps as given
    assert len(list((tmp_path / "run" / "toy-reg").glob("*.mp4"))) == train.TOY_REG_CLIPS
    assert (tmp_path / "run" / "delta.safetensors").is_file()


def test_a_real_model_without_regularization_stops_before_loading(world, tmp_path, capfd):
    root, model = world
    run = run_script(capfd, "train.py", "--model", model, "--videos", root / "videos", "--token", "pll", "--out",
                     tmp_path / "run")  # the command line, in this process
    assert run.returncode != 0 and "Traceback" not in run.stderr
    for choice in ("--reg-videos", "--prior synthetic", "--prior none", "70.6%"):
        assert choice in run.stderr
    assert not (tmp_path / "run").exists()  # nothing encoded, nothing written


# ----------------------------------------------------------------------------------------- a motion and a subject


@pytest.fixture(scope="module")
def subject(world):
    """A subject's examples: two still images (captioned by --subject-caption) and a video with a sidecar caption."""
    from PIL import Image

    root, _ = world
    folder = root / "subject"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(_moving_square(20 + i)[0]).save(folder / f"photo{i}.png")
    _write_mp4(folder / "clip.mp4", _moving_square(22))
    (folder / "clip.txt").write_text("a sks square moving right\n")
    return folder


def _spy_batches(monkeypatch):
    """Record, per micro-batch, the (set name, token ids) of every clip train.py puts in it."""
    seen, real = [], latents.batch_latents

    def spy(clips, *a, **k):
        seen.append([(name, s["tokens"][i].tolist()) for name, s, i in clips])
        return real(clips, *a, **k)

    monkeypatch.setattr(latents, "batch_latents", spy)
    return seen


@pytest.mark.slow
def test_motion_and_subject_in_one_run_both_tokens_trained(world, subject, tmp_path, monkeypatch):
    root, model = world
    seen = _spy_batches(monkeypatch)
    kw = dict(subject_videos=str(subject), subject_class="square", frames=2, batch_size=1, cache=str(tmp_path / "c"),
              subject_trains="all")  # every clip trains every weight: one UNet batch for all (not the joint recipe)
    full = train.main(_cfg(root, model, tmp_path / "full", steps=3, **kw))
    tok = load_models(model).tokenizer
    pll, sks = tok.encode("pll")[0], tok.encode("sks")[0]
    first = seen[0]  # one UNet batch: a motion and a subject clip (both instance data), then a regularization clip
    assert [name for name, _ in first] == ["instance", "subject", "reg"]
    assert all(pll in ids and sks not in ids for name, ids in first if name == "instance")
    assert all(sks in ids and pll not in ids for name, ids in first if name == "subject")
    # the stills were captioned by the template ("a sks square"), the video by its sidecar
    assert len({tuple(ids) for name, ids in sum(seen, []) if name == "subject"}) == 2
    with safe_open(str(full), "pt") as f:
        assert f.metadata()["subject_token"] == "sks"
    # (exact resume of a run with both sets, killed mid-run: test_exact_resume_after_sigkill)


def test_the_joint_recipe_is_the_default_only_with_both_sets():
    """--videos with --subject-videos: the options not typed take JOINT_SETTINGS (a typed one is kept; --subject-trains
    all keeps every default); a motion-only or subject-only run keeps every default; resolving twice (the command line,
    then train.main) changes nothing more."""
    from config import JOINT_SETTINGS, check_config

    base = ["--model", "m", "--reg-videos", "r", "--subject-class", "dog"]
    plain = {"train_subject_token": False, "still_frames": "static", "subject_trains": "all",
             "subject_timesteps": "same"}

    def resolved(*args):
        cfg = train.parse_args([*base, *args])
        before = dataclasses.asdict(cfg)
        check_config(cfg)  # as train.main does again
        assert dataclasses.asdict(cfg) == before
        return {k: getattr(cfg, k) for k in plain}

    assert resolved("--videos", "v", "--subject-videos", "s") == JOINT_SETTINGS
    assert JOINT_SETTINGS["subject_trains"] in ("appearance", "word") and JOINT_SETTINGS != plain
    from toy.joint import ROWS  # the default is the recipe measured under its name in toy/joint.md
    assert ROWS["split-word"][2] == JOINT_SETTINGS
    assert resolved("--videos", "v", "--subject-videos", "s", "--still-frames", "static") == \
        {**JOINT_SETTINGS, "still_frames": "static"}
    assert resolved("--videos", "v", "--subject-videos", "s", "--subject-trains", "all") == plain
    assert resolved("--videos", "v") == plain
    assert resolved("--subject-videos", "s") == plain


@pytest.mark.slow
def test_still_images_as_one_frame_clips_and_a_learned_subject_word(world, subject, tmp_path, monkeypatch):
    """--still-frames 1: each still is a clip of one frame, in a UNet call of its own (F = 1) next to the call of the
    other clips; --train-subject-token: the subject word's embedding row trains and the delta carries it."""
    root, model = world
    calls, real = [], latents.batch_latents

    def spy(clips, *a, **k):
        x0, ctx = real(clips, *a, **k)
        calls.append(([name for name, _, _ in clips], [s["mean"][i].shape[0] for _, s, i in clips], x0.shape[2]))
        return x0, ctx

    monkeypatch.setattr(latents, "batch_latents", spy)
    delta = train.main(_cfg(root, model, tmp_path / "one", subject_videos=str(subject), subject_class="square",
                            frames=2, batch_size=3, steps=2, still_frames="1", train_subject_token=True,
                            subject_trains="all"))  # (the joint recipe would also split the subject's video off)
    # per step: the motion clips, the subject's video and the reg clips in one call (2 frames), its stills in another
    assert len(calls) == 4 and sorted(f for _, _, f in calls) == [1, 1, 2, 2]
    assert all(names == ["subject"] * len(names) and set(lengths) == {1} for names, lengths, f in calls if f == 1)
    assert all(names.count("subject") == 1 for names, _, f in calls if f == 2)  # the video (3 subject clips a step)
    tensors = weights.read_state_dict(delta)
    with safe_open(str(delta), "pt") as f:
        assert json.loads(f.metadata()["placeholder_words"]) == ["sks"]
    base = load_models(model)
    start = base.text_encoder.token_embedding.weight[base.tokenizer.encode("sks")[0]]
    row = tensors["text_encoder.placeholder_embeddings"]
    assert row.shape == (1, start.shape[0]) and not torch.equal(row[0], start)  # it trained, from the word's own row
    with pytest.raises(SystemExit, match="--train-subject-token .* give --subject-videos"):
        train.main(_cfg(root, model, tmp_path / "bad", train_subject_token=True))


@pytest.mark.slow
def test_subject_only_run_trains_the_subject_set_only(world, subject, tmp_path, monkeypatch):
    root, model = world
    seen = _spy_batches(monkeypatch)
    train.main(_cfg(root, model, tmp_path / "s", videos="", subject_videos=str(subject), subject_class="square",
                    frames=2, steps=2))
    assert [name for name, _ in seen[0]] == ["subject", "reg"] and len(seen) == 2
    # bad subject input: one line naming the option
    stills = tmp_path / "stills"
    stills.mkdir()
    (stills / "a.png").write_bytes((subject / "photo0.png").read_bytes())
    for kw, msg in [(dict(subject_class=""), "give --subject-class"), (dict(subject_token="pll"), "--subject-token"),
                    (dict(subject_videos=str(stills), subject_caption="a square"), "no caption holds the --subject"),
                    (dict(subject_videos=str(tmp_path / "none")), "none: not a directory"),
                    (dict(videos="", preset="custom-diffusion"), "a subject-only run")]:
        cfg = _cfg(root, model, tmp_path / "bad", subject_videos=str(subject), subject_class="square", frames=2)
        with pytest.raises(SystemExit, match=msg):
            train.main(dataclasses.replace(cfg, **kw))


# --------------------------------------------------------------------------------------------------- memory options


def _same(a, b):
    a, b = weights.read_state_dict(a), weights.read_state_dict(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_free_grads_gives_the_usual_weights_bit_for_bit(world, tmp_path):
    """--free-grads (each tensor's AdamW step inside backward, its gradient freed there) vs the usual step with clipping
    off: a step with --grad-accum 2 (the first micro-batch's backward only accumulates) taken inside backward, then
    resumed from its checkpoint with the usual step, is the usual run: the same weights bit for bit and the same logged
    losses and grad norms. Combinations that need every gradient before the step are refused."""
    root, model = world
    kw = dict(frames=2, steps=2, grad_clip=0.0, grad_accum=2, ckpt_every=1, cache=str(tmp_path / "c"))
    plain = train.main(_cfg(root, model, tmp_path / "plain", **kw))
    train.main(_cfg(root, model, tmp_path / "free", free_grads=True, **{**kw, "steps": 1}))  # step 1 inside backward
    free = train.main(_cfg(root, model, tmp_path / "free", resume=True, **kw))  # step 2 by the usual step
    assert _same(plain, free)
    logs = [[(r["loss"], r["grad_norm"]) for r in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())]
            for d in ("plain", "free")]
    assert logs[0] == logs[1] and len(logs[0]) == 2
    for bad, msg in [(dict(grad_clip=1.0), "--free-grads cannot clip.*--grad-clip 0"),
                     (dict(precision="fp16"), "--free-grads does not work with --precision fp16")]:
        with pytest.raises(SystemExit, match=msg):
            train.main(_cfg(root, model, tmp_path / "bad", **{**kw, "free_grads": True, **bad}))


@pytest.mark.slow
def test_adamw8bit_resumes_bit_for_bit(world, tmp_path):
    """--optimizer adamw8bit (bitsandbytes): its uint8 state goes through the weights-only checkpoint, and a run stopped
    after 1 step and resumed to 2 equals the uninterrupted run bit for bit; the optimizer cannot change on resume."""
    pytest.importorskip("bitsandbytes", reason="--optimizer adamw8bit needs bitsandbytes (requirements-test.txt)")
    root, model = world
    kw = dict(frames=2, optimizer="adamw8bit", cache=str(tmp_path / "c"))
    full = train.main(_cfg(root, model, tmp_path / "full", steps=2, **kw))
    state = torch.load(tmp_path / "full" / "state.pt", weights_only=True)
    quant = [s["__bnb_optimizer_quant_state__"] for s in state["optimizer"]["state"].values()]
    trained = state["trained"]
    assert len(quant) == len(trained)  # one state per trained tensor, m and v each as many values as the tensor
    assert sorted(q["state1"].numel() for q in quant) == sorted(v.numel() for v in trained.values())
    for q in quant:  # m and v held as 8-bit codes from 4096 values on (bitsandbytes' min_8bit_size), fp32 below
        want = torch.uint8 if q["state1"].numel() >= 4096 else torch.float32
        assert q["state1"].dtype == q["state2"].dtype == want and q["state1"].shape == q["state2"].shape
    assert any(q["state1"].dtype == torch.uint8 for q in quant)
    train.main(_cfg(root, model, tmp_path / "resumed", steps=1, **kw))
    assert _same(full, train.main(_cfg(root, model, tmp_path / "resumed", steps=2, resume=True, **kw)))
    with pytest.raises(SystemExit, match="--optimizer"):  # the optimizer decides what trains: no change on resume
        train.main(_cfg(root, model, tmp_path / "resumed", steps=4, resume=True, **{**kw, "optimizer": "adamw"}))


# --------------------------------------------------------------------------------------------------- the loop's method


def _record_newmove_loss(monkeypatch):
    """Record every newmove_loss call the loop makes: its weights w, the drawn t, and the generator state before it."""
    calls, real = [], train.newmove_loss

    def wrapped(model, x0, ctx, w, probs, abar, g, amp=None):
        state = g.get_state()
        loss, mse, t = real(model, x0, ctx, w, probs, abar, g, amp)
        calls.append(dict(x0=x0.detach().clone(), ctx=ctx.detach().clone(), w=w.detach().clone(), t=t.clone(),
                          probs=probs, abar=abar, state=state))
        return loss, mse, t

    monkeypatch.setattr(train, "newmove_loss", wrapped)
    return calls


def _cheap_forward(monkeypatch):
    """A UNet forward that costs nothing but still depends on a trained tensor (backward and the step run)."""
    def forward(self, x, t, context):
        return x + 0 * next(p for p in self.parameters() if p.requires_grad).sum()

    monkeypatch.setattr(unet3d.UNet3D, "forward", forward)


def test_timesteps_option_reaches_the_loop(world, tmp_path, monkeypatch):
    """The t the loop actually draws follow --timesteps: 800 draws per mode (4 steps x (100 instance + 100 reg)), whose
    mean lies within 4 standard errors of that mode's mean (coarse 600.9, uniform 499.5, fine 398.2). The 4-SE band is
    < 42 while neighbouring modes' means are 101 apart, so drawing another mode's t fails by > 5.7 SE. (The UNet is
    replaced by a free stand-in: only the draws matter here.)"""
    root, model = world
    _cheap_forward(monkeypatch)
    calls = _record_newmove_loss(monkeypatch)
    T = torch.arange(1000, dtype=torch.float64)
    means = {}
    for mode in ("coarse", "uniform", "fine"):
        calls.clear()
        train.main(_cfg(root, model, tmp_path / mode, timesteps=mode, steps=4, batch_size=100, frames=1,
                        cache=str(tmp_path / "c")))
        t = torch.cat([c["t"] for c in calls]).double()
        assert t.numel() == 800
        p = train.timestep_probs(mode, 0.5)
        mu, sd = (p * T).sum().item(), ((p * T ** 2).sum() - (p * T).sum() ** 2).sqrt().item()
        band = 4 * sd / t.numel() ** 0.5
        assert band < 42
        means[mode] = t.mean().item()
        assert abs(means[mode] - mu) < band, (mode, means[mode], mu, band)
    assert means["fine"] < means["uniform"] < means["coarse"]


def test_subject_clips_are_weighted_as_instance_data(world, subject, tmp_path, monkeypatch):
    """Motion + subject: the loop's w gives each motion and each subject clip 1 / (their number), the instance mean
    over both sets, and each reg clip lambda / (reg clips), not the subject clips the reg weight; the same whether all
    clips share one UNet call (--subject-trains all) or the subject's run in a call of their own (the joint recipe)."""
    root, model = world
    _cheap_forward(monkeypatch)
    seen = _spy_batches(monkeypatch)
    calls = _record_newmove_loss(monkeypatch)
    for mode, n_calls in (("all", 1), ("auto", 2)):
        seen.clear()
        calls.clear()
        train.main(_cfg(root, model, tmp_path / mode, subject_videos=str(subject), subject_class="square", frames=2,
                        steps=1, reg_ratio=2, reg_weight=0.5, subject_trains=mode))
        assert len(seen) == len(calls) == n_calls
        by = {}
        for batch, call in zip(seen, calls):
            for (name, _), w in zip(batch, call["w"].tolist()):
                by.setdefault(name, []).append(w)
        assert by == {"instance": [0.5], "subject": [0.5], "reg": [0.25, 0.25]}, mode


def test_subject_timesteps_draws_the_subject_clips_from_their_own_p_t(world, subject, tmp_path, monkeypatch):
    """--subject-timesteps fine next to --timesteps coarse: the subject clips' drawn t follow fine (mean 398.2) and the
    motion and reg clips' coarse (600.9), each within 4 standard errors (400 subject draws: band < 60; the means are
    203 apart); with --subject-timesteps same, the subject clips' t follow coarse."""
    root, model = world
    _cheap_forward(monkeypatch)
    seen = _spy_batches(monkeypatch)
    calls = _record_newmove_loss(monkeypatch)
    T = torch.arange(1000, dtype=torch.float64)
    for mode, want in (("fine", {"subject": "fine", "other": "coarse"}), ("same", {"subject": "coarse"})):
        seen.clear()
        calls.clear()
        train.main(_cfg(root, model, tmp_path / mode, subject_videos=str(subject), subject_class="square", frames=1,
                        steps=4, batch_size=100, subject_timesteps=mode, cache=str(tmp_path / "c")))
        names = [n for batch in seen for n, _ in batch]
        t = torch.cat([c["t"] for c in calls]).double()
        assert len(names) == t.numel() == 4 * 300
        for which, density in want.items():
            x = t[torch.tensor([(n == "subject") == (which == "subject") for n in names])]
            p = train.timestep_probs(density, 0.5)
            mu, sd = (p * T).sum().item(), ((p * T ** 2).sum() - (p * T).sum() ** 2).sqrt().item()
            band = 4 * sd / x.numel() ** 0.5
            assert band < 60 and abs(x.mean().item() - mu) < band, (mode, which, x.mean().item(), mu, band)


def _grads_per_unet_call(monkeypatch):
    """Record, per UNet call of the loop, the sets of its clips and the names of the trained tensors whose gradient
    that call's backward changed (from snapshots of every gradient before each call and before the optimizer step)."""
    trained, snaps, real_mt, real_batch, real_step = {}, [], train.make_trainable, latents.batch_latents, \
        train.optimizer_step

    def snapshot(names):
        snaps.append((names, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in trained.items()}))

    def make_trainable(*a, **k):
        out = real_mt(*a, **k)
        trained.update(out[1])
        return out

    def batch(clips, *a, **k):
        snapshot({name for name, _, _ in clips})
        return real_batch(clips, *a, **k)

    def step(*a, **k):
        snapshot(None)
        return real_step(*a, **k)

    monkeypatch.setattr(train, "make_trainable", make_trainable)
    monkeypatch.setattr(latents, "batch_latents", batch)
    monkeypatch.setattr(train, "optimizer_step", step)

    def calls():
        return [(names, {n for n in a if not torch.equal(a[n], b[n])}) for (names, a), (_, b) in zip(snaps, snaps[1:])
                if names is not None]
    return calls


@pytest.mark.slow
def test_subject_trains_appearance_keeps_the_subject_clips_gradient_off_the_temporal_layers(world, tmp_path,
                                                                                              monkeypatch):
    """--subject-trains appearance: the subject's clips run in UNet calls of their own, first, whose backward reaches
    only the spatial cross-attention K/V and the learned subject row (word: only the row); the motion and reg clips'
    call reaches the temporal layers too. With --subject-trains all the same subject clips' call changes temporal gradients as well
    (so the check can fail)."""
    from PIL import Image

    root, model = world
    stills = tmp_path / "stills"  # stills only, as one-frame clips: a subject-only UNet call in either mode
    stills.mkdir()
    for i in range(2):
        Image.fromarray(_moving_square(30 + i)[0]).save(stills / f"{i}.png")
    kw = dict(subject_videos=str(stills), subject_class="square", frames=2, steps=1, still_frames="1",
              train_subject_token=True, cache=str(tmp_path / "c"))
    for mode in ("appearance", "word", "all"):
        calls = _grads_per_unet_call(monkeypatch)
        train.main(_cfg(root, model, tmp_path / mode, subject_trains=mode, **kw))
        found = dict((frozenset(names), changed) for names, changed in calls())
        assert found.keys() == {frozenset({"subject"}), frozenset({"instance", "reg"})}
        reached, others = found[frozenset({"subject"})], found[frozenset({"instance", "reg"})]
        groups = {train.param_group(n) if n.startswith(("down_", "up_", "mid_", "transformer_in", "conv_"))
                  else n for n in reached}
        if mode in ("appearance", "word"):
            want = {"text_encoder.placeholder_embeddings"} | ({"spatial_kv"} if mode == "appearance" else set())
            assert groups == want, (mode, groups)
            assert calls()[0][0] == {"subject"}  # first: the last backward of a step (DDP's all-reduce) trains all
        else:
            assert "temporal" in groups, groups
        assert any(train.param_group(n) == "temporal" for n in others)


@pytest.mark.slow
def test_two_set_run_with_the_joint_options_resumes_bit_for_bit(world, subject, tmp_path):
    """2 steps straight equal 1 step, a checkpoint, and 1 resumed step, with both example sets, the learned subject
    word, one-frame stills, the subject's own p(t) and appearance-only subject gradients."""
    root, model = world
    kw = dict(subject_videos=str(subject), subject_class="square", frames=2, still_frames="1",
              train_subject_token=True, subject_timesteps="fine", subject_trains="appearance",
              cache=str(tmp_path / "c"))
    full = weights.read_state_dict(train.main(_cfg(root, model, tmp_path / "full", steps=2, **kw)))
    train.main(_cfg(root, model, tmp_path / "resumed", steps=1, **kw))
    resumed = weights.read_state_dict(train.main(_cfg(root, model, tmp_path / "resumed", steps=2, resume=True, **kw)))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert "text_encoder.placeholder_embeddings" in full  # the subject word's row trained and resumed too


@pytest.mark.slow
def test_subject_options_leave_a_motion_only_run_unchanged(world, tmp_path):
    """The subject set's options do nothing without --subject-videos: a motion-only run with them is bit for bit the
    plain one."""
    root, model = world
    kw = dict(steps=2, frames=2, cache=str(tmp_path / "c"))
    plain = weights.read_state_dict(train.main(_cfg(root, model, tmp_path / "plain", **kw)))
    other = weights.read_state_dict(train.main(_cfg(root, model, tmp_path / "other", subject_timesteps="fine",
                                                    subject_trains="appearance", **kw)))
    assert plain.keys() == other.keys() and all(torch.equal(plain[k], other[k]) for k in plain)


def test_grad_accum_gradient_is_the_large_batch_gradient_of_the_same_data(world, tmp_path, monkeypatch):
    """--grad-accum 3 with batch 1 accumulates, before the optimizer step, the gradient of ONE batch of the same 3
    instance + 3 reg clips (same windows, t and noise) weighted as batch 3: 1/3 per instance clip, lambda/3 per reg
    clip, i.e. each micro-batch's loss divided by 3. Runs with --grad-accum 3 and --batch-size 3 are not comparable
    weight for weight: each micro-batch has its own generator (seed, step, micro) and its own clip positions, so the
    draws differ by design; the comparison is on the gradient, replaying the accumulated run's data in one batch."""
    root, model = world
    seen = _spy_batches(monkeypatch)
    calls = _record_newmove_loss(monkeypatch)
    grads, real_step = [], train.optimizer_step

    def spy(optimizer, scaler, params, clip):
        grads.append([p.grad.detach().clone() for p in params])
        return real_step(optimizer, scaler, params, clip)

    monkeypatch.setattr(train, "optimizer_step", spy)
    cfg = _cfg(root, model, tmp_path / "acc", steps=1, batch_size=1, grad_accum=3, frames=2, reg_weight=0.5)
    train.main(cfg)
    assert len(calls) == 3 and len(grads) == 1 and [n for n, _ in sum(seen, [])] == ["instance", "reg"] * 3
    # one batch of the 6 clips: each micro-batch's t and noise replayed from its generator state
    x0 = torch.cat([c["x0"] for c in calls])
    ctx = torch.cat([c["ctx"] for c in calls])
    t, eps = [], []
    for c in calls:
        g = torch.Generator().set_state(c["state"])
        t.append(torch.multinomial(c["probs"], c["x0"].shape[0], replacement=True, generator=g))
        eps.append(torch.randn(c["x0"].shape, generator=g))
        assert torch.equal(t[-1], c["t"])
    t, eps = torch.cat(t), torch.cat(eps)
    w = torch.tensor([1 / 3 if n == "instance" else 0.5 / 3 for n, _ in sum(seen, [])])
    m = load_models(model)
    _, trainable, _ = train.make_trainable(cfg, m.unet, m.text_encoder, m.tokenizer, False)
    params = [p for _, p in trainable]
    loss, _ = train.weighted_mse(m.unet(train.diffuse(x0, eps, t, calls[0]["abar"]), t, ctx), eps, w)
    ref = torch.autograd.grad(loss, params)
    assert len(ref) == len(grads[0])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads[0], ref))
    assert any(b.abs().max() > 1e-6 for b in ref)


# -----------------------------------------------------------------------------------------------------------------------
# the DiT family (--denoiser dit): the same run with Wan's denoiser and the flow-matching objective


def test_flow_loss_draws_like_the_eps_loss_and_regresses_the_velocity():
    """flow_loss: grid steps from p(k) as newmove_loss draws t, noise level shift((k+1)/T) rising with k, the net
    called at t = 1000 s on x_s = (1 - s) x0 + s n, and sum_i w_i MSE(v_hat_i, n_i - x0_i)."""
    import flow

    seen = {}

    def net(x, t, ctx):  # a fixed, input-dependent "velocity"
        seen["x"], seen["t"] = x, t
        return torch.tanh(x) + ctx.mean() + t.view(-1, 1, 1, 1, 1) / 1000

    x0 = torch.randn(3, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    ctx, w = torch.randn(3, 5, 6), torch.tensor([0.5, 0.25, 0.25])
    probs = train.timestep_probs("coarse", 0.5)
    loss, per_clip, k = train.flow_loss(net, x0, ctx, w, probs, 3.0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same generator stream: k, then the noise
    k_ref = torch.multinomial(probs, 3, replacement=True, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    s = 3.0 * (k_ref.double() + 1) / 1000 / (1 + 2.0 * (k_ref.double() + 1) / 1000)
    assert torch.equal(k, k_ref) and torch.allclose(seen["t"].double(), s * 1000, atol=1e-3)
    x_s = (1 - s.float().view(-1, 1, 1, 1, 1)) * x0 + s.float().view(-1, 1, 1, 1, 1) * noise
    assert torch.allclose(seen["x"], x_s, atol=1e-6)
    v_hat = net(x_s, s.float() * 1000, ctx)
    want = ((v_hat - (noise - x0)) ** 2).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(per_clip, want, atol=1e-6) and torch.allclose(loss, (w * want).sum(), atol=1e-6)
    levels = flow.shift_sigma((torch.arange(1000, dtype=torch.float64) + 1) / 1000, 3.0)
    assert bool((levels[1:] > levels[:-1]).all()) and levels[-1] == 1.0  # the coarse density favours high noise


@pytest.fixture(scope="module")
def dit_world(world, tmp_path_factory):
    """The tiny model folder with a tiny random DiT in dit/, matched to its VAE (4 channels) and text encoder."""
    import shutil

    root, model = world
    folder = tmp_path_factory.mktemp("dit") / "model"
    shutil.copytree(model, folder)
    from oracles import randomize_

    cfg = wan_dit.WanDiTConfig(text_len=77, in_dim=4, out_dim=4, dim=32, ffn_dim=48, freq_dim=32, text_dim=64,
                               num_heads=2, num_layers=2)
    save_dit(randomize_(wan_dit.WanDiT(cfg), 3), folder / "dit", flow_shift=3.0, dtype=torch.float32)
    return root, folder


@pytest.mark.slow
def test_dit_run_trains_only_its_preset_and_its_delta_changes_samples(dit_world, tmp_path):
    root, folder = dit_world
    cfg = _cfg(root, folder, tmp_path / "dit", denoiser="dit", steps=3, batch_size=2, val_every=3, val_steps=2,
               val_seeds="0")
    path = train.main(cfg)
    assert cfg.preset == "dit-newmove" and cfg.val_solver == "unipc"  # DIT_SETTINGS for the options not given
    delta = weights.read_state_dict(path)
    base = load_models(folder, denoiser="dit")
    chosen = {n for n, _ in train.select_trainable(base.dit, "dit-newmove")}
    assert {k.removeprefix("dit.") for k in delta} == chosen and all(k.startswith("dit.") for k in delta)
    sd = base.dit.state_dict()
    assert all(not torch.equal(delta[f"dit.{n}"], sd[n]) for n in chosen)  # every chosen tensor moved
    kw = dict(frames=4, height=32, width=32, steps=3, guidance=5.0, solver="unipc", progress=False)
    before = sample.generate(base, ["a square moving"], [0], **kw)
    apply_delta(base, path)
    after = sample.generate(base, ["a square moving"], [0], **kw)
    assert not torch.equal(before, after) and (tmp_path / "dit" / "val" / "step000003").is_dir()
    with pytest.raises(weights.WeightsError, match="unexpected tensor dit"):
        apply_delta(load_models(folder), path)  # a DiT delta is not a UNet delta


def test_flow_shift_option_reaches_the_loss(dit_world, tmp_path, monkeypatch):
    """--flow-shift S sets the noise levels' shift of every flow_loss call; 0 (the default) keeps the model folder's
    own (its sampler's, 3.0 in this folder)."""
    root, folder = dit_world
    seen, real = [], train.flow_loss

    def spy(*args, **kw):
        seen.append(args[5])
        return real(*args, **kw)

    monkeypatch.setattr(train, "flow_loss", spy)
    for shift, want in ((0.0, 3.0), (1.0, 1.0), (7.5, 7.5)):
        seen.clear()
        train.main(_cfg(root, folder, tmp_path / str(shift), denoiser="dit", flow_shift=shift, steps=2, frames=1,
                        cache=str(tmp_path / "c")))
        assert seen == [want, want], (shift, seen)


def test_dit_options_are_checked_before_anything_loads(dit_world, tmp_path):
    root, folder = dit_world
    bad = [(dict(denoiser="dit", preset="temporal"), "selects UNet weights"),
           (dict(preset="dit-self-qk"), "needs --denoiser dit"),
           (dict(denoiser="dit", checkpointing="selective"), "whole blocks"),
           (dict(denoiser="dit", val_solver="ddim"), "the DiT's are unipc and euler"),
           (dict(val_solver="unipc"), "the UNet's are dpmpp-2m"),
           (dict(denoiser="dit", model=str(root)), "is neither"),
           (dict(flow_shift=3.0), "needs --denoiser dit")]
    for kw, message in bad:
        with pytest.raises(SystemExit, match=message):
            train.check_config(dataclasses.replace(_cfg(root, folder, tmp_path / "x"), **kw), given=set(kw))
