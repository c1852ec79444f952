"""Download the public weights tinybooth uses, and only the files it reads.

    python weights_download.py --list                       # names, files, sizes
    python weights_download.py IF-I-M-v1.0 --variant fp16   # -> weights/IF-I-M-v1.0/
    python weights_download.py IF-II-M-v1.0 --variant fp16  # -> weights/IF-II-M-v1.0/
    python -m tinybooth.sample --model weights/IF-I-M-v1.0 --sr-model weights/IF-II-M-v1.0 --prompt "a photo of a dog"

Every file is fetched from the Hugging Face Hub (or the mirror in $HF_ENDPOINT / --endpoint) with plain HTTP:
  - the hub's file listing gives each file's size and hash (sha256 for large "LFS" files, the git blob sha1 for
    small ones); the free disk space is checked against the total first;
  - a file is written to NAME.part, resumed with an HTTP Range request after an interrupted transfer (in this run
    or a later one), verified against its published hash, and only then renamed to its final name: a file under
    its final name is always complete and verified, so re-running skips it;
  - DeepFloyd IF is gated: accept its licence on the model page while logged in, make a read token at
    https://huggingface.co/settings/tokens, and set HF_TOKEN=... (or run `huggingface-cli login` once; that stored
    token is used too). A 401/403 says exactly this.
huggingface_hub is imported only to find a token stored by `huggingface-cli login`, and only if it is installed.
"""
import argparse
import fnmatch
import hashlib
import http.client
import json
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
RETRIES = 3             # resumed attempts per file after a dropped connection
SPACE_MARGIN = 1 << 28  # keep 256 MB free beyond the download itself
TIMEOUT = 60


@dataclass(frozen=True)
class Model:
    """A downloadable model: files of a hub repo (fnmatch patterns; "{v}" becomes ".fp16" with --variant fp16;
    "a|b" takes the first alternative the repo has), or plain URLs with their hashes (LPIPS)."""
    about: str
    approx_size: str
    repo: str = None
    files: tuple = ()
    urls: tuple = ()     # (url, file name, sha256 or its first hex digits, size or None)
    gated: bool = False


IF_TEXT = ("text_encoder/config.json", "text_encoder/model.safetensors.index{v}.json",
           "text_encoder/model{v}-*-of-*.safetensors", "tokenizer/spiece.model", "tokenizer/tokenizer_config.json",
           "tokenizer/special_tokens_map.json")
UNET = ("unet/config.json", "unet/diffusion_pytorch_model{v}.safetensors")
MODELS = {
    "IF-I-M-v1.0": Model(
        "DeepFloyd IF stage I (64x64, ~400M params) with its T5 v1.1 XXL text encoder (4.8B) and tokenizer",
        "~21 GB, ~11 GB with --variant fp16", repo="DeepFloyd/IF-I-M-v1.0", gated=True,
        files=("model_index.json", "scheduler/scheduler_config.json") + UNET + IF_TEXT),
    "IF-II-M-v1.0": Model(
        "DeepFloyd IF stage II (64 -> 256 super-resolution, ~450M params); uses stage I's T5 embeddings",
        "~1.8 GB, ~0.9 GB with --variant fp16", repo="DeepFloyd/IF-II-M-v1.0", gated=True,
        files=("model_index.json", "scheduler/scheduler_config.json",
               "image_noising_scheduler/scheduler_config.json") + UNET),
    "stable-diffusion-v1-5": Model(
        "Stable Diffusion 1.5 (U-Net 860M, VAE 84M, CLIP ViT-L/14 text 123M), the copy kept after runwayml's removal",
        "~4.3 GB, ~2.1 GB with --variant fp16", repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
        files=("model_index.json", "scheduler/scheduler_config.json") + UNET
        + ("vae/config.json", "vae/diffusion_pytorch_model{v}.safetensors", "text_encoder/config.json",
           "text_encoder/model{v}.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
           "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json")),
    "clip-vit-base-patch32": Model(
        "CLIP ViT-B/32 (image and text towers) for the CLIP-I and CLIP-T scores", "~0.6 GB",
        repo="openai/clip-vit-base-patch32",
        files=("config.json", "model.safetensors|pytorch_model.bin", "vocab.json", "merges.txt",
               "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json")),
    "dino-vits16": Model(
        "DINO ViT-S/16 (self-supervised) for the DINO subject-fidelity score", "~0.09 GB",
        repo="facebook/dino-vits16", files=("config.json", "pytorch_model.bin", "preprocessor_config.json")),
    "lpips-alex": Model(
        "LPIPS v0.1 (AlexNet trunk + linear heads) for the DIV diversity score; converted to tinybooth's layout",
        "~0.23 GB",
        urls=(("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "alexnet-owt-7be5be79.pth",
               "7be5be79", None),   # torchvision publishes the first 8 hex digits of the sha256 in the name
              ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
               "alex.pth", "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0", 6009))),
}


class DownloadError(RuntimeError):
    """A download that cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    path: str            # where it goes, relative to the model directory
    url: str
    size: int = None
    sha256: str = None   # full hash, or a prefix of it (torchvision)
    git_sha1: str = None  # the git blob id of a small (non-LFS) hub file


# ----------------------------------------------------------------------------------------------------------------
# HTTP

def hub_endpoint(endpoint=None):
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token():
    """HF_TOKEN, else the token `huggingface-cli login` stored (read through huggingface_hub when installed)."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token  # only here, lazily: the one use of huggingface_hub
    except ImportError:
        return None
    return get_token()


class _DropAuthOnOtherHost(urllib.request.HTTPRedirectHandler):
    """Follow the hub's redirects (to its CDN), but never send the token to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_DropAuthOnOtherHost)


def http_open(url, token=None, headers=None, model_name=None):
    """urlopen with the token and headers; HTTP errors become a DownloadError saying what to do."""
    req = urllib.request.Request(url, headers={"User-Agent": "tinybooth-weights-download", **(headers or {})})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        return _opener.open(req, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        raise DownloadError(explain_http_error(e.code, url, token, model_name)) from None
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url}: {e.reason}. Check the network connection (or set HF_ENDPOINT "
                            f"to a mirror)") from None


def explain_http_error(code, url, token, model_name=None):
    page = None
    if model_name in MODELS and MODELS[model_name].repo:
        page = f"https://huggingface.co/{MODELS[model_name].repo}"
    if code in (401, 403):
        gated = model_name in MODELS and MODELS[model_name].gated
        lines = [f"access refused (HTTP {code}) for {url}."]
        if gated:
            lines.append(f"{model_name} is a gated model: open {page} while logged in and accept its licence, ")
        lines.append("create a read token at https://huggingface.co/settings/tokens and pass it with "
                     "`export HF_TOKEN=hf_...` (or run `huggingface-cli login` once).")
        lines.append("A token was sent, so it is invalid or its account has not accepted the licence yet."
                     if token else "No token was found (HF_TOKEN is unset and no stored login).")
        return "\n".join(lines)
    if code == 404:
        return (f"not found (HTTP 404): {url}. The file may not exist in this variant (try without --variant) "
                "or the repository moved.")
    if code == 416:
        return f"the server refused to resume (HTTP 416) {url}; delete the .part file and run again"
    return f"HTTP {code} for {url}; try again later"


# ----------------------------------------------------------------------------------------------------------------
# which files, how big, which hash

def list_repo(repo, endpoint, token, revision="main", model_name=None):
    """{path: entry} of every file of a hub model repo (the API's tree listing, recursive, all pages)."""
    url = f"{endpoint}/api/models/{repo}/tree/{revision}?recursive=true"
    files = {}
    while url:
        with http_open(url, token, model_name=model_name) as r:
            for entry in json.load(r):
                if entry.get("type") == "file":
                    files[entry["path"]] = entry
            url = _next_link(r.headers.get("Link"))
    return files


def _next_link(link):
    """The rel="next" URL of a Link header (the hub paginates long listings like GitHub does)."""
    for part in (link or "").split(","):
        if 'rel="next"' in part:
            return part.split(";")[0].strip().strip("<>")
    return None


def resolve_files(name, model, listing, endpoint, variant=None, revision="main"):
    """The RemoteFiles of a hub model matching its patterns, for the variant; errors name what is missing."""
    v = f".{variant}" if variant else ""
    chosen = []
    for pattern in model.files:
        for alternative in pattern.format(v=v).split("|"):
            matches = sorted(p for p in listing if fnmatch.fnmatchcase(p, alternative))
            if matches:
                break
        if not matches:
            hint = " (this variant may not be published; try without --variant)" if variant and "{v}" in pattern else ""
            raise DownloadError(f"{model.repo} has no file matching '{pattern.format(v=v)}'{hint}")
        chosen += matches
    out = []
    for path in chosen:
        entry = listing[path]
        lfs = entry.get("lfs") or {}
        out.append(RemoteFile(path, f"{endpoint}/{model.repo}/resolve/{revision}/{urllib.parse.quote(path)}",
                              size=entry.get("size"), sha256=lfs.get("oid"),
                              git_sha1=None if lfs else entry.get("oid")))
    return out


def check_disk_space(directory, needed):
    """Refuse to start when the disk holding `directory` has less than needed + 256 MB free."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + SPACE_MARGIN:
        raise DownloadError(f"not enough free disk space in '{directory}': the download needs {human(needed)} "
                            f"(+ {human(SPACE_MARGIN)} margin), {human(free)} free. Free some space or pass "
                            f"--dir on a larger disk.")


def human(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


# ----------------------------------------------------------------------------------------------------------------
# one file: .part, resume, verify, rename

def _hasher(f):
    if f.git_sha1:  # git's blob id: sha1 of "blob <size>\0" + content
        h = hashlib.sha1()
        h.update(f"blob {f.size}\0".encode())
        return h
    return hashlib.sha256()


def fetch(f, target, token=None, progress=True, model_name=None):
    """Download RemoteFile f to `target` through target.part, resuming and verifying; returns target."""
    target = Path(target)
    if target.exists() and (f.size is None or target.stat().st_size == f.size):
        return target            # a final name is only ever given to a verified file
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    for attempt in range(RETRIES + 1):
        done = part.stat().st_size if part.exists() else 0
        if f.size is not None and done > f.size:  # not ours, or a different version: start over
            part.unlink()
            done = 0
        if f.size is None or done < f.size:
            try:
                _transfer(f, part, done, token, progress, model_name)
            except (ConnectionError, TimeoutError, http.client.HTTPException, OSError) as e:
                if attempt == RETRIES:
                    raise DownloadError(f"the transfer of {f.path} failed {RETRIES + 1} times ({e}); the part "
                                        f"already fetched is kept: run the same command again to resume") from None
                continue         # dropped connection: resume from what is on disk
        if f.size is None or part.stat().st_size == f.size:
            break
    _verify(f, part)
    os.replace(part, target)
    return target


def _transfer(f, part, done, token, progress, model_name):
    headers = {"Accept-Encoding": "identity"}
    if done:
        headers["Range"] = f"bytes={done}-"
    with http_open(f.url, token, headers, model_name) as r:
        if done and r.status != 206:      # the server ignored the Range request: start again from byte 0
            done = 0
        total = f.size or (int(r.headers["Content-Length"]) + done if r.headers.get("Content-Length") else None)
        bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=Path(f.path).name, disable=not progress,
                   leave=False)
        with open(part, "ab" if done else "wb") as out:
            while True:
                chunk = r.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
        bar.close()
    got = part.stat().st_size
    if f.size is not None and got < f.size:
        raise ConnectionError(f"transfer of {f.path} stopped at {got} of {f.size} bytes")


def _verify(f, part):
    h = _hasher(f)
    with open(part, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    expected = f.git_sha1 or f.sha256
    if expected and not h.hexdigest().startswith(expected):
        part.unlink()
        kind = "git blob sha1" if f.git_sha1 else "sha256"
        raise DownloadError(f"{f.path} is corrupted: its {kind} is {h.hexdigest()}, the published one is {expected}. "
                            "The partial file was deleted; run the same command again.")


# ----------------------------------------------------------------------------------------------------------------
# a whole model

def plan(name, variant=None, endpoint=None, token=None):
    """The RemoteFiles of model `name` (asks the hub for sizes and hashes of hub models)."""
    model = MODELS[name]
    if model.repo is None:
        return [RemoteFile(fname, url, size=size, sha256=sha) for url, fname, sha, size in model.urls]
    endpoint = hub_endpoint(endpoint)
    listing = list_repo(model.repo, endpoint, token, model_name=name)
    return resolve_files(name, model, listing, endpoint, variant)


def download(name, directory="weights", variant=None, endpoint=None, token=None, progress=True):
    """Fetch model `name` into directory/name/; returns that path. See the module docstring."""
    if name not in MODELS:
        raise DownloadError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    model = MODELS[name]
    # the hub token goes to the hub only, never to the other hosts of plain-URL models
    token = None if model.repo is None else (token if token is not None else hub_token())
    root = Path(directory) / name
    if name == "lpips-alex" and (root / "model.safetensors").exists():
        return root
    files = plan(name, variant, endpoint, token)
    todo = [f for f in files if not (root / f.path).exists()]
    needed = sum((f.size or 0) - _part_size(root / f.path) for f in todo)
    check_disk_space(root, needed)
    for f in tqdm(todo, desc=name, unit="file", disable=not progress or len(todo) < 2):
        fetch(f, root / f.path, token, progress, name)
    if name == "lpips-alex":
        _convert_lpips(root, files)
    return root


def _part_size(target):
    part = target.with_name(target.name + ".part")
    return part.stat().st_size if part.exists() else 0


def _convert_lpips(root, files):
    """The two original LPIPS files -> tinybooth's directory (config.json + model.safetensors)."""
    from tinybooth.lpips import convert_original
    trunk, lin = (root / f.path for f in files)
    convert_original(trunk, lin, root)
    trunk.unlink()
    lin.unlink()


def print_list(endpoint=None, variant=None, online=True):
    """Names, what they are, their files and sizes (exact from the hub when reachable, else approximate)."""
    token = hub_token() if online else None
    for name, model in MODELS.items():
        print(f"{name}{'  [gated: accept the licence, set HF_TOKEN]' if model.gated else ''}\n    {model.about}")
        files = None
        if online and model.repo:
            try:
                files = plan(name, variant, endpoint, token)
            except DownloadError as e:
                online = "access refused" in str(e)   # unreachable: list the rest offline, without waiting again
        if files is not None and all(f.size is not None for f in files):
            variant_note = f" (variant {variant})" if variant else ""
            print(f"    {human(sum(f.size for f in files))} in {len(files)} files{variant_note}")
            for f in files:
                print(f"      {f.path:60s} {human(f.size):>10s}")
        else:
            print(f"    {model.approx_size}")
            for pattern in model.files or [u[1] for u in model.urls]:
                print(f"      {pattern}")
        fp16 = " --variant fp16" if "{v}" in "".join(model.files) else ""
        print(f"    python weights_download.py {name} --dir weights{fp16}")


def main(argv=None):
    global TIMEOUT  # --timeout applies to every request of this run
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="models: " + ", ".join(MODELS))
    p.add_argument("name", nargs="*", help="model name(s), see --list")
    p.add_argument("--list", action="store_true", help="show the models, their files and sizes")
    p.add_argument("--offline", action="store_true", help="with --list: do not ask the hub for exact sizes")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds to wait for the server (default 60)")
    p.add_argument("--dir", default="weights", help="where to put them (default: weights/)")
    p.add_argument("--variant", choices=["fp16"], default=None, help="half-precision files where the repo has them")
    p.add_argument("--endpoint", default=None, help=f"hub URL (default: $HF_ENDPOINT or {DEFAULT_ENDPOINT})")
    args = p.parse_args(argv)
    TIMEOUT = args.timeout if not (args.list or not args.name) else min(args.timeout, 10)
    if args.list or not args.name:
        print_list(args.endpoint, args.variant, online=not args.offline)
        return 0
    try:
        for name in args.name:
            path = download(name, args.dir, args.variant, args.endpoint)
            print(f"{name}: ready in {path}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
