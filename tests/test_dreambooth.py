"""tinybooth.dreambooth, the method of Sec. 4: eq. (2), the SR stage's conditioning, the identifier."""
from pathlib import Path

import pytest
import torch

from tinybooth import cascade, data, dreambooth
from tinybooth.loss import diffusion_loss
from tinybooth.schedule import DiscreteSchedule

TOY = Path(__file__).resolve().parent.parent / "tinybooth" / "assets"
IF_SCHEDULER = dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000,
                    prediction_type="epsilon", variance_type="learned_range", thresholding=True,
                    dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True)
NOISING_SCHEDULER = dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000,
                         variance_type="fixed_small", clip_sample=True)
# eq. (2) tests use a schedule listed in full (trained_betas), so they do not need Task 1.1's beta schedules
LISTED_SCHEDULE = dict(IF_SCHEDULER, trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist())


# ----------------------------------------------------------------------------------------------------------------
# eq. (2) and the SR conditioning

class _Recorder(torch.nn.Module):
    """A stand-in U-Net: returns a fixed function of its input and remembers what it was given."""

    def forward(self, z, t, c, noise_level=None):
        self.z, self.t, self.c, self.noise_level = z, t, c, noise_level
        return torch.cat([0.5 * z[:, :3], torch.zeros_like(z[:, :3])], 1)


@pytest.mark.task8_3
def test_dreambooth_loss_is_subject_plus_lambda_prior():
    schedule = DiscreteSchedule.from_config(LISTED_SCHEDULE)
    g = torch.Generator().manual_seed(0)
    x, x_pr = torch.rand(2, 3, 4, 4) * 2 - 1, torch.rand(3, 3, 4, 4) * 2 - 1
    c, c_pr = torch.randn(2, 5, 16), torch.randn(3, 5, 16)
    unet = _Recorder()
    total, parts = dreambooth.dreambooth_loss(unet, schedule, x, c, x_pr, c_pr, 0.7, g)
    assert unet.z.shape[0] == 5 and torch.equal(unet.c, torch.cat([c, c_pr])), \
        "the subject batch and the prior batch must go through the U-Net together, subject first"
    # recompute each sample's eps-MSE from what the U-Net saw: z_t = alpha_t x + sigma_t eps -> eps
    alpha, sigma = schedule.alpha_sigma(unet.t)
    x_all = torch.cat([x, x_pr])
    eps = (unet.z - alpha * x_all) / sigma
    per = diffusion_loss(unet(unet.z, unet.t, unet.c), x_all, eps, unet.z, unet.t, schedule, reduction="none")
    assert torch.allclose(parts["subject"], per[:2].mean(), atol=1e-5), "subject term = mean loss of the first B"
    assert torch.allclose(parts["prior"], per[2:].mean(), atol=1e-5), "prior term = mean loss of the prior batch"
    assert torch.allclose(total, per[:2].mean() + 0.7 * per[2:].mean(), atol=1e-5), \
        "eq. (2): total = subject + lambda * prior with lambda = 0.7"


@pytest.mark.task8_3
def test_dreambooth_loss_without_prior_is_the_subject_loss():
    schedule = DiscreteSchedule.from_config(LISTED_SCHEDULE)
    total, parts = dreambooth.dreambooth_loss(_Recorder(), schedule, torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 16),
                                              None, None, 1.0, torch.Generator().manual_seed(0))
    assert set(parts) == {"subject"} and torch.equal(total.detach(), parts["subject"])


def test_sr_conditioning_is_the_upsampled_photo_noised_at_the_level():
    noising = DiscreteSchedule.from_config(NOISING_SCHEDULER)
    x_high = torch.rand(2, 3, 16, 16) * 2 - 1
    x_up = cascade.upsample(data.resize_images(x_high, 8), 16)
    clean, level = dreambooth.sr_conditioning(x_high, 8, cascade.level_from_continuous(1e-5), noising,
                                              torch.Generator().manual_seed(0))
    assert level.tolist() == [0, 0] and torch.equal(clean, x_up), \
        "the paper's 1e-5 is IF step 0: the SR model sees the clean upsampled low-res photo"
    noisy, level = dreambooth.sr_conditioning(x_high, 8, 250, noising, torch.Generator().manual_seed(0))
    alpha, sigma = noising.alpha_sigma(250)
    resid = (noisy - alpha * x_up) / sigma
    assert level.tolist() == [250, 250] and abs(resid.std() - 1) < 0.15, \
        "at level 250 the input is alpha x_up + sigma eps with unit-variance eps"


def test_rare_identifier_stays_one_token_and_survives_if_lower_casing():
    from tinybooth import rare_tokens
    from tinybooth.text import T5Tokenizer
    tok = T5Tokenizer.from_pretrained(TOY / "toy-IF-I" / "tokenizer")
    identifier = dreambooth.choose_identifier(tok, seed=0, lower_case=True)
    assert identifier == identifier.lower() and rare_tokens.count_tokens(tok, identifier) == 1, \
        f"[V] = {identifier!r} must be one token and lower case (IF's pipeline lower-cases prompts)"
    assert identifier in rare_tokens.rare_token_candidates(tok, seed=0), "[V] comes from the paper's search"


