"""Reference fixtures for tinybooth/vit.py (CLIP and DINO image encoders) and tinybooth/lpips.py.

Run with the reference venv:  /work/refvenv/bin/python tests/reference/make_vit_fixtures.py
Writes tests/fixtures/vit/:
    clip/                 tiny random transformers CLIPModel (vision + text, quick_gelu), public layout
    dino/                 tiny random transformers ViTModel (no pooler), saved as pytorch_model.bin like
                          facebook/dino-vits16
    images/*.png          three small non-square images (crops of tests/data/dreambooth photos, one with alpha)
    expected.safetensors  pixel inputs, image embeddings, CLS outputs, text embeddings, processor outputs
    lpips.safetensors     LPIPS(alex) inputs and distances from the `lpips` package (see make_lpips below)
    meta.json             library versions, seeds, shapes
"""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "vit"
DATA = ROOT / "tests" / "data" / "dreambooth"
SEED = 0


def randomize(model, seed):
    """Every parameter random (layer-norm weights around 1), so a swapped or skipped tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("weight") and p.dim() == 1:  # layer norm gains
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise if p.dim() <= 1 else noise / math.sqrt(max(p[0].numel(), 1)))
    return model.eval()


def make_images():
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    a = Image.open(DATA / "dog" / "00.jpg").convert("RGB").crop((4, 20, 124, 100))     # 120 x 80 landscape
    b = Image.open(DATA / "dog2" / "01.jpg").convert("RGB").crop((30, 0, 90, 127))     # 60 x 127 portrait
    c = a.resize((48, 64)).convert("RGBA")                                               # transparent, 48 x 64
    c.putalpha(Image.linear_gradient("L").resize((48, 64)))
    a.save(OUT / "images" / "landscape.png")
    b.save(OUT / "images" / "portrait.png")
    c.save(OUT / "images" / "transparent.png")
    return [Image.open(OUT / "images" / n) for n in ("landscape.png", "portrait.png", "transparent.png")]


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.manual_seed(SEED)
    images = make_images()
    expected = {}

    # --- CLIP: tiny CLIPModel, vision 32x32 images in 8x8 patches, projection 24 --------------------------------
    clip_cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=99, max_position_embeddings=16, hidden_act="quick_gelu",
                         bos_token_id=97, eos_token_id=98, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=24)
    clip = randomize(CLIPModel(clip_cfg), SEED + 1)
    clip.save_pretrained(OUT / "clip")
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(SEED + 2))
    ids = torch.tensor([[97, 5, 17, 42, 98, 1, 1], [97, 60, 3, 9, 11, 23, 98]])
    with torch.no_grad():
        expected["pixel_values"] = px  # the same random input for both encoders
        expected["clip_image_embeds"] = clip.get_image_features(pixel_values=px).pooler_output
        expected["clip_input_ids"] = ids
        text_out = clip.text_model(input_ids=ids)
        expected["clip_text_pooled"] = text_out.pooler_output
        expected["clip_text_embeds"] = clip.text_projection(text_out.pooler_output)

    # a tiny BPE vocabulary for the tiny text tower (ids < 99): single characters only, no merges
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 97, "<|endoftext|>": 98}
    (OUT / "clip" / "vocab.json").write_text(json.dumps(vocab))
    (OUT / "clip" / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(str(OUT / "clip" / "vocab.json"), str(OUT / "clip" / "merges.txt"),
                        pad_token="<|endoftext|>")
    prompts = ["a dog in the snow", "a red backpack on the beach"]
    enc = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected["clip_prompt_ids"] = enc["input_ids"]
        expected["clip_text_embeds_from_prompts"] = clip.get_text_features(input_ids=enc["input_ids"]).pooler_output

    # --- DINO: tiny ViTModel without pooler, published as pytorch_model.bin ------------------------------------
    vit_cfg = ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-12)
    vit = randomize(ViTModel(vit_cfg, add_pooling_layer=False), SEED + 3)
    vit.save_pretrained(OUT / "dino")
    # the public file is a .bin with the public (legacy) names; transformers 5 renames them in memory
    # (layers.N.attention.q_proj...), so take the tensors from the safetensors file save_pretrained wrote
    public = load_file(OUT / "dino" / "model.safetensors")
    (OUT / "dino" / "model.safetensors").unlink()
    torch.save(public, OUT / "dino" / "pytorch_model.bin")
    with torch.no_grad():
        expected["dino_cls"] = vit(pixel_values=px).last_hidden_state[:, 0]

    # --- preprocessing: the reference image processors (PIL backend) on two non-square images ------------------
    for name, proc in [("clip_proc_32", CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                              crop_size={"height": 32, "width": 32})),
                       ("dino_proc_32", ViTImageProcessorPil(size={"height": 32, "width": 32},
                                                             image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                             do_convert_rgb=True))]:
        expected[name] = proc(images=images, return_tensors="pt")["pixel_values"]
    # the published 224 settings: CLIPImageProcessor() defaults and facebook/dino-vits16's preprocessor_config
    # (mean = std = 0.5, bilinear, 224x224); a strided subsample keeps the fixture small
    clip224 = CLIPImageProcessorPil()(images=images, return_tensors="pt")["pixel_values"]
    # (ViTImageProcessor does not convert to RGB by default and fails on RGBA; we ask it to, as we do)
    dino224 = ViTImageProcessorPil(size=224, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2,
                                   do_convert_rgb=True)(
        images=images, return_tensors="pt")["pixel_values"]
    assert clip224.shape[-1] == 224 and dino224.shape[-1] == 224
    expected["clip_proc_224_strided"] = clip224[:, :, ::7, ::7].contiguous()
    expected["dino_proc_224_strided"] = dino224[:, :, ::7, ::7].contiguous()
    with torch.no_grad():
        expected["clip_image_embeds_from_images"] = clip.get_image_features(
            pixel_values=expected["clip_proc_32"]).pooler_output
        expected["dino_cls_from_images"] = vit(pixel_values=expected["dino_proc_32"]).last_hidden_state[:, 0]

    save_file({k: v.contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    meta = dict(transformers=transformers.__version__, torch=torch.__version__, seed=SEED,
                tolerance=1e-4, shapes={k: list(v.shape) for k, v in expected.items()},
                notes="CLIPImageProcessorPil / ViTImageProcessorPil are what AutoImageProcessor uses without "
                      "torchvision; *_224_strided keep every 7th row and column of the 224x224 output.")
    meta.update(make_lpips())
    (OUT / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


def formula_weights(shape, salt):
    """Deterministic stand-in for AlexNet's trained weights: 10 MB of real weights would not fit a fixture, and
    the test rebuilds these from the same formula (tests/test_metrics.py::formula_weights)."""
    n = int(np.prod(shape))
    i = torch.arange(n, dtype=torch.float64)
    w = torch.sin(0.7071 * i + 1.3 * salt) * torch.cos(0.0137 * i + salt)
    fan_in = n // shape[0]
    return (w * math.sqrt(3.0 / fan_in)).float().reshape(shape)


def install_torchvision_alexnet_stub():
    """lpips imports torchvision only for `models.alexnet(pretrained=...).features`. The PyPI torchvision wheels'
    compiled ops do not load against this venv's CPU torch, so give lpips torchvision's AlexNet feature stack
    (torchvision/models/alexnet.py, AlexNet.features, layer for layer) without importing torchvision."""
    import sys
    import types
    nn = torch.nn

    def alexnet(pretrained=False, **_):
        assert not pretrained, "the fixture replaces the trunk weights anyway"
        net = nn.Module()
        net.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2))
        return net

    try:
        import torchvision  # noqa: F401  (a working torchvision is used as is)
        return
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    try:
        import scipy.ndimage  # noqa: F401  (lpips' trainer imports scipy.ndimage.zoom; LPIPS itself never uses it)
    except ImportError:
        sp = types.ModuleType("scipy")
        sp.ndimage = types.ModuleType("scipy.ndimage")
        sp.ndimage.zoom = None
        sys.modules["scipy"], sys.modules["scipy.ndimage"] = sp, sp.ndimage
    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.alexnet = alexnet
    sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tv.models


def make_lpips():
    """LPIPS(net='alex', version 0.1) from the `lpips` package (BSD-2-Clause; its linear weights ship in its wheel)
    with the AlexNet trunk replaced by formula_weights. Skipped (with a note) if lpips/torchvision are missing."""
    try:
        install_torchvision_alexnet_stub()
        import lpips
    except ImportError as e:
        return {"lpips": f"not generated: {e}"}
    model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False).eval()
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for salt, conv in enumerate(convs):
            conv.weight.copy_(formula_weights(conv.weight.shape, salt))
            conv.bias.copy_(formula_weights(conv.bias.shape, salt + 10) * 0.1)
    g = torch.Generator().manual_seed(SEED + 4)
    x0 = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    x1 = (x0 + 0.5 * torch.randn(3, 3, 64, 64, generator=g)).clamp(-1, 1)
    x1[2] = x0[2]  # identical pair: distance 0
    with torch.no_grad():
        d = model(x0, x1).flatten()
    lin = {f"lin{k}.model.1.weight": model.lins[k].model[1].weight.detach().clone() for k in range(5)}
    save_file({"x0": x0, "x1": x1, "distance": d, **lin}, OUT / "lpips.safetensors")
    return {"lpips": f"lpips {getattr(lpips, '__version__', '0.1.4')}, net=alex, version=0.1, trunk=formula_weights",
            "lpips_distances": d.tolist()}


if __name__ == "__main__":
    main()
