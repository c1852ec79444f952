"""Prompts -> images: the one way tinybooth generates, for train's class images and grids, `sample`, `evaluate`
and the toy model's pretraining.

    c = E(prompt)                                  text embeddings [N, L, D] (T5 for IF and the toy, CLIP for SD)
    x = stage I (IF) or D(latents) (SD)            tinybooth.cascade.sample_base / sample_latent
    x_sr = stage II (IF, optional)                 tinybooth.cascade.sample_super_resolution

Randomness is either one generator for the whole batch (`generator`: a training run's grid and class images) or one
generator per image (`seeds`: image i is drawn with seeds[i], so a single image can be redrawn by its seed, as
`python -m tinybooth.sample` promises). Either way z_T is drawn on the CPU, as diffusers' pipelines do, so a seed
gives the same picture on any device.
"""
from pathlib import Path

import torch
from tqdm import tqdm

from . import cascade, models, samplers
from .cascade import IF_NOISE_LEVEL
from .schedule import DiscreteSchedule

MAX_TEXT_LENGTH = 77  # tokens per prompt, as IF's and SD 1.x's pipelines


# ----------------------------------------------------------------------------------------------------------------
# text

def encode_prompts(pipe, prompts, device="cpu", dtype=None, grad=False, cache_dir=None):
    """{prompt: embedding [1, L, D]}. A frozen encoder's embeddings come from cascade.encode_prompts, which caches
    them on disk and frees the encoder (T5-XXL never sits next to the U-Net); a loaded one (pipe.text_encoder, the
    one being fine-tuned) runs here, with gradients when grad. Both follow the family's conventions (IF lower-cases
    prompts and masks the padding inside T5; SD's CLIP sees no mask)."""
    if pipe.text_encoder is None:
        dtype = torch.float32 if dtype in (None, torch.float16) else dtype  # T5 overflows in fp16
        c, _ = cascade.encode_prompts(prompts, pipe.path, pipe.family, cache_dir=cache_dir,
                                      max_length=MAX_TEXT_LENGTH, device=device, dtype=dtype)
        return {p: c[i:i + 1].to(device) for i, p in enumerate(prompts)}
    with torch.set_grad_enabled(grad):
        c = cascade.run_text_encoder(pipe.tokenizer, pipe.text_encoder, prompts, pipe.family, MAX_TEXT_LENGTH)
    return {p: c[i:i + 1] for i, p in enumerate(prompts)}


def stack(cache, prompts):
    """Embeddings of prompts from an encode_prompts dict, [N, L, D], and the empty prompt's (guidance's
    unconditional branch), [N, L, D]."""
    c = torch.cat([cache[p] for p in prompts])
    return c, cache[""].expand_as(c)


# ----------------------------------------------------------------------------------------------------------------
# images

def pick_sampler(schedule, family, asked=None):
    """(sampler, where the choice came from): the one asked for, else the one the pipeline's
    scheduler_config.json names (IF: DDPMScheduler -> ancestral, SD 1.x: PNDMScheduler -> pndm), else the
    family's default. Never another one silently."""
    if asked is not None:
        return asked, "asked for"
    if "_class_name" in schedule.config:
        return samplers.sampler_from_config(schedule.config), "from scheduler_config.json"
    return models.FAMILY_DEFAULTS[family]["sampler"], f"the {family} default"


def _each(fn, n, generator, seeds, desc, progress):
    """fn(rows, generator) over the whole batch with one generator, or row by row with generator(seeds[i])."""
    if seeds is None:
        return fn(slice(None), generator if generator is not None else torch.Generator())
    rows = tqdm(range(n), desc=desc, disable=not progress or n < 2)
    return torch.cat([fn(slice(i, i + 1), torch.Generator().manual_seed(int(seeds[i]))) for i in rows])


@torch.no_grad()
def generate(pipe, c, c_uncond, steps, guidance, sampler="ancestral", eta=0.0, generator=None, seeds=None,
             progress=False, timesteps=None):
    """Images [N, 3, H, W] in [-1, 1] from the base model for text embeddings c [N, L, D] (c_uncond: the empty
    prompt's, [N or 1, L, D]): IF stage I, or SD's latents decoded by the VAE. sampler: one of samplers.SAMPLERS;
    timesteps: a list of steps or an IF grid name ("smart27") instead of the step count."""
    def draw(rows, g):
        c_rows, u_rows = c[rows], c_uncond[rows] if c_uncond.shape[0] > 1 else c_uncond
        if pipe.vae is not None:
            return cascade.sample_latent(pipe.unet, pipe.vae, pipe.schedule, c_rows, u_rows, guidance, steps,
                                         sampler, eta, generator=g, timesteps=timesteps)
        return cascade.sample_base(pipe.unet, pipe.schedule, c_rows, u_rows, guidance, steps, sampler, eta,
                                   generator=g, timesteps=timesteps)
    return _each(draw, c.shape[0], generator, seeds, "stage I", progress).float().clamp(-1, 1)


@torch.no_grad()
def super_resolve(pipe, x_low, c, c_uncond, level, steps, guidance=4.0, sampler="ancestral", eta=0.0,
                  generator=None, seeds=None, progress=False, timesteps=None):
    """IF stage II on base-model images x_low [N, 3, h, w]: [N, 3, H, W] in [-1, 1], noise augmentation at IF
    step `level` (tinybooth.cascade.noise_augment)."""
    def draw(rows, g):
        u_rows = c_uncond[rows] if c_uncond.shape[0] > 1 else c_uncond
        return cascade.sample_super_resolution(pipe.sr_unet, pipe.sr_schedule, pipe.noising_schedule, x_low[rows],
                                               c[rows], u_rows, noise_level=level, guidance=guidance,
                                               num_steps=steps, sampler=sampler, eta=eta, generator=g,
                                               timesteps=timesteps)
    return _each(draw, c.shape[0], generator, seeds, "stage II", progress).float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# from directories, one stage in memory at a time (python -m tinybooth.sample, tinybooth.evaluation)

def text_to_image(model, prompts, sr_model=None, num_images=1, seed=0, steps=None, guidance=None, sampler=None,
                  eta=0.0, sr_steps=None, sr_guidance=None, sr_noise_level=IF_NOISE_LEVEL, device="cpu",
                  dtype=torch.float32, cache_dir=None, text_device=None, progress=True, timesteps=None,
                  sr_timesteps=None):
    """Images for every (prompt, image) pair, read from pipeline directories: {"images": [P * N, 3, H, W] in
    [-1, 1], "stage1": the stage-I images or None, "settings": what ran}. Image i of a prompt uses seed + i.
    The text encoder runs first and is freed (text_device: where, e.g. "cpu" when T5-XXL does not fit the GPU);
    then each U-Net is loaded, used and freed in turn. Unset settings take the family's defaults; the sampler is the
    one the scheduler config names (pick_sampler). timesteps / sr_timesteps: lists or IF grid names."""
    family, d = models.defaults_for(model)
    steps, guidance = _pick(steps, d["steps"]), _pick(guidance, d["guidance"])
    sr_steps, sr_guidance = _pick(sr_steps, d["sr_sample_steps"]), _pick(sr_guidance, d["sr_guidance"])
    models.require(model, ["unet/config.json", "scheduler/scheduler_config.json"]
                   + (["vae/config.json"] if family == "sd" else []))
    schedule = DiscreteSchedule.from_pretrained(Path(model) / "scheduler")
    sampler, sampler_from = pick_sampler(schedule, family, sampler)
    seeds = [seed + i for p in prompts for i in range(num_images)]
    settings = dict(model=str(model), sr_model=str(sr_model) if sr_model else None, family=family, prompts=prompts,
                    num_images=num_images, seeds=seeds[:num_images], steps=steps, guidance=guidance,
                    sampler=sampler, sampler_from=sampler_from, timesteps=timesteps, eta=eta, device=str(device),
                    dtype=str(dtype).replace("torch.", ""))
    pipe = models.Pipeline(family="sd" if family == "sd" else "if", path=Path(model), unet=None, schedule=schedule)
    text_dtype = torch.float32 if dtype == torch.float16 else dtype   # T5 overflows in fp16
    cache = encode_prompts(pipe, list(dict.fromkeys(prompts + [""])), text_device or device, text_dtype,
                           cache_dir=cache_dir)
    c, c_uncond = stack(cache, [p for p in prompts for _ in range(num_images)])   # [P N, L, D] each
    pipe.unet = models.load_unet(Path(model) / "unet", dtype, device)
    if family == "sd":   # the VAE decodes in fp32 even from fp16 files, as diffusers upcasts it (force_upcast)
        pipe.vae = models.AutoencoderKL.from_pretrained(Path(model) / "vae", dtype=torch.float32, device=device,
                                                        variant=cascade.stored_variant(Path(model) / "vae",
                                                                                       models.WEIGHTS_STEM))
    x = generate(pipe, c, c_uncond, steps, guidance, sampler, eta, seeds=seeds, progress=progress,
                 timesteps=timesteps)
    pipe.unet = pipe.vae = None
    models.empty_cache()
    if sr_model is None:
        return dict(images=x, stage1=None, settings=settings)
    models.load_super_resolution(pipe, sr_model, device, dtype)
    T = pipe.noising_schedule.num_train_timesteps
    sr_sampler, _ = pick_sampler(pipe.sr_schedule, "if", None if sampler_from != "asked for" else sampler)
    settings.update(sr_steps=sr_steps, sr_guidance=sr_guidance, sr_sampler=sr_sampler, sr_timesteps=sr_timesteps,
                    sr_noise_level=sr_noise_level,
                    sr_noise_level_continuous=cascade.continuous_from_level(sr_noise_level, T))
    images = super_resolve(pipe, x, c, c_uncond, sr_noise_level, sr_steps, sr_guidance, sr_sampler, eta, seeds=seeds,
                           progress=progress, timesteps=sr_timesteps)
    pipe.sr_unet = None
    models.empty_cache()
    return dict(images=images, stage1=x, settings=settings)


def _pick(value, default):
    return default if value is None else value
