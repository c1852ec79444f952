"""tinybooth.vit against transformers' CLIPModel / ViTModel and their image processors (fixtures from
tests/reference/make_vit_fixtures.py), plus the published parameter counts of the full-size encoders."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tinybooth import checkpoint, vit
from tinybooth.vit import CLIPTextEmbedder, CLIPVisionEncoder, DINOEncoder, ViTConfig

TOL = 1e-4


@pytest.fixture(scope="module")
def fx(request):
    root = request.config.rootpath / "tests" / "fixtures" / "vit"
    return root, load_file(root / "expected.safetensors")


def images(root):
    """Landscape, portrait, and a transparent image (the reference composites transparency on white)."""
    return [Image.open(root / "images" / n) for n in ("landscape.png", "portrait.png", "transparent.png")]


def assert_close(got, want, what):
    err = (got - want).abs().max().item()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert err < TOL, f"{what}: max |difference| to the reference is {err:.2e} (tolerance {TOL})"


@pytest.mark.task9_1
def test_clip_image_embeds_match_transformers(fx):
    root, want = fx
    model = CLIPVisionEncoder.from_pretrained(root / "clip")
    with torch.no_grad():
        got = model(want["pixel_values"])
    assert_close(got, want["clip_image_embeds"], "CLIP image embeddings visual_projection(LN(z_L[0]))")


def test_clip_text_embeds_match_transformers(fx):
    """CLIP-T's text side: text_projection(c[first eos]) on the CLIPModel's text half, from ids and from prompts
    (the tiny fixture vocabulary is single letters; transformers' CLIPTokenizer made the expected ids)."""
    root, want = fx
    model = CLIPTextEmbedder.from_pretrained(root / "clip")
    with torch.no_grad():
        got = model.project(want["clip_input_ids"], eos_id=98)
    assert_close(got, want["clip_text_embeds"], "CLIP text embeddings text_projection(c[eos])")
    prompts = ["a dog in the snow", "a red backpack on the beach"]
    ids, _ = model.tokenizer(prompts, max_length=16)
    assert torch.equal(ids, want["clip_prompt_ids"]), f"token ids {ids.tolist()} differ from transformers'"
    assert_close(model.embed(prompts), want["clip_text_embeds_from_prompts"], "CLIP text embeddings of prompts")


@pytest.mark.task9_1
def test_dino_cls_matches_transformers_from_pytorch_model_bin(fx):
    root, want = fx
    assert (root / "dino" / "pytorch_model.bin").exists() and not (root / "dino" / "model.safetensors").exists()
    model = DINOEncoder.from_pretrained(root / "dino")
    with torch.no_grad():
        got = model(want["pixel_values"])
    assert_close(got, want["dino_cls"], "DINO CLS embedding LN(z_L)[0]")


@pytest.mark.task9_1
def test_embed_patches_prepends_cls_and_adds_positions():
    conv = torch.nn.Conv2d(3, 4, 2, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    cls, pos = torch.full((4,), 7.0), torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)
    z = vit.embed_patches(x, conv, cls, pos)
    assert z.shape == (2, 5, 4), f"z_0 must be [B, N+1, D] = (2, 5, 4), got {tuple(z.shape)}"
    assert torch.equal(z[:, 0], (cls + pos[0]).expand(2, 4)), "row 0 must be x_cls + E_pos[0]"
    # patch 1 (top-right 2x2 block) of image 0: sum over 3 channels of its 4 pixels, in every output channel
    patch = x[0, :, 0:2, 2:4].sum()
    assert torch.allclose(z[0, 2], patch + pos[2]), "row i must be E p_i + E_pos[i], patches in raster order"


def test_preprocessing_matches_reference_processors(fx):
    root, want = fx
    clip = CLIPVisionEncoder.from_pretrained(root / "clip")
    dino = DINOEncoder.from_pretrained(root / "dino")
    imgs = images(root)
    assert_close(clip.preprocess(imgs), want["clip_proc_32"],
                 "CLIP preprocessing (shortest side -> 32 bicubic, centre crop, CLIP mean/std)")
    assert_close(dino.preprocess(imgs), want["dino_proc_32"], "DINO preprocessing (squash to 32x32 bilinear, 0.5/0.5)")


@pytest.mark.task9_1
def test_embed_images_end_to_end(fx):
    root, want = fx
    clip = CLIPVisionEncoder.from_pretrained(root / "clip")
    dino = DINOEncoder.from_pretrained(root / "dino")
    imgs = images(root)
    assert_close(clip.embed(imgs), want["clip_image_embeds_from_images"], "CLIP embed(images)")
    assert_close(dino.embed(imgs), want["dino_cls_from_images"], "DINO embed(images)")


def test_preprocessing_at_published_224(fx):
    root, want = fx
    imgs = images(root)
    with torch.device("meta"):
        clip = CLIPVisionEncoder.from_config({"model_type": "clip"})  # every vision setting from the defaults
        dino = DINOEncoder.from_config(json.loads((root / "dino" / "config.json").read_text()) | {"image_size": 224})
    assert clip.preprocess.output_size == (224, 224) and dino.preprocess.output_size == (224, 224)
    assert_close(clip.preprocess(imgs)[:, :, ::7, ::7], want["clip_proc_224_strided"], "CLIP preprocessing at 224")
    assert_close(dino.preprocess(imgs)[:, :, ::7, ::7], want["dino_proc_224_strided"], "DINO preprocessing at 224")


def test_tensor_images_are_quantised_like_png(fx):
    root, _ = fx
    clip = CLIPVisionEncoder.from_pretrained(root / "clip")
    img = images(root)[0]
    x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(clip.preprocess(x), clip.preprocess([img])), "a [0, 1] tensor must preprocess like its PNG"


# published configs (only the keys that matter; the rest are the transformers defaults the classes apply)
CLIP_B32 = {"model_type": "clip", "projection_dim": 512,
            "text_config": {"model_type": "clip_text_model"}, "vision_config": {"model_type": "clip_vision_model"}}
DINO_S16 = {"model_type": "vit", "hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 6,
            "num_hidden_layers": 12, "image_size": 224, "patch_size": 16, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_full_size_parameter_counts_on_meta():
    with torch.device("meta"):
        clip, dino = CLIPVisionEncoder.from_config(CLIP_B32), DINOEncoder.from_config(DINO_S16)
    assert next(clip.parameters()).is_meta and next(dino.parameters()).is_meta
    # transformers CLIPModel(openai/clip-vit-base-patch32): vision_model.* + visual_projection = 87,849,216 of
    # 151,277,313; ViTModel(facebook/dino-vits16, no pooler) = 21,665,664
    assert n_params(clip) == 87_849_216, f"CLIP ViT-B/32 vision + projection: got {n_params(clip):,}"
    assert n_params(dino) == 21_665_664, f"DINO ViT-S/16: got {n_params(dino):,}"
    with torch.device("meta"):
        text = CLIPTextEmbedder.from_config(CLIP_B32)
    # the rest of CLIPModel: text_model.* + text_projection = 63,428,096 (+ logit_scale, unused, = 151,277,313)
    assert n_params(text) == 63_428_096, f"CLIP ViT-B/32 text + projection: got {n_params(text):,}"


def test_state_dict_keys_are_public_names(fx):
    root, _ = fx
    from safetensors import safe_open
    with safe_open(str(root / "clip" / "model.safetensors"), "pt") as f:
        public = {k for k in f.keys() if k.startswith(("vision_model.", "visual_projection."))}
    with torch.device("meta"):
        model = CLIPVisionEncoder.from_config(checkpoint.read_config(root / "clip"))
    assert set(model.state_dict()) == public
    dino_public = set(torch.load(root / "dino" / "pytorch_model.bin", weights_only=True))
    with torch.device("meta"):
        dino = DINOEncoder.from_config(checkpoint.read_config(root / "dino"))
    assert set(dino.state_dict()) == dino_public


def test_save_pretrained_round_trip(fx, tmp_path):
    root, want = fx
    model = DINOEncoder.from_pretrained(root / "dino")
    model.save_pretrained(tmp_path / "dino")
    again = DINOEncoder.from_pretrained(tmp_path / "dino")
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), f"{k} changed in a DINO save/load round trip"
    clip = CLIPVisionEncoder.from_pretrained(root / "clip")
    clip.save_pretrained(tmp_path / "clip")
    again = CLIPVisionEncoder.from_pretrained(tmp_path / "clip")
    for k, v in clip.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), f"{k} changed in a CLIP save/load round trip"


def test_clear_errors():
    with pytest.raises(ValueError, match="hidden_act"):
        ViTConfig.from_vit_config({**DINO_S16, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="model_type"):
        CLIPVisionEncoder.from_config(DINO_S16)
    with pytest.raises(ValueError, match="qkv_bias"):
        ViTConfig.from_vit_config({**DINO_S16, "qkv_bias": False})
    with pytest.raises(checkpoint.CheckpointError, match="weights_download"):
        DINOEncoder.from_pretrained("/nonexistent/dino-vits16")
    tiny = DINOEncoder.from_config({**DINO_S16, "hidden_size": 32, "intermediate_size": 8, "num_attention_heads": 2,
                                    "num_hidden_layers": 1, "image_size": 32})
    with pytest.raises(ValueError, match="preprocess"):
        tiny(torch.zeros(1, 3, 64, 64))  # the size check comes before the patch embedding


# ----------------------------------------------------------------------------------------------------------------
# preprocessor_config.json is followed (fixtures from tests/reference/make_vit_preprocessing_fixtures.py: transformers'
# AutoImageProcessor + ViTModel / CLIPModel on tiny folders whose settings differ from the defaults)

def preprocessing_cases():
    from pathlib import Path
    root = Path(__file__).parent / "fixtures" / "vit" / "preprocessing"
    return json.loads((root / "cases.json").read_text())


@pytest.mark.parametrize("case", list(preprocessing_cases()))
def test_encoders_follow_the_folders_preprocessor_config(fx, case, tmp_path):
    import shutil
    root, _ = fx
    pre_root = root / "preprocessing"
    want = load_file(pre_root / "expected.safetensors")
    spec = preprocessing_cases()[case]
    folder = tmp_path / spec["model"]
    shutil.copytree(pre_root / spec["model"], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(spec["preprocessor_config"]))
    encoder = (DINOEncoder if spec["model"] == "dino" else CLIPVisionEncoder).from_pretrained(folder)
    settings = f"{spec['processor_class']} with {spec['preprocessor_config']}"
    opaque = images(root)[:2]  # (transparent images: see test_preprocessing_matches_reference_processors)
    assert_close(encoder.preprocess(opaque), want[f"{case}_pixel_values"], f"pixel values of {settings}")
    assert_close(encoder.embed(opaque), want[f"{case}_embeds"], f"embeddings after {settings}")


def test_saved_encoder_keeps_its_preprocessing(fx, tmp_path):
    import shutil
    root, _ = fx
    spec = preprocessing_cases()["clip_resize20_crop16_lanczos"]
    shutil.copytree(root / "preprocessing" / "clip", tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(spec["preprocessor_config"]))
    clip = CLIPVisionEncoder.from_pretrained(tmp_path / "clip")
    clip.save_pretrained(tmp_path / "saved")
    assert CLIPVisionEncoder.from_pretrained(tmp_path / "saved").preprocess == clip.preprocess, \
        "save_pretrained must write a preprocessor_config.json that reads back as the same preprocessing"
    dino = DINOEncoder.from_pretrained(root / "dino")  # no file: the defaults, written out explicitly
    dino.save_pretrained(tmp_path / "dino")
    assert DINOEncoder.from_pretrained(tmp_path / "dino").preprocess == dino.preprocess


def test_preprocessor_config_mistakes_are_named(fx, tmp_path):
    import shutil
    root, _ = fx
    shutil.copytree(root / "preprocessing" / "dino", tmp_path / "dino")
    file = tmp_path / "dino" / "preprocessor_config.json"
    for config, message in [({"size": {"height": 24, "width": 24}}, "encoder takes 16x16"),
                            ({"image_processor_type": "SiglipImageProcessor"}, "not supported"),
                            ({"size": {"longest_edge": 16}}, "size=")]:
        file.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            DINOEncoder.from_pretrained(tmp_path / "dino")
