"""A fixed, deterministic stand-in for a U-Net, shared by make_diffusion_fixtures.py and tests/test_samplers.py.

It is the exact denoiser of a Gaussian data distribution x ~ N(mu, s^2 I) (mu a fixed pattern, s = 0.35), so its
predictions look like a real model's (x_hat leaves [-1, 1] often enough that clipping and dynamic thresholding act).
For z_t = alpha_t x + sigma_t eps with alpha_t^2 + sigma_t^2 = 1:

    E[x | z_t]   = mu + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t mu)
    E[eps | z_t] = sigma_t / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t mu)

A learned-variance half (IF's 6-channel output) is a fixed smooth function with values in [-1, 1].
Pure torch, no tinybooth and no reference library, so both sides compute the same numbers.
"""
import math

import torch

DATA_STD = 0.35


def data_mean(channels, height, width):
    """mu: a fixed smooth pattern with values in [-0.9, 0.9], shape [C, H, W]."""
    c = torch.arange(channels, dtype=torch.float32)[:, None, None]
    h = torch.arange(height, dtype=torch.float32)[None, :, None]
    w = torch.arange(width, dtype=torch.float32)[None, None, :]
    return 0.9 * torch.sin(0.7 * h + 1.3 * w + 2.1 * c)


def toy_model(z_t, t, alphas_cumprod, prediction_type, learned_variance=False):
    """model_out for z_t [B, C, H, W] at integer timesteps t [B]; [B, 2C, H, W] with learned_variance."""
    B, C, H, W = z_t.shape
    mu = data_mean(C, H, W)
    alpha_bar = alphas_cumprod[t].view(B, 1, 1, 1)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    residual = z_t - alpha * mu
    denom = alpha ** 2 * DATA_STD ** 2 + sigma ** 2
    x_hat = mu + alpha * DATA_STD ** 2 / denom * residual
    eps_hat = sigma / denom * residual
    if prediction_type == "epsilon":
        out = eps_hat
    elif prediction_type == "sample":
        out = x_hat
    else:  # v_prediction
        out = alpha * eps_hat - sigma * x_hat
    if learned_variance:
        phase = (t.float() / 1000.0 * math.pi).view(B, 1, 1, 1)
        out = torch.cat([out, torch.tanh(0.8 * residual) * torch.cos(phase)], dim=1)
    return out
