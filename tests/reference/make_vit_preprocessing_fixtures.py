"""Reference fixtures for tinybooth/image_preprocessing.py: encoders follow the folder's preprocessor_config.json.

Run with the reference venv (never imported by the tests):
    /work/refenv/bin/python tests/reference/make_vit_preprocessing_fixtures.py

A user of transformers loads an evaluation encoder folder as
    processor = AutoImageProcessor.from_pretrained(folder, use_fast=False)   # the PIL/numpy reference processor
    model = ViTModel.from_pretrained(folder) / CLIPModel.from_pretrained(folder)
and embeds model(**processor(images)). For each preprocessor_config.json below (settings that differ from the
defaults: ImageNet statistics, other filters, a centre crop, a crop larger than the resize, legacy int sizes) this
script writes the file into a copy of a tiny random model folder, runs exactly those lines on the two opaque images
of tests/fixtures/vit/images, and records pixel values and embeddings. (transformers 4.57 drops the alpha channel
of transparent images, transformers 5 composites them on white as tinybooth does; make_vit_fixtures.py, made with
transformers 5, tests that, so the transparent image stays out of this set.)

Writes tests/fixtures/vit/preprocessing/
    dino/, clip/           tiny random ViTModel / CLIPModel folders (config.json + model.safetensors, no
                           preprocessor_config.json: each case adds its own)
    cases.json             case -> model folder, preprocessor_config.json, the processor class transformers chose
    expected.safetensors   <case>_pixel_values, <case>_embeds
    meta.json              library versions, seed
"""
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, CLIPConfig, CLIPModel, ViTConfig, ViTModel

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "vit" / "preprocessing"
IMAGES = ROOT / "tests" / "fixtures" / "vit" / "images"
SEED = 0
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

CASES = {
    # DINO with ImageNet statistics and bicubic (the case: 0.5/0.5 hard-coded gave 1.1 of CLS error)
    "vit_imagenet_bicubic": ("dino", {"image_processor_type": "ViTImageProcessor", "do_convert_rgb": True,
                                      "size": {"height": 16, "width": 16}, "resample": 3,
                                      "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}),
    # the legacy form facebook/dino-vits16 publishes: ViTFeatureExtractor with an int size
    "vit_legacy_int_size": ("dino", {"feature_extractor_type": "ViTFeatureExtractor", "do_convert_rgb": True,
                                     "do_normalize": True, "do_resize": True, "size": 16, "resample": 2,
                                     "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}),
    # CLIP: shortest edge 20 (not the model's 16) then a 16 x 16 centre crop, lanczos, ImageNet statistics
    "clip_resize20_crop16_lanczos": ("clip", {"image_processor_type": "CLIPImageProcessor",
                                              "size": {"shortest_edge": 20}, "crop_size": {"height": 16, "width": 16},
                                              "resample": 1, "image_mean": IMAGENET_MEAN,
                                              "image_std": IMAGENET_STD}),
    # a crop larger than the resized image: transformers pads with zeros before normalising
    "clip_crop_pads_nearest": ("clip", {"image_processor_type": "CLIPImageProcessor", "size": 12, "crop_size": 16,
                                        "resample": 0}),
    # squash to height/width, then crop; other rescale factor, no normalisation
    "clip_height_width_no_normalize": ("clip", {"image_processor_type": "CLIPImageProcessor",
                                                "size": {"height": 18, "width": 24},
                                                "crop_size": {"height": 16, "width": 16}, "rescale_factor": 0.002,
                                                "do_normalize": False}),
    # DINOv2's BitImageProcessor (shortest edge + crop, CLIP-like defaults) on the ViT folder
    "bit_resize18_crop16": ("dino", {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 18},
                                     "crop_size": {"height": 16, "width": 16}, "resample": 3,
                                     "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}),
}


def randomize(model, seed):
    """Every parameter random (layer-norm weights around 1), so a swapped or skipped tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise if p.dim() <= 1 else noise / math.sqrt(max(p[0].numel(), 1)))
    return model.eval()


def make_models():
    tiny = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                patch_size=4)
    vit = randomize(ViTModel(ViTConfig(**tiny, hidden_act="gelu"), add_pooling_layer=False), SEED + 1)
    vit.save_pretrained(OUT / "dino")
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=20, max_position_embeddings=8),
                                vision_config=dict(tiny, hidden_act="quick_gelu"), projection_dim=8))
    randomize(clip, SEED + 2).save_pretrained(OUT / "clip")


def run_case(model_name, pre_config, images):
    """The lines a transformers user types, on a copy of the model folder with this preprocessor_config.json."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / model_name
        shutil.copytree(OUT / model_name, folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(pre_config))
        processor = AutoImageProcessor.from_pretrained(folder, use_fast=False)
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            if model_name == "dino":
                embeds = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()(pixel_values=pixel_values).last_hidden_state[:, 0]
            else:
                embeds = CLIPModel.from_pretrained(folder).eval().get_image_features(pixel_values=pixel_values)
    return type(processor).__name__, pixel_values, embeds


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    make_models()
    images = [Image.open(IMAGES / n) for n in ("landscape.png", "portrait.png")]
    expected, cases = {}, {}
    for name, (model_name, pre_config) in CASES.items():
        cls, expected[f"{name}_pixel_values"], expected[f"{name}_embeds"] = run_case(model_name, pre_config, images)
        cases[name] = {"model": model_name, "preprocessor_config": pre_config, "processor_class": cls}
        print(f"{name}: {cls} -> {tuple(expected[f'{name}_pixel_values'].shape)}")
    save_file({k: v.contiguous() for k, v in expected.items()}, str(OUT / "expected.safetensors"))
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    meta = dict(transformers=transformers.__version__, torch=torch.__version__, seed=SEED, tolerance=1e-4,
                images=["landscape.png", "portrait.png"])
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
