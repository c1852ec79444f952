"""weights_download.py against a fake hub on 127.0.0.1 (started by the tests): listing, resume, hashes, refusals."""
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
REPO = "tiny/model"


def git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(BaseHTTPRequestHandler):
    """Serves /api/models/<repo>/tree/main (two pages) and /<repo>/resolve/main/<path>, with Range support.

    Class attributes set per test: files {path: bytes actually served}, published {path: bytes whose hash the
    listing advertises}, token (required if set), drop_first (paths whose first full GET stops halfway), log.
    """
    files, published, token, drop_first, log = {}, {}, None, set(), []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.log.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            return self.send_error(401 if not self.headers.get("Authorization") else 403)
        tree = f"/api/models/{REPO}/tree/main"
        if self.path.startswith(tree):
            entries = []
            for path, data in sorted(self.published.items()):
                e = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
                if path.endswith(".safetensors"):
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(e)
            page2 = "cursor=2" in self.path
            body = json.dumps(entries[1:] if page2 else entries[:1] + [{"type": "directory", "path": "unet"}]).encode()
            self.send_response(200)
            if not page2:
                self.send_header("Link", f'<http://127.0.0.1:{self.server.server_port}{tree}?recursive=true&cursor=2>; '
                                         'rel="next"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body)
        prefix = f"/{REPO}/resolve/main/"
        path = self.path[len(prefix):]
        if not self.path.startswith(prefix) or path not in self.files:
            return self.send_error(404)
        data = self.files[path]
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not rng and path in self.drop_first:
            self.drop_first.discard(path)
            self.wfile.write(data[: len(data) // 2])   # then the connection closes: an interrupted transfer
            self.wfile.flush()
            return
        self.wfile.write(data[start:])


@pytest.fixture
def hub(monkeypatch):
    FakeHub.files = {"unet/config.json": SMALL, "unet/diffusion_pytorch_model.safetensors": BIG,
                     "unet/diffusion_pytorch_model.fp16.safetensors": BIG[:1000], "README.md": b"not needed"}
    FakeHub.published = dict(FakeHub.files)
    FakeHub.token, FakeHub.drop_first, FakeHub.log = None, set(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setitem(wd.MODELS, "tiny", wd.Model("a test model", "1 MB", repo=REPO, gated=True,
                                                    files=wd.UNET))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(wd, "TIMEOUT", 10)
    yield FakeHub
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_download_fetches_only_needed_files_and_verifies(hub, tmp_path):
    root = wd.download("tiny", tmp_path, token="", progress=False)
    assert (root / "unet/config.json").read_bytes() == SMALL
    assert (root / "unet/diffusion_pytorch_model.safetensors").read_bytes() == BIG
    assert not (root / "README.md").exists(), "only the files tinybooth reads are fetched"
    assert not (root / "unet/diffusion_pytorch_model.fp16.safetensors").exists(), "fp16 only with --variant fp16"
    assert not list(root.rglob("*.part")), "no partial files may remain after a successful download"
    assert any("cursor=2" in p for p, _, _ in hub.log), "the listing's second page (Link: rel=next) must be read"
    n = len(hub.log)
    wd.download("tiny", tmp_path, token="", progress=False)
    assert not [p for p, _, _ in hub.log[n:] if "/resolve/" in p], "verified files are not fetched again"


def test_variant_fp16(hub, tmp_path):
    root = wd.download("tiny", tmp_path, variant="fp16", token="", progress=False)
    assert (root / "unet/diffusion_pytorch_model.fp16.safetensors").read_bytes() == BIG[:1000]
    assert not (root / "unet/diffusion_pytorch_model.safetensors").exists()


def test_interrupted_transfer_is_resumed_with_range(hub, tmp_path):
    hub.drop_first = {"unet/diffusion_pytorch_model.safetensors"}
    root = wd.download("tiny", tmp_path, token="", progress=False)
    assert (root / "unet/diffusion_pytorch_model.safetensors").read_bytes() == BIG
    ranges = [r for p, r, _ in hub.log if p.endswith("diffusion_pytorch_model.safetensors") and r]
    assert ranges == [f"bytes={len(BIG) // 2}-"], f"the second request must resume at the half, got {ranges}"


def test_part_file_of_an_earlier_run_is_resumed(hub, tmp_path):
    part = tmp_path / "tiny/unet/diffusion_pytorch_model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BIG[:1234])
    wd.download("tiny", tmp_path, token="", progress=False)
    assert (tmp_path / "tiny/unet/diffusion_pytorch_model.safetensors").read_bytes() == BIG
    assert ("bytes=1234-" in [r for _, r, _ in hub.log]), "an existing .part must be continued, not restarted"


@pytest.mark.parametrize("path", ["unet/diffusion_pytorch_model.safetensors", "unet/config.json"])
def test_corrupted_file_is_rejected_and_never_gets_its_final_name(hub, tmp_path, path):
    hub.files = dict(hub.files)
    hub.files[path] = bytes(len(hub.files[path]))          # same size, wrong content
    with pytest.raises(wd.DownloadError, match="corrupted"):
        wd.download("tiny", tmp_path, token="", progress=False)
    target = tmp_path / "tiny" / path
    assert not target.exists(), "a file failing its hash must not appear under its final name"
    assert not target.with_name(target.name + ".part").exists(), "the corrupted partial file is deleted"


def test_refused_access_is_explained(hub, tmp_path):
    hub.token = "good"
    with pytest.raises(wd.DownloadError) as e:
        wd.download("tiny", tmp_path, token="", progress=False)
    msg = str(e.value)
    assert "401" in msg and "licence" in msg and "HF_TOKEN" in msg and "No token" in msg, msg
    with pytest.raises(wd.DownloadError, match="403(.|\n)*invalid or its account has not accepted"):
        wd.download("tiny", tmp_path, token="bad", progress=False)
    root = wd.download("tiny", tmp_path, token="good", progress=False)
    assert (root / "unet/config.json").exists(), "with the right token the download works"


def test_token_from_environment_is_sent(hub, tmp_path, monkeypatch):
    hub.token = "envtoken"
    monkeypatch.setenv("HF_TOKEN", "envtoken")
    wd.download("tiny", tmp_path, progress=False)
    assert all(auth == "Bearer envtoken" for _, _, auth in hub.log)


def test_free_disk_space_is_checked_first(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(wd.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(wd.DownloadError, match="not enough free disk space"):
        wd.download("tiny", tmp_path, token="", progress=False)
    assert not [p for p, _, _ in hub.log if "/resolve/" in p], "nothing may be downloaded before the space check"


def test_missing_variant_is_named(hub, tmp_path):
    del hub.published["unet/diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(wd.DownloadError, match=r"no file matching 'unet/diffusion_pytorch_model\.fp16"):
        wd.download("tiny", tmp_path, variant="fp16", token="", progress=False)


def test_list_and_unknown_name(capsys):
    assert wd.main(["--list", "--offline"]) == 0
    out = capsys.readouterr().out
    for name in ("IF-I-M-v1.0", "IF-II-M-v1.0", "stable-diffusion-v1-5", "clip-vit-base-patch32", "dino-vits16",
                 "lpips-alex"):
        assert name in out
    assert "text_encoder/model{v}-*-of-*.safetensors" in out and "gated" in out
    assert wd.main(["no-such-model", "--dir", "/nonexistent"]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_plain_url_models_get_no_hub_token(hub, tmp_path, monkeypatch):
    """LPIPS comes from download.pytorch.org and GitHub: the hub token must not be sent there."""
    monkeypatch.setenv("HF_TOKEN", "secret")
    base = wd.hub_endpoint()
    url = f"{base}/{REPO}/resolve/main/unet/config.json"
    monkeypatch.setitem(wd.MODELS, "plain", wd.Model("a plain-URL model", "1 KB",
                                                     urls=((url, "config.json", hashlib.sha256(SMALL).hexdigest()[:8],
                                                            None),)))
    root = wd.download("plain", tmp_path, progress=False)
    assert (root / "config.json").read_bytes() == SMALL
    assert [auth for _, _, auth in hub.log] == [None], "no Authorization header outside the hub"


def test_repeated_drops_keep_the_part_and_say_to_rerun(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(wd, "RETRIES", 0)
    hub.drop_first = {"unet/diffusion_pytorch_model.safetensors"}
    with pytest.raises(wd.DownloadError, match="run the same command again to resume"):
        wd.download("tiny", tmp_path, token="", progress=False)
    part = tmp_path / "tiny/unet/diffusion_pytorch_model.safetensors.part"
    assert part.stat().st_size == len(BIG) // 2 and not part.with_suffix("").exists()
    wd.download("tiny", tmp_path, token="", progress=False)   # the next run resumes
    assert (tmp_path / "tiny/unet/diffusion_pytorch_model.safetensors").read_bytes() == BIG
