"""Tests for wan_vae.py: parity with the original Wan code (wan/modules/vae2_1.py) and with diffusers' AutoencoderKLWan,
the release's key set and size, the diffusers layout, chunking and causality.

Run: cd /work/main && python -m pytest -q tests/test_wan_vae.py   (CPU, tiny configs; most of the time is importing
diffusers)
"""

import dataclasses
import inspect
import unittest.mock

import pytest
import torch
from oracles import max_abs_diff, randomize_, wan_module

import wan_vae  # pytest.ini puts the repository root and tests/ on sys.path

TOL = 1e-5  # float32 parity bound
TINY = wan_vae.WAN_VAE_PRESETS["tiny"]  # dim 8, z_dim 4, dim_mult (1, 2, 2, 2), time halving (False, True, True)
RELEASE_PARAMS = 126_892_531  # the released Wan2.1_VAE.pth: 194 tensors


def original_kwargs(cfg: wan_vae.WanVAEConfig) -> dict:
    """Upstream WanVAE_'s constructor arguments for our config."""
    return {"dim": cfg.dim, "z_dim": cfg.z_dim, "dim_mult": list(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks,
            "attn_scales": list(cfg.attn_scales), "temperal_downsample": list(cfg.temporal_downsample),
            "dropout": cfg.dropout}


def original_and_ours(cfg=TINY, seed=0):
    """The original WanVAE_ with random weights, and ours loaded from its state dict: strict, no renaming."""
    ref = randomize_(wan_module("modules.vae2_1").WanVAE_(**original_kwargs(cfg)), seed).requires_grad_(False)
    ours = wan_vae.WanVAE(cfg).eval().requires_grad_(False)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def original_scale(cfg):
    """Upstream's `scale = [mean, 1/std]`, as Wan2_1_VAE builds it (float32)."""
    return [torch.tensor(cfg.latents_mean), 1.0 / torch.tensor(cfg.latents_std)]


def random_video(b=2, f=9, h=16, w=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1  # in [-1, 1]; non-square on purpose


def random_latents(b=2, z=4, t=3, h=2, w=3, seed=2):
    return torch.randn(b, z, t, h, w, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------------------------------------------------
# 1. parity with the original chunked encode / decode


@torch.no_grad()
@pytest.mark.parametrize("frames", [9, 1, 5], ids=["9-frames", "image", "5-frames"])
def test_parity_with_original(frames):
    cfg = TINY
    ref, ours = original_and_ours(cfg)
    scale = original_scale(cfg)
    video = random_video(f=frames)
    k = (frames - 1) // 4

    lat = ours.encode(video)
    assert lat.shape == (2, cfg.z_dim, 1 + k, 2, 3)
    d_enc = max_abs_diff(lat, ref.encode(video, scale))  # upstream: frame 0, then chunks of 4; mu, normalised

    latents = random_latents(z=cfg.z_dim, t=1 + k)
    raw = ref.decode(latents, scale)  # upstream: one latent frame at a time; unclamped
    assert raw.shape == (2, 3, frames, 16, 24)
    d_dec = max_abs_diff(ours.decode(latents, clamp=False), raw)
    # the Wan2_1_VAE wrapper clamps; make sure the comparison above is not hidden behind saturation
    assert (raw.abs() < 1).float().mean() > 0.5
    d_clamped = max_abs_diff(ours.decode(latents), raw.clamp(-1, 1))
    # measured: 0.0 for all three in every case (bit-identical: same ops, same order, same memory layouts)
    assert max(d_enc, d_dec, d_clamped) < TOL, (d_enc, d_dec, d_clamped)


# -----------------------------------------------------------------------------------------------------------------------
# 2. parity with diffusers' AutoencoderKLWan, through the diffusers layout


@torch.no_grad()
def test_parity_with_diffusers():
    from diffusers import AutoencoderKLWan

    _, ours = original_and_ours(TINY, seed=3)
    dm = AutoencoderKLWan(**wan_vae.vae_config_to_diffusers(TINY)).eval()
    dm.load_state_dict(wan_vae.vae_to_diffusers(ours.state_dict()), strict=True)
    # the pipelines' normalisation (pipeline_wan.py, pipeline_wan_video2video.py): std enters as 1/std
    mean = torch.tensor(dm.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(dm.config.latents_std).view(1, 4, 1, 1, 1)

    video = random_video(f=9, seed=4)
    dist = dm.encode(video).latent_dist
    mu, log_var = ours.encode_moments(video)
    d_mu = max_abs_diff(mu, dist.mean)
    d_logvar = max_abs_diff(log_var.clamp(-30.0, 20.0), dist.logvar)  # diffusers clamps logvar
    d_enc = max_abs_diff(ours.encode(video), (dist.mean - mean) * inv_std)

    latents = random_latents(t=3, seed=5)
    sample = dm.decode(latents / inv_std + mean).sample  # clamped to [-1, 1] by diffusers
    assert (sample.abs() < 1).float().mean() > 0.5  # not saturated
    d_dec = max_abs_diff(ours.decode(latents), sample)
    # measured: 0.0, 0.0, 0.0, 0.0
    assert max(d_mu, d_logvar, d_enc, d_dec) < TOL, (d_mu, d_logvar, d_enc, d_dec)


# -----------------------------------------------------------------------------------------------------------------------
# 3. the full-size model: the release's keys, shapes, size and statistics; the diffusers layout


class _Built(Exception):
    pass


def released_original_kwargs() -> dict:
    """The kwargs upstream's own builder `_video_vae` passes to WanVAE_, with Wan2_1_VAE's z_dim (the builder would go
    on to load a checkpoint: it is stopped at the constructor)."""
    vae2_1 = wan_module("modules.vae2_1")
    z_dim = inspect.signature(vae2_1.Wan2_1_VAE).parameters["z_dim"].default
    with unittest.mock.patch.object(vae2_1, "WanVAE_", side_effect=_Built) as build, pytest.raises(_Built):
        vae2_1._video_vae(pretrained_path=None, z_dim=z_dim)
    return build.call_args.kwargs


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_full_size_matches_the_release():
    from diffusers import AutoencoderKLWan

    kwargs = released_original_kwargs()
    cfg = wan_vae.WanVAEConfig()
    assert original_kwargs(cfg) == kwargs  # our defaults are the release
    with torch.device("meta"):
        ref = wan_module("modules.vae2_1").WanVAE_(**kwargs)
        ours = wan_vae.WanVAE(cfg)
        dm = AutoencoderKLWan()  # diffusers' defaults are the release too
    sd = ours.state_dict()
    assert shapes(sd) == shapes(ref.state_dict())  # Wan2.1_VAE.pth loads with no renaming
    assert len(sd) == 194 and sum(p.numel() for p in ours.parameters()) == RELEASE_PARAMS

    # the diffusers layout: exactly AutoencoderKLWan's keys and shapes, and the two renames are inverses
    theirs = wan_vae.vae_to_diffusers(sd)
    assert shapes(theirs) == shapes(dm.state_dict())
    back = wan_vae.vae_from_diffusers(theirs)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)  # same tensors, same order
    dsd = dm.state_dict()
    assert list(wan_vae.vae_to_diffusers(wan_vae.vae_from_diffusers(dsd))) == list(dsd)

    # the configs
    assert wan_vae.vae_config_from_diffusers(dict(dm.config)) == cfg
    assert wan_vae.vae_config_to_diffusers(cfg) == {k: v for k, v in dm.config.items() if not k.startswith("_")}


def test_latent_statistics_agree():
    """Our constants == the Wan2_1_VAE wrapper's mean/std (built with its checkpoint loader stubbed out) == diffusers'
    latents_mean / latents_std."""
    from diffusers import AutoencoderKLWan

    vae2_1 = wan_module("modules.vae2_1")
    with unittest.mock.patch.object(vae2_1, "_video_vae", return_value=unittest.mock.MagicMock()):
        wrapper = vae2_1.Wan2_1_VAE(device="cpu")
    cfg = wan_vae.WanVAEConfig()
    assert torch.equal(wrapper.mean, torch.tensor(cfg.latents_mean))
    assert torch.equal(wrapper.std, torch.tensor(cfg.latents_std))
    defaults = inspect.signature(AutoencoderKLWan).parameters
    assert tuple(defaults["latents_mean"].default) == cfg.latents_mean
    assert tuple(defaults["latents_std"].default) == cfg.latents_std
    # and the model's buffers hold upstream's scale = [mean, 1/std]
    ours = wan_vae.WanVAE(cfg)
    assert torch.equal(ours.latents_mean.flatten(), wrapper.scale[0])
    assert torch.equal(ours.latents_inv_std.flatten(), wrapper.scale[1])


def test_diffusers_layout_tiny_and_errors():
    _, ours = original_and_ours(TINY)
    sd = ours.state_dict()
    theirs = wan_vae.vae_to_diffusers(sd)
    assert "decoder.up_blocks.2.upsamplers.0.resample.1.weight" in theirs  # 3 resnets + 1 upsampler per level
    assert "decoder.up_blocks.3.resnets.2.residual.0.gamma" not in theirs
    assert "decoder.up_blocks.3.resnets.2.norm1.gamma" in theirs
    back = wan_vae.vae_from_diffusers(theirs)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
    assert wan_vae.vae_config_from_diffusers(wan_vae.vae_config_to_diffusers(TINY)) == TINY
    # other VAEs' configs, and keys of other models
    with pytest.raises(ValueError, match="is_residual"):  # the Wan 2.2 TI2V VAE
        wan_vae.vae_config_from_diffusers({"is_residual": True, "patch_size": 2, "z_dim": 48})
    with pytest.raises(KeyError):
        wan_vae.vae_to_diffusers({"encoder.extra.weight": torch.zeros(1)})


# -----------------------------------------------------------------------------------------------------------------------
# 4. causality, and chunking that does not change the numbers


@torch.no_grad()
def test_causal_in_time():
    """Changing input frame k changes no latent frame before the one holding k (and decoding likewise): what a
    time-symmetric padding or a whole-clip norm/attention would break."""
    _, ours = original_and_ours(TINY, seed=6)
    video = random_video(f=13, seed=7)
    lat = ours.encode(video)  # (2, 4, 4, 2, 3)
    for k in (1, 4, 5, 12):
        edited = video.clone()
        edited[:, :, k] = -edited[:, :, k]
        j = (k - 1) // 4 + 1  # the latent frame holding frame k (frame 0 has latent 0 to itself)
        lat2 = ours.encode(edited)
        assert torch.equal(lat2[:, :, :j], lat[:, :, :j]), k
        assert not torch.allclose(lat2[:, :, j], lat[:, :, j]), k

    latents = random_latents(t=4, seed=8)
    out = ours.decode(latents, clamp=False)  # (2, 3, 13, 16, 24)
    for j in (1, 2, 3):
        edited = latents.clone()
        edited[:, :, j] += 1.0
        out2 = ours.decode(edited, clamp=False)
        first = 1 + 4 * (j - 1)  # latent j decodes to frames first .. first + 3
        assert torch.equal(out2[:, :, :first], out[:, :, :first]), j
        assert not torch.allclose(out2[:, :, first], out[:, :, first]), j


@torch.no_grad()
def test_chunking_does_not_change_outputs():
    """After frame 0, chunk lengths are a memory knob: bigger encoder chunks (any multiple of 4), all frames at once,
    and one pass with no cache at all (the layers' whole-sequence form) give upstream's chunked numbers."""
    ref, ours = original_and_ours(TINY, seed=9)
    scale = original_scale(TINY)
    video = random_video(f=13, seed=10)
    expected = ref.encode(video, scale)
    for chunk in (8, 12, None):
        assert max_abs_diff(ours.encode(video, chunk_frames=chunk), expected) < TOL, chunk  # measured 0.0
    whole = ours.conv1(ours.encoder(video)).chunk(2, dim=1)[0]  # cache=None: one pass over all 13 frames
    assert max_abs_diff((whole - ours.latents_mean) * ours.latents_inv_std, expected) < TOL  # measured 1.3e-7

    latents = random_latents(t=4, seed=11)
    expected = ref.decode(latents, scale)
    for chunk in (2, 3, None):
        # measured 1.8e-6, 1.9e-6, 1.9e-6 (float rounding: convs and norms over other frame counts)
        assert max_abs_diff(ours.decode(latents, chunk_latents=chunk, clamp=False), expected) < TOL, chunk
    z = latents / ours.latents_inv_std + ours.latents_mean
    assert max_abs_diff(ours.decoder(ours.conv2(z)), expected) < TOL  # cache=None; measured 2.6e-6


@torch.no_grad()
def test_attention_inside_levels_is_rejected_as_upstream_cannot_run_it():
    with pytest.raises(ValueError, match="attn_scales"):
        dataclasses.replace(TINY, attn_scales=(1.0,))
    # upstream builds the blocks, then its chunked encode passes them (feat_cache, feat_idx)
    ref = wan_module("modules.vae2_1").WanVAE_(**{**original_kwargs(TINY), "attn_scales": [1.0]})
    with pytest.raises(TypeError, match="positional argument"):
        ref.encode(random_video(f=1), original_scale(TINY))


def test_rejects_frame_counts_and_chunks_that_straddle_windows():
    ours = wan_vae.WanVAE(TINY)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ours.encode(torch.zeros(1, 3, 8, 16, 16))  # upstream would silently drop the last 3 frames
    with pytest.raises(ValueError, match="multiple of 4"):
        ours.encode(torch.zeros(1, 3, 9, 16, 16), chunk_frames=2)
    with pytest.raises(ValueError, match="latents"):
        ours.decode(torch.zeros(1, 3, 2, 2, 2))
