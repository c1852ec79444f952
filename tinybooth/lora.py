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

Saved adapters use the diffusers/peft naming, so the file loads with diffusers' `load_lora_weights` too:
    pytorch_lora_weights.safetensors
        unet.<module path>.lora_A.weight          [r, in]
        unet.<module path>.lora_B.weight          [out, r]
        text_encoder.<module path>.lora_A.weight  ...
    safetensors metadata "lora_adapter_metadata": JSON {"unet.r": r, "unet.lora_alpha": alpha,
        "unet.target_modules": [...]} (the fields of peft's LoraConfig that matter here).
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

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_TARGETS = ("q", "k", "v", "o", "q_proj", "k_proj", "v_proj", "out_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: h = W x + b + (alpha / r) B A x."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        if rank < 1 or rank > min(base.in_features, base.out_features):
            raise ValueError(f"LoRA rank {rank} must be between 1 and min(in, out) = "
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
        raise ValueError(f"no Linear layer of {type(model).__name__} is named like {list(targets)}; "
                         f"LoRA needs attention projections with the public names")
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return names


def lora_layers(model):
    """{module name: LoRALinear} of a model wrapped by add_lora."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model, prefix):
    """Adapter tensors in the diffusers/peft naming: '<prefix>.<module>.lora_A.weight' / '.lora_B.weight'."""
    state = {}
    for name, m in lora_layers(model).items():
        state[f"{prefix}.{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        state[f"{prefix}.{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    return state


def save_lora(path, models):
    """Write the adapters of {"unet": unet, "text_encoder": te, ...} to path/pytorch_lora_weights.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state, meta = {}, {}
    for prefix, model in models.items():
        layers = lora_layers(model)
        if not layers:
            continue
        first = next(iter(layers.values()))
        state.update(lora_state_dict(model, prefix))
        kinds = {t for n in layers for t in UNET_TARGETS + TEXT_TARGETS if _is_target(n, (t,))}
        meta.update({f"{prefix}.r": first.rank, f"{prefix}.lora_alpha": first.alpha,
                     f"{prefix}.target_modules": sorted(kinds)})
    target = path / LORA_FILE
    tmp = target.with_name(target.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, target)
    return target


def load_lora(path, models, targets=None):
    """Read adapters saved by save_lora into {"unet": unet, ...}, wrapping the layers first if needed.

    Strict: every adapter in the file must find its layer, and every wrapped layer must get its adapter.
    """
    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.exists():
        raise ValueError(f"no LoRA adapters at '{file}'; train some with `python -m tinybooth.train --lora-rank 4`")
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    for prefix, model in models.items():
        mine = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if not mine:
            continue
        if not lora_layers(model):
            if f"{prefix}.r" not in meta:
                raise ValueError(f"'{file}' has no '{METADATA_KEY}' metadata giving the rank of the {prefix} adapters")
            add_lora(model, int(meta[f"{prefix}.r"]), meta[f"{prefix}.lora_alpha"],
                     targets or (UNET_TARGETS if prefix == "unet" else TEXT_TARGETS))
        layers = lora_layers(model)
        expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
        missing, unexpected = sorted(expected - mine.keys()), sorted(mine.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"LoRA file '{file}' does not match the {prefix}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for n, m in layers.items():
            for ab in "AB":
                p, t = getattr(m, f"lora_{ab}"), mine[f"{n}.lora_{ab}.weight"]
                if p.shape != t.shape:
                    raise ValueError(f"LoRA tensor {prefix}.{n}.lora_{ab}.weight: file {tuple(t.shape)} vs "
                                     f"model {tuple(p.shape)}")
                p.data.copy_(t)
    return models


def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back (in place; returns model)."""
    for name, m in lora_layers(model).items():
        _set_module(model, name, m.merged_linear())
    return model
