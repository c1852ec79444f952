"""Reference outputs for tinybooth.schedule / loss / samplers, made with diffusers' DDPMScheduler and DDIMScheduler.

    /work/refvenv/bin/python tests/reference/make_diffusion_fixtures.py

writes tests/fixtures/diffusion/:
    if_stage1/scheduler/scheduler_config.json   DeepFloyd IF-I's public scheduler config (values of the published file)
    sd15/scheduler/scheduler_config.json        Stable Diffusion 1.5's public scheduler config
    schedules.safetensors    betas, alphas_cumprod for each beta_schedule (+ a short T = 50 one)
    timesteps.json           set_timesteps() for each spacing x steps_offset x num_steps
    forward.safetensors      add_noise (q_sample) and get_velocity (v) on random x, eps, t
    threshold.safetensors    _threshold_sample (dynamic thresholding) on inputs of varied magnitude
    trajectories.json / .safetensors   multi-step sampling runs: z_T, per step (t, t_prev, model_out, noise,
                             x0 prediction, z_{t_prev}), and the final sample of a run seeded like a pipeline
    meta.json                library versions and seeds
The stand-in for a U-Net is tests/reference/diffusion_toy_model.py (the tests import the same function).
"""
import json
import shutil
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from diffusion_toy_model import toy_model  # noqa: E402

OUT = HERE.parent / "fixtures" / "diffusion"
SEED = 0

# The published scheduler configs (DeepFloyd/IF-I-XL-v1.0 scheduler/, runwayml/stable-diffusion-v1-5 scheduler/).
IF_STAGE1 = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.16.0", "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "clip_sample": True, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.95, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.5, "thresholding": True, "trained_betas": None, "variance_type": "learned_range",
}
SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
PUBLIC = {"if_stage1": IF_STAGE1, "sd15": SD15}

# name: (config or public name, scheduler, num_steps, eta, shape, learned_variance)
RUNS = {
    "if_stage1_ancestral": ("if_stage1", "ddpm", 20, 0.0, (2, 3, 8, 8), True),
    "sd15_ancestral": ("sd15", "ddpm", 10, 0.0, (2, 4, 8, 8), False),
    "sd15_ddim_eta0": ("sd15", "ddim", 10, 0.0, (2, 4, 8, 8), False),
    "sd15_ddim_eta05": ("sd15", "ddim", 10, 0.5, (2, 4, 8, 8), False),
    "vpred_ddim_trailing": (dict(prediction_type="v_prediction", timestep_spacing="trailing"), "ddim", 10, 0.0,
                            (2, 3, 8, 8), False),
    "sample_fixed_large_linspace": (dict(prediction_type="sample", variance_type="fixed_large",
                                         timestep_spacing="linspace", clip_sample_range=1.5), "ddpm", 10, 0.0,
                                    (2, 3, 8, 8), False),
    "cosine_ddim_linspace_eta1": (dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"), "ddim", 10,
                                  1.0, (2, 3, 8, 8), False),
    "vpred_thresholding_ddim": (dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                     thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5),
                                "ddim", 10, 0.3, (2, 3, 8, 8), False),
    "linear_full_T_ancestral": (dict(), "ddpm", 1000, 0.0, (1, 1, 4, 4), False),
}


def make_scheduler(kind, config):
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    return cls.from_config(config)


def write_public_configs():
    for name, cfg in PUBLIC.items():
        d = OUT / name / "scheduler"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "scheduler_config.json", "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        DDPMScheduler.from_pretrained(d)  # the reference library reads it


def schedules():
    tensors = {}
    cases = {"linear": dict(), "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
             "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
             "linear_T50": dict(num_train_timesteps=50, beta_start=0.001, beta_end=0.2),
             "squaredcos_cap_v2_T50": dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=50)}
    for name, cfg in cases.items():
        s = DDPMScheduler(**cfg)
        tensors[f"{name}.betas"] = s.betas.contiguous()
        tensors[f"{name}.alphas_cumprod"] = s.alphas_cumprod.contiguous()
    save_file(tensors, OUT / "schedules.safetensors")
    return {name: cfg for name, cfg in cases.items()}


def timesteps():
    rows = []
    for spacing in ("leading", "trailing", "linspace"):
        for offset in (0, 1):
            for n in (1, 3, 7, 10, 50, 999, 1000):
                s = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
                s.set_timesteps(n)
                rows.append(dict(spacing=spacing, steps_offset=offset, num_steps=n, timesteps=s.timesteps.tolist()))
    with open(OUT / "timesteps.json", "w") as f:
        json.dump(rows, f)


def forward():
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(6, 3, 4, 4, generator=g)
    eps = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    out = dict(x=x, eps=eps, t=t)
    for name, cfg in (("linear", {}), ("squaredcos_cap_v2", dict(beta_schedule="squaredcos_cap_v2"))):
        s = DDPMScheduler(**cfg)
        out[f"{name}.z_t"] = s.add_noise(x, eps, t)
        out[f"{name}.v"] = s.get_velocity(x, eps, t)
    save_file(out, OUT / "forward.safetensors")


def threshold():
    g = torch.Generator().manual_seed(SEED + 1)
    # 0.95-quantiles of |x0| about 0.6, 1.2, 1.4 (inside [1, 1.5]) and 6 (clamped to max_value)
    scale = torch.tensor([0.3, 0.6, 0.7, 3.0]).view(4, 1, 1, 1)
    x0 = torch.randn(4, 3, 8, 8, generator=g) * scale
    out = {"x0": x0}
    for ratio, max_value in ((0.95, 1.5), (0.8, 2.0)):
        s = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
        out[f"thresholded_{ratio}_{max_value}"] = s._threshold_sample(x0)
    save_file(out, OUT / "threshold.safetensors")


def trajectory(name, spec):
    cfg_or_public, kind, n, eta, shape, learned = spec
    config = PUBLIC[cfg_or_public] if isinstance(cfg_or_public, str) else cfg_or_public
    sched = make_scheduler(kind, config)
    sched.set_timesteps(n)
    ts = sched.timesteps
    pred = sched.config.prediction_type
    g = torch.Generator().manual_seed(SEED + 10)
    z = torch.randn(shape, generator=g)
    record = dict(z=[z], model_out=[], noise=[], x0=[], t_prev=[])
    for t in ts:
        t_batch = torch.full((shape[0],), int(t))
        model_out = toy_model(z, t_batch, sched.alphas_cumprod, pred, learned)
        noise = torch.randn(shape, generator=g)
        if kind == "ddpm":
            t_prev = int(sched.previous_timestep(t))
            # DDPMScheduler draws its own noise; reproduce its draw with a generator seeded to give `noise`
            out = _ddpm_step_with_noise(sched, model_out, t, z, noise)
        else:
            t_prev = int(t) - sched.config.num_train_timesteps // n
            out = sched.step(model_out, t, z, eta=eta, variance_noise=noise if eta > 0 else None)
        z = out.prev_sample
        record["z"].append(z)
        record["model_out"].append(model_out)
        record["noise"].append(noise)
        record["x0"].append(out.pred_original_sample)
        record["t_prev"].append(t_prev)
    tensors = {f"{name}.{k}": torch.stack(v).contiguous() for k, v in record.items() if k != "t_prev"}
    # the same run seeded like a pipeline: z_T and every step's noise drawn from one generator
    g = torch.Generator().manual_seed(SEED + 20)
    sched = make_scheduler(kind, config)
    sched.set_timesteps(n)
    z = torch.randn(shape, generator=g)
    tensors[f"{name}.seeded_z_T"] = z
    for t in sched.timesteps:
        model_out = toy_model(z, torch.full((shape[0],), int(t)), sched.alphas_cumprod, pred, learned)
        kwargs = dict(eta=eta) if kind == "ddim" else {}
        z = sched.step(model_out, t, z, generator=g, **kwargs).prev_sample
    tensors[f"{name}.seeded_z_0"] = z
    info = dict(config=cfg_or_public, scheduler=kind, sampler="ancestral" if kind == "ddpm" else "ddim",
                num_steps=n, eta=eta, shape=list(shape), learned_variance=learned, prediction_type=pred,
                timesteps=ts.tolist(), t_prev=record["t_prev"], seed=SEED + 20)
    if n > 100:  # keep the fixture small: only z_T, the final sample and the seeded run of long chains
        tensors = {k: v for k, v in tensors.items() if "seeded" in k or k.endswith(".z")}
        tensors[f"{name}.z"] = tensors[f"{name}.z"][[0, -1]].contiguous()
        info["stored_steps"] = "first_and_last"
    return info, tensors


def _ddpm_step_with_noise(sched, model_out, t, z, noise):
    """DDPMScheduler.step with a given noise tensor: it draws with randn_tensor, so hand it a generator whose next
    draw is `noise` by patching the draw for this call only."""
    import diffusers.schedulers.scheduling_ddpm as ddpm
    original = ddpm.randn_tensor
    ddpm.randn_tensor = lambda shape, **kw: noise.reshape(shape)
    try:
        return sched.step(model_out, t, z)
    finally:
        ddpm.randn_tensor = original


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.manual_seed(SEED)
    write_public_configs()
    schedule_cases = schedules()
    timesteps()
    forward()
    threshold()
    infos, tensors = {}, {}
    for name, spec in RUNS.items():
        info, t = trajectory(name, spec)
        infos[name] = info
        tensors.update(t)
    save_file(tensors, OUT / "trajectories.safetensors")
    with open(OUT / "trajectories.json", "w") as f:
        json.dump(infos, f, indent=1)
    meta = dict(diffusers=diffusers.__version__, torch=torch.__version__, numpy=np.__version__, seed=SEED,
                schedules=schedule_cases, generator="python tests/reference/make_diffusion_fixtures.py "
                "(with the reference venv's python)")
    with open(OUT / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
