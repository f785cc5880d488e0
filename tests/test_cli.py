"""What a user sees when something is wrong: every bad input, interruption or odd file gets a one-line message naming
the file or option (never a bare traceback), before the heavy work, and nothing the user has is lost or overwritten.
The command-line cases run each script's own command line (its parser, `__main__` block and exit code) inside the test
process (inprocess.py: no new interpreter to import torch each time); a real subprocess, as a user would run it, where
the process itself matters (Ctrl-C) and once per script (train.py, sample.py, evaluate.py) end to end."""

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import torch

from delta import apply_delta
import train
import weights
from inprocess import run_script, run_scripts_in_one_process, threads
from models import load_models, save_models, tiny_models
from test_train import _moving_square, _write_mp4, world  # noqa: F401 (world is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=300):
    """`python script args` in a new process, as a user runs it: (exit code, stdout + stderr)."""
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r.returncode, r.stdout + r.stderr


def run_here(capfd, script, *args):
    """The same command line run inside this process on one thread (inprocess.run_script): (exit code, stdout +
    stderr)."""
    r = run_script(capfd, script, *args)
    return r.returncode, r.text


def check_refused(code, text, names):
    assert code != 0, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    for name in names:
        assert str(name) in text, (name, text[-2000:])
    return text


def refused(capfd, script, *args, names=()):
    """Run a command that must fail cleanly (in this process); return its output (asserts: non-zero, no traceback,
    names each of `names`)."""
    return check_refused(*run_here(capfd, script, *args), names)


def refused_in_a_process(script, *args, names=()):
    """`refused`, with the script run as a real subprocess."""
    return check_refused(*run(script, *args), names)


def train_args(root, model, out, *extra, frames=4):
    return ["--model", model, "--videos", root / "videos", "--reg-videos", root / "reg", "--reg-caption",
            "a square moving", "--frames", frames, "--size", "32", "--lr", "1e-3", "--precision", "fp32",
            "--log-every", "1", "--seed", "2", "--out", out, *extra]


@pytest.fixture(scope="module")
def two_step_run(world, tmp_path_factory):  # noqa: F811
    """A finished 2-step run with a checkpoint at every step (train_args, --steps 2 --ckpt-every 1), trained once for
    the tests that need a real checkpoint; they copy it before changing anything."""
    root, model = world
    out = tmp_path_factory.mktemp("cli") / "run"
    with threads(1):  # as the command line runs in these tests (OMP_NUM_THREADS=1)
        train.main(train.parse_args([str(a) for a in train_args(root, model, out, "--steps", "2", "--ckpt-every",
                                                                 "1")]))
    assert (out / "state.pt").is_file() and (out / "delta.safetensors").is_file()
    return out


def test_the_project_stands_alone():
    """Nothing in the repository reads or cites files outside it (a reader has only the repository): every "method.md §7.2"-style citation resolves to a section heading of docs/<name>.md."""
    import re

    sources = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("toy/*.py"), *ROOT.glob("benchmarks/*.py"),
               *ROOT.glob("*.md"), *ROOT.glob("toy/*.md")]
    headings = {p.name: re.findall(r"^#+ (\d+(?:\.\d+)*)\.? ", p.read_text(), re.M) for p in ROOT.glob("docs/*.md")}
    for path in sources:
        text = path.read_text()
        assert not re.search(r"\.\./\w", text), f"{path.name} refers to a path outside the repository"
        for name, section in re.findall(r"\b(method|modelscope|performance)\.md'?s? §(\d+(?:\.\d+)*)", text):
            assert section in headings.get(f"{name}.md", []), f"{path.name} cites {name}.md §{section}"


# ------------------------------------------------------------------------------------------------------- train.py


def test_resume_refuses_unreadable_checkpoints_before_loading(world, two_step_run, tmp_path, capfd):  # noqa: F811
    root, model = world
    out = tmp_path / "run"
    out.mkdir()
    whole = (two_step_run / "state.pt").read_bytes()

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    for content in (whole[: len(whole) // 2], b"not a checkpoint at all", pickle.dumps(Payload()),
                    pickle.dumps({"step": 3})):
        (out / "state.pt").write_bytes(content)
        text = refused(capfd, "train.py", *train_args(root, model, out, "--steps", "4", "--resume"),
                       names=[out / "state.pt"])
        assert "encode clips" not in text and "pwned" not in text  # refused before any model or clip work


def test_resume_refuses_settings_that_change_what_trains(world, two_step_run, tmp_path, capfd):  # noqa: F811
    root, model = world
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)  # a finished 2-step run (--steps 2 --ckpt-every 1)
    text = refused(capfd, "train.py", *train_args(root, model, out, "--steps", "4", "--resume", "--preset",
                                                  "temporal", "--lora-rank", "4"),
                   names=["--preset", "--lora-rank", "cannot change"])
    assert "'newmove'" in text and "'temporal'" in text
    # settings that may change, like --steps, are fine
    assert run_here(capfd, "train.py", *train_args(root, model, out, "--steps", "3", "--resume"))[0] == 0


def test_existing_run_files_are_never_mixed_with_a_new_run(world, tmp_path, capfd):  # noqa: F811
    root, model = world
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"old": 1}\n')
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused(capfd, "train.py", *train_args(root, model, out, "--steps", "2"), names=[out, "config.json", "--resume"])
    refused(capfd, "train.py", *train_args(root, model, out, "--steps", "2", "--resume"),
            names=[out, "no checkpoint"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("flags, names", [
    (["--grad-clip", "-1"], ["--grad-clip"]), (["--reg-weight", "-5"], ["--reg-weight"]),
    (["--ckpt-every", "-1"], ["--ckpt-every"]), (["--val-seeds", "a,b", "--val-every", "1"], ["--val-seeds"]),
    (["--lr", "0"], ["--lr"]), (["--dropout", "1.5"], ["--dropout"])])
def test_bad_numbers_are_refused_at_once(world, tmp_path, capfd, flags, names):  # noqa: F811
    root, model = world
    text = refused(capfd, "train.py", *train_args(root, model, tmp_path / "run", *flags), names=names)
    assert "encode clips" not in text and not (tmp_path / "run").exists()


def _refuse_unwritable_out(world, tmp_path, refuse, outs):  # noqa: F811
    root, model = world
    (tmp_path / "videos_in").mkdir()
    for out in outs:
        text = refuse("train.py", *train_args(root, model, out, "--steps", "1"), names=["--out", out])
        assert "encode clips" not in text
        refuse("sample.py", "--model", model, "--prompt", "a square", "--frames", "2", "--height", "32",
               "--width", "32", "--steps", "1", "--out", out, names=["--out", out])
        refuse("evaluate.py", "--videos-in", tmp_path / "videos_in", "--out", out, names=["--out", out])


def test_unwritable_out_is_refused_before_the_work(world, tmp_path, capfd):  # noqa: F811
    (tmp_path / "a_file").write_text("x")
    _refuse_unwritable_out(world, tmp_path, lambda *a, **k: refused(capfd, *a, **k),
                           [tmp_path / "a_file", tmp_path / "a_file" / "sub", Path("/proc/newmove-out")])


@pytest.mark.slow
def test_unwritable_out_is_refused_by_each_script_run_as_a_user_runs_it(world, tmp_path):  # noqa: F811
    _refuse_unwritable_out(world, tmp_path, refused_in_a_process, [Path("/proc/newmove-out")])


def test_missing_csv_and_non_utf8_text_files_are_named(world, tmp_path, capfd):  # noqa: F811
    root, model = world
    refused(capfd, "train.py", *train_args(root, model, tmp_path / "r1", "--jester-csv", tmp_path / "nope.csv",
                                           "--jester-class", "Drumming Fingers"),
            names=[tmp_path / "nope.csv", "not found"])
    (tmp_path / "latin1.csv").write_bytes("1;Drumming Fingers \xe9\n".encode("latin-1"))
    refused(capfd, "train.py", *train_args(root, model, tmp_path / "r2", "--jester-csv", tmp_path / "latin1.csv",
                                           "--jester-class", "Drumming Fingers"),
            names=[tmp_path / "latin1.csv", "UTF-8"])
    for name in ("clip.txt", "metadata.jsonl"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        _write_mp4(folder / "clip.mp4", _moving_square(0))
        text_file = folder / name
        text_file.write_bytes(b"a caf\xe9 clip" if name == "clip.txt" else b'{"file": "clip.mp4", "text": "caf\xe9"}\n')
        refused(capfd, "train.py", *train_args(root, model, tmp_path / f"r-{name}", "--videos", folder),
                names=[text_file, "UTF-8"])
    (tmp_path / "prompts.txt").write_bytes(b"a caf\xe9\n")
    refused(capfd, "sample.py", "--model", model, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "o",
            names=[tmp_path / "prompts.txt", "UTF-8"])


def test_long_captions_warn_and_a_cut_token_is_refused(world, tmp_path, capfd):  # noqa: F811
    root, model = world
    for kind, caption in (("long", "a square " + "very " * 80 + "slowly doing the pll sign"),
                          ("fine", "a pll square moving " + "very " * 80 + "slowly")):
        folder = tmp_path / kind
        folder.mkdir()
        _write_mp4(folder / "clip.mp4", _moving_square(0))
        (folder / "clip.txt").write_text(caption)
        args = train_args(root, model, tmp_path / f"run-{kind}", "--videos", folder, "--steps", "1")
        if kind == "long":  # the token is past the 75 tokens the text encoder keeps: the run would not learn it
            refused(capfd, "train.py", *args, names=[folder / "clip.mp4", "'pll'", "cut off"])
        else:  # cut, but the token survives: a warning naming the clip, and the run goes on
            code, text = run_here(capfd, "train.py", *args)
            assert code == 0 and f"warning: {folder / 'clip.mp4'}: its caption is" in text, text[-2000:]


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
def test_sample_validates_sizes_before_loading(world, tmp_path, capfd, flags, name):  # noqa: F811
    _, model = world
    refused(capfd, "sample.py", "--model", model, "--prompt", "a square", *flags, "--out", tmp_path / "o",
            names=[name])
    assert not (tmp_path / "o").exists()


def test_sample_refuses_bad_deltas_and_empty_prompt_files(world, tmp_path, capfd):  # noqa: F811
    _, model = world
    base = ["--model", model, "--prompt", "a square", "--frames", "2", "--height", "32", "--width", "32", "--steps",
            "1", "--out", tmp_path / "o"]
    torch.save({"unet.conv_in.weight": torch.zeros(3)}, tmp_path / "state.pt")
    refused(capfd, "sample.py", *base, "--delta", tmp_path / "state.pt", names=[tmp_path / "state.pt", ".safetensors"])
    unet = load_models(model).unet
    name = next(n for n, _ in unet.named_parameters() if ".temp_convs." in n)
    bad = unet.get_parameter(name).detach().clone()
    bad.view(-1)[0] = float("nan")
    weights.save_state_dict({f"unet.{name}": bad}, tmp_path / "nan.safetensors")
    refused(capfd, "sample.py", *base, "--delta", tmp_path / "nan.safetensors", names=[f"unet.{name}", "NaN"])
    refused(capfd, "sample.py", *base, "--delta-from-t", "400", names=["--delta-from-t needs --delta"])
    refused(capfd, "sample.py", *base, "--delta", tmp_path / "nan.safetensors", "--delta-from-t", "1001",
            names=["--delta-from-t", "0..1000"])
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    refused(capfd, "sample.py", "--model", model, "--prompts", tmp_path / "empty.txt", "--out", tmp_path / "o",
            names=[tmp_path / "empty.txt", "no prompts"])
    with pytest.raises(weights.WeightsError, match="NaN"):
        apply_delta(load_models(model), tmp_path / "nan.safetensors")


def interrupt_when(args, ready, log, timeout=300):
    """`python args...` as a user runs it, Ctrl-C (SIGINT) once `ready()` holds: (exit code, stdout + stderr). The
    output goes to the file `log`, so a chatty process never blocks on a full pipe."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=timeout)
    return proc.returncode, Path(log).read_text()


@pytest.mark.slow
def test_ctrl_c_in_sample_keeps_the_finished_videos_and_names_them(world, tmp_path):  # noqa: F811
    """Videos are saved batch by batch, each whole (.mp4, .gif, .png) or not at all: Ctrl-C after the first one ends
    with one line naming those written, and exit code 130."""
    _, model = world
    out = tmp_path / "o"
    code, text = interrupt_when([ROOT / "sample.py", "--model", model, "--prompt", "a square", "--num-samples", "200",
                                 "--frames", "2", "--height", "32", "--width", "32", "--steps", "10", "--out", out],
                                lambda: (out / "a-square_seed0.png").exists(), tmp_path / "log")
    last = text.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in text, text[-3000:]
    listed = re.fullmatch(rf"interrupted: (\d+) of 200 videos written to {re.escape(str(out))} \(each with its \.gif "
                          rf"and \.png\): (.*)", last)
    assert listed and 1 <= int(listed[1]) < 200, last
    mp4s = sorted(p.name for p in out.glob("*.mp4"))
    assert len(mp4s) == int(listed[1]) and (len(mp4s) > 10 or listed[2].split(", ") == mp4s), (mp4s, last)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{m[:-4]}{s}" for m in mp4s for s in (".gif", ".mp4",
                                                                                                   ".png"))
    with av.open(str(out / mp4s[-1])) as container:  # the last one written is whole too
        assert len(list(container.decode(video=0))) == 2


@pytest.mark.slow
def test_ctrl_c_in_evaluate_ends_in_one_line(world, tmp_path):  # noqa: F811
    """Ctrl-C while evaluate.py generates: one line saying that no video and no report were written, exit code 130."""
    _, model = world
    (tmp_path / "prompts.txt").write_text("a square doing {token}\n")
    out = tmp_path / "report"
    code, text = interrupt_when([ROOT / "evaluate.py", "--model", model, "--prompts", tmp_path / "prompts.txt",
                                 "--seeds", *range(200), "--frames", "2", "--height", "32", "--width", "32",
                                 "--steps", "10", "--out", out],
                                lambda: "DDIM" in (tmp_path / "log").read_text(), tmp_path / "log")  # generating
    assert code == 130 and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == "interrupted: no videos, no report" and not any(out.rglob("*.*"))


def test_a_delta_on_other_weights_warns_and_on_other_shapes_is_refused(two_step_run, world, tmp_path,  # noqa: F811
                                                                        capfd):
    """train.py records the weights its delta was trained on: sample.py on them says nothing, on other weights of the
    same shapes (ZeroScope vs ModelScope) warns in one line naming both, on other shapes (the toy model) refuses."""
    _, model = world
    run = ["--prompt", "a square", "--frames", "2", "--height", "32", "--width", "32", "--steps", "1",
           "--delta", two_step_run / "delta.safetensors", "--out", tmp_path / "o"]
    code, text = run_here(capfd, "sample.py", "--model", model, *run)
    assert code == 0 and "warning" not in text, text[-2000:]
    other = save_models(tiny_models(seed=7), tmp_path / "other", "original")
    code, text = run_here(capfd, "sample.py", "--model", other, *run)
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1, text[-2000:]
    assert f"was trained on {Path(model).resolve()} (weights " in warnings[0]
    assert f"not on {other} (weights " in warnings[0]
    refused(capfd, "sample.py", "--model", ROOT / "toy" / "model", *run,
            names=[two_step_run / "delta.safetensors", "a delta for a base model of other shapes",
                   f"trained on {Path(model).resolve()}, applied to {ROOT / 'toy' / 'model'}"])


def test_evaluate_names_an_empty_prompt_file(tmp_path, capfd):
    (tmp_path / "empty.txt").write_text("# nothing\n")
    refused(capfd, "evaluate.py", "--model", tmp_path, "--prompts", tmp_path / "empty.txt", "--token", "pll", "--out",
            tmp_path / "o", names=[tmp_path / "empty.txt", "no prompts"])


def test_openmp_waits_passively_only_on_a_busy_cpu():
    """omp.choose_wait_policy (called by every entry point run as a script) picks OMP_WAIT_POLICY=PASSIVE when
    another process keeps a core busy as the program starts, and never overrides a setting of the user's
    (benchmarks/busy.md has the timings)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import omp, os; omp.choose_wait_policy(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), round(omp.busy_cores(), 1))")
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


def test_openmp_policy_is_left_alone_on_an_idle_cpu(monkeypatch):
    """The idle branch: below half a busy core libgomp's default stays (PASSIVE costs ~20% on an idle machine)."""
    import omp

    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    for busy, want in ((0.0, None), (0.49, None), (0.5, "PASSIVE")):
        monkeypatch.setattr(omp, "busy_cores", lambda seconds=0.2: busy)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        omp.choose_wait_policy()
        assert os.environ.get("OMP_WAIT_POLICY") == want, busy


def readme_commands(heading: str) -> list:
    """[(script, subcommand or None, [--options])] of the `python ...` lines in a README section's code blocks."""
    import shlex

    text = (ROOT / "README.md").read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #")[0])
            if words[:1] != ["python"]:
                continue  # shell lines (mkdir, grep, tensorboard)
            script, rest = words[1], words[2:]
            sub = rest[0] if rest and rest[0] in ("fetch", "check", "cut", "compress") else None
            commands.append((script, sub, [w.split("=")[0] for w in rest if w.startswith("--")]))
    return commands


@pytest.mark.slow
def test_the_readme_real_run_commands_exist():
    """Every command of README's "A real run, from zero" is a script (and subcommand) of this repository, and every
    option it names is one that script's --help lists."""
    commands = readme_commands("## A real run, from zero")
    assert {c[0] for c in commands} >= {"models.py", "data.py", "train.py", "sample.py", "evaluate.py"}
    asked = sorted({(script, sub) for script, sub, opts in commands if opts})
    helps = dict(zip(asked, run_scripts_in_one_process([(s, *([sub] if sub else []), "--help") for s, sub in asked])))
    for script, sub, opts in commands:
        assert (ROOT / script).is_file(), script
        for o in opts:
            r = helps[(script, sub)]
            assert r.returncode == 0 and re.search(rf"{re.escape(o)}\b", r.stdout), f"{script} {sub or ''}: no {o}"
