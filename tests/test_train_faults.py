"""The fault battery of `python -m tinybooth.train` (issue 14): every user mistake ends with exit status 2 and ONE
line `error: ...` naming the flag or file, no traceback, and nothing written before is changed.

Each case is one row: (name, how to build the bad input, the flags, a word the message must contain). A finished
tiny run is made once; every case runs next to it and the files of that run must be byte-identical afterwards.
The library-level cases (sample, evaluate, weights, images) are in tests/test_faults.py.
"""
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import _if_args, photos, tiny_if  # noqa: F401  (fixtures)
from tinybooth import train

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_if, photos, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("finished") / "run"
    torch.set_num_threads(1)
    train.run(_if_args(tiny_if, photos, out, "--max-steps", "2", "--sr-steps", "1", "--num-samples", "0"))
    return out


def _photos_with(photos, tmp, name, content):  # noqa: F811
    d = tmp / "dog"
    shutil.copytree(photos, d)
    if content is None:
        (d / name).symlink_to(tmp / "nowhere.png")
    else:
        (d / name).write_bytes(content)
    return d


def _empty_dir(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _corrupt_checkpoint(run, tmp):
    shutil.copytree(run, tmp / "copy")
    ckpt = torch.load(tmp / "copy" / "checkpoint.pt", weights_only=True)
    ckpt["trainable"].pop(next(iter(ckpt["trainable"])))
    torch.save(ckpt, tmp / "copy" / "checkpoint.pt")
    return tmp / "copy"


def _random_checkpoint(run, tmp):
    shutil.copytree(run, tmp / "copy")
    (tmp / "copy" / "checkpoint.pt").write_bytes(bytes(range(256)) * 40)
    return tmp / "copy"


def _bad_config(tiny_if, tmp):  # noqa: F811
    shutil.copytree(tiny_if[0], tmp / "IF-I")
    (tmp / "IF-I" / "unet" / "config.json").write_text("{not json")
    return tmp / "IF-I"


def _truncated_weights(tiny_if, tmp):  # noqa: F811
    shutil.copytree(tiny_if[0], tmp / "IF-I")
    w = tmp / "IF-I" / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return tmp / "IF-I"


# (name, setup(ctx) -> {placeholder: value}, flags (placeholders in {}), a word the one-line message must contain)
CASES = [
    ("empty instance folder", lambda c: {"inst": _empty_dir(c.tmp)}, ["--instance-dir", "{inst}"], "holds no images"),
    ("missing instance folder", lambda c: {"inst": c.tmp / "nope"}, ["--instance-dir", "{inst}"], "does not exist"),
    ("zero-byte jpeg", lambda c: {"inst": _photos_with(c.photos, c.tmp, "09.jpg", b"")},
     ["--instance-dir", "{inst}"], "09.jpg"),
    ("truncated jpeg", lambda c: {"inst": _photos_with(c.photos, c.tmp, "09.jpg", b"\xff\xd8\xff\xe0 trunc")},
     ["--instance-dir", "{inst}"], "09.jpg"),
    ("missing class noun", lambda c: {}, ["--class-noun", ""], "--class-noun"),
    ("max steps 0", lambda c: {}, ["--max-steps", "0"], "--max-steps"),
    ("sr steps -1", lambda c: {}, ["--sr-steps", "-1"], "--sr-steps"),
    ("negative prior weight", lambda c: {}, ["--prior-loss-weight", "-1"], "--prior-loss-weight"),
    ("negative grad norm", lambda c: {}, ["--max-grad-norm=-1"], "--max-grad-norm"),
    ("negative num samples", lambda c: {}, ["--num-samples", "-2"], "--num-samples"),
    ("zero class images", lambda c: {}, ["--num-class-images", "0"], "--num-class-images"),
    ("zero class batch", lambda c: {}, ["--class-batch-size", "0"], "--class-batch-size"),
    ("lr inf", lambda c: {}, ["--lr", "inf"], "--lr"),
    ("lr not a number", lambda c: {}, ["--lr", "fast"], "--lr"),
    ("sr noise level above 1", lambda c: {}, ["--sr-noise-level", "2"], "--sr-noise-level"),
    ("fp16 on the cpu", lambda c: {}, ["--mixed-precision", "fp16", "--device", "cpu"], "fp16"),
    ("optimizer in backward with accumulation", lambda c: {}, ["--optimizer-in-backward", "--grad-accum", "2"],
     "--grad-accum"),
    ("resume and overwrite", lambda c: {}, ["--resume", "--overwrite"], "--overwrite"),
    ("resume without a checkpoint", lambda c: {}, ["--resume"], "no checkpoint"),
    ("rerun over a finished run", lambda c: {"out": c.run}, ["--output-dir", "{out}"], "--overwrite"),
    ("output inside the input model", lambda c: {"model": c.run / "model", "out": c.run},
     ["--model", "{model}", "--sr-model", "none", "--output-dir", "{out}"], "overlaps the input model"),
    ("resume with another prior weight", lambda c: {"out": c.run},
     ["--output-dir", "{out}", "--resume", "--prior-loss-weight", "0.5", "--max-steps", "2", "--sr-steps", "1"],
     "prior_loss_weight"),
    ("checkpoint missing a tensor", lambda c: {"out": _corrupt_checkpoint(c.run, c.tmp)},
     ["--output-dir", "{out}", "--resume", "--max-steps", "2", "--sr-steps", "1"], "other weights"),
    ("random bytes as checkpoint", lambda c: {"out": _random_checkpoint(c.run, c.tmp)},
     ["--output-dir", "{out}", "--resume"], "not a tinybooth checkpoint"),
    ("model folder missing", lambda c: {"model": c.tmp / "IF-I-M-v1.0"}, ["--model", "{model}"],
     "weights_download.py IF-I-M-v1.0"),
    ("model folder empty", lambda c: {"model": _empty_dir(c.tmp)}, ["--model", "{model}"], "neither an IF"),
    ("typo in a model name", lambda c: {"model": c.tmp / "IF-I-N-v1.0"}, ["--model", "{model}"], "--list"),
    ("invalid config.json", lambda c: {"model": _bad_config(c.tiny_if, c.tmp)}, ["--model", "{model}"],
     "config.json"),
    ("truncated weights", lambda c: {"model": _truncated_weights(c.tiny_if, c.tmp)}, ["--model", "{model}"],
     "diffusion_pytorch_model.safetensors"),
    ("sr model as the model", lambda c: {"model": c.tiny_if[1]}, ["--model", "{model}", "--sr-model", "none"],
     "--sr-model"),
    ("exploding learning rate", lambda c: {}, ["--lr", "1e6", "--checkpoint-every", "1", "--sr-steps", "0"],
     "learning rate"),
]


class Ctx:
    def __init__(self, tmp, run, photos, tiny_if):  # noqa: F811
        self.tmp, self.run, self.photos, self.tiny_if = tmp, run, photos, tiny_if


@pytest.mark.parametrize("name,setup,flags,word", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_ends_with_one_line_and_changes_nothing(name, setup, flags, word, finished_run, tiny_if, photos,
                                                          tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TINYBOOTH_CACHE", str(tmp_path / "cache"))
    values = setup(Ctx(tmp_path, finished_run, photos, tiny_if))
    argv = _if_args(tiny_if, photos, tmp_path / "out", "--max-steps", "2", "--sr-steps", "1", "--num-samples", "0")
    argv += [f.format(**values) for f in flags]
    before = snapshot(finished_run)
    code = train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"{name}: exit status {code}, stderr {err}"
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), f"{name}: expected one error line, got {err}"
    assert word in errors[0], f"{name}: the message should name {word!r}: {errors[0]}"
    assert snapshot(finished_run) == before, f"{name}: files of the finished run changed"


def test_the_command_itself_prints_one_line(tmp_path):
    """As a user runs it: a process, exit status 2, one stderr line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "tinybooth.train", "--max-steps", "0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "--max-steps" in r.stderr and "Traceback" not in r.stderr


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_weights(tiny_if, photos, tmp_path, monkeypatch):  # noqa: F811
    """A real `kill -9` of a training process as soon as its first checkpoint is on disk, then --resume: the final
    weights equal an uninterrupted run's bit for bit (--deterministic, CPU)."""
    import os
    import signal
    import time
    from safetensors.torch import load_file
    monkeypatch.setenv("TINYBOOTH_CACHE", str(tmp_path / "cache"))
    args = ["--sr-steps", "0", "--num-samples", "0", "--max-steps", "40", "--checkpoint-every", "1", "--deterministic"]
    train.run(_if_args(tiny_if, photos, tmp_path / "full", *args))
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "tinybooth.train", *_if_args(tiny_if, photos, cut, *args)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "checkpoint.pt").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    assert not (cut / "model").exists(), "killed mid-run: no finished model yet"
    train.run(_if_args(tiny_if, photos, cut, *args, "--resume"))
    a = load_file(str(tmp_path / "full" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(cut / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "kill -9 + --resume must give the uninterrupted weights"
