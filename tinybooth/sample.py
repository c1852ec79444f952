"""`python -m tinybooth.sample`: text -> image grid with a cascade (DeepFloyd IF) or a latent model (SD 1.x).

    python -m tinybooth.sample --prompt "a red star on a blue background"             # the embedded toy cascade
    python -m tinybooth.sample --model weights/IF-I-M-v1.0 --sr-model weights/IF-II-M-v1.0 \\
        --prompt "a photo of a corgi on the beach" --num-images 4 --out grid.png
    python -m tinybooth.sample --model weights/stable-diffusion-v1-5 --prompt "a photo of a corgi" --out sd.png

What runs, in order (each stage holds the GPU alone):
  1. the prompts are encoded once (T5 for IF, CLIP for SD) and cached on disk (tinybooth.cascade.encode_prompts);
     the text encoder is freed before any U-Net is loaded, and not loaded at all when every prompt is cached;
  2. IF: stage I draws s x s images (s = its sample_size, 64); with --sr-model, stage II upsamples them,
     noise-augments them at --sr-noise-level and draws S x S images (256). SD: latents, then the VAE decodes them;
  3. a PNG grid (one row per prompt, one column per image) with every setting and seed in its text metadata
     (key "tinybooth", JSON); with --sr-model the stage-I grid is written next to it (<out>_stage1.png).
Image i of a prompt uses its own generator seeded with --seed + i, so `--seed S --num-images 1` redraws one.
The model family is read from model_index.json (or, failing that, from its subfolders).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from . import cascade, checkpoint
from .checkpoint import CheckpointError
from .errors import UserError, main_guard
from .schedule import DiscreteSchedule
from .unet import UNet
from .vae import WEIGHTS_STEM, AutoencoderKL

ASSETS = Path(__file__).resolve().parent / "assets"
TOY_BASE, TOY_SR = ASSETS / "toy-IF-I", ASSETS / "toy-IF-II"
# per family: steps, guidance, sampler (IF's and SD's diffusers pipeline defaults; IF samples with its DDPM). The
# embedded toy (model_index.json has a "_tinybooth" entry) samples best at guidance 5 (its results.json) and needs
# fewer steps for its 32 px shapes.
DEFAULTS = {"if": dict(steps=100, guidance=7.0, sampler="ancestral"),
            "sd": dict(steps=50, guidance=7.5, sampler="ddim"),
            "sr": dict(steps=50, guidance=4.0),
            "toy": dict(steps=50, guidance=5.0, sampler="ancestral"),
            "toy-sr": dict(steps=25, guidance=4.0)}
PIPELINE_CLASSES = {"IFPipeline": "if", "StableDiffusionPipeline": "sd", "IFSuperResolutionPipeline": "sr"}


def download_hint(model_dir):
    """What to run to get model_dir: the download command, or for the embedded toy cascade its pretraining."""
    d = Path(model_dir)
    if d.resolve().parent == ASSETS:
        return ("the embedded toy cascade ships with the repository (git checkout tinybooth/assets) and can be "
                "regenerated with:  python -m tinybooth.pretrain_toy --out tinybooth/assets")
    return checkpoint.download_hint(d) or "check the path (python weights_download.py --list shows the models " \
                                          "it fetches)"


def model_index(model_dir):
    """The pipeline's model_index.json as a dict ({} when there is none)."""
    index = Path(model_dir) / "model_index.json"
    return checkpoint.read_json(index) if index.exists() else {}


def detect_family(model_dir):
    """'if' (IF stage I), 'sr' (IF stage II) or 'sd', from model_index.json's _class_name or the subfolders."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory '{d}' does not exist; {download_hint(d)}")
    name = model_index(d).get("_class_name")
    if name in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[name]
    if (d / "vae").is_dir():
        return "sd"
    if (d / "image_noising_scheduler").is_dir():
        return "sr"
    if (d / "unet").is_dir():
        return "if"
    raise CheckpointError(f"'{d}' is neither an IF nor an SD pipeline directory (no model_index.json, no unet/); "
                          f"{download_hint(d)}")


def require(model_dir, parts):
    """Refuse early, naming the download command, when a part of a pipeline directory is missing."""
    missing = [p for p in parts if not (Path(model_dir) / p).exists()]
    if missing:
        raise CheckpointError(f"'{model_dir}' is incomplete: {', '.join(missing)} missing; {download_hint(model_dir)}")


def parse_noise_level(text):
    """'250' -> IF step 250; '1e-3' or '0.25' (with '.' or 'e') -> the paper's continuous level, mapped to a step."""
    if any(ch in text for ch in ".eE"):
        return cascade.level_from_continuous(float(text))
    return int(text)


def empty_cache():
    """Hand the memory of a deleted stage back before the next one loads."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_unet(path, dtype, device):
    """The U-Net of a pipeline, from whichever precision was downloaded (weights_download.py --variant fp16)."""
    return UNet.from_pretrained(path, dtype=dtype, device=device, variant=cascade.stored_variant(path, WEIGHTS_STEM))


def generate(model, prompts, sr_model=None, num_images=1, seed=0, steps=None, guidance=None, sampler=None,
             eta=0.0, sr_steps=None, sr_guidance=None, sr_noise_level=cascade.IF_NOISE_LEVEL, device="cpu",
             dtype=torch.float32, cache_dir=None, text_device=None, progress=True):
    """Images for every (prompt, image) pair: {"images": [P * N, 3, H, W] in [-1, 1], "stage1": ... or None,
    "settings": dict}. See the module docstring for what runs. text_device: where the text encoder runs (default:
    device; "cpu" when T5-XXL, 9.5 GB in bf16, does not fit the GPU)."""
    family = detect_family(model)
    if family == "sr":
        raise ValueError(f"'{model}' is an IF stage-II (super-resolution) model; pass it as --sr-model and give a "
                         f"stage-I model as --model")
    if sr_model is not None and (family != "if" or detect_family(sr_model) != "sr"):
        raise ValueError(f"--sr-model must be an IF stage-II directory used with an IF stage-I --model; got "
                         f"{family} model '{model}' and '{sr_model}'")
    pick = lambda value, default: default if value is None else value   # noqa: E731
    toy = family == "if" and "_tinybooth" in model_index(model)
    d, d_sr = (DEFAULTS["toy"], DEFAULTS["toy-sr"]) if toy else (DEFAULTS[family], DEFAULTS["sr"])
    steps, guidance, sampler = pick(steps, d["steps"]), pick(guidance, d["guidance"]), pick(sampler, d["sampler"])
    sr_steps, sr_guidance = pick(sr_steps, d_sr["steps"]), pick(sr_guidance, d_sr["guidance"])
    require(model, ["unet/config.json", "scheduler/scheduler_config.json"]
            + (["vae/config.json"] if family == "sd" else []))
    if sr_model is not None:
        require(sr_model, ["unet/config.json", "scheduler/scheduler_config.json",
                           "image_noising_scheduler/scheduler_config.json"])
    seeds = [seed + i for i in range(num_images)]
    settings = dict(model=str(model), sr_model=str(sr_model) if sr_model else None, family=family, prompts=prompts,
                    num_images=num_images, seeds=seeds, steps=steps, guidance=guidance, sampler=sampler, eta=eta,
                    device=str(device), dtype=str(dtype).replace("torch.", ""))

    # 1. text, once; the encoder leaves before any U-Net arrives
    text_dtype = torch.float32 if dtype == torch.float16 else dtype   # T5 overflows in fp16
    try:
        c, _ = cascade.encode_prompts(prompts + [""], model, family, cache_dir=cache_dir,
                                      device=text_device or device, dtype=text_dtype)
    except FileNotFoundError as e:  # a tokenizer file; a CheckpointError already says what to do
        raise CheckpointError(f"{e}\n{download_hint(model)}") from None
    c, c_uncond = c[:-1].repeat_interleave(num_images, 0), c[-1:]          # [P N, L, D], [1, L, D]

    def run(stage, label):
        """stage(i, c_i, generator) for every image i, each with its own seeded generator."""
        out = []
        for i in tqdm(range(len(c)), desc=label, disable=not progress or len(c) < 2):
            g = torch.Generator().manual_seed(seeds[i % num_images])
            out.append(stage(i, c[i:i + 1], g))
        return torch.cat(out)

    # 2. the image stages, one U-Net on the device at a time
    unet = load_unet(Path(model) / "unet", dtype, device)
    schedule = DiscreteSchedule.from_pretrained(Path(model) / "scheduler")
    common = dict(guidance=guidance, num_steps=steps, sampler=sampler, eta=eta, progress=progress)
    if family == "sd":
        # the VAE decodes in fp32 even from fp16 files, as diffusers upcasts it (force_upcast)
        vae = AutoencoderKL.from_pretrained(Path(model) / "vae", dtype=torch.float32, device=device,
                                            variant=cascade.stored_variant(Path(model) / "vae", WEIGHTS_STEM))
        images = run(lambda i, c_i, g: cascade.sample_latent(unet, vae, schedule, c_i, c_uncond, generator=g,
                                                             **common), "images")
        del unet, vae
        empty_cache()
        return dict(images=images, stage1=None, settings=settings)
    x = run(lambda i, c_i, g: cascade.sample_base(unet, schedule, c_i, c_uncond, generator=g, **common), "stage I")
    del unet
    empty_cache()
    if sr_model is None:
        return dict(images=x, stage1=None, settings=settings)

    sr_unet = load_unet(Path(sr_model) / "unet", dtype, device)
    sr_schedule = DiscreteSchedule.from_pretrained(Path(sr_model) / "scheduler")
    noising = DiscreteSchedule.from_pretrained(Path(sr_model) / "image_noising_scheduler")
    settings.update(sr_steps=sr_steps, sr_guidance=sr_guidance, sr_noise_level=sr_noise_level,
                    sr_noise_level_continuous=cascade.continuous_from_level(sr_noise_level,
                                                                            noising.num_train_timesteps))
    common.update(guidance=sr_guidance, num_steps=sr_steps)
    images = run(lambda i, c_i, g: cascade.sample_super_resolution(
        sr_unet, sr_schedule, noising, x[i:i + 1], c_i, c_uncond, noise_level=sr_noise_level, generator=g, **common),
        "stage II")
    del sr_unet
    empty_cache()
    return dict(images=images, stage1=x, settings=settings)


def to_grid(images, rows):
    """[N, 3, H, W] in [-1, 1] -> a PIL image with `rows` rows (N / rows columns), 2 px white gaps."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()   # as IF / SD post-process
    n, _, h, w = x.shape
    cols = n // rows
    grid = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[r * (h + 2):r * (h + 2) + h, col * (w + 2):col * (w + 2) + w] = x[i].permute(1, 2, 0).numpy()
    return Image.fromarray(grid)


def save_grid(images, rows, path, settings):
    """Write the grid PNG with the settings and seeds as a tEXt chunk "tinybooth" (JSON)."""
    meta = PngInfo()
    meta.add_text("tinybooth", json.dumps(settings))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    to_grid(images, rows).save(path, pnginfo=meta)
    return path


def main(argv=None):
    """The command: a mistake in the user's input ends as one `error: ...` line and exit status 2 (see errors)."""
    return main_guard(_main, argv)


def _main(argv):
    default_model = TOY_BASE if TOY_BASE.is_dir() else None
    p = argparse.ArgumentParser(prog="python -m tinybooth.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=default_model, type=Path,
                   help="IF stage-I or SD pipeline directory (default: the embedded toy cascade)")
    p.add_argument("--sr-model", type=Path, default=None,
                   help="IF stage-II directory (default: the toy's, when --model is the toy)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several rows)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (grid columns)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (IF: 100, SD: 50, toy: 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (IF: 7, SD: 7.5, toy: 5)")
    p.add_argument("--sampler", choices=["ancestral", "ddim"], default=None, help="IF: ancestral, SD: ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--sr-steps", type=int, default=None, help="stage-II steps (IF: 50, toy: 25)")
    p.add_argument("--sr-guidance", type=float, default=None, help="stage-II guidance (4)")
    p.add_argument("--sr-noise-level", type=parse_noise_level, default=cascade.IF_NOISE_LEVEL,
                   help="stage-II noise augmentation: an IF step 0..999 (default 250), or the paper's continuous "
                        "level written with a '.' or an 'e' (0.25, 1e-3); 0 = none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="U-Net precision (default: bf16 on a GPU, fp32 on the CPU); text in bf16/fp32, VAE in fp32")
    p.add_argument("--text-device", default=None,
                   help="where T5 / CLIP runs, once per new prompt (default: --device; 'cpu' if T5-XXL does not fit)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is much faster for the tiny toy models on "
                        "a busy machine)")
    p.add_argument("--cache-dir", type=Path, default=None, help="text-embedding cache (default ~/.cache/tinybooth)")
    p.add_argument("--out", type=Path, default=Path("grid.png"), help="output PNG (default grid.png)")
    args = p.parse_args(argv)
    if args.model is None:
        p.error("--model is required (the embedded toy cascade is not in tinybooth/assets)")
    if args.sr_model is None and args.model == TOY_BASE and TOY_SR.is_dir():
        args.sr_model = TOY_SR
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    try:
        out = generate(args.model, args.prompt, args.sr_model, args.num_images, args.seed, args.steps, args.guidance,
                       args.sampler, args.eta, args.sr_steps, args.sr_guidance, args.sr_noise_level, args.device,
                       dtype, args.cache_dir, args.text_device)
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from e  # library checks not yet UserErrors (e.g. scheduler configs): user input too
    rows = len(args.prompt)
    save_grid(out["images"], rows, args.out, out["settings"])
    print(f"wrote {args.out} ({rows} x {args.num_images} images of {tuple(out['images'].shape[-2:])})")
    if out["stage1"] is not None:
        stage1 = args.out.with_name(args.out.stem + "_stage1.png")
        save_grid(out["stage1"], rows, stage1, out["settings"])
        print(f"wrote {stage1} (stage I)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
