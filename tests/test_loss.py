"""tinybooth.loss: eq. (1), its equivalence with the eps-/v-MSE of public checkpoints, and eq. (2)."""
import pytest
import torch

from tinybooth.loss import denoising_loss, diffusion_loss, prior_preservation_loss, snr_weight_for_eps_loss

from test_schedule import FORWARD, reference_schedule

# x, eps, t and diffusers' z_t = add_noise(x, eps, t) and v = get_velocity(x, eps, t), stored by tests/reference
X, EPS, T, Z_T = FORWARD["x"], FORWARD["eps"], FORWARD["t"], FORWARD["linear.z_t"]
# (the identities that tie eq. (1) to these losses write the solutions out: tests/instructor/test_loss_identities.py)


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
def test_snr_weight_values():
    alpha_t, sigma_t = torch.tensor([0.6, 0.8, 1.0]), torch.tensor([0.8, 0.6, 1e-3])
    w_t = snr_weight_for_eps_loss(alpha_t, sigma_t)
    assert torch.allclose(w_t, torch.tensor([0.5625, 16 / 9, 1e6]), rtol=1e-4), \
        f"for (alpha_t, sigma_t) = (0.6, 0.8), (0.8, 0.6), (1, 1e-3) expected w_t = 0.5625, 1.778, 1e6, " \
        f"got {w_t.tolist()}"
    assert snr_weight_for_eps_loss(alpha_t.view(3, 1, 1, 1), sigma_t.view(3, 1, 1, 1)).shape == (3, 1, 1, 1), \
        "w_t keeps the [B, 1, 1, 1] shape of alpha_sigma"


@pytest.mark.task2_3
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_diffusion_loss_target_per_prediction_type(prediction_type):
    schedule = reference_schedule("linear", prediction_type=prediction_type)
    target = {"epsilon": EPS, "sample": X}[prediction_type]
    assert diffusion_loss(target, X, EPS, Z_T, T, schedule).item() == pytest.approx(0.0, abs=1e-12), \
        f"a perfect {prediction_type} prediction must give zero loss: the target of {prediction_type} is wrong"
    per_sample = diffusion_loss(target + 0.5, X, EPS, Z_T, T, schedule, reduction="none")
    assert per_sample.shape == (6,) and torch.allclose(per_sample, torch.full((6,), 0.25)), \
        f"an error of 0.5 everywhere gives 0.25 per sample (reduction='none' -> [B]); got {per_sample.tolist()}"


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
    schedule = reference_schedule("linear")
    eps_hat = EPS + 0.1 * torch.randn(EPS.shape, generator=torch.Generator().manual_seed(3))
    per_sample = diffusion_loss(eps_hat, X, EPS, Z_T, T, schedule, reduction="none")
    subject, prior = per_sample[:3].mean(), per_sample[3:].mean()
    total, _ = prior_preservation_loss(subject, prior, lambda_prior=1.0)
    # with lambda = 1 and equal halves, eq. (2) is twice the mean over the whole batch
    assert total.item() == pytest.approx(2 * diffusion_loss(eps_hat, X, EPS, Z_T, T, schedule).item(), rel=1e-6)
