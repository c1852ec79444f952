"""Outputs that are never half-written, and inputs read without unpickling anything.

A file or folder under its final name is always complete: it is written to a temporary sibling, flushed to disk
(fsync), then renamed over the old one (`os.replace`, atomic on one file system). If anything fails on the way
(a full disk, Ctrl-C, a bug) the temporary is removed and the old output is still there, byte for byte. A full
disk is reported as the UserError "no space left on device while writing <path>".

    atomic_write_text(run / "settings.json", text)
    atomic_torch_save(state, run / "checkpoint.pt")
    with atomic_directory(run / "model") as tmp:      # write the whole pipeline into tmp ...
        save_pipeline(tmp)                            # ... and it replaces run/model only if this returns
"""
import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UserError, is_no_space, no_space_error


def _fsync_dir(folder):
    """Make a rename in `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path of `path` to write to; on success it is fsynced and renamed to `path`, on
    any failure removed. ENOSPC becomes the 'no space left' UserError naming `path`. For writers that want a
    file name (safetensors' save_file, PIL's save)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_no_space(e):
            raise no_space_error(path) from e
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data):
    """Write `data` to `path` atomically (see the module docstring); returns path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path, text):
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    """Write `obj` as indented JSON (with a final newline) to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj, path):
    """torch.save(obj) to `path` atomically. torch writes through our file object, so a full disk is a plain
    OSError (ENOSPC) here rather than torch's 'unexpected pos' RuntimeError."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(dst):
    """Yield a temporary sibling folder `dst.tmp-xxxx`; when the block succeeds it replaces `dst`.

    The swap: rename the old dst to a backup `dst.old-xxxx`, rename the new one in, remove the backup. On any
    failure inside the block the temporary folder is removed and dst is untouched; if the swap itself fails, the
    backup is renamed back. A process killed between the two renames leaves the backup: the next save puts it
    back first (`recover_directory`).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(dst)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f"{dst.name}.tmp-"))
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(e):
            raise no_space_error(dst) from e
        raise
    _swap_in(tmp, dst)


def recover_directory(dst):
    """Undo what a killed atomic_directory left next to dst: a backup without dst is renamed back; leftover
    temporaries and backups beside a complete dst are removed."""
    dst = Path(dst)
    backups = sorted(dst.parent.glob(f"{glob.escape(dst.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if backups and not dst.exists():
        os.replace(backups.pop(), dst)
    for leftover in backups + list(dst.parent.glob(f"{glob.escape(dst.name)}.tmp-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _swap_in(new, dst):
    """Replace folder dst by folder new (two renames); dst is restored if the second rename fails."""
    backup = dst.with_name(f"{dst.name}.old-{new.name.rsplit('-', 1)[-1]}") if dst.exists() else None
    if backup is not None:
        os.replace(dst, backup)
    try:
        os.replace(new, dst)
    except BaseException:
        if backup is not None:
            os.replace(backup, dst)
        shutil.rmtree(new, ignore_errors=True)
        raise
    _fsync_dir(dst.parent)
    if backup is not None:
        shutil.rmtree(backup)


def copy_tree(src, dst):
    """Copy the folder src to dst (which must not exist): real copies, never links, so editing an output can
    never edit the package's assets. A full disk is the 'no space left' UserError."""
    try:
        shutil.copytree(src, dst, copy_function=shutil.copy2, symlinks=False)
    except (OSError, shutil.Error) as e:
        if is_no_space(e) or (isinstance(e, shutil.Error) and "No space left" in str(e)):
            raise no_space_error(dst) from e
        raise
    return Path(dst)


def is_inside(path, folder):
    """True when `path` equals `folder` or lies anywhere below it (symlinks and '..' resolved): the check that
    an output directory would not overwrite the input model (or the other way round)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def read_json(path, error=UserError):
    """A JSON file's content; a missing or malformed file raises `error` naming it (and the line)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"'{path}' is missing") from None
    except json.JSONDecodeError as e:
        raise error(f"'{path}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix or restore "
                    f"that file") from None
    except UnicodeDecodeError:
        raise error(f"'{path}' is not a text (JSON) file; restore that file") from None


def load_checkpoint(path):
    """A training checkpoint (tensors, numbers, strings, lists, dicts) read with torch.load(weights_only=True).

    Pickled objects stay refused. Anything that is not such a file raises a UserError naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at '{path}'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for a file it cannot read
        reason = ("it holds pickled Python objects, refused for safety" if is_refused_pickle(e) else
                  "it is empty (0 bytes)" if path.stat().st_size == 0 else
                  "not a file written by torch.save, or one cut short")
        raise UserError(f"'{path}' is not a tinybooth checkpoint ({reason}); delete it to start afresh, or point "
                        f"--output-dir at the run it belongs to") from e


def is_refused_pickle(exc):
    """True when torch.load(weights_only=True) refused a pickled object (rather than failing on broken bytes)."""
    return "Unsupported global" in str(exc)


def one_line_short(exc, limit=120):
    """The first line of an exception's message, cut to `limit` characters."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."
