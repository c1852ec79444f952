"""The fault battery (issue 14): bad inputs given to the commands, each answered with one clear line.

Every case builds a bad input in a fresh folder, runs a command on it as a user would, and checks
  - the exit status is 2 (a user's mistake, not a crash),
  - stderr holds exactly one line starting `error:`, and it names the file or flag (the expected text),
  - no Python traceback,
  - every file that existed before the run is byte-identical afterwards, and no temporary file is left.

Adding a case is one line in CASES: (name, setup, argv, expected text). `setup(work)` builds the bad input
inside the folder `work` and returns a dict of names used in argv (`{model}`, `{subject}`, ...; `{work}` always).
argv's first word is the command: `sample`, `evaluate`, or `library` (a snippet of library code run through
`tinybooth.errors.main_guard`, as a command would).

The cases run in this process through the command's `main` (main_guard inside, the code `python -m` runs):
starting Python costs 2.5 s of CPU to import torch, 90 s for the battery. Three of them run once more as real
subprocesses (test_fault_as_a_real_command_line), as every case did for the table below.

The table of before/after results is in tests/FAULTS.md; regenerate its columns with
    PYTHONPATH=. python tests/test_faults.py --root /path/to/a/checkout    (one markdown row per case)
"""
import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_data import bomb_png

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "tinybooth" / "assets" / "toy-IF-I"
TOY_SR = REPO / "tinybooth" / "assets" / "toy-IF-II"
PIPELINE_PARTS = ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet"]
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "text_encoder/model.safetensors"
SCHEDULER = "scheduler/scheduler_config.json"
TOKENIZER_CONFIG = "tokenizer/tokenizer_config.json"

# a library call run the way a command runs its main (the 'before' column ran it without main_guard)
LIBRARY = """import sys
try:
    from tinybooth.errors import main_guard
except ImportError:  # a checkout from before tinybooth.errors
    main_guard = lambda main, argv=None: main(sys.argv[1:])
def main(argv):
    {snippet}
    return 0
sys.exit(main_guard(main))
"""
LOAD_CHECKPOINT = ("import importlib.util, torch; importlib.import_module('tinybooth.files').load_checkpoint(argv[0]) "
                   "if importlib.util.find_spec('tinybooth.files') else "   # before tinybooth.files: train's torch.load
                   "torch.load(argv[0], map_location='cpu', weights_only=True)")
LOAD_UNET = "from tinybooth.unet import UNet; UNet.from_pretrained(argv[0])"


# ----------------------------------------------------------------------------------------------------------------
# building bad inputs

def toy_copy(work, source=TOY, parts=PIPELINE_PARTS):
    """A copy of the embedded toy pipeline (the parts sample reads), to damage."""
    model = work / "model"
    model.mkdir()
    for part in parts:
        src = source / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, model / part)
    return model


def png(path, size=64, seed=0):
    """A small valid RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def truncate(path, keep):
    """Cut a file to `keep` bytes (an int) or to that fraction of its size (a float)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: keep if isinstance(keep, int) else int(len(raw) * keep)])


def rewrite_weights(path, change):
    """Apply change(state) -> state to a safetensors file."""
    save_file(change(load_file(str(path))), str(path))


def scored_folder(work):
    """A valid image folder for evaluate --images (prompts.json, 00/k.png, prior/k.png) and a valid subject folder."""
    images, subject = work / "images", work / "subject"
    for d in (images / "00", images / "prior", subject):
        d.mkdir(parents=True)
        for k in range(2):
            png(d / f"{k}.png", seed=k)
    (images / "prompts.json").write_text('{"prompts": {"00": {"prompt": "a sks star", "text": "a star"}}, '
                                         '"prior": {"prompt": "a star", "text": "a star"}}\n')
    return {"images": images, "subject": subject}


def model(change=None):
    """setup: a toy pipeline copy, then change(model_dir)."""
    def setup(work):
        m = toy_copy(work)
        if change:
            change(m)
        return {"model": m}
    return setup


def subject(change):
    """setup: a valid image folder and subject folder, then change(subject_dir, images_dir)."""
    def setup(work):
        paths = scored_folder(work)
        change(paths["subject"], paths["images"])
        return paths
    return setup


def file_setup(write):
    """setup: write(path) makes work/f; argv names it {f}."""
    def setup(work):
        write(work / "f")
        return {"f": work / "f"}
    return setup


def only_broken_link(s, _):
    for f in s.iterdir():
        f.unlink()
    (s / "00.png").symlink_to(s / "gone.png")


def drop_key(state):
    state.pop(sorted(state)[0])
    return state


def wrong_shape(state):
    key = sorted(state)[0]
    state[key] = state[key].flatten()[:-1].clone()
    return state


def index_with_missing_shard(m):
    (m / TEXT_WEIGHTS).unlink()
    (m / "text_encoder/model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}')


def edit_json(path, text_from):
    """change(model): replace path's text by text_from(old text)."""
    return lambda m: (m / path).write_text(text_from((m / path).read_text()))


def pickled_bin(m):
    """The text encoder's weights as a pytorch_model.bin that holds a pickled object besides its tensors."""
    state = load_file(str(m / TEXT_WEIGHTS))
    (m / TEXT_WEIGHTS).unlink()
    torch.save({**state, "evil": Path(".")}, m / "text_encoder/pytorch_model.bin")


def run_folder(work):
    """A tinybooth.train run folder whose settings.json was cut short, and a valid subject folder."""
    paths = scored_folder(work)
    (work / "run").mkdir()
    (work / "run/settings.json").write_text('{"class_noun": ')
    return {**paths, "run": work / "run"}


SAMPLE = ["sample", "--model", "{model}", "--prompt", "a star", "--steps", "1", "--cache-dir", "{work}/../cache",
          "--out", "{work}/grid.png"]
EVALUATE = ["evaluate", "--images", "{images}", "--subject-dir", "{subject}", "--class-noun", "star",
            "--scorer", "toy", "--out", "{work}/eval"]
EVALUATE_RUN = ["evaluate", "--model", "{run}", "--subject-dir", "{subject}", "--class-noun", "star",
                "--steps", "1", "--out", "{work}/eval"]


RANDOM = bytes(range(256)) * 8

CASES = [
    # (name, setup, argv, text the error line must hold)
    ("model folder missing", lambda w: {"model": w / "nope"}, SAMPLE, "nope' does not exist"),
    ("model folder empty", lambda w: {"model": (w / "empty").mkdir() or w / "empty"}, SAMPLE,
     "empty' is neither an IF nor an SD pipeline"),
    ("typo'd known model name", lambda w: {"model": w / "weights" / "IF-I-M-v1.1"}, SAMPLE,
     "IF-I-M-v1.1' does not exist; check the path"),
    ("U-Net weights missing", model(lambda m: (m / UNET_WEIGHTS).unlink()), SAMPLE, "no weights in '"),
    ("U-Net weights cut to 7 bytes", model(lambda m: truncate(m / UNET_WEIGHTS, 7)), SAMPLE,
     "diffusion_pytorch_model.safetensors' is truncated or corrupt"),
    ("U-Net weights cut in half", model(lambda m: truncate(m / UNET_WEIGHTS, 0.5)), SAMPLE,
     "diffusion_pytorch_model.safetensors' is truncated or corrupt"),
    ("text-encoder weights random bytes", model(lambda m: (m / TEXT_WEIGHTS).write_bytes(RANDOM)), SAMPLE,
     "text_encoder/model.safetensors' is truncated or corrupt"),
    ("text-encoder index lists a missing shard", model(index_with_missing_shard), SAMPLE,
     "model-00001-of-00002.safetensors"),
    ("U-Net tensor missing", model(lambda m: rewrite_weights(m / UNET_WEIGHTS, drop_key)), SAMPLE,
     "diffusion_pytorch_model.safetensors) built from its config.json: missing (1)"),
    ("U-Net tensor of the wrong shape", model(lambda m: rewrite_weights(m / UNET_WEIGHTS, wrong_shape)), SAMPLE,
     "wrong shape (1)"),
    ("U-Net config.json invalid JSON", model(edit_json("unet/config.json", lambda t: t[:-3])), SAMPLE,
     "unet/config.json' is not valid JSON (line"),
    ("U-Net config.json unknown field", model(edit_json("unet/config.json", lambda t: t.replace("{", '{"foo": 1,', 1))),
     SAMPLE, "unet/config.json' does not describe a UNet"),
    ("text-encoder config.json empty", model(lambda m: (m / "text_encoder/config.json").write_text("")), SAMPLE,
     "text_encoder/config.json' is not valid JSON (line 1"),
    ("model_index.json invalid JSON", model(edit_json("model_index.json", lambda t: "{" + t)), SAMPLE,
     "model_index.json' is not valid JSON"),
    ("tokenizer missing", model(lambda m: (m / "tokenizer/spiece.model").unlink()), SAMPLE, "no spiece.model in '"),
    ("stage-II model given as --model", lambda w: {"model": toy_copy(w, TOY_SR, ["model_index.json"])}, SAMPLE,
     "is an IF stage-II (super-resolution) model; pass it as --sr-model"),
    ("subject folder missing", subject(lambda s, _: shutil.rmtree(s)), EVALUATE, "subject' does not exist"),
    ("subject folder holds only notes", subject(lambda s, _: [f.unlink() for f in s.iterdir()]
                                                or (s / "notes.txt").write_text("x")), EVALUATE, "holds no images"),
    ("subject photo of 0 bytes", subject(lambda s, _: (s / "0.png").write_bytes(b"")), EVALUATE,
     "'subject/0.png' cannot be read (empty file, 0 bytes)"),
    ("subject JPEG truncated", subject(lambda s, _: Image.open(s / "0.png").save(s / "2.jpg")
                                       or truncate(s / "2.jpg", 0.5)), EVALUATE,
     "'subject/2.jpg' cannot be read (truncated JPEG)"),
    ("subject folder holds only a broken link", subject(only_broken_link), EVALUATE,
     "'subject/00.png' -> '"),
    ("subject PNG of 20000x20000 pixels", subject(lambda s, _: bomb_png(s / "2.png")), EVALUATE,
     "'subject/2.png' is too large to open safely"),
    ("image folder without prompts.json", subject(lambda _, i: (i / "prompts.json").unlink()), EVALUATE,
     "has no prompts.json"),
    ("prompts.json invalid JSON", subject(lambda _, i: truncate(i / "prompts.json", 20)), EVALUATE,
     "prompts.json' is not valid JSON (line 1"),
    ("--images-per-prompt 1", subject(lambda s, i: None), EVALUATE + ["--images-per-prompt", "1"],
     "--images-per-prompt must be at least 2"),
    ("--model and --images together", subject(lambda s, i: None), EVALUATE + ["--model", "{work}"],
     "give --model (generate, then score) or --images"),
    ("stage-I model given as --sr-model", model(), SAMPLE + ["--sr-model", "{model}"],
     "--sr-model must be an IF stage-II directory"),
    ("text-encoder weights a pickled .bin", model(pickled_bin), SAMPLE, "holds pickled Python objects"),
    ("subject folder is a file", subject(lambda s, _: shutil.rmtree(s) or s.write_text("x")), EVALUATE,
     "subject' does not exist or is not a directory"),
    ("run's settings.json invalid JSON", run_folder, EVALUATE_RUN, "settings.json' is not valid JSON (line 1"),
    ("scheduler_config.json invalid JSON", model(lambda m: truncate(m / SCHEDULER, 10)), SAMPLE,
            "scheduler_config.json' is not valid JSON"),
    ("tokenizer_config.json invalid JSON", model(lambda m: truncate(m / TOKENIZER_CONFIG, 10)), SAMPLE,
            "tokenizer_config.json' is not valid JSON"),
    ("checkpoint.pt of random bytes", file_setup(lambda f: f.write_bytes(RANDOM)), ["library", LOAD_CHECKPOINT, "{f}"],
     "f' is not a tinybooth checkpoint (not a file written by torch.save"),
    ("checkpoint.pt of 0 bytes", file_setup(lambda f: f.write_bytes(b"")), ["library", LOAD_CHECKPOINT, "{f}"],
     "f' is not a tinybooth checkpoint (it is empty"),
    ("checkpoint.pt holding a pickled object", file_setup(lambda f: torch.save({"x": Path(".")}, f)),
     ["library", LOAD_CHECKPOINT, "{f}"], "holds pickled Python objects, refused"),
    ("U-Net weights random bytes (library)", model(lambda m: (m / UNET_WEIGHTS).write_bytes(RANDOM)),
     ["library", LOAD_UNET, "{model}/unet"], "diffusion_pytorch_model.safetensors' is truncated or corrupt"),
]


# ----------------------------------------------------------------------------------------------------------------
# running a case

def command_line(argv, names):
    """['sample', ...] -> the python command line, with {name} placeholders filled in."""
    words = [str(w).format(**names) for w in argv]
    if words[0] == "library":
        return [sys.executable, "-c", LIBRARY.format(snippet=words[1])] + words[2:]
    return [sys.executable, "-m", f"tinybooth.{words[0]}"] + words[1:]


def run_in_process(words):
    """What `python -m tinybooth.<command> args` does, without starting Python (2.5 s of CPU to import torch):
    the command's main (main_guard inside) on the arguments; an escaping exception is a traceback, status 1."""
    from tinybooth import evaluate, sample
    from tinybooth.errors import main_guard
    if words[0] == "library":
        scope = {}
        exec(textwrap.dedent(LIBRARY[LIBRARY.index("def main"):LIBRARY.index("sys.exit")]).format(snippet=words[1]),
             scope)  # our own snippet, the same text the subprocess runs
        main, argv = (lambda args: main_guard(scope["main"], args)), words[2:]
    else:
        main, argv = {"sample": sample.main, "evaluate": evaluate.main}[words[0]], words[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except Exception:
            traceback.print_exc()
            status = 1
    return status, err.getvalue()


def snapshot(folder):
    """{relative path: sha256} of every file under folder (links are recorded by their target)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_case(case, tmp, root=None):
    """Build the case's input in tmp/work and run it: in this process, or as a subprocess from the checkout
    `root`. Returns (exit status, stderr, snapshot before, snapshot after)."""
    name, setup, argv, _ = case
    work = tmp / "work"
    work.mkdir(parents=True)
    names = {"work": work, **setup(work)}
    before = snapshot(work)
    if root is None:
        status, stderr = run_in_process([str(w).format(**names) for w in argv])
    else:
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "TINYBOOTH_DEBUG": ""}
        done = subprocess.run(command_line(argv, names), cwd=root, env=env, capture_output=True, text=True,
                              timeout=120)
        status, stderr = done.returncode, done.stderr
    return status, stderr, before, snapshot(work)


def check(case, status, stderr, before, after):
    """The battery's four promises (module docstring), each failing with what the user would have seen."""
    name, _, _, expected = case
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr, f"{name}: a user's mistake must not print a traceback:\n{stderr}"
    assert status == 2, f"{name}: exit status {status}, expected 2 (a user's mistake)\n{stderr}"
    assert len(errors) == 1, f"{name}: expected exactly one 'error:' line on stderr, got {len(errors)}:\n{stderr}"
    assert expected in errors[0], f"{name}: the error line should contain {expected!r}:\n{errors[0]}"
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"{name}: files that existed before the run were changed or removed: {changed}"
    leftovers = [p for p in after if p not in before and ".tmp" in p]
    assert not leftovers, f"{name}: temporary files left behind: {leftovers}"


def plain(case):
    """A CASES entry as a plain tuple (the not_yet ones are wrapped in pytest.param)."""
    return case.values[0] if hasattr(case, "values") else case


@pytest.mark.parametrize("case", [c if hasattr(c, "values") else pytest.param(c, id=c[0]) for c in CASES])
def test_fault_ends_with_one_error_line_and_loses_nothing(case, tmp_path):
    check(case, *run_case(case, tmp_path))


AS_SUBPROCESS = ["U-Net weights cut in half", "subject PNG of 20000x20000 pixels", "checkpoint.pt of random bytes"]


@pytest.mark.parametrize("name", AS_SUBPROCESS)
def test_fault_as_a_real_command_line(name, tmp_path):
    """A few cases once more through `python -m ...` itself: the in-process runs above stand for the real thing."""
    case = next(plain(c) for c in CASES if plain(c)[0] == name)
    check(case, *run_case(case, tmp_path, root=REPO))


def describe(status, stderr, work):
    """One table cell: the exit status, how many lines stderr held, and the line a user reads first (the error
    line, or a traceback's last line), with the case's folder written <work>."""
    lines = [line for line in stderr.replace(str(work), "<work>").splitlines() if line.strip()]
    tops = [line for line in lines if not line.startswith((" ", "\t"))]
    shown = next((line for line in tops if line.startswith("error:")), tops[-1] if tops else "")
    shown = shown.replace("|", "\\|")
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    more = ", traceback" if "Traceback" in stderr else f", {len(lines)} lines" if len(lines) > 1 else ""
    return f"exit {status}{more}: `{shown}`"


if __name__ == "__main__":
    import argparse
    import tempfile
    p = argparse.ArgumentParser(description="Run every case against a checkout; print markdown table rows.")
    p.add_argument("--root", type=Path, default=REPO, help="the checkout whose tinybooth is run")
    p.add_argument("names", nargs="*", help="only the cases whose name contains one of these")
    args = p.parse_args()
    for case in [c for c in map(plain, CASES) if not args.names or any(n in c[0] for n in args.names)]:
        with tempfile.TemporaryDirectory() as tmp:
            status, stderr, before, after = run_case(case, Path(tmp), root=args.root.resolve())
            cell = describe(status, stderr, Path(tmp) / "work")
        lost = [k for k in before if after.get(k) != before[k]]
        print(f"| {case[0]} | {cell}{' (files changed: ' + str(lost) + ')' if lost else ''} |", flush=True)
