"""weights_download.py (built on huggingface_hub) against a fake hub on 127.0.0.1 started by the tests: the routes
huggingface_hub uses (model info with files metadata, HEAD/GET resolve with ETag and X-Repo-Commit, Range), the
files tinybooth picks, hashes, gated refusals, disk space, model_index.json for diffusers, one-line errors."""
import errno
import hashlib
import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("weights_download", ROOT / "weights_download.py")
wd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wd)

BIG = bytes(range(256)) * 4096          # 1 MiB "LFS" file
SMALL = b'{"sample_size": 8}'            # a small git file
INDEX = {"_class_name": "IFPipeline", "_diffusers_version": "0.16.0", "unet": ["diffusers", "UNet2DConditionModel"],
         "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": ["deepfloyd_if.safety_checker",
         "IFSafetyChecker"], "feature_extractor": ["transformers", "CLIPImageProcessor"],
         "watermarker": ["deepfloyd_if.watermark", "IFWatermarker"], "requires_safety_checker": True}
REPO = "tiny/model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(BaseHTTPRequestHandler):
    """GET /api/models/<repo>/revision/main (files metadata), HEAD and GET /<repo>/resolve/<commit>/<path>.

    Class attributes set per test: files {path: bytes served}, published {path: bytes whose hashes the API
    advertises}, token (required for files if set: a gated repo), drop_first (paths whose first GET stops halfway),
    log [(method, path, Range, Authorization)]."""
    files, published, token, drop_first, log = {}, {}, None, set(), []

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def serve(self, body):
        self.log.append((self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        if self.path.startswith(f"/api/models/{REPO}/revision/main"):
            return self.send(200, json.dumps(dict(id=REPO, sha=COMMIT, siblings=self.siblings())).encode(), body)
        prefix = f"/{REPO}/resolve/{COMMIT}/"
        path = self.path[len(prefix):]
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            code = 403 if self.headers.get("Authorization") else 401
            return self.send(code, b"", body, {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        if not self.path.startswith(prefix) or path not in self.files:
            return self.send(404, b"", body, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "no such file"})
        data = self.files[path]
        etag = hashlib.sha256(data).hexdigest() if path.endswith(".safetensors") else git_sha1(data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT}
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if body and not start and path in self.drop_first:
            self.drop_first.discard(path)
            self.send(200, data, False, headers)
            self.wfile.write(data[: len(data) // 2])   # then the connection closes: an interrupted transfer
            return
        self.send(206 if start else 200, data[start:], body, headers)

    def siblings(self):
        out = []
        for path, data in sorted(self.published.items()):
            s = {"rfilename": path, "size": len(data), "blobId": git_sha1(data)}
            if path.endswith(".safetensors"):
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(s)
        return out

    def send(self, code, data, body, headers=None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    FakeHub.files = {"unet/config.json": SMALL, "unet/diffusion_pytorch_model.safetensors": BIG,
                     "unet/diffusion_pytorch_model.fp16.safetensors": BIG[:1000], "README.md": b"not needed",
                     "model_index.json": json.dumps(INDEX).encode()}
    FakeHub.published = dict(FakeHub.files)
    FakeHub.token, FakeHub.drop_first, FakeHub.log = None, set(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setitem(wd.MODELS, "tiny", wd.Model("a test model", (0.001, None), repo=REPO, gated=True,
                                                    files=("model_index.json",) + wd.UNET))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    yield FakeHub
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def gets(hub, start=0):
    return [p for m, p, _, _ in hub.log[start:] if m == "GET" and "/resolve/" in p]


def test_download_fetches_only_needed_files_and_verifies(hub, tmp_path):
    root = wd.download("tiny", tmp_path, token=False, progress=False)
    assert (root / "unet/config.json").read_bytes() == SMALL
    assert (root / "unet/diffusion_pytorch_model.safetensors").read_bytes() == BIG
    assert not (root / "README.md").exists(), "only the files tinybooth reads are fetched"
    assert not (root / "unet/diffusion_pytorch_model.fp16.safetensors").exists(), "fp16 only with --variant fp16"
    assert not list(root.rglob("*.incomplete")), "no partial files may remain after a successful download"
    assert all(f"/resolve/{COMMIT}/" in p for p in gets(hub)), "files come from the commit the listing named"
    n = len(hub.log)
    wd.download("tiny", tmp_path, token=False, progress=False)
    assert not gets(hub, n), "a second run fetches nothing again"


def test_variant_fp16(hub, tmp_path):
    root = wd.download("tiny", tmp_path, variant="fp16", token=False, progress=False)
    assert (root / "unet/diffusion_pytorch_model.fp16.safetensors").read_bytes() == BIG[:1000]
    assert not (root / "unet/diffusion_pytorch_model.safetensors").exists()


def test_dropped_connection_is_resumed_with_range(hub, tmp_path, monkeypatch):
    """huggingface_hub resumes from the last chunk written (10 MB chunks; 64 KB here, for a 1 MB file)."""
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub.drop_first = {"unet/diffusion_pytorch_model.safetensors"}
    root = wd.download("tiny", tmp_path, token=False, progress=False)
    assert (root / "unet/diffusion_pytorch_model.safetensors").read_bytes() == BIG
    ranges = [r for m, p, r, _ in hub.log if m == "GET" and p.endswith("diffusion_pytorch_model.safetensors") and r]
    assert ranges == [f"bytes={len(BIG) // 2}-"], f"the second request must resume at the half, got {ranges}"


@pytest.mark.parametrize("path", ["unet/diffusion_pytorch_model.safetensors", "unet/config.json"])
def test_corrupted_file_is_rejected_and_deleted(hub, tmp_path, path):
    hub.files = dict(hub.files)
    hub.files[path] = bytes(len(hub.files[path]))          # same size, wrong content
    with pytest.raises(wd.DownloadError, match="corrupted"):
        wd.download("tiny", tmp_path, token=False, progress=False)
    assert not (tmp_path / "tiny" / path).exists(), "a file failing its published hash must be deleted"
    hub.files = dict(hub.published)
    root = wd.download("tiny", tmp_path, token=False, progress=False)
    assert (root / path).read_bytes() == hub.published[path], "the next run fetches it again"


def test_gated_model_says_which_page_to_accept(hub, tmp_path):
    hub.token = "good"
    with pytest.raises(wd.DownloadError) as e:
        wd.download("tiny", tmp_path, token=None, progress=False)
    msg = str(e.value)
    assert f"https://huggingface.co/{REPO}" in msg and "accept its licence" in msg and "HF_TOKEN" in msg, msg
    assert "no token was found" in msg and "\n" not in msg, msg
    with pytest.raises(wd.DownloadError, match="invalid or its account has not accepted"):
        wd.download("tiny", tmp_path, token="bad", progress=False)
    root = wd.download("tiny", tmp_path, token="good", progress=False)
    assert (root / "unet/config.json").exists(), "with the right token the download works"


def test_token_from_environment_is_sent(hub, tmp_path, monkeypatch):
    hub.token = "envtoken"
    monkeypatch.setenv("HF_TOKEN", "envtoken")
    wd.download("tiny", tmp_path, progress=False)
    auth = {a for m, p, _, a in hub.log if "/resolve/" in p}
    assert auth == {"Bearer envtoken"}, f"HF_TOKEN must be sent with every file request, saw {auth}"


def test_free_disk_space_is_checked_first(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(wd.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(wd.DownloadError, match="not enough free disk space"):
        wd.download("tiny", tmp_path, token=False, progress=False)
    assert not gets(hub), "nothing may be downloaded before the space check"


def test_disk_full_during_the_download_is_one_line_exit_2(hub, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(wd, "hf_hub_download", full)
    assert wd.main(["tiny", "--dir", str(tmp_path)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]   # (after the progress bar)
    assert last.startswith("error: the disk holding") and "full" in last and "Traceback" not in last, last


def test_missing_variant_is_named(hub, tmp_path):
    del hub.published["unet/diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(wd.DownloadError, match=r"no file matching 'unet/diffusion_pytorch_model\.fp16"):
        wd.download("tiny", tmp_path, variant="fp16", token=False, progress=False)


def test_model_index_names_only_fetched_components(hub, tmp_path):
    """diffusers' from_pretrained skips components set to [null, null]; a component named but not fetched makes it
    raise OSError. The rewrite keeps everything else, and a second run does not take it for corruption."""
    root = wd.download("tiny", tmp_path, token=False, progress=False)
    index = json.loads((root / "model_index.json").read_text())
    assert index["unet"] == INDEX["unet"], "fetched components keep their class"
    for name in ("scheduler", "safety_checker", "feature_extractor", "watermarker"):
        assert index[name] == [None, None], f"{name} was not fetched, so it must be [null, null]"
    assert {k: v for k, v in index.items() if not isinstance(v, list)} == \
        {k: v for k, v in INDEX.items() if not isinstance(v, list)}, "_class_name and flags unchanged"
    assert not [p for p in root.iterdir() if p.name.startswith(".model_index")], "no temporary file left"
    wd.download("tiny", tmp_path, token=False, progress=False)
    assert json.loads((root / "model_index.json").read_text()) == index


def test_list_offline_says_sizes_are_estimates(capsys):
    assert wd.main(["--list", "--offline"]) == 0
    out = capsys.readouterr().out
    for name in ("IF-I-M-v1.0", "IF-II-M-v1.0", "stable-diffusion-v1-5", "clip-vit-base-patch32", "dino-vits16",
                 "lpips-alex"):
        assert f"python weights_download.py {name}" in out, f"{name} and its command must be listed"
    assert out.count("an estimate") == len(wd.MODELS), "every offline size must be called an estimate"
    full, fp16 = wd.MODELS["IF-I-M-v1.0"].estimate_gb
    assert fp16 > 11.5, "IF-I-M fp16 holds T5-XXL's fp16 shards alone (~11.5 GB) plus the U-Net"
    assert "text_encoder/model{v}-*-of-*.safetensors" in out and "gated" in out


def test_list_online_gives_the_hubs_sizes(hub, monkeypatch, capsys):
    monkeypatch.setattr(wd, "MODELS", {"tiny": wd.MODELS["tiny"]})
    wd.main(["--list"])
    out = capsys.readouterr().out
    assert wd.human(len(BIG) + len(SMALL) + len(hub.published["model_index.json"])) in out and "an estimate" \
        not in out, out


def test_unknown_name_suggests_near_names(capsys):
    assert wd.main(["IF-I-M", "--dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'IF-I-M'") and "IF-I-M-v1.0" in err and err.count("\n") == 1, err


def test_plain_url_models_get_no_hub_token(hub, tmp_path, monkeypatch):
    """LPIPS comes from download.pytorch.org and GitHub: the hub token must not be sent there."""
    monkeypatch.setenv("HF_TOKEN", "secret")
    url = f"{wd.hub_endpoint()}/{REPO}/resolve/{COMMIT}/unet/config.json"
    monkeypatch.setitem(wd.MODELS, "plain", wd.Model("a plain-URL model", (0.001, None), urls=(
        (url, "config.json", hashlib.sha256(SMALL).hexdigest()[:8]),)))
    root = wd.download("plain", tmp_path, progress=False)
    assert (root / "config.json").read_bytes() == SMALL
    assert [auth for _, _, _, auth in hub.log] == [None], "no Authorization header outside the hub"
