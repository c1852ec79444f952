"""Reference fixtures for tinybooth/lora.py: the LoRA files tinybooth writes, loaded by diffusers and peft.

Run with the reference venv (never imported by the tests):
    /work/refenv/bin/python tests/reference/make_lora_fixtures.py

For each backbone of tests/fixtures/cascade (tiny random U-Nets) and tests/fixtures/text (tiny T5 and CLIP text
encoders), tinybooth adds LoRA adapters (B non-zero, as after training, so the adapters change the output) and
saves them with lora.save_lora. Then the public API loads tinybooth's files:
    if1  IFPipeline.load_lora_weights(dir)                    U-Net adapters
         PeftModel.from_pretrained(T5EncoderModel, dir/text_encoder)   T5 adapters (peft adapter folder), and
         pipe.text_encoder.load_adapter(dir/text_encoder)     the same through transformers (same output)
    if2  IFSuperResolutionPipeline.load_lora_weights(dir)     U-Net adapters of the SR stage
    sd   StableDiffusionPipeline.load_lora_weights(dir)       U-Net and CLIP text-encoder adapters
    all  pipe.unet.load_lora_adapter(dir, prefix="unet", weight_name="pytorch_lora_weights.safetensors"): the U-Net
         alone, with no warning (load_lora_weights warns "No LoRA keys associated to <text encoder>" for a file
         with U-Net adapters only, as it does for diffusers' own save_lora_weights file of the same adapters)
and records the outputs on fixed inputs (before and after loading) and every warning the libraries raised.

Writes tests/fixtures/lora/
    if1/, if2/, sd/        the files tinybooth wrote (what diffusers / peft loaded)
    sd_kohya.safetensors   lora.save_kohya_lora of the sd adapters, loaded by StableDiffusionPipeline
                           .load_lora_weights(file) through diffusers' kohya converter
    expected.safetensors   inputs, outputs of the base models and of the LoRA-loaded models
    meta.json              library versions, ranks, the keys and metadata diffusers saw, the warnings (none)
"""
import json
import logging
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import diffusers
import peft
import torch
import transformers
from diffusers import (AutoencoderKL, DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, T5EncoderModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tinybooth import lora  # noqa: E402  (the writer under test)
from tinybooth.text import T5Encoder  # noqa: E402
from tinybooth.clip import CLIPTextEncoder
from tinybooth.unet import UNet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_file_record import file_record  # noqa: E402  (the tests import the same function)

CASCADE, TEXT = ROOT / "tests" / "fixtures" / "cascade", ROOT / "tests" / "fixtures" / "text"
OUT = ROOT / "tests" / "fixtures" / "lora"
SEED = 0
# (rank, alpha) per module; alpha != rank so the scale alpha / r is exercised
RANKS = {"unet": (2, 3.0), "text_encoder": (3, 3.0)}
LORA_FILE = "pytorch_lora_weights.safetensors"
NO_EXTRAS = dict(tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None,
                 requires_safety_checker=False)


@contextmanager
def recorded_warnings(into):
    """Collect Python warnings and WARNING+ log records of diffusers, transformers and peft into `into`."""
    class Handler(logging.Handler):
        def emit(self, record):
            into.append(f"{record.name}: {record.getMessage()}")
    handler = Handler(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for lg in loggers:
        lg.removeHandler(handler)
    into.extend(f"{w.category.__name__}: {w.message}" for w in caught)


def add_trained_lora(model, prefix, seed):
    """tinybooth's adapters on model, with B drawn at random as if fine-tuned."""
    rank, alpha = RANKS[prefix]
    torch.manual_seed(seed)
    lora.add_lora(model, rank, alpha, lora.UNET_TARGETS if prefix == "unet" else lora.TEXT_TARGETS)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))
    return model


def unet_inputs(name, config):
    g = torch.Generator().manual_seed(SEED + 5)
    size = config["sample_size"]
    x = {"sample": torch.randn(2, config["in_channels"], size, size, generator=g), "t": torch.tensor([10, 700]),
         "c": torch.randn(2, 5, config.get("encoder_hid_dim") or config["cross_attention_dim"], generator=g)}
    if name == "if2":
        x["noise_level"] = torch.tensor([250, 100])
    return x


def diffusers_unet(unet, x):
    return unet(x["sample"], x["t"], encoder_hidden_states=x["c"], class_labels=x.get("noise_level")).sample


def diffusers_own_file(pipe, parts, name):
    """diffusers' save_lora_weights on the adapters it just loaded, reloaded into a fresh pipeline: its keys and
    LoraConfig against tinybooth's, and the warnings diffusers raises on its own file (the baseline)."""
    from peft.utils import get_peft_model_state_dict
    own = OUT.parent / f"_own_{name}"
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet, adapter_name="default_0")}
    configs = {"unet_lora_adapter_metadata": pipe.unet.peft_config["default_0"].to_dict()}
    if getattr(pipe.text_encoder, "peft_config", None) and "default_0" in pipe.text_encoder.peft_config:
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder, adapter_name="default_0")
        configs["text_encoder_lora_adapter_metadata"] = pipe.text_encoder.peft_config["default_0"].to_dict()
    type(pipe).save_lora_weights(own, **layers, **configs)
    fresh = dict(parts, unet=UNet2DConditionModel.from_pretrained(CASCADE / name / "unet").eval())
    if parts.get("text_encoder") is not None:
        fresh["text_encoder"] = type(parts["text_encoder"]).from_pretrained(
            TEXT / ("t5_gated" if name == "if1" else "clip_quick_gelu")).eval()
    caught = []
    with recorded_warnings(caught):
        type(pipe)(**fresh).load_lora_weights(str(own))
    theirs, ours = file_record(own)[LORA_FILE], file_record(OUT / name)[LORA_FILE]
    shutil.rmtree(own)
    their_config = json.loads(theirs["metadata"]["lora_adapter_metadata"])
    our_config = json.loads(ours["metadata"]["lora_adapter_metadata"])
    # peft shortens a long target_modules list to name suffixes; compare what it wrapped instead
    same = theirs["keys"] == ours["keys"] and all(
        their_config[k] == v for k, v in our_config.items() if not k.endswith("target_modules"))
    for prefix in {k.split(".")[0] for k in our_config}:
        model = getattr(pipe, prefix)
        wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
        same = same and wrapped == sorted(our_config[f"{prefix}.target_modules"])
    return {"warnings_loading_diffusers_own_file": caught, "same_as_diffusers_own_file": same}


def kohya_case(parts, models, x, ids, out):
    """tinybooth's kohya export (A1111 / ComfyUI naming) loaded into a fresh SD pipeline by diffusers' kohya
    converter: the outputs must be the ones of the pipeline file; the key names are checked against diffusers'
    own convert_state_dict_to_kohya (which names the text encoder lora_te1, SDXL's first, and sets alpha = r)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    file = OUT / "sd_kohya.safetensors"
    lora.save_kohya_lora(file, models)
    fresh = dict(parts, unet=UNet2DConditionModel.from_pretrained(CASCADE / "sd" / "unet").eval(),
                 text_encoder=CLIPTextModel.from_pretrained(TEXT / "clip_quick_gelu").eval())
    pipe, caught = StableDiffusionPipeline(**fresh), []
    with recorded_warnings(caught):
        pipe.load_lora_weights(str(file))
    out["sd_kohya_unet_lora"] = diffusers_unet(pipe.unet, x)
    out["sd_kohya_clip_lora"] = pipe.text_encoder(ids).last_hidden_state
    with safe_open(str(OUT / "sd" / LORA_FILE), framework="pt") as f:
        peft_state = {k: f.get_tensor(k) for k in f.keys()}
    theirs = {k.replace("lora_te1_", "lora_te_") for k in convert_state_dict_to_kohya(peft_state)}
    with safe_open(str(file), framework="pt") as f:
        ours = set(f.keys())
    return {"warnings": caught, "keys_as_diffusers_convert_state_dict_to_kohya": sorted(theirs) == sorted(ours),
            "max_diff_to_pipeline_file": max((out["sd_kohya_unet_lora"] - out["sd_unet_lora"]).abs().max().item(),
                                             (out["sd_kohya_clip_lora"] - out["sd_clip_lora"]).abs().max().item())}


def make_case(name, pipeline_cls, text_kind, out, meta):
    unet_dir = CASCADE / name / "unet"
    config = json.loads((unet_dir / "config.json").read_text())
    models = {"unet": add_trained_lora(UNet.from_pretrained(unet_dir), "unet", SEED + 10)}
    text_dir = {"t5": TEXT / "t5_gated", "clip": TEXT / "clip_quick_gelu"}.get(text_kind)
    if text_kind:
        te_cls = T5Encoder if text_kind == "t5" else CLIPTextEncoder
        models["text_encoder"] = add_trained_lora(te_cls.from_pretrained(text_dir), "text_encoder", SEED + 20)
    lora.save_lora(OUT / name, models)

    x = unet_inputs(name, config)
    out.update({f"{name}_unet_{k}": v for k, v in x.items()})
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    parts = dict(NO_EXTRAS, unet=unet, scheduler=DDPMScheduler.from_pretrained(CASCADE / name / "scheduler"))
    if name == "if2":
        parts["image_noising_scheduler"] = DDPMScheduler.from_pretrained(CASCADE / name / "image_noising_scheduler")
    if name == "if1":  # as published: IF stage I carries its T5 (the U-Net never sees it here)
        parts["text_encoder"] = T5EncoderModel.from_pretrained(text_dir).eval()
    if name == "sd":  # (models: tinybooth's, for the kohya export)
        parts = {k: v for k, v in parts.items() if k != "watermarker"}
        parts["vae"] = AutoencoderKL.from_pretrained(CASCADE / "sd" / "vae")
        parts["text_encoder"] = CLIPTextModel.from_pretrained(text_dir).eval()
    pipe = pipeline_cls(**parts)
    out[f"{name}_unet_base"] = diffusers_unet(pipe.unet, x)
    caught = []
    if text_kind == "clip":
        ids = torch.tensor([[148, 5, 17, 42, 149, 149], [148, 60, 3, 9, 11, 149]])
        out["sd_clip_ids"], out["sd_clip_base"] = ids, pipe.text_encoder(ids).last_hidden_state
    with recorded_warnings(caught):
        pipe.load_lora_weights(str(OUT / name))
    out[f"{name}_unet_lora"] = diffusers_unet(pipe.unet, x)
    # the U-Net alone, without the pipeline's text-encoder pass (which warns when the file has no text adapters)
    unet_caught, unet_only = [], UNet2DConditionModel.from_pretrained(unet_dir).eval()
    with recorded_warnings(unet_caught):
        unet_only.load_lora_adapter(str(OUT / name), prefix="unet", weight_name=LORA_FILE)
    unet_only_diff = (diffusers_unet(unet_only, x) - out[f"{name}_unet_lora"]).abs().max().item()
    if text_kind == "clip":
        out["sd_clip_lora"] = pipe.text_encoder(ids).last_hidden_state
        meta["sd_kohya"] = kohya_case(parts, models, x, ids, out)
    if text_kind == "t5":
        t5 = T5EncoderModel.from_pretrained(text_dir).eval()
        ids = torch.tensor([[5, 17, 42, 1, 0, 0], [60, 3, 9, 11, 23, 1]])
        mask = (torch.arange(6) < torch.tensor([[4], [6]])).long()
        out.update(if1_t5_ids=ids, if1_t5_mask=mask, if1_t5_base=t5(ids, attention_mask=mask).last_hidden_state)
        with recorded_warnings(caught):
            t5 = PeftModel.from_pretrained(t5, str(OUT / name / "text_encoder")).eval()
        out["if1_t5_lora"] = t5(input_ids=ids, attention_mask=mask).last_hidden_state
        # the same folder through transformers' own adapter API, into the pipeline's T5 (what an IF user types)
        with recorded_warnings(caught):
            pipe.text_encoder.load_adapter(str(OUT / name / "text_encoder"))
        again = pipe.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(again, out["if1_t5_lora"], atol=1e-6), "load_adapter and PeftModel disagree"
    meta[name] = {"pipeline": pipeline_cls.__name__, "text_encoder": text_kind, "files": file_record(OUT / name),
                  "warnings": caught, **diffusers_own_file(pipe, parts, name),
                  "unet_load_lora_adapter": {"warnings": unet_caught, "max_diff_to_pipeline": unet_only_diff},
                  "lora_changes_unet_by": (out[f"{name}_unet_lora"] - out[f"{name}_unet_base"]).abs().max().item()}
    print(name, "warnings:", caught or "none", "| unet change", meta[name]["lora_changes_unet_by"],
          "| diffusers' own file warns:", meta[name]["warnings_loading_diffusers_own_file"] or "none",
          "| same keys and config:", meta[name]["same_as_diffusers_own_file"])


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    diffusers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    out = {}
    meta = {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "torch": torch.__version__, "seed": SEED, "ranks": RANKS, "tolerance": 1e-5}
    with torch.no_grad():
        for name, cls, text_kind in (("if1", IFPipeline, "t5"), ("if2", IFSuperResolutionPipeline, None),
                                     ("sd", StableDiffusionPipeline, "clip")):
            make_case(name, cls, text_kind, out, meta)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "expected.safetensors"))
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
