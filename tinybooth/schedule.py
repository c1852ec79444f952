"""Noise schedules: how much signal and how much noise a diffusion model sees at each time t.

DreamBooth (Sec. 3, "Preliminaries") writes the forward process of a diffusion model as

    z_t = alpha_t * x + sigma_t * eps,        eps ~ N(0, I),   t in [0, 1]

where alpha_t decreases from ~1 to ~0 and sigma_t^2 = 1 - alpha_t^2 ("variance preserving"). The ratio
SNR(t) = alpha_t^2 / sigma_t^2 is the signal-to-noise ratio; its log, lambda_t = log SNR(t), falls monotonically.
Everything in this module is one of three views of the same numbers:

1. Continuous time (the paper's notation): t in [0, 1] -> (alpha_t, sigma_t). `cosine_alpha_sigma` is the
   cosine schedule of Nichol & Dhariwal (2021), the one DeepFloyd IF uses.
2. Discrete time (the public checkpoints): DDPM's T = 1000 steps with betas beta_1..beta_T,
   alpha_bar_t = prod_{s<=t} (1 - beta_s), and then alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t).
   `DiscreteSchedule` builds the betas from a public `scheduler_config.json` exactly as the checkpoints were
   trained (index t = 0..T-1 in code, as in the files).
3. Parameterisations: a network may predict the clean image x ("sample"), the noise eps ("epsilon"; IF and SD 1.x)
   or the velocity v = alpha_t eps - sigma_t x ("v_prediction"). Since z_t = alpha_t x + sigma_t eps and
   alpha_t^2 + sigma_t^2 = 1, each one determines the others given z_t:

       x = (z_t - sigma_t eps) / alpha_t          eps = (z_t - alpha_t x) / sigma_t
       x = alpha_t z_t - sigma_t v                eps = sigma_t z_t + alpha_t v

   So every network is an x_hat_theta(z_t, c) in the paper's sense; `predict_x_and_eps` gives both views.
"""
import json
import math
from pathlib import Path

import torch

from .errors import UserError
from .files import read_json

# diffusers' defaults for keys a scheduler_config.json may leave out (DDPMScheduler / DDIMScheduler agree on all
# shared keys; variance_type is DDPM's, set_alpha_to_one DDIM's).
DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    prediction_type="epsilon", variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
    thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
    steps_offset=0, set_alpha_to_one=True, rescale_betas_zero_snr=False,
)
CHOICES = dict(
    beta_schedule=("linear", "scaled_linear", "squaredcos_cap_v2"),
    prediction_type=("epsilon", "sample", "v_prediction"),
    variance_type=("fixed_small", "fixed_large", "learned_range"),
    timestep_spacing=("leading", "trailing", "linspace"),
)
COSINE_OFFSET = 0.008  # s in alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), keeps beta_1 from being ~0
MAX_BETA = 0.999  # "cap" of squaredcos_cap_v2: the last betas would otherwise reach 1 (alpha_bar(1) = 0)


# ----------------------------------------------------------------------------------------------------------------
# continuous time, the paper's notation

def cosine_alpha_bar(t, s=COSINE_OFFSET):
    """The cosine schedule of Nichol & Dhariwal (2021) in continuous time t in [0, 1] (float64 tensor):

        alpha_bar(t) = f(t) / f(0),   f(t) = cos^2((t + s) / (1 + s) * pi / 2)

    falling from 1 at t = 0 to 0 at t = 1. The small offset s keeps the first steps from being noise-free.
    """
    t = torch.as_tensor(t, dtype=torch.float64, device="cpu")
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return (f / f0).clamp(0.0, 1.0)


def cosine_alpha_sigma(t, s=COSINE_OFFSET):
    """(alpha_t, sigma_t) = (sqrt(alpha_bar(t)), sqrt(1 - alpha_bar(t))) of the cosine schedule, t in [0, 1].

    The discrete squaredcos_cap_v2 schedule samples it: alphas_cumprod[i] == alpha_bar((i + 1) / T) wherever the
    beta cap (0.999) has not bitten, i.e. for all but the last step.
    """
    alpha_bar = cosine_alpha_bar(t, s)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def log_snr(alpha_t, sigma_t):
    """lambda_t = log(alpha_t^2 / sigma_t^2), the log signal-to-noise ratio (decreasing in t)."""
    return 2 * (torch.log(alpha_t) - torch.log(sigma_t))


# ----------------------------------------------------------------------------------------------------------------
# conversions between the three parameterisations (all tensors broadcast; alpha_t, sigma_t as from alpha_sigma)

def x_from_eps(z_t, eps, alpha_t, sigma_t):
    """x = (z_t - sigma_t eps) / alpha_t   (invert z_t = alpha_t x + sigma_t eps for x)"""
    # BEGIN ASSIGN 1.3
    # HINT: x = (z_t - sigma_t * eps) / alpha_t
    return (z_t - sigma_t * eps) / alpha_t
    # END ASSIGN 1.3


def eps_from_x(z_t, x, alpha_t, sigma_t):
    """eps = (z_t - alpha_t x) / sigma_t   (invert z_t = alpha_t x + sigma_t eps for eps)"""
    return (z_t - alpha_t * x) / sigma_t


def v_from(x, eps, alpha_t, sigma_t):
    """v = alpha_t eps - sigma_t x, the "velocity" target (Salimans & Ho 2022; SD 2.x 768 px)."""
    return alpha_t * eps - sigma_t * x


def x_from_v(z_t, v, alpha_t, sigma_t):
    """x = alpha_t z_t - sigma_t v   (uses alpha_t^2 + sigma_t^2 = 1)"""
    # BEGIN ASSIGN 1.4
    # HINT: put z_t = alpha_t x + sigma_t eps and v = alpha_t eps - sigma_t x into alpha_t z_t - sigma_t v; use alpha_t^2 + sigma_t^2 = 1
    return alpha_t * z_t - sigma_t * v
    # END ASSIGN 1.4


def eps_from_v(z_t, v, alpha_t, sigma_t):
    """eps = sigma_t z_t + alpha_t v   (uses alpha_t^2 + sigma_t^2 = 1)"""
    # BEGIN ASSIGN 1.5
    # HINT: put z_t = alpha_t x + sigma_t eps and v = alpha_t eps - sigma_t x into sigma_t z_t + alpha_t v; use alpha_t^2 + sigma_t^2 = 1
    return sigma_t * z_t + alpha_t * v
    # END ASSIGN 1.5


def predict_x_and_eps(model_out, z_t, alpha_t, sigma_t, prediction_type):
    """(x_hat, eps_hat) from a network output of any parameterisation ("epsilon", "sample", "v_prediction").

    model_out must hold exactly the prediction (split off a learned-variance half first).
    """
    if prediction_type == "epsilon":
        return x_from_eps(z_t, model_out, alpha_t, sigma_t), model_out
    if prediction_type == "sample":
        return model_out, eps_from_x(z_t, model_out, alpha_t, sigma_t)
    if prediction_type == "v_prediction":
        return x_from_v(z_t, model_out, alpha_t, sigma_t), eps_from_v(z_t, model_out, alpha_t, sigma_t)
    raise UserError(f"prediction_type '{prediction_type}' is not supported; use one of {CHOICES['prediction_type']}")


# ----------------------------------------------------------------------------------------------------------------
# discrete time, as the public checkpoints were trained

def make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end):
    """beta_1..beta_T (a float32 tensor [T]) for the three schedules of public checkpoints:

        linear             beta_t evenly spaced from beta_start to beta_end          (DDPM, Ho et al. 2020)
        scaled_linear      sqrt(beta_t) evenly spaced from sqrt(beta_start) to sqrt(beta_end)  (SD 1.x, LDM)
        squaredcos_cap_v2  beta_i = min(1 - alpha_bar(t_{i+1}) / alpha_bar(t_i), 0.999), t_i = i / T, with the
                           cosine alpha_bar of `cosine_alpha_bar` (IF); beta_start/beta_end are unused

    The cosine betas follow from alpha_bar_i = prod_{j<=i} (1 - beta_j): each step keeps the fraction
    alpha_bar(t_{i+1}) / alpha_bar(t_i) of the signal. They are computed in float64, then rounded to float32.
    """
    T = num_train_timesteps
    # BEGIN ASSIGN 1.1
    # HINT: torch.linspace (of square roots, then squared, for scaled_linear); cosine: 1 - alpha_bar(t_{i+1}) / alpha_bar(t_i) from cosine_alpha_bar on t = arange(T + 1) / T in float64, capped at MAX_BETA; return float32
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32, device="cpu")
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32, device="cpu") ** 2
    if beta_schedule == "squaredcos_cap_v2":
        alpha_bar = cosine_alpha_bar(torch.arange(T + 1, dtype=torch.float64, device="cpu") / T)  # [T + 1]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=MAX_BETA).float()  # [T]
    # END ASSIGN 1.1
    raise UserError(f"beta_schedule '{beta_schedule}' is not supported; use one of {CHOICES['beta_schedule']}")


class DiscreteSchedule:
    """The T-step schedule of a public checkpoint, built from its scheduler_config.json.

    Attributes: config (the public dict with diffusers' defaults filled in), num_train_timesteps, prediction_type,
    betas, alphas (= 1 - betas), alphas_cumprod (= alpha_bar_t): float32 tensors [T] on the CPU.
    The betas come from beta_schedule, or verbatim from the config's trained_betas list when it has one.
    Samplers read the inference settings (variance_type, clip_sample, thresholding, ...) from `config`.
    `given` names the keys the file itself set (all of config's by default): a key it left out takes the default
    of the scheduler that runs, as in diffusers (DPM-Solver++ spaces its grid 'linspace', PNDM's alpha_bar after
    the last step is alpha_bar_0; see defaults_for).
    """

    def __init__(self, config, given=None):
        # the tensors live on the CPU even inside `with torch.device("meta")` (where networks are built); samplers
        # move the few values they need to the data's device
        self.config = config
        self.given = set(config) if given is None else set(given)
        self.num_train_timesteps = config["num_train_timesteps"]
        self.prediction_type = config["prediction_type"]
        if config["trained_betas"] is not None:  # betas listed in the file itself
            self.betas = torch.tensor(config["trained_betas"], dtype=torch.float32, device="cpu")  # [T]
        else:
            self.betas = make_betas(config["beta_schedule"], self.num_train_timesteps,
                                    config["beta_start"], config["beta_end"])  # [T]
        self.alphas = 1.0 - self.betas  # [T]
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # [T], alpha_bar_t = prod_{s<=t} (1 - beta_s)

    @classmethod
    def from_config(cls, config):
        """Validate a scheduler_config.json dict, fill in diffusers' defaults for missing keys, build the schedule.

        Keys that do not change the math of this module (e.g. _class_name, skip_prk_steps) are kept as they are;
        null values of known keys (e.g. "trained_betas": null) take the default.
        """
        given = {k for k, v in config.items() if v is not None or k not in DEFAULTS}
        config = {**DEFAULTS, **{k: config[k] for k in given}}
        if not (isinstance(config["num_train_timesteps"], int) and config["num_train_timesteps"] > 0):
            raise UserError(f"scheduler config: num_train_timesteps = {config['num_train_timesteps']!r} "
                             "must be a positive integer")
        for key, allowed in CHOICES.items():
            if config[key] not in allowed:
                raise UserError(f"scheduler config: {key} = '{config[key]}' is not supported; "
                                 f"use one of {allowed}")
        if config["trained_betas"] is not None and len(config["trained_betas"]) != config["num_train_timesteps"]:
            raise UserError(f"scheduler config: trained_betas has {len(config['trained_betas'])} values but "
                             f"num_train_timesteps = {config['num_train_timesteps']}; they must agree")
        if config["rescale_betas_zero_snr"]:
            raise UserError("scheduler config: rescale_betas_zero_snr = true is not supported; set it to false")
        return cls(config, given)

    def defaults_for(self, sampler_defaults):
        """config with the keys the file left out taken from `sampler_defaults` (a scheduler's own defaults)."""
        return {**self.config, **{k: v for k, v in sampler_defaults.items() if k not in self.given}}

    @classmethod
    def from_pretrained(cls, path):
        """Read a `scheduler/` directory (or its scheduler_config.json file) of a public pipeline."""
        path = Path(path)
        file = path / "scheduler_config.json" if path.is_dir() else path
        if not file.exists():
            raise UserError(f"no scheduler_config.json at '{path}'; pass a pipeline's scheduler/ directory "
                             "or the json file itself")
        return cls.from_config(read_json(file))

    def save_pretrained(self, path):
        """Write scheduler_config.json into the directory `path` (created if needed)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        with open(Path(path) / "scheduler_config.json", "w") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)

    def alpha_sigma(self, t, ndim=4):
        """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) for integer timesteps t.

        t: int or LongTensor [B] with values in 0..T-1. For t of shape [B] the results have shape [B, 1, ..., 1]
        (ndim dims in all, 4 for images [B, C, H, W]) so they broadcast against a batch; a scalar t gives 0-d tensors.
        float32, on t's device.
        """
        t = torch.as_tensor(t, dtype=torch.long)
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise UserError(f"timesteps must lie in 0..{self.num_train_timesteps - 1}, got {t.tolist()}")
        alpha_bar = self.alphas_cumprod.to(t.device)[t]  # [B] or []
        if alpha_bar.ndim == 1:
            alpha_bar = alpha_bar.view(-1, *[1] * (ndim - 1))  # [B, 1, 1, 1]
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def q_sample(self, x, t, noise):
        """The forward process z_t = alpha_t x + sigma_t eps (q(z_t | x) of DDPM), per sample of the batch.

        x, noise: [B, ...]; t: LongTensor [B] (or an int for the whole batch). Returns z_t shaped like x, in x's dtype.
        Training (eq. 1) and the cascade's noise augmentation of the low-res image both call this.
        """
        # BEGIN ASSIGN 1.2
        # HINT: alpha_t, sigma_t = self.alpha_sigma(t, x.ndim); return alpha_t * x + sigma_t * noise (cast alpha_t, sigma_t to x.dtype)
        alpha_t, sigma_t = self.alpha_sigma(t.to(x.device) if torch.is_tensor(t) else t, x.ndim)
        alpha_t, sigma_t = alpha_t.to(x.device, x.dtype), sigma_t.to(x.device, x.dtype)
        return alpha_t * x + sigma_t * noise
        # END ASSIGN 1.2

    def __repr__(self):
        c = self.config
        return (f"DiscreteSchedule({c['beta_schedule']}, T={self.num_train_timesteps}, "
                f"prediction_type={c['prediction_type']}, variance_type={c['variance_type']})")
