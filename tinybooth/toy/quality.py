"""The embedded cascade's quality bar (step 5 of tinybooth.toy.pretrain's recipe), measured with the toy evaluator
on >= 200 samples and written to toy-IF-I/results.json: with guidance, the base model draws the prompted shape,
colour and background >= 90% of the time each, and the cascade's 64 x 64 output is sharper than bilinear upscaling
of the base output (mean |Laplacian|, closer to real renders)."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from tinybooth.cascade import IF_NOISE_LEVEL, upsample
from tinybooth.data import resize_images
from tinybooth.generate import generate, super_resolve
from tinybooth.models import Pipeline
from tinybooth.schedule import DiscreteSchedule
from tinybooth.toy import world
from tinybooth.toy.evaluator import ATTRIBUTES, read
from tinybooth.toy.pretrain import (BASE_RES, MAX_LENGTH, NOISING_SCHEDULER_CONFIG, SCHEDULER_CONFIG, SR_RES,
                                    SR_SCHEDULER_CONFIG)

SR_GUIDANCE, SAMPLE_STEPS = 4.0, 50  # stage-II sampling for the quality bar (IF's stage-II pipeline defaults)
# stage-I samplings the quality bar tries: (guidance, sampler, steps, dynamic thresholding); the best feeds stage II
BASE_SAMPLINGS = ((1.0, "ddim", SAMPLE_STEPS, True), (3.0, "ddim", SAMPLE_STEPS, True),
                  (5.0, "ddim", SAMPLE_STEPS, True),
                  (2.0, "ancestral", 2 * SAMPLE_STEPS, True), (3.0, "ancestral", 2 * SAMPLE_STEPS, True),
                  (5.0, "ancestral", 2 * SAMPLE_STEPS, True), (7.0, "ancestral", 2 * SAMPLE_STEPS, True),
                  (3.0, "ancestral", 2 * SAMPLE_STEPS, False))


@torch.no_grad()
def encode(t5, tokenizer, prompts, device):
    """T5 embeddings [B, L, D] of toy prompts (masked padding, as IF)."""
    ids, mask = tokenizer(prompts, max_length=MAX_LENGTH)
    return t5(ids.to(device), mask.to(device))


def toy_pipeline(base, sr=None, thresholding=True):
    """The toy cascade's U-Nets (in memory) with their schedules, for tinybooth.generate."""
    return Pipeline(family="if", path=None, unet=base,
                    schedule=DiscreteSchedule.from_config(dict(SCHEDULER_CONFIG, thresholding=thresholding)),
                    sr_unet=sr, sr_schedule=DiscreteSchedule.from_config(SR_SCHEDULER_CONFIG),
                    noising_schedule=DiscreteSchedule.from_config(NOISING_SCHEDULER_CONFIG))


def laplacian_energy(x):
    """Mean |Laplacian| of images [B, 3, H, W] (a sharpness figure: blur lowers it), per image [B]."""
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    return F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), k).abs().reshape(x.shape[0], -1).mean(1)


def attribute_accuracy(evaluator, images, specs):
    """Per attribute, the fraction of images the evaluator reads as the spec says."""
    readings = read(evaluator, images)
    return {a: float(np.mean([r[a] == getattr(s, a) for r, s in zip(readings, specs)])) for a in ATTRIBUTES}


def measure_base(args, base, c, c_uncond, evaluator, specs, log):
    """Every stage-I sampling of BASE_SAMPLINGS that args.base_samplings asks for: {key: accuracies}, and the best
    one's (settings, images)."""
    results, best = {}, None
    for guidance, sampler, steps, thresholding in BASE_SAMPLINGS:
        key = f"{sampler}{steps}_cfg{guidance:g}" + ("" if thresholding else "_nothreshold")
        if args.base_samplings != "all" and key not in args.base_samplings.split(","):
            continue  # not measured this time: results.json keeps the row measured before
        x = generate(toy_pipeline(base, thresholding=thresholding), c, c_uncond, steps, guidance, sampler,
                     generator=torch.Generator().manual_seed(args.seed))
        acc = results[key] = attribute_accuracy(evaluator, x, specs)
        log(f"base {key}: {acc}")
        score = min(acc["shape"], acc["colour"], acc["bg_colour"])  # the bar: each >= 0.9
        if best is None or score > best[0]:
            best = (score, dict(guidance=guidance, sampler=sampler, steps=steps, thresholding=thresholding, key=key), x)
    return results, best[1], best[2]


def measure_sr(args, pipe, c, c_uncond, evaluator, specs, real, base_images):
    """The cascade's 64 px output against bilinear upscaling: sharpness, attributes, and the SR model alone on real
    low-res inputs (PSNR to the true 64 px render)."""
    sr = lambda low: super_resolve(pipe, low, c, c_uncond, IF_NOISE_LEVEL, SAMPLE_STEPS, SR_GUIDANCE,  # noqa: E731
                                   generator=torch.Generator().manual_seed(args.seed))
    x64, bilinear = sr(base_images), upsample(base_images, SR_RES)
    sharp = {"real_renders": laplacian_energy(real).mean().item(), "cascade": laplacian_energy(x64).mean().item(),
             "bilinear_of_base": laplacian_energy(bilinear).mean().item(),
             "cascade_sharper_fraction": (laplacian_energy(x64) > laplacian_energy(bilinear)).float().mean().item()}
    low = resize_images(real, BASE_RES)
    sr_real = sr(low)
    mse = lambda a: ((a - real) ** 2).mean().item()  # noqa: E731
    return x64, dict(sharpness_mean_abs_laplacian=sharp, cascade_64px=attribute_accuracy(evaluator, x64, specs),
                     psnr_on_real_low_res={"sr": 10 * math.log10(4 / mse(sr_real)),
                                           "bilinear": 10 * math.log10(4 / mse(upsample(low, SR_RES)))},
                     noise_level=IF_NOISE_LEVEL, guidance=SR_GUIDANCE, sampler="ancestral", steps=SAMPLE_STEPS)


def measure(args, t5, tokenizer, base, sr, evaluator, device, log):
    """The quality bar; returns the dict written to results.json (with 32-image grids under "grids")."""
    rng = np.random.default_rng(args.seed + 7)
    specs = [world.random_spec(rng) for _ in range(args.num_samples)]
    prompts = [world.caption(s) for s in specs]  # full captions: every attribute is asked for
    c = encode(t5, tokenizer, prompts, device)
    c_uncond = encode(t5, tokenizer, [""], device).expand_as(c)
    real = world.to_tensor([world.render(s) for s in specs]).to(device)
    results = {"num_samples": len(specs), "evaluator_on_renders": attribute_accuracy(evaluator, real, specs)}
    results["base"], results["recommended_base_sampling"], base_images = measure_base(args, base, c, c_uncond,
                                                                                     evaluator, specs, log)
    if sr is not None:
        x64, results["sr"] = measure_sr(args, toy_pipeline(base, sr), c, c_uncond, evaluator, specs, real,
                                        base_images)
        log(f"sr: {results['sr']}")
        results["grids"] = dict(base=base_images[:32].cpu(), cascade=x64[:32].cpu())
    return results
