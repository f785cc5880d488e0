"""benchmarks/: the estimator (estimate.py) counts what the model has, and the side-by-side harness (compare.py) times
the same computation."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ holds the oracle-importing benchmarks
import compare  # noqa: E402
import estimate  # noqa: E402
import harness  # noqa: E402
import train  # noqa: E402
import unet3d  # noqa: E402
import wan_dit  # noqa: E402
from inprocess import run_script  # noqa: E402


@pytest.mark.slow
def test_estimator_counts_match_the_model():
    cfg = unet3d.UNET_PRESETS["tiny"]
    model = unet3d.UNet3D(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for _, p in train.select_trainable(model, "newmove"))
    counts = estimate.count_params(cfg, "newmove")
    assert counts == {"total": total, "trainable": trainable, "frozen": total - trainable,
                      "tensors": len(harness.trainable_names(model))}
    e = estimate.estimate(cfg, batch=1, frames=2, size=64, precision="fp32", frozen_dtype="fp32")
    assert e["counts"] == counts
    assert 0 < e["fwd_flops"] < e["step_flops"] < 4 * e["fwd_flops"]  # subset grads: between 1x and 3x forward
    assert e["memory"]["grads"] == 4 * trainable  # fp32 gradients of exactly the trainable tensors
    assert e["memory"]["peak"] >= e["memory"]["end_of_forward"] > 0


def test_allocator_peak_sees_a_known_allocation():
    n = 8 * 2 ** 20

    def fn():
        a = torch.ones(n // 4)  # n bytes, alive while b is made
        b = torch.ones(n // 4)
        return float(a[0] + b[0])

    peak = harness.allocator_peak(fn, torch.device("cpu"))
    assert 2 * n <= peak < 2 * n + 2 ** 20


@pytest.mark.slow
def test_side_by_side_compares_the_same_computation():
    """The bench's own cases on the smallest config: identical outputs, gradients and latents; finite timings."""
    cfg = compare.BENCH_CONFIGS["small"]
    cpu = torch.device("cpu")
    models = compare.build_pair(cfg)
    case = compare.forward_case(models, cfg, frames=2, hw=8, device=cpu)
    ours, theirs = case["fns"]["ours"](), case["fns"]["diffusers"]()
    assert ours.shape == theirs.shape == (1, 4, 2, 8, 8)
    assert (ours - theirs).abs().max().item() < 1e-4 and theirs.abs().mean() > 0.1
    stats = compare.summarize(compare.race(case["fns"], cpu, warmup=0, reps=2))
    assert all(math.isfinite(v) and v > 0 for s in ("ours", "diffusers", "ratio") for v in stats[s])

    step = compare.train_case(models, cfg, frames=2, hw=8, device=cpu)
    assert step["diff"] < 1e-4  # gradients of the trainable tensors, relative to their largest
    names = harness.trainable_names(models["ours"])
    assert step["trainable"] == sum(models["ours"].get_parameter(n).numel() for n in names)
    losses = {s: step["fns"][s]().item() for s in harness.SIDES}  # one real training step each, train() mode
    assert all(math.isfinite(v) for v in losses.values())

    ddim = compare.sampling_case(models, cfg, frames=2, hw=8, device=cpu, steps=3)
    assert ddim["diff"] < 1e-4  # of the decoded videos
    assert ddim["fns"]["ours"]().shape == ddim["fns"]["diffusers"]().shape == (1, 3, 2, 16, 16)  # tiny VAE: x2


@pytest.mark.slow
def test_selective_recompute_keeps_gradients_and_saves_memory():
    """Ours, with and without train.py --checkpointing selective: the same gradients as diffusers, a smaller step peak
    (allocator)."""
    cfg = compare.BENCH_CONFIGS["small"]
    cpu = torch.device("cpu")
    models = compare.build_pair(cfg)
    plain = compare.train_case(models, cfg, frames=4, hw=8, device=cpu)
    plain["fns"]["ours"]()  # warm-up: AdamW state resident, as in every later step
    plain_peak = harness.allocator_peak(plain["fns"]["ours"], cpu)
    models = compare.build_pair(cfg)  # (the steps above moved ours' weights away from diffusers')
    sel = compare.train_case(models, cfg, frames=4, hw=8, device=cpu, ours_checkpointing="selective")
    assert sel["diff"] < 1e-4
    peaks = {}
    for s in harness.SIDES:
        sel["fns"][s]()
        peaks[s] = harness.allocator_peak(sel["fns"][s], cpu)
    # without recompute ours keeps fewer tensors already (frozen convs keep no input; GroupNorm+SiLU and GEGLU keep
    # only their inputs); selective recompute drops most of the rest
    assert plain_peak < 0.9 * peaks["diffusers"], (plain_peak, peaks)
    assert peaks["ours"] < min(0.95 * plain_peak, 0.8 * peaks["diffusers"]), (plain_peak, peaks)


@pytest.mark.slow
@pytest.mark.parametrize("mode,free_grads", [("none", False), ("selective", False), ("full", False), ("full", True)])
def test_estimator_predicts_the_measured_step_peak(mode, free_grads):
    """--estimate's traced peak vs the same step really run (allocator), for each --checkpointing mode, and with
    train.py --free-grads (AdamW stepped per tensor inside backward, gradients freed) where it saves memory: with full
    checkpointing (without, the peak comes at the start of backward, before any gradient exists). Measured ratios
    real / predicted: 1.0003, 1.0086, 1.0026; with --free-grads 1.022 (a constant 0.17 MiB more on the toy preset, the
    same with a no-op update; 1.0009 on the tiny preset), hence 3% there."""
    cfg = unet3d.UNET_PRESETS["toy"]
    pred = estimate.estimate(cfg, 2, 4, 64, "newmove", mode, "fp32", "fp32", free_grads=free_grads)["memory"]["peak"]
    real = estimate.real_step_peak(cfg, 2, 4, 64, "newmove", mode, "fp32", "fp32", free_grads=free_grads)["peak"]
    assert abs(real / pred - 1) < (0.03 if free_grads else 0.02), (mode, real, pred)
    assert harness.parse_args(["--estimate", "--checkpointing"]).checkpointing == "full"  # the bare flag


@pytest.mark.parametrize("mode", ["none", "full"])
def test_wan_estimator_predicts_the_measured_step_peak(mode):
    """The DiT's estimate (estimate_wan: the traced peak of one step) against the same step run for real on the CPU
    (allocator peak), with and without per-block checkpointing, on a small DiT with the 1.3B's structure."""
    cfg = wan_dit.WanDiTConfig(text_len=24, in_dim=4, out_dim=4, dim=96, ffn_dim=256, freq_dim=32, text_dim=48,
                               num_heads=2, num_layers=3)
    frames, height, width = 9, 64, 96  # 3 x 8 x 12 latents, 72 tokens
    pred = estimate.estimate_wan(cfg, 2, frames, height, width, "dit-newmove", mode, "fp32", "fp32",
                                 flops=False)["memory"]["peak"]
    model = harness.randomize_(wan_dit.WanDiT(cfg), seed=0).set_checkpointing(mode == "full")
    harness.set_trainable(model, [n for n, _ in train.select_trainable(model, "dit-newmove")])
    model.train()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 3, 8, 12, generator=g), torch.rand(2, generator=g) * 1000
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)

    def step():
        model(x, t, ctx).float().square().mean().backward()
        for p in model.parameters():
            p.grad = None

    step()  # warm-up (the RoPE table is cached: not part of a step)
    real = harness.allocator_peak(step, torch.device("cpu"))
    assert abs(real / pred - 1) < 0.02, (mode, real, pred)  # measured real / predicted: 0.996 (none), 0.998 (full)


@pytest.mark.slow
def test_estimator_counts_autocast_copies_where_full_checkpointing_keeps_them():
    """bf16 autocast with full checkpointing: autocast caches the trainable weights' bf16 copies only while the forward
    runs; in backward each recomputed layer re-casts its own. The estimate, max(forward + all copies, backward + the
    copies outside the checkpointed layers and of the largest one), against the real step (tiny preset, 1+1 clips,
    4 frames at 64²): measured 9.69 MiB, predicted 9.97 (0.971; the bound is conservative and bf16 keeps norm outputs
    in fp32, ~5% over the trace). The two wrong accountings fall outside the band: all copies resident (the former
    estimate, 11.27 MiB: 0.860) and none (the traced 9.16: 1.058)."""
    cfg = unet3d.UNET_PRESETS["tiny"]
    e = estimate.estimate(cfg, 2, 4, 64, "newmove", "full", "bf16", "bf16", flops=False)
    real = estimate.real_step_peak(cfg, 2, 4, 64, "newmove", "full", "bf16", "bf16")["peak"]
    band = lambda pred: 0.94 < real / pred < 1.03  # noqa: E731
    traced, cache = e["memory"]["peak"], 2 * e["counts"]["trainable"]
    assert band(e["in_step"]) and not band(traced + cache) and not band(traced), (real, e["in_step"], traced, cache)


def test_time_breakdown_separates_kernels_from_the_rest():
    """The benchmark's 'where the time goes' table: matmul/conv/attention ops count as kernels, element-wise ops not."""
    cpu, a = torch.device("cpu"), torch.randn(768, 768)  # ~10 ms a call: profiler overhead is a small share
    mm = compare.time_breakdown(lambda: a @ a, cpu, calls=3)
    assert mm["kernel"] / mm["total"] > 0.9, mm
    ew = compare.time_breakdown(lambda: (a * 2 + 1).relu_(), cpu)
    assert ew["kernel"] == 0 and ew["total"] > 0, ew
    # ~2 ms a call, most of it in the conv and attention (a 0.4 ms case fell to 0.15 kernel share next to other tests)
    x, w = torch.randn(1, 32, 8, 16, 16), torch.randn(32, 32, 3, 1, 1, requires_grad=True)
    q = torch.randn(1, 2, 256, 32, requires_grad=True)
    conv_attn = compare.time_breakdown(lambda: (torch.nn.functional.conv3d(x, w, padding=(1, 0, 0)).sum()
                                                + torch.nn.functional.scaled_dot_product_attention(q, q, q).sum()
                                                ).backward(), cpu)
    assert conv_attn["kernel"] > 0.3 * conv_attn["total"], conv_attn


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench.py", "compare.py"])
def test_estimate_runs_from_the_readme_command_and_from_compare_py(script, capfd):
    """bench.py (the documented command) dispatches --estimate to estimate.py; a direct run of compare.py hands it on.
    That command runs as a user runs it, in a process of its own; compare.py's command line in this process
    (inprocess.run_script)."""
    args = ["--estimate", "--preset", "tiny", "--frames", "2", "--size", "64", "--batch", "1", "--precision", "fp32",
            "--threads", "1"]
    if script == "bench.py":
        r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / script), *args],
                           capture_output=True, text=True, timeout=300)
    else:
        r = run_script(capfd, f"benchmarks/{script}", *args)
    assert r.returncode == 0 and "parameters: total" in r.stdout and "GPU memory budget" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_gpu_check_runs_every_memory_option_in_its_tiny_cpu_mode(tmp_path):
    """benchmarks/gpu_check.py --tiny (the CUDA check's code on the CPU): each memory option trains, its peak is measured
    next to the estimator's total for the same step (within 3%: measured 0.993-1.003), and the results files are
    written; 8-bit options say why they were skipped when bitsandbytes is missing."""
    import gpu_check

    # two steps: with --free-grads the first one creates the optimizer state during backward, so only the second
    # holds all of it at its peak (the first alone measured 0.85 of the prediction)
    records = gpu_check.main(["--tiny", "--steps", "1", "--out", str(tmp_path)])
    assert [r["option"] for r in records] == list(estimate.OPTIONS)
    for r in records:
        if "skipped" in r:
            assert "bitsandbytes" in r["skipped"] and not gpu_check.optim.has_bitsandbytes(), r
            continue
        assert abs(r["measured_over_predicted"] - 1) < 0.03, r
    lines = (tmp_path / "gpu_check.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "| 64² | adamw |" in (tmp_path / "gpu_check.md").read_text()
    # the saving each option is for: 8-bit state, gradients freed (full checkpointing, the default)
    by = {r["option"]: r["predicted_bytes"] for r in records}
    assert by["adamw8bit"] < by["adamw"] and by["free-grads"] < by["adamw"]


def test_delta_sizes_of_the_released_model(capsys):
    """The 1.7B NewMove delta counted on the meta device (bench.py --estimate --delta-sizes): 570,882,176 values in
    826 tensors, the file sizes docs/sampling.md lists (rank 16 and whole, fp32 and bf16)."""
    assert estimate.main(["--delta-sizes", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["newmove delta of modelscope-1.7b: 826 tensors, 570,882,176 values", "| rank | 16 | whole |",
                   "| --- | --- | --- |", "| fp32 | 54.6 MB | 2,283.5 MB |", "| bf16 | 27.3 MB | 1,141.8 MB |"]
