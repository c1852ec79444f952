"""tinybooth.optim: AdamW with fp32 / bf16 / 8-bit moments, checked against torch.optim.AdamW."""
import copy

import pytest
import torch

from tinybooth import optim


def _problem(seed=0, dtype=torch.float32):
    """Two weights of a least-squares problem and a closure that sets their gradients."""
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(37, 5, generator=g).to(dtype).requires_grad_(), torch.randn(3000, generator=g)
         .to(dtype).requires_grad_()]
    targets = [torch.randn(37, 5, generator=g), torch.randn(3000, generator=g)]

    def loss():
        return sum(((p.float() - t) ** 2).sum() for p, t in zip(w, targets))
    return w, loss


def _run(optimizer, w, loss, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    return [p.detach().float().clone() for p in w]


def test_fp32_states_equal_torch_adamw_exactly():
    w_ref, loss_ref = _problem()
    w, loss = _problem()
    ref = _run(torch.optim.AdamW(w_ref, lr=1e-2, weight_decay=0.1, foreach=False), w_ref, loss_ref, 7)
    ours = _run(optim.AdamW(w, lr=1e-2, weight_decay=0.1, states="fp32"), w, loss, 7)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b), f"fp32-state AdamW differs from torch.optim.AdamW by {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("states", ["bf16", "8bit"])
def test_low_precision_states_follow_the_fp32_trajectory(states):
    w_ref, loss_ref = _problem()
    w, loss = _problem()
    ref = _run(torch.optim.AdamW(w_ref, lr=1e-2, foreach=False), w_ref, loss_ref, 50)
    ours = _run(optim.AdamW(w, lr=1e-2, states=states, generator=torch.Generator().manual_seed(0)), w, loss, 50)
    start = _problem()[0]
    for a, b, s in zip(ours, ref, start):
        moved = (b - s.detach()).norm()
        assert (a - b).norm() < 0.05 * moved, (f"{states} moments: after 50 steps the weights are "
                                               f"{(a - b).norm():.3g} from the fp32 run, which moved {moved:.3g}")


def test_bf16_weights_are_updated_by_small_steps_on_average():
    """Weights 1.0, gradient 1 every step: AdamW moves each by lr = 1e-4 per step, a quarter of the bf16 gap below
    1 (2^-8), so round-to-nearest would never move them. Stochastic rounding moves them 20 lr on average."""
    w = torch.ones(10_000, dtype=torch.bfloat16, requires_grad=True)
    opt = optim.AdamW([w], lr=1e-4, weight_decay=0.0, states="bf16", generator=torch.Generator().manual_seed(1))
    for _ in range(20):
        opt.zero_grad()
        w.float().sum().backward()
        opt.step()
    moved = 1.0 - w.detach().float().mean().item()
    # each weight's final value has a rounding spread of ~sqrt(20) * 2^-8 / 2; the mean of 10k has ~1e-4
    assert abs(moved - 20 * 1e-4) < 4e-4, (f"bf16 weights moved {moved:.3g} on average, AdamW's steps add up to "
                                           f"{20 * 1e-4:.3g}: stochastic rounding is biased or not applied")


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = torch.tensor(1.0078125, dtype=torch.bfloat16)                       # 1 + 2^-7, the next bf16 value
    x = torch.full((200_000,), 1.0 + 0.3 * 2 ** -7)                          # 30% of the way from lo to hi
    r = optim.stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) <= {lo.item(), hi.item()}, f"rounded to {r.unique().tolist()}, not neighbours"
    assert abs(r.mean().item() - x[0].item()) < 4 * 2 ** -7 * 0.5 / 200_000 ** 0.5, (
        f"mean of the rounded values {r.mean().item():.7f} is not x = {x[0].item():.7f}: rounding is biased")
    neg = optim.stochastic_round_bf16(-x, torch.Generator().manual_seed(0)).float()
    assert torch.equal(neg, -r), "negative numbers must round like their magnitudes"


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_round_trip_error_is_bounded_by_the_code_book(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.logspace(-6, 0, 5000)  # values over six decades
    x = x if signed else x.abs()
    codes, absmax = optim.quantize_blockwise(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == (3, optim.BLOCK) and absmax.shape == (3,)
    y = optim.dequantize_blockwise(codes, absmax, x.shape, signed)
    book = optim.CODE_BOOKS[signed]
    half_gap = (book[1:] - book[:-1]).max() / 2
    blocks = torch.cat([x, x.new_zeros(-x.numel() % optim.BLOCK)]).view(-1, optim.BLOCK)
    bound = (blocks.abs().amax(1)[:, None] * half_gap).expand_as(blocks).reshape(-1)[:x.numel()]
    assert ((x - y).abs() <= bound * (1 + 1e-4)).all(), "a value came back further than half a code-book gap"


def test_8bit_keeps_small_values_beside_a_large_one():
    """A linear code book would turn 1e-4 into 0 in a block whose absmax is 1; the dynamic one keeps it."""
    x = torch.tensor([1.0, 1e-4, 3e-6])
    y = optim.dequantize_blockwise(*optim.quantize_blockwise(x, signed=False), x.shape, signed=False)
    assert ((y[1:] / x[1:] - 1).abs() < 0.5).all(), f"small values came back as {y[1:].tolist()}"


@pytest.mark.parametrize("states", ["bf16", "8bit"])
def test_resume_from_state_dict_is_exact(states):
    w, loss = _problem(dtype=torch.bfloat16 if states == "bf16" else torch.float32)
    opt = optim.AdamW(w, lr=1e-2, states=states, generator=torch.Generator().manual_seed(0))
    _run(opt, w, loss, 3)
    saved, rng, w_saved = copy.deepcopy(opt.state_dict()), opt.generator.get_state(), [p.detach().clone() for p in w]
    straight = _run(opt, w, loss, 3)
    with torch.no_grad():
        for p, s in zip(w, w_saved):
            p.copy_(s)
    resumed = optim.AdamW(w, lr=1e-2, states=states, generator=torch.Generator())
    resumed.load_state_dict(saved)
    resumed.generator.set_state(rng)
    stored = resumed.state[w[0]]["exp_avg"]
    assert (stored[0] if states == "8bit" else stored).dtype == (torch.uint8 if states == "8bit" else
                                                                 torch.bfloat16), "a reloaded moment changed dtype"
    again = _run(resumed, w, loss, 3)
    assert all(torch.equal(a, b) for a, b in zip(again, straight)), "resuming from state_dict changed the run"


def test_unknown_states_are_refused():
    with pytest.raises(ValueError, match="'fp16'"):
        optim.AdamW([torch.zeros(1, requires_grad=True)], states="fp16")
