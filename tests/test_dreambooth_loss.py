"""Task 8.3, the per-sample denoising losses of a DreamBooth step: the mistakes eq. (2)'s other tests let through.

A stand-in U-Net records what it is given, so each test reads the step t, the noisy input z_t and the SR
conditioning the loss fed it, and recomputes the loss from them.
"""
import pytest
import torch

from tinybooth.loss import diffusion_loss
from tinybooth.schedule import DiscreteSchedule
from tinybooth.dreambooth import dreambooth_loss, denoising_losses

# a schedule listed in full (trained_betas), so these tests do not need Task 1.1's beta schedules
SCHEDULE = {"trained_betas": torch.linspace(1e-4, 0.02, 1000).tolist(), "prediction_type": "epsilon"}


class RecordingUNet(torch.nn.Module):
    """Returns half its first three input channels; remembers its inputs. `dtype` is its weights' dtype."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, z, t, c, noise_level=None):
        self.z, self.t, self.c, self.noise_level = z, t, c, noise_level
        return 0.5 * z[:, :3]


def recovered_eps(schedule, z_t, x, t):
    """eps from what the U-Net saw: z_t = alpha_t x + sigma_t eps."""
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    return (z_t.float() - alpha_t * x) / sigma_t


@pytest.mark.task8_3
def test_each_sample_gets_its_own_step_t():
    schedule = DiscreteSchedule.from_config(SCHEDULE)
    x, x_pr = torch.rand(4, 3, 4, 4) * 2 - 1, torch.rand(4, 3, 4, 4) * 2 - 1
    c, c_pr = torch.randn(4, 5, 16), torch.randn(4, 5, 16)
    unet = RecordingUNet()
    dreambooth_loss(unet, schedule, x, c, x_pr, c_pr, 1.0, torch.Generator().manual_seed(0))
    t = torch.as_tensor(unet.t)
    assert t.shape == (8,), (f"the U-Net must get one step per sample of [subject; prior], t of shape [8]; got "
                             f"{tuple(t.shape)}")
    assert len(set(t.tolist())) > 1, (f"all 8 samples got the same step t = {t[0].item()}: draw t ~ U{{0..T-1}} "
                                      "once per sample, so each step trains the model at many noise levels")
    assert t.min() >= 0 and t.max() < schedule.num_train_timesteps, f"t must lie in 0..T-1, got {t.tolist()}"
    eps = recovered_eps(schedule, unet.z, torch.cat([x, x_pr]), t)
    assert abs(eps.std().item() - 1) < 0.2, (f"z_t must be alpha_t x + sigma_t eps with each sample's own t and "
                                             f"eps ~ N(0, I); the recovered eps has std {eps.std().item():.2f}")


@pytest.mark.task8_3
def test_super_resolution_feeds_z_t_joined_with_the_conditioning():
    schedule = DiscreteSchedule.from_config(SCHEDULE)
    x, x_cond = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    level = torch.tensor([250, 250])
    unet = RecordingUNet()
    per_sample = denoising_losses(unet, schedule, x, torch.randn(2, 5, 16), torch.Generator().manual_seed(0),
                                  x_cond=x_cond, noise_level=level)
    assert unet.z.shape == (2, 6, 8, 8), (f"the SR U-Net's input is [z_t ; x_cond] joined along channels, "
                                          f"[B, 6, H, W]; it got {tuple(unet.z.shape)}")
    assert torch.equal(unet.z[:, 3:], x_cond), "channels 3-5 of the U-Net's input must be x_cond, unchanged"
    assert unet.noise_level is not None and torch.equal(torch.as_tensor(unet.noise_level), level), \
        "the conditioning's augmentation level must reach the U-Net (noise_level)"
    z_t = unet.z[:, :3]
    eps = recovered_eps(schedule, z_t, x, unet.t)
    expected = diffusion_loss(0.5 * z_t, x, eps, z_t, unet.t, schedule, reduction="none")
    assert per_sample.shape == (2,) and torch.allclose(per_sample, expected, atol=1e-5), \
        f"one loss per sample, the model's output against z_t's noise: expected {expected}, got {per_sample}"


@pytest.mark.task8_3
def test_input_is_cast_to_the_unet_dtype():
    """A LoRA run keeps the frozen U-Net in bf16 while the batch is fp32: the loss casts z_t and c to it."""
    schedule = DiscreteSchedule.from_config(SCHEDULE)
    unet = RecordingUNet(torch.bfloat16)
    dreambooth_loss(unet, schedule, torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 16), None, None, 1.0,
                    torch.Generator().manual_seed(0))
    assert unet.z.dtype == torch.bfloat16 and unet.c.dtype == torch.bfloat16, \
        f"the U-Net's weights are bfloat16 but it got z_t as {unet.z.dtype} and c as {unet.c.dtype}"
