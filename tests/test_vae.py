"""Tests for vae.py: parity with the original ModelScope code and with diffusers, key mapping, save/load, chunking.

Run: cd /work/main && python -m pytest -q tests/test_vae.py   (CPU, tiny configs, a few seconds)
"""

import argparse
import ast
import json

import pytest
import torch

import layouts  # pytest.ini puts the repository root and tests/ on sys.path
import vae
from oracles import max_abs_diff, modelscope_module, randomize_, release_keys
from weights import WeightsError, save_state_dict

TOL = 1e-5  # float32 parity bound
# The tiny ModelScope ddconfig: two levels of 32 and 64 channels (GroupNorm(32) needs multiples of 32).
DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
TINY = vae.VAE_PRESETS["tiny"]


def fold(x):
    """(B, C, F, H, W) -> (B*F, C, H, W), the per-frame layout of the oracles."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def random_video(b=2, f=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, size, size, generator=g) * 2 - 1  # in [-1, 1]


def tiny_ours(seed=0):
    return randomize_(vae.AutoencoderKL(TINY), seed=seed).requires_grad_(False)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------------------------------------------------
# 1. parity with the original ModelScope autoencoder.py, through a Lightning-style checkpoint


@torch.no_grad()
def test_parity_with_original_lightning_checkpoint(tmp_path):
    ms = modelscope_module("autoencoder")
    ref = randomize_(ms.AutoencoderKL(DDCONFIG, embed_dim=4), seed=3)
    # Moments are [mean (4 channels), logvar (4)]: push logvar channel 1 above the clamp at 20 and channel 2 below the
    # one at -30, so the comparison also covers the clamping; channels 0 and 3 stay in range.
    ref.quant_conv.bias[5] += 50.0
    ref.quant_conv.bias[6] -= 50.0
    # The released VQGAN_autoencoder.pth is a whole-LDM Lightning checkpoint: VAE keys under first_stage_model.,
    # other models' keys beside them, and non-tensor entries (some of them classes torch's weights_only refuses).
    sd = {"first_stage_model." + k: v for k, v in ref.state_dict().items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    sd["cond_stage_model.model.token_embedding.weight"] = torch.randn(5, 8)
    path = tmp_path / "VQGAN_autoencoder.pth"
    torch.save({"state_dict": sd, "callbacks": {"ModelCheckpoint": {"best": 0.5}}, "global_step": 7,
                "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)

    ours = layouts.load_vae(path, cfg=layouts.vae_config_from_ldm(DDCONFIG, embed_dim=4))
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())

    # encode: B=2 videos of 3 frames through our video API vs the original per frame.
    video = random_video(b=2, f=3)
    post = ref.encode(fold(video))
    mean, logvar = ours.encode_frames(fold(video))
    d_mean, d_logvar = max_abs_diff(mean, post.mean), max_abs_diff(logvar, post.logvar)
    lat = ours.encode(video, sample=False, chunk_size=4)  # (2, 4, 3, 16, 16), scaled
    assert lat.shape == (2, 4, 3, 16, 16)
    d_video_mean = max_abs_diff(fold(lat) / 0.18215, post.mean)

    # decode: random latents (scaled, as the diffusion model produces them).
    latents = torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = ours.decode(latents, chunk_size=4)
    assert out.shape == (2, 3, 3, 32, 32)
    d_dec = max_abs_diff(fold(out), ref.decode(fold(latents) / 0.18215))
    print(f"original parity: mean {d_mean:.2e} logvar {d_logvar:.2e} video mean {d_video_mean:.2e} decode {d_dec:.2e}")
    assert max(d_mean, d_logvar, d_video_mean, d_dec) <= TOL
    assert post.mean.abs().max() > 0.1 and logvar[:, [0, 3]].std() > 0.01  # not a comparison of constant tensors
    assert logvar[:, 1].min() == 20.0 and logvar[:, 2].max() == -30.0  # the clamp was exercised


# -----------------------------------------------------------------------------------------------------------------------
# 2. parity with diffusers' AutoencoderKL, through save_pretrained


@torch.no_grad()
def test_parity_with_diffusers(tmp_path):
    import diffusers  # test oracle only; vae.py itself never imports it
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32,
                                  latent_channels=4)
    randomize_(ref, seed=4)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    cfg = layouts.vae_config_from_diffusers(json.loads((tmp_path / "vae" / "config.json").read_text()))
    assert cfg == TINY

    ours = layouts.load_vae(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", cfg=cfg)
    # cfg=None on the directory finds the weights and the config.json beside them.
    assert_same_tensors(layouts.load_vae(tmp_path / "vae").state_dict(), ours.state_dict())

    video = random_video(b=2, f=2, seed=5)
    d_enc = max_abs_diff(fold(ours.encode(video, sample=False)) / cfg.scaling_factor,
                         ref.encode(fold(video)).latent_dist.mean)
    latents = torch.randn(2, 4, 2, 16, 16, generator=torch.Generator().manual_seed(6))
    d_dec = max_abs_diff(fold(ours.decode(latents)), ref.decode(fold(latents) / cfg.scaling_factor).sample)
    print(f"diffusers parity: encode mean {d_enc:.2e} decode {d_dec:.2e}")
    assert max(d_enc, d_dec) <= TOL


# -----------------------------------------------------------------------------------------------------------------------
# 3. the released size, without weights: counts and the exact original key set


def read_keys_tsv():
    return {k: tuple(ast.literal_eval(shape)) for k, shape in release_keys("ms_vae_keys")}  # "key\t(128, 3, 3, 3)"


def test_full_size_keys_match_release():
    with torch.device("meta"):
        model = vae.AutoencoderKL(vae.VAEConfig())
    sd = model.state_dict()
    assert len(sd) == 248
    assert sum(v.numel() for v in sd.values()) == 83_653_863
    assert sum(v.numel() for k, v in sd.items() if k.startswith("encoder.")) == 34_163_592
    assert sum(v.numel() for k, v in sd.items() if k.startswith("decoder.")) == 49_490_179

    release = read_keys_tsv()
    assert len(release) == 248
    assert {k: tuple(v.shape) for k, v in layouts.vae_to_original(sd).items()} == release
    # And back: the release keys (as meta tensors, with the file prefix) map one-to-one onto ours, level count inferred.
    file_sd = {"first_stage_model." + k: torch.empty(s, device="meta") for k, s in release.items()}
    back = layouts.vae_from_original(file_sd)
    assert len(back) == 248
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    # A few mappings spelled out, so a symmetric mistake in both directions cannot pass.
    ours_of = dict(zip(file_sd, back))  # insertion order is preserved key by key
    spelled_out = [("decoder.up.3.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight"),
                   ("decoder.up.0.block.0.nin_shortcut.bias", "decoder.up_blocks.3.resnets.0.conv_shortcut.bias"),
                   ("encoder.mid.attn_1.proj_out.weight", "encoder.mid_block.attentions.0.to_out.0.weight"),
                   ("decoder.mid.block_2.norm1.weight", "decoder.mid_block.resnets.1.norm1.weight"),
                   ("encoder.norm_out.bias", "encoder.conv_norm_out.bias")]
    for original, ours in spelled_out:
        assert ours_of["first_stage_model." + original] == ours
    assert back["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)


def test_key_mapping_returns_views():
    sd = tiny_ours().state_dict()
    orig = layouts.vae_to_original(sd)
    back = layouts.vae_from_original(orig)
    for k, v in back.items():
        assert v.data_ptr() == sd[k].data_ptr() and torch.equal(v, sd[k]), k  # same memory, not a copy
    assert orig["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


# -----------------------------------------------------------------------------------------------------------------------
# 4. save in each layout and load back


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = tiny_ours(seed=7)
    for layout, name in [("diffusers", "vae.safetensors"), ("original", "vae.pth"), ("original", "vae_o.safetensors")]:
        path = layouts.save_vae(model, tmp_path / name, layout=layout)
        assert_same_tensors(layouts.load_vae(path, cfg=TINY).state_dict(), model.state_dict())
    with pytest.raises(WeightsError, match="exists"):
        layouts.save_vae(model, tmp_path / "vae.pth", layout="original")  # no silent overwrite

    # The original layout is what ModelScope's own AutoencoderKL loads: strict load, then the same outputs.
    file_sd = torch.load(tmp_path / "vae.pth", weights_only=True)
    assert all(k.startswith("first_stage_model.") for k in file_sd)
    ref = modelscope_module("autoencoder").AutoencoderKL(DDCONFIG, embed_dim=4).eval()
    ref.load_state_dict({k.removeprefix("first_stage_model."): v for k, v in file_sd.items()}, strict=True)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    assert max_abs_diff(model.decode_frames(z), ref.decode(z)) <= TOL

    # fp16 on load: cast, same values up to rounding.
    half = layouts.load_vae(tmp_path / "vae.safetensors", cfg=TINY, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert torch.equal(half.decoder.conv_out.weight, model.decoder.conv_out.weight.half())


# -----------------------------------------------------------------------------------------------------------------------
# 5. chunking changes nothing; sampling is mean + std * eps with the caller's generator


@torch.no_grad()
def test_chunking_and_sampling():
    model = tiny_ours(seed=9)
    video = random_video(b=2, f=4, size=16, seed=10)  # 8 frames in the batch
    latents = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(11))

    mean = model.encode(video, sample=False, chunk_size=None)
    dec = model.decode(latents, chunk_size=None)
    sampled = model.encode(video, generator=torch.Generator().manual_seed(12), chunk_size=None)
    # Equal up to float rounding: conv kernels may pick another algorithm for another batch size (seen: 1.8e-6).
    for chunk in (1, 3):  # 3 does not divide 8: a short last chunk
        assert max_abs_diff(model.encode(video, sample=False, chunk_size=chunk), mean) <= TOL
        assert max_abs_diff(model.decode(latents, chunk_size=chunk), dec) <= TOL
        again = model.encode(video, generator=torch.Generator().manual_seed(12), chunk_size=chunk)
        assert max_abs_diff(again, sampled) <= TOL

    # The sample is scale * (mean + exp(logvar / 2) * eps), eps drawn once in the (B, 4, F, h, w) layout.
    m, logvar = model.encode_frames(fold(video))
    unfold = lambda x: x.reshape(2, 4, *x.shape[1:]).transpose(1, 2)  # noqa: E731  (B*F, 4, h, w) -> (B, 4, F, h, w)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(12))
    expected = 0.18215 * (unfold(m) + torch.exp(0.5 * unfold(logvar)) * eps)
    assert max_abs_diff(sampled, expected) <= 1e-6
    assert max_abs_diff(sampled, mean) > 1e-3  # sampling really adds noise

    # Frame f of video b in the latent is frame f of video b in the input (the fold/unfold is not scrambled).
    one = model.encode(video[1:, :, 2:3], sample=False)
    assert max_abs_diff(one[0, :, 0], mean[1, :, 2]) <= 1e-6


@torch.no_grad()
def test_bf16_autocast_runs():
    model = tiny_ours(seed=13)
    video = random_video(b=1, f=2, size=16, seed=14)
    ref = model.decode(model.encode(video, sample=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.decode(model.encode(video, sample=False))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert max_abs_diff(out.float(), ref) <= 0.1 * ref.abs().max().item()


# -----------------------------------------------------------------------------------------------------------------------
# 6. bad input fails loudly and names the problem


def test_errors(tmp_path):
    missing = tmp_path / "nope" / "VQGAN_autoencoder.pth"
    with pytest.raises(WeightsError, match=str(missing)):
        layouts.load_vae(missing)

    sd = tiny_ours().state_dict()
    wrong_key = dict(sd)
    wrong_key["decoder.conv_outt.weight"] = wrong_key.pop("decoder.conv_out.weight")
    save_state_dict(wrong_key, tmp_path / "wrong_key.safetensors")
    with pytest.raises(WeightsError) as e:
        layouts.load_vae(tmp_path / "wrong_key.safetensors", cfg=TINY)
    assert "decoder.conv_outt.weight" in str(e.value) and "decoder.conv_out.weight" in str(e.value)

    wrong_shape = dict(sd)
    wrong_shape["decoder.conv_in.weight"] = torch.zeros(64, 4, 1, 1)
    save_state_dict(wrong_shape, tmp_path / "wrong_shape.safetensors")
    with pytest.raises(WeightsError) as e:
        layouts.load_vae(tmp_path / "wrong_shape.safetensors", cfg=TINY)
    assert all(s in str(e.value) for s in ("decoder.conv_in.weight", "(64, 4, 1, 1)", "(64, 4, 3, 3)"))

    # The released config on tiny weights: an error listing what is missing, not a silent partial load.
    with pytest.raises(WeightsError, match="missing"):
        layouts.load_vae(tmp_path / "wrong_shape.safetensors")

    with pytest.raises(ValueError, match="down_block_types"):
        layouts.vae_config_from_diffusers({"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D"] * 2})
    with pytest.raises(ValueError, match="attn_resolutions"):
        layouts.vae_config_from_ldm({**DDCONFIG, "attn_resolutions": [16]})
    with pytest.raises(ValueError, match="divisible"):
        vae.VAEConfig(block_out_channels=(32, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        tiny_ours().encode(torch.zeros(2, 3, 16, 16))  # a batch of images, not videos
