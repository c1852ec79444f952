"""tinybooth.vae.AutoencoderKL against diffusers' AutoencoderKL on tiny random configs (tests/fixtures/vae)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tinybooth.checkpoint import CheckpointError
from tinybooth.vae import PRESETS, AutoencoderKL, DiagonalGaussian, rename_legacy_key

from conftest import FIXTURES

VAE = FIXTURES / "vae"
NAMES = ["sd_like", "legacy", "plain"]
TOL = 1e-4


def load(name):
    return AutoencoderKL.from_pretrained(VAE / name / "vae"), load_file(str(VAE / name / "io.safetensors"))


def check(got, expected, what):
    err = (got - expected).abs().max().item()
    assert got.shape == expected.shape, f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    assert err < TOL, f"{what}: max |tinybooth - diffusers| = {err:.2e} > {TOL}"


@pytest.mark.parametrize("name", NAMES)
def test_encode_matches_reference_posterior(name):
    vae, io = load(name)
    with torch.no_grad():
        post = vae.encode(io["x"])
    check(post.mean, io["mean"], f"{name}: posterior mean of q(z | x)")
    check(post.logvar, io["logvar"], f"{name}: posterior log-variance of q(z | x)")


@pytest.mark.parametrize("name", NAMES)
def test_decode_and_reconstruction_match_reference(name):
    vae, io = load(name)
    with torch.no_grad():
        check(vae.decode(io["z"]), io["decoded"], f"{name}: decode(z)")
        check(vae(io["x"]), io["reconstruction"], f"{name}: decode(mean of q(z | x))")


@pytest.mark.task7_3
def test_posterior_sample_is_reparameterised():
    io = load_file(str(VAE / "sd_like" / "io.safetensors"))
    post = DiagonalGaussian(torch.cat([io["mean"], io["logvar"]], dim=1))
    z = post.sample(noise=io["eps"])
    check(z, io["z"], "z = mean + exp(logvar / 2) * eps (reparameterisation)")
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(post.sample(g1), post.sample(g2)), "the same generator seed must give the same latent"


def test_logvar_is_clamped_like_the_reference():
    post = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)], dim=1))
    assert post.logvar.item() == -30.0, "logvar is clamped to [-30, 20] (exp(-100/2) would underflow)"


def test_legacy_attention_names_load_and_save_with_todays_names(tmp_path):
    raw = load_file(str(VAE / "legacy" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert "encoder.mid_block.attentions.0.query.weight" in raw, "the fixture must use SD 1.5's legacy names"
    vae, _ = load("legacy")
    assert vae.scaling_factor == 0.5, "scaling_factor must come from config.json"
    vae.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert "encoder.mid_block.attentions.0.to_q.weight" in saved and not any(".query." in k for k in saved)
    assert json.loads((tmp_path / "config.json").read_text())["scaling_factor"] == 0.5


@pytest.mark.parametrize("legacy,today", [
    ("decoder.mid_block.attentions.0.query.bias", "decoder.mid_block.attentions.0.to_q.bias"),
    ("encoder.mid_block.attentions.0.proj_attn.weight", "encoder.mid_block.attentions.0.to_out.0.weight"),
    ("encoder.mid_block.resnets.0.conv1.weight", "encoder.mid_block.resnets.0.conv1.weight"),
])
def test_rename_legacy_key(legacy, today):
    assert rename_legacy_key(legacy) == today


@pytest.mark.task7_3
def test_scaling_factor_default_and_latent_helpers():
    cfg = json.loads((VAE / "sd_like" / "vae" / "config.json").read_text())
    assert cfg["scaling_factor"] == 0.18215
    vae, io = load("sd_like")
    with torch.no_grad():
        z0 = vae.latents_from_images(io["x"], generator=torch.Generator().manual_seed(0))
        x_hat = vae.images_from_latents(io["z"] * 0.18215)
    assert z0.shape == (2, 4, 4, 4) and vae.downscale == 4
    check(x_hat, io["decoded"], "images_from_latents(s z) must equal decode(z)")


def test_sd15_config_builds_on_meta_with_published_param_count():
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(PRESETS["SD-1.5"])
    n = sum(p.numel() for p in vae.parameters())
    assert n == 83_653_863, f"SD 1.5's vae/config.json has 83,653,863 params, built {n:,}"
    assert vae.downscale == 8


def test_missing_and_unsupported_are_named(tmp_path):
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKL.from_config(dict(PRESETS["SD-1.5"], down_block_types=["DownBlock2D"] * 4))
    with pytest.raises(ValueError, match="shift_factor"):
        AutoencoderKL.from_config(dict(PRESETS["SD-1.5"], shift_factor=0.1))
    vae, _ = load("plain")
    vae.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    state.pop("decoder.conv_out.bias")
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        AutoencoderKL.from_pretrained(tmp_path)
