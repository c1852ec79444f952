"""The training losses of DreamBooth: the denoising loss, eq. (1), and the prior-preservation loss, eq. (2).

Eq. (1) of the paper trains x_hat_theta to recover the image x from its noised version z_t = alpha_t x + sigma_t eps:

    E_{x, c, eps, t} [ w_t || x_hat_theta(alpha_t x + sigma_t eps, c) - x ||^2 ]                        (1)

Public checkpoints are trained on the *eps*-MSE || eps_hat - eps ||^2 instead (IF, SD 1.x), or on a v-MSE. These are
the same loss with another w_t. From x = (z_t - sigma_t eps) / alpha_t (schedule.x_from_eps), at a fixed z_t

    x_hat - x = -(sigma_t / alpha_t) (eps_hat - eps)  =>  ||eps_hat - eps||^2 = (alpha_t^2 / sigma_t^2) ||x_hat - x||^2

so the eps-MSE is eq. (1) with w_t = alpha_t^2 / sigma_t^2 = SNR(t) (`snr_weight_for_eps_loss`). Likewise
v_hat - v = -(x_hat - x) / sigma_t (from x = alpha_t z_t - sigma_t v), so the v-MSE is eq. (1) with
w_t = 1 / sigma_t^2 = SNR(t) + 1; predicting x directly is w_t = 1.

DreamBooth fine-tunes with eq. (2): the subject's images x with the prompt c ("a [V] dog") plus images x_pr that the
frozen model generated for the class prompt c_pr ("a dog"), weighted by lambda:

    E [ w_t || x_hat(alpha_t x + sigma_t eps, c) - x ||^2
        + lambda w_t' || x_hat(alpha_t' x_pr + sigma_t' eps', c_pr) - x_pr ||^2 ]                                (2)

Here ||.||^2 is averaged over the C*H*W entries of an image (the public training scripts' mean-squared error),
which only rescales eq. (1) by a constant.
"""
import torch

from .schedule import v_from


def _loss_dtype(tensor):
    """float32, or float64 for float64 inputs: half-precision network outputs are upcast before squaring."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _reduce(per_sample, reduction):
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction '{reduction}' is not supported; use 'mean' or 'none'")


def denoising_loss(x_hat, x, w_t, reduction="mean"):
    """Eq. (1): w_t || x_hat - x ||^2 per sample (squared error averaged over its C*H*W entries).

    x_hat, x: [B, C, H, W]; w_t: [B] (or a scalar). Returns the batch mean, or [B] with reduction="none".
    """
    # BEGIN ASSIGN 2.1
    # HINT: per_sample = w_t * ((x_hat - x) ** 2).mean over every dim but the batch; then _reduce(per_sample, reduction)
    dtype = _loss_dtype(x_hat)
    squared_error = ((x_hat.to(dtype) - x.to(dtype)) ** 2).flatten(1).mean(dim=1)  # [B]
    per_sample = torch.as_tensor(w_t, dtype=dtype, device=x.device).reshape(-1) * squared_error  # [B]
    # END ASSIGN 2.1
    return _reduce(per_sample, reduction)


def snr_weight_for_eps_loss(alpha_t, sigma_t):
    """w_t = alpha_t^2 / sigma_t^2 = SNR(t): the weighting under which eq. (1) equals the eps-MSE.

    Proof: at fixed z_t, x_hat - x = -(sigma_t / alpha_t)(eps_hat - eps), hence SNR(t) ||x_hat - x||^2 equals
    ||eps_hat - eps||^2.
    """
    # BEGIN ASSIGN 2.2
    # HINT: alpha_t ** 2 / sigma_t ** 2
    return alpha_t ** 2 / sigma_t ** 2
    # END ASSIGN 2.2


def diffusion_loss(model_out, x, eps, z_t, t, schedule, reduction="mean"):
    """The loss public checkpoints train with: the MSE between the network output and its own target,

        epsilon: ||eps_hat - eps||^2     sample: ||x_hat - x||^2
        v_prediction: ||v_hat - v||^2 with v = alpha_t eps - sigma_t x

    i.e. eq. (1) with w_t = SNR(t), 1 and SNR(t) + 1 respectively (module docstring). Only the first C channels of
    model_out are used, so IF's 2C-channel output (eps + learned variance) works; like the public fine-tuning scripts,
    the variance half gets no loss. model_out: [B, C or 2C, H, W]; x, eps, z_t: [B, C, H, W] with
    z_t = schedule.q_sample(x, t, eps) the network's input (checked for shape only); t: LongTensor [B].
    Computed in float32 (float64 for float64 inputs). Returns the batch mean, or [B] with reduction="none".
    """
    C = x.shape[1]
    if model_out.shape[0] != x.shape[0] or model_out.shape[2:] != z_t.shape[2:] or model_out.shape[1] not in (C, 2 * C):
        raise ValueError(f"model_out {tuple(model_out.shape)} does not match z_t {tuple(z_t.shape)}: expected "
                         f"[B, C or 2C, H, W] with C = {C}")
    pred = model_out[:, :C]  # drop a learned-variance half
    # BEGIN ASSIGN 2.3
    # HINT: target = eps (epsilon), v_from(x, eps, alpha_t, sigma_t) (v_prediction) or x (sample); per-sample mean squared error in float32
    kind, dtype = schedule.prediction_type, _loss_dtype(pred)
    if kind == "epsilon":
        target = eps
    elif kind == "v_prediction":
        alpha_t, sigma_t = schedule.alpha_sigma(t.to(x.device), x.ndim)
        target = v_from(x, eps, alpha_t.to(x.device, dtype), sigma_t.to(x.device, dtype))
    else:  # "sample"
        target = x
    per_sample = ((pred.to(dtype) - target.to(dtype)) ** 2).flatten(1).mean(dim=1)  # [B]
    # END ASSIGN 2.3
    return _reduce(per_sample, reduction)


def prior_preservation_loss(loss_subject, loss_prior, lambda_prior=1.0):
    """Eq. (2): L = L_subject + lambda L_prior, the subject's denoising loss on (x, c) plus lambda times the loss on
    the class-prior batch (x_pr, c_pr) that the frozen model generated. The paper uses lambda = 1.

    loss_subject, loss_prior: scalars (e.g. from `diffusion_loss` on each half of a concatenated batch).
    Returns (total, {"subject": loss_subject, "prior": loss_prior}) so that a trainer can log both terms.
    """
    # BEGIN ASSIGN 2.4
    # HINT: total = loss_subject + lambda_prior * loss_prior
    total = loss_subject + lambda_prior * loss_prior
    # END ASSIGN 2.4
    return total, {"subject": loss_subject.detach(), "prior": loss_prior.detach()}
