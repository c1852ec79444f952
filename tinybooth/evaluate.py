"""`python -m tinybooth.evaluate`: the paper's evaluation protocol (tinybooth.evaluation) for one or more models.

    python -m tinybooth.evaluate --model runs/dreambooth-IF-I-M-v1.0        # a tinybooth.train run: the subject,
                                                                           # class noun and [V] come from its
                                                                           # settings.json
    python -m tinybooth.evaluate --model weights/IF-I-M-v1.0 --sr-model weights/IF-II-M-v1.0 \\
        --subject-dir data/dog --class-noun dog --identifier sks
    python -m tinybooth.evaluate --images runs/dog/eval/images --subject-dir data/dog --class-noun dog
    python -m tinybooth.evaluate --model runs/dreambooth-toy                 # the toy-scale protocol
    python -m tinybooth.evaluate                                             # the embedded (unpersonalised) default
    python -m tinybooth.evaluate --model runs/with-prior --model runs/no-prior --model runs/wrong-noun

The paper's encoders load public weights from --weights-dir (default weights/): clip-vit-base-patch32 (openai),
dino-vits16 (facebook) and lpips-alex (tinybooth.lpips), fetched by `python weights_download.py NAME`. On the
embedded toy cascade and the runs trained from it, or on pictures of at most 64 px, the toy evaluator's analogs
score instead (tinybooth.toy.scoring); several --model runs are compared in one markdown table, the toy version of
the paper's ablation tables.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from tinybooth import evaluation
from tinybooth.cascade import parse_noise_level
from tinybooth.errors import ArgumentParser, UserError, main_guard


def build_parser():
    p = ArgumentParser(prog="python -m tinybooth.evaluate", description=evaluation.__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    a("--model", action="append", help="a tinybooth.train run directory (settings.json, model/, sr_model/) or a "
      "pipeline directory (IF stage I or SD); default: the embedded toy cascade. Repeat it to evaluate several runs "
      "and print one comparison table (the paper's ablations)")
    a("--sr-model", help="IF stage-II directory for a pipeline --model")
    a("--images", help="score this folder instead of generating (NN/k.png, prior/k.png, prompts.json)")
    a("--subject-dir", help="the real photos of the subject")
    a("--class-noun", help="the subject's class noun, e.g. dog")
    a("--identifier", help="the identifier [V] the model was trained with (default: the run's, or sks)")
    a("--prompts", help="'paper' (25 prompts; the live list for cats and dogs, the object list otherwise), 'toy', or "
      "a text file of templates with {identifier} and {class_noun}; default: paper, or toy with the toy scorer")
    a("--images-per-prompt", type=int, default=4)
    a("--scorer", choices=("auto", "paper", "toy"), default="auto",
      help="paper: DINO, CLIP-I, CLIP-T, PRES, DIV with the public encoders in --weights-dir; toy: the toy "
           "evaluator's analogs; auto: toy for the toy backbone or pictures of <= 64 px")
    a("--weights-dir", default="weights", help="where weights_download.py put the encoders")
    a("--steps", type=int, help="sampling steps (default: the model's, see tinybooth.sample)")
    a("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    a("--sr-steps", type=int, help="stage-II sampling steps (default: the model's)")
    a("--sr-noise-level", type=parse_noise_level,
      help="stage-II augmentation, an IF step (250) or the paper's continuous level (1e-5); default: a run's SR "
           "fine-tuning level, else IF's 250")
    a("--seed", type=int, default=0, help="image k of every prompt uses seed + k")
    a("--out", help="output folder (default: <model>/eval, or the parent of --images)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--debug", action="store_true", help="show the traceback of an error")
    return p


USER_SET = ("sr_model", "subject_dir", "class_noun", "identifier", "prompts", "images_per_prompt", "weights_dir",
            "steps", "guidance", "sr_steps", "sr_noise_level", "seed", "device")


def settings_for(args, model, out):
    """evaluate()'s keyword arguments for one model: what the run or the toy default implies, then the flags."""
    kw = {} if args.images else evaluation.run_settings(model)
    toy = kw.pop("toy", False)
    kw.update({k: getattr(args, k) for k in USER_SET if getattr(args, k) is not None})
    if kw.get("subject_dir") is None or kw.get("class_noun") is None:
        raise UserError("--subject-dir and --class-noun are required (they are read from settings.json when --model "
                        "is a tinybooth.train run)")
    kw["scorer"] = evaluation.choose_scorer(args.scorer, toy, args.images)
    kw["images"] = args.images
    kw["out"] = Path(out or kw.get("out") or (Path(args.images).parent if args.images else Path(kw["model"]) / "eval"))
    return kw


def run(argv=None):
    args = build_parser().parse_args(argv)
    if args.model and args.images:
        raise UserError("give --model (generate, then score) or --images (score a folder), not both")
    results = {}
    for model in args.model or [None]:  # several --model: each is evaluated, then compared in one table
        out = Path(args.out) / Path(model).name if args.out and len(args.model or []) > 1 else args.out
        kw = settings_for(args, model, out)
        results[str(model)] = evaluation.evaluate(**kw)
        print(json.dumps(results[str(model)]["metrics"], indent=1))
        print(f"wrote {kw['out'] / 'metrics.json'} and the contact sheets in {kw['out'] / 'sheets'}")
    if len(results) > 1:
        print(evaluation.comparison_table(results))
    return results


def main(argv=None):
    """python -m tinybooth.evaluate: exit status 0, or 2 for a mistake in the input."""
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
