"""Reference outputs for tinybooth.cascade, made with diffusers' DeepFloyd IF pipelines' own pieces.

Run with the reference venv (never imported by the tests):
    /work/refvenv/bin/python tests/reference/make_cascade_fixtures.py

Writes tests/fixtures/cascade/
    noising/scheduler_config.json   IF-II's image_noising_scheduler config (DDPM, squaredcos_cap_v2, T = 1000)
    noising.safetensors             x_low, the bilinear (align_corners=True) upscale, fixed noise and, for a few
                                    levels, diffusers' add_noise(upscaled, noise, level) as IFSuperResolutionPipeline
                                    computes it before its denoising loop (default level 250)
    meta.json                       library versions, seeds
"""
import json
import shutil
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
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


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.manual_seed(SEED)
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__}
    meta.update(noising())
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
