"""tinybooth.memory's predictions against measured peaks, and the table of predicted peaks for the public models.

    python benchmarks/memory_model.py validate --config toy if-mid sd-mid IF-I-M     # CPU: predicted vs measured
    python benchmarks/memory_model.py table                                          # predictions, GPU settings

validate: each (configuration, setting) runs two real fine-tuning steps of the U-Net in a fresh process (random
weights built directly in their dtype, random inputs, batch 1 subject + 1 class image, the step tinybooth.memory
simulates: autocast, checkpointing, LoRA, AdamW / tinybooth.optim / optimizer-in-backward) and reports its resident
peak (ru_maxrss) minus that of the same setting on a "micro" U-Net of ~0.1 M weights (the interpreter, torch and
the CPU kernels' code and scratch: ~0.35 GiB that no model of tensors can see). glibc is told to
serve every allocation above 64 kB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at
once and ru_maxrss follows the live bytes; the rest of the gap is the autograd graph's own objects and the
allocator's page rounding. The prediction is memory_trace.simulate_training's weights + optimizer states + step peak for
the same setting on device "cpu" (per-tensor AdamW).

table: memory_trace.simulate_training at each public model's native resolution with device "cuda" (torch's foreach AdamW,
the figure torch.cuda.max_memory_allocated would report), bf16 autocast, frozen weights in bf16; a card needs the
peak plus 0.5 GB of CUDA context (memory.CUDA_CONTEXT). Predicted only unless a row says otherwise.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinybooth import lora, memory, memory_trace, optim  # noqa: E402
from tinybooth.unet import UNet  # noqa: E402

TOY = json.loads((memory.PUBLIC_DIR.parent / "toy-IF-I" / "unet" / "config.json").read_text())
SMALL = {  # the IF-I and SD layouts at a fraction of the width (as benchmarks/train_memory.py), and the toy
    "micro": (dict(TOY, block_out_channels=[32, 32, 32], attention_head_dim=8, cross_attention_dim=32,
                   encoder_hid_dim=32, addition_embed_type_num_heads=2), 8),  # the baseline: ~0.1 M weights
    "toy": (TOY, 32),
    "if-mid": (dict(memory.model_configs("IF-I-M")["unet"], block_out_channels=[64, 128, 192, 256],
                    layers_per_block=2, cross_attention_dim=256, encoder_hid_dim=512, attention_head_dim=32,
                    addition_embed_type_num_heads=8, sample_size=32), 32),
    "sd-mid": (dict(memory.model_configs("SD-1.5")["unet"], block_out_channels=[64, 128, 256, 256],
                    sample_size=32), 32),
}
BASE = dict(lora_rank=0, mixed_precision="no", gradient_checkpointing=False, optimizer_in_backward=False,
            optimizer_states="fp32", frozen_weights="fp32")
SETTINGS = {
    "full-fp32": BASE,
    "full-bf16-ckpt": dict(BASE, mixed_precision="bf16", gradient_checkpointing=True),
    "full-fused": dict(BASE, mixed_precision="bf16", gradient_checkpointing=True, optimizer_in_backward=True),
    "8bit-fused": dict(BASE, mixed_precision="bf16", gradient_checkpointing=True, optimizer_in_backward=True,
                       optimizer_states="8bit", frozen_weights="bf16"),
    "lora-ckpt": dict(BASE, mixed_precision="bf16", gradient_checkpointing=True, lora_rank=4, frozen_weights="bf16"),
}
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2")


def config_of(name):
    return SMALL[name] if name in SMALL else (memory.model_configs(name)["unet"],
                                              memory.model_configs(name)["unet"]["sample_size"])


def build_real(config, s):
    """The U-Net of setting s with random weights, built on the meta device and materialised in its final dtypes
    (no fp32 copy first, so the build itself is not the peak)."""
    with torch.device("meta"):
        unet = memory_trace.trainable(UNet.from_config(config), s, lora.UNET_TARGETS)
    unet = unet.to_empty(device="cpu")
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    if s["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    return unet


def optimizers_for(params, s):
    def adamw(ps):
        if s["optimizer_states"] == "fp32":
            return torch.optim.AdamW(ps, lr=1e-5, weight_decay=1e-2)
        return optim.AdamW(ps, lr=1e-5, weight_decay=1e-2, states=s["optimizer_states"])
    if not s["optimizer_in_backward"]:
        return [adamw(params)]
    opts = [adamw([p]) for p in params]

    def hook(o):
        def step(p):
            o.step()
            p.grad = None
        return step
    for p, o in zip(params, opts):
        p.register_post_accumulate_grad_hook(hook(o))
    return opts


def child(name, setting):
    """Two real steps; the process's peak resident bytes."""
    config, size = config_of(name)
    s = dict(SETTINGS[setting], device="cpu")
    unet = build_real(config, s)
    params = [p for p in unet.parameters() if p.requires_grad]
    opts = optimizers_for(params, s)
    dtype = next(unet.parameters()).dtype
    for _ in range(2):
        with memory_trace.autocast(s):
            z_t, t, c, level = memory_trace.unet_inputs(unet, 2, size, dtype)
            out = unet(z_t, t, c, noise_level=level)
            loss = (out.float() - torch.randn_like(out, dtype=torch.float32)).pow(2).mean()
        loss.backward()
        if not s["optimizer_in_backward"]:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opts[0].step()
            opts[0].zero_grad(set_to_none=True)
        del z_t, c, out, loss
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(name, setting):
    proc = subprocess.run([sys.executable, __file__, "child", name, setting], capture_output=True, text=True,
                          env=ENV)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return int(proc.stdout.strip().splitlines()[-1])


def predicted(name, setting, device):
    config, size = config_of(name)
    r = memory_trace.simulate_training(config, dict(SETTINGS[setting], device=device), size, 2)
    return r["weights"] + r["optimizer states"] + r["step peak"]


def row(name, setting, pred, meas, note=""):
    print(f"{name:8s} {setting:15s} {pred / GiB:10.3f} {meas / GiB:10.3f} {(pred - meas) / meas:+7.1%}   {note}",
          flush=True)


def repredict(triples):
    """Rows whose measurement was taken by an earlier `validate` run ("config:setting:measured GiB"), predicted
    again (after a fix to the predictor)."""
    for triple in triples:
        name, setting, meas = triple.split(":")
        pred = predicted(name, setting, "cpu") - predicted("micro", setting, "cpu")
        row(name, setting, pred, float(meas) * GiB, "(measured by an earlier validate run)")


def validate(names, settings):
    """Each row: measured = peak - the same setting's peak on the "micro" U-Net (so the interpreter, torch and the
    kernels' own code and scratch, ~0.35 GiB here, cancel); predicted = the same difference of predictions."""
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'config':8s} {'setting':15s} {'predicted':>10s} {'measured':>10s} {'error':>7s}   (GiB, batch 1+1)")
    for name in names:
        for setting in settings:
            t0 = time.time()
            try:
                meas = measure(name, setting) - measure("micro", setting)
            except RuntimeError as e:
                print(f"{name:8s} {setting:15s} failed: {e}")
                continue
            pred = predicted(name, setting, "cpu") - predicted("micro", setting, "cpu")
            row(name, setting, pred, meas, f"({time.time() - t0:.0f} s)")


GiB = memory.GiB
TABLE_MODELS = ("IF-I-M", "IF-I-L", "IF-I-XL", "IF-II-M", "IF-II-L", "SD-1.5")


def table_row(name, tune, states, ckpt, in_backward=False):
    c = memory.model_configs(name)
    s = dict(BASE, mixed_precision="bf16", frozen_weights="bf16", device="cuda", gradient_checkpointing=ckpt,
             optimizer_states=states, lora_rank=4 if tune == "LoRA" else 0, optimizer_in_backward=in_backward)
    n = 1 if c["family"] == "if-sr" else 2  # stage II fine-tunes on subject images only
    r = memory.cached(memory_trace.simulate_training, c["unet"], s, c["unet"]["sample_size"], n, c.get("vae"))
    total = r["weights"] + r["optimizer states"] + r["step peak"]
    cards = memory.cards_for(total + memory.CUDA_CONTEXT)
    label = (states + (" + in backward" if in_backward else "")) if tune == "full" else "fp32 (adapters)"
    print(f"| {name} | {tune} | {label} | {'on' if ckpt else 'off'} | {total / memory.GB:.1f} | "
          f"{', '.join(map(str, cards)) or 'none'} |", flush=True)


def table(floor=False):
    print("| model | fine-tune | optimizer states | checkpointing | predicted peak (GB) | fits (8/12/16/24 GB) |")
    print("|---|---|---|---|---|---|")
    for name in TABLE_MODELS:
        if floor:  # the lowest full fine-tune: 8-bit states, bf16 weights, optimizer in backward, checkpointing
            table_row(name, "full", "8bit", True, in_backward=True)
            continue
        for tune, states in (("full", "fp32"), ("full", "8bit"), ("LoRA", "fp32")):
            for ckpt in (False, True):
                table_row(name, tune, states, ckpt)


# GPU peaks (torch.cuda.max_memory_allocated, GiB) recorded earlier in benchmarks/README.md, as (model, setting,
# U-Net batch, measured, machine). unet_step.py: batch 4 at 64 x 64, bf16 autocast, fp32 AdamW, no clipping;
# train_memory.py: 1 + 1 images through train.Stage (clipping), its "lora" built in fp32 first and then cast.
RECORDED = [
    ("IF-I-M", "full-bf16", 4, 7.14, "H100, unet_step.py, 2026-11-23"),
    ("IF-I-M", "full-bf16-ckpt", 4, 7.13, "H100, unet_step.py, 2026-11-23 (checkpointing then also recomputed IF's "
                                          "attention)"),
    ("SD-1.5", "full-bf16", 4, 16.19, "H100, unet_step.py, 2026-11-23"),
    ("SD-1.5", "full-bf16-ckpt", 2, 16.19, "H200, train_memory.py full-bf16, 2026-12-04"),
    ("SD-1.5", "full-fused", 2, 10.15, "H200, train_memory.py full-fused, 2026-12-04"),
    ("SD-1.5", "lora-ckpt", 2, 3.22, "H200, train_memory.py lora, 2026-12-04"),
]
SETTINGS["full-bf16"] = dict(BASE, mixed_precision="bf16")


def recorded():
    """Predictions (device "cuda") for the GPU runs already recorded in benchmarks/README.md."""
    print(f"{'model':7s} {'setting':15s} {'batch':>5s} {'predicted':>10s} {'measured':>9s} {'error':>7s}  machine")
    for name, setting, n, meas, machine in RECORDED:
        config = memory.model_configs(name)["unet"]
        s = dict(SETTINGS[setting], device="cuda")
        r = memory_trace.simulate_training(config, s, 64, n)
        pred = r["weights"] + r["optimizer states"] + r["step peak"]
        if s["lora_rank"]:  # train_memory.py builds the U-Net in fp32 before casting its frozen weights to bf16
            pred = max(pred, 4 * memory.count_params("unet", config))
        print(f"{name:7s} {setting:15s} {n:5d} {pred / GiB:10.2f} {meas:9.2f} {(pred / GiB - meas) / meas:+7.1%}  "
              f"{machine}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["validate", "repredict", "table", "floor", "recorded", "child"])
    p.add_argument("args", nargs="*")
    p.add_argument("--config", nargs="+", default=["toy", "if-mid", "sd-mid"])
    p.add_argument("--setting", nargs="+", default=list(SETTINGS))
    a = p.parse_args()
    if a.mode == "child":
        print(child(*a.args))
    elif a.mode == "validate":
        validate(a.config, a.setting)
    elif a.mode == "repredict":
        repredict(a.args)
    elif a.mode == "recorded":
        recorded()
    else:
        table(floor=a.mode == "floor")


if __name__ == "__main__":
    main()
