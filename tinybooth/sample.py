"""`python -m tinybooth.sample`: text -> image grid with a cascade (DeepFloyd IF) or a latent model (SD 1.x).

    python -m tinybooth.sample --prompt "a red star on a blue background"             # the embedded toy cascade
    python -m tinybooth.sample --model weights/IF-I-M-v1.0 --sr-model weights/IF-II-M-v1.0 \\
        --prompt "a photo of a corgi on the beach" --num-images 4 --out grid.png
    python -m tinybooth.sample --model weights/stable-diffusion-v1-5 --prompt "a photo of a corgi" --out sd.png

What runs, in order (each stage holds the GPU alone; tinybooth.generate.text_to_image):
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
import sys
from pathlib import Path

import torch

from tinybooth import models, plots
from tinybooth.cascade import IF_NOISE_LEVEL, parse_noise_level
from tinybooth.errors import ArgumentParser, main_guard
from tinybooth.generate import text_to_image
from tinybooth.samplers import IF_TIMESTEPS, SAMPLERS


def parse_timesteps(text):
    """'smart27' (an IF grid) or '999,800,600' (a list of training steps)."""
    if text in IF_TIMESTEPS:
        return text
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a grid name ({', '.join(IF_TIMESTEPS)}) or comma-separated "
                                         f"steps, got {text!r}") from None


def build_parser():
    p = ArgumentParser(prog="python -m tinybooth.sample", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=models.TOY_BASE, type=Path,
                   help="IF stage-I or SD pipeline directory (default: the embedded toy cascade)")
    p.add_argument("--sr-model", type=Path, default=None,
                   help="IF stage-II directory (default: the toy's, when --model is the toy)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several rows)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (grid columns)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (IF: 100, SD: 50, toy: 25)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (IF: 7, SD: 7.5, toy: 5)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: the one the model's scheduler_config.json names (IF: ancestral, SD 1.x: pndm)")
    p.add_argument("--timesteps", type=parse_timesteps, default=None,
                   help="stage-I steps as a list (999,800,...) or an IF grid name instead of --steps: "
                        + ", ".join(IF_TIMESTEPS))
    p.add_argument("--sr-timesteps", type=parse_timesteps, default=None,
                   help="stage-II steps as a list or an IF grid name (smart27, super27, super40, super100)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--sr-steps", type=int, default=None, help="stage-II steps (IF: 50, toy: 25)")
    p.add_argument("--sr-guidance", type=float, default=None, help="stage-II guidance (4)")
    p.add_argument("--sr-noise-level", type=parse_noise_level, default=IF_NOISE_LEVEL,
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
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def run(argv=None):
    args = build_parser().parse_args(argv)
    if args.sr_model is None and args.model == models.TOY_BASE:
        args.sr_model = models.TOY_SR
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    out = text_to_image(args.model, args.prompt, args.sr_model, args.num_images, args.seed, args.steps,
                        args.guidance, args.sampler, args.eta, args.sr_steps, args.sr_guidance, args.sr_noise_level,
                        args.device, dtype, args.cache_dir, args.text_device, timesteps=args.timesteps,
                        sr_timesteps=args.sr_timesteps)
    settings, rows = out["settings"], len(args.prompt)
    sr = f"; stage II: {settings['sr_sampler']}" if args.sr_model else ""
    print(f"sampler: {settings['sampler']} ({settings['sampler_from']}){sr}")
    plots.save_grid(out["images"], rows, args.out, settings=out["settings"])
    print(f"wrote {args.out} ({rows} x {args.num_images} images of {tuple(out['images'].shape[-2:])})")
    if out["stage1"] is not None:
        stage1 = args.out.with_name(args.out.stem + "_stage1.png")
        plots.save_grid(out["stage1"], rows, stage1, settings=out["settings"])
        print(f"wrote {stage1} (stage I)")


def main(argv=None):
    """python -m tinybooth.sample: exit status 0, or 2 for a mistake in the input."""
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
