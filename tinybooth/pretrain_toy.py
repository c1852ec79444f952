"""`python -m tinybooth.pretrain_toy`: pretrain the embedded default (tinybooth.toy.pretrain has the recipe).

    python -m tinybooth.pretrain_toy --out tinybooth/assets --device cuda --seed 0

writes toy-IF-I/ (tokenizer, T5, stage-I U-Net), toy-IF-II/ (stage-II U-Net), toy-evaluator/, and records the
recipe, machine, wall time and the quality bar (tinybooth.toy.quality) in toy-IF-I/results.json.
"""
import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from tinybooth import plots
from tinybooth.errors import ArgumentParser, main_guard
from tinybooth.text import T5Encoder, T5Tokenizer
from tinybooth.toy import pretrain, quality
from tinybooth.toy.evaluator import ToyEvaluator
from tinybooth.unet import UNet


def build_parser():
    p = ArgumentParser(prog="python -m tinybooth.pretrain_toy", description=pretrain.__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default=str(pretrain.ASSETS), help="where toy-IF-I/, toy-IF-II/, toy-evaluator/ are written")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--seed", type=int, default=0)
    a("--stages", default="tokenizer,evaluator,base,sr,measure", help="comma-separated; stages not run are loaded "
      "from --out")
    a("--num-images", type=int, default=150_000, help="rendered training pictures")
    a("--two-colour-fraction", type=float, default=0.0, help="share of training pictures whose shape is split into "
      "two world colours (\"a red and blue heart\"); the shipped weights saw none (a CPU trial with 0.3: "
      "benchmarks/toy_recipes.md)")
    a("--evaluator-images", type=int, default=60_000)
    a("--evaluator-steps", type=int, default=1500)
    # the first shipped run stopped on its time limits (--base-time 285 --sr-time 125 on an H100) after these steps
    a("--base-steps", type=int, default=2266)
    a("--sr-steps", type=int, default=886)
    a("--base-time", type=float, default=math.inf, help="time limit of the base stage, seconds")
    a("--sr-time", type=float, default=math.inf, help="time limit of the SR stage, seconds")
    a("--batch-size", type=int, default=1024, help="base model batch (large: small models are launch-bound on a "
      "GPU, so a big batch is nearly free)")
    a("--sr-batch-size", type=int, default=512)
    a("--lr", type=float, default=1e-3)
    a("--num-samples", type=int, default=256, help="samples for the quality bar (>= 200)")
    a("--base-samplings", default="all", help="stage-I samplings the quality bar measures, e.g. ancestral100_cfg5 "
      "(the others keep the figures results.json already holds; the best measured one feeds stage II)")
    a("--workers", type=int, default=os.cpu_count())
    a("--log", default=None, help="also append the log to this file")
    a("--resume", action="store_true", help="start the base / SR stages from the weights already in --out (a run "
      "continued)")
    return p


def machine_name(device):
    return f"{platform.node()} {platform.processor() or platform.machine()}, " + (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores")


def train_stages(args, stages, out, device, results, log):
    """The tokenizer, evaluator, base and SR stages that `stages` names; their records go into results."""
    rec, machine, tok_dir = results.setdefault("stages", {}), machine_name(device), out / "toy-IF-I" / "tokenizer"
    if "tokenizer" in stages:
        pretrain.train_tokenizer(tok_dir, args.seed)
        rec["tokenizer"] = dict(pieces=pretrain.SPM_PIECES, extra_ids=pretrain.EXTRA_IDS, seed=args.seed)
    tokenizer = T5Tokenizer.from_pretrained(tok_dir)
    if "evaluator" in stages:
        evaluator, acc = pretrain.train_evaluator(args, device, log)
        evaluator.save_pretrained(out / "toy-evaluator")
        rec["evaluator"] = dict(steps=args.evaluator_steps, images=args.evaluator_images, held_out_accuracy=acc,
                                machine=machine)
    if "base" in stages or "sr" in stages:
        t0 = time.time()
        data, specs = pretrain.render_dataset(args.num_images, args.seed, args.workers,
                                              two_colour_fraction=args.two_colour_fraction)
        data = torch.from_numpy(data).to(device)  # 150k pictures: 1.8 GB of uint8, kept on the GPU
        captions = pretrain.CaptionTable(specs, tokenizer, args.seed, device)
        log(f"rendered {len(data)} pictures, {len(captions.ids)} distinct captions ({time.time() - t0:.0f} s)")
    common = dict(lr=args.lr, images=args.num_images, two_colour_fraction=args.two_colour_fraction, machine=machine)
    if "base" in stages:
        t5, base, info = pretrain.train_base(args, data, captions, tokenizer, device)
        pretrain.save_stage_one(out, t5, base, tok_dir)
        rec["base"] = dict(info, batch_size=args.batch_size, seed=args.seed, **common,
                           continues=rec.get("base") if args.resume else None)
    if "sr" in stages:
        t5 = T5Encoder.from_pretrained(out / "toy-IF-I" / "text_encoder", device=device).eval()
        sr, info = pretrain.train_sr(args, data, captions, t5, device)
        pretrain.save_stage_two(out, sr)
        rec["sr"] = dict(info, batch_size=args.sr_batch_size, seed=args.seed + 1, **common,
                         continues=rec.get("sr") if args.resume else None)
    return tokenizer


def measure_stage(args, out, device, tokenizer, results, log):
    """The quality bar on the saved models; its grids go next to results.json."""
    t5 = T5Encoder.from_pretrained(out / "toy-IF-I" / "text_encoder", device=device).eval()
    evaluator = ToyEvaluator.from_pretrained(out / "toy-evaluator", device=device).eval()
    base = UNet.from_pretrained(out / "toy-IF-I" / "unet", device=device).eval()
    sr = (UNet.from_pretrained(out / "toy-IF-II" / "unet", device=device).eval()
          if (out / "toy-IF-II" / "unet").exists() else None)
    measured = quality.measure(args, t5, tokenizer, base, sr, evaluator, device, log)
    for name, images in measured.pop("grids", {}).items():
        plots.save_grid(images, -(-len(images) // 8), out / "toy-IF-I" / f"samples_{name}.png")
    machine = machine_name(device)
    previous = results.get("quality", {}) if args.base_samplings != "all" else {}  # rows not measured now
    rows = {k: dict(v, machine=machine) for k, v in measured.pop("base").items()}
    results["quality"] = dict(previous, **measured, base={**previous.get("base", {}), **rows}, machine=machine)


def run(argv=None):
    args = build_parser().parse_args(argv)
    stages, device, out, t_start = args.stages.split(","), torch.device(args.device), Path(args.out), time.time()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    def log(msg):
        line = f"[{time.time() - t_start:7.1f} s] {msg}"
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")

    results_file = out / "toy-IF-I" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    tokenizer = train_stages(args, stages, out, device, results, log)
    if "measure" in stages:
        measure_stage(args, out, device, tokenizer, results, log)
    results.setdefault("wall_time_s", {})[args.stages] = round(time.time() - t_start, 1)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    log(f"done; results in {results_file}")


def main(argv=None):
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
