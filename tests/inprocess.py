"""Run a repository script's command line inside the test process: `python script.py args` without the seconds a new
interpreter spends importing torch.

`runpy` executes the script file itself as `__main__` with `sys.argv` set, so its whole command-line path runs: the
parser, the `if __name__ == "__main__":` block with its exception handling, and its exit code. What the interpreter
would do at exit is reproduced: `SystemExit("message")` prints the message to stderr and exits 1, `SystemExit(n)` exits
n, and any other exception prints a traceback and exits 1 -- so a test's "no Traceback" check still catches an
unhandled exception. Output is read at the file-descriptor level (pytest's capfd), so even what a child process
started by `os.system` would print is seen. The tests that need a real process (signals, peak memory, torchrun, and
one end-to-end refusal per script) keep running the scripts as subprocesses.

run_scripts_in_one_process runs several command lines in one NEW interpreter, each on the sys.path a script of its own
starts with and with the repository's modules imported afresh (the `--help` of every script: torch imported once).
"""

import contextlib
import runpy
import signal
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def threads(n):
    """torch's intra-op threads set to n for a while (as OMP_NUM_THREADS=n does for a subprocess): runs that are
    compared bit for bit with a subprocess's run the same kernels with the same reduction order."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


def run_script(capfd, script, *args, num_threads: int = 1) -> Result:
    """Exit code, stdout and stderr of `python ROOT/script *args`, run in this process on `num_threads` torch threads
    (as OMP_NUM_THREADS=1 ran these tests' subprocesses: tiny models gain nothing from more, and next to a busy process
    two spinning OpenMP threads make a training step ~10x slower)."""
    path = ROOT / script
    argv = [str(path), *map(str, args)]
    saved_argv, saved_path, saved_sigint = sys.argv, list(sys.path), signal.getsignal(signal.SIGINT)
    capfd.readouterr()  # only this run's output
    sys.argv = argv
    sys.path.insert(0, str(path.parent))  # as the interpreter does for `python script.py`
    try:
        with threads(num_threads):
            runpy.run_path(str(path), run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except Exception:  # noqa: BLE001 (what an uncaught exception does to a process)
        traceback.print_exc()
        code = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        signal.signal(signal.SIGINT, saved_sigint)  # train.py's Ctrl-C handler must not outlive the run
        sys.stdout.flush()
        sys.stderr.flush()
    out, err = capfd.readouterr()
    return Result(code, out, err)


_SEQUENCE = r'''
import contextlib, io, json, runpy, sys, traceback
from pathlib import Path

root, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
interpreter_path = [p for p in sys.path if p not in ("", ".")]  # `python -c` adds the cwd; `python script.py` not
results = []
for script, *args in commands:
    path = root / script
    for name, module in list(sys.modules.items()):  # the repository's modules are imported afresh by each script
        f = getattr(module, "__file__", None)
        if f and Path(f).resolve().is_relative_to(root):
            del sys.modules[name]
    sys.path[:] = [str(path.parent), *interpreter_path]  # what `python ROOT/script` starts with
    sys.argv = [str(path), *args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
'''


def run_scripts_in_one_process(commands, timeout=300) -> list:
    """[Result] of each (script, *args) in `commands`, run one after another in ONE new interpreter: each script runs
    as `__main__` with the `sys.path` that `python ROOT/script` starts with (its own folder, no repository root) and
    imports the repository's modules afresh, so a script that cannot find them on its own fails as it would alone;
    only third-party imports (torch) are shared, paid once instead of once per script."""
    import json
    import subprocess

    r = subprocess.run([sys.executable, "-c", _SEQUENCE, str(ROOT), json.dumps([list(map(str, c)) for c in commands])],
                       capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return [Result(*x) for x in json.loads(r.stdout.splitlines()[-1])]
