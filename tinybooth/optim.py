"""AdamW with its moments kept in low precision, to fit a full fine-tune on a small GPU.

AdamW (Loshchilov & Hutter 2019, Algorithm 2) keeps two running moments per weight:

    m_t = beta1 m_{t-1} + (1 - beta1) g_t                   (first moment)
    v_t = beta2 v_{t-1} + (1 - beta2) g_t^2                 (second moment)
    theta_t = theta_{t-1} (1 - lr lambda) - lr m_hat_t / (sqrt(v_hat_t) + eps),
              m_hat_t = m_t / (1 - beta1^t),  v_hat_t = v_t / (1 - beta2^t)

In fp32 that is 8 bytes of state per weight (6.9 GB for SD-1.5's 860 M), more than the weights themselves. This
optimizer stores m and v as `states`:

  * "fp32": the update above, exactly torch.optim.AdamW's (tests/test_optim.py compares them bit for bit).
  * "bf16": m and v as bfloat16 (2 + 2 bytes). bf16 keeps 8 bits of mantissa, so a relative change below 2^-9 is
    lost by round-to-nearest: v_t = 0.999 v_{t-1} would never decay. Every store therefore uses *stochastic
    rounding*: round up with probability equal to the remainder's share of the gap, so E[round(x)] = x and small
    updates survive on average (Gupta et al. 2015).
  * "8bit": m and v as one byte each, blockwise (Dettmers et al. 2022, "8-bit optimizers via block-wise
    quantization"): each block of 2048 values is divided by its absolute maximum and each value is replaced by the
    index of the nearest entry of a 256-entry code book; the block's absmax (fp32) is stored beside the bytes
    (~2.004 bytes per weight for both moments). The code book is "dynamic": a few linear steps per decade
    from 1e-7 to 1, so the tiny second moments of a block that also holds a large one do not all round to 0
    (they would, with a linear code book, and then divide the update by eps).

Weights of any dtype are updated in fp32 arithmetic; a bf16 weight is written back with stochastic rounding, so a
full fine-tune can keep its weights in bf16 too (no fp32 master copy). Construct it like torch.optim.AdamW:

    optimizer = AdamW(model.parameters(), lr=1e-5, weight_decay=1e-2, states="8bit")
"""
import torch

BLOCK = 2048  # values per quantisation block (one absmax each)


# ----------------------------------------------------------------------------------------------------------------
# stochastic rounding to bfloat16

def stochastic_round_bf16(x, generator=None):
    """x (fp32) -> bfloat16, rounded up or down at random so that E[result] = x.

    bf16 is the upper 16 bits of an fp32 number. Adding a uniform random integer in [0, 2^16) to the bit pattern
    and cutting the lower 16 bits off carries into the kept bits with probability (lower bits) / 2^16: exactly the
    distance of x from the bf16 value below it (in magnitude), as a share of the gap.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    rounded = (bits + noise) & -65536  # -65536 = 0xFFFF0000: keep the sign, exponent and 7 mantissa bits
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the dropped bits are zero


# ----------------------------------------------------------------------------------------------------------------
# blockwise 8-bit quantisation with a dynamic code book

def dynamic_code_book(signed):
    """256 sorted values in [-1, 1] (signed, for m) or [0, 1] (unsigned, for v): 0, 1 and, for each decade
    10^-k (k = 6..0), the midpoints of an even split of [0.1, 1] * 10^-k into 2^(6-k) (signed) or 2^(7-k)
    (unsigned) steps, so larger decades get finer steps: 127 (each sign) or 254 values. (-1 itself is not in the
    signed book: a block's most negative absmax comes back as -0.993 of it.)"""
    values = [0.0, 1.0]
    for k in range(6, -1, -1):
        steps = 2 ** (6 - k) if signed else 2 ** (7 - k)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** -k).tolist()
        values += mids + ([-v for v in mids] if signed else [])
    book = torch.tensor(sorted(values), dtype=torch.float32)
    assert book.numel() == 256, f"code book has {book.numel()} entries, expected 256"
    return book


CODE_BOOKS = {True: dynamic_code_book(signed=True), False: dynamic_code_book(signed=False)}


def quantize_blockwise(x, signed, block=BLOCK):
    """x (any shape) -> (codes uint8 [n_blocks, block], absmax fp32 [n_blocks]): x / absmax of its block, replaced
    by the index of the nearest code-book value (the tail block is padded with zeros)."""
    book = CODE_BOOKS[signed].to(x.device)
    flat = x.detach().float().reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % block)])  # pad to whole blocks
    blocks = flat.view(-1, block)                                     # [n_blocks, block]
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-30)                # [n_blocks]
    normed = blocks / absmax[:, None]                                 # in [-1, 1]
    midpoints = (book[1:] + book[:-1]) / 2                            # nearest entry = bucket between midpoints
    codes = torch.bucketize(normed, midpoints).to(torch.uint8)
    return codes, absmax


def dequantize_blockwise(codes, absmax, shape, signed):
    """The inverse of quantize_blockwise: code book value * block absmax, cut back to `shape`."""
    book = CODE_BOOKS[signed].to(codes.device)
    values = book[codes.long()] * absmax[:, None]                     # [n_blocks, block]
    return values.reshape(-1)[:shape.numel()].view(shape)


# ----------------------------------------------------------------------------------------------------------------
# the optimizer

class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with the moments stored as `states` ("fp32", "bf16" or "8bit"; see the module
    docstring). bf16 weights are written back with stochastic rounding; `generator` (on the weights' device)
    makes the rounding reproducible; it is not part of state_dict: save and restore its state with the run's."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, states="fp32",
                 generator=None):
        if states not in ("fp32", "bf16", "8bit"):
            raise ValueError(f"optimizer states {states!r} are not supported; use 'fp32', 'bf16' or '8bit'")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.states, self.generator = states, generator

    # -- how a moment is stored and read back
    def _store(self, x, signed):
        if self.states == "fp32":
            return x
        if self.states == "bf16":
            return stochastic_round_bf16(x, self.generator)
        return quantize_blockwise(x, signed)

    def _load(self, stored, shape, signed):
        if self.states == "fp32":
            return stored
        if self.states == "bf16":
            return stored.float()
        return dequantize_blockwise(*stored, shape, signed)

    def _init_state(self, p):
        state = self.state[p]
        state["step"] = 0
        zeros = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg"], state["exp_avg_sq"] = self._store(zeros, True), self._store(zeros.clone(), False)
        return state

    def load_state_dict(self, state_dict):
        """As torch's, but the moments keep the dtypes they were stored in: torch would cast every floating state
        to its weight's dtype (bf16 moments to fp32, 8-bit codes to floats, a bf16 weight's absmax to bf16)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, saved in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {k: tuple(x.to(p.device) for x in v) if isinstance(v, tuple) else
                             v.to(p.device) if torch.is_tensor(v) else v for k, v in saved.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p, group):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p] if self.state[p] else self._init_state(p)
        state["step"] += 1
        t = state["step"]
        g = p.grad.float()
        theta = p if p.dtype == torch.float32 else p.float()  # fp32 weights are updated in place
        m = self._load(state["exp_avg"], p.shape, signed=True)
        v = self._load(state["exp_avg_sq"], p.shape, signed=False)
        theta.mul_(1 - lr * wd)                                # decoupled weight decay: theta (1 - lr lambda)
        m.lerp_(g, 1 - beta1)                                  # m = beta1 m + (1 - beta1) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)          # v = beta2 v + (1 - beta2) g^2
        step_size = lr / (1 - beta1 ** t)                      # lr / (1 - beta1^t): m_hat's correction
        denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)  # sqrt(v_hat) + eps
        theta.addcdiv_(m, denom, value=-step_size)             # theta - lr m_hat / (sqrt(v_hat) + eps)
        state["exp_avg"], state["exp_avg_sq"] = self._store(m, True), self._store(v, False)
        if theta is not p:
            p.copy_(stochastic_round_bf16(theta, self.generator) if p.dtype == torch.bfloat16 else theta)
