"""How much memory each stage of a DreamBooth run needs, predicted before anything big is loaded.

A run (tinybooth.train) goes through five stages; at each, these live on the device:

    text         the U-Nets (loaded first) + the text encoder, encoding the prompts once (no gradients)
    class        the U-Nets (+ VAE) drawing --num-class-images samples, class_batch_size at a time; classifier-free
                 guidance doubles the batch the U-Net sees
    base         fine-tuning the base U-Net on eq. (2): B subject + B class images per step
    sr           fine-tuning the super-resolution U-Net on B subject images (IF only)
    sample       the U-Nets drawing the result grid

A training stage's peak is

    peak = W + S + max over the step of (activations + gradients + temporaries)

    W  weights: every parameter x its dtype's bytes (the trained model, the idle other U-Net, VAE, text encoder)
    S  optimizer states: AdamW's m and v, 8 bytes per trained weight in fp32, 4 in bf16, ~2 in 8 bits
       (tinybooth.optim)
    activations: what autograd saves for backward, at most at the end of the forward pass; gradient
       checkpointing keeps only each recomputed block's inputs and recomputes the rest during backward
    gradients: one per trained weight, in its dtype, all alive when optimizer.step() runs (none at once with
       --optimizer-in-backward, which steps and frees each as soon as it is complete)
    temporaries ("workspace"): the optimizer's scratch (torch's foreach AdamW on CUDA builds a full-size copy),
       a layer's transient buffers in forward and backward.

Nothing here is a hand-fitted formula. The parameter counts come from building tinybooth's own modules from the
public config.json, and the step itself is *run* on fake tensors (torch's FakeTensorMode: tensors with shapes
and dtypes but no data, so IF-I-XL's 4.3 B weights cost nothing) while `PeakTracker` adds up the bytes of every
tensor storage that exists at each moment. Autocast, checkpointing, LoRA and the optimizer all act as they do in
a real run, so activations at any resolution and batch come out of the same simulation. What the fake run
cannot see: the CUDA context (~0.5 GiB, not counted by torch.cuda.max_memory_allocated either; `fits` adds it),
cuDNN/cuBLAS workspaces, and the caching allocator's fragmentation; CUDA's autocast op lists differ slightly
from the CPU's that the simulation runs. benchmarks/memory_model.py compares predictions with measured peaks:
within 3.1% of six recorded GPU peaks (torch.cuda.max_memory_allocated, H100/H200), within 10% of the CPU
resident peaks of full fine-tunes; on a CPU small runs are under-predicted by tens of MB (non-tensor memory).
"""
import json
import re
from pathlib import Path

import torch

from tinybooth import optim
from tinybooth.memory_trace import DTYPES, build, settings_dtypes, simulate_forward, simulate_training

GB, GiB = 10 ** 9, 2 ** 30
CARDS_GB = (8, 12, 16, 24)
CUDA_CONTEXT = GiB // 2         # CUDA context + kernels: outside torch's allocator, present on every card
PUBLIC_DIR = Path(__file__).parent / "assets" / "public_configs"
STAGES = ("text", "class", "base", "sr", "sample")


class MemoryBudgetError(ValueError):
    """A budget no setting fits, or a size that cannot be read."""


# ----------------------------------------------------------------------------------------------------------------
# sizes

def parse_size(text):
    """'12GB' -> 12e9 bytes, '12GiB' -> 12 * 2^30, '500MB', '1.5TB', a plain number of bytes. GB = 10^9 (as cards
    are sold), GiB = 2^30 (as torch and nvidia-smi count)."""
    units = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": GB, "TB": 10 ** 12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": GiB, "TIB": 2 ** 40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units:
        raise MemoryBudgetError(f"memory size {text!r} cannot be read; write a number and a unit, e.g. 12GB "
                                f"(10^9 bytes) or 11.2GiB (2^30 bytes)")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def gb(n):
    return f"{n / GB:.2f} GB"


# ----------------------------------------------------------------------------------------------------------------
# configs: a named public model (shipped JSON) or a pipeline directory

def public_models():
    return sorted(p.stem for p in PUBLIC_DIR.glob("*.json"))


def model_configs(model):
    """{'family': 'if' | 'if-sr' | 'sd', 'unet': {...}, 'text_encoder': {...}?, 'vae': {...}?} for a public model's
    name (tinybooth/assets/public_configs) or a pipeline directory holding unet/config.json (+ text_encoder/,
    vae/)."""
    if str(model) in public_models():
        return json.loads((PUBLIC_DIR / f"{model}.json").read_text())
    path = Path(model)
    if not (path / "unet" / "config.json").is_file():
        raise MemoryBudgetError(f"model '{model}' is neither a pipeline directory with unet/config.json nor one of "
                                f"the public models {public_models()}")
    read = lambda sub: json.loads((path / sub / "config.json").read_text())  # noqa: E731
    out = {"unet": read("unet")}
    for part in ("text_encoder", "vae"):
        if (path / part / "config.json").is_file():
            out[part] = read(part)
    sr = out["unet"].get("class_embed_type") == "timestep"
    out["family"] = "sd" if "vae" in out else ("if-sr" if sr else "if")
    return out


def count_params(kind, config):
    """Number of parameters of a module built from config.json, on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(kind, config).parameters())


# ----------------------------------------------------------------------------------------------------------------
# the stages of a run

_CACHE = {}


def cached(fn, *args):
    """fn(*args), remembered for this process (fit_budget predicts many settings that share stages)."""
    key = (fn.__name__, json.dumps(args, sort_keys=True, default=str))
    if key not in _CACHE:
        _CACHE[key] = fn(*args)
    return _CACHE[key]


def sampling_peak(unet_config, vae_config, n, size, dtype_name, mixed_precision):
    """Transient bytes of one sampling step for n images: the U-Net on 2n (classifier-free guidance doubles the
    batch), or for SD the VAE decoding the n finished latents at the end, whichever is larger."""
    peak = cached(simulate_forward, "unet", unet_config, 2 * n, size, dtype_name, mixed_precision)
    if vae_config is not None:
        peak = max(peak, cached(simulate_forward, "decoder", vae_config, n, size, dtype_name, mixed_precision))
    return peak


def state_bytes_per_weight(states):
    """AdamW's m and v per trained weight: fp32 8, bf16 4, 8-bit 2 + two fp32 absmax per 2048-value block."""
    return {"fp32": 8.0, "bf16": 4.0, "8bit": 2.0 + 8.0 / optim.BLOCK}[states]


def trained_text_encoder(text_config, s):
    """Bytes a trained text encoder adds to a fine-tuning stage (counted from its size; its activations for the
    two prompts of a step are small beside its weights and are left out)."""
    n = count_params("text", text_config)
    trained, frozen = settings_dtypes(s)
    if s["lora_rank"]:
        return {"weights": n * frozen.itemsize, "optimizer states": 0, "gradients": 0}
    return {"weights": n * trained.itemsize, "optimizer states": int(n * state_bytes_per_weight(s["optimizer_states"])),
            "gradients": 0 if s["optimizer_in_backward"] else n * trained.itemsize}


def training_stage(unet_config, s, size, n, vae_config, idle_bytes, extra):
    """A fine-tuning stage: the simulated step of this U-Net plus the idle weights beside it."""
    r = cached(simulate_training, unet_config, s, size, n, vae_config)
    grads = r["gradients"] + extra.get("gradients", 0)
    held = max(r["activations"], grads)
    parts = {"weights": r["weights"] + idle_bytes + extra.get("weights", 0),
             "optimizer states": r["optimizer states"] + extra.get("optimizer states", 0),
             "gradients": grads, "activations": r["activations"],
             "workspace": r["step peak"] + extra.get("gradients", 0) - held}
    return dict(parts, peak=parts["weights"] + parts["optimizer states"] + held + parts["workspace"])


def inference_stage(weights, transient):
    return {"weights": weights, "optimizer states": 0, "gradients": 0, "activations": transient,
            "workspace": 0, "peak": weights + transient}


def predict(model, sr_model=None, *, lora_rank=0, mixed_precision="bf16", gradient_checkpointing=False,
            optimizer_in_backward=False, optimizer_states="fp32", frozen_weights=None, batch_size=1,
            train_text_encoder=False, prior_preservation=True, class_batch_size=16, sample_batch=8,
            num_prompts=10, resolution=None, device="cuda"):
    """Predicted bytes at each stage of a run: {stage: {"peak", "weights", "optimizer states", "gradients",
    "activations", "workspace"}} for the stages in STAGES that the run has, plus {"settings": ...}.

    model / sr_model: a public model's name (see public_models()) or a pipeline directory. resolution: the base
    model's image side in pixels (default: its config's). frozen_weights ("fp32" | "bf16"; default bf16 under
    bf16 mixed precision): the dtype of every weight not being trained (a LoRA run's base, the idle U-Net, the
    VAE, a frozen text encoder). optimizer_states "bf16" and "8bit" train bf16 weights (tinybooth.optim.AdamW).
    device "cuda" runs torch's AdamW as CUDA does (foreach: one full-size temporary); its peak is what
    torch.cuda.max_memory_allocated reports (the CUDA context comes on top, see fits()).
    """
    s = dict(lora_rank=lora_rank, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
             optimizer_in_backward=optimizer_in_backward, optimizer_states=optimizer_states, device=device,
             frozen_weights=frozen_weights or ("bf16" if mixed_precision == "bf16" else "fp32"),
             batch_size=batch_size, train_text_encoder=train_text_encoder, prior_preservation=prior_preservation)
    check_settings(s)
    base = model_configs(model)
    sr = model_configs(sr_model) if sr_model else None
    trained, frozen = settings_dtypes(s)
    vae = base.get("vae")
    down = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 1       # latent side = pixels / 8 for SD
    size = (resolution or base["unet"]["sample_size"] * down) // down
    n_base, n_sr = count_params("unet", base["unet"]), count_params("unet", sr["unet"]) if sr else 0
    n_vae = count_params("vae", vae) if vae else 0
    frozen_b, trained_b = frozen.itemsize, (frozen if lora_rank else trained).itemsize
    text_dtype = "bf16" if s["frozen_weights"] == "bf16" else "fp32"   # T5 never runs in fp16
    text_cfg = base.get("text_encoder")
    out = {"settings": dict(s, model=str(model), sr_model=sr_model and str(sr_model), resolution=size * down)}
    if text_cfg is not None:
        out["text"] = inference_stage(
            (n_base + n_sr + n_vae) * frozen_b + count_params("text", text_cfg) * DTYPES[text_dtype].itemsize,
            cached(simulate_forward, "text", text_cfg, num_prompts, 0, text_dtype, mixed_precision))
    if prior_preservation:
        out["class"] = inference_stage((n_base + n_sr + n_vae) * frozen_b, sampling_peak(
            base["unet"], vae, class_batch_size, size, s["frozen_weights"], mixed_precision))
    extra = trained_text_encoder(text_cfg, s) if train_text_encoder and text_cfg else {}
    train_s = {k: s[k] for k in ("lora_rank", "mixed_precision", "gradient_checkpointing", "optimizer_in_backward",
                                 "optimizer_states", "frozen_weights", "device")}
    out["base"] = training_stage(base["unet"], train_s, size, batch_size * (2 if prior_preservation else 1), vae,
                                 n_sr * frozen_b, extra)
    if sr:
        out["sr"] = training_stage(sr["unet"], train_s, sr["unet"]["sample_size"], batch_size, None,
                                   n_base * trained_b, {})
    weights = n_base * trained_b + n_sr * (trained_b if sr else 0) + n_vae * frozen_b
    transient = sampling_peak(base["unet"], vae, sample_batch, size, s["frozen_weights"], mixed_precision)
    if sr:
        transient = max(transient, sampling_peak(sr["unet"], None, sample_batch, sr["unet"]["sample_size"],
                                                 s["frozen_weights"], mixed_precision))
    out["sample"] = inference_stage(weights, transient)
    return out


def check_settings(s):
    choices = {"mixed_precision": ("no", "bf16"), "optimizer_states": ("fp32", "bf16", "8bit"),
               "frozen_weights": ("fp32", "bf16"), "device": ("cuda", "cpu")}
    for k, allowed in choices.items():
        if s[k] not in allowed:
            raise MemoryBudgetError(f"{k}={s[k]!r} is not one the memory model knows; use one of {allowed}")


def peak(prediction):
    """The run's peak: the largest stage's."""
    return max(v["peak"] for k, v in prediction.items() if k != "settings")


def needed(prediction):
    """Bytes a card must have: the peak, plus the CUDA context on a GPU."""
    return peak(prediction) + (CUDA_CONTEXT if prediction["settings"]["device"] == "cuda" else 0)


def fits(prediction, budget):
    return needed(prediction) <= budget


def cards_that_fit(prediction):
    """Which of the common card sizes (8, 12, 16, 24 GB) hold the run."""
    return cards_for(needed(prediction))


def cards_for(needed_bytes):
    """The common card sizes (GB) with at least needed_bytes."""
    return [c for c in CARDS_GB if needed_bytes <= c * GB]


# ----------------------------------------------------------------------------------------------------------------
# for the train command: a table, and the cheapest settings that fit a budget

STAGE_NAMES = {"text": "encode prompts", "class": "class images", "base": "fine-tune base", "sr": "fine-tune SR",
               "sample": "sample grid"}
PARTS = ("weights", "optimizer states", "gradients", "activations", "workspace")


def format_table(prediction):
    """The prediction as a table in GB (10^9 bytes), one row per stage, the peak stage marked."""
    top = peak(prediction)
    s = prediction["settings"]
    lines = [f"predicted memory for {s['model']}" + (f" + {s['sr_model']}" if s["sr_model"] else "") +
             f" on {s['device']} ({s['resolution']} px, GB = 10^9 bytes):",
             f"  {'stage':16s}" + "".join(f"{p:>18s}" for p in PARTS) + f"{'peak':>10s}"]
    for stage in STAGES:
        if stage in prediction:
            r = prediction[stage]
            lines.append(f"  {STAGE_NAMES[stage]:16s}" + "".join(f"{r[p] / GB:18.2f}" for p in PARTS) +
                         f"{r['peak'] / GB:10.2f}" + ("  <- peak" if r["peak"] == top else ""))
    if s["device"] == "cuda":
        cards = ", ".join(f"{c} GB" for c in cards_that_fit(prediction)) or f"none of {CARDS_GB} GB"
        lines.append(f"  a card needs {gb(needed(prediction))} (peak + {CUDA_CONTEXT / GB:.2f} GB CUDA context): "
                     f"fits {cards}")
    return "\n".join(lines)


# cheapest quality cost first: each rung is kept once taken
LADDER = (
    ("gradient_checkpointing", True, "gradient checkpointing (recomputes activations in backward: slower, same "
                                     "result)"),
    ("mixed_precision", "bf16", "bf16 autocast"),
    ("frozen_weights", "bf16", "frozen and idle weights in bf16"),
    ("optimizer_in_backward", True, "optimizer step inside backward (gradients freed at once; clipping per "
                                    "tensor, no gradient accumulation)"),
    ("optimizer_states", "bf16", "bf16 weights and AdamW states with stochastic rounding"),
    ("optimizer_states", "8bit", "8-bit blockwise AdamW states (bf16 weights)"),
    ("lora_rank", 4, "LoRA rank 4 instead of the full fine-tune (fp32 AdamW on the adapters)"),
)


def fit_budget(budget, model, sr_model=None, **settings):
    """The settings (predict()'s keywords) that fit `budget` bytes, taking the rungs of LADDER in order until the
    predicted need fits, and a few lines saying what was chosen and why. Raises MemoryBudgetError when even the
    last rung does not fit."""
    s = dict(settings)
    first = pred = predict(model, sr_model, **s)
    lines = [f"memory budget {gb(budget)}: the requested settings need {gb(needed(pred))}"]
    for key, value, why in LADDER:
        if fits(pred, budget):
            break
        if s.get(key) == value or (key == "optimizer_states" and s.get(key) == "8bit"):
            continue
        s[key] = value
        if key == "lora_rank":  # the adapters' states are small: the full fine-tune's savings are not needed
            s.update(optimizer_states="fp32", optimizer_in_backward=False)
        pred = predict(model, sr_model, **s)
        lines.append(f"  + {why}: {gb(needed(pred))}")
    if not fits(pred, budget):
        raise MemoryBudgetError(f"{model} needs at least {gb(needed(pred))} even with every saving (LoRA, "
                                f"checkpointing, bf16 weights); the budget is {gb(budget)}. Use a smaller model, "
                                f"a lower --resolution or --batch-size 1, or a larger card")
    lines.append(f"chosen: {', '.join(f'{k}={v}' for k, v in s.items() if settings.get(k) != v) or 'as given'}"
                 f" ({gb(needed(pred))} of {gb(budget)}; {gb(needed(first))} before)")
    return s, "\n".join(lines)
