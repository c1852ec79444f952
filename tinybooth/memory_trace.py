"""The engine of tinybooth.memory: one training step and one sampling step *run* on fake tensors (torch's
FakeTensorMode: shapes and dtypes, no data), while `PeakTracker` adds up the bytes of every live tensor storage,
moment by moment. tinybooth.memory turns these peaks into a prediction per stage of a run."""
import weakref
from contextlib import nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tinybooth import lora, optim
from tinybooth.clip import CLIPTextEncoder
from tinybooth.text import T5Encoder
from tinybooth.unet import UNet
from tinybooth.vae import AutoencoderKL

TEXT_LENGTH = 77
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(kind, config):
    """tinybooth's module for a config, as it is built for loading (weights not read)."""
    if kind == "unet":
        return UNet.from_config(config)
    if kind == "vae":
        return AutoencoderKL.from_config(config)
    return T5Encoder.from_config(config) if "d_model" in config else CLIPTextEncoder.from_config(config)


# ----------------------------------------------------------------------------------------------------------------
# the tracker: bytes of live tensor storages, moment by moment

class PeakTracker(TorchDispatchMode):
    """Every tensor an operation returns is counted once per storage until the storage is freed; `now` is the
    total at this moment and `peak` its maximum. Tensors that existed before (weights) are not counted."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: no new memory (and a view of a weight, such as
        # Linear's weight.t(), must not count the weight as if it were new)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage):
        key = id(storage)
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.now -= self.live.pop(key)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)



# ----------------------------------------------------------------------------------------------------------------
# one training step and one sampling step, run on fake tensors

def settings_dtypes(s):
    """(dtype of trained weights, dtype of frozen and idle weights). Low-precision optimizer states go with bf16
    trained weights (tinybooth.optim rounds them stochastically): no fp32 copy of the weights at all."""
    trained = torch.float32 if s["optimizer_states"] == "fp32" else torch.bfloat16
    return trained, DTYPES[s["frozen_weights"]]


def autocast(s):
    """The autocast tinybooth.train uses (its cache off under checkpointing), on the fake tensors' CPU device."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=s["mixed_precision"] == "bf16",
                          cache_enabled=not s["gradient_checkpointing"])


def cast(module, dtype):
    """module.to(dtype) for fake tensors (whose parameters Module.to cannot swap in place)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.dtype != dtype:
                m._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
    return module


def trainable(module, s, targets):
    """Full fine-tuning (every weight in the trained dtype) or LoRA adapters on a frozen base, as tinybooth.train."""
    trained, frozen = settings_dtypes(s)
    if s["lora_rank"]:
        lora.add_lora(cast(module, frozen), s["lora_rank"], targets=targets)
    else:
        cast(module, trained).requires_grad_(True)
    return module


def optimizer_bytes(params, s):
    """(AdamW's states, its largest temporaries during optimizer.step()) for these trained weights, in bytes.

    states: m and v per weight, 8 bytes in fp32, 4 in bf16, 1 + 1 in 8 bits plus an fp32 absmax per block of 2048
    (each tensor padded to whole blocks). temporaries: torch's AdamW on CUDA defaults to its foreach
    implementation, whose sqrt(v) / bias-correction list is a full fp32 copy of the weights; one tensor at a time
    (torch on a CPU, --optimizer-in-backward) needs ~2 fp32 copies of the largest tensor, tinybooth.optim ~10 (it
    decodes m and v to fp32 and rounds on the way back). tests/test_memory.py measures all three. On a CPU train
    steps with torch's fused kernel (no full-size scratch), so the per-tensor figure is an upper bound there."""
    sizes = [p.numel() for p in params]
    if s["optimizer_states"] == "fp32":
        states = 8 * sum(sizes)
    elif s["optimizer_states"] == "bf16":
        states = 4 * sum(sizes)
    else:
        states = sum(2 * (-(-n // optim.BLOCK) * optim.BLOCK) + 8 * -(-n // optim.BLOCK) for n in sizes)
    if s["optimizer_states"] != "fp32":   # tinybooth.optim: fp32 g, theta, m, v, denominator + rounding buffers
        copies = 10 * max(sizes, default=0)
    elif s["device"] == "cuda" and not s["optimizer_in_backward"]:  # torch's foreach AdamW: one list of sqrt(v)
        copies = sum(sizes)
    else:                                   # torch's per-tensor AdamW: ~2 fp32 copies of the largest tensor
        copies = 2.1 * max(sizes, default=0)
    return states, int(4 * copies)


def free_gradients_in_backward(params):
    """--optimizer-in-backward: each gradient is used and freed as soon as backward has completed it (the
    update's own temporaries are counted by optimizer_bytes)."""
    def free(p):
        p.grad = None
    for p in params:
        p.register_post_accumulate_grad_hook(free)


def unet_inputs(unet, n, size, dtype):
    """Random z_t [n, C_in, size, size], steps [n], text c [n, 77, D], noise level [n] for stage II."""
    cfg = unet.cfg
    text_dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
    level = torch.full((n,), 250) if cfg.class_embed_type == "timestep" else None
    return (torch.randn(n, cfg.in_channels, size, size, dtype=dtype), torch.randint(0, 1000, (n,)),
            torch.randn(n, TEXT_LENGTH, text_dim, dtype=dtype), level)


def simulate_training(unet_config, s, size, n, vae_config=None, fake=True):
    """One fine-tuning step of a U-Net on n images (size: its input's side): forward and backward on fake tensors
    (fake=False: real ones, for tests), the optimizer by optimizer_bytes. SD: the step first encodes the n images
    (side 8 * size) with the frozen VAE, as tinybooth.train does each step.
    Returns {weights, optimizer states, gradients, activations, step peak} in bytes."""
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():
        unet = trainable(UNet.from_config(unet_config), s, lora.UNET_TARGETS)
        if s["gradient_checkpointing"]:
            unet.enable_gradient_checkpointing()
        vae = cast(AutoencoderKL.from_config(vae_config), settings_dtypes(s)[1]) if vae_config else None
        params = [p for p in unet.parameters() if p.requires_grad]
        if s["optimizer_in_backward"]:
            free_gradients_in_backward(params)
        dtype = next(unet.parameters()).dtype
        with PeakTracker() as tracker:
            with autocast(s):
                if vae is not None:
                    with torch.no_grad():
                        vae.encoder(torch.randn(n, 3, 8 * size, 8 * size, dtype=vae.encoder.conv_in.weight.dtype))
                z_t, t, c, level = unet_inputs(unet, n, size, dtype)
                out = unet(z_t, t, c, noise_level=level)
                loss = (out.float() - torch.randn_like(out, dtype=torch.float32)).pow(2).mean()
            activations = tracker.now
            loss.backward()
            gradients = nbytes(p.grad for p in params if p.grad is not None)
    states, temporaries = optimizer_bytes(params, s)
    if s["optimizer_in_backward"]:  # one tensor's update at a time, during backward
        step_peak = tracker.peak + temporaries
    else:                           # optimizer.step(): every gradient + the update's temporaries
        step_peak = max(tracker.peak, gradients + temporaries)
    return {"weights": nbytes(unet.parameters()) + (nbytes(vae.parameters()) if vae else 0),
            "optimizer states": states, "gradients": gradients, "activations": activations, "step peak": step_peak}


def simulate_forward(kind, config, n, size, dtype_name, mixed_precision):
    """Peak bytes beyond the weights of one no-gradient forward on fake tensors: a U-Net ("unet") on n inputs of
    side `size`, the VAE ("decoder") decoding n latents of side `size`, or a text encoder ("text") on n prompts."""
    s = {"mixed_precision": mixed_precision, "gradient_checkpointing": False}
    dtype = DTYPES[dtype_name]
    with FakeTensorMode(allow_non_fake_inputs=True):
        module = cast(build("vae" if kind == "decoder" else kind, config), dtype)
        with torch.no_grad(), PeakTracker() as tracker, autocast(s):
            if kind == "unet":
                z_t, t, c, level = unet_inputs(module, n, size, dtype)
                module(z_t, t, c, noise_level=level)
            elif kind == "decoder":
                module.decode(torch.randn(n, module.cfg.latent_channels, size, size, dtype=dtype))
            else:
                module(torch.randint(0, 100, (n, TEXT_LENGTH)), torch.ones(n, TEXT_LENGTH, dtype=torch.long))
    return tracker.peak


