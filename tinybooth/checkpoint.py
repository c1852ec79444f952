"""Reading and writing checkpoints in the public Hugging Face directory layout.

Every network in tinybooth (T5, CLIP, U-Net, VAE, ViT) is stored the way its public release is:

    some_model/
        config.json
        model.safetensors                               (transformers, one file)
        model-00001-of-00002.safetensors + model.safetensors.index.json       (sharded)
        model.fp16-00001-of-00002.safetensors + model.safetensors.index.fp16.json  (fp16 variant)
        diffusion_pytorch_model[.fp16].safetensors      (diffusers)
        pytorch_model.bin                               (old releases; read with weights_only=True)

This module finds the right files, reads them tensor by tensor, and copies them into a module *strictly*:
every missing, unexpected or wrongly-shaped tensor is named in the error. Nothing here knows about any
particular network; each network keeps its public key names so no renaming is needed.
"""
import importlib.util
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_path, atomic_write_text, is_refused_pickle, one_line_short
from .files import read_json as read_json_file
from .errors import UserError

DOWNLOAD_HINT = "python weights_download.py --list  (shows which download command fetches it)"
DOWNLOADER = Path(__file__).resolve().parent.parent / "weights_download.py"  # beside the package in the repository


class CheckpointError(UserError):
    """A model directory is missing, incomplete, or does not match the network built from its config."""


def known_models():
    """The model names weights_download.py can fetch (empty when the package runs without the repository)."""
    if not DOWNLOADER.is_file():
        return set()
    spec = importlib.util.spec_from_file_location("weights_download", DOWNLOADER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return set(module.MODELS)


def download_hint(path):
    """The download command for path when it (or a folder above it) is named after a model weights_download.py
    knows; '' otherwise: a local folder of the user's own needs no download advice."""
    path = Path(path)
    names = known_models()
    for d in [path, *path.parents]:
        if d.name in names:
            return f"download it with:  python weights_download.py {d.name} --dir {d.parent}"
    return ""


def _with_hint(message, path):
    """message, followed by the download command when path is a known model."""
    hint = download_hint(path)
    return f"{message}; {hint}" if hint else message


def read_json(path):
    """A JSON file of a model directory as a dict; a missing or malformed file is a CheckpointError naming it."""
    if not Path(path).exists():
        raise CheckpointError(_with_hint(f"'{path}' is missing", path))
    return read_json_file(path, error=CheckpointError)


def read_config(path):
    """The config.json of a model directory (or the file itself) as a dict."""
    path = Path(path)
    cfg_file = path if path.is_file() else path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(_with_hint(f"no config.json in '{path}'", path))
    return read_json(cfg_file)


def find_weight_files(path, stem, variant=None):
    """The safetensors (or .bin) files holding a model's weights, in the public naming scheme.

    stem is "model" (transformers) or "diffusion_pytorch_model" (diffusers); variant is None, "fp16", "bf16"...
    """
    path = Path(path)
    v = f".{variant}" if variant else ""
    single = path / f"{stem}{v}.safetensors"
    if single.exists():
        return [single]
    index = path / (f"{stem}.safetensors.index{v}.json")
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"'{index}' has no \"weight_map\" (tensor name -> shard file); restore that file")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(_with_hint(f"'{index}' lists shards that are not on disk: {', '.join(missing)} "
                                             f"(an incomplete download?)", path))
        return [path / s for s in shards]
    legacy = path / f"pytorch_model{v}.bin"
    if legacy.exists():
        return [legacy]
    if variant:
        raise CheckpointError(f"no '{variant}' variant of {stem} weights in '{path}' "
                              f"(looked for {single.name} and {index.name}); try variant=None")
    raise CheckpointError(_with_hint(f"no weights in '{path}' (looked for {single.name}, {index.name} and "
                                     f"pytorch_model.bin)", path))


def read_weight_file(file):
    """The tensors of one .safetensors or .bin file; a truncated, corrupt or pickled file is named."""
    file = Path(file)
    try:
        if file.suffix == ".bin":
            # never unpickle arbitrary objects: weights_only=True refuses anything but tensors
            return torch.load(file, map_location="cpu", weights_only=True)
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except PermissionError:
        raise CheckpointError(f"weights file '{file}' cannot be read (permission denied); make it readable") from None
    except MemoryError:
        raise
    except Exception as e:  # SafetensorError, UnpicklingError, RuntimeError, EOFError...: the file is not whole
        if is_refused_pickle(e):
            raise CheckpointError(f"weights file '{file}' holds pickled Python objects, which tinybooth refuses to "
                                  f"load (they can run code); use a .safetensors file") from e
        reason = "not a file written by torch.save" if file.suffix == ".bin" else one_line_short(e)  # safetensors
        raise CheckpointError(_with_hint(f"weights file '{file}' is truncated or corrupt ({reason}); download it "
                                         f"again", file)) from e


def read_state_dict(files, dtype=None, device="cpu"):
    """Read tensors from safetensors / .bin files; floating tensors are cast to dtype when given."""
    state = {}
    for file in files:
        for key, t in read_weight_file(file).items():
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[key] = t.to(device)
    return state


def _listed(label, items):
    """'missing (3): a, b, c' with at most 20 items."""
    return f"{label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")


def check_state_dict(module, state, name="model"):
    """Raise CheckpointError naming every missing, unexpected and wrongly-shaped tensor (on one line)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [_listed("missing", missing)] if missing else []
        parts += [_listed("unexpected", unexpected)] if unexpected else []
        parts += [_listed("wrong shape", wrong)] if wrong else []
        raise CheckpointError(f"the weights do not match the {name} built from its config.json: "
                              + "; ".join(parts) + "; re-download the weights, or restore the config.json they "
                              "were saved with")


def load_into(module, state, name="model"):
    """Strictly copy a state dict into module (works for modules built on the meta device too)."""
    check_state_dict(module, state, name)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def load_pretrained(cls, path, stem, dtype=None, device=None, variant=None, convert=None):
    """The usual from_pretrained: config.json -> cls.from_config on the meta device -> strict weight copy.

    convert: optional function (state, name) -> state applying a network's small table of legacy key names
    (renames, dropped buffers) before the strict check; None keeps the file's keys as they are.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory '{path}' does not exist; "
                              f"{download_hint(path) or 'check the path (' + DOWNLOAD_HINT + ')'}")
    config = read_config(path)
    files = find_weight_files(path, stem, variant)
    state = read_state_dict(files, dtype=dtype, device=device or "cpu")
    name = f"{cls.__name__} in '{path}' ({', '.join(f.name for f in files)})"
    if convert is not None:
        state = convert(state, name)
    with torch.device("meta"):
        try:
            model = cls.from_config(config)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as e:  # a config this network cannot be built from
            raise CheckpointError(f"'{path / 'config.json'}' does not describe a {cls.__name__} tinybooth can "
                                  f"build ({type(e).__name__}: {one_line_short(e, 300)}); restore that "
                                  f"file") from e
    load_into(model, state, name=name)
    return model.eval()


def save_pretrained(module, path, config, stem, variant=None):
    """Write config.json + one safetensors file, each atomically (a temporary sibling, then a rename)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    v = f".{variant}" if variant else ""
    state = {k: t.detach().contiguous().cpu() for k, t in module.state_dict().items()}
    target = path / f"{stem}{v}.safetensors"
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(path / "config.json", json.dumps(config, indent=2, sort_keys=True))
    return target
