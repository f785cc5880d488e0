"""train.py --report-to: TensorBoard's event files, read back with TensorBoard's own reader, hold log.jsonl's numbers at
the same steps and each validation's GIFs; a resumed run continues the same logdir; wandb writes its offline run; a
missing package is one line naming the pip command, before any model loads."""

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

import config
import models
import runs
import train
from inprocess import run_script, threads
from test_train import _cfg, world  # noqa: F401 (world is a fixture)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second torch thread, which next to a busy process only spins (inprocess.py)."""
    with threads(1):
        yield


def _records(out) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_report_to_takes_several_loggers_either_way():
    parse = lambda *a: runs.parse_options(config.Config, list(a), "")[0].report_to  # noqa: E731
    assert parse() == "none"
    assert parse("--report-to", "tensorboard", "wandb") == parse("--report-to", "tensorboard,wandb") \
        == "tensorboard,wandb"
    with pytest.raises(SystemExit) as e:  # argparse's error, naming the flag
        parse("--report-to", "tensorboard,tb")
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="error: --report-to must be one of none, tensorboard, wandb, got 'tb'"):
        runs.check_fields(config.Config(report_to="tb"))


@pytest.mark.slow
def test_tensorboard_holds_the_log_and_the_gifs_and_a_resume_continues_it(world, tmp_path, monkeypatch):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    root, model = world
    out = tmp_path / "run"
    cfg = lambda **kw: _cfg(root, model, out, steps=4, ckpt_every=2, val_every=2, val_steps=1,  # noqa: E731
                            report_to="tensorboard", **kw)
    write = runs.Stats.write

    def dies_after_step_3(self, step, *a):  # a crash after step 3's log line, one step past the checkpoint of step 2
        write(self, step, *a)
        if step == 3:
            raise SystemExit("killed")

    monkeypatch.setattr(runs.Stats, "write", dies_after_step_3)
    with pytest.raises(SystemExit, match="killed"):
        train.main(cfg())
    monkeypatch.setattr(runs.Stats, "write", write)
    train.main(cfg(resume=True))  # from step 2: steps 3 and 4 are logged again

    log = _records(out)
    assert [r["step"] for r in log] == [1, 2, 2, 3, 3, 4, 4]  # log.jsonl appends (token check lines at 2 and 4)
    expected = {}  # tag -> {step: value}, the last record of each step winning
    for r in log:
        for k, v in r.items():
            if isinstance(v, list):
                expected.update({f"{k}/{i}": {**expected.get(f"{k}/{i}", {}), r["step"]: x}
                                 for i, x in enumerate(v) if x is not None})
            elif k != "step":
                expected[k] = {**expected.get(k, {}), r["step"]: float(v)}
    assert {"loss", "loss_instance", "loss_reg", "lr", "grad_norm", "sec_per_step", "token_effect",
            "token_effect_base", "token_no_effect_yet"} <= expected.keys()

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == expected.keys() | {"rss_peak_gib"}
    for tag, values in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]  # each step once: the stopped run's step 3 purged
        assert got == [(s, np.float32(v)) for s, v in sorted(values.items())], tag
    assert [e.step for e in events.Scalars("rss_peak_gib")] == [1, 2, 3, 4]
    assert all(0 < e.value < 64 for e in events.Scalars("rss_peak_gib"))
    # the validation videos, with and without the token, as animated GIFs of --frames frames at --size
    assert sorted(tags["images"]) == ["val/a-person-doing-a-pll-sign_seed0", "val/a-person-doing-a-sign_seed0"]
    for tag in tags["images"]:
        assert [e.step for e in events.Images(tag)] == [2, 4]
        for e in events.Images(tag):
            gif = Image.open(io.BytesIO(e.encoded_image_string))
            assert (gif.format, gif.size, gif.n_frames, e.width, e.height) == ("GIF", (32, 32), 4, 32, 32)
    # one logdir, one event file per process: the resumed run's holds later steps only
    files = sorted((out / "tb").iterdir())
    steps = [{e.step for e in EventFileLoader(str(f)).Load() if e.summary.value} for f in files]
    assert len(files) == 2 and steps == [{1, 2, 3}, {3, 4}]


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_line_before_any_model_loads(world, tmp_path, monkeypatch, capfd,  # noqa: F811
                                                              package):
    root, model = world

    def never(*a, **k):
        raise AssertionError("a model loaded")

    monkeypatch.setitem(sys.modules, package, None)  # what `import <package>` finds when it is not installed
    monkeypatch.setattr(models, "load_models", never)
    run = run_script(capfd, "train.py", "--model", model, "--videos", root / "videos", "--reg-videos", root / "reg",
                     "--out", tmp_path / "run", "--report-to", "tensorboard", "wandb")
    assert run.returncode == 1 and "Traceback" not in run.text
    assert run.stderr.strip() == f"error: --report-to {package} needs the {package} package: pip install {package}"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wandb_offline_run_writes_its_files_and_a_resume_continues_it(world, tmp_path, monkeypatch):  # noqa: F811
    root, model = world
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = lambda **kw: _cfg(root, model, out, val_every=2, val_steps=1, report_to="wandb", **kw)  # noqa: E731
    train.main(cfg(steps=2))
    run_id = (out / "wandb" / "run-id.txt").read_text().strip()
    [run] = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert (run / f"run-{run_id}.wandb").stat().st_size > 0
    assert len(list((run / "files" / "media" / "videos" / "val").glob("*.gif"))) == 2  # with and without the token
    train.main(cfg(steps=3, resume=True))
    assert (out / "wandb" / "run-id.txt").read_text().strip() == run_id  # the same run, continued
    assert all(d.name.endswith(run_id) for d in (out / "wandb").glob("offline-run-*"))
