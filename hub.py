"""Weights by name: base models by Hugging Face Hub repository id, the evaluators' weights from the URLs their authors
publish. Each is kept in a cache, reused offline, and fetched in advance with models.py:

    python models.py fetch cerspense/zeroscope_v2_576w trn-jester jester-categories sscd_disc_mixup
    python models.py check            # what the caches hold, and what train / sample / evaluate still lack

Base models (`--model` of train.py, sample.py, evaluate.py, delta.py compress and models.py): an existing folder is
used as it is; a repository id (owner/name) is looked up in the Hugging Face cache (HF_HOME / HF_HUB_CACHE) and, only
when it is not there, downloaded into it by huggingface_hub (its progress bars, locks and HF_HUB_OFFLINE=1 rule),
fetching only the files load_models reads (`loader_files`): the configs, and one weight file per network. `--revision`
pins a branch, tag or commit; the commit it resolves to travels with the models (`Models.source`) into train.py's
config.json, the delta's metadata and evaluate.py's report.json.

The evaluators: CLIP by open_clip's own names (`--clip ViT-B-32 --clip-pretrained openai`), downloaded and cached by
open_clip's pretrained registry (`fetch_clip`); TRN and SSCD from URL_FILES into `weights_cache()`, each download kept
only once its sha256 is accepted.
"""

import hashlib
import os
import re
import sys
import urllib.request
from pathlib import Path

from weights import WeightsError, atomic_write, read_json, sha256

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells repository ids

# The base models known by name: (layout, what it is). Other ids work too; their layout is read from their files.
KNOWN_MODELS = {
    "ali-vilab/text-to-video-ms-1.7b": ("diffusers", "ModelScope T2V 1.7B, diffusers port (docs/modelscope.md §6)"),
    "cerspense/zeroscope_v2_576w": ("diffusers", "zeroscope v2 576w, the official NewMove base model (§7); its "
                                                 "zs2_576w/ copy in the original format is not fetched"),
    "ali-vilab/modelscope-damo-text-to-video-synthesis": ("original", "the original ModelScope release (§1)"),
    "Wan-AI/Wan2.1-T2V-1.3B": ("wan", "Wan 2.1 T2V 1.3B, the original release (wan_models.py)"),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": ("wan-diffusers", "Wan 2.1 T2V 1.3B, diffusers port (wan_models.py)"),
}

# What load_models reads (models.py's docstring draws both layouts). Diffusers layout: these configs (the first and
# the last are optional) and, per network, the first weight file present in weight_names' order.
DIFFUSERS_CONFIGS = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                     "scheduler/scheduler_config.json")
OPTIONAL_CONFIGS = ("model_index.json", "scheduler/scheduler_config.json")
DIFFUSERS_WEIGHTS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                     "text_encoder": ("model", "pytorch_model")}
# Original layout: configuration.json and the three files its model_args name (these names when it names none).
ORIGINAL_FILES = {"ckpt_unet": "text2video_pytorch_model.pth", "ckpt_autoencoder": "VQGAN_autoencoder.pth",
                  "ckpt_clip": "open_clip_pytorch_model.bin"}
# Wan 2.1 (wan_models.py): the original release's files (the DiT's safetensors may be sharded, then its index names
# the shards), and the diffusers port's folders, whose large networks come as shards listed in an index.
WAN_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth",
             "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json")
WAN_DIFFUSERS_FILES = ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                       "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                       "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json")

# The evaluators' weights by name: (URL, pinned sha256). Their publishers give no checksum (none found in the TRN or
# SSCD repositories, nor in code that downloads these files), so none is pinned: a download is kept only when its
# sha256 is one the user vouches for (--sha256 HEX or NEWMOVE_SHA256), and a refusal prints the hash it computed.
URL_FILES = {
    # zhoubolei/TRN-pytorch download.sh (docs/method.md §7.3): the Jester TRN and its class names, over plain http
    "trn-jester": ("http://relation.csail.mit.edu/models/"
                   "TRN_jester_RGB_BNInception_TRNmultiscale_segment8_best.pth.tar", None),
    "jester-categories": ("http://relation.csail.mit.edu/models/jester_categories.txt", None),
    # facebookresearch/sscd-copy-detection README (§7.5): the recommended SSCD model, as TorchScript
    "sscd_disc_mixup": ("https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt", None),
}
SUGGESTED = "cerspense/zeroscope_v2_576w"  # the official NewMove base model (docs/method.md §2)
EVAL_CLIP = ("ViT-B-32-quickgelu", "openai")  # docs/evaluation.md's CLIP: OpenAI ViT-B/32 (method.md §7.4)


class HubError(WeightsError):
    """Weights by name that cannot be had; the message names them and the command that fetches them."""


# -----------------------------------------------------------------------------------------------------------------------
# the files load_models reads


def weight_names(stems, variant: str | None = None) -> list:
    """A diffusers network's weight file names in load_models' order: safetensors (no pickle) before bin."""
    return [f"{s}.{variant}.{ext}" if variant else f"{s}.{ext}" for s in stems for ext in ("safetensors", "bin")]


def loader_files(names, variant=None, read_config=None, layout=None) -> tuple:
    """(layout, the files load_models reads) of a repository or folder holding `names` (relative paths). Required files
    are listed even when absent, so the missing ones are those not in `names`; read_config(name) -> the dict of a
    JSON file (the original layout's configuration.json may name other weight files)."""
    names = set(names)
    if layout is None:  # models.detect_layout's rule
        layout = "original" if "configuration.json" in names else "wan" if "Wan2.1_VAE.pth" in names else \
            "wan-diffusers" if "transformer/config.json" in names else \
            "diffusers" if "unet/config.json" in names or "model_index.json" in names else None
    if layout in ("wan", "wan-diffusers"):
        files = []
        for f in WAN_FILES if layout == "wan" else WAN_DIFFUSERS_FILES:
            index = f"{f}.index.json"  # a large network may come sharded: its index and the shards it names
            if f in OPTIONAL_CONFIGS and f not in names:
                continue
            files += _shards(index, read_config) if f not in names and index in names else [f]
        return layout, files
    if layout == "original":
        args = read_config("configuration.json") if read_config and "configuration.json" in names else {}
        args = (args.get("model") or {}).get("model_args") or {}
        return layout, ["configuration.json"] + [args.get(k, name) for k, name in ORIGINAL_FILES.items()]
    if layout == "diffusers":
        files = [c for c in DIFFUSERS_CONFIGS if c in names or c not in OPTIONAL_CONFIGS]
        for folder, stems in DIFFUSERS_WEIGHTS.items():
            candidates = [f"{folder}/{n}" for n in weight_names(stems, variant)]
            files.append(next((c for c in candidates if c in names), candidates[0]))  # one format, never both
        return layout, files
    return None, []


def _shards(index: str, read_config) -> list:
    """A sharded safetensors file: its index and the shard files it names (folder-relative)."""
    folder = index.rsplit("/", 1)[0] + "/" if "/" in index else ""
    mapping = (read_config(index) if read_config else {}).get("weight_map") or {}
    return [index] + sorted({folder + shard for shard in mapping.values()})


def folder_missing(folder: Path, variant=None, layout=None) -> list:
    """The files load_models would read that `folder` lacks."""
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    layout, files = loader_files(names, variant, lambda f: read_json(folder / f, f"model config {f}"), layout)
    return [f for f in files if f not in names] if layout else ["configuration.json or unet/config.json"]


# -----------------------------------------------------------------------------------------------------------------------
# base models: a folder, or a Hub repository from the cache or downloaded into it


def resolve(model: str, revision=None, variant=None, refresh: bool = False) -> tuple:
    """(folder, provenance) of a --model: an existing folder as it is; a Hub repository id from the Hugging Face cache,
    or downloaded into it when absent there (always asked of the Hub with `refresh`). Provenance: "model" and "path",
    and for an id "repo_id", "revision" and the "commit" it resolved to."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision:
            raise HubError(f"--revision {revision}: {model} is a folder; --revision picks a Hub repository's version")
        return path, {"model": str(model), "path": str(path.resolve())}
    if not REPO_ID.fullmatch(str(model)):
        raise HubError(f"{model}: not a directory, and not a Hugging Face Hub repository id (owner/name){_hint(model)}")
    folder = None if refresh else cached(model, revision, variant)
    folder = folder or download(model, revision, variant)
    # the snapshot folder is named by its commit (huggingface_hub's cache layout: snapshots/<commit>/)
    return folder, {"model": model, "repo_id": model, "revision": revision or "main", "commit": folder.name,
                    "path": str(folder)}


def _hint(model: str) -> str:
    """' (did you mean owner/name?)' when a known id ends with `model`."""
    near = [k for k in KNOWN_MODELS if k.split("/")[1] == Path(str(model)).name]
    return f" (did you mean {near[0]}?)" if near else ""


def snapshot(repo_id: str, revision=None) -> Path | None:
    """The cached snapshot folder of repo_id at revision (refs/ name branches and tags), complete or not; no network."""
    from huggingface_hub import try_to_load_from_cache

    for probe in ("configuration.json", "unet/config.json", "model_index.json", "Wan2.1_VAE.pth"):
        hit = try_to_load_from_cache(repo_id, probe, revision=revision)
        if isinstance(hit, str):  # else None, or a marker that the Hub said the file does not exist
            return Path(hit).parents[probe.count("/")]
    return None


def cached(repo_id: str, revision=None, variant=None) -> Path | None:
    """The snapshot folder if the cache holds every file load_models reads, else None."""
    folder = snapshot(repo_id, revision)
    if folder is None or folder_missing(folder, variant, KNOWN_MODELS.get(repo_id, (None,))[0]):
        return None
    return folder


def hf_cache() -> Path:
    """huggingface_hub's cache folder (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """HF_HUB_OFFLINE=1, as huggingface_hub read it: no download of any kind, the Hub's or a URL's."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _flags(revision=None, variant=None) -> str:
    """The fetch command's options that reproduce a request."""
    return (f" --revision {revision}" if revision else "") + (f" --variant {variant}" if variant else "")


def download(repo_id: str, revision=None, variant=None) -> Path:
    """Fetch the files load_models reads into the Hugging Face cache; their snapshot folder."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    layout = KNOWN_MODELS.get(repo_id, (None,))[0]
    if offline():
        partial = snapshot(repo_id, revision)
        lacks = f" (the cached copy lacks {', '.join(folder_missing(partial, variant, layout))})" if partial else ""
        raise HubError(f"{repo_id}: not in the Hugging Face cache {hf_cache()}{lacks}, and HF_HUB_OFFLINE=1 forbids "
                       f"downloads; fetch it where the Hub can be reached: python models.py fetch {repo_id}"
                       f"{_flags(revision, variant)}")
    rev = revision or "main"
    try:
        info = HfApi().model_info(repo_id, revision=rev)  # the commit, and the repository's file list
        read = lambda f: read_json(hf_hub_download(repo_id, f, revision=info.sha), f"{repo_id} {f}")  # noqa: E731
        names = {s.rfilename for s in info.siblings or ()}
        layout, files = loader_files(names, variant, read, layout)  # read: the original layout's configuration.json
        _check_files(repo_id, rev, variant, layout, files, names)
        print(f"{repo_id}: fetching {len(files)} files ({layout} layout) into {hf_cache()}", file=sys.stderr,
              flush=True)
        folder = Path(snapshot_download(repo_id, revision=rev, allow_patterns=files))
    except WeightsError:
        raise
    except Exception as e:  # anything from huggingface_hub or the network: one line, never its traceback
        raise HubError(_why(e, repo_id, rev, _flags(revision, variant))) from None
    lacks = folder_missing(folder, variant, layout)
    if lacks:  # e.g. the branch moved between the listing and the download
        raise HubError(f"{repo_id} at {rev}: the download lacks {', '.join(lacks)}; run it again")
    return folder


def _check_files(repo_id, rev, variant, layout, files, names):
    """Refuse a repository without a model layout, or without a file load_models reads."""
    if layout is None:
        raise HubError(f"{repo_id} at {rev}: neither model layout (no configuration.json, no unet/config.json)")
    lacks = [f for f in files if f not in names]
    if lacks:
        raise HubError(f"{repo_id} at {rev}: lacks {', '.join(lacks)}" +
                       (f" (is there a --variant {variant} of every network?)" if variant else ""))


def _why(e: Exception, repo_id: str, rev: str, flags: str = "") -> str:
    """One line for a failure inside huggingface_hub: what went wrong and what to do."""
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        return f"{repo_id}: a gated repository: accept its conditions on its Hub page, then log in (HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError):
        return f"{repo_id}: no such folder, and no such Hub repository (or a private one: log in, HF_TOKEN)"
    if isinstance(e, RevisionNotFoundError):
        return f"{repo_id}: no revision {rev!r} (--revision takes a branch, tag or commit of the repository)"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return (f"{repo_id}: no such folder, and downloading it from the Hub failed ({type(e).__name__}: {first}); check "
            f"the connection, or fetch it where the Hub can be reached: python models.py fetch {repo_id}{flags}")


# -----------------------------------------------------------------------------------------------------------------------
# the evaluators: URL files with a sha256, and CLIP through open_clip's registry


def weights_cache() -> Path:
    """The URL files' folder: $NEWMOVE_CACHE, else newmove/ in the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("NEWMOVE_CACHE"):
        return Path(os.environ["NEWMOVE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "newmove"


def url_file(name: str, sha256s=()) -> Path:
    """The cached file of an evaluator name (URL_FILES), downloaded first when absent. `sha256s`: hashes the user
    vouches for (--sha256; with NEWMOVE_SHA256's), which stand in for the pin of a file that has none."""
    url, pin = URL_FILES[name]
    vouched = [*sha256s, *os.environ.get("NEWMOVE_SHA256", "").replace(",", " ").split()]
    accepted = {pin} if pin else {h.lower() for h in vouched}
    path = weights_cache() / url.rsplit("/", 1)[1]
    if path.is_file():  # kept only once its hash was accepted; a pin is checked again (the file may have changed)
        got = sha256(path) if pin else pin
        if got != pin:
            raise HubError(f"{path}: sha256 {got}, not the pinned {pin}; delete it to download it again")
        return path
    if offline():
        raise HubError(f"{name}: not in {weights_cache()}, and HF_HUB_OFFLINE=1 forbids downloads; fetch it where "
                       f"{url} can be reached: python models.py fetch {name}")
    return _download_url(name, url, path, accepted, pin)


def _download_url(name: str, url: str, path: Path, accepted: set, pin) -> Path:
    """Download `url` to `path` through a temporary file renamed only once its sha256 is accepted: a refused, failed or
    interrupted download leaves nothing (atomic_write deletes the temporary file)."""
    from tqdm import tqdm

    def write(tmp):
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f, \
                tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=path.name) as bar:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                h.update(block)
                bar.update(len(block))
        if h.hexdigest() not in accepted:
            raise HubError(_refusal(name, url, h.hexdigest(), accepted, pin))

    try:
        return atomic_write(path, write)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise HubError(f"{name}: cannot download {url} ({e})") from None


def _refusal(name: str, url: str, got: str, accepted: set, pin) -> str:
    """Why a download was refused, with the hash it has."""
    if pin:
        return f"{name}: the file from {url} has sha256 {got}, not the pinned {pin}: refused and deleted"
    if accepted:
        return (f"{name}: the file from {url} has sha256 {got}, not the --sha256 given "
                f"({', '.join(sorted(accepted))}): refused and deleted")
    return (f"{name}: no sha256 is published for {url}, so none is pinned here; the file just downloaded has sha256 "
            f"{got} and was deleted. If you trust it, run again with --sha256 {got} (or NEWMOVE_SHA256={got})")


def clip_name(name: str) -> tuple:
    """'clip:MODEL:TAG' or 'clip:hf-hub:org/repo' (models.py fetch's names) -> (model, tag or None)."""
    rest = name.removeprefix("clip:")
    if rest.startswith("hf-hub:") or ":" not in rest:
        return rest, None
    return tuple(rest.rsplit(":", 1))


def clip_file(model: str, tag=None) -> Path | None:
    """The weights file open_clip would load for `model` (with a pretrained `tag`, or an hf-hub: model), if it is
    already where open_clip keeps it (the Hugging Face cache, or ~/.cache/clip for URL-only entries); no network."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    if model.startswith("hf-hub:"):
        repo, file = model[len("hf-hub:"):], ""
    else:
        cfg = open_clip.get_pretrained_cfg(model, tag or "")
        if not cfg.get("hf_hub"):  # open_clip prefers the Hub; URL-only entries go to ~/.cache/clip
            path = Path("~/.cache/clip").expanduser() / cfg.get("url", "?").rsplit("/", 1)[-1]
            return path if cfg.get("url") and path.is_file() else None
        repo, file = os.path.split(cfg["hf_hub"])
    file = file or "open_clip_pytorch_model.bin"  # open_clip's default name, tried after its .safetensors twin
    twin = "open_clip_model.safetensors" if file == "open_clip_pytorch_model.bin" else \
        re.sub(r"\.(bin|pth)$", ".safetensors", file)
    for f in (twin, file):
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            return Path(hit)
    return None


def fetch_clip(model: str, tag=None) -> Path:
    """Download `model`'s weights the way open_clip.create_model does (its pretrained registry, into its caches)."""
    import open_clip
    from open_clip import pretrained

    try:
        if model.startswith("hf-hub:"):
            pretrained.download_pretrained_from_hf(model[len("hf-hub:"):], filename="open_clip_config.json")
            return Path(pretrained.download_pretrained_from_hf(model[len("hf-hub:"):]))
        cfg = open_clip.get_pretrained_cfg(model, tag or "")
        if not cfg:
            raise HubError(f"CLIP {model} {tag}: not in open_clip's pretrained registry (tags of {model}: "
                           f"{', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'})")
        return Path(pretrained.download_pretrained(cfg))
    except WeightsError:
        raise
    except Exception as e:  # open_clip wraps huggingface_hub's errors: one line, and the way to fetch it
        first = (str(e).strip().splitlines() or [""])[0][:200]
        name = f"clip:{model}" + (f":{tag}" if tag else "")
        raise HubError(f"CLIP {model}{' ' + tag if tag else ''}: cannot get its weights ({type(e).__name__}: "
                       f"{first}); fetch them where they can be downloaded: python models.py fetch {name}") from None


# -----------------------------------------------------------------------------------------------------------------------
# models.py fetch / check


def _size(n: int) -> str:
    """Bytes in the nearest unit."""
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def fetch(name: str, revision=None, variant=None, sha256s=()) -> list:
    """Fetch one name (a repository id, an evaluator of URL_FILES, or clip:MODEL:TAG) now; lines saying where it is."""
    if name.startswith("clip:"):
        path = fetch_clip(*clip_name(name))
        return [f"{name}: {path}  {_size(path.stat().st_size)}"]
    if name in URL_FILES:
        path = url_file(name, sha256s)
        return [f"{name}: {path}  {_size(path.stat().st_size)}  sha256 {sha256(path)}"]
    if not REPO_ID.fullmatch(name):
        raise HubError(f"{name}: not a Hub repository id (owner/name), an evaluator ({', '.join(URL_FILES)}) or a "
                       f"CLIP (clip:MODEL:TAG, e.g. clip:{':'.join(EVAL_CLIP)})")
    folder, source = resolve(name, revision, variant, refresh=True)
    _, files = loader_files({p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}, variant,
                            lambda f: read_json(folder / f, f), KNOWN_MODELS.get(name, (None,))[0])
    sizes = [(f, (folder / f).stat().st_size) for f in files]
    return [f"{name} at {source['revision']} = {source['commit']}: {folder}  {_size(sum(s for _, s in sizes))}"] + \
        [f"  {f}  {_size(s)}" for f, s in sizes]


def check() -> list:
    """What the caches hold of the known models and the evaluators, and what each command still lacks."""
    lines, bases = [f"Hugging Face cache {hf_cache()}:"], []
    for repo, (layout, about) in KNOWN_MODELS.items():
        folder = snapshot(repo)
        lacks = folder_missing(folder, None, layout) if folder else None
        bases += [repo] if folder and not lacks else []
        state = "not cached" if folder is None else f"main = {folder.name[:12]}, " + \
            (f"lacks {', '.join(lacks)}" if lacks else "complete")
        lines.append(f"  {repo:50s} {state}  ({about})")
    lines.append(f"evaluators' weights ({weights_cache()}, and open_clip's caches):")
    missing = []
    for name, (url, _) in URL_FILES.items():
        path = weights_cache() / url.rsplit("/", 1)[1]
        lines.append(f"  {name:50s} " + (_size(path.stat().st_size) if path.is_file() else f"not cached ({url})"))
        missing += [] if path.is_file() else [name]
    clip, found = "clip:" + ":".join(EVAL_CLIP), clip_file(*EVAL_CLIP)
    lines.append(f"  {clip:50s} {found or 'not cached'}")
    missing += [] if found else [clip]
    # train and sample need a base model (train.py without --model uses the committed toy model); evaluate all
    have = f"nothing: a base model ({bases[0]})" if bases else None
    need = ([] if bases else [SUGGESTED]) + missing
    todo = f"{', '.join(need)}: python models.py fetch {' '.join(need)}" if need else "nothing"
    if set(need) & set(URL_FILES):
        todo += " (no sha256 is pinned for the URL files: the first try prints the hash to pass as --sha256)"
    return lines + ["what each command still lacks:",
                    "  train     " + (have or f"a base model: python models.py fetch {SUGGESTED} (without --model: "
                                              f"the toy model in toy/model, always there)"),
                    "  sample    " + (have or f"a base model: python models.py fetch {SUGGESTED}"),
                    "  evaluate  " + todo]
