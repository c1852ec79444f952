"""DreamBooth, the method (Ruiz et al., CVPR 2023, Sec. 4), read beside the paper.

Given 3-5 photos x of a subject and its class noun, bind a rare identifier [V] to the subject inside a pretrained
text-to-image model x_hat_theta, so that "a [V] dog on the beach" draws *that* dog on a beach:

  4.1  the identifier: a rare token with a weak prior (`choose_identifier`); instance prompt c = "a [V] dog",
       class prompt c_pr = "a dog" (`subject_prompt`).
  4.2  class-specific prior preservation: the frozen model draws x_pr = x_hat(z_t1, c_pr) (`generate_class_images`)
       and fine-tuning minimises eq. (2) (`dreambooth_loss`):

        E[ w_t ||x_hat(alpha_t x + sigma_t eps, c) - x||^2 + lambda w_t' ||x_hat(alpha_t' x_pr + sigma_t' eps', c_pr) - x_pr||^2 ]

       lambda = 1 in the paper; without the second term the model forgets what a generic member of the class
       looks like ("language drift") and draws less varied ones.
  4.3  the super-resolution stage is fine-tuned on (low-res, high-res) pairs of the subject photos, its low-res
       input noise-augmented at a *low* level (1e-5 rather than 1e-3: the subject's fine detail survives;
       `sr_conditioning`, `sr_loss`).

Every function takes models, tensors, numbers and paths; `tinybooth.experiment` wires them into a run on disk.
"""
import math
from pathlib import Path

import torch

from . import cascade, data, rare_tokens
from .generate import generate, stack
from .loss import diffusion_loss, prior_preservation_loss

# sample-grid prompts: the subject recontextualised and with changed properties, then the bare class prompt (does
# "a star" still draw stars in general, or only the subject?)
TOY_TEMPLATES = ("a {}", "a {} on a green background", "a {} on a striped yellow background",
                 "a big {} on a dotted purple background", "a small {} on a checkered red background")
PUBLIC_TEMPLATES = ("a {}", "a {} in the jungle", "a {} on the beach", "a {} on top of a wooden floor", "a red {}")


# ----------------------------------------------------------------------------------------------------------------
# 4.1 the identifier and the prompts

def choose_identifier(tokenizer, seed=0, lower_case=False):
    """[V] by the paper's rare-token search (Sec. 4.1) with the run's seed: the first candidate (ids 5000-10000,
    decoded to <= 3 characters) that stays one token inside a prompt, is no common word (a word brings its meaning
    with it; tinybooth.rare_tokens says which candidates it refused and why) and, with lower_case (IF, whose
    pipeline lower-cases every prompt), is already lower case, so the token trained is the token later asked for."""
    return rare_tokens.find_identifier(tokenizer, seed=seed, lower_case=lower_case)


def subject_prompt(identifier, class_noun, template="a {}"):
    """c: 'a sks dog'; with an empty class noun (the paper's "no class noun" ablation) 'a sks'."""
    return " ".join(template.format(f"{identifier} {class_noun}").split())


def class_prompt(class_noun):
    """c_pr: 'a dog'."""
    return f"a {class_noun}".strip()


def grid_prompts(identifier, class_noun, templates):
    """The sample grid's prompts: each template with 'a [V] [class noun]', then the bare class prompt."""
    return [subject_prompt(identifier, class_noun, t) for t in templates] + [class_prompt(class_noun)]


# ----------------------------------------------------------------------------------------------------------------
# 4.2 class images x_pr from the frozen model

def generate_class_images(pipe, cache, prompt, folder, n, batch_size, seed, steps, sampler, guidance):
    """Draw the prior batch x_pr = samples of c_pr from the frozen model into folder as numbered PNGs (steps: a step
    count, or a grid of steps / an IF grid name).

    Batch b holds images b*B .. b*B+B-1 and is drawn with seed (seed * 100003 + b), so a batch is the same whether
    the run was interrupted or not: finished batches are skipped, a partly written one is drawn again (PNGs are
    written atomically). cache: {prompt: embedding} holding prompt and "". Returns the n paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(n)]
    batches = [paths[b * batch_size:(b + 1) * batch_size] for b in range(math.ceil(n / batch_size))]
    todo = [b for b, chunk in enumerate(batches) if not all(p.exists() for p in chunk)]
    if not todo:
        print(f"class images: {n} cached in {folder}")
        return paths
    print(f"class images: drawing {sum(len(batches[b]) for b in todo)} of {n} samples of '{prompt}' ({sampler}, "
          f"{steps} steps) into {folder}")
    from tqdm.auto import tqdm
    for b in tqdm(todo, desc="class images", unit="batch"):
        c, c_uncond = stack(cache, [prompt] * len(batches[b]))
        num_steps, grid = steps_and_grid(steps)
        images = generate(pipe, c, c_uncond, num_steps, guidance, sampler, timesteps=grid,
                          generator=torch.Generator().manual_seed(seed * 100003 + b))
        for x, p in zip(images, batches[b]):
            data.save_image(x, p)
    return paths


def steps_and_grid(steps):
    """A setting that is a step count or a grid (a list of steps, an IF grid name) -> (steps, timesteps)."""
    return (steps, None) if isinstance(steps, int) else (None, steps)


# ----------------------------------------------------------------------------------------------------------------
# 4.2 eq. (2), the prior-preservation objective

def denoising_losses(unet, schedule, x, c, generator, x_cond=None, noise_level=None):
    """Eq. (1) per sample, [B]: each image x_i [C, H, W] gets its own t_i ~ U{0..T-1} and eps_i ~ N(0, I) (drawn
    from generator, t first), z_t = alpha_t x + sigma_t eps, and the model's error in its parameterisation
    (tinybooth.loss.diffusion_loss). c: [B, L, D]. Super-resolution: x_cond [B, 3, H, W], the upsampled and
    noise-augmented low-res image, is concatenated to z_t on the channels; noise_level [B] is its augmentation step.
    The U-Net runs in its own dtype (a LoRA run's frozen base may be bf16); the loss is computed in float32."""
    # BEGIN ASSIGN 8.3
    # HINT: one t per sample (shape [B]) and eps like x, both from generator; q_sample; the SR input is [z_t ; x_cond] on dim 1
    t = torch.randint(0, schedule.num_train_timesteps, (x.shape[0],), generator=generator,
                      device=generator.device).to(x.device)
    eps = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)
    z_t = schedule.q_sample(x, t, eps)  # alpha_t x + sigma_t eps
    model_in = z_t if x_cond is None else torch.cat([z_t, x_cond], dim=1)  # SR: [z_t ; x_up], [B, 6, H, W]
    dtype = next((p.dtype for p in unet.parameters()), model_in.dtype)
    model_out = unet(model_in.to(dtype), t, c.to(dtype), noise_level=noise_level)
    return diffusion_loss(model_out, x, eps, z_t, t, schedule, reduction="none")  # [B]
    # END ASSIGN 8.3


def dreambooth_loss(unet, schedule, x, c, x_pr, c_pr, lambda_prior, generator):
    """Eq. (2) on one step's batches: the subject batch (x, c) and the prior batch (x_pr, c_pr) go through the
    U-Net as one batch. x, x_pr: [B, C, H, W] (pixels for IF, latents for SD); c, c_pr: [B, L, D] (like IF's and
    SD's pipelines, the U-Net attends to every text token; the T5 mask acts inside the encoder only).
    x_pr None (no prior preservation, the ablation): eq. (1) on the subject alone.
    Returns (total, {"subject": ..., "prior": ...}) for the log."""
    if x_pr is None:
        loss = denoising_losses(unet, schedule, x, c, generator).mean()
        return loss, {"subject": loss.detach()}
    per_sample = denoising_losses(unet, schedule, torch.cat([x, x_pr]), torch.cat([c, c_pr]), generator)
    B = x.shape[0]
    return prior_preservation_loss(per_sample[:B].mean(), per_sample[B:].mean(), lambda_prior)


# ----------------------------------------------------------------------------------------------------------------
# 4.3 the super-resolution stage

def sr_level(noise_level, noising_schedule):
    """The IF step of the paper's continuous augmentation level (1e-5 -> 0: IF's grid has nothing finer)."""
    return cascade.level_from_continuous(noise_level, noising_schedule.num_train_timesteps)


def sr_conditioning(x_high, low_resolution, level, noising_schedule, generator):
    """What the SR model is conditioned on for a subject photo x_high [B, 3, H, W]: the photo shrunk to the base
    model's resolution (what stage I would have drawn), upsampled back (bilinear, align_corners=True) and
    noise-augmented at IF step `level` by the same cascade.noise_augment that sampling uses.
    Returns (z_aug [B, 3, H, W], level LongTensor [B])."""
    x_low = data.resize_images(x_high, low_resolution)  # [B, 3, h, w]
    x_up = cascade.upsample(x_low, x_high.shape[-2:])  # [B, 3, H, W]
    return cascade.noise_augment(x_up, level, noising_schedule, generator=generator)


def sr_loss(sr_unet, schedule, x_high, c, low_resolution, level, noising_schedule, generator):
    """Eq. (1) for the SR model on subject photos x_high [B, 3, H, W] conditioned on their own low-res version
    (the paper; diffusers' IF DreamBooth recipe instead conditions stage II on its noisy target).
    Returns (loss, {"subject": loss}) for the log."""
    x_cond, levels = sr_conditioning(x_high, low_resolution, level, noising_schedule, generator)
    loss = denoising_losses(sr_unet, schedule, x_high, c, generator, x_cond=x_cond, noise_level=levels).mean()
    return loss, {"subject": loss.detach()}
