"""Reference runs for issue 15: the grids and samplers tests/reference/make_diffusion_fixtures.py does not cover.

    /work/refenv/bin/python tests/reference/make_sampler_fixtures.py

(run it after make_diffusion_fixtures.py, which clears tests/fixtures/diffusion/) writes there:
    samplers.json / samplers.safetensors
        "ancestral": DDPMScheduler runs on grids that end above t = 0 (trailing spacing, steps_offset 1) with every
            variance type, a linspace grid at a .5 tie (T = 1000, N = 27), and IF's tuned lists (fast27, super27)
            passed as set_timesteps(timesteps=...). Per step: model_out, noise, z, t_prev; plus a run seeded like
            a pipeline (seeded_z_T, seeded_z_0), as in trajectories.json.
        "solvers": PNDMScheduler (SD 1.5's config: skip_prk_steps; and the PRK warm-up, also with v-prediction)
            and DPMSolverMultistepScheduler (dpmsolver++, order 2; leading, linspace, Karras sigmas on linear and
            cosine schedules, IF's config with thresholding, a custom list) from a seeded z_T: the state at each
            grid point (`z`, [N + 1, ...]), the grid and, for DPM-Solver++, its sigmas (sigma / alpha).
        "linspace_timesteps": set_timesteps on linspace grids where torch.linspace rounds the other way.
        "if_timesteps": the lists of diffusers' pipelines/deepfloyd_if/timesteps.py.
The model is tests/reference/diffusion_toy_model.py's exact denoiser of a Gaussian (the tests import it). The
DPM-Solver++ and PNDM schedulers are built from the public config as a pipeline swaps them in:
Scheduler.from_config(pipe.scheduler.config), i.e. with the config's class defaults filled in first.

Max |difference| of the final sample from diffusers', fp32, toy denoiser, seeded like a pipeline: tinybooth
before issue 15 (03985b9) -> after. Measured by running both versions of tinybooth.samplers.sample on these
fixtures' configs, seeds and z_T:
    trailing_fixed_large_13     linear, fixed_large, trailing, 13 steps (no noise on the last step)   0.56    -> 0
    if_offset1_learned_9        IF-I config, steps_offset 1, learned_range, 9 steps                  1.5e-4  -> 0
    cosine_learned_trailing_27  cosine, learned_range, trailing, 27 steps                            1.7e-3  -> 0
    sd15_ddpm_trailing_11       SD 1.5 config as DDPM, fixed_small, trailing (noise sqrt(1e-20))     0       -> 0
    linear_linspace_27          linspace, T = 1000, N = 27 (step 500 where numpy gives 499)          8.9e-4  -> 0
    if_fast27, if_super27       IF-I config, timesteps=fast27 / super27                          not accepted -> 0
    sd15_pndm_17                SD 1.5's PNDMScheduler config (skip_prk_steps), 17 steps   8.4e-2 (ran DDIM) -> 3.6e-7
    pndm_prk_16                 PRK warm-up, 16 steps                                      0.58 (ran DDIM)   -> 3.6e-7
    pndm_prk_vpred_25           PRK warm-up, cosine, v-prediction, 25 steps                0.52 (ran DDIM)   -> 2.4e-7
    sd15_dpmpp_14, sd15_dpmpp_karras_12, if_dpmpp_15, cosine_vpred_karras_7, linspace_sample_dpmpp_9
                                DPM-Solver++ 2M                                            not available -> <= 3.6e-7
    if_dpmpp_smart27            DPM-Solver++ 2M on IF's smart27 list                       not available -> 3.6e-6
Precision of one ancestral step (cosine schedule, prediction_type sample, vs the same formula in float64):
    t = 999 -> 899: 1.1e-4 -> 1.9e-7;  t = 999 -> 500: 1.4e-4 -> 3.4e-7 (tests/test_samplers.py).
Timesteps: torch.linspace's rounding differed from numpy's for 138 of the N in 1..1000 at T = 1000; now none.
Still different, by choice (the one-step samplers and PNDM go to the next grid point; diffusers' DDIMScheduler and
PNDMScheduler step by T // N and then evaluate at the grid point): DDIM trailing N = 30: 9.2e-3, DDIM linspace
N = 30: 4.0e-2, PNDM trailing N = 30: 8.9e-3. On 'leading' grids (SD's, IF's) and trailing grids with N dividing
T the two agree.
"""
import json
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.pipelines.deepfloyd_if import timesteps as if_timesteps
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from diffusion_toy_model import toy_model  # noqa: E402
from make_diffusion_fixtures import IF_STAGE1, SD15, _ddpm_step_with_noise  # noqa: E402

OUT = HERE.parent / "fixtures" / "diffusion"
SEED = 0
IF_NAMES = ["fast27", "smart27", "smart50", "smart100", "smart185", "super27", "super40", "super100"]
SD15_DDPM_TRAILING = {**SD15, "_class_name": "DDPMScheduler", "timestep_spacing": "trailing"}
IF_OFFSET1 = {**IF_STAGE1, "steps_offset": 1}

# name: (config, steps: a count or an IF grid name, shape, learned_variance)
ANCESTRAL = {
    "trailing_fixed_large_13": (dict(variance_type="fixed_large", timestep_spacing="trailing"), 13, (2, 3, 4, 4),
                                False),
    "if_offset1_learned_9": (IF_OFFSET1, 9, (2, 3, 4, 4), True),
    "cosine_learned_trailing_27": (dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                                        timestep_spacing="trailing"), 27, (1, 3, 4, 4), True),
    "sd15_ddpm_trailing_11": (SD15_DDPM_TRAILING, 11, (1, 4, 4, 4), False),
    "linear_linspace_27": (dict(timestep_spacing="linspace"), 27, (1, 3, 4, 4), False),
    "if_fast27": (IF_STAGE1, "fast27", (1, 3, 4, 4), True),
    "if_super27": (IF_STAGE1, "super27", (1, 3, 4, 4), True),
}
# name: (scheduler class, config, steps, shape, learned_variance)
SOLVERS = {
    "sd15_pndm_17": (PNDMScheduler, SD15, 17, (1, 4, 4, 4), False),
    "pndm_prk_16": (PNDMScheduler, dict(skip_prk_steps=False, steps_offset=1, set_alpha_to_one=False), 16,
                    (2, 3, 4, 4), False),
    "pndm_prk_vpred_25": (PNDMScheduler, dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                              skip_prk_steps=False, set_alpha_to_one=True), 25, (1, 3, 4, 4), False),
    "sd15_dpmpp_14": (DPMSolverMultistepScheduler, SD15, 14, (1, 4, 4, 4), False),
    "sd15_dpmpp_karras_12": (DPMSolverMultistepScheduler, {**SD15, "use_karras_sigmas": True}, 12, (1, 4, 4, 4),
                             False),
    "if_dpmpp_15": (DPMSolverMultistepScheduler, IF_STAGE1, 15, (2, 3, 4, 4), True),
    "if_dpmpp_smart27": (DPMSolverMultistepScheduler, IF_STAGE1, "smart27", (1, 3, 4, 4), True),
    "cosine_vpred_karras_7": (DPMSolverMultistepScheduler, dict(beta_schedule="squaredcos_cap_v2",
                                                                prediction_type="v_prediction",
                                                                use_karras_sigmas=True), 7, (1, 3, 4, 4), False),
    "linspace_sample_dpmpp_9": (DPMSolverMultistepScheduler, dict(prediction_type="sample",
                                                                  timestep_spacing="linspace"), 9, (1, 3, 4, 4),
                                False),
}


def set_steps(sched, steps):
    if isinstance(steps, str):
        sched.set_timesteps(timesteps=getattr(if_timesteps, f"{steps}_timesteps"))
    else:
        sched.set_timesteps(steps)


def as_pipeline_config(cls, config):
    """The config a pipeline hands to cls.from_config: the public file's class with its defaults filled in."""
    source = {"PNDMScheduler": PNDMScheduler}.get(config.get("_class_name"), DDPMScheduler)
    return cls.from_config(source.from_config(config).config)


def ancestral_run(name, config, steps, shape, learned):
    sched = DDPMScheduler.from_config(config)
    set_steps(sched, steps)
    pred = sched.config.prediction_type
    g = torch.Generator().manual_seed(SEED + 10)
    z = torch.randn(shape, generator=g)
    record = dict(z=[z], model_out=[], noise=[])
    t_prev = []
    for t in sched.timesteps:
        model_out = toy_model(z, torch.full((shape[0],), int(t)), sched.alphas_cumprod, pred, learned)
        noise = torch.randn(shape, generator=g)
        t_prev.append(int(sched.previous_timestep(t)))
        z = _ddpm_step_with_noise(sched, model_out, t, z, noise).prev_sample
        record["z"].append(z)
        record["model_out"].append(model_out)
        record["noise"].append(noise)
    tensors = {f"{name}.{k}": torch.stack(v).contiguous() for k, v in record.items()}
    g = torch.Generator().manual_seed(SEED + 20)  # seeded like a pipeline: z_T, then each step's draw
    sched = DDPMScheduler.from_config(config)
    set_steps(sched, steps)
    z = tensors[f"{name}.seeded_z_T"] = torch.randn(shape, generator=g)
    for t in sched.timesteps:
        model_out = toy_model(z, torch.full((shape[0],), int(t)), sched.alphas_cumprod, pred, learned)
        z = sched.step(model_out, t, z, generator=g).prev_sample
    tensors[f"{name}.seeded_z_0"] = z
    info = dict(config=config, steps=steps, shape=list(shape), learned_variance=learned, prediction_type=pred,
                timesteps=sched.timesteps.tolist(), t_prev=t_prev, seed=SEED + 20, sampler="ancestral",
                num_steps=len(t_prev), eta=0.0)
    return info, tensors


def grid_states(cls, config, outputs, num_steps):
    """The states at the grid points among a scheduler's step() outputs: PNDM's Heun step and PRK warm-up take
    extra evaluations whose outputs are intermediate."""
    if cls is not PNDMScheduler:
        return outputs
    if config.get("skip_prk_steps", False):
        return outputs if num_steps == 1 else outputs[1:]
    return [outputs[3], outputs[7], outputs[11]] + outputs[12:]


def solver_run(name, cls, config, steps, shape, learned):
    sched = as_pipeline_config(cls, config)
    set_steps(sched, steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)  # as pipelines do; the index search breaks on repeated steps (Karras on cosine)
    pred = sched.config.prediction_type
    g = torch.Generator().manual_seed(SEED + 20)
    z_T = z = torch.randn(shape, generator=g)
    outputs = []
    for t in sched.timesteps:
        model_out = toy_model(z, torch.full((shape[0],), int(t)), sched.alphas_cumprod, pred, learned)
        z = sched.step(model_out, t, z).prev_sample
        outputs.append(z)
    grid = sched.timesteps if cls is not PNDMScheduler else sched._timesteps[::-1].copy()
    states = [z_T] + grid_states(cls, sched.config, outputs, len(grid))
    assert len(states) == len(grid) + 1, f"{name}: {len(states)} states for {len(grid)} grid points"
    info = dict(config=config, sampler="pndm" if cls is PNDMScheduler else "dpmpp-2m", steps=steps,
                shape=list(shape), learned_variance=learned, prediction_type=pred, seed=SEED + 20,
                timesteps=[int(t) for t in grid],  # the config diffusers ran (its defaults-used list sorted)
                scheduler_config={k: sorted(v) if k == "_use_default_values" else v for k, v in sched.config.items()})
    if cls is DPMSolverMultistepScheduler:
        info["sigmas"] = sched.sigmas.tolist()
    return info, {f"{name}.z": torch.stack(states).contiguous()}


def linspace_timesteps():
    rows = []
    for n in (27, 31, 47, 53, 59, 61, 93, 103):
        s = DDPMScheduler(timestep_spacing="linspace")
        s.set_timesteps(n)
        rows.append(dict(num_steps=n, timesteps=s.timesteps.tolist()))
    return rows


def jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def main():
    torch.manual_seed(SEED)
    tensors, runs = {}, {"ancestral": {}, "solvers": {}}
    for name, spec in ANCESTRAL.items():
        runs["ancestral"][name], t = ancestral_run(name, *spec)
        tensors.update(t)
    for name, spec in SOLVERS.items():
        runs["solvers"][name], t = solver_run(name, *spec)
        tensors.update(t)
    runs["linspace_timesteps"] = linspace_timesteps()
    runs["if_timesteps"] = {n: getattr(if_timesteps, f"{n}_timesteps") for n in IF_NAMES}
    runs["meta"] = dict(diffusers=diffusers.__version__, torch=torch.__version__, seed=SEED,
                        generator="/work/refenv/bin/python tests/reference/make_sampler_fixtures.py")
    save_file(tensors, OUT / "samplers.safetensors")
    with open(OUT / "samplers.json", "w") as f:
        json.dump(jsonable(runs), f, indent=1)
    size = (OUT / "samplers.safetensors").stat().st_size + (OUT / "samplers.json").stat().st_size
    print(f"wrote {OUT}/samplers.json, samplers.safetensors ({size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
