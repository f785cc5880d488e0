"""UNet3D: parity with the original ModelScope UNetSD and with diffusers, the full-size key map, round trips, errors."""

import dataclasses
import json

import pytest
import torch

import layouts
import memory
import unet3d
from oracles import TINY_ORIGINAL, max_abs_diff, original_unet, randomize_, release_keys
from weights import WeightsError

def _shape(s: str):
    return tuple(int(x) for x in s.strip("()").split(",") if x.strip())


def _meta_state(cfg):
    with torch.device("meta"):
        return unet3d.UNet3D(cfg).state_dict()


def test_full_size_keys_match_both_release_layouts():
    sd = _meta_state(unet3d.UNet3DConfig())
    assert len(sd) == 1480
    assert sum(v.numel() for v in sd.values()) == 1_411_233_860
    # original file: same key set, same shapes
    original = dict(release_keys("ms_unet_keys"))
    ours_as_original = layouts.unet_to_original(sd, unet3d.UNet3DConfig())
    assert set(ours_as_original) == set(original)
    for k, v in ours_as_original.items():
        assert tuple(v.shape) == _shape(original[k]), k
    # diffusers: our names ARE the diffusers names; our key map equals diffusers' conversion table
    rows = release_keys("ms_unet_to_diffusers_keymap")[1:]  # (a header row first)
    assert len(rows) == 1480
    key_map = layouts.unet_original_key_map(unet3d.UNet3DConfig(), sd.keys())
    for orig, diff, transform, diff_shape in rows:
        assert tuple(sd[diff].shape) == _shape(diff_shape), diff
        assert key_map[diff] == orig
        assert (transform == "squeeze(-1)") == layouts._is_temporal_proj(diff)


def test_parity_with_original_modelscope_unet(tmp_path):
    ref = original_unet()
    path = tmp_path / "text2video_pytorch_model.pth"
    torch.save(ref.state_dict(), path)
    cfg = layouts.unet_config_from_original(TINY_ORIGINAL)
    ours = layouts.load_unet(path, cfg)
    g = torch.Generator().manual_seed(0)
    for frames, t in [(1, [999, 0]), (3, [981, 1]), (5, [500, 37])]:
        x = torch.randn(2, 4, frames, 16, 16, generator=g)
        ctx = torch.randn(2, 7, 1024, generator=g)
        t = torch.tensor(t)
        with torch.no_grad():
            want = ref(x, t, ctx)
            got = ours(x, t, ctx)
        err = max_abs_diff(got, want)
        assert err <= 1e-5, f"F={frames}: max abs diff {err}"
        assert want.abs().mean() > 0.1  # a real signal, not a collapsed output


def _diffusers_unet(seed=0):
    from diffusers import UNet3DConditionModel

    ref = UNet3DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8, norm_num_groups=8,
        cross_attention_dim=48, down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"))
    return randomize_(ref, seed)


def test_parity_with_diffusers_unet(tmp_path):
    ref = _diffusers_unet()
    ref.save_pretrained(tmp_path / "unet", safe_serialization=True)
    cfg = layouts.unet_config_from_diffusers(json.loads((tmp_path / "unet" / "config.json").read_text()))
    ours = layouts.load_unet(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", cfg)
    g = torch.Generator().manual_seed(1)
    for frames, t in [(2, [981, 1]), (4, [250, 750])]:
        x = torch.randn(2, 4, frames, 16, 16, generator=g)
        ctx = torch.randn(2, 5, 48, generator=g)
        with torch.no_grad():
            want = ref(x, torch.tensor(t), ctx).sample
            got = ours(x, torch.tensor(t), ctx)
        err = max_abs_diff(got, want)
        assert err <= 1e-5, f"F={frames}: max abs diff {err}"
        assert want.abs().mean() > 0.1


@pytest.mark.slow
def test_round_trip_both_layouts(tmp_path):
    cfg = layouts.unet_config_from_original(TINY_ORIGINAL)
    model = randomize_(unet3d.UNet3D(cfg), seed=3)
    for layout, name in [("original", "unet.pth"), ("diffusers", "unet.safetensors"), ("diffusers", "unet.bin")]:
        layouts.save_unet(model, tmp_path / name, layout=layout)
        back = layouts.load_unet(tmp_path / name, cfg)
        a, b = model.state_dict(), back.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(WeightsError, match="already exists"):
        layouts.save_unet(model, tmp_path / "unet.pth", layout="original")


@pytest.mark.slow
def test_gradient_checkpointing_gives_identical_gradients():  # full and selective recomputation
    cfg = unet3d.UNET_PRESETS["tiny"]
    model = randomize_(unet3d.UNet3D(cfg), seed=4).train()
    x, ctx = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, cfg.cross_attention_dim)
    t = torch.tensor([10, 900])
    grads = []
    for ckpt in ("none", "full", "selective"):
        model.zero_grad()
        model.set_recompute(ckpt)
        torch.manual_seed(0)  # same dropout masks in both runs (checkpointing replays the RNG state)
        model(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        assert all(torch.allclose(grads[0][n], other[n], atol=1e-6, rtol=1e-5) for n in grads[0])
    # the element-wise intermediates kept instead of recomputed (toy demo): the same ops, so the same bits
    model.set_recompute("none", elementwise=False)
    model.zero_grad()
    torch.manual_seed(0)
    model(x, t, ctx).square().mean().backward()
    assert all(torch.equal(grads[0][n], p.grad) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="selective"):
        model.set_recompute("partial")
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_bf16_autocast_runs_and_stays_close():
    cfg = unet3d.UNET_PRESETS["tiny"]
    model = randomize_(unet3d.UNet3D(cfg), seed=5)
    x, ctx = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 5, cfg.cross_attention_dim)
    with torch.no_grad():
        ref = model(x, torch.tensor([500]), ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, torch.tensor([500]), ctx)
    assert low.dtype == torch.bfloat16 and low.shape == ref.shape
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.3f}"


def test_scalar_timestep_and_batch_independence():
    cfg = unet3d.UNET_PRESETS["tiny"]
    model = randomize_(unet3d.UNet3D(cfg), seed=6)
    x, ctx = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, cfg.cross_attention_dim)
    with torch.no_grad():
        both = model(x, 300, ctx)
        one = model(x[1:], torch.tensor([300]), ctx[1:])
    assert both.shape == x.shape
    assert max_abs_diff(both[1:], one) <= 1e-5  # videos in a batch do not see each other


def test_bad_inputs_give_clear_errors(tmp_path):
    cfg = unet3d.UNET_PRESETS["tiny"]
    with pytest.raises(WeightsError, match="not found.*UNet weights"):
        layouts.load_unet(tmp_path / "nope.safetensors", cfg)
    sd = unet3d.UNet3D(cfg).state_dict()
    sd["bogus.weight"] = torch.zeros(1)
    del sd["conv_in.bias"]
    torch.save(sd, tmp_path / "keys.pth")
    with pytest.raises(WeightsError) as e:
        layouts.load_unet(tmp_path / "keys.pth", cfg)
    assert "missing (1): conv_in.bias" in str(e.value) and "unexpected (1): bogus.weight" in str(e.value)
    assert "diffusers UNet3DConditionModel" in str(e.value)  # the detected layout
    bigger = dataclasses.replace(cfg, in_channels=8)
    torch.save(unet3d.UNet3D(bigger).state_dict(), tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"conv_in.weight: file has \(32, 8, 3, 3\), model expects \(32, 4, 3, 3\)"):
        layouts.load_unet(tmp_path / "shape.pth", cfg)
    with pytest.raises(ValueError, match="divisible"):
        unet3d.UNet3D(cfg)(torch.randn(1, 4, 2, 5, 6), 1, torch.randn(1, 5, 64))


@pytest.mark.parametrize("autocast", [False, True])
def test_memory_saving_layers_give_torchs_gradients(autocast):
    """Frozen Conv2d (keeps no input), GroupNorm+SiLU and GEGLU (keep only their input, recompute in backward),
    Dropout (keeps a 1-byte mask): the same outputs and gradients as the plain torch ops (the same dropout mask for the
    same seed), in fp32 and under bf16 autocast, and fewer bytes kept."""
    torch.manual_seed(0)
    norm, conv = memory.GroupNormSiLU(4, 8), memory.Conv2d(8, 6, 3, stride=2, padding=1).requires_grad_(False)
    geglu, drop = unet3d.GEGLU(6, 12), memory.Dropout(0.3).train()
    randomize_(norm)

    def ours(x):
        h = conv(drop(norm(x)))  # (2, 6, 4, 4)
        return geglu(h.permute(0, 2, 3, 1))  # (2, 4, 4, 12)

    def plain(x):
        h = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
        h = torch.nn.functional.dropout(torch.nn.functional.silu(h), 0.3, training=True)
        h = torch.nn.functional.conv2d(h, conv.weight, conv.bias, 2, 1)
        value, gate = geglu.proj(h.permute(0, 2, 3, 1)).chunk(2, dim=-1)
        return value * torch.nn.functional.gelu(gate)

    x = torch.randn(2, 8, 7, 8, requires_grad=True)
    params = [x, norm.weight, norm.bias, *geglu.parameters()]
    results, kept = [], []
    for fn in (ours, plain):
        saved = []
        torch.manual_seed(1)  # the same dropout mask
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(x)
        results.append((y, torch.autograd.grad(y.float().square().sum(), params)))
        # bytes of the activations kept (not the weights)
        kept.append(sum(t.numel() * t.element_size() for t in saved if t.numel() >= x.numel() // 2))
    (y1, g1), (y2, g2) = results
    assert y1.dtype == y2.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert kept[0] < 0.7 * kept[1], kept
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        drop(x)
    assert [t.dtype for t in saved] == [torch.bool]  # torch's CPU dropout keeps a float32 mask
