"""Where else train.py's log goes (--report-to): TensorBoard event files in <out>/tb/ and a Weights & Biases run in
<out>/wandb/, on rank 0 only. log.jsonl stays the record: each of its records is sent here as it is written (every
number under its own name, plus the peak memory), and each validation's GIFs as animated images. Both packages are
optional (pip install tensorboard / wandb) and imported only when asked for; docs/training.md, "Logs".

    report = Reporter("tensorboard,wandb", Path("runs/newmove"), step=0, config={...})
    report.log({"step": 10, "loss": 0.12, "loss_by_t_decile": [0.1, None, ...]})
    report.videos(10, [Path("runs/newmove/val/step000010/a-person_seed0")])   # <stem>.gif, written by sample.py
"""

import importlib.util
import io
import os
import sys
from pathlib import Path

import torch

from weights import atomic_write


def names(report_to: str) -> list:
    """The loggers of a --report-to value ('none' and empty entries dropped)."""
    return [n for n in report_to.split(",") if n not in ("", "none")]


def check(report_to: str):
    """A logger whose package is missing: one line naming the pip command, before any model loads."""
    for name in names(report_to):  # each logger's package has the logger's name
        if importlib.util.find_spec(name) is None:
            raise SystemExit(f"error: --report-to {name} needs the {name} package: pip install {name}")


def peak_memory(device: torch.device) -> dict:
    """The peak memory since the last log line, for the loggers: on CUDA the allocator's peak (then reset); on a CPU
    the process's peak resident set size so far (ru_maxrss, which never resets); nothing where neither is known."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)  # allocator bookkeeping on the host: no device sync
        torch.cuda.reset_peak_memory_stats(device)
        return {"cuda_peak_gib": peak / 2**30}
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"rss_peak_gib": peak / (2**30 if sys.platform == "darwin" else 2**20)}


def scalars(rec: dict) -> dict:
    """The numbers of a log.jsonl record by name (bools as 0/1): a list's entries as name/0, name/1, ... with its
    Nones (a timestep decile no clip drew) left out; the step and any text are not scalars."""
    out = {}
    for key, v in rec.items():
        entries = [(f"{key}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list) else [(key, v)]
        out.update({name: float(x) for name, x in entries if isinstance(x, (int, float))})
    out.pop("step", None)
    return out


class Reporter:
    """The open loggers of one run; every method does nothing for a logger not asked for."""

    def __init__(self, report_to: str, out: Path, step: int, config: dict):
        chosen = names(report_to)
        self.tb = self.wandb = None
        if "tensorboard" in chosen:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run writes a new event file into the same folder; purge_step hides what the stopped run had
            # logged after its checkpoint (steps > `step`), which the resumed run logs again
            self.tb = SummaryWriter(str(out / "tb"), purge_step=step + 1 if step else None)
        if "wandb" in chosen:
            import wandb

            # the run id is kept in the run folder, so that --resume continues the same wandb run
            id_file = out / "wandb" / "run-id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "newmove"), name=out.name, dir=str(out),
                                    id=run_id, resume="allow", config=config, allow_val_change=True)
            if run_id is None:
                atomic_write(id_file, lambda tmp: Path(tmp).write_text(self.wandb.id + "\n"))

    def log(self, rec: dict):
        """One record of log.jsonl (with its "step"), and any extra fields such as peak_memory()'s."""
        values = scalars(rec)
        if self.tb:
            for name, v in values.items():
                self.tb.add_scalar(name, v, rec["step"])
            self.tb.flush()  # as log.jsonl is: on disk at every log line, whatever stops the run later
        if self.wandb:
            self.wandb.log(values, step=rec["step"])

    def videos(self, step: int, stems: list):
        """The validation videos of `step`, each the `<stem>.gif` sample.save_video wrote, under `val/<stem name>`."""
        gifs = {f"val/{stem.name}": stem.with_name(stem.name + ".gif") for stem in stems}
        if self.tb:
            for tag, gif in gifs.items():
                self.tb.file_writer.add_summary(gif_summary(tag, gif.read_bytes()), step)
            self.tb.flush()
        if self.wandb:
            import wandb

            self.wandb.log({tag: wandb.Video(str(gif), format="gif") for tag, gif in gifs.items()}, step=step)

    def close(self):
        """Write out and close the event file; finish the wandb run."""
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def gif_summary(tag: str, gif: bytes):
    """A TensorBoard image summary holding an animated GIF, as SummaryWriter.add_video writes one (which needs moviepy
    1.x: it imports moviepy.editor, gone since moviepy 2.0); TensorBoard's Images tab plays it."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = Image.open(io.BytesIO(gif)).size
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    return Summary(value=[Summary.Value(tag=tag, image=image)])
