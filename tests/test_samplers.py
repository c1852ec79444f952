"""tinybooth.samplers and tinybooth.solvers against diffusers' DDPMScheduler / DDIMScheduler / PNDMScheduler /
DPMSolverMultistepScheduler runs stored in tests/fixtures/diffusion (trajectories.*: make_diffusion_fixtures.py;
samplers.*: make_sampler_fixtures.py, the grids and solvers of issue 15).

Each stored one-step run has, per step, the model output of the toy denoiser (tests/reference/diffusion_toy_model.py),
the noise, and the reference z_{t_prev}. Step tests start every step from the reference z_t (errors do not pile up);
chain tests feed tinybooth's own z back in for the whole run; seeded tests run `sample()` with the same generator.
Multistep solver runs store the state at every grid point from a seeded z_T.
"""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tinybooth.samplers import (IF_TIMESTEPS, ancestral_step, classifier_free_guidance, ddim_step, dynamic_threshold,
                                sample, sampler_from_config, timesteps)
from tinybooth.schedule import DiscreteSchedule
from tinybooth.solvers import dpm_grid, dpmpp_2m_step, plms_eps, pndm_transfer

from conftest import ROOT
from test_schedule import DIFFUSION, SCHEDULES, assert_close

sys.path.insert(0, str(ROOT / "tests" / "reference"))
from diffusion_toy_model import toy_model  # noqa: E402

RUNS = json.loads((DIFFUSION / "trajectories.json").read_text())
TRAJ = load_file(DIFFUSION / "trajectories.safetensors")
TIMESTEPS = json.loads((DIFFUSION / "timesteps.json").read_text())
THRESHOLD = load_file(DIFFUSION / "threshold.safetensors")
MORE = json.loads((DIFFUSION / "samplers.json").read_text())
MORE_TENSORS = load_file(DIFFUSION / "samplers.safetensors")
TOL = 1e-5  # fp32 trajectories
STEP = {"ancestral": ancestral_step, "ddim": ddim_step}
TASK = {"ancestral": pytest.mark.task3_2, "ddim": pytest.mark.task3_1}


def run_schedule(name):
    """The run's schedule (see schedule_for)."""
    return schedule_for(RUNS[name]["config"])


def schedule_for(spec):
    """A run's schedule: public configs through from_pretrained, with the reference betas as trained_betas so the
    sampler tasks do not depend on Task 1.1 (test_schedule checks those betas)."""
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


# ----------------------------------------------------------------------------------------------------------------
# issue 15: grids that end above t = 0, linspace ties, custom and named grids, PNDM, DPM-Solver++ (samplers.json)

def more_runs(kind):
    """pytest params over samplers.json's runs of one kind, marked with the tasks whose code they run."""
    params = []
    for name, info in MORE[kind].items():
        marks = {"ancestral": [pytest.mark.task3_2], "pndm": [pytest.mark.task3_6, pytest.mark.task3_7],
                 "dpmpp-2m": [pytest.mark.task3_8]}[info["sampler"]]
        if info["config"].get("thresholding"):
            marks = marks + [pytest.mark.task3_4]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def toy_denoiser(info, schedule):
    return lambda z, t: toy_model(z, t, schedule.alphas_cumprod, info["prediction_type"], info["learned_variance"])


def grid_args(info):
    """sample()'s grid argument: num_steps for a count, timesteps= for a named IF grid."""
    steps = info["steps"]
    return dict(timesteps=steps) if isinstance(steps, str) else dict(num_steps=steps)


@pytest.mark.parametrize("name", more_runs("ancestral"))
def test_ancestral_step_matches_reference_on_grids_ending_above_zero_and_custom_lists(name):
    """Noise whenever t > 0 (trailing grids, steps_offset 1, every variance type); IF's fast27/super27 lists."""
    info, schedule = MORE["ancestral"][name], schedule_for(MORE["ancestral"][name]["config"])
    z, noise, model_out = (MORE_TENSORS[f"{name}.{k}"] for k in ("z", "noise", "model_out"))
    for i, (t, t_prev) in enumerate(zip(info["timesteps"], info["t_prev"])):
        z_prev = ancestral_step(model_out[i], t, t_prev, z[i], schedule, noise=noise[i])
        assert_close(z_prev, z[i + 1], TOL, f"{name}: ancestral step {i} (t = {t} -> {t_prev}) z_t_prev"
                     + (" (the last step adds noise when t > 0)" if t_prev < 0 < t else ""))


@pytest.mark.parametrize("name", more_runs("ancestral"))
def test_ancestral_sample_loop_seeded_matches_reference(name):
    info, schedule = MORE["ancestral"][name], schedule_for(MORE["ancestral"][name]["config"])
    generator = torch.Generator().manual_seed(info["seed"])
    z_0 = sample(toy_denoiser(info, schedule), schedule, tuple(info["shape"]), sampler="ancestral",
                 generator=generator, **grid_args(info))
    assert_close(z_0, MORE_TENSORS[f"{name}.seeded_z_0"], TOL, f"{name}: final sample of sample(..., generator=seed)")


@pytest.mark.parametrize("name", more_runs("solvers"))
def test_multistep_solver_trajectory_matches_reference(name):
    info, schedule = MORE["solvers"][name], schedule_for(MORE["solvers"][name]["config"])
    z_ref = MORE_TENSORS[f"{name}.z"]
    z_0, trajectory = sample(toy_denoiser(info, schedule), schedule, tuple(info["shape"]), sampler=info["sampler"],
                             z_T=z_ref[0], return_trajectory=True, **grid_args(info))
    assert trajectory.shape == z_ref.shape, f"{name}: trajectory {tuple(trajectory.shape)}, expected [N + 1, ...]"
    for i in range(1, len(z_ref)):
        assert_close(trajectory[i], z_ref[i], TOL, f"{name}: {info['sampler']} state after step {i} of "
                     f"{len(z_ref) - 1} (t = {info['timesteps'][i - 1]})")


@pytest.mark.parametrize("name", [n for n, i in MORE["solvers"].items() if i["sampler"] == "dpmpp-2m"])
def test_dpm_grid_matches_reference_timesteps_and_sigmas(name):
    info = MORE["solvers"][name]
    ts, nsr = dpm_grid(schedule_for(info["config"]), info["steps"])
    assert ts.tolist() == info["timesteps"], f"{name}: DPM-Solver++ timesteps {ts.tolist()} != {info['timesteps']}"
    assert_close(nsr, torch.tensor(info["sigmas"]), 1e-6 * max(info["sigmas"]), f"{name}: sigma / alpha of the grid")


@pytest.mark.task3_5
@pytest.mark.parametrize("row", MORE["linspace_timesteps"], ids=lambda r: f"n{r['num_steps']}")
def test_linspace_timesteps_round_like_numpy_at_ties(row):
    schedule = DiscreteSchedule.from_config({"timestep_spacing": "linspace", "trained_betas": [0.01] * 1000})
    ts = timesteps(schedule, row["num_steps"]).tolist()
    wrong = [(a, b) for a, b in zip(ts, row["timesteps"]) if a != b]
    assert not wrong, (f"linspace, N = {row['num_steps']}: (got, expected) {wrong}; round numpy's linspace values "
                       "(start + i * step), not torch.linspace's")


@pytest.mark.task3_5
@pytest.mark.parametrize("T", [1000, 50])
def test_linspace_timesteps_equal_numpy_for_every_step_count(T):
    import numpy as np
    schedule = DiscreteSchedule.from_config({"num_train_timesteps": T, "timestep_spacing": "linspace",
                                             "trained_betas": [0.01] * T})
    bad = [n for n in range(1, T + 1)
           if timesteps(schedule, n).tolist() != np.linspace(0, T - 1, n).round()[::-1].astype(np.int64).tolist()]
    assert not bad, f"T = {T}: linspace timesteps differ from numpy's for N in {bad[:10]}"


def test_named_if_grids_are_diffusers_lists_and_usable_as_timesteps():
    assert IF_TIMESTEPS == MORE["if_timesteps"], "IF_TIMESTEPS must hold diffusers' deepfloyd_if/timesteps.py lists"
    schedule = DiscreteSchedule.from_config({"trained_betas": [0.01] * 1000})
    assert timesteps(schedule, "smart27").tolist() == MORE["if_timesteps"]["smart27"]
    assert timesteps(schedule, [999, 500, 3]).tolist() == [999, 500, 3], "a list is the grid itself"


@pytest.mark.parametrize("bad, message", [([500, 999], "descending"), ([1000, 5], "0..999"), ([5, -1], "0..999"),
                                          ([], "non-empty"), ([999.0, 5.0], "integer"), ("smart28", "smart27")])
def test_custom_timesteps_are_checked(bad, message):
    schedule = DiscreteSchedule.from_config({"trained_betas": [0.01] * 1000})
    with pytest.raises(ValueError, match=message):
        timesteps(schedule, bad)


@pytest.mark.task3_2
@pytest.mark.parametrize("t, t_prev", [(999, 899), (999, 500), (999, 998)])
def test_ancestral_step_is_float64_accurate_on_cosine_at_t999(t, t_prev):
    """alpha = alpha_bar_t / alpha_bar_s straight from the ratio: 1 - (1 - ratio) loses ~9% at t = 999 -> 899."""
    schedule = DiscreteSchedule.from_config({"beta_schedule": "squaredcos_cap_v2", "clip_sample": False,
                                             "prediction_type": "sample",
                                             "trained_betas": SCHEDULES["squaredcos_cap_v2.betas"].tolist()})
    g = torch.Generator().manual_seed(0)
    z, x, noise = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    ab = schedule.alphas_cumprod.double()
    alpha = ab[t] / ab[t_prev]
    mean = ab[t_prev].sqrt() * (1 - alpha) / (1 - ab[t]) * x.double() \
        + alpha.sqrt() * (1 - ab[t_prev]) / (1 - ab[t]) * z.double()
    expected = mean + ((1 - ab[t_prev]) / (1 - ab[t]) * (1 - alpha)).sqrt() * noise.double()
    assert_close(ancestral_step(x, t, t_prev, z, schedule, noise=noise), expected, 1e-6,
                 f"ancestral step {t} -> {t_prev} (cosine) vs the same formula in float64")


@pytest.mark.task3_2
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ancestral_adds_noise_whenever_t_is_above_zero(variance_type):
    schedule = DiscreteSchedule.from_config({"variance_type": variance_type, "clip_sample": False,
                                             "prediction_type": "sample",
                                             "trained_betas": SCHEDULES["linear.betas"].tolist()})
    x, z, noise = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    beta = 1 - schedule.alphas_cumprod[5]  # the step 5 -> -1: alpha_bar_s = 1
    std = {"fixed_small": 1e-10, "fixed_large": float(beta) ** 0.5}[variance_type]
    mean = ancestral_step(x, 5, -1, z, schedule, noise=torch.zeros_like(noise))
    last = ancestral_step(x, 5, -1, z, schedule, noise=noise)
    assert_close(last - mean, std * noise, 1e-7, f"{variance_type}: the last step from t = 5 > 0 adds sqrt(var) noise")
    assert torch.equal(ancestral_step(x, 0, -1, z, schedule, noise=noise),
                       ancestral_step(x, 0, -1, z, schedule, noise=torch.zeros_like(noise))), "t = 0: no noise"


@pytest.mark.task3_6
def test_pndm_transfer_is_the_ddim_step():
    schedule = DiscreteSchedule.from_config({"clip_sample": False, "trained_betas": SCHEDULES["linear.betas"].tolist()})
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    ab = schedule.alphas_cumprod
    assert_close(pndm_transfer(eps, z, ab[700], ab[350]), ddim_step(eps, 700, 350, z, schedule), 1e-5,
                 "PNDM's eq. 9 transfer must equal DDIM's eta = 0 step for the same eps")


@pytest.mark.task3_7
def test_plms_integrates_polynomials_of_its_order_exactly():
    """Adams-Bashforth with k terms averages the degree k-1 interpolant of e over the next step: for e(k) = k^d at
    k = 0, -1, -2, -3 (newest last in the history) it returns the integral of k^d over [0, 1], 1 / (d + 1)."""
    for terms in (1, 2, 3, 4):
        d = terms - 1
        history = [torch.tensor(float(k) ** d) for k in range(-terms + 1, 1)]
        assert float(plms_eps(history)) == pytest.approx(1 / (d + 1)), \
            f"{terms}-term PLMS must integrate k^{d} exactly (expected {1 / (d + 1)})"


@pytest.mark.task3_8
def test_dpmpp_first_order_is_ddim_and_last_step_returns_x_hat():
    g = torch.Generator().manual_seed(3)
    z, x_hat = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    a_t, a_s = torch.tensor(0.3), torch.tensor(0.8)
    s_t, s_s = (1 - a_t ** 2).sqrt(), (1 - a_s ** 2).sqrt()
    ddim = a_s * x_hat + s_s * (z - a_t * x_hat) / s_t  # alpha_s x_hat + sigma_s eps_hat
    assert_close(dpmpp_2m_step(x_hat, z, a_t, s_t, a_s, s_s), ddim, 1e-6,
                 "DPM-Solver++ without a previous x_hat must be DDIM (eta = 0)")
    assert_close(dpmpp_2m_step(x_hat, z, a_t, s_t, torch.tensor(1.0), torch.tensor(0.0)), x_hat, 1e-6,
                 "the step to sigma = 0 must return x_hat")
    x_prev = torch.randn(2, 3, 4, 4, generator=g)
    lam = lambda a, s: torch.log(a) - torch.log(s)  # noqa: E731
    r = (lam(a_t, s_t) - lam(torch.tensor(0.1), (1 - torch.tensor(0.01)).sqrt())) / (lam(a_s, s_s) - lam(a_t, s_t))
    D = (1 + 1 / (2 * r)) * x_hat - 1 / (2 * r) * x_prev
    two = dpmpp_2m_step(x_hat, z, a_t, s_t, a_s, s_s, x_prev, lam(torch.tensor(0.1), (1 - torch.tensor(0.01)).sqrt()))
    assert_close(two, a_s * D + s_s * (z - a_t * D) / s_t, 1e-5, "2M is the first-order step with x_hat -> D")


def test_sampler_from_config_names_the_scheduler_and_refuses_others():
    expected = {"DDPMScheduler": "ancestral", "DDIMScheduler": "ddim", "PNDMScheduler": "pndm",
                "DPMSolverMultistepScheduler": "dpmpp-2m"}
    for cls, name in expected.items():
        assert sampler_from_config({"_class_name": cls}) == name, f"{cls} should run '{name}'"
    sd = json.loads((DIFFUSION / "sd15" / "scheduler" / "scheduler_config.json").read_text())
    assert sampler_from_config(sd) == "pndm", "SD 1.5's published scheduler is PNDM"
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        sampler_from_config({"_class_name": "EulerDiscreteScheduler"})


@pytest.mark.parametrize("sampler, config, steps, field", [
    ("dpmpp-2m", {"solver_order": 3}, 8, "solver_order"),
    ("dpmpp-2m", {"algorithm_type": "sde-dpmsolver++"}, 8, "algorithm_type"),
    ("dpmpp-2m", {"use_karras_sigmas": True}, [999, 500, 0], "use_karras_sigmas"),
    ("pndm", {"prediction_type": "sample"}, 8, "prediction_type"),
    ("pndm", {}, [999, 500, 0], "step count"),
    ("pndm", {"skip_prk_steps": False}, 3, "at least 4"),
    ("heun", {}, 8, "sampler"),
])
def test_unsupported_solver_settings_are_refused_by_name(sampler, config, steps, field):
    schedule = DiscreteSchedule.from_config({**config, "trained_betas": [0.01] * 1000})
    kw = dict(num_steps=steps) if isinstance(steps, int) else dict(timesteps=steps)
    with pytest.raises(ValueError, match=field):
        sample(lambda z, t: z, schedule, (1, 1, 2, 2), sampler=sampler, **kw)


def test_sample_takes_num_steps_or_timesteps_and_a_list_equals_its_count():
    schedule = run_schedule("vpred_ddim_trailing")
    denoise = lambda z, t: toy_model(z, t, schedule.alphas_cumprod, "v_prediction")  # noqa: E731
    z_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    by_count = sample(denoise, schedule, (1, 3, 4, 4), 7, z_T=z_T)
    by_list = sample(denoise, schedule, (1, 3, 4, 4), timesteps=timesteps(schedule, 7).tolist(), z_T=z_T)
    assert torch.equal(by_count, by_list), "timesteps=timesteps(schedule, N) must give the same sample as N steps"
    with pytest.raises(ValueError, match="either num_steps"):
        sample(denoise, schedule, (1, 3, 4, 4), 7, timesteps=[999, 0], z_T=z_T)
