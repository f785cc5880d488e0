"""delta.py: noise-gated deltas (exact at both ends, one switch per video) and low-rank compression (exact at full
rank, loads like any delta), on tiny random models."""

import copy
import math
from pathlib import Path

import pytest
import torch

import delta
import sample
import train
from models import load_models, save_models, tiny_models
from weights import WeightsError, read_state_dict, save_state_dict, weights_id

KW = dict(frames=2, height=32, width=32, steps=4, progress=False)  # DDIM t = 751, 501, 251, 1
PROMPTS, SEEDS = ["a red circle moving left", "a blue square growing"], [5, 6]
BASE = tiny_models(seed=3)  # never changed: each test works on a copy


def newmove_delta(models, path, scale=0.05, seed=0):
    """A delta file changing every tensor NewMove trains (random changes of a realistic size)."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"unet.{n}": p.detach() + scale * torch.randn(p.shape, generator=g)
          for n, p in train.select_trainable(models.unet, "newmove")}
    save_state_dict(sd, path)
    return sd


def videos(path=None, from_t=None, batch_size=1):
    models = copy.deepcopy(BASE)
    if path:
        delta.apply_delta(models, path, from_t)
    return models, sample.generate(models, PROMPTS, SEEDS, batch_size=batch_size, **KW)


@pytest.mark.slow
def test_noise_gate_is_exact_at_both_ends_and_switches_once_per_video(tmp_path):
    path = tmp_path / "delta.safetensors"
    sd = newmove_delta(BASE, path)
    _, base = videos()
    _, plain = videos(path)
    assert not torch.equal(base, plain)  # the delta changes the videos, so the checks below can fail
    gated0, zero = videos(path, from_t=0)
    assert torch.equal(zero, plain) and gated0.gate.switches == 0  # TAU = 0: the delta at every step, bit for bit
    _, above = videos(path, from_t=752)  # above the first step's t = 751: the base model at every step
    assert torch.equal(above, base)
    models, mid = videos(path, from_t=400)  # t = 751, 501 customized; 251, 1 base
    assert not torch.equal(mid, plain) and not torch.equal(mid, base)
    assert models.gate.switches == 2 * len(PROMPTS)  # per video: to base once, back to the delta for the next one
    for key, value in sd.items():  # and the model is left customized, as it was given
        assert torch.equal(models.unet.get_parameter(key[len("unet."):]), value)
    models, batched = videos(path, from_t=400, batch_size=2)
    assert models.gate.switches == 2 and (batched.int() - mid.int()).abs().max() <= 1  # one switch per batch
    with pytest.raises(WeightsError, match="already carry a noise-gated delta"):
        delta.apply_delta(models, path, 400)
    with pytest.raises(WeightsError, match="must be in 0..1000"):
        delta.apply_delta(copy.deepcopy(BASE), path, -1)


def test_noise_gate_keeps_only_the_changed_tensors_twice(tmp_path):
    models = copy.deepcopy(BASE)
    sd = newmove_delta(models, tmp_path / "delta.safetensors")
    delta.apply_delta(models, tmp_path / "delta.safetensors", 500)
    held = sum(v.numel() for v in models.gate.spare.values())
    assert held == sum(v.numel() for v in sd.values()) < sum(p.numel() for p in models.unet.parameters())


@pytest.mark.slow
def test_low_rank_delta_reproduces_at_full_rank_and_shrinks_below(tmp_path):
    base_sd = BASE.unet.state_dict()
    path, full, small = tmp_path / "delta.safetensors", tmp_path / "full.safetensors", tmp_path / "r2.safetensors"
    sd = newmove_delta(BASE, path)
    # full rank (factors of every matrix and conv kernel, even where larger than the tensor): every tensor reproduced
    factors = {}
    for key, value in sd.items():
        name = key[len("unet."):]
        if value.dim() < 2:
            factors[key] = value
        else:
            factors[f"lowrank.{name}.up"], factors[f"lowrank.{name}.down"] = delta.low_rank(value - base_sd[name], 10**6)
    save_state_dict(factors, full)
    exact, reloaded = copy.deepcopy(BASE), copy.deepcopy(BASE)
    delta.apply_delta(exact, path)
    delta.apply_delta(reloaded, full)
    for key in sd:
        a, b = exact.unet.get_parameter(key[5:]), reloaded.unet.get_parameter(key[5:])
        assert (a - b).abs().max() <= 1e-6 * max(1.0, a.abs().max().item()), key
    # rank 2 through the command: smaller, temporal convs (5-d kernels) included, loads on the unchanged base model
    root = save_models(BASE, tmp_path / "base", "diffusers")
    assert delta.main(["compress", "--model", str(root), "--delta", str(path), "--rank", "2", "--out", str(small)]) == 0
    low = read_state_dict(small)
    assert {k.split(".")[0] for k in low} == {"lowrank", "unet"}  # vectors (biases, norms) stay whole
    assert sum(v.numel() for v in low.values()) < sum(v.numel() for v in sd.values()) / 2
    m = copy.deepcopy(BASE)
    delta.apply_delta(m, small)
    conv = next(k for k in low if ".temp_convs." in k and k.endswith(".up"))[len("lowrank."):-len(".up")]
    change = m.unet.get_parameter(conv) - base_sd[conv]
    assert change.dim() == 5 and torch.linalg.matrix_rank(change.reshape(change.shape[0], -1)) == 2
    # the energy rule keeps at least that share of each change's squared norm, with fewer than all singular values
    change = sd[f"unet.{conv}"] - base_sd[conv]
    up, down = delta.low_rank(change, energy=0.9)
    kept = (up @ down).reshape(change.shape)
    assert kept.pow(2).sum() >= 0.9 * change.pow(2).sum() * (1 - 1e-5) and up.shape[1] < min(up.shape[0], down.shape[1])


def test_compress_refuses_bad_input(tmp_path, capsys):
    root = save_models(BASE, tmp_path / "base", "diffusers")
    save_state_dict({"unet.nope.weight": torch.zeros(2, 2)}, tmp_path / "bad.safetensors")
    assert delta.main(["compress", "--model", str(root), "--delta", str(tmp_path / "bad.safetensors"), "--rank", "4",
                       "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "nope.weight is not a parameter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        delta.main(["compress", "--model", str(root), "--delta", "x.safetensors", "--rank", "0", "--out", "o.safetensors"])


def test_file_bytes_of_whole_and_compressed_tensors():
    """A (8, 4, 3, 1, 1) conv kernel is an 8 x 12 matrix: rank r stores r * (8 + 12) values; biases stay whole."""
    shapes = [(8, 4, 3, 1, 1), (8,)]
    assert delta.file_bytes(shapes, 2, 4) == 4 * (2 * (8 + 12) + 8) and delta.file_bytes(shapes, 0, 2) == 2 * (96 + 8)
    assert math.isclose(delta.file_bytes(shapes, 100, 1), 96 + 8)  # never more than whole tensors


@pytest.mark.slow
def test_a_delta_on_other_weights_of_the_same_shapes_warns_naming_both(tmp_path, capsys):
    """ZeroScope and ModelScope share every shape, so a delta trained on one loads onto the other: the base weights it
    records (train.py: weights_id, a few bytes per tensor) are compared, and a mismatch is one warning line naming
    both. The same weights from another folder or layout, or a delta recording no base, say nothing."""
    sd = newmove_delta(BASE, tmp_path / "plain.safetensors")
    trained_on = {"base_model": "zeroscope_v2_576w", "base_weights": weights_id(BASE.unet.state_dict())}
    path = save_state_dict(sd, tmp_path / "delta.safetensors", metadata=trained_on)
    delta.apply_delta(load_models(save_models(BASE, tmp_path / "same", "original")), path)
    assert capsys.readouterr().err == ""
    other = save_models(tiny_models(seed=5), tmp_path / "other", "diffusers")
    delta.apply_delta(load_models(other), path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {path} was trained on zeroscope_v2_576w (weights "), err
    assert f"not on {other} (weights " in err and "expect worse videos" in err
    delta.apply_delta(load_models(other), tmp_path / "plain.safetensors")
    assert capsys.readouterr().err == ""
    small = tmp_path / "small.safetensors"  # compress takes the change against --model: it warns as well
    assert delta.main(["compress", "--model", str(other), "--delta", str(path), "--rank", "2", "--out", str(small)]) == 0
    assert f"warning: {path} was trained on zeroscope_v2_576w" in capsys.readouterr().err


def test_a_delta_for_other_shapes_is_refused_in_one_line(tmp_path):
    """The toy model's UNet has other widths than the tiny one: whole tensors, low-rank pairs (no reshape error) and
    learned token rows of the wrong width are each refused by one WeightsError naming both models."""
    toy = load_models(Path(__file__).resolve().parents[1] / "toy" / "model")
    name = "up_blocks.1.temp_convs.0.conv1.0.bias"
    kernel = next(n for n, v in toy.unet.state_dict().items() if ".temp_convs." in n and v.dim() == 5)
    cases = {"unet": {f"unet.{name}": BASE.unet.get_parameter(name).detach()},
             "lowrank": {f"lowrank.{kernel}.up": torch.ones(16, 1), f"lowrank.{kernel}.down": torch.ones(1, 48)},
             "token": {"text_encoder.placeholder_embeddings": torch.ones(1, 32)}}  # the toy's rows are 64 wide
    for kind, tensors in cases.items():
        path = save_state_dict(tensors, tmp_path / f"{kind}.safetensors", metadata={"base_model": "tiny-model",
                                                                                      "placeholder_words": '["<pll>"]'})
        with pytest.raises(WeightsError) as e:
            delta.apply_delta(toy, path)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
        assert "a delta for a" in str(e.value) and "(trained on tiny-model, applied to " in str(e.value)


def test_noise_gate_boundary_step_t_equal_to_tau_uses_the_delta(tmp_path):
    """`from_t=TAU`: the delta for steps with t >= TAU. TAU = 501, a t the 4-step DDIM sampler visits (751, 501, 251,
    1), so `t > TAU` and `t >= TAU` differ at that step. The UNet's weights are read at each call (not the gate's own
    flag): a forward pre-hook records whether a changed tensor holds its customized value."""
    path = tmp_path / "delta.safetensors"
    sd = newmove_delta(BASE, path)
    key, custom = next(iter(sd.items()))
    ts = sample.ddim_timesteps(KW["steps"])
    tau = ts[1]
    assert tau == 501 and ts == [751, 501, 251, 1]
    runs = {}
    for from_t in (tau, 400):
        models = copy.deepcopy(BASE)
        delta.apply_delta(models, path, from_t)
        param, used = models.unet.get_parameter(key[len("unet."):]), []
        record = lambda m, args, used=used, param=param: used.append((int(args[1][0]), torch.equal(param, custom)))
        models.unet.register_forward_pre_hook(record)
        runs[from_t] = sample.generate(models, PROMPTS[:1], SEEDS[:1], **dict(KW, height=16, width=16))
        assert used == [(t, t >= from_t) for t in ts], (from_t, used)
    assert torch.equal(runs[tau], runs[400])  # the step at t = TAU is customized: the same video as any TAU in (251, 501]
