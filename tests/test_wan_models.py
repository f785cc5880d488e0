"""Wan 2.1 folders and sampling: both release layouts (and sharded weights) load the same models, generate_wan equals
diffusers' WanPipeline step for step, sample.py runs a Wan folder or Hub id, and the errors a user can meet."""

import json

import pytest
import torch
from oracles import randomize_, tiny_umt5_tokenizer, wan_module
from test_hub import fake_hub, folder_files  # noqa: F401 (fake_hub is a fixture)

import flow
import sample
import wan_dit
import wan_models
import wan_t5
import wan_vae
from inprocess import run_script
from weights import WeightsError, read_state_dict, save_state_dict

# tiny, and matched: the DiT reads the tiny VAE's 4 latent channels and the tiny umT5's 32-wide features (16 tokens)
TINY_DIT = wan_dit.WanDiTConfig(text_len=16, in_dim=4, out_dim=4, dim=48, ffn_dim=64, freq_dim=32, text_dim=32,
                                num_heads=2, num_layers=2)
FRAMES, HEIGHT, WIDTH = 5, 32, 48  # 2 latent frames of 4x6: 2 x 2 x 3 tokens (not square: a swap shows)


def tiny_wan(tokenizer_dir, seed: int = 0) -> wan_models.WanModels:
    torch.manual_seed(seed)
    dit = randomize_(wan_dit.WanDiT(TINY_DIT), seed)
    vae = randomize_(wan_vae.WanVAE(wan_vae.WAN_VAE_PRESETS["tiny"]), seed + 1)
    text = randomize_(wan_t5.UMT5Encoder(wan_t5.UMT5_PRESETS["tiny"]), seed + 2)
    return wan_models.WanModels(dit, vae, text, wan_t5.UMT5Tokenizer(tokenizer_dir, seq_len=TINY_DIT.text_len),
                                "memory", tokenizer_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(models, {layout: folder}): one set of tiny random models saved in both layouts."""
    tmp = tmp_path_factory.mktemp("wan")
    tok = tiny_umt5_tokenizer(tmp / "tok") / "tokenizer.json"
    models = tiny_wan(tok.parent)
    return models, {layout: wan_models.save_wan(models, tmp / layout, layout, tokenizer_json=tok)
                    for layout in ("wan", "wan-diffusers")}


def _video(models, **kw):
    return sample.generate_wan(models, ["a photo of a dog"], [3], frames=FRAMES, height=HEIGHT, width=WIDTH,
                               progress=False, **{"steps": 3, **kw})


def test_both_layouts_load_the_same_models_and_videos(tiny):
    models, folders = tiny
    want = _video(models)
    assert want.shape == (1, 3, FRAMES, HEIGHT, WIDTH) and want.dtype == torch.uint8 and want.float().std() > 0
    for layout, folder in folders.items():
        loaded = wan_models.load_wan(folder)
        assert loaded.layout == layout == wan_models.detect_layout(folder)
        for a, b in ((models.dit, loaded.dit), (models.vae, loaded.vae), (models.text_encoder, loaded.text_encoder)):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), layout
        assert torch.equal(_video(loaded), want), layout
    # the release's config.json carries the DiT's fields under the original names (WanModel's register_to_config)
    conf = json.loads((folders["wan"] / "config.json").read_text())
    assert all(k in conf for k in wan_models.ORIGINAL_DIT_KEYS) and conf["model_type"] == "t2v"


def test_sharded_weights_load_through_their_index(tiny, tmp_path):
    models, folders = tiny
    folder = tmp_path / "sharded"
    files = folder_files(folders["wan-diffusers"])
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    whole = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = read_state_dict(whole)
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_state_dict({k: sd[k] for k in names}, whole.parent / shard)
    (whole.parent / (whole.name + ".index.json")).write_text(json.dumps(
        {"weight_map": {k: shard for shard, names in shards.items() for k in names}}))
    whole.unlink()
    loaded = wan_models.load_wan(folder)
    assert all(torch.equal(v, loaded.dit.state_dict()[k]) for k, v in models.dit.state_dict().items())


def test_generate_equals_diffusers_wan_pipeline(tiny):
    """The same weights in diffusers' WanPipeline, given our prompt features and initial noise: the same latents
    after every step (its flow UniPC schedule spaces sigmas from 1, Wan's from 0.999: flow.sample_latents is run on
    the pipeline's schedule here; tests/test_flow.py proves Wan's own schedule and solver equal to the original), and
    the same decoded video."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    models, _ = tiny
    dit, vae = models.dit, models.vae
    transformer = WanTransformer3DModel(**wan_dit.dit_config_to_diffusers(dit.cfg)).eval()
    transformer.load_state_dict(wan_dit.dit_to_diffusers(dit.state_dict()))
    their_vae = AutoencoderKLWan(**wan_vae.vae_config_to_diffusers(vae.cfg)).eval()
    their_vae.load_state_dict(wan_vae.vae_to_diffusers(vae.state_dict()))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=their_vae, scheduler=scheduler)
    ctx = wan_t5.encode_prompts(models.text_encoder, models.tokenizer, ["a photo of a dog", ""], TINY_DIT.text_len)
    noise = sample.seeded_noise((4, 2, HEIGHT // 8, WIDTH // 8), [3])[0]
    kw = dict(prompt_embeds=ctx[:1], negative_prompt_embeds=ctx[1:], latents=noise.clone(), num_frames=FRAMES,
              height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=4.0)
    theirs = pipe(output_type="latent", **kw).frames  # (1, 4, 2, 4, 4)
    scheduler.set_timesteps(4)
    schedule = (scheduler.sigmas.float(), scheduler.timesteps)
    ours = flow.sample_latents(dit, noise, ctx[:1], ctx[1:], guidance=4.0, schedule=schedule)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()  # measured: 1e-7 relative
    video = pipe(output_type="pt", **kw).frames  # (1, F, 3, H, W) in [0, 1]
    ours_video = vae.decode(ours) * 0.5 + 0.5  # (1, 3, F, H, W)
    assert (ours_video.transpose(1, 2) - video).abs().max() <= 1e-5


def test_generate_equals_the_original_components_driven_as_text2video_py(tiny, monkeypatch):
    """generate_wan against the ORIGINAL WanModel, FlowUniPCMultistepScheduler and WanVAE_, with the same weights,
    prompt features and initial noise, run as wan/text2video.py's loop runs them: two model calls per step (cond, then
    the negative prompt), guidance, scheduler.step, then the VAE decode and the clamp."""
    from test_wan_dit import _reference_flash_attention, original
    from test_wan_vae import original_kwargs, original_scale

    model_py = wan_module("modules.model")
    monkeypatch.setattr(model_py, "flash_attention", _reference_flash_attention)  # flash-attn is CUDA only
    models, _ = tiny
    ref_dit = original(model_py, TINY_DIT)
    ref_dit.load_state_dict(models.dit.state_dict())
    ref_vae = wan_module("modules.vae2_1").WanVAE_(**original_kwargs(models.vae.cfg)).eval()
    ref_vae.load_state_dict(models.vae.state_dict())
    neg = "a blurry photo"
    ctx = wan_t5.encode_prompts(models.text_encoder, models.tokenizer, ["a photo of a dog", neg], TINY_DIT.text_len)
    latents = sample.seeded_noise((4, 2, HEIGHT // 8, WIDTH // 8), [3])[0][0]  # (C, f, h, w), as the original's
    sched = wan_module("utils.fm_solvers_unipc").FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1,
                                                                            use_dynamic_shifting=False)
    sched.set_timesteps(4, device="cpu", shift=5.0)
    seq_len = 2 * 2 * 3
    with torch.no_grad():
        for t in sched.timesteps:
            timestep = torch.stack([t])
            cond = ref_dit([latents], t=timestep, context=[ctx[0]], seq_len=seq_len)[0]
            uncond = ref_dit([latents], t=timestep, context=[ctx[1]], seq_len=seq_len)[0]
            v = uncond + 4.0 * (cond - uncond)
            latents = sched.step(v.unsqueeze(0), t, latents.unsqueeze(0), return_dict=False)[0][0]
        video = ref_vae.decode(latents.unsqueeze(0), original_scale(models.vae.cfg)).clamp(-1, 1)
    kw = dict(negative_prompt=neg, steps=4, shift=5.0, guidance=4.0)
    ours = _video(models, return_latents=True, **kw)[0]
    assert (ours - latents).abs().max() <= 1e-5 * latents.abs().max()  # measured: 1e-7 relative
    frames = _video(models, **kw)
    assert (frames.int() - sample.to_uint8(video).int()).abs().max() <= 1  # uint8 levels (truncation at an edge)


def test_errors_name_the_folder_and_the_problem(tiny, tmp_path):
    _, folders = tiny
    with pytest.raises(WeightsError, match="not a Wan 2.1 model folder"):
        wan_models.load_wan(tmp_path)
    broken = tmp_path / "no-tokenizer"
    for name, data in folder_files(folders["wan"]).items():
        if not name.startswith("google/"):
            (broken / name).parent.mkdir(parents=True, exist_ok=True)
            (broken / name).write_bytes(data)
    with pytest.raises(WeightsError, match="tokenizer.json"):
        wan_models.load_wan(broken)
    conf = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**conf, "model_type": "i2v"}))
    with pytest.raises(WeightsError, match="only t2v"):
        wan_models.load_wan(broken)
    (broken / "config.json").write_text(json.dumps({**conf, "dim": 64}))  # weights of another size
    with pytest.raises(WeightsError, match="shape mismatch|do not fit"):
        wan_models.load_wan(broken)


@pytest.mark.slow
def test_sample_cli_on_a_wan_folder_and_its_refusals(tiny, tmp_path, capfd):
    _, folders = tiny
    args = ["--model", str(folders["wan"]), "--prompt", "a dog", "--frames", str(FRAMES), "--height", str(HEIGHT),
            "--width", str(WIDTH), "--steps", "2", "--out", str(tmp_path / "out")]
    assert run_script(capfd, "sample.py", *args).returncode == 0
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".gif", ".mp4", ".png"]
    for extra, message in ((["--solver", "ddim"], "its solvers are unipc, euler"),
                           (["--frames", "6"], "frames = 1 + 4k"),
                           (["--eta", "0.5"], "ModelScope options"),
                           (["--delta", str(tmp_path / "d.safetensors")], "file not found")):
        r = run_script(capfd, "sample.py", *args, *extra)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.text, (extra, r.text)


@pytest.mark.slow
def test_wan_by_hub_id_fetches_only_what_the_loader_reads(fake_hub, tiny, tmp_path, capfd):  # noqa: F811
    models, folders = tiny
    for repo, layout in (("Wan-AI/Wan2.1-T2V-1.3B", "wan"), ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan-diffusers")):
        files = folder_files(folders[layout])
        extras = {"README.md": b"# tiny", "assets/logo.png": b"png", "google/umt5-xxl/spiece.model": b"sp",
                  "tokenizer/spiece.model": b"sp", "examples/i2v_input.JPG": b"jpg"}
        fake_hub.add(repo, {**files, **extras})
        out = tmp_path / layout
        args = ["--model", repo, "--prompt", "a dog", "--frames", str(FRAMES), "--height", str(HEIGHT), "--width",
                str(WIDTH), "--steps", "2", "--out", str(out)]
        assert run_script(capfd, "sample.py", *args).returncode == 0
        assert fake_hub.fetched() >= set(files) and not fake_hub.fetched() & set(extras), layout
        assert len(list(out.glob("*.mp4"))) == 1


# -----------------------------------------------------------------------------------------------------------------------
# training Wan's DiT with train.py (WAN_SETTINGS; the toy world's clips)


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    """A tiny Wan folder whose DiT reads 64 tokens (room for the toy captions in the tiny tokenizer's pieces), the
    toy world's clips, and a 3-step NewMove run on them: (folder, clips, the run's folder)."""
    import dataclasses

    import train
    from toy import demo, world

    tmp = tmp_path_factory.mktemp("wan-train")
    tok = tiny_umt5_tokenizer(tmp / "tok") / "tokenizer.json"
    models = tiny_wan(tok.parent)
    models.dit = randomize_(wan_dit.WanDiT(dataclasses.replace(TINY_DIT, text_len=64)), 5)
    folder = wan_models.save_wan(models, tmp / "wan", "wan", tokenizer_json=tok)
    clips = tmp / "clips"
    world.write_folder(demo.examples_for("moving in a circle", 4, 0, "pll"), clips)
    cfg = train.Config(model=str(folder), videos=str(clips), reg_videos=str(clips), token="pll", frames=FRAMES,
                       size=HEIGHT, steps=3, batch_size=1, lr=1e-3, log_every=1, val_every=3, val_steps=2,
                       out=str(tmp / "run"), seed=1)
    train.main(cfg)
    assert (cfg.denoiser, cfg.checkpointing, cfg.preset, cfg.val_solver) == ("dit", "full", "dit-newmove", "unipc")
    return folder, clips, tmp / "run"


@pytest.mark.slow
def test_train_py_trains_wans_dit_on_whole_clip_latents(wan_run):
    """--model Wan: the dit-newmove set trains (and only it), on each clip's first 1 + 4k frames encoded as one video
    (Wan's VAE; the cache holds 2 latent frames for 5 pixel frames) with umT5 contexts of the DiT's text_len."""
    import train
    from weights import read_state_dict as read

    folder, _, run = wan_run
    delta = read(run / "delta.safetensors")
    base = wan_models.load_wan(folder)
    chosen = {n for n, _ in train.select_trainable(base.dit, "dit-newmove")}
    assert {k.removeprefix("dit.") for k in delta} == chosen
    assert all(not torch.equal(delta[f"dit.{n}"], base.dit.state_dict()[n]) for n in chosen)
    cached = [read(p) for p in (run / "cache").glob("*.safetensors")]
    assert cached and all(c["mean"].shape == (2, 4, HEIGHT // 8, HEIGHT // 8) and c["context"].shape == (64, 32)
                          and not c["std"].any() for c in cached)
    assert (run / "val" / "step000003").is_dir()


@pytest.mark.slow
def test_sample_py_applies_a_wan_delta(wan_run, tmp_path, capfd):
    folder, _, run = wan_run
    args = ["--model", str(folder), "--prompt", "a red circle doing pll", "--frames", str(FRAMES), "--height",
            str(HEIGHT), "--width", str(HEIGHT), "--steps", "2"]
    assert run_script(capfd, "sample.py", *args, "--out", str(tmp_path / "base")).returncode == 0
    assert run_script(capfd, "sample.py", *args, "--delta", str(run / "delta.safetensors"), "--out",
                      str(tmp_path / "custom")).returncode == 0
    base, custom = (next((tmp_path / d).glob("*.png")).read_bytes() for d in ("base", "custom"))  # contact sheets
    assert base != custom


def test_wan_options_are_checked_before_anything_loads(tiny, tmp_path):
    import dataclasses

    import train

    folder, clips = tiny[1]["wan"], tmp_path / "clips"
    cfg = train.Config(model=str(folder), videos=str(clips), reg_videos=str(clips), out=str(tmp_path / "x"))
    for kw, message in ((dict(frames=16), "1 \\+ 4k frames"), (dict(train_token=True), "not supported with Wan"), (dict(denoiser="unet"), "is a DiT"),
                        (dict(preset="temporal"), "selects UNet weights")):
        with pytest.raises(SystemExit, match=message):
            train.check_config(dataclasses.replace(cfg, **kw), given=set(kw))


def test_models_py_checks_a_wan_folder(tiny, capfd):
    import models

    _, folders = tiny
    assert models.main([str(folders["wan-diffusers"])]) == 0
    out = capfd.readouterr().out
    assert "wan-diffusers layout" in out and "-> DiT (2, 4, 2, 8, 8) -> VAE decode (2, 3, 5, 64, 64)" in out


def test_wan_windows_are_encoded_one_by_one_and_drawn_whole(tiny):
    """--window random with Wan: each window of a clip goes through the causal VAE as a video of its own (its first
    frame alone), and a step draws one whole window, never a slice across two."""
    import latents

    models, _ = tiny
    g = torch.Generator().manual_seed(0)
    video = torch.rand(3, 13, HEIGHT, WIDTH, generator=g) * 2 - 1  # 13 frames: windows of 5 at starts 0 and 8
    item = {"video": video, "caption": "a photo of a dog"}
    cached = latents.encode_wan_clip(item, models.vae, models.text_encoder, models.tokenizer, torch.device("cpu"), 5)
    with torch.no_grad():
        want = [models.vae.encode(video[None, :, a:a + 5])[0].transpose(0, 1) for a in (0, 8)]
    assert torch.equal(cached["mean"], torch.cat(want)) and cached["mean"].shape[0] == 4
    with torch.no_grad():  # a window cut from one encoding of all 13 frames is something else
        whole = models.vae.encode(video[None, :, :13])[0].transpose(0, 1)
    assert not torch.allclose(whole[3:5], want[1], atol=1e-3)
    s = {"mean": [cached["mean"]], "std": [cached["std"]], "context": cached["context"][None], "window": 2}
    starts = set()
    for b in range(40):
        x0, _ = latents.batch_latents([("instance", s, 0)], b, 1, 2, True, g, torch.device("cpu"))
        starts.add(next(k for k in range(4) if torch.equal(x0[0].transpose(0, 1), cached["mean"][k:k + 2])))
    assert starts == {0, 2}
