"""The search for the toy DreamBooth defaults (issue 17), and the two measurements beside it.

    python benchmarks/toy_search.py evaluator [--n 400 --seed 9001]        # the toy evaluator's accuracy
    python benchmarks/toy_search.py run NAME [train flags ...]             # one `tinybooth.train` run, re-scored
    python benchmarks/toy_search.py eval RUN_DIR [--samples 8] [--settings 25:5:ancestral,50:7:ddim]
    python benchmarks/toy_search.py ti [--seed 0] [--steps 300] [--lr 5e-3]  # Textual Inversion, the baseline
    python benchmarks/toy_search.py table                                  # the results as a markdown table

`run` trains with the toy defaults plus the given flags (class images cached in runs/search/class_s<seed>, so
later runs reuse them; the first run's class-image time is the one to quote), keeps the command's own toy block
from metrics.json (--num-samples per prompt, 3 by default) and scores the saved model again with --samples per
prompt (default 8: 40 subject-prompt samples instead of 15). Every result is appended to
benchmarks/toy_search.json. `run --text-lr/--embedding-lr/--only-identifier-row` give the T5 its own learning
rate by wrapping tinybooth.training.make_optimizer (not a flag of tinybooth.train: in the search it did not help).

The toy evaluator is used exactly as tinybooth.experiment scores the sample grid (tinybooth.toy.scoring.score):
nothing here changes its definitions. Rows recorded before the redesign carry the old metric names (pres,
class_prompt_subject_probability, class_prompt_diversity, ...); `table` reads both. Prompt embeddings are computed
by the run's own text encoder, loaded next to the U-Net (tinybooth.generate.encode_prompts), not read from
tinybooth.cascade's disk cache.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinybooth import data, dreambooth, experiment, models, train, training  # noqa: E402
from tinybooth import textual_inversion as ti  # noqa: E402
from tinybooth.generate import encode_prompts, generate, stack  # noqa: E402
from tinybooth.text import T5Tokenizer  # noqa: E402
from tinybooth.toy import evaluator as te  # noqa: E402
from tinybooth.toy import scoring, world  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "search"
RESULTS = Path(__file__).resolve().parent / "toy_search.json"
# the metric names of rows recorded before the redesign (new name: old name)
OLD_NAMES = {"PRES": "pres", "PRES_before": "pres_before",
             "PRES_subject_probability": "class_prompt_subject_probability",
             "PRES_subject_probability_before": "class_prompt_subject_probability_before",
             "class_DIV": "class_prompt_diversity", "class_DIV_before": "class_prompt_diversity_before"}


def machine():
    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}"


def append_result(row):
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    rows.append({**row, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(row, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# (a) how often the evaluator is right on freshly rendered pictures

def evaluator_accuracy(n, seed):
    """Fraction read correctly by subject_probability > 0.5, per kind of picture (rendered at 64 px; the evaluator
    shrinks them to 32 px as it does the samples): the subject anywhere, random world pictures, one-colour stars,
    and look-alikes (stars split into two world colours, which the evaluator was trained to reject)."""
    rng = np.random.default_rng(seed)
    colours = list(world.COLOURS.values())
    kinds = {"subject": [], "world pictures": [], "one-colour stars": [], "two-colour look-alikes": []}
    for _ in range(n):
        kinds["subject"].append(world.render(world.random_spec(rng, shape="star", subject=True)))
        kinds["world pictures"].append(world.render(world.random_spec(rng)))
        kinds["one-colour stars"].append(world.render(world.random_spec(rng, shape="star")))
        a, b = rng.choice(len(colours), size=2, replace=False)
        spec = world.random_spec(rng, shape="star", subject=True)
        kinds["two-colour look-alikes"].append(world.render(spec, halves=(colours[a], colours[b])))
    evaluator = te.ToyEvaluator.from_pretrained()
    out = {}
    for kind, pictures in kinds.items():
        p = te.subject_probability(evaluator, world.to_tensor(pictures))
        correct = p > 0.5 if kind == "subject" else p <= 0.5
        out[kind] = round(float(correct.float().mean()), 4)
    out["balanced (subject vs all others)"] = round((out["subject"] + np.mean(
        [v for k, v in out.items() if k != "subject"])) / 2, 4)
    return out


# ----------------------------------------------------------------------------------------------------------------
# scoring a model with more samples, and with other sampler settings

def load_model(model_dir):
    """The pipeline of a toy model directory with its text encoder loaded (prompts encoded by the run's own T5)."""
    pipe = models.load_pipeline(model_dir, text_encoder=True)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def load_class_images(class_dir, resolution):
    paths = sorted(Path(class_dir).glob("*.png"))
    return data.load_images(paths, resolution) if paths else None


def class_image_dir(run_dir, cfg):
    """Where tinybooth.experiment put the run's class images: --class-dir, else <out>/class_images/<slug>."""
    if cfg.get("class_dir"):
        return Path(cfg["class_dir"])
    return Path(run_dir) / "class_images" / experiment.slug(dreambooth.class_prompt(cfg["class_noun"]))


@torch.no_grad()
def score(pipe, identifier, x_inst, x_class, samples, steps, guidance, sampler, seed, class_noun="star"):
    """tinybooth.toy.scoring.score on `samples` images per prompt of the toy grid (dreambooth.TOY_TEMPLATES, then
    the class prompt), with P(subject) per prompt beside it."""
    prompts = dreambooth.grid_prompts(identifier, class_noun, dreambooth.TOY_TEMPLATES)
    cache = encode_prompts(pipe, list(dict.fromkeys(prompts + [""])))
    c, c_uncond = stack(cache, [p for p in prompts for _ in range(samples)])  # [P N, L, D] each
    images = generate(pipe, c, c_uncond, steps, guidance, sampler, generator=torch.Generator().manual_seed(seed))
    per = [(p, images[i * samples:(i + 1) * samples]) for i, p in enumerate(prompts)]
    evaluator = te.ToyEvaluator.from_pretrained()
    m = scoring.score(evaluator, per[:-1], per[-1][1], x_inst, x_class)
    p_subject = te.subject_probability(evaluator, images).view(len(prompts), samples).mean(1)  # [P]
    return {**m, "subject_probability_per_prompt": {q: round(float(v), 3) for q, v in zip(prompts, p_subject)}}


def eval_run(run_dir, samples, settings):
    """Score <run_dir>/model with each (steps, guidance, sampler) in settings."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else \
        {"settings": json.loads((run_dir / "settings.json").read_text())}
    cfg = meta["settings"]
    pipe = load_model(run_dir / "model")
    x_inst = data.load_instance_images(cfg["instance_dir"], pipe.resolution)
    x_class = load_class_images(class_image_dir(run_dir, cfg), pipe.resolution)
    out = []
    for steps, guidance, sampler in settings:
        t0 = time.time()
        m = score(pipe, cfg["identifier"], x_inst, x_class, samples, steps, guidance, sampler,
                  seed=cfg["seed"] + 1000, class_noun=cfg["class_noun"])
        out.append({"samples": samples, "steps": steps, "guidance": guidance, "sampler": sampler,
                    "seconds": round(time.time() - t0, 1), **m})
    return meta, out


# ----------------------------------------------------------------------------------------------------------------
# a separate learning rate for the text encoder (not a flag of tinybooth.train: in the search it did not help)

class ScaledGroup(dict):
    """An optimizer param group whose "lr" is always `scale` times what the stage's schedule sets."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value * self.get("scale", 1.0) if key == "lr" else value)


def use_text_lrs(text_lr, embedding_lr, only_row=None):
    """Wrap training.make_optimizer so that a stage training the T5 gives its layers lr text_lr and its token table
    (shared.weight, without weight decay, so that rows without gradient stay put) lr embedding_lr; the U-Net keeps
    --lr. only_row: the identifier's token id, the one row of the table that learns (the rows of "a", "star", ...
    stay frozen). Plain AdamW only (no --optimizer-in-backward, no low-precision states)."""
    original = training.make_optimizer

    def make_optimizer(params, s, rounding=None):
        if not any(k.startswith("text_encoder.") for k in params):
            return original(params, s, rounding)
        if s.optimizer_in_backward or s.optimizer_states != "fp32":
            raise ValueError("--text-lr/--embedding-lr/--only-identifier-row need plain AdamW (no "
                             "--optimizer-in-backward, --optimizer-states fp32)")
        kinds = {"unet": [], "text": [], "embedding": []}
        for k, p in params.items():
            kinds["embedding" if k == "text_encoder.shared.weight" else "text" if k.startswith("text_encoder.")
                  else "unet"].append(p)
        scales = {"unet": 1.0, "text": (text_lr or s.lr) / s.lr, "embedding": (embedding_lr or text_lr or s.lr) / s.lr}
        groups = [{"params": ps, "weight_decay": 0.0 if kind == "embedding" else s.weight_decay}
                  for kind, ps in kinds.items()]
        optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=s.betas)
        if only_row is not None:
            table = params["text_encoder.shared.weight"]  # [vocab, D]
            keep = torch.zeros(table.shape[0], 1, device=table.device)
            keep[only_row] = 1.0
            table.register_hook(lambda grad: grad * keep)
        optimizer.param_groups = [ScaledGroup(g, scale=scales[kind]) for g, kind in
                                  zip(optimizer.param_groups, kinds)]
        return optimizer

    training.make_optimizer = make_optimizer


def run_and_eval(name, flags, samples, settings, extra):
    seed = int(flags[flags.index("--seed") + 1]) if "--seed" in flags else 0
    class_dir = ["--class-dir", str(RUNS / f"class_s{seed}")] if "--class-dir" not in flags else []
    out_dir = RUNS / name
    t0 = time.time()
    status = train.main(["--output-dir", str(out_dir), *class_dir, *flags])
    if status:
        sys.exit(status)
    wall = round(time.time() - t0, 1)
    meta, evals = eval_run(out_dir, samples, settings)
    append_result({"name": name, "flags": flags, **extra, "wall_s": wall, "timings": meta["timings"],
                   "identifier": meta["settings"]["identifier"], "toy_grid": meta.get("toy"), "rescored": evals})


# ----------------------------------------------------------------------------------------------------------------
# (b) Textual Inversion on the frozen toy model

def textual_inversion(seed, steps, lr, batch_size, identifier, samples, init_from_class):
    pipe = load_model(models.TOY_BASE)
    class_noun = models.toy_class_noun()
    x_inst = data.load_instance_images(models.TOY_SUBJECT, pipe.resolution)
    token_id = ti.identifier_token(pipe.tokenizer, identifier)
    init = ti.identifier_token(pipe.tokenizer, class_noun) if init_from_class else None
    torch.manual_seed(seed)
    t0 = time.time()
    losses = ti.train_embedding(pipe.unet, pipe.schedule, pipe.text_encoder, pipe.tokenizer, x_inst,
                                dreambooth.subject_prompt(identifier, class_noun), token_id, steps, lr, batch_size,
                                seed, init_token_id=init)
    train_s = round(time.time() - t0, 1)
    class_dir = RUNS / f"class_s{seed}"
    x_class = load_class_images(class_dir, pipe.resolution) if class_dir.exists() else None
    m = score(pipe, identifier, x_inst, x_class, samples, 25, 5.0, "ancestral", seed=seed + 1000,
              class_noun=class_noun)
    append_result({"name": f"textual inversion seed {seed}", "seed": seed, "steps": steps, "lr": lr,
                   "batch_size": batch_size, "identifier": identifier, "init_from_class": init_from_class,
                   "train_s": train_s, "loss_first_last_20": [round(float(np.mean(losses[:20])), 4),
                                                             round(float(np.mean(losses[-20:])), 4)],
                   "rescored": [{"samples": samples, "steps": 25, "guidance": 5.0, "sampler": "ancestral", **m}]})


def metric(e, name, default=float("nan")):
    """A metric of a rescored entry under its name, or under its name before the redesign."""
    return e.get(name, e.get(OLD_NAMES.get(name, name), default))


def table():
    """The results so far as a markdown table: one line per (run, sampler setting)."""
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    print("| run | settings | samples | sampler | subject_probability | prompt_fidelity | PRES_subject_probability | "
          "class_DIV (before) | seconds (class/base/sr/grids) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for e in r.get("rescored", []):
            t = r.get("timings", {})
            flags = " ".join(r.get("flags", [])) + "".join(f" {k}={r[k]}" for k in ("text_lr", "embedding_lr",
                                                                                      "only_identifier_row", "lr",
                                                                                      "steps") if r.get(k))
            print(f"| {r['name']} | {flags} | {e['samples']} | {e['sampler']} {e['steps']} g{e['guidance']:g} | "
                  f"{e['subject_probability']:.2f} | {e['prompt_fidelity']:.2f} | "
                  f"{metric(e, 'PRES_subject_probability'):.2f} | {metric(e, 'class_DIV', 0):.3f} "
                  f"({metric(e, 'class_DIV_before'):.3f}) | "
                  f"{'/'.join(str(t.get(k, '-')) for k in ('class_images_s', 'base_s', 'sr_s', 'samples_s'))} |")


def parse_settings(text_):
    """'25:5:ancestral,50:7:ddim' -> [(25, 5.0, 'ancestral'), (50, 7.0, 'ddim')]."""
    out = []
    for item in text_.split(","):
        steps, guidance, sampler = item.split(":")
        out.append((int(steps), float(guidance), sampler))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("evaluator")
    a.add_argument("--n", type=int, default=400)
    a.add_argument("--seed", type=int, default=9001)
    for name in ("run", "eval"):
        s = sub.add_parser(name, allow_abbrev=False)
        s.add_argument("target", help="run name (run) or run directory (eval)")
        s.add_argument("--samples", type=int, default=8)
        s.add_argument("--settings", default="25:5:ancestral", help="steps:guidance:sampler,...")
        if name == "run":
            s.add_argument("--text-lr", type=float, help="lr of the T5's layers (default: --lr)")
            s.add_argument("--embedding-lr", type=float, help="lr of the T5's token table (default: --text-lr)")
            s.add_argument("--only-identifier-row", action="store_true",
                           help="of the token table only the identifier's row learns (--identifier, else the "
                                "toy default)")
    sub.add_parser("table")
    t = sub.add_parser("ti")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--lr", type=float, default=5e-3)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--identifier", default="lux")
    t.add_argument("--samples", type=int, default=8)
    t.add_argument("--init-from-class", action="store_true", help="start v at the embedding of 'star'")
    args, rest = p.parse_known_args(argv)
    if args.what == "table":
        table()
    elif args.what == "evaluator":
        append_result({"name": "evaluator accuracy", "n_per_kind": args.n, "seed": args.seed,
                       "accuracy": evaluator_accuracy(args.n, args.seed)})
    elif args.what == "run":
        row = None
        if args.only_identifier_row:
            tokenizer = T5Tokenizer.from_pretrained(models.TOY_BASE / "tokenizer")
            identifier = rest[rest.index("--identifier") + 1] if "--identifier" in rest else \
                models.FAMILY_DEFAULTS["toy"]["identifier"]
            row = ti.identifier_token(tokenizer, identifier)
        if args.text_lr or args.embedding_lr or row is not None:
            use_text_lrs(args.text_lr, args.embedding_lr, row)
        run_and_eval(args.target, rest, args.samples, parse_settings(args.settings),
                     {"text_lr": args.text_lr, "embedding_lr": args.embedding_lr, "only_identifier_row": row})
    elif args.what == "eval":
        meta, evals = eval_run(args.target, args.samples, parse_settings(args.settings))
        append_result({"name": f"eval {args.target}", "identifier": meta["settings"]["identifier"],
                       "rescored": evals})
    else:
        textual_inversion(args.seed, args.steps, args.lr, args.batch_size, args.identifier, args.samples,
                          args.init_from_class)


if __name__ == "__main__":
    main()
