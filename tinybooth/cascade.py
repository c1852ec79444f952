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
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .clip import CLIPTextEncoder, CLIPTokenizer
from .text import T5Encoder, T5Tokenizer
from .samplers import classifier_free_guidance, custom_timesteps, sample
from .errors import UserError

TEXT_CLASSES = {"if": (T5Tokenizer, T5Encoder), "sd": (CLIPTokenizer, CLIPTextEncoder)}  # (tokenizer, encoder)
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
        raise UserError(f"continuous noise level t = {t} must lie in [0, 1] (the paper uses 1e-3 and 1e-5)")
    # BEGIN ASSIGN 7.2
    # HINT: k = round(t * T), clamped to the last step T - 1
    return min(round(t * num_train_timesteps), num_train_timesteps - 1)
    # END ASSIGN 7.2


def parse_noise_level(text):
    """A command-line level: '250' -> IF step 250; '1e-3' or '0.25' (with '.' or 'e') -> the paper's continuous
    level, mapped to a step."""
    if any(ch in text for ch in ".eE"):
        return level_from_continuous(float(text))
    return int(text)


def continuous_from_level(k, num_train_timesteps=1000):
    """IF's discrete step k as the paper's continuous level t = k / T (the inverse of level_from_continuous)."""
    if not 0 <= k < num_train_timesteps:
        raise UserError(f"noise level {k} must be a step in 0..{num_train_timesteps - 1}")
    return k / num_train_timesteps


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
        raise UserError(f"noise level must be a step in 0..{T - 1} of the noising schedule, got {level.tolist()}")
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


# ----------------------------------------------------------------------------------------------------------------
# prompts: encode once, cache on disk, never hold the text encoder next to the U-Nets

def stored_variant(directory, stem):
    """None when `directory` holds the full-precision weights (stem.safetensors, its index, or pytorch_model.bin),
    else "fp16" when only the half-precision files were downloaded; loading then upcasts as asked."""
    d = Path(directory)
    full = [f"{stem}.safetensors", f"{stem}.safetensors.index.json", "pytorch_model.bin"]
    if any((d / f).exists() for f in full):
        return None
    if (d / f"{stem}.fp16.safetensors").exists() or (d / f"{stem}.safetensors.index.fp16.json").exists():
        return "fp16"
    return None   # nothing there: the loader names what is missing


def default_cache_dir():
    """$TINYBOOTH_CACHE/text_embeddings, by default ~/.cache/tinybooth/text_embeddings."""
    return Path(os.environ.get("TINYBOOTH_CACHE", Path.home() / ".cache" / "tinybooth")) / "text_embeddings"


def text_model_key(model_dir):
    """A short id of a pipeline's text side: text_encoder/ (config.json, names and sizes of the weight files) and
    tokenizer/ (every file's content; they are small).

    Cheap (no hashing of 10 GB of T5) yet it changes when the weights are replaced (a rerun of train into the same
    folder writes them anew: their modification time changes), re-downloaded in another precision, or the tokenizer
    changes; the directory's absolute path is part of it too.
    """
    d = Path(model_dir).resolve()
    h = hashlib.sha256(str(d).encode())
    config = d / "text_encoder" / "config.json"
    h.update(config.read_bytes() if config.exists() else b"")
    for f in sorted((d / "text_encoder").glob("*.safetensors")) + sorted((d / "text_encoder").glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())  # rewritten weights: a new key
    for f in sorted((d / "tokenizer").glob("*")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _cache_file(cache_dir, prompt, model_key, max_length):
    key = hashlib.sha256(json.dumps([prompt, model_key, max_length]).encode()).hexdigest()
    return Path(cache_dir) / f"{key}.safetensors"


def encode_prompts(texts, model_dir, family, cache_dir=None, max_length=77, device=None, dtype=None):
    """Text embeddings c [B, L, D] and their token mask [B, L] (1 = token, 0 = padding) for a list of prompts.

    model_dir holds text_encoder/ and tokenizer/ (a public pipeline directory). family: "if" (T5 v1.1; texts
    lower-cased and stripped as IF's pipeline does) or "sd" (CLIP). Each text's embedding is cached in cache_dir
    under sha256(text, text_model_key(model_dir), max_length); when every text is cached the encoder is not even
    loaded.
    Otherwise it is loaded once (device, dtype: run T5 in bf16 or fp32, never fp16), encodes the missing texts,
    and is freed before returning. Returns float32 tensors on the CPU. The precision is not part of the key: an
    entry keeps the precision it was first computed in (bf16 and fp32 encoder outputs differ slightly).
    """
    if family not in ("if", "sd"):
        raise UserError(f"family '{family}' is not supported; use 'if' (T5) or 'sd' (CLIP)")
    texts = [t.lower().strip() for t in texts] if family == "if" else list(texts)
    model_dir = Path(model_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = text_model_key(model_dir)
    files = {t: _cache_file(cache_dir, t, key, max_length) for t in texts}
    missing = sorted(t for t, f in files.items() if not f.exists())
    if missing:
        Tokenizer, Encoder = TEXT_CLASSES[family]
        tokenizer = Tokenizer.from_pretrained(model_dir / "tokenizer")
        encoder = Encoder.from_pretrained(model_dir / "text_encoder", dtype=dtype, device=device,
                                          variant=stored_variant(model_dir / "text_encoder", "model"))
        _, mask = tokenizer(missing, max_length=max_length)                    # [M, L]
        with torch.no_grad():
            c = run_text_encoder(tokenizer, encoder, missing, family, max_length)  # [M, L, D]
        cache_dir.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(missing):
            target = files[prompt]
            tmp = target.with_suffix(".tmp")
            save_file({"c": c[i].float().cpu().contiguous(), "mask": mask[i].cpu().contiguous()}, str(tmp),
                      metadata={"text": prompt, "max_length": str(max_length)})
            os.replace(tmp, target)                                            # never a half-written cache entry
        del encoder, c
        if torch.cuda.is_available():
            torch.cuda.empty_cache()                                           # T5-XXL must not stay next to the U-Nets
    entries = [load_file(str(files[t])) for t in texts]
    return torch.stack([e["c"] for e in entries]), torch.stack([e["mask"] for e in entries])


def run_text_encoder(tokenizer, encoder, texts, family, max_length=77):
    """c = E(texts) [B, L, D] with the family's conventions: IF lower-cases and strips prompts and passes the padding
    mask to T5. SD 1.x does not pass it to CLIP (causal attention only): its U-Net cross-attends to all 77 outputs,
    and the padding positions' outputs depend on that choice. Gradients flow when enabled (a fine-tuned encoder)."""
    if family == "if":
        texts = [t.lower().strip() for t in texts]
    ids, mask = tokenizer(texts, max_length=max_length)                       # [B, L] each
    device = next(encoder.parameters()).device
    return encoder(ids.to(device), attention_mask=mask.to(device) if family == "if" else None)


# ----------------------------------------------------------------------------------------------------------------
# sampling one stage: classifier-free guidance around the U-Net, then tinybooth.samplers

def guided_denoiser(unet, c, c_uncond, guidance, out_channels, extra_input=None, noise_level=None, bar=None):
    """denoise_fn(z_t, t) for samplers.sample: the U-Net on [uncond; cond] with classifier-free guidance.

    c: [B, L, D] text embeddings; c_uncond: the empty prompt's, [B or 1, L, D]. guidance <= 1 skips the unconditional
    branch (scale 1 is eps_cond anyway). out_channels: the image's C; a learned-variance half (IF: 6 = 3 + 3) is
    taken from the conditional branch, unguided, as IF's pipeline does. extra_input [B, C', H, W] is concatenated
    to z_t on the channels (stage II: the noise-augmented low-res image), noise_level [B] passed alongside.
    The sampler runs in float32; the U-Net in its own dtype.
    """
    dtype, device = next(unet.parameters()).dtype, next(unet.parameters()).device
    cfg = guidance > 1.0
    c_in = (torch.cat([c_uncond.expand_as(c), c]) if cfg else c).to(device, dtype)   # [2B or B, L, D]
    if extra_input is not None:
        extra_input = torch.cat([extra_input] * 2) if cfg else extra_input
    if noise_level is not None:
        noise_level = (torch.cat([noise_level] * 2) if cfg else noise_level).to(device)

    def denoise(z_t, t):                                                      # [B, C, H, W], [B]
        x_in = torch.cat([z_t] * 2) if cfg else z_t
        if extra_input is not None:
            x_in = torch.cat([x_in, extra_input], dim=1)                      # [2B, C + C', H, W]
        t_in = torch.cat([t] * 2) if cfg else t
        out = unet(x_in.to(device, dtype), t_in.to(device), c_in, noise_level=noise_level).float()
        if bar is not None:
            bar.update(1)
        if not cfg:
            return out
        out_uncond, out_cond = out.chunk(2)
        return classifier_free_guidance(out_uncond, out_cond, guidance, channels=out_channels)
    return denoise


def image_size(unet):
    """(H, W) the U-Net was trained at, from config.json's sample_size (an int or [H, W])."""
    s = unet.config["sample_size"]
    return (s, s) if isinstance(s, int) else tuple(s)


def run_stage(unet, schedule, z_T, c, c_uncond, guidance, num_steps, sampler, eta, generator, desc, progress,
              timesteps=None, **condition):
    """z_T [B, C, H, W] -> z_0 on the U-Net's device: tinybooth.samplers.sample around guided_denoiser, with a
    progress bar named desc. timesteps (a list of steps or a name of samplers.IF_TIMESTEPS such as "smart27")
    replaces num_steps' grid. condition: extra_input / noise_level of guided_denoiser (stage II)."""
    device = next(unet.parameters()).device
    if timesteps is not None:
        num_steps = None
    # one U-Net call per grid point, except PNDM's warm-up (a bar without a total)
    total = None if sampler == "pndm" else num_steps or len(custom_timesteps(timesteps, schedule.num_train_timesteps))
    with tqdm(total=total, desc=desc, leave=False, disable=not progress) as bar:
        denoise = guided_denoiser(unet, c, c_uncond, guidance, z_T.shape[1], bar=bar, **condition)
        return sample(denoise, schedule, tuple(z_T.shape), num_steps, sampler=sampler, eta=eta, generator=generator,
                      z_T=z_T.to(device), timesteps=timesteps)


def sample_base(unet, schedule, c, c_uncond, guidance=7.0, num_steps=100, sampler="ancestral", eta=0.0,
                generator=None, progress=False, timesteps=None):
    """IF stage I: text -> image [B, 3, s, s] in [-1, 1] (s = the U-Net's sample_size, 64 for IF).

    z_T ~ N(0, I) is drawn first from generator (on the CPU, so a seed gives the same images on any device), then
    the sampler's noise, in the order of diffusers' IFPipeline. sampler: one of samplers.SAMPLERS; timesteps: a
    list or an IF grid name ("fast27", "smart27", ...) instead of num_steps, as IFPipeline(timesteps=...).
    """
    size = image_size(unet)
    z_T = torch.randn(c.shape[0], unet.config["in_channels"], *size, generator=generator)   # [B, 3, s, s]
    return run_stage(unet, schedule, z_T, c, c_uncond, guidance, num_steps, sampler, eta, generator,
                     f"stage I ({size[0]} px)", progress, timesteps=timesteps)


def sample_super_resolution(unet, schedule, noising_schedule, x_low, c, c_uncond, noise_level=IF_NOISE_LEVEL,
                            guidance=4.0, num_steps=50, sampler="ancestral", eta=0.0, generator=None,
                            progress=False, timesteps=None):
    """IF stage II: low-res image x_low [B, 3, h, w] + text -> [B, 3, S, S] (S = the SR U-Net's sample_size).

    x_up = upsample(x_low, S); z_aug = noise_augment(x_up, noise_level); each step the U-Net sees
    concat(z_t, z_aug) (6 channels) and noise_level. Draw order as diffusers' IFSuperResolutionPipeline: z_T,
    the augmentation noise, then the sampler's noise. timesteps: a list or a grid name ("smart27", "super27",
    ...) instead of num_steps.
    """
    C = unet.config["in_channels"] // 2                                        # 6 = z_t (3) + z_aug (3)
    size = image_size(unet)
    z_T = torch.randn(x_low.shape[0], C, *size, generator=generator)          # [B, 3, S, S]
    x_up = upsample(x_low.float().cpu(), size)                                 # [B, 3, S, S]
    z_aug, level = noise_augment(x_up, noise_level, noising_schedule, generator=generator)
    device = next(unet.parameters()).device
    return run_stage(unet, schedule, z_T, c, c_uncond, guidance, num_steps, sampler, eta, generator,
                     f"stage II ({size[0]} px, noise level {noise_level})", progress, timesteps=timesteps,
                     extra_input=z_aug.to(device), noise_level=level)


def sample_latent(unet, vae, schedule, c, c_uncond, guidance=7.5, num_steps=50, sampler="ddim", eta=0.0,
                  generator=None, progress=False, timesteps=None):
    """Stable Diffusion: text -> latents z_0 [B, 4, s, s] -> images D(z_0 / scale) [B, 3, 8s, 8s] in [-1, 1].

    sampler: one of samplers.SAMPLERS (SD 1.x's config names "pndm"); timesteps: a list instead of num_steps."""
    size = image_size(unet)
    z_T = torch.randn(c.shape[0], unet.config["in_channels"], *size, generator=generator)    # [B, 4, s, s]
    z_0 = run_stage(unet, schedule, z_T, c, c_uncond, guidance, num_steps, sampler, eta, generator,
                    f"latents ({size[0]}x{size[1]}, 1/{vae.downscale} of the image)", progress, timesteps=timesteps)
    vae_param = next(vae.parameters())
    with torch.no_grad():
        return vae.images_from_latents(z_0.to(vae_param.device, vae_param.dtype)).float()
