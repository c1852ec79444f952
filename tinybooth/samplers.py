"""Samplers: turn a trained denoiser x_hat_theta(z_t, c) into images by walking t from 1 down to 0.

Sampling runs on a grid of N timesteps tau_N > ... > tau_1 of the T = 1000 training steps (`timesteps`). One step
goes from t to the next grid point s < t (s = -1 after the last one, where alpha_bar_{-1} = 1: the clean image).
With alpha_bar_t, alpha_bar_s from the schedule, the network's output gives (x_hat, eps_hat) (schedule.
predict_x_and_eps), x_hat is optionally clipped or dynamically thresholded, and then:

DDPM ancestral step (Ho et al. 2020), a draw from the posterior q(z_s | z_t, x = x_hat):
    alpha = alpha_bar_t / alpha_bar_s,  beta = 1 - alpha            (the step's alpha and beta, from alpha_bar ratios)
    mean = sqrt(alpha_bar_s) beta / (1 - alpha_bar_t) x_hat + sqrt(alpha) (1 - alpha_bar_s) / (1 - alpha_bar_t) z_t
    var  = (1 - alpha_bar_s) / (1 - alpha_bar_t) beta    ("fixed_small", the true posterior variance)
         | beta                                          ("fixed_large")
         | exp(frac log beta + (1 - frac) log var_small), frac = (v + 1) / 2, v in [-1, 1] the network's second
           half of channels                             ("learned_range", Nichol & Dhariwal 2021; IF's 6 channels)
    z_s  = mean + sqrt(var) noise   (no noise at t = 0, DDPM's Algorithm 2)

DDIM step (Song et al. 2021), deterministic for eta = 0:
    sigma_eta^2 = eta^2 (1 - alpha_bar_s) / (1 - alpha_bar_t) (1 - alpha_bar_t / alpha_bar_s)
    z_s = sqrt(alpha_bar_s) x_hat + sqrt(1 - alpha_bar_s - sigma_eta^2) eps_hat + sigma_eta noise

The multistep ODE solvers PNDM/PLMS and DPM-Solver++ (2M) live in tinybooth/solvers.py; `sample` runs all four.
All match diffusers' DDPMScheduler / DDIMScheduler / PNDMScheduler / DPMSolverMultistepScheduler step for step
(tests/fixtures/diffusion; for DDIM and PNDM whole runs agree on 'leading' grids, see `sample`). Every step
function is pure: randomness comes from `noise=` or `generator=`.
"""
import torch

from .schedule import predict_x_and_eps
from .errors import UserError


SAMPLERS = ("ancestral", "ddim", "pndm", "dpmpp-2m")
# the sampler each public scheduler class runs (scheduler_config.json's _class_name)
SCHEDULER_SAMPLERS = {"DDPMScheduler": "ancestral", "DDIMScheduler": "ddim", "PNDMScheduler": "pndm",
                      "DPMSolverMultistepScheduler": "dpmpp-2m"}


def sampler_from_config(config):
    """The sampler a scheduler_config.json names, from its _class_name: DDPMScheduler -> "ancestral",
    DDIMScheduler -> "ddim", PNDMScheduler -> "pndm" (SD 1.x), DPMSolverMultistepScheduler -> "dpmpp-2m".

    config: the json's dict (or a DiscreteSchedule's .config). Any other class is refused, never replaced.
    """
    name = config.get("_class_name")
    if name not in SCHEDULER_SAMPLERS:
        raise UserError(f"scheduler config: _class_name = {name!r} is not a scheduler tinybooth implements "
                         f"({', '.join(SCHEDULER_SAMPLERS)}); choose a sampler from {SAMPLERS} explicitly")
    return SCHEDULER_SAMPLERS[name]


def linspace(start, stop, num):
    """numpy.linspace(start, stop, num) bit for bit, as a float64 tensor: start + i (stop - start) / (num - 1).

    torch.linspace computes the second half from the end, so its values can sit on the other side of a .5 tie
    and round to another integer (T = 1000, N = 27: 500 instead of 499); the public schedulers use numpy's.
    """
    values = torch.arange(num, dtype=torch.float64, device="cpu")
    if num == 1:
        return values + start
    values = values * ((stop - start) / (num - 1)) + start  # [num]
    values[-1] = stop
    return values


def timesteps(schedule, num_steps, spacing=None):
    """The sampling timesteps tau_N > ... > tau_1, descending, as a LongTensor [N] (diffusers' set_timesteps).

    num_steps is one of
        an int N, laid out by `spacing` (default: schedule.config["timestep_spacing"]), with T = num_train_timesteps:
            leading   0, k, 2k, ..., (N-1)k with k = T // N, reversed, plus config steps_offset (SD 1.x: 1)
            trailing  round(T, T - T/N, ..., T/N) - 1          (ends exactly at T - 1, the noisiest step)
            linspace  round(linspace(0, T - 1, N)), reversed   (numpy's linspace and rounding, half to even)
        a list of training steps, strictly descending in 0..T-1 (diffusers' pipelines' `timesteps=[...]`)
        the name of one of DeepFloyd IF's tuned grids in IF_TIMESTEPS, e.g. "smart27"
    """
    T = schedule.num_train_timesteps
    if isinstance(num_steps, (str, list, tuple, torch.Tensor)):
        return custom_timesteps(num_steps, T)
    spacing = spacing or schedule.config["timestep_spacing"]
    if not 1 <= num_steps <= T:
        raise UserError(f"num_steps = {num_steps} must lie in 1..{T} (num_train_timesteps)")
    # BEGIN ASSIGN 3.5
    # HINT: leading: arange(N) * (T // N) + steps_offset, reversed; trailing: round(arange(T, 0, -T / N)) - 1; linspace: round(linspace(0, T - 1, N)) with this module's numpy-exact linspace, reversed
    if spacing == "leading":
        ts = torch.arange(num_steps, dtype=torch.long) * (T // num_steps) + schedule.config["steps_offset"]
        return ts.flip(0)
    if spacing == "trailing":
        return torch.round(torch.arange(T, 0, -T / num_steps, dtype=torch.float64)).long() - 1
    if spacing == "linspace":
        return torch.round(linspace(0, T - 1, num_steps)).long().flip(0)
    # END ASSIGN 3.5
    raise UserError(f"timestep_spacing '{spacing}' is not supported; use 'leading', 'trailing' or 'linspace'")


_timesteps = timesteps  # sample() has a `timesteps` argument that hides this function's name


def custom_timesteps(steps, num_train_timesteps):
    """A user's grid as a LongTensor [N]: a list (or 1-d tensor) of training steps or a name in IF_TIMESTEPS,
    checked to be strictly descending within 0..T-1."""
    if isinstance(steps, str):
        if steps not in IF_TIMESTEPS:
            raise UserError(f"timesteps '{steps}' is not a named grid; use a list of steps or one of "
                             f"{', '.join(IF_TIMESTEPS)}")
        steps = IF_TIMESTEPS[steps]
    ts = torch.as_tensor(steps, device="cpu")
    if ts.ndim != 1 or len(ts) == 0 or ts.is_floating_point() or ts.dtype == torch.bool:
        raise UserError(f"timesteps {steps!r} must be a non-empty list of integer training steps")
    ts = ts.long()
    if ts.min() < 0 or ts.max() >= num_train_timesteps or (ts[1:] >= ts[:-1]).any():
        raise UserError(f"timesteps must be strictly descending within 0..{num_train_timesteps - 1}, "
                         f"got {ts.tolist()}")
    return ts


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

    With alpha = alpha_bar_t / alpha_bar_s (alpha_bar_{-1} = 1) and beta = 1 - alpha, from alpha_bar ratios so
    that any grid of timesteps works:
        mean = sqrt(alpha_bar_s) beta / (1 - alpha_bar_t) x_hat
             + sqrt(alpha) (1 - alpha_bar_s) / (1 - alpha_bar_t) z_t
        var  = fixed_small: (1 - alpha_bar_s) / (1 - alpha_bar_t) beta (clamped to >= 1e-20); fixed_large: beta;
               learned_range: exp(frac log beta + (1 - frac) log var_small), frac = (v + 1) / 2
        z_s  = mean + sqrt(var) noise, with no noise only at t = 0
    sqrt(alpha) is taken from the ratio itself: 1 - (1 - ratio) loses digits when alpha_bar_t is tiny (cosine,
    t = 999). Noise is added whenever t > 0, as in DDPM's Algorithm 2 and diffusers, also on the last step of a
    grid that ends above 0 (trailing spacing, steps_offset 1): there fixed_large adds sqrt(beta) noise although
    the true posterior (var_small = 0) is a point mass; fixed_small adds sqrt(1e-20).
    The variance type, prediction type and clipping/thresholding come from schedule.config. model_out:
    [B, C, H, W], or [B, 2C, H, W] = (prediction, v) for learned_range (IF); z_t and noise: [B, C, H, W].
    """
    cfg = schedule.config
    C = z_t.shape[1]
    if cfg["variance_type"] == "learned_range" and model_out.shape[1] != 2 * C:
        raise UserError(f"variance_type learned_range needs model_out with 2 x {C} channels (prediction + "
                         f"variance interpolation v), got {model_out.shape[1]}")
    alpha_bar_t, alpha_bar_s = _alpha_bars(schedule, t, t_prev, 1.0, z_t.device)
    x_hat, _ = _x_and_eps(model_out, z_t, alpha_bar_t, cfg)
    # BEGIN ASSIGN 3.2
    # HINT: the docstring's mean and var with alpha = alpha_bar_t / alpha_bar_s, beta = 1 - alpha; var_small clamped to >= 1e-20; return the mean alone when t == 0
    alpha = alpha_bar_t / alpha_bar_s
    beta = 1 - alpha
    mean = (alpha_bar_s ** 0.5 * beta / (1 - alpha_bar_t)) * x_hat \
        + (alpha ** 0.5 * (1 - alpha_bar_s) / (1 - alpha_bar_t)) * z_t
    if int(t) == 0:  # the clean image: no noise
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


def sample(denoise_fn, schedule, shape, num_steps=None, sampler="ddim", eta=0.0, generator=None, z_T=None,
           progress=False, device=None, dtype=None, return_trajectory=False, timesteps=None):
    """Generate: z_T ~ N(0, I), then one sampler step per grid point, down to the clean sample z_0.

    denoise_fn(z_t [B, C, H, W], t LongTensor [B]) -> model_out (wrap classifier-free guidance inside it).
    The grid: `timesteps(schedule, num_steps)` for a step count, or `timesteps=` a list of training steps or a
    name of IF_TIMESTEPS ("smart27"), as diffusers' pipelines take them; give one of the two.
    sampler: "ancestral" (DDPM), "ddim" (with eta), "pndm" (PRK warm-up unless the config's skip_prk_steps, then
    PLMS) or "dpmpp-2m" (DPM-Solver++ 2M; the config's use_karras_sigmas lays out its own grid). Noise is drawn
    from `generator` in the same order as diffusers' pipelines (z_T first, then one draw per stochastic step), so
    a seeded run reproduces theirs. Each step goes to the next grid point (-1 after the last). (diffusers'
    DDIMScheduler and PNDMScheduler step by T // N instead: the two agree on 'leading' grids, SD's, and on
    'trailing' grids with N dividing T.)
    Returns z_0 [shape], or (z_0, trajectory [N + 1, *shape], the state at each grid point) with return_trajectory.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"sampler '{sampler}' is not supported; use one of {SAMPLERS}")
    if (num_steps is None) == (timesteps is None):
        raise UserError("give either num_steps (a step count) or timesteps (a list or a grid name), not both")
    steps = num_steps if timesteps is None else timesteps
    if z_T is None:
        gen_device = generator.device if generator is not None else device
        z_T = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        z_T = z_T.to(device) if device is not None else z_T
    if sampler in ("pndm", "dpmpp-2m"):
        from . import solvers  # solvers.py builds on this module
        solve = solvers.sample_pndm if sampler == "pndm" else solvers.sample_dpmpp_2m
        trajectory = solve(denoise_fn, schedule, z_T, steps, progress=progress)
    else:
        trajectory = _sample_one_step(denoise_fn, schedule, z_T, steps, sampler, eta, generator, progress)
    return (trajectory[-1], torch.stack(trajectory)) if return_trajectory else trajectory[-1]


def _sample_one_step(denoise_fn, schedule, z_T, steps, sampler, eta, generator, progress):
    """[z_T, z at each grid point]: the ancestral or DDIM loop, each step from t to the next grid point."""
    ts = _timesteps(schedule, steps).tolist()
    z, trajectory = z_T, [z_T]
    for i, t in enumerate(progress_bar(ts, progress)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        with torch.no_grad():
            model_out = denoise_fn(z, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device))
        if sampler == "ddim":
            z = ddim_step(model_out, t, t_prev, z, schedule, eta=eta, generator=generator)
        else:
            z = ancestral_step(model_out, t, t_prev, z, schedule, generator=generator)
        trajectory.append(z)
    return trajectory


def progress_bar(items, show):
    """items, wrapped in a tqdm bar when show."""
    if not show:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc="sampling")


# ----------------------------------------------------------------------------------------------------------------
# DeepFloyd IF's tuned grids (diffusers' pipelines/deepfloyd_if/timesteps.py), passed to its pipelines as
# timesteps=...: fast27, smart27, smart50, smart100, smart185 for stage I; smart27, super27, super40, super100
# for stage II (super*: dense at the noisy end, where the SR model does its work).
IF_TIMESTEPS = {
    "fast27": [
        999, 800, 799, 600, 599, 500, 400, 399, 377, 355, 333, 311, 288, 266, 244, 222, 200, 199, 177, 155, 133, 111,
        88, 66, 44, 22, 0
    ],
    "smart27": [
        999, 976, 952, 928, 905, 882, 858, 857, 810, 762, 715, 714, 572, 429, 428, 286, 285, 238, 190, 143, 142, 118,
        95, 71, 47, 24, 0
    ],
    "smart50": [
        999, 988, 977, 966, 955, 944, 933, 922, 911, 900, 899, 879, 859, 840, 820, 800, 799, 766, 733, 700, 699, 650,
        600, 599, 500, 499, 400, 399, 350, 300, 299, 266, 233, 200, 199, 179, 159, 140, 120, 100, 99, 88, 77, 66, 55,
        44, 33, 22, 11, 0
    ],
    "smart100": [
        999, 995, 992, 989, 985, 981, 978, 975, 971, 967, 964, 961, 957, 956, 951, 947, 942, 937, 933, 928, 923, 919,
        914, 913, 908, 903, 897, 892, 887, 881, 876, 871, 870, 864, 858, 852, 846, 840, 834, 828, 827, 820, 813, 806,
        799, 792, 785, 784, 777, 770, 763, 756, 749, 742, 741, 733, 724, 716, 707, 699, 698, 688, 677, 666, 656, 655,
        645, 634, 623, 613, 612, 598, 584, 570, 569, 555, 541, 527, 526, 505, 484, 483, 462, 440, 439, 396, 395, 352,
        351, 308, 307, 264, 263, 220, 219, 176, 132, 88, 44, 0
    ],
    "smart185": [
        999, 997, 995, 992, 990, 988, 986, 984, 981, 979, 977, 975, 972, 970, 968, 966, 964, 961, 959, 957, 956, 954,
        951, 949, 946, 944, 941, 939, 936, 934, 931, 929, 926, 924, 921, 919, 916, 914, 913, 910, 907, 905, 902, 899,
        896, 893, 891, 888, 885, 882, 879, 877, 874, 871, 870, 867, 864, 861, 858, 855, 852, 849, 846, 843, 840, 837,
        834, 831, 828, 827, 824, 821, 817, 814, 811, 808, 804, 801, 798, 795, 791, 788, 785, 784, 780, 777, 774, 770,
        766, 763, 760, 756, 752, 749, 746, 742, 741, 737, 733, 730, 726, 722, 718, 714, 710, 707, 703, 699, 698, 694,
        690, 685, 681, 677, 673, 669, 664, 660, 656, 655, 650, 646, 641, 636, 632, 627, 622, 618, 613, 612, 607, 602,
        596, 591, 586, 580, 575, 570, 569, 563, 557, 551, 545, 539, 533, 527, 526, 519, 512, 505, 498, 491, 484, 483,
        474, 466, 457, 449, 440, 439, 428, 418, 407, 396, 395, 381, 366, 352, 351, 330, 308, 307, 286, 264, 263, 242,
        220, 219, 176, 175, 132, 131, 88, 44, 0
    ],
    "super27": [
        999, 991, 982, 974, 966, 958, 950, 941, 933, 925, 916, 908, 900, 899, 874, 850, 825, 800, 799, 700, 600, 500,
        400, 300, 200, 100, 0
    ],
    "super40": [
        999, 992, 985, 978, 971, 964, 957, 949, 942, 935, 928, 921, 914, 907, 900, 899, 879, 859, 840, 820, 800, 799,
        766, 733, 700, 699, 650, 600, 599, 500, 499, 400, 399, 300, 299, 200, 199, 100, 99, 0
    ],
    "super100": [
        999, 996, 992, 989, 985, 982, 979, 975, 972, 968, 965, 961, 958, 955, 951, 948, 944, 941, 938, 934, 931, 927,
        924, 920, 917, 914, 910, 907, 903, 900, 899, 891, 884, 876, 869, 861, 853, 846, 838, 830, 823, 815, 808, 800,
        799, 788, 777, 766, 755, 744, 733, 722, 711, 700, 699, 688, 677, 666, 655, 644, 633, 622, 611, 600, 599, 585,
        571, 557, 542, 528, 514, 500, 499, 485, 471, 457, 442, 428, 414, 400, 399, 379, 359, 340, 320, 300, 299, 279,
        259, 240, 220, 200, 199, 166, 133, 100, 99, 66, 33, 0
    ],
}
