"""Samplers: turn a trained denoiser x_hat_theta(z_t, c) into images by walking t from 1 down to 0.

Sampling runs on a grid of N timesteps tau_N > ... > tau_1 of the T = 1000 training steps (`timesteps`). One step
goes from t to the next grid point s < t (s = -1 after the last one, where alpha_bar_{-1} = 1: the clean image).
With alpha_bar_t, alpha_bar_s from the schedule, the network's output gives (x_hat, eps_hat) (schedule.
predict_x_and_eps), x_hat is optionally clipped or dynamically thresholded, and then:

DDPM ancestral step (Ho et al. 2020), a draw from the posterior q(z_s | z_t, x = x_hat):
    beta = 1 - alpha_bar_t / alpha_bar_s                             (the step's beta, from alpha_bar ratios)
    mean = sqrt(alpha_bar_s) beta / (1 - alpha_bar_t) x_hat + sqrt(1 - beta) (1 - alpha_bar_s) / (1 - alpha_bar_t) z_t
    var  = (1 - alpha_bar_s) / (1 - alpha_bar_t) beta    ("fixed_small", the true posterior variance)
         | beta                                          ("fixed_large")
         | exp(frac log beta + (1 - frac) log var_small), frac = (v + 1) / 2, v in [-1, 1] the network's second
           half of channels                             ("learned_range", Nichol & Dhariwal 2021; IF's 6 channels)
    z_s  = mean + sqrt(var) noise   (no noise on the last step, s = -1)

DDIM step (Song et al. 2021), deterministic for eta = 0:
    sigma_eta^2 = eta^2 (1 - alpha_bar_s) / (1 - alpha_bar_t) (1 - alpha_bar_t / alpha_bar_s)
    z_s = sqrt(alpha_bar_s) x_hat + sqrt(1 - alpha_bar_s - sigma_eta^2) eps_hat + sigma_eta noise

Both match diffusers' DDPMScheduler / DDIMScheduler step for step (tests/fixtures/diffusion). Every function is
pure: randomness comes from `noise=` or `generator=`.
"""
import torch

from .schedule import predict_x_and_eps


def timesteps(schedule, num_steps, spacing=None):
    """The N = num_steps sampling timesteps, descending, as a LongTensor [N] (diffusers' set_timesteps).

    spacing (default: schedule.config["timestep_spacing"]), with T = num_train_timesteps:
        leading   0, k, 2k, ..., (N-1)k with k = T // N, reversed, plus config steps_offset (SD 1.x: 1)
        trailing  round(T, T - T/N, ..., T/N) - 1          (ends exactly at T - 1, the noisiest step)
        linspace  round(linspace(0, T - 1, N)), reversed
    """
    T = schedule.num_train_timesteps
    spacing = spacing or schedule.config["timestep_spacing"]
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps = {num_steps} must lie in 1..{T} (num_train_timesteps)")
    # BEGIN ASSIGN 3.5
    # HINT: leading: arange(N) * (T // N) + steps_offset, reversed; trailing: round(arange(T, 0, -T / N)) - 1; linspace: round(linspace(0, T - 1, N)), reversed (float64 before rounding)
    if spacing == "leading":
        ts = torch.arange(num_steps, dtype=torch.long) * (T // num_steps) + schedule.config["steps_offset"]
        return ts.flip(0)
    if spacing == "trailing":
        return torch.round(torch.arange(T, 0, -T / num_steps, dtype=torch.float64)).long() - 1
    if spacing == "linspace":
        return torch.round(torch.linspace(0, T - 1, num_steps, dtype=torch.float64)).long().flip(0)
    # END ASSIGN 3.5
    raise ValueError(f"timestep_spacing '{spacing}' is not supported; use 'leading', 'trailing' or 'linspace'")


def dynamic_threshold(x0, ratio, max_value):
    """Dynamic thresholding of Imagen (Saharia et al. 2022), as IF's sampler uses (ratio 0.95, max_value 1.5).

    Per sample: s = quantile_p(|x0|) over all its pixels (p = ratio), s <- clamp(s, 1, max_value); then
    x0 <- clamp(x0, -s, s) / s. With s = 1 it is plain clipping to [-1, 1]; for s > 1 it pulls saturated pixels
    inwards instead of flattening them. x0: [B, ...]; returns the same shape and dtype.
    """
    # BEGIN ASSIGN 3.4
    # HINT: per sample (x0.float().reshape(B, -1)): s = torch.quantile(|x0|, ratio, dim=1) clamped to [1, max_value]; clamp(x0, -s, s) / s
    flat = x0.float().reshape(x0.shape[0], -1)  # [B, D]; quantile needs fp32
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:, None]  # [B, 1]
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)
    # END ASSIGN 3.4


def classifier_free_guidance(out_uncond, out_cond, scale, channels=None):
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_uncond + scale (eps_cond - eps_uncond).

    scale = 1 gives eps_cond (no guidance), scale > 1 pushes away from the unconditional prediction. Only the first
    `channels` channels (the eps prediction; all if None) are guided; the rest, a learned variance, is taken from the
    conditional branch, as IF's pipeline does. out_*: [B, C_out, H, W].
    """
    channels = out_cond.shape[1] if channels is None else channels
    # BEGIN ASSIGN 3.3
    # HINT: guided = out_uncond[:, :channels] + scale * (out_cond[:, :channels] - out_uncond[:, :channels]); concatenate out_cond[:, channels:]
    guided = out_uncond[:, :channels] + scale * (out_cond[:, :channels] - out_uncond[:, :channels])
    return torch.cat([guided, out_cond[:, channels:]], dim=1)
    # END ASSIGN 3.3


def _alpha_bars(schedule, t, t_prev, final, device):
    """(alpha_bar_t, alpha_bar_s) as 0-d float32 tensors; alpha_bar_s = `final` when t_prev < 0 (past the end)."""
    alphas_cumprod = schedule.alphas_cumprod
    alpha_bar_s = alphas_cumprod[int(t_prev)] if int(t_prev) >= 0 else torch.tensor(final)
    return alphas_cumprod[int(t)].to(device), alpha_bar_s.to(device)


def _noise(noise, generator, like):
    """The given noise, or a standard normal draw shaped like `like` from `generator` on the generator's device."""
    if noise is not None:
        return noise
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _x_and_eps(model_out, z_t, alpha_bar_t, config):
    """(x_hat, eps_hat) from the first C channels of model_out, with clipping / dynamic thresholding of x_hat."""
    x_hat, eps_hat = predict_x_and_eps(model_out[:, :z_t.shape[1]], z_t, alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt(),
                                       config["prediction_type"])
    if config["thresholding"]:
        x_hat = dynamic_threshold(x_hat, config["dynamic_thresholding_ratio"], config["sample_max_value"])
    elif config["clip_sample"]:
        x_hat = x_hat.clamp(-config["clip_sample_range"], config["clip_sample_range"])
    return x_hat, eps_hat


def ddim_step(model_out, t, t_prev, z_t, schedule, eta=0.0, noise=None, generator=None):
    """One DDIM step z_t -> z_{t_prev} (Song et al. 2021, eq. 12), t_prev < t, t_prev = -1 after the last step.

        z_s = sqrt(alpha_bar_s) x_hat + sqrt(1 - alpha_bar_s - sigma_eta^2) eps_hat + sigma_eta noise
        sigma_eta = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t) (1 - alpha_bar_t / alpha_bar_s))

    eta = 0 is deterministic DDIM; eta = 1 has DDPM's posterior variance. alpha_bar_{-1} is 1 if the config's
    set_alpha_to_one, else alpha_bar_0 (SD 1.x). x_hat is clipped/thresholded per the config; eps_hat is the
    network's (not recomputed after clipping). model_out: [B, C or 2C, H, W] (a learned variance half is ignored);
    z_t: [B, C, H, W]; noise (used only when eta > 0) like z_t.
    """
    cfg = schedule.config
    final = 1.0 if cfg["set_alpha_to_one"] else float(schedule.alphas_cumprod[0])
    alpha_bar_t, alpha_bar_s = _alpha_bars(schedule, t, t_prev, final, z_t.device)
    x_hat, eps_hat = _x_and_eps(model_out, z_t, alpha_bar_t, cfg)
    # BEGIN ASSIGN 3.1
    # HINT: std = sigma_eta of the docstring; z_s = sqrt(alpha_bar_s) x_hat + sqrt(1 - alpha_bar_s - std^2) eps_hat, plus std * noise if eta > 0
    variance = (1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)
    std = eta * variance ** 0.5  # sigma_eta
    z_s = alpha_bar_s ** 0.5 * x_hat + (1 - alpha_bar_s - std ** 2) ** 0.5 * eps_hat
    if eta > 0:
        z_s = z_s + std * _noise(noise, generator, eps_hat)
    return z_s
    # END ASSIGN 3.1


def ancestral_step(model_out, t, t_prev, z_t, schedule, noise=None, generator=None):
    """One DDPM ancestral step z_t -> z_{t_prev}: a draw from q(z_s | z_t, x = x_hat) (Ho et al. 2020, eq. 6-7).

    With beta = 1 - alpha_bar_t / alpha_bar_s (alpha_bar_{-1} = 1), computed from alpha_bar ratios so that any grid
    of timesteps works:
        mean = sqrt(alpha_bar_s) beta / (1 - alpha_bar_t) x_hat
             + sqrt(1 - beta) (1 - alpha_bar_s) / (1 - alpha_bar_t) z_t
        var  = fixed_small: (1 - alpha_bar_s) / (1 - alpha_bar_t) beta (clamped to >= 1e-20); fixed_large: beta;
               learned_range: exp(frac log beta + (1 - frac) log var_small), frac = (v + 1) / 2
        z_s  = mean + sqrt(var) noise, with no noise on the last step (t_prev = -1: alpha_bar_s = 1, var_small = 0)
    (diffusers adds noise whenever t > 0, so a grid ending at t = 1 (steps_offset 1) gets sqrt(1e-20) noise there;
    the difference is below 1e-9 for the public configs.)
    The variance type, prediction type and clipping/thresholding come from schedule.config. model_out:
    [B, C, H, W], or [B, 2C, H, W] = (prediction, v) for learned_range (IF); z_t and noise: [B, C, H, W].
    """
    cfg = schedule.config
    C = z_t.shape[1]
    if cfg["variance_type"] == "learned_range" and model_out.shape[1] != 2 * C:
        raise ValueError(f"variance_type learned_range needs model_out with 2 x {C} channels (prediction + "
                         f"variance interpolation v), got {model_out.shape[1]}")
    alpha_bar_t, alpha_bar_s = _alpha_bars(schedule, t, t_prev, 1.0, z_t.device)
    x_hat, _ = _x_and_eps(model_out, z_t, alpha_bar_t, cfg)
    # BEGIN ASSIGN 3.2
    # HINT: the docstring's mean and var with beta = 1 - alpha_bar_t / alpha_bar_s; var_small clamped to >= 1e-20; return the mean alone on the last step (t_prev < 0)
    beta = 1 - alpha_bar_t / alpha_bar_s
    mean = (alpha_bar_s ** 0.5 * beta / (1 - alpha_bar_t)) * x_hat \
        + ((1 - beta) ** 0.5 * (1 - alpha_bar_s) / (1 - alpha_bar_t)) * z_t
    if int(t_prev) < 0:  # the last step: q(x | z_t, x_hat) is a point mass, no noise
        return mean
    var_small = ((1 - alpha_bar_s) / (1 - alpha_bar_t) * beta).clamp(min=1e-20)  # the true posterior variance
    if cfg["variance_type"] == "fixed_small":
        std = var_small ** 0.5
    elif cfg["variance_type"] == "fixed_large":
        std = beta ** 0.5
    else:  # learned_range: interpolate log-variances between the two fixed choices
        frac = (model_out[:, C:] + 1) / 2
        std = torch.exp(0.5 * (frac * torch.log(beta) + (1 - frac) * torch.log(var_small)))
    return mean + std * _noise(noise, generator, x_hat)
    # END ASSIGN 3.2


def sample(denoise_fn, schedule, shape, num_steps, sampler="ddim", eta=0.0, generator=None, z_T=None,
           progress=False, device=None, dtype=None, return_trajectory=False):
    """Generate: z_T ~ N(0, I), then `num_steps` sampler steps on the grid `timesteps(schedule, num_steps)`.

    denoise_fn(z_t [B, C, H, W], t LongTensor [B]) -> model_out (wrap classifier-free guidance inside it).
    sampler: "ddim" (with eta) or "ancestral". Each step goes to the next grid point (-1 after the last). Noise is
    drawn from `generator` in the same order as diffusers' pipelines (z_T first, then one draw per stochastic step),
    so a seeded run reproduces theirs. (diffusers' DDIMScheduler steps by T // N instead of to the next grid point;
    the two agree except on 'linspace' grids and 'trailing' grids with N not dividing T.)
    Returns z_0 [shape], or (z_0, trajectory [N + 1, *shape]) with return_trajectory.
    """
    if sampler not in ("ddim", "ancestral"):
        raise ValueError(f"sampler '{sampler}' is not supported; use 'ddim' or 'ancestral'")
    if z_T is None:
        gen_device = generator.device if generator is not None else device
        z_T = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        z_T = z_T.to(device) if device is not None else z_T
    ts = timesteps(schedule, num_steps).tolist()
    z, trajectory = z_T, [z_T]
    for i, t in enumerate(_progress(ts, progress)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        with torch.no_grad():
            model_out = denoise_fn(z, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device))
        if sampler == "ddim":
            z = ddim_step(model_out, t, t_prev, z, schedule, eta=eta, generator=generator)
        else:
            z = ancestral_step(model_out, t, t_prev, z, schedule, generator=generator)
        trajectory.append(z)
    return (z, torch.stack(trajectory)) if return_trajectory else z


def _progress(items, show):
    if not show:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc="sampling")
