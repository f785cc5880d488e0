"""What a user sees when something is wrong: every bad input, interruption or odd file gets a one-line message naming
the file or option (never a bare traceback), before the heavy work, and nothing the user has is lost or overwritten.
The command-line cases run the scripts as subprocesses, as a user would."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
import weights
from models import load_models
from test_train import _moving_square, _write_mp4, world  # noqa: F401 (world is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=300):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r.returncode, r.stdout + r.stderr


def refused(script, *args, names=()):
    """Run a command that must fail cleanly; return its output (asserts: non-zero, no traceback, names each of
    `names`)."""
    code, text = run(script, *args)
    assert code != 0, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    for name in names:
        assert str(name) in text, (name, text[-2000:])
    return text


def train_args(root, model, out, *extra):
    return ["--model", model, "--videos", root / "videos", "--reg-videos", root / "reg", "--reg-caption",
            "a square moving", "--frames", "4", "--size", "32", "--lr", "1e-3", "--precision", "fp32",
            "--log-every", "1", "--seed", "2", "--out", out, *extra]


def test_the_project_stands_alone():
    """Nothing in the repository reads or cites files beside it (the team's reference folder exists only next to
    its checkouts): every "method.md §7.2"-style citation resolves to a section heading of docs/<name>.md."""
    import re

    sources = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("toy/*.py"), *ROOT.glob("benchmarks/*.py"),
               *ROOT.glob("*.md"), *ROOT.glob("toy/*.md")]
    headings = {p.name: re.findall(r"^#+ (\d+(?:\.\d+)*)\.? ", p.read_text(), re.M) for p in ROOT.glob("docs/*.md")}
    for path in sources:
        if path.name == "test_cli.py":  # (this file names what it looks for)
            continue
        text = path.read_text()
        outside = ("../" + "shared", "shared" + "/reference")  # the team's folder beside its checkouts
        assert not any(o in text for o in outside), path
        for name, section in re.findall(r"\b(method|modelscope|performance)\.md'?s? §(\d+(?:\.\d+)*)", text):
            assert section in headings.get(f"{name}.md", []), f"{path.name} cites {name}.md §{section}"


# ------------------------------------------------------------------------------------------------------- train.py


def test_resume_refuses_unreadable_checkpoints_before_loading(world, tmp_path):  # noqa: F811
    root, model = world
    out = tmp_path / "run"
    out.mkdir()
    good = tmp_path / "good"
    assert run("train.py", *train_args(root, model, good, "--steps", "2", "--ckpt-every", "1"))[0] == 0
    whole = (good / "state.pt").read_bytes()

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    for content in (whole[: len(whole) // 2], b"not a checkpoint at all", pickle.dumps(Payload()),
                    pickle.dumps({"step": 3})):
        (out / "state.pt").write_bytes(content)
        text = refused("train.py", *train_args(root, model, out, "--steps", "4", "--resume"),
                       names=[out / "state.pt"])
        assert "encode clips" not in text and "pwned" not in text  # refused before any model or clip work


def test_resume_refuses_settings_that_change_what_trains(world, tmp_path):  # noqa: F811
    root, model = world
    out = tmp_path / "run"
    assert run("train.py", *train_args(root, model, out, "--steps", "2", "--ckpt-every", "1"))[0] == 0
    text = refused("train.py", *train_args(root, model, out, "--steps", "4", "--resume", "--preset", "temporal",
                                           "--lora-rank", "4"), names=["--preset", "--lora-rank", "cannot change"])
    assert "'newmove'" in text and "'temporal'" in text
    # settings that may change, like --steps, are fine
    assert run("train.py", *train_args(root, model, out, "--steps", "3", "--resume"))[0] == 0


def test_existing_run_files_are_never_mixed_with_a_new_run(world, tmp_path):  # noqa: F811
    root, model = world
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"old": 1}\n')
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused("train.py", *train_args(root, model, out, "--steps", "2"), names=[out, "config.json", "--resume"])
    refused("train.py", *train_args(root, model, out, "--steps", "2", "--resume"), names=[out, "no checkpoint"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("flags, names", [
    (["--grad-clip", "-1"], ["--grad-clip"]), (["--reg-weight", "-5"], ["--reg-weight"]),
    (["--ckpt-every", "-1"], ["--ckpt-every"]), (["--val-seeds", "a,b", "--val-every", "1"], ["--val-seeds"]),
    (["--lr", "0"], ["--lr"]), (["--dropout", "1.5"], ["--dropout"])])
def test_bad_numbers_are_refused_at_once(world, tmp_path, flags, names):  # noqa: F811
    root, model = world
    text = refused("train.py", *train_args(root, model, tmp_path / "run", *flags), names=names)
    assert "encode clips" not in text and not (tmp_path / "run").exists()


def test_unwritable_out_is_refused_before_the_work(world, tmp_path):  # noqa: F811
    root, model = world
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub", Path("/proc/newmove-out")):
        text = refused("train.py", *train_args(root, model, out, "--steps", "1"), names=["--out", out])
        assert "encode clips" not in text
        text = refused("sample.py", "--model", model, "--prompt", "a square", "--frames", "2", "--height", "32",
                       "--width", "32", "--steps", "1", "--out", out, names=["--out", out])
        (tmp_path / "videos_in").mkdir(exist_ok=True)
        refused("evaluate.py", "--videos-in", tmp_path / "videos_in", "--out", out, names=["--out", out])


def test_missing_csv_and_non_utf8_text_files_are_named(world, tmp_path):  # noqa: F811
    root, model = world
    refused("train.py", *train_args(root, model, tmp_path / "r1", "--jester-csv", tmp_path / "nope.csv",
                                    "--jester-class", "Drumming Fingers"), names=[tmp_path / "nope.csv", "not found"])
    (tmp_path / "latin1.csv").write_bytes("1;Drumming Fingers \xe9\n".encode("latin-1"))
    refused("train.py", *train_args(root, model, tmp_path / "r2", "--jester-csv", tmp_path / "latin1.csv",
                                    "--jester-class", "Drumming Fingers"), names=[tmp_path / "latin1.csv", "UTF-8"])
    for name in ("clip.txt", "metadata.jsonl"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        _write_mp4(folder / "clip.mp4", _moving_square(0))
        text_file = folder / name
        text_file.write_bytes(b"a caf\xe9 clip" if name == "clip.txt" else b'{"file": "clip.mp4", "text": "caf\xe9"}\n')
        refused("train.py", *train_args(root, model, tmp_path / f"r-{name}", "--videos", folder),
                names=[text_file, "UTF-8"])
    (tmp_path / "prompts.txt").write_bytes(b"a caf\xe9\n")
    refused("sample.py", "--model", model, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "o",
            names=[tmp_path / "prompts.txt", "UTF-8"])


def test_long_captions_warn_and_a_cut_token_is_refused(world, tmp_path):  # noqa: F811
    root, model = world
    for kind, caption in (("long", "a square " + "very " * 80 + "slowly doing the pll sign"),
                          ("fine", "a pll square moving " + "very " * 80 + "slowly")):
        folder = tmp_path / kind
        folder.mkdir()
        _write_mp4(folder / "clip.mp4", _moving_square(0))
        (folder / "clip.txt").write_text(caption)
        args = train_args(root, model, tmp_path / f"run-{kind}", "--videos", folder, "--steps", "1")
        if kind == "long":  # the token is past the 75 tokens the text encoder keeps: the run would not learn it
            refused("train.py", *args, names=[folder / "clip.mp4", "'pll'", "cut off"])
        else:  # cut, but the token survives: a warning naming the clip, and the run goes on
            code, text = run("train.py", *args)
            assert code == 0 and f"warning: {folder / 'clip.mp4'}: its caption is" in text, text[-2000:]


def test_ctrl_c_writes_a_checkpoint_and_resume_reaches_the_same_weights(world, tmp_path):  # noqa: F811
    root, model = world
    common = train_args(root, model, tmp_path / "full", "--steps", "12", "--ckpt-every", "0",
                        "--cache", tmp_path / "cache")
    assert run("train.py", *common)[0] == 0
    args = [str(a) for a in common]
    args[args.index("--out") + 1] = str(tmp_path / "int")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "int" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130 and "Traceback" not in text, text[-3000:]
    step = torch.load(tmp_path / "int" / "state.pt", weights_only=True)["step"]
    assert 3 <= step < 12 and f"interrupted at step {step}" in text and "--resume" in text
    assert run("train.py", *args, "--resume")[0] == 0
    a = weights.read_state_dict(tmp_path / "full" / "delta.safetensors")
    b = weights.read_state_dict(tmp_path / "int" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_get_the_users_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = weights.save_state_dict({"x": torch.zeros(2)}, tmp_path / "delta.safetensors")
        json_path = weights.write_json({"a": 1}, tmp_path / "config.json")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777, json_path.stat().st_mode & 0o777) == (0o644, 0o644)  # not mkstemp's 0600


# ------------------------------------------------------------------------------------------------------- sample.py


@pytest.mark.parametrize("flags, name", [(["--height", "0"], "--height"), (["--height", "-32"], "--height"),
                                         (["--frames", "0"], "--frames"), (["--steps", "0"], "--steps")])
def test_sample_validates_sizes_before_loading(world, tmp_path, flags, name):  # noqa: F811
    _, model = world
    refused("sample.py", "--model", model, "--prompt", "a square", *flags, "--out", tmp_path / "o", names=[name])
    assert not (tmp_path / "o").exists()


def test_sample_refuses_bad_deltas_and_empty_prompt_files(world, tmp_path):  # noqa: F811
    _, model = world
    base = ["--model", model, "--prompt", "a square", "--frames", "2", "--height", "32", "--width", "32", "--steps",
            "1", "--out", tmp_path / "o"]
    torch.save({"unet.conv_in.weight": torch.zeros(3)}, tmp_path / "state.pt")
    refused("sample.py", *base, "--delta", tmp_path / "state.pt", names=[tmp_path / "state.pt", ".safetensors"])
    unet = load_models(model).unet
    name = next(n for n, _ in unet.named_parameters() if ".temp_convs." in n)
    bad = unet.get_parameter(name).detach().clone()
    bad.view(-1)[0] = float("nan")
    weights.save_state_dict({f"unet.{name}": bad}, tmp_path / "nan.safetensors")
    refused("sample.py", *base, "--delta", tmp_path / "nan.safetensors", names=[f"unet.{name}", "NaN"])
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    refused("sample.py", "--model", model, "--prompts", tmp_path / "empty.txt", "--out", tmp_path / "o",
            names=[tmp_path / "empty.txt", "no prompts"])
    with pytest.raises(weights.WeightsError, match="NaN"):
        sample.apply_delta(load_models(model), tmp_path / "nan.safetensors")


def test_evaluate_names_an_empty_prompt_file(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n")
    refused("evaluate.py", "--model", tmp_path, "--prompts", tmp_path / "empty.txt", "--token", "pll", "--out",
            tmp_path / "o", names=[tmp_path / "empty.txt", "no prompts"])


def test_openmp_waits_passively_only_on_a_busy_cpu():
    """omp.py (imported first by every entry point) picks OMP_WAIT_POLICY=PASSIVE when another process keeps a core
    busy as the program starts, and never overrides a setting of the user's (benchmarks/busy.md has the timings)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import omp, os; print(os.environ.get('OMP_WAIT_POLICY'), round(omp.busy_cores(), 1))"
    probe = [sys.executable, "-c", code]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        chosen = subprocess.run(probe, capture_output=True, text=True, cwd=ROOT, env=env).stdout.split()
        kept = subprocess.run(probe, capture_output=True, text=True, cwd=ROOT,
                              env={**env, "OMP_WAIT_POLICY": "ACTIVE"}).stdout.split()
    finally:
        hog.kill()
        hog.wait()
    assert chosen[0] == "PASSIVE" and float(chosen[1]) >= 0.5, chosen
    assert kept[0] == "ACTIVE", kept
