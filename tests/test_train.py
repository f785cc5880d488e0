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

import sample
import train
import unet3d
import weights

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


def _full_size_groups():
    with torch.device("meta"):
        unet = unet3d.UNet3D()
    groups = {}
    for name, p in unet.named_parameters():
        groups.setdefault(train.param_group(name), []).append((name, p))
    return unet, groups


@pytest.mark.parametrize("preset,params,tensors", [
    ("newmove", 570_882_176, 826), ("temporal", 545_323_136, 794), ("temporal-none", 25_559_040, 32),
    ("all", 1_411_233_860, 1480)])
def test_preset_parameter_counts_full_size(preset, params, tensors):
    _, groups = _full_size_groups()
    chosen = [p for g in train.PRESETS[preset]["groups"] for _, p in groups.get(g, [])]
    assert (sum(p.numel() for p in chosen), len(chosen)) == (params, tensors)


def test_spatial_kv_is_not_the_naive_attn2_filter():
    unet, groups = _full_size_groups()
    naive = [p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    assert sum(p.numel() for p in naive) == 50_864_128  # includes the temporal transformers' second self-attention
    kv = groups["spatial_kv"]
    assert sum(p.numel() for _, p in kv) == 25_559_040 and all(".attentions." in n for n, _ in kv)


def test_regularized_loss_weights_the_reg_half():
    eps = torch.zeros(3, 4, 2, 2, 2)
    eps_hat = torch.zeros_like(eps)
    eps_hat[0] += 1.0  # instance clip: MSE 1
    eps_hat[1] += 2.0  # reg clips: MSE 4 and 0 -> mean 2
    loss, li, lr, per = train.regularized_loss(eps_hat, eps, n_instance=1, reg_weight=0.5)
    assert (li.item(), lr.item(), loss.item()) == (1.0, 2.0, 2.0)
    assert per.tolist() == [1.0, 4.0, 0.0]


def test_clip_indices_cover_each_epoch_once_across_ranks():
    n, world = 10, 2
    seen = [i for b in range(5) for r in range(world) for i in train.clip_indices(b, r, world, 1, n, seed=3)]
    assert sorted(seen) == list(range(n))  # 5 batches x 2 ranks x 1 clip = one epoch, no clip twice
    assert train.clip_indices(7, 1, 2, 3, n, 3) == train.clip_indices(7, 1, 2, 3, n, 3)  # stateless


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
    model = weights.save_models(weights._tiny_models(seed=5), root / "model", "diffusers")
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
    base = weights.load_models(model)
    before = sample.generate(base, ["a person doing the pll sign"], [0], **kw)
    sample.apply_delta(base, delta)
    after = sample.generate(base, ["a person doing the pll sign"], [0], **kw)
    assert not torch.equal(before, after)
    with pytest.raises(SystemExit, match="already holds a run"):  # never overwrites a finished run
        train.main(_cfg(root, model, tmp_path / "run"))


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


def _run(args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_exact_resume_after_sigkill(world, tmp_path):
    root, model = world
    common = ["--model", str(model), "--videos", str(root / "videos"), "--reg-videos", str(root / "reg"),
              "--reg-caption", "a square moving", "--frames", "4", "--size", "32", "--steps", "8", "--lr", "1e-3",
              "--precision", "fp32", "--log-every", "1", "--ckpt-every", "1", "--seed", "2",
              "--cache", str(tmp_path / "cache")]
    full = _run(common + ["--out", str(tmp_path / "full")])
    assert full.wait(timeout=600) == 0, full.stdout.read()
    killed = _run(common + ["--out", str(tmp_path / "killed")])
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
    resumed = _run(common + ["--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    a = weights.read_state_dict(tmp_path / "full" / "delta.safetensors")
    b = weights.read_state_dict(tmp_path / "killed" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
    base = weights.load_models(model).unet.state_dict()
    assert any(not torch.equal(v, base[k[5:]]) for k, v in tensors.items())  # it trained


def test_bad_options_are_clear_errors(world, tmp_path):
    root, model = world
    for kw, msg in [(dict(preset="nope"), "--preset must be one of"), (dict(alpha=2.0), "--alpha must be in"),
                    (dict(frozen_dtype="bf16"), "--frozen-dtype"), (dict(checkpointing="yes"), "--checkpointing"),
                    (dict(prior="real", reg_videos=""), "needs --reg-videos")]:
        with pytest.raises(SystemExit, match=msg):
            train.main(dataclasses.replace(_cfg(root, model, tmp_path / "x"), **kw))
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "--no-such-flag"], capture_output=True, text=True)
    assert run.returncode == 2 and "unrecognized arguments: --no-such-flag" in run.stderr


def test_ablation_presets_lora_token_and_baselines(world, tmp_path):
    import text_encoder as te

    root, model = world
    base = weights.load_models(model)
    # LoRA on the NewMove set: the delta holds merged full weights of its Linear layers only
    d = weights.read_state_dict(train.main(_cfg(root, model, tmp_path / "lora", steps=2, lora_rank=4)))
    assert d and all(v.ndim == 2 for v in d.values())
    assert any(not torch.equal(v, base.unet.get_parameter(k[5:])) for k, v in d.items())
    # the token ablation: the delta carries the learned row, and sample.py restores the placeholder
    path = train.main(_cfg(root, model, tmp_path / "tok", steps=2, train_token=True, export_diffusers=True))
    d = weights.read_state_dict(path)
    assert d["text_encoder.placeholder_embeddings"].shape == (1, te.TEXT_PRESETS["tiny"].width)
    m = weights.load_models(model)
    sample.apply_delta(m, path)
    assert m.tokenizer("a person doing the pll sign")[0, 5].item() == te.TEXT_PRESETS["tiny"].vocab_size
    exported = unet3d.load_unet(tmp_path / "tok" / "unet" / "diffusion_pytorch_model.safetensors", m.unet.cfg)
    assert all(torch.equal(exported.get_parameter(k[5:]), v) for k, v in d.items() if k.startswith("unet."))
    # Textual Inversion trains the token row only; DreamBooth generates its own prior first
    d = weights.read_state_dict(train.main(_cfg(root, model, tmp_path / "ti", steps=1, preset="textual-inversion")))
    assert list(d) == ["text_encoder.placeholder_embeddings"]
    d = weights.read_state_dict(train.main(_cfg(root, model, tmp_path / "db", steps=1, preset="dreambooth",
                                                prior_count=2, val_steps=2)))
    assert d and all(train.param_group(k[5:]) != "temporal" for k in d)


def test_validation_videos_early_stop_and_nan_guard(world, tmp_path, monkeypatch):
    root, model = world
    scores = iter([0.30, 0.20])
    train.main(_cfg(root, model, tmp_path / "val", steps=5, val_every=1, val_steps=2, val_seeds="0,1"),
               score_fn=lambda videos, prompts: next(scores), stop_score=0.265)
    log = [json.loads(line) for line in (tmp_path / "val" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2  # stopped when the score fell to the threshold, not at step 5
    assert sorted(p.name for p in (tmp_path / "val" / "val" / "step000001").iterdir()) == [
        f"a-person-doing-the-pll-sign_seed{s}.{e}" for s in (0, 1) for e in ("gif", "mp4", "png")]
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
    base = weights.load_models(model).unet.state_dict()
    for d in (one, two):
        assert any(not torch.equal(v, base[k[5:]]) for k, v in d.items())
    log = (tmp_path / "b2" / "log.jsonl").read_text()
    assert json.loads(log.splitlines()[-1])["loss_reg"] == 0.0  # prior none: no regularization term
    with pytest.raises(SystemExit, match="did you mean 'Drumming Fingers'"):
        train.main(dataclasses.replace(_cfg(root, model, tmp_path / "bad"), **{**kw, "jester_class": "Drumming fingers"}))


def test_cli_stopping_rule_with_a_clip_model(world, tmp_path):
    """--stop-clip wires evaluate.py's appearance score into validation; a threshold of 1.0 is met at once."""
    from test_evaluate import TINY_CLIP

    root, model = world
    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    args = ["--model", str(model), "--videos", str(root / "videos"), "--prior", "none", "--frames", "4", "--size",
            "32", "--steps", "5", "--precision", "fp32", "--log-every", "1", "--val-every", "1", "--val-steps", "2",
            "--stop-clip", str(tmp_path / "clip.json"), "--stop-score", "1.0", "--out", str(tmp_path / "run")]
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "validation score reached 1.0: stopping" in run.stdout
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["step"] == 1
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), *args[:-2], "--val-every", "0", "--out",
                          str(tmp_path / "run2")], capture_output=True, text=True)
    assert bad.returncode != 0 and "--stop-clip needs --val-every" in bad.stderr


@pytest.mark.parametrize("script", ["train.py", "sample.py", "evaluate.py", "benchmarks/bench.py", "toy/demo.py",
                                    "toy/train_base.py", "toy/ablate.py", "toy/probe.py"])
def test_every_command_line_help_works(script):
    """`--help` of each script prints its usage (argparse %-formats help texts: a bare % breaks it)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
