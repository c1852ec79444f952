"""Fine-tuning recipes for the toy DreamBooth, compared on three seeds (how the toy defaults were chosen).

    python benchmarks/toy_recipes.py NAME --seeds 0,1,2 [--guidance 5,8] [--existing RUN_{seed}] -- TRAIN FLAGS

Each seed trains the base model only (`python -m tinybooth.train --sr-steps 0 --num-samples 0` plus the flags
given) and then scores it on more samples than the run's own grid: 8 per subject prompt (40 in all) and 16 of "a
star", against 16 of that seed's class images. One JSON line per (seed, guidance) is appended to
benchmarks/toy_recipes.jsonl:

    P        P(subject), the mean over the five subject prompts (per_P: each prompt's)
    PF       prompt fidelity (per_PF: each prompt's)
    drift    P(subject) of the "a star" samples
    class_DIV / class_DIV_before   diversity of 16 "a star" samples / of 16 of the class images

--class-dir-root reuses class images drawn once per seed (<root>/s<seed>, e.g. copied from a default run's
class_images/a_star), so only the fine-tuning and the scoring are timed. --sampler and --sample-steps score with
another sampler than the grid's (ancestral, 25 steps). benchmarks/toy_recipes.md has the table.
"""
import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinybooth import data, dreambooth, experiment, models, train  # noqa: E402
from tinybooth.generate import encode_prompts, generate, stack  # noqa: E402
from tinybooth.toy import evaluator as te, scoring  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "toy_recipes.jsonl"


@torch.no_grad()
def score(pipe, evaluator, identifier, real, n, guidance, steps=25, seed=1, sampler="ancestral"):
    """The toy scores (tinybooth.toy.scoring) of a fine-tuned base model on n samples per subject prompt and 2n of
    "a star"; real: the subject's photos."""
    prompts = dreambooth.grid_prompts(identifier, "star", dreambooth.TOY_TEMPLATES)
    cache = encode_prompts(pipe, list(dict.fromkeys(["", *prompts])), "cpu")
    c, c_uncond = stack(cache, [p for p in prompts[:-1] for _ in range(n)] + [prompts[-1]] * (2 * n))
    x = generate(pipe, c, c_uncond, steps, guidance, sampler, generator=torch.Generator().manual_seed(seed),
                 progress=False)
    subject = [(p, x[i * n:(i + 1) * n]) for i, p in enumerate(prompts[:-1])]
    m = scoring.score(evaluator, subject, x[(len(prompts) - 1) * n:], real)
    return dict(P=round(m["subject_probability"], 3), PF=round(m["prompt_fidelity"], 3),
                per_P=[round(te.subject_probability(evaluator, x_p).mean().item(), 2) for _, x_p in subject],
                per_PF=[round(r["prompt_fidelity"], 2) for r in scoring.per_prompt(evaluator, subject, real)],
                drift=round(m["PRES_subject_probability"], 3), class_DIV=round(m["class_DIV"], 3))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--guidance", default="5")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--sampler", default="ancestral", help="the sampler the scores are drawn with (the grid's one)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--runs-dir", default="/tmp/toy_recipes")
    p.add_argument("--class-dir-root", help="class images per seed in <root>/s<seed> (drawn there if missing)")
    p.add_argument("--existing", help="score these runs instead of training, e.g. runs/seed{seed}")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    evaluator = te.ToyEvaluator.from_pretrained()
    for seed in [int(x) for x in args.seeds.split(",")]:
        out = Path(args.runs_dir) / f"{args.name}_s{seed}"
        class_dir = Path(args.class_dir_root) / f"s{seed}" if args.class_dir_root else out / "class_images" / "a_star"
        t0 = time.time()
        if args.existing:
            out = Path(args.existing.format(seed=seed))
            class_dir = next((out / "class_images").iterdir()) if not args.class_dir_root else class_dir
        else:
            s = train.parse(["--seed", str(seed), "--output-dir", str(out), "--overwrite", "--class-dir",
                             str(class_dir), "--sr-steps", "0", "--num-samples", "0", *flags])
            experiment.run(s)
        train_s = round(time.time() - t0, 1)
        pipe = models.load_pipeline(out / "model", None, torch.device("cpu"), torch.float32, text_encoder=True)
        identifier = json.loads((out / "settings.json").read_text())["identifier"]
        x_class = data.load_images(sorted(class_dir.glob("*.png"))[:2 * args.samples], pipe.resolution)
        real = data.load_instance_images(models.TOY_SUBJECT, pipe.resolution)
        before = round(float(scoring.diversity(evaluator, [list(x_class)])), 3)
        for g in [float(v) for v in args.guidance.split(",")]:
            row = dict(name=args.name, flags=flags, seed=seed, guidance=g, train_s=train_s,
                       **({} if args.sampler == "ancestral" and args.sample_steps == 25 else
                          dict(sampler=args.sampler, sample_steps=args.sample_steps)),
                       **score(pipe, evaluator, identifier, real, args.samples, g, args.sample_steps,
                               sampler=args.sampler), class_DIV_before=before,
                       machine=f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} CPU threads, "
                               f"torch {torch.__version__}", date=datetime.date.today().isoformat())
            print(json.dumps(row), flush=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
