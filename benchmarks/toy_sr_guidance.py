"""Guidance of the toy's super-resolution samples: IF's 4 against none (1), on runs of the default command.

    python benchmarks/toy_sr_guidance.py RUN_DIR [RUN_DIR ...]

For each run (its model/ and sr_model/), the PSNR of SR(the subject's photos shrunk to 32 px) against the photos,
as metrics.json's sr_psnr_db (tinybooth.experiment.super_resolution_psnr: 10 steps, the fine-tuning noise level),
and the seconds that took, at each guidance; also the sharpness (mean |Laplacian|) of the SR of the run's grid
prompts' base samples. Prints one JSON line per (run, guidance).
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinybooth import dreambooth, experiment, models  # noqa: E402
from tinybooth.generate import encode_prompts, generate, stack, super_resolve  # noqa: E402
from tinybooth.toy.quality import laplacian_energy  # noqa: E402


def main(runs):
    for run in map(Path, runs):
        settings = json.loads((run / "settings.json").read_text())
        pipe = models.load_pipeline(run / "model", run / "sr_model", torch.device("cpu"), torch.float32,
                                    text_encoder=True)
        prompts = dreambooth.grid_prompts(settings["identifier"], "star", dreambooth.TOY_TEMPLATES)
        c_prompt = prompts[0]
        cache = encode_prompts(pipe, ["", *prompts], "cpu")
        level = dreambooth.sr_level(settings["sr_noise_level"], pipe.noising_schedule)
        c, c_uncond = stack(cache, [p for p in prompts for _ in range(3)])
        x = generate(pipe, c, c_uncond, 25, settings["guidance"], "ancestral",
                     generator=torch.Generator().manual_seed(settings["seed"]))
        for guidance in (4.0, 1.0):
            t0 = time.time()
            psnr = experiment.super_resolution_psnr(pipe, cache, c_prompt, models.TOY_SUBJECT, level, 10,
                                                    guidance=guidance)
            seconds = time.time() - t0
            y = super_resolve(pipe, x, c, c_uncond, level, 10, guidance,
                              generator=torch.Generator().manual_seed(settings["seed"]))
            print(json.dumps(dict(run=str(run), seed=settings["seed"], sr_guidance=guidance,
                                  sr_psnr_db=round(psnr, 2), psnr_seconds=round(seconds, 2),
                                  grid_sharpness=round(laplacian_energy(y).mean().item(), 4))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
