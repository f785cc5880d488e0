"""A training run's bookkeeping, apart from the method: the processes (torchrun or one), the run folder (never two
runs in one folder; a resume is checked before anything heavy), checkpoints that hold every rank's RNG state (a killed
or interrupted run resumes to bit-identical weights), the log with its NaN guard, Ctrl-C, the DDP replica check, and
the command line built from a dataclass of options. train.py uses these; nothing here knows about diffusion.
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

import reporting
from weights import atomic_write


class Run(NamedTuple):
    """Where this process stands: distributed or not, its rank among `world` processes, its device."""
    ddp: bool
    rank: int
    world: int
    device: torch.device
    master: bool


def setup_distributed(device: str = "") -> Run:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK (a world of one without them), one GPU per process, the process group."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # under torchrun the rank's own GPU; alone, the one asked for (--device cuda:1)
        device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Run(world > 1, rank, world, device, rank == 0)


def end_distributed(run: Run):
    """Leave the process group setup_distributed joined (nothing to do in a world of one)."""
    if run.ddp:
        dist.destroy_process_group()


# settings a resumed run may change; every other one must equal the checkpoint's (they decide what trains and how)
RESUMABLE = {"steps", "resume", "out", "device", "cache", "strict", "ckpt_every", "log_every", "val_every",
             "val_prompts", "val_seeds", "val_token_check", "val_solver", "val_steps", "val_guidance", "stop_clip",
             "stop_clip_weights", "stop_score", "export_diffusers", "save_dtype", "report_to",
             "free_grads"}  # --free-grads: the same weights, and the same optimizer state layout (optim.py)
RUN_FILES = ("state.pt", "delta.safetensors", "config.json", "log.jsonl", "val")  # what a run writes into --out


def open_run(cfg, out: Path):
    """The checkpoint to resume from (None for a new run), checked before any model loads: never mix two runs in
    one folder, never resume from an unreadable file or with settings that change what trains."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not cfg.resume:
        if found:
            raise SystemExit(f"error: {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                             f"or choose another --out")
        return None
    path = out / "state.pt"
    if not path.is_file():
        held = f"holds {', '.join(found)} but no checkpoint (stopped before its first one)" if found else \
            "holds no run"
        raise SystemExit(f"error: --resume: {out} {held}; start the run again with another --out")
    try:  # weights-only: a pickle that carries code is refused, whatever it claims to be
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a torch file, or refused by the weights-only unpickler
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # its first sentence
        raise SystemExit(f"error: {path}: not a readable train.py checkpoint ({reason[:200]})") from None
    keys = {"trained", "optimizer", "scaler", "step", "rng", "config"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise SystemExit(f"error: {path}: not a train.py checkpoint (it lacks "
                         f"{', '.join(sorted(keys - set(state))) if isinstance(state, dict) else 'a state dict'})")
    saved = state["config"]
    changed = [f"--{k.replace('_', '-')} (run: {saved[k]!r}, now: {v!r})" for k, v in asdict(cfg).items()
               if k not in RESUMABLE and k in saved and saved[k] != v]
    if changed:
        raise SystemExit(f"error: --resume: {'; '.join(changed)}: these settings decide what the run trains and "
                         f"cannot change on resume (may change: --steps, --ckpt-every, --log-every, --val-*, --stop-*, "
                         f"--free-grads, --report-to)")
    return state


def resume(state, state_path: Path, trainable, optimizer, scaler, run: Run) -> int:
    """Load a checkpoint's trained tensors, optimizer, scaler and this rank's RNG state; the step to continue from."""
    if state is None:
        return 0
    with torch.no_grad():
        for name, p in trainable:
            p.copy_(state["trained"][name])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) != run.world and run.master:
        print(f"warning: {state_path} was written by {len(state['rng'])} processes, resuming with {run.world}: the "
              f"data order and random draws will differ from an uninterrupted run")
    rng = state["rng"][run.rank % len(state["rng"])]
    torch.set_rng_state(rng["cpu"])
    if run.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    if run.master:
        print(f"resumed from {state_path} at step {state['step']}", flush=True)
    return state["step"]


class Stats:
    """Loss terms and per-timestep-decile losses, summed on the device between log lines (no host sync per step);
    at a log line: one sync, the NaN guard, one line of log.jsonl (rank 0), the same record to the --report-to
    loggers (reporting.Reporter, given the run's `config`)."""

    def __init__(self, path, T: int, n_inst: int, reg_weight: float, run: Run, step: int, on_nan: str,
                 report_to: str = "none", config: dict | None = None):
        self.T, self.n_inst, self.reg_weight, self.run, self.on_nan = T, n_inst, reg_weight, run, on_nan
        self.log = open(path, "a") if path else None
        # the loggers write into the run folder too (tb/, wandb/), and a resumed run continues their run from `step`
        self.report = reporting.Reporter(report_to, Path(path).parent, step, config or {}) if path else None
        self.sums = torch.zeros(4, device=run.device)  # loss, loss_inst, loss_reg, micro-batch count
        self.buckets = torch.zeros(2, 10, device=run.device)  # per-timestep-decile loss sum and count
        self.t_last, self.step_last = time.time(), step

    def by_timestep(self, t, mse):
        self.buckets[0].index_add_(0, t * 10 // self.T, mse)
        self.buckets[1].index_add_(0, t * 10 // self.T, torch.ones_like(mse))

    def add(self, per_clip):
        """One micro-batch's per-clip MSEs (instance clips first)."""
        l_inst = per_clip[:self.n_inst].mean()
        l_reg = per_clip[self.n_inst:].mean() if len(per_clip) > self.n_inst else torch.zeros_like(l_inst)
        self.sums += torch.stack([l_inst + self.reg_weight * l_reg, l_inst, l_reg, torch.ones_like(l_inst)])

    def write(self, step: int, grad_norm, lr: float, bar):
        stats = torch.cat([self.sums, self.buckets.flatten(), grad_norm.reshape(1).float()])
        if self.run.ddp:
            dist.all_reduce(stats)  # sums over ranks (the grad norm is identical on every rank after DDP)
        stats = stats.tolist()  # the one host sync per log interval
        n = stats[3]
        if not all(math.isfinite(v) for v in stats[:3]):
            raise SystemExit(f"error: non-finite loss at step {step} ({self.on_nan})")
        if self.log:
            dec = [round(s / c, 5) if c else None for s, c in zip(stats[4:14], stats[14:24])]
            rec = {"step": step, "loss": stats[0] / n, "loss_instance": stats[1] / n, "loss_reg": stats[2] / n,
                   "lr": lr, "grad_norm": stats[24] / self.run.world, "loss_by_t_decile": dec,
                   "sec_per_step": (time.time() - self.t_last) / (step - self.step_last)}
            self.note(rec, memory=True)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", grad=f"{rec['grad_norm']:.3f}")
        self.sums.zero_()
        self.buckets.zero_()
        self.t_last, self.step_last = time.time(), step

    def close(self):
        """Close log.jsonl and the --report-to loggers (rank 0)."""
        if self.log:
            self.log.close()
        if self.report:
            self.report.close()

    def note(self, rec: dict, memory: bool = False):
        """One more record of log.jsonl, on rank 0 (validation's token check), and to the --report-to loggers, with
        the peak memory if `memory` (for the loggers only: log.jsonl keeps its fields)."""
        if self.log:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
        if self.report:
            self.report.log((rec | reporting.peak_memory(self.run.device)) if memory else rec)


class Interrupt:
    """Ctrl-C (SIGINT) during the loop: the first one lets the step finish, then the loop writes a checkpoint and
    exits; a second one exits at once."""

    def __init__(self):
        self.hit = False
        signal.signal(signal.SIGINT, self)

    def __call__(self, signum, frame):
        if self.hit:
            raise SystemExit(130)
        self.hit = True
        print("\ninterrupt: finishing this step, then writing a checkpoint (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)

    def exit(self, step: int, state_path: Path, resumed: bool, master: bool):
        """After the checkpoint of `step`: say how to continue, and exit with the shell's code for an interrupt."""
        again = " ".join(["python"] + sys.argv + ([] if resumed else ["--resume"])) \
            if sys.argv[0].endswith("train.py") else "the same command with --resume"
        if master:
            print(f"\ninterrupted at step {step}: checkpoint written to {state_path}; continue with: {again}", flush=True)
        raise SystemExit(130)

    def agreed(self, run: Run) -> bool:
        """Whether any rank was interrupted (every rank must write the checkpoint together)."""
        if not run.ddp:
            return self.hit
        flag = torch.tensor([float(self.hit)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def save_checkpoint(path: Path, trainable, optimizer, scaler, step: int, cfg, run: Run):
    """Everything a bit-exact resume needs: trained tensors, optimizer, scaler, step, every rank's RNG state."""
    rng = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    rngs = [rng]
    if run.ddp:
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng)
    if run.master:
        state = {"trained": {n: p.detach().cpu() for n, p in trainable}, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "rng": rngs, "config": asdict(cfg)}
        # atomic: a kill mid-save leaves the previous checkpoint intact
        atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


@torch.no_grad()
def check_replicas(trainable, run: Run):
    """DDP keeps the replicas in lockstep; check it, cheaply (a checksum per tensor), rather than trust it."""
    checksum = torch.stack([p.detach().double().sum() for _, p in trainable]).to(run.device)
    everyone = [torch.zeros_like(checksum) for _ in range(run.world)]
    dist.all_gather(everyone, checksum)
    same = all(torch.equal(everyone[0], c) for c in everyone)
    if run.master:
        print(f"DDP ranks hold identical trained weights: {'yes' if same else 'NO'}", flush=True)
    dist.barrier()
    end_distributed(run)
    if not same:
        raise SystemExit("error: DDP ranks diverged")


# -----------------------------------------------------------------------------------------------------------------------
# the command line: one flag per field of a dataclass, each field carrying its help text and allowed values


def opt(default, help: str, choices=(), low=None, high=None, above=None, several=False):
    """A dataclass field: its --help text, and the values it allows (checked by the parser and by check_fields).
    `several`: a text option holding several of its choices, comma-separated (`--x a b` on the command line too)."""
    return field(default=default, metadata=dict(help=help, choices=tuple(choices), low=low, high=high, above=above,
                                                several=several))


def bad_value(f: dataclasses.Field, v) -> str:
    """Why value v is not allowed for option f ('' if it is)."""
    m = f.metadata
    if m["choices"]:
        bad = [x for x in (v.split(",") if m["several"] else [v]) if x not in m["choices"]]
        return f"must be one of {', '.join(m['choices'])}, got {bad[0]!r}" if bad else ""
    if isinstance(v, float) and not math.isfinite(v):
        return f"must be a finite number, got {v}"
    lo, hi = m["low"], m["high"]
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        return f"must be in [{lo}, {hi}], got {v}" if hi is not None else f"must be >= {lo}, got {v}"
    if m["above"] is not None and not v > m["above"]:
        return f"must be > {m['above']}, got {v}"
    return ""


def check_fields(obj):
    """The parser's checks for an object built in Python: a one-line error naming the first bad option."""
    for f in dataclasses.fields(obj):
        why = bad_value(f, getattr(obj, f.name))
        if why:
            raise SystemExit(f"error: --{f.name.replace('_', '-')} {why}")


def parse_options(cls, argv, description: str) -> tuple:
    """(cls(**flags), the names of the flags actually typed): argparse with each field's type, choices and range, so a
    bad value is a one-line parser error naming its flag."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, helptext = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")  # argparse %-formats
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
        elif f.metadata["several"]:  # each word checked by _checked (a word may hold several: "a,b")
            p.add_argument(flag, type=_checked(f), default=f.default, help=helptext, nargs="+",
                           metavar="{" + ",".join(f.metadata["choices"]) + "}")
        else:
            p.add_argument(flag, type=_checked(f), default=f.default, help=helptext,
                           choices=f.metadata["choices"] or None)
    flags = vars(p.parse_args(argv))  # argparse itself rejects unknown flags
    obj = cls(**{k: ",".join(v) if isinstance(v, list) else v for k, v in flags.items()})  # `several` as one text
    for action in p._actions:  # a second pass that leaves the defaults out: what was typed
        action.default = argparse.SUPPRESS
    return obj, set(vars(p.parse_args(argv)))


def _checked(f: dataclasses.Field):
    """The argparse type of option f: convert the text, then refuse what bad_value refuses."""
    def convert(text):
        v = type(f.default)(text)
        why = bad_value(f, v)
        if why:
            raise argparse.ArgumentTypeError(why)
        return v

    convert.__name__ = type(f.default).__name__  # argparse names it in "invalid int value: 'x'"
    return convert
