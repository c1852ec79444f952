"""`python -m tinybooth.train`: DreamBooth (Ruiz et al., CVPR 2023, Sec. 4), the main job.

Given 3-5 photos of a subject and its class noun, bind a rare identifier [V] to the subject inside a pretrained
text-to-image model, so that "a [V] dog on the beach" draws *that* dog on a beach. One run:

  1. identifier [V]: --identifier, or the paper's rare-token search in the tokenizer's vocabulary (Sec. 4.1).
     Instance prompt c = "a [V] [class noun]", class prompt c_pr = "a [class noun]".
  2. class images x_pr: the frozen model draws --num-class-images samples of c_pr with the ancestral sampler
     (paper: x_pr = x_hat(z_t1, c_pr)). They are cached as PNGs; a rerun only draws what is missing.
  3. fine-tune the base model on eq. (2), a subject batch and a prior batch per step:

        E[ w_t ||x_hat(alpha_t x + sigma_t eps, c) - x||^2 + lambda w_t' ||x_hat(alpha_t' x_pr + sigma_t' eps', c_pr) - x_pr||^2 ]

     (lambda = --prior-loss-weight; tinybooth.loss gives each term in the parameterisation of the checkpoint).
     The two terms are logged and plotted separately. --no-prior-preservation drops the second (the paper's
     ablation: the model then forgets what a generic member of the class looks like, "language drift").
  4. fine-tune the super-resolution model (IF stage II) on (low-res, high-res) pairs of the subject photos. The
     SR model sees the real low-res photo, upsampled and noise-augmented at --sr-noise-level (paper: 1e-5 rather
     than 1e-3, which keeps the subject's fine detail) by the same `cascade.noise_augment` used at sampling time.
     (diffusers' IF DreamBooth recipe instead conditions stage II on its own noisy target; we follow the paper.)
  5. save the personalised model in the public layout, sample grids (recontextualisation, property changes and
     the bare class prompt, to see whether the prior survived), the loss plot and settings.json / metrics.json.

With no arguments it personalises the embedded toy cascade (tinybooth/assets/toy-IF-I, toy-IF-II) with the toy
subject (examples/toy_subject) offline on a CPU in about 3 minutes. With --model it trains public DeepFloyd IF
(stage I; stage II with --sr-model) or Stable Diffusion 1.x (CLIP text, VAE latents) weights.

Memory on a consumer GPU (benchmarks/README.md has the measured figures): --mixed-precision bf16 runs the maths in
bf16 while the trained weights stay fp32; --gradient-checkpointing recomputes ResBlocks in backward; the text
encoder runs once and is freed (its embeddings are cached); --lora-rank trains only low-rank adapters; and
--optimizer-in-backward updates each weight as soon as backward has its gradient, so the full set of gradients
never exists (a full fine-tune then needs 12 bytes per weight, fp32 weight + two AdamW moments, instead of 16).

Reliability: checkpoints (trained weights, optimizer, LR schedule and every RNG state) are written atomically every
--checkpoint-every steps and on Ctrl-C; --resume continues to bit-identical weights (with --deterministic); a
NaN/inf loss stops the run with a message and leaves the last good checkpoint in place.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tinybooth import cascade, data, lora, rare_tokens, text
from tinybooth import sample as sampling
from tinybooth.loss import diffusion_loss, prior_preservation_loss
from tinybooth.schedule import DiscreteSchedule
from tinybooth.unet import UNet
from tinybooth.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
TOY_MODEL, TOY_SR_MODEL = ASSETS / "toy-IF-I", ASSETS / "toy-IF-II"
TOY_SUBJECT = ROOT / "examples" / "toy_subject"
MAX_TEXT_LENGTH = 77  # tokens per prompt, as IF and SD 1.x

# Settings that depend on the backbone; the user's flags override them. Paper: lr 1e-5 (Imagen), 5e-6 (SD),
# ~1000 steps. The toy model is ~100x smaller and must finish in a few CPU minutes: higher lr, fewer steps. Its
# tiny T5 is fine-tuned too: frozen, it encodes "a [V] star" almost as "a star" (pooled cosine 0.93), so the U-Net
# alone must pull the two apart, and on the shipped model it either learned the subject weakly or, at a higher lr,
# collapsed every star to one colour (the runs compared are in lessons/08_ablations.py's docstring).
BACKBONE_DEFAULTS = {
    "toy": dict(lr=3e-4, sr_lr=1e-4, max_steps=400, sr_steps=60, batch_size=4, num_class_images=32, class_steps=25,
                sample_steps=25, guidance=5.0, checkpoint_every=100, num_samples=3, train_text_encoder=True),
    "if": dict(lr=1e-5, sr_lr=1e-5, max_steps=1000, sr_steps=500, batch_size=1, num_class_images=200, class_steps=100,
               sample_steps=50, guidance=7.0, checkpoint_every=250, num_samples=4, train_text_encoder=False),
    "sd": dict(lr=5e-6, sr_lr=None, max_steps=1000, sr_steps=0, batch_size=1, num_class_images=200, class_steps=50,
               sample_steps=50, guidance=7.5, checkpoint_every=250, num_samples=4, train_text_encoder=False),
}


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss); the message says what happened and where the last checkpoint is."""


# ----------------------------------------------------------------------------------------------------------------
# settings

@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run, as printed at the start and saved to settings.json."""
    model: str
    sr_model: str
    instance_dir: str
    class_noun: str
    identifier: str
    output_dir: str
    class_dir: str
    backbone: str                 # "toy", "if" or "sd" (what the defaults were taken from)
    num_class_images: int
    class_sampler: str
    class_steps: int
    class_batch_size: int
    prior_preservation: bool
    prior_loss_weight: float
    train_text_encoder: bool
    lora_rank: int
    lr: float
    sr_lr: float
    lr_warmup_steps: int
    max_steps: int
    sr_steps: int
    sr_noise_level: float
    batch_size: int
    grad_accum: int
    max_grad_norm: float
    seed: int
    deterministic: bool
    mixed_precision: str
    gradient_checkpointing: bool
    optimizer_in_backward: bool
    checkpoint_every: int
    resume: bool
    num_samples: int
    sample_steps: int
    guidance: float
    device: str


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something: not None (the help names the backbone's), not on/off flags."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tinybooth.train", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    a = p.add_argument
    a("--model", help="pipeline directory in the public layout (IF stage I or SD 1.x); default: the embedded toy")
    a("--sr-model", help="IF stage-II directory to fine-tune too (default: the toy's, for the toy; 'none' skips)")
    a("--instance-dir", help="folder with the 3-5 photos of the subject (default: examples/toy_subject)")
    a("--class-noun", help="the subject's class ('dog'); required with --instance-dir (the paper's ablation "
                           "shows a missing or wrong class noun fails)")
    a("--identifier", help="the token [V]; default: the paper's rare-token search in the tokenizer")
    a("--output-dir", help="where everything is written (default: runs/dreambooth-<model name>)")
    a("--class-dir", help="class-image cache (default: <output-dir>/class_images/<class prompt>)")
    a("--num-class-images", type=int, help="prior images of 'a [class noun]' (backbone default)")
    a("--class-sampler", choices=("ancestral", "ddim"), default="ancestral",
      help="sampler for class images (the paper: ancestral; ddim with few --class-steps is faster)")
    a("--class-steps", type=int, help="sampling steps per class image (backbone default)")
    a("--class-batch-size", type=int, default=16, help="class images generated per batch")
    a("--no-prior-preservation", dest="prior_preservation", action="store_false",
      help="train on the subject alone (ablation): no class images, no prior term")
    a("--prior-loss-weight", type=float, default=1.0, help="lambda of eq. (2)")
    a("--train-text-encoder", action=argparse.BooleanOptionalAction,
      help="fine-tune the text encoder too (CLIP, the toy T5; backbone default: on for the toy model only)")
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of all weights (0: off)")
    a("--lr", type=float, help="learning rate of the base model (backbone default: 1e-5 IF, 5e-6 SD, 3e-4 toy)")
    a("--sr-lr", type=float, help="learning rate of the super-resolution model (default: 1e-5 IF, 1e-4 toy)")
    a("--lr-warmup-steps", type=int, default=10, help="linear warm-up steps, then constant")
    a("--max-steps", type=int, help="optimizer steps of the base model (backbone default)")
    a("--sr-steps", type=int, help="optimizer steps of the super-resolution model (0 skips it)")
    a("--sr-noise-level", type=float, default=1e-5,
      help="noise augmentation of the SR model's low-res input, continuous t in [0, 1] (paper: 1e-5)")
    a("--batch-size", type=int, help="subject images per step (as many prior images join them)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    a("--seed", type=int, default=0)
    a("--deterministic", action="store_true", help="deterministic kernels (bit-identical resume)")
    a("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
      help="autocast dtype; trainable weights stay fp32. auto: bf16 on GPUs that have it, else no")
    a("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--optimizer-in-backward", action="store_true",
      help="update each weight inside backward as soon as its gradient is ready and free that gradient (saves "
           "4 bytes per trained weight: 3.4 GB on SD-1.5); needs --grad-accum 1, clips per tensor, not with fp16")
    a("--checkpoint-every", type=int, help="steps between checkpoints (backbone default)")
    a("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pt")
    a("--num-samples", type=int, help="images per prompt in the sample grid (0: no samples)")
    a("--sample-steps", type=int, help="sampling steps for the sample grid")
    a("--guidance", type=float, help="classifier-free guidance scale (class images and samples)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def settings_from_args(argv=None):
    """Parse the command line and fill in the backbone's defaults: a TrainConfig."""
    args = build_parser().parse_args(argv)
    toy = args.model is None
    if toy:
        model, sr_model = TOY_MODEL, (None if args.sr_model == "none" else args.sr_model or TOY_SR_MODEL)
        instance_dir = Path(args.instance_dir or TOY_SUBJECT)
        class_noun = args.class_noun or (_toy_class_noun() if args.instance_dir is None else None)
    else:
        model = Path(args.model)
        sr_model = None if args.sr_model in (None, "none") else Path(args.sr_model)
        instance_dir, class_noun = args.instance_dir, args.class_noun
    if instance_dir is None:
        raise ValueError("--instance-dir is required with --model: the folder with the photos of your subject")
    if not class_noun:
        raise ValueError("--class-noun is required (e.g. --class-noun dog): DreamBooth ties [V] to a class the "
                         "model already knows; without it the paper's ablation shows the subject is not learned")
    backbone = "toy" if toy else sampling.detect_family(model)  # names the download command if it is missing
    if backbone == "sr":
        raise ValueError(f"'{model}' is a super-resolution model (IF stage II): pass it as --sr-model, and the "
                         f"stage-I pipeline as --model")
    d = BACKBONE_DEFAULTS[backbone]
    pick = lambda name: d[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    output_dir = Path(args.output_dir or ROOT / "runs" / f"dreambooth-{'toy' if toy else Path(model).name}")
    mixed = args.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
    if mixed == "fp16" and not args.device.startswith("cuda"):
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank {args.lora_rank} must be >= 0 (0 trains all weights)")
    cfg = TrainConfig(
        model=str(model), sr_model=str(sr_model) if sr_model else None, instance_dir=str(instance_dir),
        class_noun=class_noun, identifier=args.identifier, output_dir=str(output_dir), class_dir=args.class_dir,
        backbone=backbone, num_class_images=pick("num_class_images"), class_sampler=args.class_sampler,
        class_steps=pick("class_steps"), class_batch_size=args.class_batch_size,
        prior_preservation=args.prior_preservation, prior_loss_weight=args.prior_loss_weight,
        train_text_encoder=pick("train_text_encoder"), lora_rank=args.lora_rank, lr=pick("lr"), sr_lr=pick("sr_lr"),
        lr_warmup_steps=args.lr_warmup_steps, max_steps=pick("max_steps"),
        sr_steps=pick("sr_steps") if sr_model else 0, sr_noise_level=args.sr_noise_level,
        batch_size=pick("batch_size"), grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
        seed=args.seed, deterministic=args.deterministic, mixed_precision=mixed,
        gradient_checkpointing=args.gradient_checkpointing, optimizer_in_backward=args.optimizer_in_backward,
        checkpoint_every=pick("checkpoint_every"),
        resume=args.resume, num_samples=pick("num_samples"), sample_steps=pick("sample_steps"),
        guidance=pick("guidance"), device=args.device)
    for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "class_steps", "sample_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.optimizer_in_backward and (cfg.grad_accum > 1 or cfg.mixed_precision == "fp16"):
        raise ValueError("--optimizer-in-backward updates the weights during backward, so it cannot accumulate "
                         "gradients (--grad-accum 1) or unscale fp16 gradients first (use --mixed-precision bf16)")
    return cfg


def _toy_class_noun():
    """The class noun the toy subject ships with (tinybooth/assets/toy_subject.json)."""
    with open(ASSETS / "toy_subject.json") as f:
        return json.load(f)["class_noun"]


# ----------------------------------------------------------------------------------------------------------------
# the pretrained model: a pipeline directory in the public layout

@dataclass
class Backbone:
    """The pieces of a public pipeline that DreamBooth touches. kind: "if" (pixels, T5) or "sd" (latents, CLIP)."""
    kind: str
    path: Path
    tokenizer: object
    text_encoder: object
    unet: UNet
    schedule: DiscreteSchedule
    vae: AutoencoderKL = None
    sr_path: Path = None
    sr_unet: UNet = None
    sr_schedule: DiscreteSchedule = None
    noising_schedule: DiscreteSchedule = None

    @property
    def resolution(self):
        """Pixel size of the base model's images (SD: its latent size times the VAE's downscale)."""
        return self.unet.config["sample_size"] * (self.vae.downscale if self.vae is not None else 1)

    @property
    def sr_resolution(self):
        return self.sr_unet.config["sample_size"] if self.sr_unet is not None else None


def load_backbone(cfg, device, frozen_dtype):
    """Read the pipeline directories; missing weights name the download command (tinybooth.sample's checks)."""
    path = Path(cfg.model)
    kind = sampling.detect_family(path)
    sampling.require(path, ["tokenizer", "text_encoder", "unet", "scheduler"] + (["vae"] if kind == "sd" else []))
    tok_cls, enc_cls = text_classes(path)
    # the text encoder is loaded only to be trained; frozen, its embeddings come from cascade's cache
    b = Backbone(kind=kind, path=path, tokenizer=tok_cls.from_pretrained(path / "tokenizer"),
                 text_encoder=enc_cls.from_pretrained(path / "text_encoder", device=device)
                 if cfg.train_text_encoder else None,
                 unet=UNet.from_pretrained(path / "unet", device=device),
                 schedule=DiscreteSchedule.from_pretrained(path / "scheduler"))
    if kind == "sd":
        b.vae = AutoencoderKL.from_pretrained(path / "vae", dtype=frozen_dtype, device=device)
    if cfg.sr_model:
        sr = Path(cfg.sr_model)
        sampling.require(sr, ["unet", "scheduler", "image_noising_scheduler"])
        b.sr_path = sr
        b.sr_unet = UNet.from_pretrained(sr / "unet", device=device)
        b.sr_schedule = DiscreteSchedule.from_pretrained(sr / "scheduler")
        b.noising_schedule = DiscreteSchedule.from_pretrained(sr / "image_noising_scheduler")
    return b


def text_classes(path):
    """(tokenizer class, encoder class) of a pipeline: T5 (IF, the toy) or CLIP (SD), from text_encoder/config.json."""
    with open(Path(path) / "text_encoder" / "config.json") as f:
        model_type = json.load(f).get("model_type", "")
    if model_type.startswith("t5"):
        return text.T5Tokenizer, text.T5Encoder
    if model_type.startswith("clip"):
        return text.CLIPTokenizer, text.CLIPTextEncoder
    raise ValueError(f"text encoder model_type '{model_type}' in '{path}/text_encoder' is not supported; "
                     f"tinybooth knows T5 (IF) and CLIP (SD 1.x)")


# ----------------------------------------------------------------------------------------------------------------
# step 1: identifier and prompts

def choose_identifier(cfg, backbone):
    """--identifier, or the paper's rare-token search (Sec. 4.1) with the run's seed: the first candidate that stays
    one token inside a prompt, and for IF (whose pipeline lower-cases every prompt) is already lower case, so that
    the token trained is the token later asked for ('Mul' would become 'mul', another token)."""
    if cfg.identifier:
        return cfg.identifier
    tok = backbone.tokenizer
    for text in rare_tokens.rare_token_candidates(tok, seed=cfg.seed):
        if rare_tokens.count_tokens(tok, text) == 1 and (backbone.kind != "if" or text == text.lower()):
            return text
    raise ValueError("the rare-token search found no identifier that stays one token; pass --identifier")


def subject_prompt(identifier, class_noun, template="a {}"):
    """'a sks dog'; with an empty class noun (the paper's "no class noun" ablation) 'a sks'."""
    return " ".join(template.format(f"{identifier} {class_noun}").split())


TOY_PROMPTS = ("a {}", "a {} on a green background", "a {} on a striped yellow background",
               "a big {} on a dotted purple background", "a small {} on a checkered red background")
PUBLIC_PROMPTS = ("a {}", "a {} in the jungle", "a {} on the beach", "a {} on top of a wooden floor", "a red {}")


def sample_prompts(cfg, identifier):
    """Prompts of the sample grid: the subject recontextualised and with changed properties, then the bare class
    prompt (does "a dog" still draw dogs in general, or only the subject?)."""
    templates = TOY_PROMPTS if cfg.backbone == "toy" else PUBLIC_PROMPTS
    return [subject_prompt(identifier, cfg.class_noun, t) for t in templates] + [f"a {cfg.class_noun}".strip()]


# ----------------------------------------------------------------------------------------------------------------
# text: encode every prompt once (then the encoder can leave the GPU)

def encode_prompts(backbone, prompts, device, frozen_dtype=None, grad=False):
    """{prompt: embedding [1, L, D]} (77 tokens; the padding is masked inside the encoder only, as IF's and SD's
    pipelines do). A frozen encoder's embeddings come from cascade.encode_prompts, which caches them on disk and
    frees the encoder (T5-XXL never sits next to the U-Net); a trained one (backbone.text_encoder) runs here."""
    if backbone.text_encoder is None:
        dtype = torch.float32 if frozen_dtype in (None, torch.float16) else frozen_dtype  # T5 overflows in fp16
        c, _ = cascade.encode_prompts(prompts, backbone.path, backbone.kind, max_length=MAX_TEXT_LENGTH,
                                      device=device, dtype=dtype)
        return {p: c[i:i + 1].to(device) for i, p in enumerate(prompts)}
    # exactly as cascade.encode_prompts: IF lower-cases and masks the padding inside T5, SD's CLIP sees no mask
    texts = [p.lower().strip() for p in prompts] if backbone.kind == "if" else prompts
    ids, mask = backbone.tokenizer(texts, max_length=MAX_TEXT_LENGTH)  # [N, L] each
    with torch.set_grad_enabled(grad):
        c = backbone.text_encoder(ids.to(device), attention_mask=mask.to(device) if backbone.kind == "if" else None)
    return {p: c[i:i + 1] for i, p in enumerate(prompts)}


def repeat(c, n):
    """A cached prompt embedding [1, L, D] as a batch [n, L, D]."""
    return c.expand(n, *c.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# step 2: class images with the frozen model

def class_image_dir(cfg, class_prompt):
    slug = "".join(ch if ch.isalnum() else "_" for ch in class_prompt).strip("_")
    return Path(cfg.class_dir) if cfg.class_dir else Path(cfg.output_dir) / "class_images" / slug


def generate_class_images(cfg, backbone, prompt_cache, class_prompt):
    """Draw the prior batch x_pr = samples of "a [class noun]" from the frozen model, as numbered PNGs.

    Batch b holds images b*B .. b*B+B-1 and is drawn with seed (run seed, b), so a batch is the same whether the run
    was interrupted or not: finished batches are skipped, a partly written one is drawn again. Returns the paths.
    """
    folder = class_image_dir(cfg, class_prompt)
    folder.mkdir(parents=True, exist_ok=True)
    n, bs = cfg.num_class_images, cfg.class_batch_size
    paths = [folder / f"{i:05d}.png" for i in range(n)]
    todo = [b for b in range(math.ceil(n / bs)) if not all(p.exists() for p in paths[b * bs:(b + 1) * bs])]
    if not todo:
        print(f"class images: {n} cached in {folder}")
        return paths
    print(f"class images: drawing {sum(len(paths[b * bs:(b + 1) * bs]) for b in todo)} of {n} samples of "
          f"'{class_prompt}' ({cfg.class_sampler}, {cfg.class_steps} steps) into {folder}")
    from tqdm.auto import tqdm
    for b in tqdm(todo, desc="class images", unit="batch"):
        chunk = paths[b * bs:(b + 1) * bs]
        images = generate(backbone, prompt_cache, [class_prompt] * len(chunk), seed=cfg.seed * 100003 + b,
                          steps=cfg.class_steps, sampler=cfg.class_sampler, guidance=cfg.guidance)
        for x, p in zip(images, chunk):
            data.save_image(x, p)
    return paths


@torch.no_grad()
def generate(backbone, prompt_cache, prompts, seed, steps, sampler, guidance):
    """Images [N, 3, H, W] in [-1, 1] for prompts from the base model, with the pipelines of tinybooth.cascade:
    IF stage I, or SD's latent path (decoded by the VAE)."""
    g = torch.Generator().manual_seed(seed)  # cascade draws z_T on the CPU, as diffusers' pipelines do
    c = torch.cat([prompt_cache[p] for p in prompts])  # [N, L, D]
    c_uncond = prompt_cache[""].expand_as(c)  # the empty prompt: the unconditional branch of guidance
    if backbone.vae is not None:
        return cascade.sample_latent(backbone.unet, backbone.vae, backbone.schedule, c, c_uncond, guidance, steps,
                                     sampler, generator=g).clamp(-1, 1)
    return cascade.sample_base(backbone.unet, backbone.schedule, c, c_uncond, guidance, steps, sampler,
                               generator=g).clamp(-1, 1)


@torch.no_grad()
def super_resolve(backbone, prompt_cache, prompts, x_low, seed, steps, level):
    """IF stage II on base-model images x_low [N, 3, h, w]: [N, 3, H, W] in [-1, 1], augmentation step `level`."""
    c = torch.cat([prompt_cache[p] for p in prompts])  # [N, L, D]
    return cascade.sample_super_resolution(backbone.sr_unet, backbone.sr_schedule, backbone.noising_schedule, x_low,
                                           c, prompt_cache[""].expand_as(c), noise_level=level, num_steps=steps,
                                           sampler="ancestral", generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# steps 3 and 4: the losses

def dreambooth_loss(unet, schedule, x, c, x_pr, c_pr, lambda_prior, generator, x_cond=None, noise_level=None):
    """Eq. (2) on one step's batches: the subject batch (x, c) and the prior batch (x_pr, c_pr; None without prior
    preservation) go through the U-Net as one batch; returns (total, {"subject": ..., "prior": ...}).

    x, x_pr: [B, C, H, W] (pixels for IF, latents for SD); c, c_pr: text embeddings [B, L, D]. (Like IF's and SD's
    pipelines, the U-Net attends to every text token; the T5 mask only acts inside the encoder.)
    Super-resolution (no prior batch): x_cond [B, 3, H, W] is the upsampled, noise-augmented low-res image that is
    concatenated to z_t, noise_level [B] its augmentation step. Noise eps and steps t ~ U{0..T-1} come from
    `generator`.
    """
    B = x.shape[0]
    x_all = x if x_pr is None else torch.cat([x, x_pr])  # [B (+ B_pr), C, H, W]
    c_all = c if x_pr is None else torch.cat([c, c_pr])  # [B (+ B_pr), L, D]
    # BEGIN ASSIGN 8.3
    # HINT: t ~ U{0..T-1} and eps ~ N(0, I) from generator; z_t = schedule.q_sample(x_all, t, eps); per-sample diffusion_loss(..., reduction="none"); subject = first B, prior = the rest; prior_preservation_loss(subject, prior, lambda_prior)
    t = torch.randint(0, schedule.num_train_timesteps, (x_all.shape[0],), generator=generator,
                      device=generator.device).to(x_all.device)
    eps = torch.randn(x_all.shape, generator=generator, device=generator.device).to(x_all.device, x_all.dtype)
    z_t = schedule.q_sample(x_all, t, eps)  # alpha_t x + sigma_t eps
    model_in = z_t if x_cond is None else torch.cat([z_t, x_cond], dim=1)  # SR: [z_t ; x_up], [B, 6, H, W]
    dtype = next((p.dtype for p in unet.parameters()), model_in.dtype)  # a LoRA run's frozen base may be bf16
    model_out = unet(model_in.to(dtype), t, c_all.to(dtype), noise_level=noise_level)
    per_sample = diffusion_loss(model_out, x_all, eps, z_t, t, schedule, reduction="none")  # [B (+ B_pr)]
    if x_pr is None:
        loss = per_sample.mean()
        return loss, {"subject": loss.detach()}
    return prior_preservation_loss(per_sample[:B].mean(), per_sample[B:].mean(), lambda_prior)
    # END ASSIGN 8.3


def sr_sampling_level(cfg, backbone):
    """IF step of the SR stage's noise augmentation when sampling: the fine-tuning level (--sr-noise-level, the
    paper's continuous t) when the SR model was fine-tuned, else IF's default 250."""
    if backbone.sr_unet is None:
        return None
    if cfg.sr_steps == 0:
        return cascade.IF_NOISE_LEVEL
    return cascade.level_from_continuous(cfg.sr_noise_level, backbone.noising_schedule.num_train_timesteps)


def sr_conditioning(x_high, low_resolution, level, noising_schedule, generator):
    """What the SR model is conditioned on for a subject photo x_high [B, 3, H, W]: the photo shrunk to the base
    model's resolution, upsampled back (bilinear, align_corners=True) and noise-augmented at IF step `level`.
    Returns (z_aug [B, 3, H, W], level LongTensor [B])."""
    x_low = data.resize_images(x_high, low_resolution)  # [B, 3, h, w], what stage I would have drawn
    x_up = cascade.upsample(x_low, x_high.shape[-2:])  # [B, 3, H, W]
    return cascade.noise_augment(x_up, level, noising_schedule, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# the training loop shared by both stages: optimizer, checkpoints, resume, NaN guard, Ctrl-C

def rng_state(generator):
    """Every random number generator a step touches, in a form torch.load(weights_only=True) reads back."""
    np_state = np.random.get_state()
    return {"train": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "python": random.getstate()}


def set_rng_state(state, generator):
    generator.set_state(state["train"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def seed_everything(seed, deterministic):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def save_checkpoint(path, payload):
    """torch.save to a temporary name, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def ctrl_c_held(hold):
    """With hold, a Ctrl-C inside the block does not interrupt it: it is recorded in the list the block gets, for the
    caller to act on once its step is complete. Without hold, Ctrl-C interrupts as usual."""
    pressed = []
    if not hold or threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


class OptimizerInBackward:
    """AdamW stepped inside backward (--optimizer-in-backward), one weight tensor at a time.

    A normal step holds every gradient at once (4 bytes per trained weight: 3.4 GB for SD-1.5's 860 M) until
    optimizer.step(). Here a hook on each weight runs that weight's own AdamW update the moment backward has
    accumulated its gradient, then frees the gradient, so at most a few gradients exist at any time. What it
    gives up: no gradient accumulation (the weights change during backward), and clipping is per tensor
    (||g_i|| <= max_grad_norm for each tensor i) instead of over the global norm, which no moment of backward
    knows. Same update as torch.optim.AdamW otherwise (tests/test_train.py compares them).
    """

    def __init__(self, params, lr, weight_decay, max_grad_norm):
        self.optimizers = {k: torch.optim.AdamW([p], lr=lr, weight_decay=weight_decay) for k, p in params.items()}
        self.max_grad_norm = max_grad_norm
        self.hooks = [p.register_post_accumulate_grad_hook(self._update(self.optimizers[k]))
                      for k, p in params.items()]

    def _update(self, optimizer):
        def hook(p):  # p.grad now holds this step's full gradient of p
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
            optimizer.step()
            p.grad = None  # freed: the point of stepping in backward
        return hook

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        pass  # every gradient was freed by its hook

    def state_dict(self):
        return {k: opt.state_dict() for k, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state[k])

    def remove_hooks(self):
        for h in self.hooks:
            h.remove()


class Stage:
    """One fine-tuning stage ("base" or "sr"): the trained parameters, AdamW, a warm-up LR schedule, the RNG and
    the step count. `run` steps until max_steps, checkpointing as it goes."""

    def __init__(self, name, modules, loss_fn, cfg, max_steps, lr, device, history):
        self.name, self.modules, self.loss_fn, self.cfg, self.max_steps = name, modules, loss_fn, cfg, max_steps
        self.params = {f"{k}.{n}": p for k, m in modules.items() for n, p in m.named_parameters() if p.requires_grad}
        self.lr = lr
        if cfg.optimizer_in_backward:
            self.optimizer = OptimizerInBackward(self.params, lr, weight_decay=1e-2, max_grad_norm=cfg.max_grad_norm)
        else:
            self.optimizer = torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=1e-2)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16")
        self.generator = torch.Generator(device).manual_seed(cfg.seed + (0 if name == "base" else 1))
        self.device, self.step, self.history = device, 0, history
        # autocast keeps a bf16/fp16 copy of every weight it casts until the step's forward ends (2 bytes per
        # weight: 1.6 GiB on SD-1.5); with checkpointing, where memory is what counts, each copy is made where
        # it is used and freed with the activations instead
        self.autocast = dict(device_type=torch.device(device).type, enabled=cfg.mixed_precision != "no",
                             dtype=torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16,
                             cache_enabled=not cfg.gradient_checkpointing)
        self.ckpt_path = Path(cfg.output_dir) / "checkpoint.pt"

    # -- checkpoints
    def state(self, rng):
        return {"stage": self.name, "step": self.step, "finished": self.step >= self.max_steps,
                "trainable": {k: p.detach().cpu().clone() for k, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, "history": list(self.history),
                "settings": asdict(self.cfg)}

    def save(self, rng=None):
        save_checkpoint(self.ckpt_path, self.state(rng or rng_state(self.generator)))

    def load(self, ckpt):
        names = set(ckpt["trainable"])
        if names != set(self.params):
            raise TrainingError(f"checkpoint '{self.ckpt_path}' trains other weights than this run "
                                f"({len(names)} vs {len(self.params)} tensors): were --lora-rank or "
                                f"--train-text-encoder changed? Resume with the original settings")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(ckpt["trainable"][k])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], self.generator)
        self.step = ckpt["step"]
        self.history[:] = ckpt["history"]

    # -- one optimizer step (grad_accum micro-batches)
    def learning_rate(self):
        """Linear warm-up over --lr-warmup-steps, then constant (the step count restores it on resume)."""
        return self.lr * min(1.0, (self.step + 1) / max(self.cfg.lr_warmup_steps, 1))

    def train_step(self):
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        self.optimizer.zero_grad(set_to_none=True)
        logs = {}
        for _ in range(self.cfg.grad_accum):
            with torch.autocast(**self.autocast):
                total, parts = self.loss_fn(self.generator)
            if not torch.isfinite(total):
                return float(total.detach()), {k: float(v) for k, v in parts.items()}
            # with --optimizer-in-backward the weights are updated during this call, by OptimizerInBackward
            self.scaler.scale(total / self.cfg.grad_accum).backward()
            for k, v in {"loss": total.detach(), **parts}.items():
                logs[k] = logs.get(k, 0.0) + float(v) / self.cfg.grad_accum
        if not self.cfg.optimizer_in_backward:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return logs["loss"], logs

    def run(self):
        from tqdm.auto import tqdm
        for m in self.modules.values():
            m.train()
        bar = tqdm(total=self.max_steps, initial=self.step, desc=f"fine-tuning {self.name}", unit="step")
        rng_at_start = None
        try:
            while self.step < self.max_steps:
                rng_at_start = rng_state(self.generator)  # what a checkpoint written mid-step must restore
                with ctrl_c_held(self.cfg.optimizer_in_backward) as pressed:  # weights change in backward
                    loss, logs = self.train_step()
                if not math.isfinite(loss):
                    last = f"'{self.ckpt_path}'" if self.ckpt_path.exists() else "none (no checkpoint written yet)"
                    raise TrainingError(
                        f"{self.name} loss became {loss} at step {self.step + 1} (terms: {logs}); stopping. The "
                        f"last good checkpoint is {last}; it was not overwritten. Try a lower learning rate (now "
                        f"{self.lr:g}), --mixed-precision bf16 instead of fp16, or check the instance images")
                lr = self.learning_rate()
                self.step, rng_at_start = self.step + 1, None
                self.history.append({"stage": self.name, "step": self.step, "lr": lr,
                                     **{k: round(v, 6) for k, v in logs.items()}})
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.max_steps:
                    self.save()
                if pressed:  # Ctrl-C held during a step of the optimizer in backward: that step is complete
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            # mid-step the weights are untouched (optimizer.step is the step's last act; with the optimizer in
            # backward, Ctrl-C waits for the step to end), so the checkpoint holds the weights after `step` steps
            # and the RNG states from the start of the step that was cut short
            self.save(rng_at_start)
            print(f"\ninterrupted at step {self.step}: checkpoint saved to {self.ckpt_path}; continue with the "
                  f"same command plus --resume")
            raise
        finally:
            bar.close()
            if self.cfg.optimizer_in_backward:
                self.optimizer.remove_hooks()
        for m in self.modules.values():
            m.eval()


# ----------------------------------------------------------------------------------------------------------------
# the two stages, set up

def make_trainable(module, cfg, targets, frozen_dtype):
    """Full fine-tuning (every weight) or LoRA adapters on the attention projections (--lora-rank; the frozen base
    weights then drop to the mixed-precision dtype, the adapters stay fp32)."""
    if cfg.lora_rank:
        lora.add_lora(module.to(frozen_dtype), cfg.lora_rank, targets=targets)
    else:
        module.float().requires_grad_(True)  # trainable weights stay fp32; autocast runs the maths in bf16/fp16
    return module


def make_base_stage(cfg, backbone, cache, instance_prompt, class_prompt, x_inst, x_class, device, frozen_dtype,
                    history):
    """Stage "base": eq. (2) with B subject images of the instance prompt and B class images of the class prompt."""
    unet, B = backbone.unet, cfg.batch_size
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    modules = {"unet": make_trainable(unet, cfg, lora.UNET_TARGETS, frozen_dtype)}
    if cfg.train_text_encoder:
        modules["text_encoder"] = make_trainable(backbone.text_encoder, cfg, lora.TEXT_TARGETS, frozen_dtype)
    vae = backbone.vae

    def model_space(x, generator):
        """Pixels for IF; for SD the latents z_0 = s z, z ~ q(z | x), drawn afresh each step as diffusers does."""
        if vae is None:
            return x
        with torch.no_grad():
            return vae.latents_from_images(x.to(next(vae.parameters()).dtype), generator).float()

    def loss_fn(generator):
        if cfg.train_text_encoder:  # the encoder changes every step: encode the two prompts with gradients
            text_now = encode_prompts(backbone, [instance_prompt, class_prompt], device, grad=True)
        else:
            text_now = cache
        i = torch.randint(len(x_inst), (B,), generator=generator, device=generator.device).cpu()
        x, c = model_space(x_inst[i], generator), repeat(text_now[instance_prompt], B)
        x_pr = c_pr = None
        if x_class is not None:
            j = torch.randint(len(x_class), (B,), generator=generator, device=generator.device).cpu()
            x_pr, c_pr = model_space(x_class[j], generator), repeat(text_now[class_prompt], B)
        return dreambooth_loss(unet, backbone.schedule, x, c, x_pr, c_pr, cfg.prior_loss_weight, generator)

    return Stage("base", modules, loss_fn, cfg, cfg.max_steps, cfg.lr, device, history)


def make_sr_stage(cfg, backbone, cache, instance_prompt, device, frozen_dtype, history):
    """Stage "sr": the super-resolution model on (low-res, high-res) pairs of the subject photos, its low-res input
    noise-augmented at --sr-noise-level (the paper's continuous t, mapped to IF's step by cascade)."""
    sr_unet, B = backbone.sr_unet, cfg.batch_size
    if cfg.gradient_checkpointing:
        sr_unet.enable_gradient_checkpointing()
    make_trainable(sr_unet, cfg, lora.UNET_TARGETS, frozen_dtype)
    x_high = data.load_instance_images(cfg.instance_dir, backbone.sr_resolution).to(device)  # [N, 3, H, W]
    level = sr_sampling_level(cfg, backbone)
    c = repeat(cache[instance_prompt], B)

    def loss_fn(generator):
        i = torch.randint(len(x_high), (B,), generator=generator, device=generator.device).cpu()
        x = x_high[i]
        x_cond, levels = sr_conditioning(x, backbone.resolution, level, backbone.noising_schedule, generator)
        return dreambooth_loss(sr_unet, backbone.sr_schedule, x, c, None, None, 0.0, generator,
                               x_cond=x_cond, noise_level=levels)

    return Stage("sr", {"sr_unet": sr_unet}, loss_fn, cfg, cfg.sr_steps, cfg.sr_lr, device, history)


def save_base(cfg, backbone, out):
    """out/model: the personalised pipeline in the public layout (LoRA: out/lora holds the adapters alone, and the
    merged weights go to out/model)."""
    trained = {"unet": backbone.unet}
    if cfg.train_text_encoder:
        trained["text_encoder"] = backbone.text_encoder
    if cfg.lora_rank and lora.lora_layers(backbone.unet):
        lora.save_lora(out / "lora", trained)
        for m in trained.values():
            lora.merge_lora(m)
    save_pipeline(backbone.path, out / "model", trained)


def load_finished_base(cfg, backbone, out, device):
    """Resuming in the SR stage: the personalised base model was saved when its stage ended."""
    backbone.unet = UNet.from_pretrained(out / "model" / "unet", device=device)
    if cfg.train_text_encoder:
        enc_cls = text_classes(backbone.path)[1]
        backbone.text_encoder = enc_cls.from_pretrained(out / "model" / "text_encoder", device=device)


def save_sr(cfg, backbone, out):
    if cfg.lora_rank and lora.lora_layers(backbone.sr_unet):
        lora.save_lora(out / "sr_lora", {"unet": backbone.sr_unet})
        lora.merge_lora(backbone.sr_unet)
    save_pipeline(backbone.sr_path, out / "sr_model", {"unet": backbone.sr_unet})


# ----------------------------------------------------------------------------------------------------------------
# step 5: outputs

def _link_or_copy(src, dst):
    """Hard-link unchanged files (a T5-XXL copy would cost 10-20 GB), copy where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_pipeline(src, dst, trained):
    """Write a pipeline directory in the public layout: trained components {name: module} saved with
    save_pretrained, every other sub-directory (tokenizer, scheduler, ...) linked or copied from src."""
    src, dst = Path(src), Path(dst)
    if dst.exists():  # a previous run's output (the trained parts of this run are in memory)
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for item in sorted(src.iterdir()):
        if item.name in trained:
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, dst / item.name)
    for name, module in trained.items():
        module.save_pretrained(dst / name)
    return dst


def save_grid(images, prompts, path):
    """A PNG grid: one row per prompt (its text above), num_samples columns."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = len(prompts), images.shape[0] // len(prompts)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows), squeeze=False)
    pixels = data.to_uint8(images)
    for r in range(rows):
        for col in range(cols):
            ax = axes[r][col]
            ax.imshow(pixels[r * cols + col], interpolation="nearest")
            ax.axis("off")
        axes[r][0].set_title(prompts[r], fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(history, path):
    """Subject and prior loss per step (raw, faint; running mean, bold), one panel per stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stages = [s for s in ("base", "sr") if any(h["stage"] == s for h in history)]
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        hs = [h for h in history if h["stage"] == stage]
        for key, colour in (("subject", "C0"), ("prior", "C1")):
            if key not in hs[0]:
                continue
            steps, values = [h["step"] for h in hs], np.array([h[key] for h in hs])
            k = max(1, len(values) // 15)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(steps, values, color=colour, alpha=0.25, lw=0.8)
            ax.plot(steps[k - 1:], smooth, color=colour, lw=2, label=f"{key} loss")
        ax.set(title="base model (eq. 2: subject + lambda prior)" if stage == "base" else
               "super-resolution model (subject pairs)",
               xlabel="step", ylabel="MSE of the model's target")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def toy_metrics(images, prompts, num_samples, x_inst, x_class, sr_psnr):
    """The toy evaluator's analogs of the paper's scores on the sample grid (tinybooth.toy_evaluator):
    subject probability / fidelity (DINO analog) of the subject prompts, their prompt fidelity (CLIP-T analog),
    and for the bare class prompt how often it now draws the subject (language drift), PRES and diversity (DIV),
    next to the same scores of the frozen model's class images ("_before")."""
    from tinybooth import metrics, toy_evaluator as te
    evaluator = te.ToyEvaluator.from_pretrained()
    per = {p: images[i * num_samples:(i + 1) * num_samples].float().cpu() for i, p in enumerate(prompts)}
    class_prompt, subject_prompts = prompts[-1], prompts[:-1]
    real, subject = x_inst.float().cpu(), torch.cat([per[p] for p in subject_prompts])
    div = lambda x: metrics.diversity([list(x)], lambda a, b: te.feature_distance(evaluator, a, b))  # noqa: E731
    out = {"subject_probability": te.subject_probability(evaluator, subject).mean(),
           "subject_fidelity": te.subject_fidelity(evaluator, subject, real),
           "prompt_fidelity": torch.cat([te.prompt_fidelity(evaluator, per[p], p) for p in subject_prompts]).mean(),
           "class_prompt_subject_probability": te.subject_probability(evaluator, per[class_prompt]).mean(),
           "pres": te.subject_fidelity(evaluator, per[class_prompt], real)}
    if num_samples > 1:
        out["class_prompt_diversity"] = div(per[class_prompt])
    if x_class is not None:  # the frozen model's own samples of the class prompt: the scores before fine-tuning
        before = x_class[:max(num_samples, 2)].float().cpu()
        out["class_prompt_subject_probability_before"] = te.subject_probability(evaluator, x_class.cpu()).mean()
        out["pres_before"] = te.subject_fidelity(evaluator, x_class.float().cpu(), real)
        out["class_prompt_diversity_before"] = div(before)
    if sr_psnr is not None:
        out["sr_psnr_db"] = sr_psnr
    return {k: round(float(v), 4) for k, v in out.items()}


@torch.no_grad()
def super_resolution_psnr(backbone, cache, instance_prompt, instance_dir, sr_level, steps):
    """How much of the subject's detail the SR stage keeps: PSNR (dB) of SR(the real photo shrunk to the base
    resolution) against the real photo, with the instance prompt, sampled at the fine-tuning augmentation level."""
    x_high = data.load_instance_images(instance_dir, backbone.sr_resolution)  # [N, 3, H, W]
    x_low = data.resize_images(x_high, backbone.resolution)
    x_sr = super_resolve(backbone, cache, [instance_prompt] * len(x_high), x_low, 0, steps, sr_level)
    mse = ((x_sr.clamp(-1, 1).cpu() - x_high) / 2).square().mean()  # in [0, 1] pixel units
    return float(10 * torch.log10(1 / mse))


# ----------------------------------------------------------------------------------------------------------------
# the run

def main(argv=None):
    """The command line: parse, fill in the backbone's defaults, run. Returns the output directory."""
    return run(settings_from_args(argv))


def run(cfg):
    """One DreamBooth run (steps 1-5 of the module docstring) with the settings cfg (a TrainConfig).

    Returns the output directory. Torch's deterministic-algorithms switch is put back afterwards, so a notebook or a
    test session that calls run() keeps its own setting."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _run(cfg)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def _run(cfg):
    t_start = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, cfg = resume_checkpoint(cfg)
    seed_everything(cfg.seed, cfg.deterministic)
    device = torch.device(cfg.device)
    frozen_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    backbone = load_backbone(cfg, device, frozen_dtype)

    # 1. identifier and prompts
    identifier = choose_identifier(cfg, backbone)
    cfg = replace(cfg, identifier=identifier)
    instance_prompt, class_prompt = subject_prompt(identifier, cfg.class_noun), f"a {cfg.class_noun}"
    prompts = sample_prompts(cfg, identifier)
    print_settings(cfg, instance_prompt, class_prompt, backbone)
    with open(out / "settings.json", "w") as f:
        json.dump({**asdict(cfg), "instance_prompt": instance_prompt, "class_prompt": class_prompt}, f, indent=2)
    cache = encode_prompts(backbone, list(dict.fromkeys([instance_prompt, class_prompt, "", *prompts])), device,
                           frozen_dtype)

    # 2. the subject's photos and the class images
    x_inst = data.load_instance_images(cfg.instance_dir, backbone.resolution).to(device)  # [N, 3, R, R]
    print(f"instance images: {len(x_inst)} from {cfg.instance_dir} at {backbone.resolution} px")
    t0 = time.time()
    x_class = None
    if cfg.prior_preservation:
        paths = generate_class_images(cfg, backbone, cache, class_prompt)
        x_class = data.load_images(paths, backbone.resolution).to(device)  # [M, 3, R, R]
    timings = {"class_images_s": round(time.time() - t0, 1)}

    # 3. fine-tune the base model on eq. (2)
    history = []
    t0 = time.time()
    base = make_base_stage(cfg, backbone, cache, instance_prompt, class_prompt, x_inst, x_class, device,
                           frozen_dtype, history)
    if ckpt is not None and ckpt["stage"] == "sr":   # the base stage finished before the interruption
        load_finished_base(cfg, backbone, out, device)
        history[:] = [h for h in ckpt["history"] if h["stage"] == "base"]
    else:
        if ckpt is not None:
            base.load(ckpt)
        base.run()
    save_base(cfg, backbone, out)
    timings["base_s"] = round(time.time() - t0, 1)
    if cfg.train_text_encoder:  # the prompts mean something new now: encode them again
        cache = encode_prompts(backbone, list(cache), device)

    # 4. fine-tune the super-resolution model on (low-res, high-res) subject pairs
    t0 = time.time()
    if backbone.sr_unet is not None and cfg.sr_steps > 0:
        sr = make_sr_stage(cfg, backbone, cache, instance_prompt, device, frozen_dtype, history)
        if ckpt is not None and ckpt["stage"] == "sr":
            sr.load(ckpt)
        sr.run()
        save_sr(cfg, backbone, out)
    timings["sr_s"] = round(time.time() - t0, 1)

    # 5. samples, plot, metrics
    t0 = time.time()
    metrics = {"final_loss": final_losses(history)}
    if cfg.num_samples > 0:
        # a fine-tuned SR model is sampled at the augmentation level it was fine-tuned at; otherwise IF's default
        sr_level, grid_prompts = sr_sampling_level(cfg, backbone), [p for p in prompts for _ in range(cfg.num_samples)]
        images = generate(backbone, cache, grid_prompts, seed=cfg.seed, steps=cfg.sample_steps, sampler="ancestral",
                          guidance=cfg.guidance)
        save_grid(images, prompts, out / "samples.png")  # the base model: where [V] is bound to the subject
        psnr = None
        if backbone.sr_unet is not None:
            save_grid(super_resolve(backbone, cache, grid_prompts, images, cfg.seed, cfg.sample_steps, sr_level),
                      prompts, out / "samples_cascade.png")
            psnr = super_resolution_psnr(backbone, cache, instance_prompt, cfg.instance_dir, sr_level,
                                         cfg.sample_steps)
        if cfg.backbone == "toy":
            metrics["toy"] = toy_metrics(images, prompts, cfg.num_samples, x_inst, x_class, psnr)
    plot_losses(history, out / "loss.png")
    timings["samples_s"] = round(time.time() - t0, 1)
    metrics["timings"] = {**timings, "total_s": round(time.time() - t_start, 1)}
    with open(out / "metrics.json", "w") as f:
        json.dump({"settings": asdict(cfg), "instance_prompt": instance_prompt, "class_prompt": class_prompt,
                   "sample_prompts": prompts, **metrics, "history": history}, f, indent=2)
    print_outputs(cfg, out, metrics)
    return out


def resume_checkpoint(cfg):
    """(checkpoint, cfg) to continue from with --resume, after checking the checkpoint belongs to these settings
    (the identifier found by the rare-token search is taken from it); (None, cfg) without --resume."""
    path = Path(cfg.output_dir) / "checkpoint.pt"
    if not cfg.resume:
        if path.exists():
            print(f"note: starting afresh; '{path}' will be overwritten (use --resume to continue it)")
        return None, cfg
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint at '{path}'; run without --resume to start, or point "
                         f"--output-dir at the run to continue")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and numbers only
    old = ckpt["settings"]
    cfg = replace(cfg, identifier=cfg.identifier or old["identifier"])
    free = {"resume", "max_steps", "sr_steps", "checkpoint_every", "num_samples", "sample_steps", "device"}
    changed = {k: (old[k], v) for k, v in asdict(cfg).items() if k not in free and old.get(k) != v}
    if changed:
        raise ValueError(f"--resume: these settings differ from the checkpoint's run (checkpoint, now): {changed}; "
                         f"resume with the original settings")
    print(f"resuming the {ckpt['stage']} stage at step {ckpt['step']} from '{path}'")
    return ckpt, cfg


def print_settings(cfg, instance_prompt, class_prompt, backbone):
    print("tinybooth.train: DreamBooth fine-tuning with these settings (saved to settings.json):")
    for k, v in asdict(cfg).items():
        print(f"  {k:24s} {v}")
    sr = f", super-resolution {backbone.sr_resolution} px" if backbone.sr_unet is not None else ""
    print(f"  {'instance prompt':24s} '{instance_prompt}'\n  {'class prompt':24s} '{class_prompt}'\n"
          f"  {'model':24s} {backbone.kind.upper()} pipeline, base {backbone.resolution} px{sr}")


def final_losses(history):
    """Mean of each logged term over the last 10 steps of each stage."""
    out = {}
    for stage in ("base", "sr"):
        hs = [h for h in history if h["stage"] == stage][-10:]
        if hs:
            out[stage] = {k: round(float(np.mean([h[k] for h in hs])), 5) for k in hs[0]
                          if k not in ("stage", "step", "lr")}
    return out


def print_outputs(cfg, out, metrics):
    print(f"\ndone in {metrics['timings']['total_s']:.0f} s. Outputs in {out.resolve()}:")
    for name, what in (("model", "the personalised pipeline (public layout; loads with from_pretrained)"),
                       ("sr_model", "the personalised super-resolution model"),
                       ("lora", "the LoRA adapters (pytorch_lora_weights.safetensors)"),
                       ("samples.png", "sample grid: recontextualisation, properties, and the bare class prompt"),
                       ("samples_cascade.png", "the same samples after the super-resolution stage"),
                       ("loss.png", "subject and prior loss per step"),
                       ("metrics.json", "settings, losses, timings" + (", toy-evaluator scores"
                                                                         if "toy" in metrics else "")),
                       ("checkpoint.pt", "last checkpoint (for --resume)")):
        if (out / name).exists():
            print(f"  {name:20s} {what}")
    if "toy" in metrics:
        print(f"toy evaluator: {metrics['toy']}")


if __name__ == "__main__":
    main()
