"""Atomic outputs (tinybooth.files) and the one-line errors of commands (tinybooth.errors).

A full disk is simulated by making os.write (or torch's writer) raise OSError(ENOSPC) partway; a failure in the
middle of writing a folder by raising inside atomic_directory. Each test checks the old output is byte-identical
afterwards and that no temporary file is left."""
import errno
import os
import warnings

import pytest
import torch

from tinybooth import files
from tinybooth.errors import ArgumentParser, UserError, main_guard


def listing(folder):
    """{name: bytes} of every file below folder (relative names)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def full_disk(monkeypatch):
    """os.write fails with ENOSPC after the first 16 bytes, as a disk that fills up mid-file does."""
    real_write, written = os.write, [0]

    def write(fd, data):
        if written[0] >= 16:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "settings.json"
    target.write_text("old")
    files.atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"], "the temporary sibling must be renamed away"


def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "settings.json"
    target.write_text("old settings")
    # Python's buffered file writes go through the io module, not os.write: fail the flush instead
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(UserError, match=r"no space left on device while writing '.*settings\.json'; free space "
                                        r"and rerun \(earlier outputs are intact\)"):
        files.atomic_write_text(target, "new settings " * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_text() == "old settings", "a failed write must leave the previous file as it was"
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"], "the temporary file must be removed"


def test_torch_save_on_a_full_disk_names_the_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    files.atomic_torch_save({"step": torch.tensor(1)}, target)
    old = target.read_bytes()

    def no_space(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match=r"while writing '.*checkpoint\.pt'"):
        files.atomic_torch_save({"step": torch.tensor(2)}, target)
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_load_checkpoint_round_trip_and_refusals(tmp_path):
    path = files.atomic_torch_save({"step": 3, "w": torch.ones(2)}, tmp_path / "checkpoint.pt")
    assert files.load_checkpoint(path)["step"] == 3
    path.write_bytes(os.urandom(300))
    with pytest.raises(UserError, match=r"checkpoint\.pt' is not a tinybooth checkpoint \(not a file written by "):
        files.load_checkpoint(path)
    torch.save({"x": object()}, path)
    with pytest.raises(UserError, match="pickled Python objects, refused"):
        files.load_checkpoint(path)
    with pytest.raises(UserError, match="no checkpoint at"):
        files.load_checkpoint(tmp_path / "missing.pt")


def test_atomic_directory_swaps_in_the_new_folder(tmp_path):
    dst = tmp_path / "model"
    (dst / "unet").mkdir(parents=True)
    (dst / "unet" / "old.bin").write_bytes(b"old")
    with files.atomic_directory(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("model.tmp-")
        (tmp / "new.bin").write_bytes(b"new")
    assert listing(dst) == {"new.bin": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "no temporary or backup folder may be left"


def test_failure_mid_directory_keeps_the_old_folder(tmp_path):
    dst = tmp_path / "model"
    (dst / "unet").mkdir(parents=True)
    (dst / "unet" / "weights.safetensors").write_bytes(b"old weights")
    before = listing(dst)
    with pytest.raises(RuntimeError, match="halfway"):
        with files.atomic_directory(dst) as tmp:
            (tmp / "unet").mkdir()
            (tmp / "unet" / "weights.safetensors").write_bytes(b"half")
            raise RuntimeError("crashed halfway through the save")
    assert listing(dst) == before, "the old folder must be intact after a failed save"
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "the temporary folder must be removed"


def test_a_save_killed_between_the_renames_is_recovered_by_the_next(tmp_path):
    dst = tmp_path / "model"
    (tmp_path / "model.old-abc").mkdir()  # kill -9 after 'rename old dst to the backup', before 'rename new in'
    (tmp_path / "model.old-abc" / "weights.bin").write_bytes(b"old")
    (tmp_path / "model.tmp-abc").mkdir()
    files.recover_directory(dst)
    assert listing(dst) == {"weights.bin": b"old"}, "the backup must become the folder again"
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "the half-written temporary must go"


def test_full_disk_mid_directory_names_the_folder(tmp_path, full_disk):
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "config.json").write_bytes(b"{}")
    with pytest.raises(UserError, match=r"no space left on device while writing '.*model'"):
        with files.atomic_directory(dst) as tmp:
            fd = os.open(tmp / "weights.bin", os.O_WRONLY | os.O_CREAT)
            try:
                for _ in range(10):
                    os.write(fd, b"x" * 8)
            finally:
                os.close(fd)
    assert listing(dst) == {"config.json": b"{}"} and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_copy_tree_copies_instead_of_linking(tmp_path):
    src = tmp_path / "assets"
    src.mkdir()
    (src / "TRAINING.md").write_text("package file")
    dst = files.copy_tree(src, tmp_path / "run" / "model")
    (dst / "TRAINING.md").write_text("edited in the run")
    assert (src / "TRAINING.md").read_text() == "package file", "editing an output must never edit the package"
    assert os.stat(src / "TRAINING.md").st_nlink == 1


def test_is_inside(tmp_path):
    run = tmp_path / "run"
    assert files.is_inside(run / "model", run) and files.is_inside(run, run)
    assert files.is_inside(tmp_path / "x" / ".." / "run" / "model", run)
    assert not files.is_inside(tmp_path / "run2", run) and not files.is_inside(tmp_path, run)


def test_read_json_names_the_file_and_line(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{\n  "a": 1,\n}')
    with pytest.raises(UserError, match=r"config\.json' is not valid JSON \(line 3"):
        files.read_json(f)


# ----------------------------------------------------------------------------------------------------------------
# main_guard

def failing(exc):
    def main(argv):
        raise exc
    return main


def test_user_error_is_one_line_and_exit_status_2(capsys):
    assert main_guard(failing(UserError("bad '--flag'\nsecond line")), []) == 2
    assert capsys.readouterr().err == "error: bad '--flag'; second line\n"


def test_debug_flag_or_variable_shows_the_traceback(monkeypatch):
    with pytest.raises(UserError):
        main_guard(failing(UserError("x")), ["--debug"])
    monkeypatch.setenv("TINYBOOTH_DEBUG", "1")
    with pytest.raises(UserError):
        main_guard(failing(UserError("x")), [])


def test_debug_flag_is_not_passed_on(monkeypatch):
    monkeypatch.setenv("TINYBOOTH_DEBUG", "0")
    assert main_guard(lambda argv: len(argv), ["--debug", "a"]) == 1


def test_our_own_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        main_guard(failing(ZeroDivisionError("a bug of ours")), [])
    with pytest.raises(RuntimeError):
        main_guard(failing(RuntimeError("a bug of ours")), [])


def test_ctrl_c_is_one_line_and_status_130(capsys):
    assert main_guard(failing(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"


def test_warnings_read_as_one_line_inside_a_command(capsys):
    def main(argv):
        warnings.warn("skipping broken link 'dog/03.jpg'", stacklevel=1)
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main_guard(main, []) == 0
    assert capsys.readouterr().err == "warning: skipping broken link 'dog/03.jpg'\n"


def test_a_bad_command_line_is_one_error_line(capsys):
    def main(argv):
        p = ArgumentParser(prog="python -m tinybooth.sample")
        p.add_argument("--steps", type=int, required=True)
        return p.parse_args(argv).steps
    assert main_guard(main, ["--steps", "two"]) == 2
    assert capsys.readouterr().err == ("error: argument --steps: invalid int value: 'two' "
                                       "(see python -m tinybooth.sample --help)\n")
    assert main_guard(main, []) == 2 and "required: --steps" in capsys.readouterr().err
