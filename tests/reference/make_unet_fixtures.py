"""Reference outputs for tinybooth.unet, made with diffusers' UNet2DConditionModel on tiny random configs.

Run with the reference venv (never imported by the tests):
    /work/refvenv/bin/python tests/reference/make_unet_fixtures.py

Writes tests/fixtures/unet/<name>/ with
    unet/config.json + unet/diffusion_pytorch_model.safetensors   (diffusers' save_pretrained: the public layout)
    unet/diffusion_pytorch_model.fp16.safetensors                 (only for "if1": the fp16 variant)
    io.safetensors: the inputs, the output of the model, and the gradients of the loss sum(out * weight) w.r.t.
                    sample and encoder_hidden_states
and tests/fixtures/unet/meta.json (library versions, seeds, what each config exercises).
"""
import copy
import json
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "unet"
SEED = 0

IF_COMMON = dict(act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=4,
                 cross_attention_norm="group_norm", encoder_hid_dim=16, encoder_hid_dim_type="text_proj",
                 cross_attention_dim=32, norm_num_groups=4, resnet_time_scale_shift="scale_shift",
                 upcast_attention=True, mid_block_type="UNetMidBlock2DSimpleCrossAttn")
IF_DOWN = ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]
IF_UP = ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"]
CONFIGS = {
    # IF stage I: resampling ResBlocks, added-KV attention (8-wide heads), pooled text added to the time embedding,
    # padded text tokens masked, 6 output channels (eps + variance)
    "if1": dict(IF_COMMON, in_channels=3, out_channels=6, sample_size=8, block_out_channels=[8, 16, 16],
                layers_per_block=1, attention_head_dim=8,
                down_block_types=IF_DOWN, up_block_types=IF_UP),
    # IF stage II: 6 input channels, noise level as a class embedding, skip_time_act, 1/sqrt(1/2) output scales,
    # gelu on the time embedding, its own width, per-block layers and only_cross_attention
    "if2": dict(IF_COMMON, in_channels=6, out_channels=6, sample_size=8, block_out_channels=[8, 16, 16],
                layers_per_block=[1, 2, 1], attention_head_dim=8, class_embed_type="timestep",
                mid_block_scale_factor=1.4142135623730951, resnet_out_scale_factor=1.4142135623730951,
                resnet_skip_time_act=True, time_embedding_act_fn="gelu", time_embedding_dim=24,
                only_cross_attention=[False, True, False],
                down_block_types=IF_DOWN, up_block_types=IF_UP),
    # SD 1.x: transformer blocks with 1x1-conv projections, strided-conv resampling, 10x10 input (odd size at the
    # bottom: the upsampler follows the skip's size), text mask
    "sd_conv": dict(in_channels=4, out_channels=4, sample_size=10, block_out_channels=[8, 8, 16],
                    layers_per_block=1, attention_head_dim=2, cross_attention_dim=16, norm_num_groups=4,
                    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    # SD 2.x-style: linear projections, per-block head counts, two transformer layers per attention
    "sd_linear": dict(in_channels=4, out_channels=4, sample_size=8, block_out_channels=[8, 16],
                      layers_per_block=1, attention_head_dim=[2, 4], cross_attention_dim=16, norm_num_groups=4,
                      use_linear_projection=True, transformer_layers_per_block=2,
                      down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
}
INPUTS = {  # batch, spatial size, text length, mask?, timesteps as a scalar?
    "if1": dict(B=2, H=8, L=5, mask=True, scalar_t=False),
    "if2": dict(B=2, H=8, L=5, mask=False, scalar_t=False),
    "sd_conv": dict(B=2, H=10, L=6, mask=True, scalar_t=True),
    "sd_linear": dict(B=2, H=8, L=6, mask=False, scalar_t=False),
}


def make(name, config, spec, seed):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():   # default inits leave some layers at exactly zero; randomise every tensor a little
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d / "unet", safe_serialization=True)
    if name == "if1":
        copy.deepcopy(model).to(torch.float16).save_pretrained(d / "unet", variant="fp16", safe_serialization=True)

    B, H, L = spec["B"], spec["H"], spec["L"]
    text_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    sample = torch.randn(B, config["in_channels"], H, H, requires_grad=True)
    text = torch.randn(B, L, text_dim, requires_grad=True)
    t = torch.tensor(417) if spec["scalar_t"] else torch.tensor([999, 3])
    io = {"sample": sample.detach().clone(), "timesteps": t, "encoder_hidden_states": text.detach().clone()}
    kwargs = {}
    if spec["mask"]:
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, 3:] = 0   # second prompt: last tokens are padding
        io["encoder_attention_mask"] = kwargs["encoder_attention_mask"] = mask
    if config.get("class_embed_type") == "timestep":
        io["noise_level"] = kwargs["class_labels"] = torch.tensor([250, 20])
    out = model(sample, t, text, **kwargs).sample
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    io.update(weight=weight, out=out.detach(), grad_sample=sample.grad, grad_encoder_hidden_states=text.grad)
    save_file({k: v.contiguous() for k, v in io.items()}, str(d / "io.safetensors"))
    return {"seed": seed, "params": sum(p.numel() for p in model.parameters()), "inputs": spec}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__,
            "loss": "sum(out * weight); gradients w.r.t. sample and encoder_hidden_states",
            "configs": {}}
    for i, (name, config) in enumerate(CONFIGS.items()):
        meta["configs"][name] = make(name, config, INPUTS[name], SEED + i)
        print(name, meta["configs"][name]["params"], "params")
    with open(OUT / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main()
