"""The paper's ablations at toy scale: DreamBooth runs on the embedded toy cascade, scored by the toy evaluator.

    python lessons/08_ablations.py [--seeds 0,1,2] [--rows "DreamBooth,Textual Inversion"] [--out FILE]

Each row changes one thing against the toy defaults of `python -m tinybooth.train` and is run once per seed (each
seed draws its own class images, noise and samples); the table gives the mean and the range over the seeds:

    DreamBooth                  the default command: "a [V] star", prior preservation (eq. 2)
    no prior preservation       eq. (1) on the subject alone (Sec. 4.3: language drift, less diversity)
    no class noun               "a [V]" for the subject, prior preservation kept on with c_pr = "a" (Sec. 4.4)
    wrong class noun            "a [V] heart" for a star, c_pr = "a heart" (Sec. 4.4)
    SR noise augmentation 1e-3  the SR model fine-tuned (and sampled) at Imagen's usual 1e-3 instead of 1e-5
    Textual Inversion           the paper's baseline (Table 1): only the embedding of [V] is learned, U-Net and
                                T5 frozen (tinybooth.textual_inversion), eq. (1), 150 steps at lr 1e-2

Every row is scored the way `train` scores its grid (tinybooth.experiment.sample_grids): 3 samples per subject
prompt (15 per run), 16 of the class prompt, compared with all of the run's class images. Lesson 08 shows the
table this writes; a full set (6 rows x 3 seeds) takes about 30 minutes on 2 CPU cores, too long for CI.
`--reuse` reads finished runs of the same settings instead of training them again (the README's DreamBooth row is
its three default-command runs, `python -m tinybooth.train --seed k --output-dir runs/ablations/DreamBooth_s<k>`).
benchmarks/toy_recipes.md and benchmarks/toy_search.json keep the runs the toy defaults were chosen from.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinybooth import data, dreambooth, experiment, models, train  # noqa: E402
from tinybooth import textual_inversion as ti  # noqa: E402
from tinybooth.generate import encode_prompts  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = {  # name -> (extra command-line flags, changes to the settings the command line cannot express)
    "DreamBooth": ([], {}),
    "no prior preservation": (["--no-prior-preservation"], {}),
    "no class noun": ([], {"class_noun": ""}),           # "a [V]"; the prior term stays, with c_pr = "a"
    "wrong class noun (heart)": (["--class-noun", "heart"], {}),
    "SR noise augmentation 1e-3": (["--sr-noise-level", "1e-3"], {}),
}
TI_ROW, TI_STEPS, TI_LR = "Textual Inversion", 150, 1e-2
COLUMNS = ("subject_probability", "subject_fidelity", "prompt_fidelity", "PRES_subject_probability", "class_DIV",
           "class_DIV_before", "sr_psnr_db")


def run_variant(name, flags, changes, out, seed, extra=(), reuse=False):
    """One `train` run of a row (with reuse, a finished run of the same settings already in `out` is read
    instead, e.g. `python -m tinybooth.train --seed 0 --output-dir <runs-dir>/DreamBooth_s0`); returns its toy
    scores and wall time."""
    s = train.parse(["--output-dir", str(out), "--overwrite", "--seed", str(seed), *flags, *extra])
    vars(s).update(changes)
    if not (reuse and same_settings(s, out / "metrics.json")):
        experiment.run(s)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seed": seed, "instance_prompt": metrics["settings"]["instance_prompt"],
            "class_prompt": metrics["settings"]["class_prompt"], **metrics["toy"],
            "seconds": metrics["timings"]["total_s"]}


def same_settings(s, metrics_file):
    """Does metrics_file hold a finished run of the settings s (the flags that only say where to write aside)?"""
    if not metrics_file.exists():
        return False
    done = json.loads(metrics_file.read_text())["settings"]
    return all(done.get(k) == (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()
               if k not in ("overwrite", "identifier", "output_dir"))


def run_textual_inversion(out, seed, extra=()):
    """The baseline: the frozen toy model, one learned embedding row; scored like a train run's grid."""
    t0 = time.time()
    s = train.parse(["--output-dir", str(out), "--overwrite", "--seed", str(seed), *extra, "--sr-model", "none"])
    experiment.check_output_dir(s)                                          # and creates it
    pipe = models.load_pipeline(s.model, None, torch.device("cpu"), torch.float32, text_encoder=True)
    c_prompt, c_pr_prompt = dreambooth.subject_prompt(s.identifier, s.class_noun), dreambooth.class_prompt(s.class_noun)
    x_inst = data.load_instance_images(s.instance_dir, pipe.resolution)     # [N, 3, 32, 32]
    torch.manual_seed(seed)
    ti.train_embedding(pipe.unet, pipe.schedule, pipe.text_encoder, pipe.tokenizer, x_inst, c_prompt,
                       ti.identifier_token(pipe.tokenizer, s.identifier), TI_STEPS, TI_LR, s.batch_size, seed)
    prompts = dreambooth.grid_prompts(s.identifier, s.class_noun, dreambooth.TOY_TEMPLATES)
    cache = encode_prompts(pipe, list(dict.fromkeys([c_prompt, c_pr_prompt, "", *prompts])))
    x_class = experiment.class_images(s, pipe, cache, c_pr_prompt)           # the same class images as train's
    metrics = experiment.sample_grids(s, pipe, cache, prompts, c_prompt, x_inst, x_class)
    return {"seed": seed, "instance_prompt": c_prompt, "class_prompt": c_pr_prompt, **metrics["toy"],
            "seconds": round(time.time() - t0, 1)}


def summarise(runs):
    """{column: {"mean", "min", "max"}} over a row's seeds."""
    out = {}
    for c in COLUMNS:
        values = [r[c] for r in runs if c in r]
        if values:
            out[c] = {"mean": round(statistics.mean(values), 4), "min": min(values), "max": max(values)}
    return out


def format_table(table):
    """The rows as markdown: mean (min-max) over the seeds."""
    cols = [c for c in COLUMNS if c != "class_DIV_before"]
    lines = ["| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in table["rows"]:
        cells = [f"{row['summary'][c]['mean']:.2f} ({row['summary'][c]['min']:.2f}-{row['summary'][c]['max']:.2f})"
                 if c in row["summary"] else "" for c in cols]
        if "class_DIV" in row["summary"] and "class_DIV_before" in row["summary"]:
            cells[cols.index("class_DIV")] += f" vs {row['summary']['class_DIV_before']['mean']:.2f} before"
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "08_ablations.json"))
    p.add_argument("--runs-dir", default=str(HERE.parent / "runs" / "ablations"))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per row and seed")
    p.add_argument("--rows", default=",".join([*VARIANTS, TI_ROW]), help="comma-separated row names")
    p.add_argument("--train-flags", default="", help="more train flags for every run, e.g. '--max-steps 100'")
    p.add_argument("--reuse", action="store_true", help="read finished runs of the same settings in --runs-dir")
    args = p.parse_args(argv)
    seeds, names, extra = [int(x) for x in args.seeds.split(",")], args.rows.split(","), args.train_flags.split()
    unknown = [n for n in names if n not in VARIANTS and n != TI_ROW]
    if unknown:
        p.error(f"--rows: no row named {unknown}; the rows are {[*VARIANTS, TI_ROW]}")
    t0, rows = time.time(), []
    for name in names:
        runs = []
        for seed in seeds:
            out = Path(args.runs_dir) / f"{name.split(' (')[0].replace(' ', '_')}_s{seed}"
            runs.append(run_textual_inversion(out, seed, extra) if name == TI_ROW else
                        run_variant(name, *VARIANTS[name], out, seed, extra, args.reuse))
        rows.append({"variant": name, "summary": summarise(runs), "runs": runs})
    table = {"command": " ".join(["python lessons/08_ablations.py", *(sys.argv[1:] if argv is None else argv)]),
             "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch "
                        f"{torch.__version__}", "minutes": round((time.time() - t0) / 60, 1), "seeds": seeds,
             "rows": rows}
    Path(args.out).write_text(json.dumps(table, indent=2) + "\n")
    print(format_table(table))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
