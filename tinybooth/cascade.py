"""Cascaded generation: a small text-to-image model, then a text-conditioned super-resolution model.

DreamBooth (Sec. 4, "Implementation details") fine-tunes Imagen's cascade: a 64x64 base model and
super-resolution (SR) models 64 -> 256 -> 1024. DeepFloyd IF is the public cascade of that design: stage I draws
a 64x64 image from T5 embeddings, stage II turns it into a 256x256 one.

The SR model is conditioned on the low-resolution image, *upscaled and noise-augmented*:

    x_low  [B, 3, 64, 64]  --upsample-->  x_up [B, 3, 256, 256]
    z_aug = alpha_a x_up + sigma_a eps,   eps ~ N(0, I)        (the forward process at augmentation level a)
    SR input = concat(z_t, z_aug)  [B, 6, 256, 256],   noise_level = a fed to the U-Net like a second timestep

Noise augmentation (Ho et al. 2021, "Cascaded diffusion models") makes the SR model robust to the artefacts of
the base model: it learns not to trust every pixel of its input. The level a trades robustness for fidelity to the
input. IF samples with a = 250 of 1000 steps; DreamBooth notes that when the SR model is fine-tuned on a subject,
a *low* level (1e-5 instead of Imagen's 1e-3, in continuous time) keeps the subject's fine detail.

The same `noise_augment` serves SR sampling (fixed level) and SR fine-tuning (`tinybooth.train`, a chosen level or
random levels per sample): one function, so the model is trained on exactly what it later sees.

Levels, continuous and discrete. The paper writes the level as continuous time t in [0, 1] of the cosine schedule;
IF's image_noising_scheduler is a 1000-step DDPM table (squaredcos_cap_v2) indexed by an integer step k, and k is
what the SR U-Net receives as `noise_level`. We map k = round(t T) and back t = k / T (T = 1000):

    paper t      IF step k    sigma of the table at k       sigma of the continuous cosine at t
    0            0            0 (clean, see below)          0
    1e-5         0            0 (clean)                     0.00062
    1e-3         1            0.0094                        0.0064
    0.25         250          0.3926                        0.3911

Two things to notice. (1) The table's entry k holds the continuous alpha_bar at (k + 1) / T, so a step of the table
is one step "noisier" than its name; the mapping is accurate to one step (1 / T). (2) IF's grid cannot express the
paper's 1e-5 at all: its finest non-zero level (sigma 0.0064 at k = 0) is ten times noisier. So on IF, DreamBooth's
"1e-5" means "no augmentation", and we define k = 0 as exactly that: `noise_augment` returns the clean upscaled
image at level 0 (diffusers' pipeline would still add sigma = 0.0064 noise there). Every other k gives diffusers'
`image_noising_scheduler.add_noise` bit for bit.
"""
import torch
import torch.nn.functional as F

IF_NOISE_LEVEL = 250  # IF stage II's default augmentation step (of 1000), diffusers' IFSuperResolutionPipeline


# ----------------------------------------------------------------------------------------------------------------
# noise augmentation of the low-resolution conditioning image

def upsample(x_low, size):
    """Upscale the low-res image [B, 3, h, w] to size (H, W) (or an int for square) with bilinear interpolation.

    align_corners=True, as IF does both in training and in its stage-II pipeline: the SR U-Net was trained on
    images upscaled exactly this way, and the corner-aligned grid maps the corner pixels onto each other (the
    default align_corners=False shifts the image by half a low-res pixel and smears the border). Any other
    interpolation would hand the U-Net an input slightly off the distribution it learned.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(x_low, size=size, mode="bilinear", align_corners=True)  # [B, 3, H, W]


def level_from_continuous(t, num_train_timesteps=1000):
    """The paper's continuous augmentation level t in [0, 1] as IF's discrete step k = round(t T), an int.

    0.25 -> 250 (IF's default), 1e-3 -> 1, 1e-5 -> 0 (below IF's grid: no augmentation). See the module docstring
    for how far each step's noise is from the continuous schedule's.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"continuous noise level t = {t} must lie in [0, 1] (the paper uses 1e-3 and 1e-5)")
    # BEGIN ASSIGN 7.2
    # HINT: k = round(t * T), clamped to the last step T - 1
    return min(round(t * num_train_timesteps), num_train_timesteps - 1)
    # END ASSIGN 7.2


def continuous_from_level(k, num_train_timesteps=1000):
    """IF's discrete step k as the paper's continuous level t = k / T (the inverse of level_from_continuous)."""
    if not 0 <= k < num_train_timesteps:
        raise ValueError(f"noise level {k} must be a step in 0..{num_train_timesteps - 1}")
    # BEGIN ASSIGN 7.2
    # HINT: t = k / T
    return k / num_train_timesteps
    # END ASSIGN 7.2


def noise_augment(x_up, level, noising_schedule, noise=None, generator=None):
    """Noise-augment the upscaled low-res image: z_aug = alpha_a x_up + sigma_a eps at IF step a = level.

    x_up: [B, C, H, W] in [-1, 1]. level: an int step in 0..T-1 for the whole batch (sampling) or a LongTensor [B]
    of steps (fine-tuning with per-sample levels). noising_schedule: a DiscreteSchedule, IF's
    image_noising_scheduler (squaredcos_cap_v2, T = 1000). eps = noise, or drawn from generator.
    Level 0 means no augmentation (see the module docstring): those samples come back as x_up exactly.
    Returns (z_aug [B, C, H, W], level LongTensor [B]); pass the second to the SR U-Net as noise_level.
    """
    B, T = x_up.shape[0], noising_schedule.num_train_timesteps
    level = torch.as_tensor(level, dtype=torch.long, device=x_up.device).expand(B).clone()  # [B]
    if level.min() < 0 or level.max() >= T:
        raise ValueError(f"noise level must be a step in 0..{T - 1} of the noising schedule, got {level.tolist()}")
    if noise is None:
        gen_device = generator.device if generator is not None else x_up.device
        noise = torch.randn(x_up.shape, generator=generator, device=gen_device, dtype=x_up.dtype).to(x_up.device)
    # BEGIN ASSIGN 7.1
    # HINT: z_aug = noising_schedule.q_sample(x_up, level, noise), then keep x_up where level == 0 (torch.where)
    z_aug = noising_schedule.q_sample(x_up, level, noise)  # alpha_a x_up + sigma_a eps
    clean = (level == 0).view(B, *[1] * (x_up.ndim - 1))  # [B, 1, 1, 1]
    z_aug = torch.where(clean, x_up, z_aug)
    # END ASSIGN 7.1
    return z_aug, level
