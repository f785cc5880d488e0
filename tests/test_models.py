"""Whole model directories: both release layouts load to the same models, diffusers reads what we write, the weights
are held once in memory, and bad directories give clear errors."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import layouts
import unet3d
import weights
from inprocess import run_script
from oracles import max_abs_diff
from weights import WeightsError
from models import check, load_models, RELEASED_SCHEDULE, save_models, tiny_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    models = tiny_models(seed=1)
    tmp = tmp_path_factory.mktemp("models")
    return models, {layout: save_models(models, tmp / layout, layout) for layout in ("original", "diffusers")}


@pytest.mark.slow
def test_both_layouts_load_the_same_models(tiny_dirs):
    models, dirs = tiny_dirs
    for layout, folder in dirs.items():
        loaded = load_models(folder)
        assert loaded.layout == layout
        assert loaded.schedule == RELEASED_SCHEDULE
        for name in ("unet", "vae", "text_encoder"):
            want, got = getattr(models, name), getattr(loaded, name)
            assert got.cfg == want.cfg, (layout, name)
            a, b = want.state_dict(), got.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (layout, name)
    videos = [check(load_models(folder)) for folder in dirs.values()]
    assert torch.equal(videos[0], videos[1])


@pytest.mark.slow
def test_diffusers_reads_the_diffusers_layout_we_write(tiny_dirs):
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextModel

    models, dirs = tiny_dirs
    root = dirs["diffusers"]
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), torch.tensor([321])
    tokens = models.tokenizer(["a red circle moving left"])
    with torch.no_grad():
        ref_unet = UNet3DConditionModel.from_pretrained(root / "unet").eval()
        assert max_abs_diff(ref_unet(x, t, ctx).sample, models.unet(x, t, ctx)) <= 1e-5
        ref_vae = AutoencoderKL.from_pretrained(root / "vae").eval()
        z = torch.randn(2, 4, 8, 8, generator=g)
        assert max_abs_diff(ref_vae.decode(z).sample, models.vae.decode_frames(z)) <= 1e-5
        ref_text = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
        assert max_abs_diff(ref_text(tokens).last_hidden_state, models.text_encoder(tokens)) <= 1e-5


def test_fp16_variant_and_dtype(tiny_dirs, tmp_path):
    models, dirs = tiny_dirs
    root = tmp_path / "fp16"
    save_models(models, root, "diffusers")
    for sub, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        f = root / sub / f"{name}.safetensors"
        sd = weights.read_state_dict(f)
        weights.save_state_dict({k: v.half() for k, v in sd.items()}, root / sub / f"{name}.fp16.safetensors")
        f.unlink()  # only the fp16 variant is left
    with pytest.raises(WeightsError, match="no UNet weights found"):
        load_models(root)
    half = load_models(root, variant="fp16", dtype=None)
    assert next(half.unet.parameters()).dtype == torch.float16
    full = load_models(root, variant="fp16")  # default: cast to float32 on load
    w = full.unet.conv_in.weight
    assert w.dtype == torch.float32 and torch.equal(w, models.unet.conv_in.weight.half().float())


@pytest.mark.slow
def test_weights_are_held_once(tmp_path):
    """Meta-device build + assign: loading a ~270 MB UNet raises peak memory by about one copy, not two. The files are
    written here; each load is measured in a fresh process of its own (peak RSS only grows)."""
    probe = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch, layouts, unet3d
        cfg = unet3d.UNet3DConfig(block_out_channels=(160, 320), cross_attn_levels=(True, True), head_dim=32)
        path = sys.argv[1]
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = layouts.load_unet(path, cfg)
        total = sum(float(p.sum()) for p in model.parameters())  # touch every weight
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024)
    """)
    cfg = unet3d.UNet3DConfig(block_out_channels=(160, 320), cross_attn_levels=(True, True), head_dim=32)
    unet = unet3d.UNet3D(cfg)
    for layout, name in [("original", "unet.pth"), ("diffusers", "unet.safetensors")]:
        layouts.save_unet(unet, tmp_path / name, layout=layout)
    del unet
    for layout, name in [("original", "unet.pth"), ("diffusers", "unet.safetensors")]:
        path = tmp_path / name
        grew = int(subprocess.run([sys.executable, "-c", probe, str(path)], check=True,
                                  capture_output=True, text=True).stdout)
        size = path.stat().st_size
        assert size > 200e6
        assert grew < 1.4 * size, f"{name}: loading grew memory by {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


def test_bad_directories_give_clear_errors(tiny_dirs, tmp_path):
    with pytest.raises(WeightsError, match="nowhere: not a directory"):
        load_models(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="neither layout found"):
        load_models(tmp_path / "empty")
    _, dirs = tiny_dirs
    broken = tmp_path / "broken"
    save_models(tiny_models(), broken, "original")
    (broken / "VQGAN_autoencoder.pth").unlink()
    with pytest.raises(WeightsError, match=r"VQGAN_autoencoder.pth: file not found; expected the"):
        load_models(broken)
    conf = json.loads((broken / "configuration.json").read_text())
    del conf["model"]["model_cfg"]["unet_dim"]
    (broken / "configuration.json").write_text(json.dumps(conf))
    with pytest.raises(WeightsError, match="configuration.json: unusable.*unet_dim"):
        load_models(broken)
    with pytest.raises(WeightsError, match="refusing to overwrite"):
        save_models(tiny_models(), dirs["original"], "original")


@pytest.mark.slow
def test_check_cli(tmp_path, tiny_dirs, capfd):
    """models.py as a user runs it (a process of its own), then its refusal of a bad folder (in this process)."""
    _, dirs = tiny_dirs
    run = subprocess.run([sys.executable, str(ROOT / "models.py"), str(dirs["original"]), "--frames", "2"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "original layout" in run.stdout and "VAE decode (2, 3, 2, 64, 64)" in run.stdout
    run = run_script(capfd, "models.py", tmp_path)
    assert run.returncode == 2 and "neither layout found" in run.stderr and "Traceback" not in run.stderr
