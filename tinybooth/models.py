"""Model directories: where the pretrained models are, which family a directory holds, and the defaults of each.

A *pipeline directory* is the public Hugging Face layout of a text-to-image model, as `weights_download.py` fetches
it and as `tinybooth.train` writes a personalised one:

    IF stage I (and the embedded toy)   model_index.json, tokenizer/, text_encoder/ (T5), unet/, scheduler/
    IF stage II (super-resolution)      model_index.json, unet/, scheduler/, image_noising_scheduler/
    Stable Diffusion 1.x                model_index.json, tokenizer/, text_encoder/ (CLIP), unet/, vae/, scheduler/

Everything a command needs to know about a directory lives here: its family (`detect_family`), the family's
defaults (`FAMILY_DEFAULTS`, one table for training and sampling), the loaded components (`load_pipeline`), what
to run when a part is missing (`download_hint`), and how a personalised copy is written (`save_pipeline`).
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .cascade import TEXT_CLASSES, stored_variant
from . import checkpoint
from .checkpoint import CheckpointError
from .files import atomic_directory, copy_tree, is_inside
from .schedule import DiscreteSchedule
from .unet import UNet
from .vae import WEIGHTS_STEM, AutoencoderKL

ASSETS = Path(__file__).resolve().parent / "assets"
ROOT = Path(__file__).resolve().parent.parent
TOY_BASE, TOY_SR = ASSETS / "toy-IF-I", ASSETS / "toy-IF-II"   # the embedded default: tiny T5 + 32 px, 32 -> 64 px
TOY_SUBJECT = ROOT / "examples" / "toy_subject"                # its subject: five photos of a teal/pink star
TOY_SUBJECT_INFO = ASSETS / "toy_subject.json"                  # the subject's class noun and how it was drawn

# Per family: fine-tuning (paper: lr 1e-5 for Imagen, 5e-6 for SD, ~1000 steps, lambda = 1; the identifier from
# the rare-token search) and sampling (IF's and SD's diffusers pipeline defaults). The toy model is ~100x smaller
# and must finish in two CPU minutes: higher learning rates and fewer steps. Its tiny T5 is fine-tuned too (frozen,
# it encodes "a [V] star" almost as "a star", pooled cosine 0.93), at its own, higher lr: the identifier then moves
# early while the U-Net, at a lower lr, learns the subject without copying the photos' backgrounds (one lr of 5e-4
# for both drew the subject in more samples but ignored the asked background more often and narrowed "a star";
# benchmarks/toy_recipes.md has the runs compared). Its identifier is "fw", a candidate of the paper's search (ids
# 5000-10000, one token, no word) picked because the shipped T5 encodes "a fw star" least like "a star". Its SR
# stage samples without guidance: on three runs it kept more of the subject's photos than IF's guidance 4 (PSNR
# 23.5-24.0 against 22.2-23.0 dB) with one U-Net pass a step instead of two (benchmarks/toy_recipes.md).
FAMILY_DEFAULTS = {
    "toy": dict(lr=3e-4, text_encoder_lr=1e-3, sr_lr=1e-4, lr_schedule="constant", max_steps=300, sr_steps=30,
                batch_size=4, num_class_images=32, class_steps=25, steps=25, guidance=5.0, sampler="ancestral",
                sr_sample_steps=10, sr_guidance=1.0, checkpoint_every=100, num_samples=3, train_text_encoder=True,
                prior_loss_weight=0.5, identifier="fw"),
    "if": dict(lr=1e-5, text_encoder_lr=None, sr_lr=1e-5, lr_schedule="constant", max_steps=1000, sr_steps=500,
               batch_size=1, num_class_images=200, class_steps=100, steps=100, guidance=7.0, sampler="ancestral",
               sr_sample_steps=50, sr_guidance=4.0, checkpoint_every=250, num_samples=4, train_text_encoder=False,
               prior_loss_weight=1.0, identifier=None),
    "sd": dict(lr=5e-6, text_encoder_lr=None, sr_lr=None, lr_schedule="constant", max_steps=1000, sr_steps=0,
               batch_size=1, num_class_images=200, class_steps=50, steps=50, guidance=7.5, sampler="pndm",
               sr_sample_steps=None, sr_guidance=None, checkpoint_every=250, num_samples=4, train_text_encoder=False,
               prior_loss_weight=1.0, identifier=None),
}
PIPELINE_CLASSES = {"IFPipeline": "if", "StableDiffusionPipeline": "sd", "IFSuperResolutionPipeline": "sr"}


# ----------------------------------------------------------------------------------------------------------------
# what a directory holds

def download_hint(model_dir):
    """What to do about a missing model: the download command for a public model, the repository for the toy."""
    d = Path(model_dir)
    if d.resolve().parent == ASSETS:
        return ("the embedded toy cascade ships with the repository (git checkout tinybooth/assets) and can be "
                "regenerated with:  python -m tinybooth.pretrain_toy --out tinybooth/assets")
    return checkpoint.download_hint(d) or ("check the path, or download a public model (python weights_download.py "
                                           "--list shows the models it fetches)")


def model_index(model_dir):
    """The pipeline's model_index.json as a dict ({} when there is none)."""
    index = Path(model_dir) / "model_index.json"
    if not index.exists():
        return {}
    return checkpoint.read_json(index)


def detect_family(model_dir):
    """'if' (IF stage I), 'sr' (IF stage II) or 'sd', from model_index.json's _class_name or the subfolders."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory '{d}' does not exist; {download_hint(d)}")
    name = model_index(d).get("_class_name")
    if name in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[name]
    for sub, family in (("vae", "sd"), ("image_noising_scheduler", "sr"), ("unet", "if")):
        if (d / sub).is_dir():
            return family
    raise CheckpointError(f"'{d}' is neither an IF nor an SD pipeline directory (no model_index.json, no unet/); "
                          f"{download_hint(d)}")


def is_toy(model_dir):
    """The embedded toy cascade, or a model personalised from it (pretrain_toy marks its model_index.json)."""
    return "_tinybooth" in model_index(model_dir)


def defaults_for(model_dir):
    """The FAMILY_DEFAULTS row of a stage-I pipeline directory ('toy', 'if' or 'sd') and its key."""
    family = detect_family(model_dir)
    if family == "sr":
        raise CheckpointError(f"'{model_dir}' is an IF stage-II (super-resolution) model; pass it as --sr-model and "
                              f"the stage-I pipeline as --model")
    key = "toy" if family == "if" and is_toy(model_dir) else family
    return key, FAMILY_DEFAULTS[key]


def require(model_dir, parts):
    """Refuse early, naming what is missing and what to run, when a part of a pipeline directory is absent."""
    missing = [p for p in parts if not (Path(model_dir) / p).exists()]
    if missing:
        raise CheckpointError(f"'{model_dir}' is incomplete: {', '.join(missing)} missing; {download_hint(model_dir)}")


# ----------------------------------------------------------------------------------------------------------------
# loading

@dataclass
class Pipeline:
    """The loaded parts of a pipeline (and, for IF, its super-resolution stage). family: "if" (pixels, T5) or "sd"
    (latents, CLIP). text_encoder is None when prompts are encoded through the on-disk cache instead."""
    family: str
    path: Path
    unet: UNet
    schedule: DiscreteSchedule
    tokenizer: object = None
    text_encoder: object = None
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


def load_unet(path, dtype=None, device=None):
    """A U-Net from whichever precision was downloaded (weights_download.py --variant fp16)."""
    return UNet.from_pretrained(path, dtype=dtype, device=device, variant=stored_variant(path, WEIGHTS_STEM))


def load_text_encoder(model_dir, family, dtype=None, device=None):
    """(tokenizer, encoder) of a stage-I pipeline: T5 v1.1 for IF and the toy, CLIP for SD."""
    tokenizer_cls, encoder_cls = TEXT_CLASSES[family]
    encoder = encoder_cls.from_pretrained(Path(model_dir) / "text_encoder", dtype=dtype, device=device,
                                          variant=stored_variant(Path(model_dir) / "text_encoder", "model"))
    return tokenizer_cls.from_pretrained(Path(model_dir) / "tokenizer"), encoder


def load_pipeline(model_dir, sr_dir=None, device="cpu", vae_dtype=None, text_encoder=False):
    """Read a stage-I pipeline (and an IF stage-II directory): U-Nets in fp32 (the weights fine-tuning trains),
    the VAE in vae_dtype, the text encoder only when asked (when it is trained; otherwise prompts go through
    generate.encode_prompts' cache and the encoder never sits next to the U-Net)."""
    model_dir = Path(model_dir)
    family = detect_family(model_dir)
    require(model_dir, ["tokenizer", "text_encoder", "unet", "scheduler"] + (["vae"] if family == "sd" else []))
    pipe = Pipeline(family=family, path=model_dir, unet=load_unet(model_dir / "unet", device=device),
                    schedule=DiscreteSchedule.from_pretrained(model_dir / "scheduler"))
    if text_encoder:
        pipe.tokenizer, pipe.text_encoder = load_text_encoder(model_dir, family, device=device)
    else:
        pipe.tokenizer = TEXT_CLASSES[family][0].from_pretrained(model_dir / "tokenizer")
    if family == "sd":
        pipe.vae = AutoencoderKL.from_pretrained(model_dir / "vae", dtype=vae_dtype, device=device,
                                                 variant=stored_variant(model_dir / "vae", WEIGHTS_STEM))
    if sr_dir is not None:
        load_super_resolution(pipe, sr_dir, device)
    return pipe


def load_super_resolution(pipe, sr_dir, device="cpu", dtype=None):
    """Attach an IF stage-II directory (U-Net, its scheduler and the image-noising scheduler) to pipe."""
    sr_dir = Path(sr_dir)
    if pipe.family != "if" or detect_family(sr_dir) != "sr":
        raise CheckpointError(f"--sr-model must be an IF stage-II directory used with an IF stage-I --model; got "
                              f"{pipe.family} model '{pipe.path}' and '{sr_dir}'")
    require(sr_dir, ["unet", "scheduler", "image_noising_scheduler"])
    pipe.sr_path, pipe.sr_unet = sr_dir, load_unet(sr_dir / "unet", dtype, device)
    pipe.sr_schedule = DiscreteSchedule.from_pretrained(sr_dir / "scheduler")
    pipe.noising_schedule = DiscreteSchedule.from_pretrained(sr_dir / "image_noising_scheduler")
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# saving a personalised pipeline

def save_pipeline(src, dst, trained):
    """Write a pipeline directory in the public layout: the trained components {name: module} with save_pretrained,
    every other part (tokenizer, scheduler, ...) copied from src. Atomic (tinybooth.files.atomic_directory): a
    crash or a full disk leaves either the previous dst or the new one, never a mixture. Copies, never links: the
    outputs are the user's to edit, and editing them never edits the input model or the package."""
    src, dst = Path(src), Path(dst)
    if is_inside(dst, src) or is_inside(src, dst):
        raise CheckpointError(f"cannot write the personalised model to '{dst}': it overlaps the input model '{src}'; "
                              f"choose another --output-dir")
    with atomic_directory(dst) as tmp:
        for item in sorted(src.iterdir()):
            if item.name in trained:
                continue
            if item.is_dir():
                copy_tree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        for name, module in trained.items():
            module.save_pretrained(tmp / name)
    return dst


def toy_class_noun():
    """The class noun the toy subject ships with (tinybooth/assets/toy_subject.json)."""
    return json.loads(TOY_SUBJECT_INFO.read_text())["class_noun"]


def empty_cache():
    """Hand the memory of a deleted stage back before the next one loads."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
