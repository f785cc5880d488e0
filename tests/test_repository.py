"""Rules the repository keeps about itself: no import cycles among its modules (imports inside functions count),
OpenMP's wait policy chosen only by entry points run as scripts, one copy of the idioms that were once written several
times, and no text about how the code was made (work-item numbers, work periods) in any tracked file."""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each folder's modules are importable from: the root (and toy/ as the package `toy`), benchmarks/ and tests/
# as script folders on sys.path (`python benchmarks/x.py`, pytest.ini's pythonpath)
FOLDERS = {"": "", "toy": "toy.", "benchmarks": "", "tests": ""}


def tracked(*patterns) -> list:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.split()]


def project_modules() -> dict:
    """{module name: path} of every tracked Python file, as `import` would name it."""
    mods = {}
    for path in tracked("*.py"):
        folder = path.parent.relative_to(ROOT).as_posix().replace(".", "")
        if folder not in FOLDERS:
            continue
        name = FOLDERS[folder] + path.stem if path.stem != "__init__" else folder
        assert name not in mods, f"{path} and {mods.get(name)} are both importable as {name}"
        mods[name] = path
    return mods


def imports_of(path: Path, mods: dict) -> set:
    """The project modules a file imports anywhere in it (top level or inside functions), packages included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            out |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)} & mods.keys()  # a.b imports a first
    return out


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while not comp or w != v:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    mods = project_modules()
    assert {"train", "unet3d", "memory", "toy.world", "harness", "oracles"} <= mods.keys()
    graph = {name: imports_of(path, mods) for name, path in mods.items()}
    assert "delta" in graph["sample"] and "memory" in graph["unet3d"]  # the walk sees real edges
    assert cycles(graph) == []


def test_only_entry_points_choose_the_openmp_policy():
    """omp.py does nothing at import; a module (tests aside) that uses it does so under `if __name__ == "__main__":`, before any
    import of torch or of a module that imports torch (libgomp reads the policy once, when torch loads it)."""
    tree = ast.parse((ROOT / "omp.py").read_text())
    top = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in top), "omp.py acts at import"
    users = 0
    for name, path in project_modules().items():
        if path.parent.name == "tests":
            continue  # tests call omp's functions to test them
        tree = ast.parse(path.read_text(), str(path))
        guards = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
        inside = {id(n) for g in guards[:1] for n in ast.walk(g)}
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Import) and any(a.name == "omp" for a in n.names)]
        for node in calls:
            assert id(node) in inside, f"{path.name}:{node.lineno}: omp imported outside the first __main__ guard"
            first_import = min(n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                               and not {a.name for a in n.names} <= {"sys", "Path"})
            assert guards[0].lineno < first_import, f"{path.name}: the omp guard comes after other imports"
            users += 1
    assert users >= 10  # train, sample, evaluate, delta, the toy scripts, the benchmarks


def test_one_copy_of_each_idiom():
    """Idioms that were written several times: each written once (the precision names' dtypes, classifier-free
    guidance, the layers' recompute switch, the VAE's downsampling factor)."""
    sources = {p: p.read_text() for p in tracked("*.py") if p.name != "test_repository.py"}
    patterns = {r'"bf16":\s*torch\.bfloat16': 1, r"eps_u \+ \w+ \* \(eps_c - eps_u\)": 1,
                r"2 \*\* \(len\([\w.]+\.block_out_channels\) - 1\)": 2,  # unet3d.py's and vae.py's configs
                r"\.recompute = ": 1, r"init_process_group\(": 1}
    for pattern, n in patterns.items():
        hits = [f"{p.relative_to(ROOT)}" for p, s in sources.items() for _ in re.finditer(pattern, s)]
        assert len(hits) == n, (pattern, hits)


# Text about how the code was produced: a reader has none of that context. External references name their project
# (huggingface/diffusers#2011), which these patterns do not match. A bracketed letter keeps each pattern from being
# such text itself, so this file is checked like any other.
PROCESS = [r"\b(i[s]sue|t[a]sk|t[i]cket)s? #?\d+", r"\bs[e]ssions?\b", r"\bs[p]rints?\b", r"\bthe t[e]am\b",
           r"\bthis m[a]chine\b", r"\bwe a[i]med\b", r"\bgoals we s[e]t\b"]


def test_no_text_about_how_the_code_was_made():
    bad = []
    for path in tracked("*.py", "*.md", "*.txt", "*.ini", "*.cfg", ".ci/*", ".gitignore"):
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            bad += [f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}" for p in PROCESS
                    if re.search(p, line, re.I)]
    assert not bad, "\n".join(bad)


def test_process_patterns_catch_what_they_are_for():
    # examples written with a "|" inside a word, removed before matching, so that they are not such text here
    caught = [t.replace("|", "") for t in ["a motion and a subject (iss|ue 19)", "the settings iss|ue #14 audited",
                                           "over three sess|ions", "the wait policy for this mach|ine",
                                           "earlier sess|ions", "Ta|sk 7: done"]]
    kept = ["huggingface/diffusers#2011", "layers issue fewer small ops", "the sessioned cookie"]
    assert all(any(re.search(p, t, re.I) for p in PROCESS) for t in caught)
    assert not any(re.search(p, t, re.I) for p in PROCESS for t in kept)


def test_markdown_links_resolve():
    """Every relative link in README.md and docs/*.md names a tracked file, and a link to a code line
    ([`train.timestep_probs`](train.py#L60)) points at that function's `def` line."""
    files = {p.relative_to(ROOT).as_posix() for p in tracked()}
    checked = 0
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for label, target in re.findall(r"\[([^\]]*)\]\(([^)\s]+)\)", md.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or a heading of the same page
            path, _, anchor = target.partition("#")
            rel = (md.parent / path).resolve().relative_to(ROOT).as_posix()
            assert rel in files or any(f.startswith(rel + "/") for f in files), f"{md.name}: {target}"
            line = re.fullmatch(r"L(\d+)", anchor)
            if line:
                name = label.strip("`").split(".")[-1]
                text = (ROOT / rel).read_text().splitlines()[int(line[1]) - 1]
                assert re.match(rf"(def|class) {name}\b", text), f"{md.name}: {target} is `{text}`, not {name}"
            checked += 1
    assert checked > 20


def test_the_file_map_names_every_module_and_chapter():
    """README's Files table lists every top-level module, toy/ and benchmarks/ script, test file and docs chapter."""
    table = (ROOT / "README.md").read_text().split("\n## Files", 1)[1]
    named = set(re.findall(r"`([\w./-]+)`", table))
    for path in tracked("*.py", "docs/*.md"):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py":
            continue
        # a row may name several files of one folder: `toy/train_base.py`, `toy/demo.py` or `bench.py`, `compare.py`
        assert rel in named or path.name in named, f"README's Files table does not name {rel}"
