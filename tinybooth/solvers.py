"""Multistep ODE solvers: PNDM / PLMS (Liu et al. 2022) and DPM-Solver++ 2M (Lu et al. 2022).

DDIM with eta = 0 is Euler's method for the diffusion's probability-flow ODE: one network evaluation per step,
taken at the step's start. Multistep solvers reuse the evaluations of earlier steps to extrapolate the network's
output over the step, as Adams-Bashforth does for an ordinary ODE, and reach a given error with fewer steps
(lesson 03 plots the error against N). alpha_bar_t is the schedule's, t -> s one step of the grid (s < t).

PNDM keeps DDIM's update as its "transfer" phi and feeds it a better eps:
    phi(z_t, eps, t, s) = sqrt(alpha_bar_s / alpha_bar_t) z_t - (alpha_bar_s - alpha_bar_t) / d eps       (eq. 9)
                          d = alpha_bar_t sqrt(1 - alpha_bar_s) + sqrt(alpha_bar_t (1 - alpha_bar_t) alpha_bar_s)
    PLMS   eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 from this and the 3 previous evaluations          (eq. 12)
    PRK    the first 3 steps by Runge-Kutta: e_1 at (z_t, t), e_2, e_3 at the midpoint m, e_4 at s,
           eps' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6                                                       (eq. 13)
    skip_prk_steps (SD 1.x's config): the first step is Heun's, eps' = (e(z_t, t) + e(phi(z_t, e, t, s), s)) / 2,
           then PLMS with 2, 3 and then 4 terms (Adams-Bashforth of rising order).

DPM-Solver++ integrates the linear part of the ODE exactly in lambda = log(alpha_t / sigma_t) (half the log-SNR)
and extrapolates the data prediction x_hat (Lu et al. 2022, Alg. 2):
    h = lambda_s - lambda_t,   z_s = (sigma_s / sigma_t) z_t - alpha_s (e^-h - 1) D
    D = x_hat_t (first order: DDIM again)  or  (1 + 1/(2r)) x_hat_t - 1/(2r) x_hat_u,  r = (lambda_t - lambda_u) / h
with u the previous grid point ("2M"). The first step and the last one, to sigma = 0 where z_0 = x_hat, are
first order. Its grid is diffusers' DPMSolverMultistepScheduler's, in noise-to-signal ratios nsr = sigma / alpha
(Karras et al.'s sigma): 'leading' and 'linspace' grids of N + 1 points without the last; use_karras_sigmas
spaces nsr^(1/7) evenly (Karras et al. 2022, eq. 5) and evaluates the network at the nearest timesteps. As in
diffusers, keys a scheduler_config.json leaves out take the solver's own defaults (PNDM_DEFAULTS, DPM_DEFAULTS):
on SD 1.5's file, which names no timestep_spacing, DPM-Solver++ spaces 'linspace'.

Both match diffusers' PNDMScheduler / DPMSolverMultistepScheduler trajectories (tests/fixtures/diffusion).
"""
import math

import torch

from .samplers import dynamic_threshold, linspace, progress_bar, timesteps
from .schedule import eps_from_v, predict_x_and_eps
from .errors import UserError

# DPMSolverMultistepScheduler settings other than these are a different solver: refused, never replaced
DPM_SOLVER_PP_2M = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
                        lambda_min_clipped=-math.inf, use_lu_lambdas=False, use_exponential_sigmas=False,
                        use_beta_sigmas=False, use_flow_sigmas=False)
KARRAS_RHO = 7.0  # rho of Karras et al. (2022), eq. 5
# each scheduler's own defaults where they differ from schedule.DEFAULTS, for keys a scheduler_config.json left out
PNDM_DEFAULTS = dict(set_alpha_to_one=False, skip_prk_steps=False)
DPM_DEFAULTS = dict(timestep_spacing="linspace", use_karras_sigmas=False)


# ----------------------------------------------------------------------------------------------------------------
# PNDM: transfer, PLMS, PRK

def pndm_transfer(eps, z_t, alpha_bar_t, alpha_bar_s):
    """PNDM's transfer z_t -> z_s for a given eps (Liu et al. 2022, eq. 9; DDIM's eta = 0 step in other words):

        z_s = sqrt(alpha_bar_s / alpha_bar_t) z_t - (alpha_bar_s - alpha_bar_t) / d eps
        d   = alpha_bar_t sqrt(1 - alpha_bar_s) + sqrt(alpha_bar_t (1 - alpha_bar_t) alpha_bar_s)
    eps, z_t: [B, C, H, W]; alpha_bar_*: 0-d tensors (alpha_bar_s = 1 or alpha_bar_0 past the last step).
    """
    # BEGIN ASSIGN 3.6
    # HINT: denom = alpha_bar_t sqrt(1 - alpha_bar_s) + sqrt(alpha_bar_t (1 - alpha_bar_t) alpha_bar_s); z_s = sqrt(alpha_bar_s / alpha_bar_t) z_t - (alpha_bar_s - alpha_bar_t) / denom * eps
    denom = alpha_bar_t * (1 - alpha_bar_s) ** 0.5 + (alpha_bar_t * (1 - alpha_bar_t) * alpha_bar_s) ** 0.5
    return (alpha_bar_s / alpha_bar_t) ** 0.5 * z_t - (alpha_bar_s - alpha_bar_t) / denom * eps
    # END ASSIGN 3.6


def plms_eps(history):
    """Linear multistep (Adams-Bashforth) estimate of the output over a step, from the last 1..4 evaluations
    history = [..., e_2, e_1, e_0] (newest last):

        e_0,   (3 e_0 - e_1) / 2,   (23 e_0 - 16 e_1 + 5 e_2) / 12,   (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24
    """
    # BEGIN ASSIGN 3.7
    # HINT: e = history[::-1] (newest first); pick the formula by len(e): 1, 2, 3 or 4 terms
    e = history[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24
    # END ASSIGN 3.7


def sample_pndm(denoise_fn, schedule, z_T, num_steps, progress=False):
    """[z_T, z at each grid point] by PNDM: 3 Runge-Kutta steps, then PLMS; with the config's skip_prk_steps (SD
    1.x) a Heun step, then PLMS (diffusers' PNDMScheduler). The grid is timesteps(schedule, num_steps), a step
    count: the multistep formulas assume evenly spaced steps, so timestep lists are refused (diffusers has none
    either). Each network output (eps, or v for v_prediction) is combined first and turned into eps at the step's
    start (z_t, t), as diffusers does. No clipping or thresholding: PNDM has none. Runge-Kutta's midpoint is
    m = s + (t - s) // 2 (when t - s is odd diffusers moves the first half-step to t - (t - s) // 2, one step off).
    """
    cfg = schedule.defaults_for(PNDM_DEFAULTS)
    if cfg["prediction_type"] not in ("epsilon", "v_prediction"):
        raise UserError(f"scheduler config: prediction_type = '{cfg['prediction_type']}' is not supported by pndm; "
                         "it needs 'epsilon' or 'v_prediction' (use ddim or dpmpp-2m)")
    if isinstance(num_steps, (str, list, tuple, torch.Tensor)):
        raise UserError("pndm takes a step count, not a timestep list (PLMS assumes an even grid); "
                         "use ancestral, ddim or dpmpp-2m with a list")
    skip_prk = cfg["skip_prk_steps"]
    if not skip_prk and num_steps < 4:
        raise UserError(f"pndm with PRK warm-up (skip_prk_steps false) needs at least 4 steps, got {num_steps}")
    ts = timesteps(schedule, num_steps).tolist() + [-1]  # -1: past the last step
    final = torch.tensor(1.0) if cfg["set_alpha_to_one"] else schedule.alphas_cumprod[0]
    alpha_bar = lambda t: schedule.alphas_cumprod[t] if t >= 0 else final  # noqa: E731
    C = z_T.shape[1]

    def evaluate(z, t):  # the network's output (eps or v), first C channels
        with torch.no_grad():
            return denoise_fn(z, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device))[:, :C]

    def phi(out, z, t, s):  # the transfer with eps from `out`, read at the step's start (z, t)
        if cfg["prediction_type"] == "v_prediction":
            out = eps_from_v(z, out, alpha_bar(t) ** 0.5, (1 - alpha_bar(t)) ** 0.5)
        return pndm_transfer(out, z, alpha_bar(t), alpha_bar(s))

    z, trajectory, history = z_T, [z_T], []
    for i in progress_bar(range(num_steps), progress):
        t, s = ts[i], ts[i + 1]
        e = evaluate(z, t)
        if not skip_prk and i < 3:  # Runge-Kutta warm-up, 4 evaluations
            m = s + (t - s) // 2
            e2 = evaluate(phi(e, z, t, m), m)
            e3 = evaluate(phi(e2, z, t, m), m)
            e4 = evaluate(phi(e3, z, t, s), s)
            history, out = history + [e], (e + 2 * e2 + 2 * e3 + e4) / 6
        elif skip_prk and i == 0:  # Heun's step (Euler alone when it is the only step)
            history, out = [e], e if s < 0 else (e + evaluate(phi(e, z, t, s), s)) / 2
        else:
            history = (history + [e])[-4:]
            out = plms_eps(history)
        z = phi(out, z, t, s)
        trajectory.append(z)
    return trajectory


# ----------------------------------------------------------------------------------------------------------------
# DPM-Solver++ 2M: grid, step, loop

def karras_sigmas(sigma_min, sigma_max, n, rho=KARRAS_RHO):
    """n noise-to-signal ratios from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al.
    2022, eq. 5): (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, float64 [n]."""
    ramp = linspace(0, 1, n)  # [n]
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def timestep_of_sigma(nsr, log_table):
    """The fractional training step whose noise-to-signal ratio is nsr [n]: linear interpolation in log nsr
    between the two neighbouring steps of log_table [T] (ascending), clamped to 0..T-1. float64 [n]."""
    log_nsr = torch.log(nsr.clamp(min=1e-10))[:, None]  # [n, 1]
    table = log_table.double()[None, :]  # [1, T]
    low = ((table <= log_nsr).sum(dim=1) - 1).clamp(0, table.shape[1] - 2)  # [n], the step just below
    w = ((table[0, low] - log_nsr[:, 0]) / (table[0, low] - table[0, low + 1])).clamp(0, 1)
    return low + w


def dpm_grid(schedule, num_steps):
    """(timesteps LongTensor [N], nsr float32 [N + 1]) as diffusers' DPMSolverMultistepScheduler lays them out:
    the network is evaluated at timesteps[i], the solver steps through nsr_i = sigma / alpha, nsr_N = 0 (clean).

    num_steps: a count, a list of training steps or a name of IF_TIMESTEPS (see samplers.timesteps). Counts use
    N + 1 points without the last on 'leading' and 'linspace' grids, unlike DDPM's; with the config's
    use_karras_sigmas, Karras' sigmas between the schedule's smallest and largest (lists are then refused).
    """
    cfg, T = schedule.defaults_for(DPM_DEFAULTS), schedule.num_train_timesteps
    alpha_bar = schedule.alphas_cumprod
    table = ((1 - alpha_bar) / alpha_bar) ** 0.5  # [T] float32, nsr at each training step
    karras = cfg["use_karras_sigmas"]
    if isinstance(num_steps, (str, list, tuple, torch.Tensor)):  # a timestep list or an IF grid name
        if karras:
            raise UserError("scheduler config: use_karras_sigmas = true lays out its own grid and cannot take a "
                             "timestep list; set it to false or pass a step count")
        ts = timesteps(schedule, num_steps)
        return ts, torch.cat([table[ts], torch.zeros(1)])
    if not 1 <= num_steps < T:
        raise UserError(f"num_steps = {num_steps} must lie in 1..{T - 1} for dpmpp-2m")
    if karras:
        nsr = karras_sigmas(float(table[0]), float(table[-1]), num_steps)  # [N] float64
        t = timestep_of_sigma(nsr, torch.log(table))
        # diffusers rounds to the nearest step, except on the cosine schedule where the int cast truncates
        ts = (t if cfg["beta_schedule"] == "squaredcos_cap_v2" else t.round()).long()
        return ts, torch.cat([nsr.float(), torch.zeros(1)])
    if cfg["timestep_spacing"] == "linspace":
        ts = torch.round(linspace(0, T - 1, num_steps + 1)).long().flip(0)[:-1]
    elif cfg["timestep_spacing"] == "leading":
        ts = (torch.arange(num_steps + 1) * (T // (num_steps + 1))).flip(0)[:-1] + cfg["steps_offset"]
    else:
        ts = timesteps(schedule, num_steps, spacing=cfg["timestep_spacing"])
    return ts, torch.cat([table[ts], torch.zeros(1)])


def dpmpp_2m_step(x_hat, z_t, alpha_t, sigma_t, alpha_s, sigma_s, x_hat_prev=None, lambda_prev=None):
    """One DPM-Solver++ step z_t -> z_s (Lu et al. 2022, Alg. 2 "2M"), with lambda = log(alpha) - log(sigma):

        h = lambda_s - lambda_t
        D = x_hat                                            (first order, without x_hat_prev: DDIM)
          | (1 + 1/(2r)) x_hat - 1/(2r) x_hat_prev,   r = (lambda_t - lambda_prev) / h      (second order)
        z_s = (sigma_s / sigma_t) z_t - alpha_s (exp(-h) - 1) D

    x_hat, x_hat_prev (the data predictions at t and at the grid point before it), z_t: [B, C, H, W]; alpha_*,
    sigma_*, lambda_prev: 0-d tensors. sigma_s = 0 (the last step, first order) gives z_s = x_hat.
    """
    # BEGIN ASSIGN 3.8
    # HINT: lambda_t = log(alpha_t) - log(sigma_t) (same for s); h = lambda_s - lambda_t; D as in the docstring; z_s = sigma_s / sigma_t * z_t - alpha_s * (exp(-h) - 1) * D
    lambda_t, lambda_s = torch.log(alpha_t) - torch.log(sigma_t), torch.log(alpha_s) - torch.log(sigma_s)
    h = lambda_s - lambda_t
    D = x_hat
    if x_hat_prev is not None:
        r = (lambda_t - lambda_prev) / h
        D = (1 + 1 / (2 * r)) * x_hat - 1 / (2 * r) * x_hat_prev
    return (sigma_s / sigma_t) * z_t - alpha_s * (torch.exp(-h) - 1) * D
    # END ASSIGN 3.8


def check_dpm_config(config):
    """Refuse DPMSolverMultistepScheduler settings that make another solver than DPM-Solver++ 2M (naming the key)."""
    for key, supported in DPM_SOLVER_PP_2M.items():
        if config.get(key, supported) != supported:
            raise UserError(f"scheduler config: {key} = {config[key]!r} is not supported; tinybooth's dpmpp-2m is "
                             f"DPM-Solver++ 2M ({key} = {supported!r})")


def sample_dpmpp_2m(denoise_fn, schedule, z_T, num_steps, progress=False):
    """[z_T, z at each grid point] by DPM-Solver++ 2M on dpm_grid(schedule, num_steps), as diffusers'
    DPMSolverMultistepScheduler (algorithm_type dpmsolver++, solver_order 2). x_hat is dynamically thresholded
    when the config says so; clip_sample does not apply (the scheduler has none)."""
    cfg = schedule.config
    check_dpm_config(cfg)  # thresholding and prediction_type have the same defaults in every scheduler
    ts, nsr = dpm_grid(schedule, num_steps)
    alpha = 1 / (nsr ** 2 + 1) ** 0.5  # [N + 1]: alpha, sigma from sigma / alpha; the last is (1, 0)
    sigma = nsr * alpha
    lam = torch.log(alpha) - torch.log(sigma)  # [N + 1], lambda_N = inf
    z, trajectory, x_prev, C = z_T, [z_T], None, z_T.shape[1]
    for i in progress_bar(range(len(ts)), progress):
        with torch.no_grad():
            out = denoise_fn(z, torch.full((z.shape[0],), int(ts[i]), dtype=torch.long, device=z.device))[:, :C]
        x_hat, _ = predict_x_and_eps(out, z, alpha[i], sigma[i], cfg["prediction_type"])
        if cfg["thresholding"]:
            x_hat = dynamic_threshold(x_hat, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
        second = x_prev is not None and i < len(ts) - 1
        z = dpmpp_2m_step(x_hat, z, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1],
                          x_prev if second else None, lam[i - 1] if second else None)
        x_prev = x_hat
        trajectory.append(z)
    return trajectory
