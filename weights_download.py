"""Download the public weights tinybooth uses, and only the files it reads.

    python weights_download.py --list                       # names, files, sizes (from the hub, or estimates)
    python weights_download.py IF-I-M-v1.0 --variant fp16   # -> weights/IF-I-M-v1.0/
    python weights_download.py IF-II-M-v1.0 --variant fp16  # -> weights/IF-II-M-v1.0/
    python -m tinybooth.sample --model weights/IF-I-M-v1.0 --sr-model weights/IF-II-M-v1.0 --prompt "a photo of a dog"

The transfer is huggingface_hub's `hf_hub_download` into `--dir/NAME` (its `local_dir`): the token (HF_TOKEN or the
one `hf auth login` stored), the hub's redirects, progress bars, resuming a dropped connection within a run, Xet
storage, and HF_ENDPOINT / --endpoint for a mirror. What tinybooth adds:
  - the table of models a DreamBooth user needs, and within each repo only the files tinybooth reads, in the
    fp16 variant with --variant fp16;
  - one listing of the repo with its files' sizes and hashes (`HfApi.model_info(files_metadata=True)`), pinned to
    one commit: the free disk space is checked against the total first, and every large ("LFS") file is checked
    against its published sha256 (small files against their git blob id once, when fetched); a file that fails is
    deleted and the run stops;
  - DeepFloyd IF is gated: the message says which page's licence to accept and how to pass a token;
  - `model_index.json` names every component of the pipeline; those not fetched (safety_checker,
    feature_extractor, watermarker) are set to [null, null], so `DiffusionPipeline.from_pretrained(dir)` loads the
    folder without them.
"""
import argparse
import difflib
import errno
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token, hf_hub_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HTTPError, RepositoryNotFoundError
from tqdm.auto import tqdm

DEFAULT_ENDPOINT = "https://huggingface.co"
SPACE_MARGIN = 1 << 28  # keep 256 MB free beyond the download itself
GB = 1e9


@dataclass(frozen=True)
class Model:
    """A downloadable model: files of a hub repo (fnmatch patterns; "{v}" becomes ".fp16" with --variant fp16;
    "a|b" takes the first alternative the repo has), or plain URLs with their hashes (LPIPS). estimate_gb: the
    download's size (full, fp16 variant) when the hub cannot be asked."""
    about: str
    estimate_gb: tuple
    repo: str = None
    files: tuple = ()
    urls: tuple = ()     # (url, file name, sha256 or its first hex digits)
    gated: bool = False


IF_TEXT = ("text_encoder/config.json", "text_encoder/model.safetensors.index{v}.json",
           "text_encoder/model{v}-*-of-*.safetensors", "tokenizer/spiece.model", "tokenizer/tokenizer_config.json",
           "tokenizer/special_tokens_map.json")
UNET = ("unet/config.json", "unet/diffusion_pytorch_model{v}.safetensors")
MODELS = {
    "IF-I-M-v1.0": Model(
        "DeepFloyd IF stage I (64x64, ~400M params) with its T5 v1.1 XXL text encoder (4.8B) and tokenizer",
        (21, 12.5), repo="DeepFloyd/IF-I-M-v1.0", gated=True,   # T5-XXL: ~19 GB fp32 shards, ~11.5 GB fp16
        files=("model_index.json", "scheduler/scheduler_config.json") + UNET + IF_TEXT),
    "IF-II-M-v1.0": Model(
        "DeepFloyd IF stage II (64 -> 256 super-resolution, ~450M params); uses stage I's T5 embeddings",
        (1.8, 0.9), repo="DeepFloyd/IF-II-M-v1.0", gated=True,
        files=("model_index.json", "scheduler/scheduler_config.json",
               "image_noising_scheduler/scheduler_config.json") + UNET),
    "stable-diffusion-v1-5": Model(
        "Stable Diffusion 1.5 (U-Net 860M, VAE 84M, CLIP ViT-L/14 text 123M), the copy kept after runwayml's removal",
        (4.3, 2.1), repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
        files=("model_index.json", "scheduler/scheduler_config.json") + UNET
        + ("vae/config.json", "vae/diffusion_pytorch_model{v}.safetensors", "text_encoder/config.json",
           "text_encoder/model{v}.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
           "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json")),
    "clip-vit-base-patch32": Model(
        "CLIP ViT-B/32 (image and text towers) for the CLIP-I and CLIP-T scores", (0.6, None),
        repo="openai/clip-vit-base-patch32",
        files=("config.json", "model.safetensors|pytorch_model.bin", "vocab.json", "merges.txt",
               "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json")),
    "dino-vits16": Model(
        "DINO ViT-S/16 (self-supervised) for the DINO subject-fidelity score", (0.09, None),
        repo="facebook/dino-vits16", files=("config.json", "pytorch_model.bin", "preprocessor_config.json")),
    "lpips-alex": Model(
        "LPIPS v0.1 (AlexNet trunk + linear heads) for the DIV diversity score; converted to tinybooth's layout",
        (0.23, None),
        urls=(("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "alexnet-owt-7be5be79.pth",
               "7be5be79"),   # torchvision publishes the first 8 hex digits of the sha256 in the name
              ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
               "alex.pth", "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"))),
}


class DownloadError(ValueError):
    """A download that cannot go on; the message (one line) says why and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    path: str             # relative to the model directory, as in the repo
    size: int = None
    sha256: str = None    # LFS files: the published sha256 (or a prefix of it: torchvision)
    git_sha1: str = None  # small files: the git blob id


def hub_endpoint(endpoint=None):
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def model_named(name):
    """MODELS[name], or a DownloadError naming the closest known names."""
    if name in MODELS:
        return MODELS[name]
    near = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise DownloadError(f"unknown model '{name}'; {hint}known: {', '.join(MODELS)} (see --list)")


# ----------------------------------------------------------------------------------------------------------------
# which files, how big, which hash

def explain(error, name, token):
    """A huggingface_hub / network error as a one-line DownloadError that says what to do."""
    model = MODELS.get(name)
    page = f"https://huggingface.co/{model.repo}" if model and model.repo else "the model page"
    if isinstance(error, GatedRepoError) or (isinstance(error, HfHubHTTPError) and model and model.gated
                                             and error.response is not None
                                             and error.response.status_code in (401, 403)):
        sent = ("the token sent is invalid or its account has not accepted the licence yet" if token is not False
                and _has_token(token) else "no token was found (HF_TOKEN unset, no `hf auth login`)")
        return DownloadError(f"{name} is gated: open {page} while logged in and accept its licence, make a read "
                             f"token at https://huggingface.co/settings/tokens and `export HF_TOKEN=hf_...`; {sent}")
    if isinstance(error, RepositoryNotFoundError):
        return DownloadError(f"{page}: repository not found (or private); check the name or your token")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 404:
        return DownloadError(f"{error.response.url}: not found on the hub; the variant may not be published (try "
                             "without --variant) or the repository moved")
    if isinstance(error, HfHubHTTPError) and status:
        return DownloadError(f"the hub answered HTTP {status} for {name}; try again later")
    return DownloadError(f"cannot reach the hub for {name} ({error}); check the network connection or set "
                         "HF_ENDPOINT to a mirror")


def _has_token(token):
    return bool(token) or (token is None and bool(get_token()))


def plan(name, variant=None, endpoint=None, token=None, timeout=None):
    """(commit, [RemoteFile]) of hub model `name`: its files matching the table's patterns, with sizes and hashes."""
    model = model_named(name)
    try:
        info = HfApi(endpoint=hub_endpoint(endpoint)).model_info(model.repo, revision="main", files_metadata=True,
                                                                 token=token, timeout=timeout)
    except HTTPError as e:
        raise explain(e, name, token) from None
    listing = {s.rfilename: s for s in info.siblings}
    return info.sha, [_remote(listing[path]) for path in match_files(model, listing, variant)]


def _remote(sibling):
    lfs = sibling.lfs
    return RemoteFile(sibling.rfilename, sibling.size, sha256=lfs.sha256 if lfs else None,
                      git_sha1=None if lfs else sibling.blob_id)


def match_files(model, paths, variant=None):
    """The repo paths matching the model's patterns for the variant; a pattern with no match is named."""
    v = f".{variant}" if variant else ""
    chosen = []
    for pattern in model.files:
        for alternative in pattern.format(v=v).split("|"):
            matches = sorted(p for p in paths if fnmatch.fnmatchcase(p, alternative))
            if matches:
                break
        if not matches:
            hint = " (this variant may not be published; try without --variant)" if variant and "{v}" in pattern else ""
            raise DownloadError(f"{model.repo} has no file matching '{pattern.format(v=v)}'{hint}")
        chosen += matches
    return chosen


def check_disk_space(directory, needed):
    """Refuse to start when the disk holding `directory` has less than needed + 256 MB free."""
    probe = Path(directory)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + SPACE_MARGIN:
        raise DownloadError(f"not enough free disk space in '{directory}': the download needs {human(needed)} "
                            f"(+ {human(SPACE_MARGIN)} margin), {human(free)} free; free some space or pass --dir "
                            "on a larger disk")


def human(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


# ----------------------------------------------------------------------------------------------------------------
# verify, and make the folder load in diffusers

def verify(path, f):
    """Check a downloaded file against its published hash; a mismatch deletes it (so a rerun fetches it again)."""
    if f.git_sha1:  # git's blob id: sha1 of "blob <size>\0" + content
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    expected = f.git_sha1 or f.sha256
    if expected and not h.hexdigest().startswith(expected):
        path.unlink()
        kind = "git blob sha1" if f.git_sha1 else "sha256"
        raise DownloadError(f"{f.path} is corrupted: its {kind} is {h.hexdigest()}, the published one is {expected}; "
                            "the file was deleted, run the same command again")


def null_unfetched_components(model_dir, fetched):
    """model_index.json with every component whose folder was not fetched set to [null, null] (diffusers then
    leaves it out: safety_checker, feature_extractor, watermarker), written atomically. Returns their names."""
    index = Path(model_dir) / "model_index.json"
    config = json.loads(index.read_text(encoding="utf-8"))
    dropped = [k for k, v in config.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None
               and not any(p.startswith(f"{k}/") for p in fetched)]
    if dropped:
        config.update({k: [None, None] for k in dropped})
        atomic_write(index, json.dumps(config, indent=2) + "\n")
    return dropped


def atomic_write(path, text):
    """Write to a temporary file beside path, then rename: readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# a whole model

class _NoBar(tqdm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


def download(name, directory="weights", variant=None, endpoint=None, token=None, progress=True):
    """Fetch model `name` into directory/name/ and verify it; returns that path. token: a string, None (HF_TOKEN or
    the stored login) or False (send none)."""
    model = model_named(name)
    root = Path(directory) / name
    if model.repo is None:
        return download_urls(model, root)
    endpoint = hub_endpoint(endpoint)
    commit, files = plan(name, variant, endpoint, token)
    fresh = [f for f in files if not (root / f.path).exists()]
    check_disk_space(root, sum(f.size or 0 for f in fresh))
    bar = tqdm if progress else _NoBar
    try:
        for f in bar(files, desc=name, unit="file"):
            hf_hub_download(model.repo, f.path, revision=commit, local_dir=root, token=token, endpoint=endpoint,
                            tqdm_class=None if progress else _NoBar)
    except HTTPError as e:
        raise explain(e, name, token) from None
    except OSError as e:
        raise disk_error(e, root) from None
    for f in files:   # large files every run (cheap next to the download), small ones once
        if f.sha256 or f in fresh:
            verify(root / f.path, f)
    if any(f.path == "model_index.json" for f in files):
        null_unfetched_components(root, [f.path for f in files])
    return root


def disk_error(e, root):
    if e.errno == errno.ENOSPC:
        return DownloadError(f"the disk holding '{root}' is full; free some space or pass --dir on a larger disk, "
                             "then run the same command again")
    return DownloadError(f"cannot write in '{root}': {e.strerror or e}")


def download_urls(model, root):
    """Plain-URL models (LPIPS: download.pytorch.org and GitHub, never sent a hub token): fetch and verify each
    file; LPIPS is then converted to tinybooth's layout (config.json + model.safetensors) in place."""
    if (root / "model.safetensors").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    paths = [fetch_url(url, root / fname, sha) for url, fname, sha in model.urls]
    if model is MODELS["lpips-alex"]:
        from tinybooth.lpips import convert_original
        convert_original(paths[0], paths[1], root)
        for path in paths:
            path.unlink()
    return root


def fetch_url(url, target, sha256):
    """url -> target through target.part, verified before it gets its name."""
    if target.exists():
        return target
    part = target.with_name(target.name + ".part")
    try:
        urllib.request.urlretrieve(url, part)
    except OSError as e:
        raise DownloadError(f"cannot fetch {url} ({e}); check the network connection, then run again") from None
    verify(part, RemoteFile(target.name, sha256=sha256))
    os.replace(part, target)
    return target


# ----------------------------------------------------------------------------------------------------------------
# the command

def print_list(endpoint=None, variant=None, online=True):
    """Names, what they are, their files and sizes: exact from the hub when reachable, else estimates."""
    for name, model in MODELS.items():
        print(f"{name}{'  [gated: accept the licence on the model page, set HF_TOKEN]' if model.gated else ''}\n"
              f"    {model.about}")
        files = None
        if online and model.repo:
            try:
                files = plan(name, variant, endpoint, timeout=10)[1]
            except DownloadError:
                online = False   # unreachable: list the rest offline, without waiting again
        if files and all(f.size is not None for f in files):
            print(f"    {human(sum(f.size for f in files))} in {len(files)} files"
                  f"{f' (variant {variant})' if variant else ''}, as the hub lists them now")
            for f in files:
                print(f"      {f.path:60s} {human(f.size):>10s}")
        else:
            full, fp16 = model.estimate_gb
            print(f"    ~{full} GB{f', ~{fp16} GB with --variant fp16' if fp16 else ''} (an estimate; the hub "
                  "gives exact sizes when reachable)")
            for pattern in model.files or [u[1] for u in model.urls]:
                print(f"      {pattern}")
        fp16 = " --variant fp16" if "{v}" in "".join(model.files) else ""
        print(f"    python weights_download.py {name} --dir weights{fp16}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="models: " + ", ".join(MODELS))
    p.add_argument("name", nargs="*", help="model name(s), see --list")
    p.add_argument("--list", action="store_true", help="show the models, their files and sizes")
    p.add_argument("--offline", action="store_true", help="with --list: do not ask the hub, show estimates")
    p.add_argument("--dir", default="weights", help="where to put them (default: weights/)")
    p.add_argument("--variant", choices=["fp16"], default=None, help="half-precision files where the repo has them")
    p.add_argument("--endpoint", default=None, help=f"hub URL (default: $HF_ENDPOINT or {DEFAULT_ENDPOINT})")
    args = p.parse_args(argv)
    if args.list or not args.name:
        print_list(args.endpoint, args.variant, online=not args.offline)
        return 0
    try:
        for name in args.name:
            path = download(name, args.dir, args.variant, args.endpoint)
            print(f"{name}: ready in {path}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
