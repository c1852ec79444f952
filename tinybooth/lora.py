"""DreamBooth-LoRA: fine-tune low-rank adapters on the attention projections instead of every weight.

The paper fine-tunes all layers of the model. On a consumer GPU the common practice today (Hu et al. 2021, "LoRA",
applied to DreamBooth by Ryu 2022) freezes the pretrained weight W [out, in] of each attention projection and learns
a low-rank update beside it:

    h = W x + (alpha / r) * B A x,        A [r, in],  B [out, r],  r << min(in, out)

A starts random (Kaiming-uniform, as peft does) and B starts at ZERO, so at step 0 the model is exactly the
pretrained one and fine-tuning starts from the prior, as full DreamBooth does. Only A and B are trained: for SD-1.5
at r = 4 that is ~0.8 M numbers (~3 MB) instead of 860 M.

What is wrapped (by module name, so it works for every config that keeps the public names):
    U-Net:         to_q, to_k, to_v, to_out.0 (query/key/value/output projections of every attention) and
                   add_k_proj, add_v_proj (IF's added-KV projections of the text tokens)
    text encoder:  T5 q, k, v, o;  CLIP q_proj, k_proj, v_proj, out_proj

Saved adapters load with the public API of diffusers and peft (tests/reference/make_lora_fixtures.py checks it):
    pytorch_lora_weights.safetensors             pipeline.load_lora_weights(dir): IF stage I, IF stage II, SD
        unet.<module path>.lora_A.weight          [r, in]
        unet.<module path>.lora_B.weight          [out, r]
        text_encoder.<module path>.lora_A.weight  ...     (CLIP only: diffusers cannot read T5 adapters)
      safetensors metadata "lora_adapter_metadata": JSON {"unet.r": r, "unet.lora_alpha": alpha,
        "unet.target_modules": [every wrapped module], "unet.rank_pattern": {}, "unet.alpha_pattern": {}, ...}:
        the LoraConfig diffusers builds with peft, one per prefix
    text_encoder/adapter_config.json + adapter_model.safetensors   a peft adapter folder for T5:
        PeftModel.from_pretrained(T5EncoderModel.from_pretrained(...), dir + "/text_encoder")
        keys base_model.model.<module path>.lora_A.weight, ...
`merge_lora` folds B A into W (W <- W + (alpha / r) B A) and puts plain Linear layers back, so the merged model
saves in the public layout and loads with no LoRA code at all.
"""
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_TARGETS = ("q", "k", "v", "o") + CLIP_TARGETS  # T5's projections, then CLIP's
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' pipeline LoRA file (U-Net + CLIP text encoder)
METADATA_KEY = "lora_adapter_metadata"  # its safetensors metadata: JSON of the LoraConfig fields, per prefix
PEFT_CONFIG, PEFT_FILE = "adapter_config.json", "adapter_model.safetensors"  # a peft adapter folder (T5)
PEFT_PREFIX = "base_model.model."  # peft names a tensor of the wrapped model with this in front


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: h = W x + b + (alpha / r) B A x."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        if rank < 1 or rank > min(base.in_features, base.out_features):
            raise UserError(f"LoRA rank {rank} must be between 1 and min(in, out) = "
                             f"{min(base.in_features, base.out_features)} for a {base.in_features}->"
                             f"{base.out_features} layer")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # adapters are kept in fp32 even when the base weights are bf16/fp16: they are what the optimizer updates
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))  # [out, r]: zero -> no change
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the same init nn.Linear (and peft) uses

    # the wrapped layer still answers the questions other code asks a Linear
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def forward(self, x):
        """h = W x + b + (alpha / r) * B (A x)   (x: [..., in] -> h: [..., out])."""
        # BEGIN ASSIGN 8.1
        # HINT: h = base(x) + scale * B (A x); compute A x first (rank r is small), adapters are fp32
        h = self.base(x)
        ax = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # [..., in] -> [..., r]
        update = F.linear(ax, self.lora_B)  # [..., r] -> [..., out]
        return h + (self.scale * update).to(h.dtype)
        # END ASSIGN 8.1

    def merged_linear(self):
        """A plain nn.Linear holding W + (alpha / r) B A (in the base weight's dtype)."""
        # BEGIN ASSIGN 8.2
        # HINT: W_merged = W + (alpha / r) * B @ A   ([out, r] @ [r, in] = [out, in]); compute in fp32
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())  # [out, in]
        merged = (self.base.weight.float() + delta).to(self.base.weight.dtype)
        # END ASSIGN 8.2
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=merged.device, dtype=merged.dtype)
        out.weight.data.copy_(merged)
        if self.bias is not None:
            out.bias.data.copy_(self.bias.data)
        return out.requires_grad_(self.base.weight.requires_grad)


def _is_target(name, targets):
    """'down_blocks.0.attentions.0.to_out.0' matches 'to_out.0'; '...SelfAttention.q' matches 'q'."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_lora(model, rank, alpha=None, targets=UNET_TARGETS):
    """Freeze every weight of model and wrap its target Linear layers with LoRA adapters (in place).

    alpha defaults to rank (scale 1, as diffusers' DreamBooth-LoRA script does). Returns the wrapped module names.
    """
    alpha = float(rank if alpha is None else alpha)
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _is_target(n, targets)]
    if not names:
        raise UserError(f"no Linear layer of {type(model).__name__} is named like {list(targets)}; "
                         f"LoRA needs attention projections with the public names")
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return names


def lora_layers(model):
    """{module name: LoRALinear} of a model wrapped by add_lora."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model, prefix):
    """Adapter tensors in the peft naming: '<prefix><module>.lora_A.weight' / '.lora_B.weight' (fp32, CPU)."""
    state = {}
    for name, m in lora_layers(model).items():
        state[f"{prefix}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        state[f"{prefix}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    return state


def lora_config(model):
    """The fields of peft's LoraConfig that rebuild model's adapters: rank, alpha and the exact wrapped modules."""
    layers = lora_layers(model)
    pairs = {(m.rank, m.alpha) for m in layers.values()}
    assert len(pairs) == 1, f"one rank and alpha per model is saved, found (r, alpha) = {sorted(pairs)}"
    (rank, alpha), = pairs
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(layers), "rank_pattern": {},
            "alpha_pattern": {}}


def diffusers_reads(prefix, model):
    """diffusers' load_lora_weights reads U-Net adapters and CLIP text-encoder adapters; T5's (q, k, v, o) it cannot
    convert, so those go to a peft adapter folder instead."""
    return prefix == "unet" or all(_is_target(n, CLIP_TARGETS) for n in lora_layers(model))


def _save_atomic(write, target):
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)
    return target


def save_lora(path, models):
    """Write the adapters of {"unet": unet, "text_encoder": te, ...} where the public loaders find them.

    path/pytorch_lora_weights.safetensors   U-Net and CLIP text encoder: `pipeline.load_lora_weights(path)`
    path/<name>/adapter_config.json + adapter_model.safetensors   any other model (T5): a peft adapter folder,
        `PeftModel.from_pretrained(T5EncoderModel.from_pretrained(...), path/<name>)`
    Models without adapters are skipped. Returns the files written.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state, meta, written = {}, {}, []
    for prefix, model in models.items():
        if not lora_layers(model):
            continue
        if diffusers_reads(prefix, model):
            state.update(lora_state_dict(model, prefix + "."))
            meta.update({f"{prefix}.{k}": v for k, v in lora_config(model).items()})
        else:
            written += save_peft_adapter(path / prefix, model)
    if state:
        header = {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}
        written.append(_save_atomic(lambda f: save_file(state, str(f), metadata=header), path / LORA_FILE))
    return written


def save_peft_adapter(path, model):
    """A peft adapter folder: adapter_config.json (a LoraConfig) + adapter_model.safetensors (peft's key names)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", **lora_config(model), "bias": "none", "lora_dropout": 0.0,
              "inference_mode": True}
    state = lora_state_dict(model, PEFT_PREFIX)
    return [_save_atomic(lambda f: f.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
                         path / PEFT_CONFIG),
            _save_atomic(lambda f: save_file(state, str(f), metadata={"format": "pt"}), path / PEFT_FILE)]


def read_lora_files(path):
    """{prefix: (LoRA config dict, {module.lora_X.weight: tensor})} of everything save_lora wrote to path."""
    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    found = {}
    if file.is_file():
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
        for prefix in sorted({k.split(".", 1)[0] for k in state}):
            config = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
            found[prefix] = (config, {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
    for config_file in sorted(path.glob(f"*/{PEFT_CONFIG}")) if path.is_dir() else []:
        config = json.loads(config_file.read_text())
        if not (config_file.parent / PEFT_FILE).is_file():
            raise UserError(f"'{config_file}' has no {PEFT_FILE} beside it; save the adapters again")
        with safe_open(str(config_file.parent / PEFT_FILE), framework="pt") as f:
            found[config_file.parent.name] = (config, {k.removeprefix(PEFT_PREFIX): f.get_tensor(k) for k in f.keys()})
    if not found:
        raise UserError(f"no LoRA adapters at '{path}'; train some with `python -m tinybooth.train --lora-rank 4`")
    return found


def load_lora(path, models, targets=None):
    """Read adapters saved by save_lora into {"unet": unet, ...}, wrapping the layers first if needed.

    Strict: every adapter in the files must find its model and layer, and every wrapped layer must get its adapter.
    """
    found = read_lora_files(path)
    unknown = sorted(found.keys() - models.keys())
    if unknown:
        raise UserError(f"'{path}' holds LoRA adapters for {unknown} but only {sorted(models)} were given; "
                         f"pass those models too")
    for prefix, (config, state) in found.items():
        model = models[prefix]
        if not lora_layers(model):
            if "r" not in config:
                raise UserError(f"'{path}' has no LoRA config (rank, alpha) for the {prefix} adapters")
            add_lora(model, int(config["r"]), config["lora_alpha"], targets or config.get("target_modules") or
                     (UNET_TARGETS if prefix == "unet" else TEXT_TARGETS))
        _copy_adapters(model, state, f"LoRA adapters of the {prefix} in '{path}'")
    return models


def _copy_adapters(model, state, name):
    layers = lora_layers(model)
    expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(f"{name} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         f"load them into the model they were trained on")
    for n, m in layers.items():
        for ab in "AB":
            p, t = getattr(m, f"lora_{ab}"), state[f"{n}.lora_{ab}.weight"]
            if p.shape != t.shape:
                raise UserError(f"{name}: {n}.lora_{ab}.weight is {tuple(t.shape)} in the file, "
                                 f"{tuple(p.shape)} in the model")
            p.data.copy_(t)


def save_kohya_lora(file, models):
    """The U-Net and CLIP adapters in the kohya-ss naming that A1111 and ComfyUI read (SD 1.x), one file:

        lora_unet_<module path, '.' -> '_'>.lora_down.weight   A [r, in]
        lora_unet_<...>.lora_up.weight                         B [out, r]
        lora_unet_<...>.alpha                                  alpha (those tools scale by alpha / r)
        lora_te_text_model_encoder_layers_<i>_self_attn_q_proj...   the CLIP text encoder alike
    """
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    state = {}
    for prefix, model in models.items():
        if lora_layers(model) and not diffusers_reads(prefix, model):
            raise UserError(f"the {prefix} adapters (T5) have no kohya form; pass the U-Net and a CLIP text encoder")
        for name, m in lora_layers(model).items():
            key = f"{prefixes[prefix]}_{name.replace('.', '_')}"
            state[f"{key}.lora_down.weight"] = m.lora_A.detach().float().cpu().contiguous()
            state[f"{key}.lora_up.weight"] = m.lora_B.detach().float().cpu().contiguous()
            state[f"{key}.alpha"] = torch.tensor(m.alpha)
    return _save_atomic(lambda f: save_file(state, str(f), metadata={"format": "pt"}), Path(file))


def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back (in place; returns model)."""
    for name, m in lora_layers(model).items():
        _set_module(model, name, m.merged_linear())
    return model
