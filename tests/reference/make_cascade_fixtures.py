"""Reference outputs for tinybooth.cascade, made with diffusers' DeepFloyd IF pipelines' own pieces.

Run with the reference venv (never imported by the tests):
    /work/refvenv/bin/python tests/reference/make_cascade_fixtures.py

Writes tests/fixtures/cascade/
    noising/scheduler_config.json   IF-II's image_noising_scheduler config (DDPM, squaredcos_cap_v2, T = 1000)
    noising.safetensors             x_low, the bilinear (align_corners=True) upscale, fixed noise and, for a few
                                    levels, diffusers' add_noise(upscaled, noise, level) as IFSuperResolutionPipeline
                                    computes it before its denoising loop (default level 250)
    if1/, if2/, sd/                 tiny random U-Nets (and for sd a VAE) in the public pipeline layout
                                    (unet/, vae/, scheduler/, image_noising_scheduler/, model_index.json)
    pipelines.safetensors           text embeddings given to the pipelines and their outputs:
                                    IFPipeline (stage I, DDPM ancestral and DDIM), IFSuperResolutionPipeline
                                    (stage II on stage I's output, noise levels 250 and 100), StableDiffusionPipeline
                                    (DDIM and DDPM), all with seeded generators and output_type "pt"
    meta.json                       library versions, seeds, steps and guidance of every run
"""
import json
import shutil
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, IFPipeline, IFSuperResolutionPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "cascade"
SEED = 0
LEVELS = [1, 100, 250, 999]

# IF-II-{M,L}-v1.0/image_noising_scheduler/scheduler_config.json as published
IMAGE_NOISING_SCHEDULER = dict(beta_end=0.02, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                               clip_sample=True, clip_sample_range=1.0, num_train_timesteps=1000,
                               prediction_type="epsilon", sample_max_value=1.0, thresholding=False,
                               variance_type="fixed_small", dynamic_thresholding_ratio=0.95)


def noising():
    sched = DDPMScheduler(**IMAGE_NOISING_SCHEDULER)
    sched.save_config(OUT / "noising")
    g = torch.Generator().manual_seed(SEED)
    x_low = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    # the lines of IFSuperResolutionPipeline.__call__, step 7
    upscaled = F.interpolate(x_low, (16, 16), mode="bilinear", align_corners=True)
    noise = torch.randn(upscaled.shape, generator=g)
    out = {"x_low": x_low, "upscaled": upscaled, "noise": noise}
    for level in LEVELS:
        noise_level = torch.tensor([level] * upscaled.shape[0])
        out[f"augmented_{level}"] = sched.add_noise(upscaled, noise, timesteps=noise_level)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "noising.safetensors"))
    return {"noising": dict(levels=LEVELS, low_res=8, high_res=16, seed=SEED,
                            source="diffusers IFSuperResolutionPipeline: F.interpolate(bilinear, align_corners=True)"
                                   " then image_noising_scheduler.add_noise")}


# IF-I-{M,L,XL}-v1.0/scheduler/scheduler_config.json and IF-II's scheduler (sample_max_value 1.0)
IF_SCHEDULER = dict(beta_end=0.02, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, clip_sample=True,
                    clip_sample_range=1.0, dynamic_thresholding_ratio=0.95, num_train_timesteps=1000,
                    prediction_type="epsilon", sample_max_value=1.5, thresholding=True, variance_type="learned_range")
IF2_SCHEDULER = dict(IF_SCHEDULER, sample_max_value=1.0)
# runwayml/stable-diffusion-v1-5/scheduler/scheduler_config.json
SD_SCHEDULER = dict(_class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                    trained_betas=None, clip_sample=False)

IF_UNET = dict(act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=2,
               cross_attention_norm="group_norm", encoder_hid_dim=16, encoder_hid_dim_type="text_proj",
               cross_attention_dim=32, norm_num_groups=4, resnet_time_scale_shift="scale_shift",
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=[8, 16], attention_head_dim=8,
               out_channels=6, down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
               up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"])
UNETS = {
    "if1": dict(IF_UNET, in_channels=3, sample_size=8, layers_per_block=1),
    "if2": dict(IF_UNET, in_channels=6, sample_size=16, layers_per_block=[1, 1], class_embed_type="timestep",
                mid_block_scale_factor=1.4142135623730951, resnet_out_scale_factor=1.4142135623730951,
                resnet_skip_time_act=True, time_embedding_act_fn="gelu", time_embedding_dim=24),
    "sd": dict(in_channels=4, out_channels=4, sample_size=4, block_out_channels=[8, 16], layers_per_block=1,
               attention_head_dim=2, cross_attention_dim=16, norm_num_groups=4,
               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
}
SD_VAE = dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8,
              down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
B, L, D = 2, 5, 16  # two prompts, 5 text tokens of width 16 (T5 / CLIP stand-ins)


def save_model_index(d, class_name, parts):
    index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__}
    index.update({k: list(v) for k, v in parts.items()})
    (d / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def pipelines():
    g = torch.Generator().manual_seed(SEED + 1)
    embeds = {"c": torch.randn(B, L, D, generator=g), "c_uncond": torch.randn(B, L, D, generator=g)}
    unets = {}
    for name, config in UNETS.items():
        torch.manual_seed(SEED + 10 + len(unets))
        unets[name] = UNet2DConditionModel(**config).eval()
        unets[name].save_pretrained(OUT / name / "unet")
    torch.manual_seed(SEED + 20)
    vae = AutoencoderKL(**SD_VAE).eval()
    vae.save_pretrained(OUT / "sd" / "vae")
    for name, config in (("if1", IF_SCHEDULER), ("if2", IF2_SCHEDULER)):
        DDPMScheduler(**config).save_config(OUT / name / "scheduler")
    DDPMScheduler(**IMAGE_NOISING_SCHEDULER).save_config(OUT / "if2" / "image_noising_scheduler")
    (OUT / "sd" / "scheduler").mkdir()
    (OUT / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER, indent=2))
    save_model_index(OUT / "if1", "IFPipeline", {"unet": ("diffusers", "UNet2DConditionModel"),
                                                 "scheduler": ("diffusers", "DDPMScheduler")})
    save_model_index(OUT / "if2", "IFSuperResolutionPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel"), "scheduler": ("diffusers", "DDPMScheduler"),
        "image_noising_scheduler": ("diffusers", "DDPMScheduler")})
    save_model_index(OUT / "sd", "StableDiffusionPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "PNDMScheduler")})

    no_extras = dict(tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None,
                     watermarker=None, requires_safety_checker=False)
    out, runs = dict(embeds), {}
    for sampler, cls in (("ancestral", DDPMScheduler), ("ddim", DDIMScheduler)):
        # DDIM ignores the learned variance; the pipeline splits it off only if the config says so
        config = IF_SCHEDULER if sampler == "ancestral" else dict(IF_SCHEDULER, variance_type="fixed_small")
        pipe = IFPipeline(unet=unets["if1"], scheduler=cls.from_config(config), **no_extras)
        run = dict(num_inference_steps=5, guidance_scale=7.0, seed=SEED + 2)
        out[f"if1_{sampler}"] = pipe(prompt_embeds=embeds["c"], negative_prompt_embeds=embeds["c_uncond"],
                                     generator=torch.Generator().manual_seed(run["seed"]), output_type="pt",
                                     num_inference_steps=run["num_inference_steps"],
                                     guidance_scale=run["guidance_scale"]).images
        runs[f"if1_{sampler}"] = run
    for level in (250, 100):
        pipe = IFSuperResolutionPipeline(unet=unets["if2"], scheduler=DDPMScheduler(**IF2_SCHEDULER),
                                         image_noising_scheduler=DDPMScheduler(**IMAGE_NOISING_SCHEDULER), **no_extras)
        run = dict(num_inference_steps=4, guidance_scale=4.0, seed=SEED + 3, noise_level=level)
        out[f"if2_level{level}"] = pipe(image=out["if1_ancestral"], prompt_embeds=embeds["c"],
                                        negative_prompt_embeds=embeds["c_uncond"], noise_level=level,
                                        generator=torch.Generator().manual_seed(run["seed"]), output_type="pt",
                                        num_inference_steps=run["num_inference_steps"],
                                        guidance_scale=run["guidance_scale"]).images
        runs[f"if2_level{level}"] = run
    for sampler, cls in (("ddim", DDIMScheduler), ("ancestral", DDPMScheduler)):
        pipe = StableDiffusionPipeline(vae=vae, unet=unets["sd"], scheduler=cls.from_config(SD_SCHEDULER),
                                       tokenizer=None, text_encoder=None, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        run = dict(num_inference_steps=4, guidance_scale=7.5, seed=SEED + 4)
        out[f"sd_{sampler}"] = pipe(prompt_embeds=embeds["c"], negative_prompt_embeds=embeds["c_uncond"],
                                    generator=torch.Generator().manual_seed(run["seed"]), output_type="pt",
                                    num_inference_steps=run["num_inference_steps"],
                                    guidance_scale=run["guidance_scale"]).images
        runs[f"sd_{sampler}"] = run
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "pipelines.safetensors"))
    return {"pipelines": runs, "unets": UNETS, "sd_vae": SD_VAE}


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.manual_seed(SEED)
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__}
    meta.update(noising())
    with torch.no_grad():
        meta.update(pipelines())
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
