"""tinybooth.loss: eq. (1), its equivalence with the eps-/v-MSE of public checkpoints, and eq. (2)."""
import pytest
import torch

from tinybooth.loss import denoising_loss, diffusion_loss, prior_preservation_loss, snr_weight_for_eps_loss

from test_schedule import FORWARD, assert_close, reference_schedule

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


@pytest.mark.task2_1
def test_denoising_loss_is_weighted_per_sample_squared_error():
    x = torch.zeros(3, 2, 2, 2)
    x_hat = torch.stack([torch.full((2, 2, 2), v) for v in (1.0, 2.0, 3.0)])  # squared errors 1, 4, 9
    w_t = torch.tensor([1.0, 0.5, 2.0])
    per_sample = denoising_loss(x_hat, x, w_t, reduction="none")
    assert per_sample.shape == (3,), f"reduction='none' gives one value per sample, got {tuple(per_sample.shape)}"
    assert torch.allclose(per_sample, torch.tensor([1.0, 2.0, 18.0])), \
        f"expected w_t * mean((x_hat - x)^2) = [1, 2, 18], got {per_sample.tolist()}"
    assert denoising_loss(x_hat, x, w_t).item() == pytest.approx(7.0), "the default reduction is the batch mean"
    assert torch.allclose(denoising_loss(x_hat, x, w_t.view(3, 1, 1, 1), reduction="none"), per_sample), \
        "w_t shaped [B, 1, 1, 1] (as from alpha_sigma) must work too"


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


@pytest.mark.task2_3
def test_diffusion_loss_targets_match_reference_and_ignore_variance_channels():
    schedule = reference_schedule("linear", prediction_type="v_prediction")
    x, eps, t = FORWARD["x"], FORWARD["eps"], FORWARD["t"]
    z_t, v = FORWARD["linear.z_t"], FORWARD["linear.v"]  # diffusers' add_noise / get_velocity
    delta = torch.full_like(v, 0.5)
    assert diffusion_loss(v, x, eps, z_t, t, schedule).item() == pytest.approx(0.0, abs=1e-10), \
        "the v target must be diffusers' get_velocity = alpha_t eps - sigma_t x"
    assert diffusion_loss(v + delta, x, eps, z_t, t, schedule).item() == pytest.approx(0.25, rel=1e-5), \
        "an error of 0.5 everywhere gives a mean squared error of 0.25"
    eps_schedule = reference_schedule("linear")
    six = torch.cat([eps, torch.randn_like(eps)], dim=1)  # IF: eps + learned variance
    assert diffusion_loss(six, x, eps, z_t, t, eps_schedule).item() == pytest.approx(0.0, abs=1e-12), \
        "only the first C channels (eps) enter the loss; the variance half must be ignored"
    with pytest.raises(ValueError, match="model_out"):
        diffusion_loss(eps[:, :2], x, eps, z_t, t, eps_schedule)


@pytest.mark.task2_4
def test_prior_preservation_loss_is_eq2_and_returns_both_parts():
    subject = torch.tensor(0.3, requires_grad=True)
    prior = torch.tensor(0.5, requires_grad=True)
    total, parts = prior_preservation_loss(subject, prior, lambda_prior=2.0)
    assert total.item() == pytest.approx(1.3), "eq. (2): L_subject + lambda L_prior = 0.3 + 2 * 0.5"
    assert parts["subject"].item() == pytest.approx(0.3) and parts["prior"].item() == pytest.approx(0.5)
    total.backward()
    assert (subject.grad.item(), prior.grad.item()) == pytest.approx((1.0, 2.0)), "d total / d L_prior = lambda"
    assert prior_preservation_loss(subject, prior)[0].item() == pytest.approx(0.8), "the paper's default lambda = 1"


@pytest.mark.task2_3
@pytest.mark.task2_4
def test_prior_preservation_on_a_concatenated_batch():
    """The trainer's usual layout: one U-Net call on [subject; prior], the loss split in halves."""
    schedule = reference_schedule("scaled_linear")
    x, eps, eps_hat, z_t = noisy_batch(schedule, torch.float32)
    per_sample = diffusion_loss(eps_hat, x, eps, z_t, T_BATCH, schedule, reduction="none")
    subject, prior = per_sample[:3].mean(), per_sample[3:].mean()
    total, _ = prior_preservation_loss(subject, prior, lambda_prior=1.0)
    # with lambda = 1 and equal halves, eq. (2) is twice the mean over the whole batch
    assert total.item() == pytest.approx(2 * diffusion_loss(eps_hat, x, eps, z_t, T_BATCH, schedule).item(), rel=1e-6)
