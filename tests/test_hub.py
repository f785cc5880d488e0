"""Weights by name (hub.py): Hub repositories made here and served from 127.0.0.1 by a small Hub that answers what
huggingface_hub asks, so no test leaves the machine; URL files with a pinned, a wrong and no sha256; open_clip's names.

huggingface_hub reads its settings (HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE) from the environment once, when
imported: for runs in this process the fixture sets its module constants too; one run in a process of its own sees
only the environment."""

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.torch import save

import hub
import metrics
import models
import sample
import train
from inprocess import run_script
from test_evaluate import TINY_CLIP
from toy import world

ROOT = Path(__file__).resolve().parents[1]


class FakeHub(http.server.ThreadingHTTPServer):
    """A Hub on 127.0.0.1: a revision's commit and files (/api/models/ID[/revision/REV]), the tree of a commit
    (/api/models/ID/tree/REV) and the files (/ID/resolve/REV/PATH, HEAD and GET, with the X-Repo-Commit and ETag
    headers), plus plain files under /files/. Every request is logged as (method, path)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos, self.plain, self.log = {}, {}, []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def add(self, repo_id: str, files: dict, refs=("main",)) -> str:
        """A commit of `files` ({path: bytes}) that the refs name; its 40-hex commit id."""
        commit = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()
                              + repo_id.encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][commit] = files
        repo["refs"].update({r: commit for r in refs})
        return commit

    def fetched(self) -> set:
        """The repository files downloaded (GET) so far."""
        return {m.group(1) for method, p in self.log if method == "GET"
                for m in [re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", p)] if m}


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet: the server keeps its own log
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def send(self, code: int, data: bytes = b"", headers=(), body=True):
        self.send_response(code)
        for k, v in [("Content-Length", str(len(data))), *headers]:
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def answer(self, body: bool):
        hub_, path = self.server, urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        hub_.log.append((self.command, path))
        if path.startswith("/files/") and path in hub_.plain:
            return self.send(200, hub_.plain[path], body=body)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?", path) or \
            re.fullmatch(r"/([^/]+/[^/]+)/(resolve)/([^/]+)/(.+)", path)
        repo = hub_.repos.get(m.group(1)) if m else None
        if repo is None:
            return self.send(404, b"{}", [("X-Error-Code", "RepoNotFound")], body)
        rev = m.group(3) or "main"
        commit = rev if rev in repo["commits"] else repo["refs"].get(rev)
        if commit is None:
            return self.send(404, b"{}", [("X-Error-Code", "RevisionNotFound")], body)
        files = repo["commits"][commit]
        if m.group(2) in (None, "revision"):
            info = {"id": m.group(1), "sha": commit, "siblings": [{"rfilename": f} for f in sorted(files)]}
            return self.send(200, json.dumps(info).encode(), [("Content-Type", "application/json")], body)
        if m.group(2) == "tree":
            tree = [{"type": "file", "path": f, "size": len(v), "oid": hashlib.sha1(v).hexdigest()}
                    for f, v in sorted(files.items())]
            return self.send(200, json.dumps(tree).encode(), [("Content-Type", "application/json")], body)
        name = m.group(4)
        if name not in files:
            return self.send(404, b"", [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", commit)], body)
        etag = hashlib.sha256(files[name]).hexdigest()
        self.send(200, files[name], [("X-Repo-Commit", commit), ("ETag", f'"{etag}"')], body)


def folder_files(folder: Path) -> dict:
    """{relative path: bytes} of a folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A FakeHub, and huggingface_hub pointed at it with a cache in tmp_path (never the user's)."""
    server = FakeHub()
    env = {"HF_HOME": tmp_path / "hf", "HF_HUB_CACHE": tmp_path / "hf" / "hub", "HF_ENDPOINT": server.url,
           "NEWMOVE_CACHE": tmp_path / "newmove", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k, v in {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
                 "ENDPOINT": server.url, "HF_HUB_OFFLINE": False,
                 "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}"}.items():
        monkeypatch.setattr(constants, k, v)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory):
    """{layout: {path: bytes}} of the tiny models saved in each layout, and "original-v1": other weights (seed 1)."""
    tmp = tmp_path_factory.mktemp("repos")
    saved = [(0, "original"), (0, "diffusers"), (1, "original")]
    return {layout + ("-v1" if seed else ""): folder_files(models.save_models(
        models.tiny_models(seed=seed), tmp / f"{layout}{seed}", layout)) for seed, layout in saved}


def test_loader_files_take_one_weight_format_per_network():
    nets = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    names = {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "README.md",
             "tokenizer/vocab.json", "zs2_576w/text2video_pytorch_model.pth"}
    names |= {f"{n}/{s}{v}.{e}" for n, s in nets.items() for v in ("", ".fp16") for e in ("bin", "safetensors")}
    layout, files = hub.loader_files(names)
    assert layout == "diffusers" and files == ["model_index.json", "unet/config.json", "vae/config.json",
                                               "text_encoder/config.json",  # the scheduler's is optional
                                               *[f"{n}/{s}.safetensors" for n, s in nets.items()]]
    layout, files = hub.loader_files(names - {"vae/config.json"})
    assert [f for f in files if f not in names - {"vae/config.json"}] == ["vae/config.json"]  # required: missing
    half = hub.loader_files(names - {"text_encoder/model.fp16.safetensors"}, variant="fp16")[1]
    assert half[-3:] == ["unet/diffusion_pytorch_model.fp16.safetensors",
                         "vae/diffusion_pytorch_model.fp16.safetensors",
                         "text_encoder/model.fp16.bin"]  # .bin only where there is no .safetensors
    conf = {"model": {"model_args": {"ckpt_unet": "unet.pth"}}}
    assert hub.loader_files({"configuration.json"}, read_config=lambda f: conf) == (
        "original", ["configuration.json", "unet.pth", "VQGAN_autoencoder.pth", "open_clip_pytorch_model.bin"])
    assert hub.loader_files({"README.md"}) == (None, [])


def test_loader_files_of_both_wan_layouts_follow_shard_indexes():
    """Wan 2.1 as released (the repository's file names): only what wan_models reads, shards through their index."""
    original = {"config.json", "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                "google/umt5-xxl/tokenizer.json", "google/umt5-xxl/spiece.model", "README.md", "assets/logo.png"}
    assert hub.loader_files(original) == ("wan", list(hub.WAN_FILES))
    index = {"weight_map": {"a.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
                            "c.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    sharded = original - {"diffusion_pytorch_model.safetensors"} | {"diffusion_pytorch_model.safetensors.index.json"}
    layout, files = hub.loader_files(sharded, read_config=lambda f: index)
    assert layout == "wan" and files[1:4] == ["diffusion_pytorch_model.safetensors.index.json",
                                              "diffusion_pytorch_model-00001-of-00002.safetensors",
                                              "diffusion_pytorch_model-00002-of-00002.safetensors"]
    port = {"model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
            "text_encoder/model.safetensors.index.json", "tokenizer/tokenizer.json", "tokenizer/spiece.model",
            "scheduler/scheduler_config.json"}
    reads = []
    layout, files = hub.loader_files(port, read_config=lambda f: reads.append(f) or {
        "weight_map": {"x": f"{f.split('/')[0]}-00001.safetensors"}})
    assert layout == "wan-diffusers" and reads == ["transformer/diffusion_pytorch_model.safetensors.index.json",
                                                   "text_encoder/model.safetensors.index.json"]
    assert "transformer/transformer-00001.safetensors" in files and "text_encoder/text_encoder-00001.safetensors" in files
    assert "tokenizer/spiece.model" not in files and "vae/diffusion_pytorch_model.safetensors" in files
    # a ModelScope diffusers folder is still that (model_index.json alone does not make it Wan)
    assert hub.loader_files({"model_index.json", "unet/config.json"})[0] == "diffusers"


@pytest.mark.slow
def test_a_hub_id_samples_fetching_only_what_the_loader_reads_then_works_offline(fake_hub, tiny_repos, tmp_path,
                                                                                 capfd):
    files = dict(tiny_repos["diffusers"])
    extras = {"unet/diffusion_pytorch_model.bin": b"a second format", "README.md": b"# tiny",
              "unet/diffusion_pytorch_model.fp16.safetensors": b"a variant", "tokenizer/vocab.json": b"{}",
              "zs2_576w/text2video_pytorch_model.pth": b"the original layout's copy"}
    commit = fake_hub.add("user/tiny-repo", {**files, **extras})
    args = ["--model", "user/tiny-repo", "--prompt", "a red circle", "--frames", "2", "--height", "32", "--width",
            "32", "--steps", "2"]
    run = run_script(capfd, "sample.py", *args, "--out", tmp_path / "a")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "a" / "a-red-circle_seed0.mp4").is_file()
    assert fake_hub.fetched() == set(files)  # configs and one safetensors per network; no .bin, variant or extra
    snapshot = tmp_path / "hf" / "hub" / "models--user--tiny-repo" / "snapshots" / commit
    assert snapshot.is_dir() and hub.cached("user/tiny-repo") == snapshot
    # the second run: from the cache, offline, with the Hub gone
    fake_hub.log.clear()
    constants.HF_HUB_OFFLINE = True  # (the fixture's monkeypatch restores it)
    fake_hub.shutdown()
    run = run_script(capfd, "sample.py", *args, "--out", tmp_path / "b")
    assert run.returncode == 0, run.stderr[-2000:]
    assert fake_hub.log == [] and (tmp_path / "b" / "a-red-circle_seed0.mp4").is_file()
    assert models.load_models("user/tiny-repo").source == {"model": "user/tiny-repo", "repo_id": "user/tiny-repo",
                                                           "revision": "main", "commit": commit, "path": str(snapshot)}


@pytest.mark.slow
def test_revision_pins_a_version_and_outputs_record_its_commit(fake_hub, tiny_repos, tmp_path, capfd):
    """The original layout by id; --revision v1 recorded by evaluate.py's report.json (its command line) and by
    train.py's config.json and delta metadata (train.main)."""
    main = fake_hub.add("user/tiny-original", {**tiny_repos["original"], "README.md": b"x"})
    v1 = fake_hub.add("user/tiny-original", tiny_repos["original-v1"], refs=("v1",))
    loaded = models.load_models("user/tiny-original", revision="v1")
    assert loaded.layout == "original" and loaded.source["commit"] == v1 and v1 != main
    assert fake_hub.fetched() == set(tiny_repos["original"])  # configuration.json and its three files
    want = models.tiny_models(seed=1).unet.conv_in.weight
    assert torch.equal(loaded.unet.conv_in.weight, want)  # v1's weights, not main's
    assert models.base_metadata(loaded) == {"base_model": "user/tiny-original", "base_revision": "v1",
                                            "base_commit": v1}
    assert models.base_metadata(models.load_models(loaded.root)) == {"base_model": str(loaded.root.resolve())}
    (tmp_path / "prompts.txt").write_text("a red circle doing the {token} sign\n")
    run = run_script(capfd, "evaluate.py", "--model", "user/tiny-original", "--revision", "v1", "--prompts",
                     tmp_path / "prompts.txt", "--seeds", "0", "--frames", "2", "--height", "32", "--width", "32",
                     "--steps", "2", "--no-save-videos", "--out", tmp_path / "report")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["base_model"]["commit"] == v1 and report["base_model"]["revision"] == "v1"
    assert str(loaded.root / "text2video_pytorch_model.pth") in report["sha256"]
    # train.py: config.json and the delta's metadata (a one-step run, no regularization)
    world.write_folder(world.make_dataset(2, ["moving in a circle"], seed=5, frames=4), tmp_path / "clips")
    delta = train.main(train.Config(model="user/tiny-original", revision="v1", videos=str(tmp_path / "clips"),
                                    prior="none", frames=4, size=32, steps=1, precision="fp32", ckpt_every=0,
                                    out=str(tmp_path / "run")))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["revision"] == "v1" and config["base_model"]["commit"] == v1
    with safe_open(str(delta), "pt") as f:
        assert f.metadata()["base_commit"] == v1 and f.metadata()["base_model"] == "user/tiny-original"
    run = run_script(capfd, "models.py", "user/tiny-original", "--revision", "nope")
    assert run.returncode == 2 and "no revision 'nope'" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_unknown_and_offline_repositories_are_one_line(fake_hub, tiny_repos, tmp_path, capfd):
    run = run_script(capfd, "models.py", "user/missing")
    assert run.returncode == 2 and "no such Hub repository" in run.stderr and "Traceback" not in run.stderr
    # offline, nothing cached: in a process of its own that sees only the environment (HF_HOME, HF_HUB_OFFLINE)
    fake_hub.log.clear()
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE")
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", "user/tiny-repo", "--prompt", "x",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: user/tiny-repo: not in the Hugging Face cache {tmp_path / 'empty-hf' / 'hub'}, and HF_HUB_OFFLINE=1 "
        f"forbids downloads; fetch it where the Hub can be reached: python models.py fetch user/tiny-repo"]
    assert fake_hub.log == [] and not (tmp_path / "empty-hf").exists()


@pytest.mark.slow
def test_fetch_and_check(fake_hub, tiny_repos, monkeypatch, capfd):
    commit = fake_hub.add("user/tiny-repo", tiny_repos["diffusers"])
    monkeypatch.setattr(hub, "KNOWN_MODELS", {"user/tiny-repo": ("diffusers", "a tiny test model")})
    run = run_script(capfd, "models.py", "fetch", "user/tiny-repo")
    assert run.returncode == 0, run.stderr[-2000:]
    size = sum(len(v) for v in tiny_repos["diffusers"].values())
    assert f"user/tiny-repo at main = {commit}: " in run.stdout and f"{size / 1e6:.2f} MB" in run.stdout
    assert "  unet/diffusion_pytorch_model.safetensors  8." in run.stdout
    run = run_script(capfd, "models.py", "check")
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(rf"user/tiny-repo +main = {commit[:12]}, complete", run.stdout)
    assert "sample    nothing: a base model (user/tiny-repo)" in run.stdout
    assert re.search(r"evaluate  trn-jester, jester-categories, sscd_disc_mixup, clip:ViT-B-32-quickgelu:openai: "
                     r"python models.py fetch trn-jester", run.stdout)


@pytest.fixture
def served_model(fake_hub, monkeypatch):
    """An evaluator of URL_FILES served by the FakeHub: a TorchScript SSCD stand-in (descriptors: pooled pixels)."""
    class Pixels(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.normalize(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1), dim=-1)

    path = Path(os.environ["NEWMOVE_CACHE"]).parent / "pixels.torchscript.pt"
    torch.jit.script(Pixels()).save(str(path))
    fake_hub.plain["/files/pixels.torchscript.pt"] = data = path.read_bytes()
    return f"{fake_hub.url}/files/pixels.torchscript.pt", hashlib.sha256(data).hexdigest()


def test_url_file_with_its_pinned_sha256_is_downloaded_and_used(served_model, monkeypatch, tmp_path, capfd):
    url, digest = served_model
    monkeypatch.setattr(hub, "URL_FILES", {"pixels": (url, digest)})
    video = torch.randint(0, 256, (3, 2, 16, 16), dtype=torch.uint8)
    sample.save_video(video, tmp_path / "gen", "v")
    sample.save_video(video.flip(1), tmp_path / "train", "t")
    run = run_script(capfd, "evaluate.py", "--videos-in", tmp_path / "gen", "--sscd", "pixels", "--sscd-size", "16",
                     "--train-videos", tmp_path / "train", "--out", tmp_path / "report")  # --sscd by name
    assert run.returncode == 0, run.stderr[-2000:]
    path = hub.weights_cache() / "pixels.torchscript.pt"
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["named_weights"]["sscd"]["name"] == "pixels" and report["sha256"][str(path)] == digest
    assert 0.99 < report["aggregate"]["copy_score_mean_max"] <= 1.0001  # the same frames, reversed
    assert hub.url_file("pixels") == path
    assert metrics.load_sscd(path, size=16).descriptors(video).shape == (2, 48)
    assert hub.url_file("pixels") == path  # then from the cache, its pin checked again before each use
    path.write_bytes(b"changed since")
    with pytest.raises(hub.HubError, match="pixels.torchscript.pt: sha256 [0-9a-f]{64}, not the pinned"):
        hub.url_file("pixels")


def test_url_file_with_a_wrong_or_no_sha256_is_refused_and_nothing_remains(served_model, monkeypatch):
    url, digest = served_model
    cache = hub.weights_cache()
    monkeypatch.setattr(hub, "URL_FILES", {"pixels": (url, "0" * 64)})
    with pytest.raises(hub.HubError, match=f"has sha256 {digest}, not the pinned 0+: refused and deleted"):
        hub.url_file("pixels")
    assert not [p for p in cache.rglob("*") if p.is_file()]
    monkeypatch.setattr(hub, "URL_FILES", {"pixels": (url, None)})
    with pytest.raises(hub.HubError, match=f"none is pinned here; .* sha256 {digest} .* --sha256 {digest}"):
        hub.url_file("pixels")
    assert not [p for p in cache.rglob("*") if p.is_file()]
    with pytest.raises(hub.HubError, match="not the --sha256 given"):
        hub.url_file("pixels", ["1" * 64])
    assert hub.url_file("pixels", [digest.upper()]).is_file()  # the hash the user vouches for
    constants.HF_HUB_OFFLINE = True
    (cache / "pixels.torchscript.pt").unlink()
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE=1 forbids downloads.*python models.py fetch pixels"):
        hub.url_file("pixels")


def test_clip_by_open_clip_names(fake_hub, monkeypatch):
    """An hf-hub: CLIP created and cached by open_clip (served from 127.0.0.1), then loaded offline; a registry tag
    reaches open_clip.create_model with the QuickGELU its weights need; a tag open_clip lacks is one line."""
    torch.manual_seed(0)
    net = open_clip.CLIP(**TINY_CLIP["model_cfg"])
    fake_hub.add("user/tiny-clip", {"open_clip_config.json": json.dumps(TINY_CLIP).encode(),
                                    "open_clip_model.safetensors": save(net.state_dict())})
    clip = metrics.load_clip("hf-hub:user/tiny-clip")
    assert torch.equal(clip.model.visual.conv1.weight, net.visual.conv1.weight)
    assert hub.clip_file("hf-hub:user/tiny-clip").name == "open_clip_model.safetensors"
    constants.HF_HUB_OFFLINE = True
    fake_hub.log.clear()
    assert metrics.load_clip("hf-hub:user/tiny-clip").model.visual.conv1.weight.shape == net.visual.conv1.weight.shape
    assert fake_hub.log == []
    seen = {}
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: seen.update(kw, name=name) or net)
    metrics.load_clip("ViT-B-32", pretrained="openai")
    assert seen == {"name": "ViT-B-32", "pretrained": "openai", "force_quick_gelu": True, "require_pretrained": True}
    with pytest.raises(metrics.EvalError, match="--clip-pretrained nope: not in open_clip's pretrained registry"):
        metrics.load_clip("ViT-B-32", pretrained="nope")
