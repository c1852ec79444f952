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
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DOWNLOAD_HINT = "python weights_download.py --list  (shows which download command fetches it)"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, or does not match the network built from its config."""


def read_config(path):
    """The config.json of a model directory (or the file itself) as a dict."""
    path = Path(path)
    cfg_file = path if path.is_file() else path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"no config.json in '{path}'. Download the weights first: {DOWNLOAD_HINT}")
    with open(cfg_file) as f:
        return json.load(f)


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
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(
                f"'{index}' lists shards that are not on disk: {missing}. The download was incomplete; "
                f"run it again: {DOWNLOAD_HINT}")
        return [path / s for s in shards]
    legacy = path / f"pytorch_model{v}.bin"
    if legacy.exists():
        return [legacy]
    if variant:
        raise CheckpointError(f"no '{variant}' variant of {stem} weights in '{path}' "
                              f"(looked for {single.name} and {index.name}); try variant=None")
    raise CheckpointError(f"no weights in '{path}' (looked for {single.name}, {index.name} and pytorch_model.bin). "
                          f"Download them first: {DOWNLOAD_HINT}")


def read_state_dict(files, dtype=None, device="cpu"):
    """Read tensors from safetensors / .bin files; floating tensors are cast to dtype when given."""
    state = {}
    for file in files:
        if str(file).endswith(".bin"):
            # never unpickle arbitrary objects: weights_only=True refuses anything but tensors
            part = torch.load(file, map_location="cpu", weights_only=True)
        else:
            part = {}
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    part[key] = f.get_tensor(key)
        for key, t in part.items():
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[key] = t.to(device)
    return state


def check_state_dict(module, state, name="model"):
    """Raise CheckpointError naming every missing, unexpected and wrongly-shaped tensor."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        lines = [f"checkpoint does not match the {name} built from its config.json:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20])
                         + (" ..." if len(unexpected) > 20 else ""))
        if wrong:
            lines.append(f"  wrong shape ({len(wrong)}): " + "; ".join(wrong[:20]) + (" ..." if len(wrong) > 20 else ""))
        raise CheckpointError("\n".join(lines))


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
        raise CheckpointError(f"model directory '{path}' does not exist. Download the weights first: {DOWNLOAD_HINT}")
    config = read_config(path)
    files = find_weight_files(path, stem, variant)
    state = read_state_dict(files, dtype=dtype, device=device or "cpu")
    name = f"{cls.__name__} in '{path}'"
    if convert is not None:
        state = convert(state, name)
    with torch.device("meta"):
        model = cls.from_config(config)
    load_into(model, state, name=name)
    return model.eval()


def save_pretrained(module, path, config, stem, variant=None):
    """Write config.json + one safetensors file, atomically (write to a temporary name, then rename)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    v = f".{variant}" if variant else ""
    state = {k: t.detach().contiguous().cpu() for k, t in module.state_dict().items()}
    target = path / f"{stem}{v}.safetensors"
    tmp = target.with_name(target.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)
    tmp_cfg = path / "config.json.tmp"
    with open(tmp_cfg, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp_cfg, path / "config.json")
    return target
