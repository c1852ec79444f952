"""The paper's ablations at toy scale: DreamBooth runs on the embedded toy cascade, scored by the toy evaluator.

    python lessons/08_ablations.py [--steps N] [--out lessons/08_ablations.json]

Each row is one `tinybooth.train` run with the toy defaults and one thing changed, as in the paper:

    DreamBooth                  the correct class noun ("star"), prior preservation (eq. 2, lambda = 1), SR 1e-5
    no prior preservation       eq. (1) on the subject only (Sec. 4.3: language drift, less diversity)
    wrong class noun            "a [V] heart" for a star (Sec. 4.4, class-noun ablation)
    no class noun               "a [V]" (Sec. 4.4)
    SR noise augmentation 1e-3  the SR model fine-tuned (and sampled) at Imagen's usual 1e-3 instead of 1e-5

Lesson 08 shows the table this writes (a full set of runs takes ~10-15 minutes on 2 CPU cores, too long for CI).

How the toy defaults were chosen (tinybooth.models.FAMILY_DEFAULTS["toy"]): after the toy base model was trained
longer (toy-IF-I/TRAINING.md) the old default, 200 steps at lr 7e-4 with the T5 frozen, no longer learned the
subject. One run per row, SR off, 6 samples per prompt (so +-0.1 is noise); the same 32 class images within each
of the two groups:

    steps  lr      text encoder   P(subject)   prompt fidelity   P(subject | "a star")   DIV of "a star"
    200    7e-4    frozen         0.17         0.70              0.00                    0.14   every star blue on yellow
    200    3e-4    frozen         0.21         0.86              0.29                    0.19
    200    1.5e-4  frozen         0.07         1.00              0.00                    0.19   the subject not learned
    400    3e-4    frozen         0.04         0.76              0.00                    0.08   every star red on green
    200    7e-4    fine-tuned     0.28         0.63              0.00                    0.12
    200    3e-4    fine-tuned     0.38         1.00              0.33                    0.28
    --- other class images:
    200    3e-4    fine-tuned     0.17         0.97              0.17                    0.22
    300    5e-4    fine-tuned     0.45         0.87              0.00                    0.28
    400    3e-4    fine-tuned     0.64         0.90              0.00                    0.23   the default

The frozen tiny T5 encodes "a lux star" almost as "a star" (pooled cosine 0.93), so the U-Net alone has to pull
the subject and the class apart; fine-tuning the encoder lets the identifier move instead.

The search of issue 17 (benchmarks/toy_search.py; every figure is in benchmarks/toy_search.json). Each model
re-scored with 8 samples per prompt (40 subject-prompt samples, so about +-0.08), ancestral 25 steps, guidance 5,
one seed, identifier "lux", the 32 class images of seed 0; DIV of "a star" before fine-tuning: 0.147:

    run                                        P(subject)  prompt fid.  P(subject | "a star")  DIV "a star"
    default (400 steps, lr 3e-4, lambda 1)     0.38        0.93         0.08                   0.239
      same model, guidance 8                   0.45        0.98         0.00                   0.271
      same model, 50 steps                     0.43        0.91         0.00                   0.223
      same model, DDIM 25 steps                0.10        0.70         0.00                   0.247
    250 steps, identifier row lr 1e-2          0.45        0.98         0.62                   0.189
    250 steps, T5 lr 1e-3                      0.26        0.98         0.00                   0.210
    300 steps, lr 5e-4, lambda 0.5             0.90        0.85         0.75                   0.098
    300 steps, lr 5e-4, lambda 0.75            0.49        0.90         0.25                   0.247
    300 steps, lr 5e-4, lambda 0.5, "fw"       0.95        0.93         0.00                   0.245
      seed 1 (its own class images)            0.78        0.82         0.00                   0.152 (before 0.250)
      seed 2 (its own class images)            1.00        0.80         0.00                   0.172 (before 0.192)
    300 steps, lr 5e-4, lambda 0.75, "fw"      1.00        0.85         0.00                   0.252
    200 steps, lr 5e-4, lambda 0.5, "fw"       0.94        0.87         0.00                   0.218
    Textual Inversion (150 steps, lr 1e-2)     0.00 x 3 seeds  1.00/1.00/0.98  0.00 (model unchanged)

The sampler of the grid is not the bottleneck (DDIM is much worse). With "lux", the subject and the class move
together: whatever lets the subject in (a lower lambda, a fast identifier embedding) lets it into "a star" too.
The identifier "fw" (the rare-token candidate whose "a [V] star" the frozen T5 encodes least like "a star":
pooled cosine 0.87, "lux" 0.93) with the same settings keeps "a star" free of the subject on three seeds (also
at lambda 0.75, and in 200 steps); its prompt fidelity (0.80-0.93) stays below the issue's 0.9. DIV of 8 samples
is noisy (the "before" of 8 class images ranges 0.147-0.250 over seeds). Textual Inversion never draws the
two-colour star: the frozen model has never drawn a two-colour shape.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinybooth import experiment, train  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = {  # name -> (extra command-line flags, changes to the settings the command line cannot express)
    "DreamBooth": ([], {}),
    "no prior preservation": (["--no-prior-preservation"], {}),
    "wrong class noun (heart)": (["--class-noun", "heart"], {}),
    "no class noun": (["--no-prior-preservation"], {"class_noun": ""}),  # "a [V]": no class, so no prior either
    "SR noise augmentation 1e-3": (["--sr-noise-level", "1e-3"], {}),
}


def run_variant(name, flags, changes, out_root, extra):
    s = train.parse(["--output-dir", str(out_root / name.split(" (")[0].replace(" ", "_")), "--overwrite",
                     *flags, *extra])
    vars(s).update(changes)
    out = experiment.run(s)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"variant": name, "instance_prompt": metrics["settings"]["instance_prompt"],
            "class_prompt": metrics["settings"]["class_prompt"], **metrics["toy"],
            "seconds": metrics["timings"]["total_s"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "08_ablations.json"))
    p.add_argument("--runs-dir", default=str(HERE.parent / "runs" / "ablations"))
    p.add_argument("--steps", type=int, help="base-model steps per run (default: the toy default)")
    args = p.parse_args(argv)
    extra = ["--max-steps", str(args.steps)] if args.steps else []
    t0 = time.time()
    rows = [run_variant(name, flags, changes, Path(args.runs_dir), extra)
            for name, (flags, changes) in VARIANTS.items()]
    table = {"command": "python lessons/08_ablations.py" + (f" --steps {args.steps}" if args.steps else ""),
             "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch CPU",
             "minutes": round((time.time() - t0) / 60, 1), "rows": rows}
    Path(args.out).write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
