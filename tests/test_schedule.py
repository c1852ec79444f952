"""tinybooth.schedule against diffusers' DDPMScheduler (tests/fixtures/diffusion, made by
tests/reference/make_diffusion_fixtures.py) and against the identities of the module docstring."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tinybooth.schedule import (DiscreteSchedule, cosine_alpha_sigma, eps_from_v, eps_from_x, log_snr,
                                predict_x_and_eps, v_from, x_from_eps, x_from_v)

from conftest import FIXTURES

DIFFUSION = FIXTURES / "diffusion"
META = json.loads((DIFFUSION / "meta.json").read_text())
SCHEDULES = load_file(DIFFUSION / "schedules.safetensors")
FORWARD = load_file(DIFFUSION / "forward.safetensors")


def reference_schedule(name, **overrides):
    """A DiscreteSchedule whose betas are the reference's, listed as trained_betas, so that tests of later tasks
    (loss, samplers) do not depend on Task 1.1. name: a key of meta.json's "schedules"."""
    betas = SCHEDULES[f"{name}.betas"].tolist()
    return DiscreteSchedule.from_config({**META["schedules"][name], **overrides, "trained_betas": betas})


def assert_close(actual, expected, atol, what):
    """Fail with the worst index and both values, e.g. 'alphas_cumprod[999] = ... expected ... (squaredcos_cap_v2)'."""
    err = (actual.double() - expected.double()).abs()
    if err.max() > atol:
        i = tuple(int(k) for k in torch.nonzero(err == err.max())[0])
        idx = ", ".join(map(str, i))
        raise AssertionError(f"{what}: expected {expected[i].item():.8g} at [{idx}] (reference), "
                             f"got {actual[i].item():.8g} (|error| {err.max().item():.2e} > {atol:.0e})")


@pytest.mark.task1_1
@pytest.mark.parametrize("name", list(META["schedules"]))
def test_betas_and_alphas_cumprod_match_reference(name):
    s = DiscreteSchedule.from_config(META["schedules"][name])
    T = s.num_train_timesteps
    assert s.betas.shape == (T,) and s.alphas_cumprod.shape == (T,), f"{name}: expected tensors of shape [{T}]"
    assert s.betas.dtype == torch.float32, f"{name}: betas should be float32 like the checkpoints', got {s.betas.dtype}"
    assert_close(s.betas, SCHEDULES[f"{name}.betas"], 1e-6, f"betas of the {name} schedule")
    assert_close(s.alphas_cumprod, SCHEDULES[f"{name}.alphas_cumprod"], 1e-6, f"alphas_cumprod of the {name} schedule")


@pytest.mark.task1_1
def test_squaredcos_cap_v2_caps_beta_at_0999():
    s = DiscreteSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    assert s.betas.max() <= 0.999 + 1e-7, f"betas must be capped at 0.999, got max {s.betas.max():.6f}"
    assert s.betas[-1] == pytest.approx(0.999), "the last cosine beta (alpha_bar(1) = 0) is the capped one"


@pytest.mark.task1_1
@pytest.mark.parametrize("where", ["dir", "file"])
def test_from_pretrained_reads_public_if_and_sd_configs(where):
    root = DIFFUSION / "if_stage1" / "scheduler"
    s = DiscreteSchedule.from_pretrained(root if where == "dir" else root / "scheduler_config.json")
    c = s.config
    assert (c["beta_schedule"], c["variance_type"], c["thresholding"], c["dynamic_thresholding_ratio"],
            c["sample_max_value"]) == ("squaredcos_cap_v2", "learned_range", True, 0.95, 1.5), "IF-I config misread"
    assert c["timestep_spacing"] == "leading" and c["set_alpha_to_one"] is True, "missing keys take diffusers' defaults"
    assert_close(s.alphas_cumprod, SCHEDULES["squaredcos_cap_v2.alphas_cumprod"], 1e-6, "IF-I alphas_cumprod")
    sd = DiscreteSchedule.from_pretrained(DIFFUSION / "sd15" / "scheduler")
    assert (sd.config["steps_offset"], sd.config["clip_sample"], sd.config["set_alpha_to_one"],
            sd.config["variance_type"]) == (1, False, False, "fixed_small"), "SD 1.5 config misread"
    assert_close(sd.alphas_cumprod, SCHEDULES["scaled_linear.alphas_cumprod"], 1e-6, "SD 1.5 alphas_cumprod")


def test_trained_betas_are_used_verbatim_and_save_pretrained_round_trips(tmp_path):
    betas = SCHEDULES["linear_T50.betas"]
    s = DiscreteSchedule.from_config({"num_train_timesteps": 50, "trained_betas": betas.tolist(),
                                      "prediction_type": "v_prediction"})
    assert_close(s.alphas_cumprod, SCHEDULES["linear_T50.alphas_cumprod"], 1e-6, "alphas_cumprod from trained_betas")
    s.save_pretrained(tmp_path)
    again = DiscreteSchedule.from_pretrained(tmp_path)
    assert again.config == s.config, "save_pretrained -> from_pretrained must give the same config"


@pytest.mark.parametrize("bad, field", [({"beta_schedule": "sigmoid"}, "beta_schedule"),
                                        ({"prediction_type": "x0"}, "prediction_type"),
                                        ({"variance_type": "learned"}, "variance_type"),
                                        ({"variance_type": "fixed_small_log"}, "variance_type"),
                                        ({"timestep_spacing": "karras"}, "timestep_spacing"),
                                        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
                                        ({"trained_betas": [0.1, 0.2]}, "trained_betas")])
def test_unsupported_config_values_raise_valueerror_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        DiscreteSchedule.from_config(bad)


def test_from_pretrained_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="scheduler_config.json"):
        DiscreteSchedule.from_pretrained(tmp_path)


def test_alpha_sigma_shapes_and_variance_preservation():
    s = reference_schedule("linear")
    t = torch.tensor([0, 499, 999])
    alpha_t, sigma_t = s.alpha_sigma(t)
    assert alpha_t.shape == (3, 1, 1, 1), f"for t [B] alpha_sigma broadcasts over [B, C, H, W], got {alpha_t.shape}"
    assert s.alpha_sigma(t, ndim=2)[0].shape == (3, 1) and s.alpha_sigma(7)[0].shape == ()
    assert torch.allclose(alpha_t ** 2 + sigma_t ** 2, torch.ones(())), "alpha_t^2 + sigma_t^2 must be 1"
    assert alpha_t.flatten()[1] ** 2 == pytest.approx(float(s.alphas_cumprod[499]), rel=1e-6), \
        "alpha_t must be sqrt(alpha_bar_t)"
    with pytest.raises(ValueError, match="0..999"):
        s.alpha_sigma(torch.tensor([1000]))


@pytest.mark.task1_2
@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
def test_q_sample_matches_reference_add_noise(name):
    s = reference_schedule(name)
    z_t = s.q_sample(FORWARD["x"], FORWARD["t"], FORWARD["eps"])
    assert_close(z_t, FORWARD[f"{name}.z_t"], 1e-6,
                 f"z_t = alpha_t x + sigma_t eps ({name}, t = {FORWARD['t'].tolist()})")


@pytest.mark.task1_2
def test_q_sample_keeps_dtype_and_uses_per_sample_t():
    s = reference_schedule("linear")
    x, eps = torch.ones(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    z = s.q_sample(x, torch.tensor([0, 999]), eps)
    assert z.dtype == torch.float64, "q_sample must return x's dtype"
    assert z[0, 0, 0, 0] == pytest.approx(float(s.alphas_cumprod[0]) ** 0.5, rel=1e-6), "sample 0 uses t = 0"
    assert z[1, 0, 0, 0] == pytest.approx(float(s.alphas_cumprod[999]) ** 0.5, rel=1e-5), "sample 1 uses t = 999"


@pytest.mark.task1_3
def test_x_eps_conversions_invert_the_forward_process():
    x, eps = FORWARD["x"].double(), FORWARD["eps"].double()
    alpha_t, sigma_t = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    z_t = alpha_t * x + sigma_t * eps
    assert_close(x_from_eps(z_t, eps, alpha_t, sigma_t), x, 1e-12, "x = (z_t - sigma_t eps) / alpha_t")
    assert_close(eps_from_x(z_t, x, alpha_t, sigma_t), eps, 1e-12, "eps = (z_t - alpha_t x) / sigma_t")


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
def test_v_matches_reference_get_velocity(name):
    s = reference_schedule(name)
    alpha_t, sigma_t = s.alpha_sigma(FORWARD["t"])
    assert_close(v_from(FORWARD["x"], FORWARD["eps"], alpha_t, sigma_t), FORWARD[f"{name}.v"], 1e-6,
                 f"v = alpha_t eps - sigma_t x ({name})")


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("func, expected", [
    pytest.param(x_from_v, "x", marks=pytest.mark.task1_4, id="x_from_v"),
    pytest.param(eps_from_v, "eps", marks=pytest.mark.task1_5, id="eps_from_v")])
def test_v_conversions_invert_reference_velocity(name, func, expected):
    s = reference_schedule(name)
    alpha_t, sigma_t = s.alpha_sigma(FORWARD["t"])
    z_t, v = FORWARD[f"{name}.z_t"], FORWARD[f"{name}.v"]  # diffusers' add_noise and get_velocity
    formula = {"x": "x = alpha_t z_t - sigma_t v", "eps": "eps = sigma_t z_t + alpha_t v"}[expected]
    assert_close(func(z_t, v, alpha_t, sigma_t), FORWARD[expected], 1e-5, f"{formula} ({name})")


@pytest.mark.parametrize("prediction_type", [pytest.param("epsilon", marks=pytest.mark.task1_3), "sample",
                                             pytest.param("v_prediction", marks=[pytest.mark.task1_4,
                                                                                 pytest.mark.task1_5])])
def test_predict_x_and_eps_agrees_for_every_parameterisation(prediction_type):
    x, eps = FORWARD["x"].double(), FORWARD["eps"].double()
    alpha_t, sigma_t = torch.tensor(0.3, dtype=torch.float64), (1 - torch.tensor(0.09, dtype=torch.float64)).sqrt()
    z_t = alpha_t * x + sigma_t * eps
    out = {"epsilon": eps, "sample": x, "v_prediction": alpha_t * eps - sigma_t * x}[prediction_type]
    x_hat, eps_hat = predict_x_and_eps(out, z_t, alpha_t, sigma_t, prediction_type)
    assert_close(x_hat, x, 1e-10, f"x_hat from a {prediction_type} output")
    assert_close(eps_hat, eps, 1e-10, f"eps_hat from a {prediction_type} output")


def test_cosine_continuous_time_matches_discrete_squaredcos_schedule():
    T = 1000
    t = (torch.arange(T - 1) + 1) / T  # alphas_cumprod[i] = alpha_bar((i + 1) / T) until the cap bites at i = T - 1
    alpha_t, sigma_t = cosine_alpha_sigma(t)
    assert_close(alpha_t ** 2, SCHEDULES["squaredcos_cap_v2.alphas_cumprod"][:-1], 1e-6,
                 "alpha_t^2 of the continuous cosine schedule at t = (i + 1) / T vs discrete alphas_cumprod[i]")
    a0, s0 = cosine_alpha_sigma(torch.tensor(0.0))
    assert (float(a0), float(s0)) == pytest.approx((1.0, 0.0), abs=1e-7), "t = 0 must be the clean image"
    a_half, _ = cosine_alpha_sigma(torch.tensor(0.5))
    expected = math.cos((0.5 + 0.008) / 1.008 * math.pi / 2) / math.cos(0.008 / 1.008 * math.pi / 2)
    assert float(a_half) == pytest.approx(expected, rel=1e-9), f"alpha_0.5 should be {expected:.6f}"


def test_log_snr_is_log_of_alpha2_over_sigma2_and_decreasing():
    s = reference_schedule("scaled_linear")
    alpha_t, sigma_t = s.alpha_sigma(torch.arange(1000), ndim=1)
    lam = log_snr(alpha_t, sigma_t)
    assert torch.allclose(lam.exp(), alpha_t ** 2 / sigma_t ** 2, rtol=1e-4), "log_snr = log(alpha_t^2 / sigma_t^2)"
    assert (lam[1:] < lam[:-1]).all(), "log-SNR must fall monotonically with t"


@pytest.mark.task1_1
def test_schedule_tensors_stay_on_cpu_when_built_under_the_meta_device():
    """Networks are built under `with torch.device("meta")`; a schedule built there must still hold real numbers."""
    with torch.device("meta"):
        s = DiscreteSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    assert s.alphas_cumprod.device.type == "cpu", f"alphas_cumprod landed on {s.alphas_cumprod.device}"
    assert_close(s.alphas_cumprod, SCHEDULES["squaredcos_cap_v2.alphas_cumprod"], 1e-6, "alphas_cumprod under meta")


def test_keys_the_file_left_out_take_the_running_schedulers_defaults():
    """As diffusers' Scheduler.from_config(pipe.scheduler.config): SD 1.5's file sets no timestep_spacing, so
    DPM-Solver++ spaces 'linspace' (its default) while DDPM/DDIM/PNDM space 'leading'."""
    sd = DiscreteSchedule.from_pretrained(DIFFUSION / "sd15" / "scheduler")
    assert "timestep_spacing" not in sd.given and sd.config["timestep_spacing"] == "leading"
    assert sd.defaults_for({"timestep_spacing": "linspace"})["timestep_spacing"] == "linspace"
    assert sd.defaults_for({"set_alpha_to_one": True})["set_alpha_to_one"] is False, "a key the file sets stays"
