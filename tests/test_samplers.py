"""tinybooth.samplers against diffusers' DDPMScheduler / DDIMScheduler runs stored in tests/fixtures/diffusion.

Each stored run has, per step, the model output of the toy denoiser (tests/reference/diffusion_toy_model.py), the
noise, and the reference z_{t_prev}. Step tests start every step from the reference z_t (errors do not pile up);
chain tests feed tinybooth's own z back in for the whole run; seeded tests run `sample()` with the same generator.
"""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tinybooth.samplers import (ancestral_step, classifier_free_guidance, ddim_step, dynamic_threshold, sample,
                                timesteps)
from tinybooth.schedule import DiscreteSchedule

from conftest import ROOT
from test_schedule import DIFFUSION, SCHEDULES, assert_close

sys.path.insert(0, str(ROOT / "tests" / "reference"))
from diffusion_toy_model import toy_model  # noqa: E402

RUNS = json.loads((DIFFUSION / "trajectories.json").read_text())
TRAJ = load_file(DIFFUSION / "trajectories.safetensors")
TIMESTEPS = json.loads((DIFFUSION / "timesteps.json").read_text())
THRESHOLD = load_file(DIFFUSION / "threshold.safetensors")
TOL = 1e-5  # fp32 trajectories
STEP = {"ancestral": ancestral_step, "ddim": ddim_step}
TASK = {"ancestral": pytest.mark.task3_2, "ddim": pytest.mark.task3_1}


def run_schedule(name):
    """The run's schedule: public configs through from_pretrained, with the reference betas as trained_betas so the
    sampler tasks do not depend on Task 1.1 (test_schedule checks those betas)."""
    spec = RUNS[name]["config"]
    if isinstance(spec, str):
        config = json.loads((DIFFUSION / spec / "scheduler" / "scheduler_config.json").read_text())
    else:
        config = dict(spec)
    base = {"squaredcos_cap_v2": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}.get(
        config.get("beta_schedule"), "linear")
    return DiscreteSchedule.from_config({**config, "trained_betas": SCHEDULES[f"{base}.betas"].tolist()})


def runs(stored_steps=True, chainable=False):
    """pytest params over the stored runs, marked with their sampler's task (and 3.4 when the config thresholds,
    3.5 for whole `sample()` loops, which lay out their own timesteps)."""
    params = []
    for name, info in RUNS.items():
        if stored_steps and info.get("stored_steps") == "first_and_last":
            continue
        if chainable and info["t_prev"][:-1] != info["timesteps"][1:]:
            continue  # diffusers' DDIM strides T // N, which leaves the linspace grid; only step tests cover it
        marks = [TASK[info["sampler"]]] + ([pytest.mark.task3_5] if chainable else [])
        config = json.dumps(info["config"])
        if "thresholding" in config or info["config"] == "if_stage1":
            marks.append(pytest.mark.task3_4)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def step_args(name, i):
    info = RUNS[name]
    kw = dict(eta=info["eta"]) if info["sampler"] == "ddim" else {}
    return TRAJ[f"{name}.model_out"][i], info["timesteps"][i], info["t_prev"][i], kw


@pytest.mark.parametrize("name", runs())
def test_every_step_matches_reference(name):
    info, schedule = RUNS[name], run_schedule(name)
    z, noise = TRAJ[f"{name}.z"], TRAJ[f"{name}.noise"]
    for i in range(info["num_steps"]):
        model_out, t, t_prev, kw = step_args(name, i)
        z_prev = STEP[info["sampler"]](model_out, t, t_prev, z[i], schedule, noise=noise[i], **kw)
        assert_close(z_prev, z[i + 1], TOL, f"{name}: {info['sampler']} step {i} (t = {t} -> {t_prev}) z_t_prev")


@pytest.mark.parametrize("name", runs())
def test_whole_chain_matches_reference(name):
    info, schedule = RUNS[name], run_schedule(name)
    z_ref, noise = TRAJ[f"{name}.z"], TRAJ[f"{name}.noise"]
    z = z_ref[0]
    for i in range(info["num_steps"]):
        _, t, t_prev, kw = step_args(name, i)
        t_batch = torch.full((z.shape[0],), t)
        model_out = toy_model(z, t_batch, schedule.alphas_cumprod, info["prediction_type"], info["learned_variance"])
        z = STEP[info["sampler"]](model_out, t, t_prev, z, schedule, noise=noise[i], **kw)
    assert_close(z, z_ref[-1], TOL, f"{name}: final sample after {info['num_steps']} chained steps")


@pytest.mark.parametrize("name", runs(stored_steps=False, chainable=True))
def test_sample_loop_seeded_like_a_pipeline_matches_reference(name):
    info, schedule = RUNS[name], run_schedule(name)
    denoise = lambda z, t: toy_model(z, t, schedule.alphas_cumprod, info["prediction_type"], info["learned_variance"])
    generator = torch.Generator().manual_seed(info["seed"])
    z_0, trajectory = sample(denoise, schedule, tuple(info["shape"]), info["num_steps"], sampler=info["sampler"],
                             eta=info["eta"], generator=generator, return_trajectory=True)
    assert trajectory.shape == (info["num_steps"] + 1, *info["shape"]), "trajectory is [N + 1, *shape]"
    assert_close(trajectory[0], TRAJ[f"{name}.seeded_z_T"], 0, f"{name}: z_T must be the generator's first draw")
    assert_close(z_0, TRAJ[f"{name}.seeded_z_0"], TOL, f"{name}: final sample of sample(..., generator=seed)")


@pytest.mark.task3_5
@pytest.mark.parametrize("row", TIMESTEPS, ids=lambda r: f"{r['spacing']}-offset{r['steps_offset']}-n{r['num_steps']}")
def test_timesteps_match_reference_set_timesteps(row):
    schedule = DiscreteSchedule.from_config({"steps_offset": row["steps_offset"], "trained_betas": [0.01] * 1000})
    ts = timesteps(schedule, row["num_steps"], spacing=row["spacing"])
    assert ts.dtype == torch.long, "timesteps must be a LongTensor"
    assert ts.tolist() == row["timesteps"], (f"{row['spacing']} spacing, steps_offset {row['steps_offset']}, "
                                             f"N = {row['num_steps']}: expected {row['timesteps'][:6]}..., "
                                             f"got {ts.tolist()[:6]}...")


def test_timesteps_refuses_more_steps_than_training_steps():
    schedule = DiscreteSchedule.from_config({"trained_betas": [0.01] * 1000})
    with pytest.raises(ValueError, match="num_steps"):
        timesteps(schedule, 1001)


@pytest.mark.task3_4
@pytest.mark.parametrize("ratio, max_value", [(0.95, 1.5), (0.8, 2.0)])
def test_dynamic_threshold_matches_reference(ratio, max_value):
    out = dynamic_threshold(THRESHOLD["x0"], ratio, max_value)
    assert_close(out, THRESHOLD[f"thresholded_{ratio}_{max_value}"], 1e-6,
                 f"dynamic thresholding (p = {ratio}, max_value {max_value})")


@pytest.mark.task3_4
def test_dynamic_threshold_is_clipping_when_s_is_clamped_to_one():
    x0 = torch.tensor([[-3.0, -0.5, 0.2, 0.9] * 10]).view(1, 1, 5, 8)
    # with max_value 1 the threshold s is 1 whatever the quantile: plain clipping to [-1, 1]
    assert torch.equal(dynamic_threshold(x0, 0.95, 1.0), x0.clamp(-1, 1)), "s = 1 must reduce to clipping"
    big = torch.full((2, 3, 4, 4), 1.2)
    big[1] = 5.0
    out = dynamic_threshold(big, 0.95, 1.5)
    assert torch.allclose(out[0], torch.ones(3, 4, 4)), "s = 1.2 (quantile) -> 1.2 / 1.2 = 1"
    assert torch.allclose(out[1], torch.ones(3, 4, 4)), "s = 1.5 (clamped) -> clamp(5, -1.5, 1.5) / 1.5 = 1"


@pytest.mark.task3_3
def test_classifier_free_guidance_formula_and_scale_one():
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    assert torch.allclose(classifier_free_guidance(uncond, cond, 1.0), cond, atol=1e-6), \
        "guidance scale 1 must return the conditional prediction eps_cond"
    out = classifier_free_guidance(uncond, cond, 7.0, channels=3)
    two_points = classifier_free_guidance(torch.full((1, 3, 1, 1), 0.5), torch.ones(1, 3, 1, 1), 7.0)
    assert torch.allclose(two_points, torch.full((1, 3, 1, 1), 4.0)), \
        f"eps_uncond = 0.5, eps_cond = 1, s = 7: 7 steps of 0.5 from 0.5 land on 4.0; got {two_points[0, 0, 0, 0]}"
    assert torch.equal(out[:, 3:], cond[:, 3:]), "the learned-variance channels come from the conditional branch"
    assert torch.allclose(classifier_free_guidance(uncond, cond, 0.0), uncond), "scale 0 is the unconditional model"


def test_ancestral_learned_range_requires_variance_channels():
    schedule = run_schedule("if_stage1_ancestral")
    z = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="learned_range"):
        ancestral_step(torch.zeros(1, 3, 4, 4), 500, 450, z, schedule)


@pytest.mark.task3_1
def test_ddim_eta0_is_deterministic_and_exact_on_a_perfect_denoiser():
    """Given the true eps as model_out, DDIM (eta = 0) maps alpha_t x + sigma_t eps to alpha_s x + sigma_s eps."""
    schedule = DiscreteSchedule.from_config({"clip_sample": False, "trained_betas": SCHEDULES["linear.betas"].tolist()})
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = schedule.alpha_sigma(600), schedule.alpha_sigma(300)
    z_s = ddim_step(eps, 600, 300, alpha_t * x + sigma_t * eps, schedule, eta=0.0, generator=g)
    assert_close(z_s, alpha_s * x + sigma_s * eps, 1e-5,
                 "DDIM eta=0 with a perfect eps prediction must land on z_s = alpha_s x + sigma_s eps")


@pytest.mark.task3_1
@pytest.mark.task3_5
def test_sample_honours_dtype_and_z_T():
    schedule = run_schedule("vpred_ddim_trailing")
    denoise = lambda z, t: toy_model(z.float(), t, schedule.alphas_cumprod, "v_prediction").to(z.dtype)
    out = sample(denoise, schedule, (1, 3, 4, 4), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64 and out.shape == (1, 3, 4, 4), f"got {out.dtype} {tuple(out.shape)}"
    z_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    again = sample(denoise, schedule, (1, 3, 4, 4), 4, z_T=z_T)
    assert torch.equal(out, again), "sample(z_T=...) must start from the given z_T (eta = 0: deterministic)"
