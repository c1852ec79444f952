"""python -m tinybooth.sample: family detection, the grid and its metadata, seeds, missing weights.

The tiny random pipelines of tests/fixtures/cascade (IF stage I 8 px, stage II 16 px, SD with a VAE) stand in for the
public ones; the text side is replaced by fixed embeddings here (tests/test_cascade.py covers encode_prompts).
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tinybooth import cascade, sample

from conftest import FIXTURES

PIPES = FIXTURES / "cascade"


@pytest.fixture
def fake_text(monkeypatch):
    """encode_prompts -> a fixed random embedding per text (width 16, 5 tokens), counting the calls."""
    calls = []

    def encode(texts, model_dir, family, **kw):
        calls.append((list(texts), family))
        c = torch.stack([torch.randn(5, 16, generator=torch.Generator().manual_seed(len(t))) for t in texts])
        return c, torch.ones(len(texts), 5, dtype=torch.long)
    monkeypatch.setattr(cascade, "encode_prompts", encode)
    return calls


def read_png(path):
    img = Image.open(path)
    return np.asarray(img.convert("RGB")), json.loads(img.text["tinybooth"])


@pytest.mark.parametrize("name,family", [("if1", "if"), ("if2", "sr"), ("sd", "sd")])
def test_detect_family_from_model_index_and_from_folders(name, family, tmp_path):
    assert sample.detect_family(PIPES / name) == family
    bare = tmp_path / name
    shutil.copytree(PIPES / name, bare, ignore=shutil.ignore_patterns("model_index.json"))
    assert sample.detect_family(bare) == family, "without model_index.json the subfolders decide"


@pytest.mark.parametrize("text,level", [("250", 250), ("0", 0)] + [
    pytest.param(t, k, marks=pytest.mark.task7_2) for t, k in (("0.25", 250), ("1e-3", 1), ("1e-5", 0))])
def test_parse_noise_level_accepts_steps_and_continuous_levels(text, level):
    assert sample.parse_noise_level(text) == level


def test_if_cascade_cli_writes_grid_with_settings_and_is_seeded(fake_text, tmp_path):
    args = ["--model", str(PIPES / "if1"), "--sr-model", str(PIPES / "if2"), "--prompt", "a dog", "--prompt",
            "a cat on a mat", "--num-images", "2", "--steps", "1", "--sr-steps", "1", "--seed", "5",
            "--sr-noise-level", "100"]
    assert sample.main(args + ["--out", str(tmp_path / "a.png")]) == 0
    pixels, settings = read_png(tmp_path / "a.png")
    assert pixels.shape == (2 * 16 + 2, 2 * 16 + 2, 3), "2 prompts x 2 images of stage II's 16 px, 2 px gaps"
    assert settings["seeds"] == [5, 6] and settings["sr_noise_level"] == 100 and settings["family"] == "if"
    assert settings["prompts"] == ["a dog", "a cat on a mat"] and settings["sr_noise_level_continuous"] == 0.1
    stage1, _ = read_png(tmp_path / "a_stage1.png")
    assert stage1.shape == (2 * 8 + 2, 2 * 8 + 2, 3), "the stage-I grid (8 px) is written next to it"
    assert fake_text[0] == (["a dog", "a cat on a mat", ""], "if"), "prompts + the empty prompt, encoded once"

    # determinism with a seed: image 1 of a prompt (seed 6) is redrawn, identical, by --seed 6 --num-images 1
    one = args[:args.index("--num-images")] + ["--num-images", "1", "--steps", "1", "--sr-steps", "1", "--seed", "6",
                                                "--sr-noise-level", "100", "--out", str(tmp_path / "c.png")]
    assert sample.main(one) == 0
    c = read_png(tmp_path / "c.png")[0]
    assert np.array_equal(c[:16], pixels[:16, 18:]), "image i of the grid must be reproducible from seed + i"


def test_sd_cli(fake_text, tmp_path):
    out = tmp_path / "sd.png"
    assert sample.main(["--model", str(PIPES / "sd"), "--prompt", "a dog", "--steps", "2", "--out", str(out)]) == 0
    pixels, settings = read_png(out)
    assert pixels.shape == (8, 8, 3), "SD: 4x4 latents decoded by a x2 VAE"
    assert settings["sampler"] == "ddim" and settings["family"] == "sd"
    assert fake_text[0][1] == "sd"


def test_missing_weights_name_the_download_command(tmp_path, capsys):
    missing = tmp_path / "IF-I-M-v1.0"
    assert sample.main(["--model", str(missing), "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "python weights_download.py IF-I-M-v1.0 --dir" in err, err
    incomplete = tmp_path / "IF-I-M-v1.0"
    shutil.copytree(PIPES / "if1", incomplete, ignore=shutil.ignore_patterns("config.json"))
    assert sample.main(["--model", str(incomplete), "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "unet/config.json missing" in err and "weights_download.py IF-I-M-v1.0" in err, err


def test_stage2_model_as_model_is_refused(tmp_path, capsys):
    assert sample.main(["--model", str(PIPES / "if2"), "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 2
    assert "--sr-model" in capsys.readouterr().err


def test_grid_layout_and_metadata(tmp_path):
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0, 0.5)])
    path = sample.save_grid(images, 2, tmp_path / "g.png", {"seeds": [1, 2]})
    pixels, meta = read_png(path)
    assert pixels.shape == (10, 10, 3) and meta == {"seeds": [1, 2]}
    assert pixels[0, 0, 0] == 0 and pixels[0, 6, 0] == 128 and pixels[6, 0, 0] == 255 and pixels[4, 4, 0] == 255


def test_fp16_only_download_is_found(fake_text, tmp_path):
    """weights_download.py --variant fp16 leaves only diffusion_pytorch_model.fp16.safetensors: it must load."""
    model = tmp_path / "if1"
    shutil.copytree(PIPES / "if1", model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert cascade.stored_variant(model / "unet", "diffusion_pytorch_model") == "fp16"
    out = sample.generate(model, ["a dog"], steps=1, progress=False)
    assert out["images"].shape == (1, 3, 8, 8)


def test_default_model_is_the_embedded_toy_cascade(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYBOOTH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "toy.png"
    assert sample.main(["--prompt", "a big red star on a blue background", "--steps", "2", "--sr-steps", "2",
                        "--out", str(out)]) == 0
    pixels, settings = read_png(out)
    assert pixels.shape == (64, 64, 3) and read_png(tmp_path / "toy_stage1.png")[0].shape == (32, 32, 3), \
        "the toy cascade: 32 px base, 32 -> 64 SR"
    assert settings["model"].endswith("toy-IF-I") and settings["sr_model"].endswith("toy-IF-II")
    assert settings["guidance"] == 5.0, "the toy's own default guidance (its measured best)"
