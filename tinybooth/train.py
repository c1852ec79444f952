"""`python -m tinybooth.train`: DreamBooth (Ruiz et al., CVPR 2023, Sec. 4), the main job.

Given 3-5 photos of a subject and its class noun, bind a rare identifier [V] to the subject inside a pretrained
text-to-image model, so that "a [V] dog on the beach" draws *that* dog on a beach. The method is
tinybooth/dreambooth.py (read it beside Sec. 4), the run on disk tinybooth/experiment.py, the training loop
tinybooth/training.py; this file declares the settings, parses them and calls the run.

With no arguments it personalises the embedded toy cascade (tinybooth/assets/toy-IF-I, toy-IF-II) with the toy
subject (examples/toy_subject) offline on a CPU. With --model it trains public DeepFloyd IF (stage I; stage II with
--sr-model) or Stable Diffusion 1.x weights.

Memory on a consumer GPU (benchmarks/README.md has the measured figures): --mixed-precision bf16 runs the maths in
bf16 while the trained weights stay fp32; --gradient-checkpointing recomputes ResBlocks in backward; the text
encoder runs once and is freed (its embeddings are cached); --lora-rank trains only low-rank adapters; and
--optimizer-in-backward updates each weight as soon as backward has its gradient, so the full set of gradients
never exists (a full fine-tune then needs 12 bytes per weight, fp32 weight + two AdamW moments, instead of 16).

Reliability: checkpoints are written atomically every --checkpoint-every steps and on Ctrl-C; --resume continues to
bit-identical weights (with --deterministic); a non-finite or exploding loss stops the run and names the last good
checkpoint; a finished run in --output-dir is never replaced without --overwrite.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

from tinybooth import experiment, memory, models
from tinybooth.errors import ArgumentParser, UserError, main_guard
from tinybooth.samplers import IF_TIMESTEPS, SAMPLERS

FAMILY = "family"  # a default taken from models.FAMILY_DEFAULTS for the --model's family


# ----------------------------------------------------------------------------------------------------------------
# what a flag's value must be

def _number(kind, low=None, strict=False):
    """An argparse type: a finite `kind` (int or float) >= low (> low with strict); the message names the rule."""
    rule = "" if low is None else (f" > {low}" if strict else f" >= {low}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}{rule}, got "
                                             f"{text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if strict else value < low)):
            raise argparse.ArgumentTypeError(f"must be a finite number{rule}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


COUNT, STEPS, POSITIVE, NON_NEGATIVE = _number(int, 1), _number(int, 0), _number(float, 0, True), _number(float, 0)


def _steps_or_grid(text):
    """A step count (>= 1), an IF grid name ('smart27') or a list of steps ('999,800,600')."""
    if text in IF_TIMESTEPS:
        return text
    if "," in text:
        return [_number(int, 0)(t) for t in text.split(",")]
    return COUNT(text)


def _unit_interval(text):
    value = _number(float, 0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"is the paper's continuous noise level t in [0, 1], got {text}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# the settings, each declared once: flag, argparse keywords (type, default, help); FAMILY defaults come from the
# per-model table in tinybooth.models

SETTINGS = (
    ("--model", dict(help="pipeline directory in the public layout (IF stage I or SD 1.x); default: the embedded toy")),
    ("--sr-model", dict(help="IF stage-II directory to fine-tune too (default: the toy's, for the toy; 'none' skips)")),
    ("--instance-dir", dict(help="folder with the 3-5 photos of the subject (default: examples/toy_subject)")),
    ("--class-noun", dict(help="the subject's class ('dog'); required with --instance-dir (the paper's ablation shows "
                               "a missing or wrong class noun fails)")),
    ("--identifier", dict(default=FAMILY, help="the token [V] (None: the paper's rare-token search in the "
                                               "tokenizer)")),
    ("--output-dir", dict(help="where everything is written (default: runs/dreambooth-<model name>)")),
    ("--overwrite", dict(action="store_true", help="replace a finished or partial run in --output-dir")),
    ("--class-dir", dict(help="class-image cache (default: <output-dir>/class_images/<class prompt>)")),
    ("--num-class-images", dict(type=COUNT, default=FAMILY, help="prior images of 'a [class noun]'")),
    ("--class-sampler", dict(choices=SAMPLERS, default="ancestral",
                             help="sampler for class images (the paper: ancestral; ddim with few --class-steps is "
                                  "faster)")),
    ("--class-steps", dict(type=_steps_or_grid, default=FAMILY,
                           help="sampling steps per class image, or a list of steps / an IF grid name (smart27)")),
    ("--class-batch-size", dict(type=COUNT, default=16, help="class images generated per batch")),
    ("--no-prior-preservation", dict(dest="prior_preservation", action="store_false",
                                     help="train on the subject alone (ablation): no class images, no prior term")),
    ("--prior-loss-weight", dict(type=NON_NEGATIVE, default=FAMILY, help="lambda of eq. (2) (the paper: 1)")),
    ("--train-text-encoder", dict(action=argparse.BooleanOptionalAction, default=FAMILY,
                                  help="fine-tune the text encoder too (CLIP, the toy T5)")),
    ("--lora-rank", dict(type=STEPS, default=0,
                         help="train LoRA adapters of this rank instead of all weights (0: off)")),
    ("--lr", dict(type=POSITIVE, default=FAMILY, help="learning rate of the base model")),
    ("--text-encoder-lr", dict(type=POSITIVE, default=FAMILY,
                               help="learning rate of the text encoder when it is fine-tuned (None: --lr)")),
    ("--sr-lr", dict(type=POSITIVE, default=FAMILY, help="learning rate of the super-resolution model")),
    ("--lr-warmup-steps", dict(type=STEPS, default=10, help="linear warm-up steps, then --lr-schedule")),
    ("--lr-schedule", dict(choices=("constant", "cosine"), default=FAMILY,
                           help="after the warm-up: constant (the paper) or a cosine decay to 0 at the last step")),
    ("--max-steps", dict(type=COUNT, default=FAMILY, help="optimizer steps of the base model")),
    ("--sr-steps", dict(type=STEPS, default=FAMILY, help="optimizer steps of the super-resolution model (0 skips it)")),
    ("--sr-noise-level", dict(type=_unit_interval, default=1e-5,
                              help="noise augmentation of the SR model's low-res input, continuous t in [0, 1] "
                                   "(paper: 1e-5)")),
    ("--batch-size", dict(type=COUNT, default=FAMILY, help="subject images per step (as many prior images join them)")),
    ("--grad-accum", dict(type=COUNT, default=1, help="micro-batches per optimizer step")),
    ("--max-grad-norm", dict(type=POSITIVE, default=1.0, help="gradient clipping")),
    ("--seed", dict(type=int, default=0)),
    ("--deterministic", dict(action="store_true", help="deterministic kernels (bit-identical resume)")),
    ("--mixed-precision", dict(choices=("auto", "no", "bf16", "fp16"), default="auto",
                               help="autocast dtype; trainable weights stay fp32. auto: bf16 on GPUs that have it, "
                                    "else no")),
    ("--gradient-checkpointing", dict(action="store_true", help="recompute activations in backward (less memory)")),
    ("--optimizer-in-backward", dict(action="store_true",
                                     help="update each weight inside backward as soon as its gradient is ready and "
                                          "free that gradient (saves 4 bytes per trained weight: 3.4 GB on SD-1.5); "
                                          "needs --grad-accum 1, clips per tensor, not with fp16")),
    ("--optimizer-states", dict(choices=("fp32", "bf16", "8bit"), default="fp32",
                                help="AdamW's moments: fp32 (torch's), or bf16 with stochastic rounding / 8-bit "
                                     "blockwise (tinybooth.optim; the trained weights are then bf16 too): 12 -> 6 or 4 "
                                     "bytes per trained weight")),
    ("--memory-budget", dict(type=memory.parse_size, default=None,
                             help="e.g. 12GB: pick the settings that fit this much GPU memory (checkpointing, bf16, "
                                  "optimizer in backward, low-precision states, LoRA, in that order) and say which")),
    ("--dry-run", dict(action="store_true", help="print the predicted memory of each stage and stop, before "
                                                   "loading any weights")),
    ("--checkpoint-every", dict(type=COUNT, default=FAMILY, help="steps between checkpoints")),
    ("--resume", dict(action="store_true", help="continue from <output-dir>/checkpoint.pt")),
    ("--num-samples", dict(type=STEPS, default=FAMILY, help="images per prompt in the sample grid (0: no samples)")),
    ("--sample-steps", dict(type=_steps_or_grid, default=FAMILY,
                            help="sampling steps for the sample grid, or a list of steps / an IF grid name")),
    ("--sr-sample-steps", dict(type=_steps_or_grid, default=FAMILY,
                               help="stage-II sampling steps for samples_cascade.png, or a list / an IF grid name")),
    ("--sr-guidance", dict(type=NON_NEGATIVE, default=FAMILY,
                           help="classifier-free guidance scale of the stage-II samples (1: no guidance, one U-Net "
                                "pass a step)")),
    ("--guidance", dict(type=NON_NEGATIVE, default=FAMILY,
                        help="classifier-free guidance scale (class images and samples)")),
    ("--device", dict(default="cuda" if torch.cuda.is_available() else "cpu")),
)
# the per-model table's key for each FAMILY setting that is named differently there
TABLE_KEY = {"sample_steps": "steps"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something: not None (the help names the per-model ones), not on/off."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def family_help(dest):
    key = TABLE_KEY.get(dest, dest)
    return "per model: " + ", ".join(f"{name} {row[key]}" for name, row in models.FAMILY_DEFAULTS.items())


def build_parser():
    p = ArgumentParser(prog="python -m tinybooth.train", description=__doc__.split("\n\n")[0],
               formatter_class=HelpFormatter)
    for flag, kw in SETTINGS:
        kw = dict(kw)
        dest = kw.get("dest", flag.lstrip("-").replace("-", "_"))
        if kw.get("default") == FAMILY:
            kw.update(default=None, help=f"{kw['help']} (default {family_help(dest)})")
        p.add_argument(flag, **kw)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


# ----------------------------------------------------------------------------------------------------------------
# parse: flags -> settings

def parse(argv=None):
    """The command line -> the run's settings (a namespace), with the model's defaults filled in and every
    combination checked."""
    s = build_parser().parse_args(argv)
    del s.debug
    toy = s.model is None
    s.model = str(models.TOY_BASE if toy else s.model)
    if s.sr_model == "none" or (s.sr_model is None and not toy):
        s.sr_model = None
    elif s.sr_model is None:
        s.sr_model = str(models.TOY_SR)
    if toy and s.instance_dir is None:
        s.instance_dir, s.class_noun = str(models.TOY_SUBJECT), s.class_noun or models.toy_class_noun()
    if s.instance_dir is None:
        raise UserError("--instance-dir is required with --model: the folder with the photos of your subject")
    if not s.class_noun:
        raise UserError("--class-noun is required (e.g. --class-noun dog): DreamBooth ties [V] to a class the model "
                        "already knows; without it the paper's ablation shows the subject is not learned")
    s.family, defaults = models.defaults_for(s.model)
    for flag, kw in SETTINGS:
        dest = kw.get("dest", flag.lstrip("-").replace("-", "_"))
        if kw.get("default") == FAMILY and getattr(s, dest) is None:
            setattr(s, dest, defaults[TABLE_KEY.get(dest, dest)])
    s.sr_steps = s.sr_steps if s.sr_model else 0
    s.output_dir = s.output_dir or str(models.ROOT / "runs" / f"dreambooth-{'toy' if toy else Path(s.model).name}")
    s.mixed_precision = mixed_precision(s.mixed_precision, s.device)
    check_combinations(s)
    return s


def mixed_precision(choice, device):
    if choice == "auto":
        return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
    if choice == "fp16" and not device.startswith("cuda"):
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    return choice


def check_combinations(s):
    if s.optimizer_in_backward and (s.grad_accum > 1 or s.mixed_precision == "fp16"):
        raise UserError("--optimizer-in-backward updates the weights during backward, so it cannot accumulate "
                        "gradients (--grad-accum 1) or unscale fp16 gradients first (use --mixed-precision bf16)")
    if s.sr_steps > 0 and s.sr_lr is None:
        raise UserError(f"--sr-steps {s.sr_steps} needs --sr-lr (the {s.family} model has no default)")
    if s.resume and s.overwrite:
        raise UserError("--resume continues the run in --output-dir and --overwrite replaces it: give one of them")


# the settings tinybooth.memory's ladder may change, and what they are called here
MEMORY_SETTINGS = ("lora_rank", "mixed_precision", "gradient_checkpointing", "optimizer_in_backward",
                   "optimizer_states")


def memory_settings(s):
    """tinybooth.memory's keywords for these settings (fp16 autocast is modelled as bf16: the same bytes)."""
    kw = {k: getattr(s, k) for k in MEMORY_SETTINGS}
    kw.update(mixed_precision="no" if s.mixed_precision == "no" else "bf16", batch_size=s.batch_size,
              train_text_encoder=s.train_text_encoder, prior_preservation=s.prior_preservation,
              class_batch_size=min(s.class_batch_size, s.num_class_images), sample_batch=max(s.num_samples, 1) * 6,
              device="cuda" if s.device.startswith("cuda") else "cpu")
    return kw


def fit_memory_budget(s):
    """--memory-budget: the settings that fit, cheapest in quality first, applied to s; prints what was chosen."""
    chosen, explanation = memory.fit_budget(s.memory_budget, s.model, s.sr_model if s.sr_steps else None,
                                            **memory_settings(s))
    for k in MEMORY_SETTINGS:
        setattr(s, k, chosen[k])
    check_combinations(s)
    print(explanation)
    return s


def run(argv=None):
    """Parse and run; returns the output directory, or the memory prediction with --dry-run (errors raise: main()
    turns them into one line)."""
    s = parse(argv)
    if s.memory_budget is not None:
        s = fit_memory_budget(s)
    if s.dry_run:
        prediction = memory.predict(s.model, s.sr_model if s.sr_steps else None, **memory_settings(s))
        print(memory.format_table(prediction))
        return prediction
    return experiment.run(s)


def main(argv=None):
    """python -m tinybooth.train: exit status 0, 2 for a mistake in the input, 130 when interrupted."""
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
