"""Instructor-only: eq. (1) and the losses of public checkpoints are the same objective (Sec. 3 of the paper).

These tests write the solutions of tasks 1.2, 1.3, 2.1 and 2.2 out (z_t, x_hat, the SNR weight), so they stay out
of the student copy; the grader runs them with the public tests of the same tasks.
"""
import sys
from pathlib import Path

import pytest
import torch

from tinybooth.loss import diffusion_loss, snr_weight_for_eps_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_schedule import FORWARD, assert_close, reference_schedule  # noqa: E402

T_BATCH = torch.tensor([3, 100, 400, 700, 900, 990])


def noisy_batch(schedule, dtype=torch.float64):
    """x, eps, t, z_t = alpha_t x + sigma_t eps, and a wrong prediction eps_hat = eps + delta."""
    g = torch.Generator().manual_seed(3)
    x, eps = FORWARD["x"].to(dtype), FORWARD["eps"].to(dtype)
    delta = 0.1 * torch.randn(x.shape, generator=g, dtype=dtype)
    alpha_t, sigma_t = schedule.alpha_sigma(T_BATCH)
    z_t = alpha_t.to(dtype) * x + sigma_t.to(dtype) * eps  # written out so that these tests do not need Task 1.2
    return x, eps, eps + delta, z_t


def eq1(x_hat, x, w_t):
    """w_t * mean((x_hat - x)^2) per sample, written out so that these tests do not need Task 2.1."""
    return w_t.flatten() * ((x_hat - x) ** 2).flatten(1).mean(1)


@pytest.mark.task2_2
@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
def test_snr_weight_makes_eq1_equal_to_eps_mse(name):
    """||eps_hat - eps||^2 = SNR(t) ||x_hat - x||^2 with x_hat = (z_t - sigma_t eps_hat) / alpha_t, per sample."""
    schedule = reference_schedule(name)
    x, eps, eps_hat, z_t = noisy_batch(schedule)
    alpha_t, sigma_t = schedule.alpha_sigma(T_BATCH)
    alpha_t, sigma_t = alpha_t.double(), sigma_t.double()
    x_hat = (z_t - sigma_t * eps_hat) / alpha_t
    w_t = snr_weight_for_eps_loss(alpha_t, sigma_t)
    alpha_bar = schedule.alphas_cumprod[T_BATCH].double()
    assert torch.allclose(w_t.flatten(), alpha_bar / (1 - alpha_bar), rtol=1e-5), \
        "w_t must be the SNR alpha_t^2 / sigma_t^2 = alpha_bar_t / (1 - alpha_bar_t)"
    weighted = eq1(x_hat, x, w_t)
    eps_mse = ((eps_hat - eps) ** 2).flatten(1).mean(1)
    assert_close(weighted, eps_mse, 1e-6 * float(eps_mse.max()), f"eq. (1) with w_t = SNR vs the eps-MSE ({name})")


@pytest.mark.task2_3
@pytest.mark.parametrize("prediction_type, weight", [("epsilon", "snr"), ("v_prediction", "snr+1"), ("sample", "1")])
def test_diffusion_loss_is_eq1_with_the_matching_weight(prediction_type, weight):
    schedule = reference_schedule("squaredcos_cap_v2", prediction_type=prediction_type)
    x, eps, eps_hat, z_t = noisy_batch(schedule)
    alpha_t, sigma_t = [a.double() for a in schedule.alpha_sigma(T_BATCH)]
    x_hat = (z_t - sigma_t * eps_hat) / alpha_t
    out = {"epsilon": eps_hat, "sample": x_hat, "v_prediction": alpha_t * eps_hat - sigma_t * x_hat}[prediction_type]
    w_t = {"snr": alpha_t ** 2 / sigma_t ** 2, "snr+1": 1 / sigma_t ** 2, "1": torch.ones_like(alpha_t)}[weight]
    loss = diffusion_loss(out, x, eps, z_t, T_BATCH, schedule, reduction="none")
    weighted = eq1(x_hat, x, w_t)
    assert_close(loss, weighted, 1e-4 * float(weighted.max()),
                 f"{prediction_type} target MSE vs eq. (1) with w_t = {weight}")
