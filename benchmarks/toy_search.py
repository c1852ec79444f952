"""The search for the toy DreamBooth defaults (issue 17), and the two measurements beside it.

    python benchmarks/toy_search.py evaluator [--n 400 --seed 9001]        # the toy evaluator's accuracy
    python benchmarks/toy_search.py run NAME [train flags ...]             # one `tinybooth.train` run, re-scored
    python benchmarks/toy_search.py eval RUN_DIR [--samples 8] [--steps 25] [--guidance 5] [--sampler ancestral]
    python benchmarks/toy_search.py ti [--seed 0] [--steps 300] [--lr 5e-3]  # Textual Inversion, the baseline
    python benchmarks/toy_search.py table                                  # the results as a markdown table

`run` trains with the toy defaults plus the given flags (class images cached in runs/search/class_s<seed>, so
later runs reuse them; the first run's class-image time is the one to quote), keeps the command's own toy block
from metrics.json (3 samples per prompt) and scores the saved model again with --samples per prompt (default 8:
40 subject-prompt samples instead of 15). Every result is appended to benchmarks/toy_search.json.

The toy evaluator is used exactly as tinybooth.train.toy_metrics uses it: nothing here changes its definitions.
Prompt embeddings are computed from the run's own text encoder (not tinybooth.cascade's disk cache, whose key is
the path and file size of the weights, which a rerun into the same folder leaves unchanged).
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
from tinybooth import cascade, data, text, toyworld  # noqa: E402
from tinybooth import textual_inversion as ti  # noqa: E402
from tinybooth import toy_evaluator as te  # noqa: E402
from tinybooth import train  # noqa: E402
from tinybooth.schedule import DiscreteSchedule  # noqa: E402
from tinybooth.unet import UNet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "search"
RESULTS = Path(__file__).resolve().parent / "toy_search.json"


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
    colours = list(toyworld.COLOURS.values())
    kinds = {"subject": [], "world pictures": [], "one-colour stars": [], "two-colour look-alikes": []}
    for _ in range(n):
        kinds["subject"].append(toyworld.render(toyworld.random_spec(rng, shape="star", subject=True)))
        kinds["world pictures"].append(toyworld.render(toyworld.random_spec(rng)))
        kinds["one-colour stars"].append(toyworld.render(toyworld.random_spec(rng, shape="star")))
        a, b = rng.choice(len(colours), size=2, replace=False)
        spec = toyworld.random_spec(rng, shape="star", subject=True)
        kinds["two-colour look-alikes"].append(toyworld.render(spec, halves=(colours[a], colours[b])))
    evaluator = te.ToyEvaluator.from_pretrained()
    out = {}
    for kind, pictures in kinds.items():
        p = te.subject_probability(evaluator, toyworld.to_tensor(pictures))
        correct = p > 0.5 if kind == "subject" else p <= 0.5
        out[kind] = round(float(correct.float().mean()), 4)
    out["balanced (subject vs all others)"] = round((out["subject"] + np.mean(
        [v for k, v in out.items() if k != "subject"])) / 2, 4)
    return out


# ----------------------------------------------------------------------------------------------------------------
# scoring a model with more samples, and with other sampler settings

def load_text(model_dir, device="cpu"):
    model_dir = Path(model_dir)
    return (text.T5Tokenizer.from_pretrained(model_dir / "tokenizer"),
            text.T5Encoder.from_pretrained(model_dir / "text_encoder", device=device).eval())


def load_class_images(class_dir):
    paths = sorted(Path(class_dir).glob("*.png"))
    return data.load_images(paths, 32) if paths else None


@torch.no_grad()
def score(unet, schedule, encoder, tokenizer, identifier, x_inst, x_class, samples, steps, guidance, sampler, seed,
          class_noun="star"):
    """train.toy_metrics on `samples` images per prompt of the toy grid (train.TOY_PROMPTS, then "a star")."""
    prompts = [train.subject_prompt(identifier, class_noun, t) for t in train.TOY_PROMPTS] + [f"a {class_noun}"]
    grid_prompts = [p for p in prompts for _ in range(samples)]
    c = ti.encode(encoder, tokenizer, grid_prompts + [""], "cpu")  # [P N + 1, L, D]
    g = torch.Generator().manual_seed(seed)
    images = cascade.sample_base(unet, schedule, c[:-1], c[-1:].expand_as(c[:-1]), guidance, steps, sampler,
                                 generator=g).clamp(-1, 1)
    m = train.toy_metrics(images, prompts, samples, x_inst, x_class, None)
    evaluator = te.ToyEvaluator.from_pretrained()
    p_subject = te.subject_probability(evaluator, images.float()).view(len(prompts), samples).mean(1)  # [P]
    return {**m, "subject_probability_per_prompt": {q: round(float(v), 3) for q, v in zip(prompts, p_subject)}}


def eval_run(run_dir, samples, settings):
    """Score <run_dir>/model with each (steps, guidance, sampler) in settings."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else \
        {"settings": json.loads((run_dir / "settings.json").read_text())}
    cfg = meta["settings"]
    tokenizer, encoder = load_text(run_dir / "model")
    unet = UNet.from_pretrained(run_dir / "model" / "unet").eval()
    schedule = DiscreteSchedule.from_pretrained(run_dir / "model" / "scheduler")
    x_inst = data.load_instance_images(cfg["instance_dir"], 32)
    x_class = load_class_images(train.class_image_dir(train.TrainConfig(**cfg), f"a {cfg['class_noun']}"))
    out = []
    for steps, guidance, sampler in settings:
        t0 = time.time()
        m = score(unet, schedule, encoder, tokenizer, cfg["identifier"], x_inst, x_class, samples, steps, guidance,
                  sampler, seed=cfg["seed"] + 1000)
        out.append({"samples": samples, "steps": steps, "guidance": guidance, "sampler": sampler,
                    "seconds": round(time.time() - t0, 1), **m})
    return meta, out


# ----------------------------------------------------------------------------------------------------------------
# a separate learning rate for the text encoder (not a flag of tinybooth.train yet): what the lead would wire in

class ScaledGroup(dict):
    """An optimizer param group whose "lr" is always `scale` times what the stage's schedule sets."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value * self.get("scale", 1.0) if key == "lr" else value)


def use_text_lrs(text_lr, embedding_lr, only_row=None):
    """Make train.Stage's base stage give the T5's layers lr text_lr and its token table (shared.weight, without
    weight decay, so that rows without gradient stay put) lr embedding_lr; the U-Net keeps --lr. only_row: the
    identifier's token id, the one row of the table that learns (the rows of "a", "star", ... stay frozen)."""
    original = train.Stage.__init__

    def __init__(self, name, modules, loss_fn, cfg, max_steps, lr, device, history):
        original(self, name, modules, loss_fn, cfg, max_steps, lr, device, history)
        if name != "base" or "text_encoder" not in modules:
            return
        kinds = {"unet": [], "text": [], "embedding": []}
        for k, p in self.params.items():
            kinds["embedding" if k == "text_encoder.shared.weight" else "text" if k.startswith("text_encoder.")
                  else "unet"].append(p)
        scales = {"unet": 1.0, "text": (text_lr or lr) / lr, "embedding": (embedding_lr or text_lr or lr) / lr}
        groups = [{"params": ps, "weight_decay": 0.0 if kind == "embedding" else 1e-2} for kind, ps in kinds.items()]
        self.optimizer = torch.optim.AdamW(groups, lr=lr)
        if only_row is not None:
            table = modules["text_encoder"].shared.weight
            keep = torch.zeros(table.shape[0], 1)
            keep[only_row] = 1.0
            table.register_hook(lambda grad: grad * keep)
        self.optimizer.param_groups = [ScaledGroup(g, scale=scales[kind]) for g, kind in
                                       zip(self.optimizer.param_groups, kinds)]

    train.Stage.__init__ = __init__


def run_and_eval(name, flags, samples, settings, extra):
    seed = int(flags[flags.index("--seed") + 1]) if "--seed" in flags else 0
    class_dir = ["--class-dir", str(RUNS / f"class_s{seed}")] if "--class-dir" not in flags else []
    out_dir = RUNS / name
    t0 = time.time()
    train.main(["--output-dir", str(out_dir), *class_dir, *flags])
    wall = round(time.time() - t0, 1)
    meta, evals = eval_run(out_dir, samples, settings)
    append_result({"name": name, "flags": flags, **extra, "wall_s": wall, "timings": meta["timings"],
                   "identifier": meta["settings"]["identifier"], "toy_grid": meta.get("toy"), "rescored": evals})


# ----------------------------------------------------------------------------------------------------------------
# (b) Textual Inversion on the frozen toy model

def textual_inversion(seed, steps, lr, batch_size, identifier, samples, init_from_class):
    model = train.TOY_MODEL
    tokenizer, encoder = load_text(model)
    unet = UNet.from_pretrained(model / "unet")
    schedule = DiscreteSchedule.from_pretrained(model / "scheduler")
    x_inst = data.load_instance_images(train.TOY_SUBJECT, 32)
    token_id = ti.identifier_token(tokenizer, identifier)
    init = ti.identifier_token(tokenizer, "star") if init_from_class else None
    torch.manual_seed(seed)
    t0 = time.time()
    losses = ti.train_embedding(unet, schedule, encoder, tokenizer, x_inst, f"a {identifier} star", token_id,
                                steps, lr, batch_size, seed, init_token_id=init)
    train_s = round(time.time() - t0, 1)
    x_class = load_class_images(RUNS / f"class_s{seed}") if (RUNS / f"class_s{seed}").exists() else None
    m = score(unet, schedule, encoder, tokenizer, identifier, x_inst, x_class, samples, 25, 5.0, "ancestral",
              seed=seed + 1000)
    append_result({"name": f"textual inversion seed {seed}", "seed": seed, "steps": steps, "lr": lr,
                   "batch_size": batch_size, "identifier": identifier, "init_from_class": init_from_class,
                   "train_s": train_s, "loss_first_last_20": [round(float(np.mean(losses[:20])), 4),
                                                             round(float(np.mean(losses[-20:])), 4)],
                   "rescored": [{"samples": samples, "steps": 25, "guidance": 5.0, "sampler": "ancestral", **m}]})


def table():
    """The results so far as a markdown table: one line per (run, sampler setting)."""
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    print("| run | settings | samples | sampler | P(subject) | prompt fid. | P(subj. \"a star\") | DIV a star "
          "(before) | seconds (class/base/sr/grids) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for e in r.get("rescored", []):
            t = r.get("timings", {})
            flags = " ".join(r.get("flags", [])) + "".join(f" {k}={r[k]}" for k in ("text_lr", "embedding_lr",
                                                                                      "only_identifier_row", "lr",
                                                                                      "steps") if r.get(k))
            print(f"| {r['name']} | {flags} | {e['samples']} | {e['sampler']} {e['steps']} g{e['guidance']:g} | "
                  f"{e['subject_probability']:.2f} | {e['prompt_fidelity']:.2f} | "
                  f"{e['class_prompt_subject_probability']:.2f} | {e.get('class_prompt_diversity', 0):.3f} "
                  f"({e.get('class_prompt_diversity_before', float('nan')):.3f}) | "
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
                           help="of the token table only the identifier's row learns (needs --identifier)")
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
            tokenizer, _ = load_text(train.TOY_MODEL)
            row = ti.identifier_token(tokenizer, rest[rest.index("--identifier") + 1])
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
