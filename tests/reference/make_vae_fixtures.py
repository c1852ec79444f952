"""Reference outputs for tinybooth.vae, made with diffusers' AutoencoderKL on tiny random configs.

Run with the reference venv (never imported by the tests):
    /work/refvenv/bin/python tests/reference/make_vae_fixtures.py

Writes tests/fixtures/vae/<name>/ with
    vae/config.json + vae/diffusion_pytorch_model.safetensors   (diffusers' save_pretrained: the public layout;
                                                                 for "legacy" the mid-block attention keys are then
                                                                 renamed to query/key/value/proj_attn, as in SD 1.5)
    io.safetensors: image x, posterior mean and logvar, a fixed noise eps, the latent z = mean + std eps,
                    decode(z), and the reconstruction decode(mean)
and tests/fixtures/vae/meta.json (library versions, seeds).
"""
import json
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "vae"
SEED = 0
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

CONFIGS = {
    # SD-like: three levels (8x smaller latents would need four; 4x keeps the fixture small), attention in the middle
    "sd_like": dict(block_out_channels=[8, 16, 16], layers_per_block=2, latent_channels=4, norm_num_groups=4,
                    sample_size=16, down_block_types=["DownEncoderBlock2D"] * 3,
                    up_block_types=["UpDecoderBlock2D"] * 3),
    # the same layout saved with SD 1.5's legacy attention key names, a non-default scaling factor, 1 layer
    "legacy": dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                   sample_size=8, scaling_factor=0.5, down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2),
    # no mid-block attention, no quant convs (configs that turn them off exist)
    "plain": dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=2, norm_num_groups=2,
                  sample_size=8, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
}


def legacy_names(path):
    file = path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    renamed = {}
    for k, v in state.items():
        for new, old in LEGACY.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(file), metadata={"format": "pt"})


def make(name, config):
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**config).eval()
    with torch.no_grad():  # GroupNorms start at weight 1, bias 0: perturb them so a mix-up of norms shows
        for n, p in vae.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    d = OUT / name
    vae.save_pretrained(d / "vae", safe_serialization=True)
    if name == "legacy":
        legacy_names(d / "vae")
    g = torch.Generator().manual_seed(SEED + 1)
    size = config["sample_size"]
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=g)
        z = post.mean + post.std * eps
        io = dict(x=x, mean=post.mean, logvar=post.logvar, eps=eps, z=z, decoded=vae.decode(z).sample,
                  reconstruction=vae(x).sample)
    save_file({k: v.contiguous() for k, v in io.items()}, str(d / "io.safetensors"))
    return dict(config=config, seed=SEED, input_seed=SEED + 1)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "configs": {}}
    for name, config in CONFIGS.items():
        meta["configs"][name] = make(name, config)
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
