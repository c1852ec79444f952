"""tinybooth.training: the loop every job uses (AdamW, optimizer in backward, schedules, EMA, checkpoints, blow-ups)."""
import errno
import math

import pytest
import torch

from tinybooth import training
from tinybooth.errors import UserError
from tinybooth.training import LoopSettings, Trainer, TrainingError


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))


def _regression(model):
    """loss_fn(generator) of a small regression: random inputs, a fixed linear target."""
    def loss_fn(generator):
        x = torch.randn(16, 4, generator=generator)
        y = torch.stack([x.sum(1), x[:, 0] - x[:, 1]], 1)
        loss = (model(x) - y).square().mean()
        return loss, {"subject": loss.detach()}
    return loss_fn


def test_optimizer_in_backward_is_adamw_without_holding_the_gradients():
    model, twin = _mlp(), _mlp()
    params = dict(model.named_parameters())
    in_backward = training.OptimizerInBackward(params, lr=1e-2, weight_decay=1e-2, max_grad_norm=None)
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=1e-2)
    x = torch.randn(5, 4)
    seen = []  # how many gradients exist each time a weight is updated
    for p in params.values():
        p.register_post_accumulate_grad_hook(lambda p: seen.append(sum(q.grad is not None for q in params.values())))
    for _ in range(3):
        model(x).square().mean().backward()  # the update happens in here
        reference.zero_grad()
        twin(x).square().mean().backward()
        reference.step()
    assert all(p.grad is None for p in params.values()), "every gradient is freed once its weight is updated"
    assert len(seen) == 3 * len(params) and max(seen) == 0, "each gradient is gone right after its update"
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: not AdamW's update")
    in_backward.remove_hooks()
    before = {k: p.detach().clone() for k, p in params.items()}
    model(x).square().mean().backward()
    assert all(torch.equal(before[k], p) for k, p in params.items()), "remove_hooks: no more updates in backward"


def test_learning_rate_warms_up_then_stays_or_decays():
    s = LoopSettings(max_steps=100, lr=1.0, warmup_steps=10)
    assert [training.learning_rate(s, i) for i in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    cos = LoopSettings(max_steps=100, lr=1.0, warmup_steps=1, lr_schedule="cosine")
    assert training.learning_rate(cos, 0) == 1.0 and math.isclose(training.learning_rate(cos, 50), 0.5)


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_module_with_its_own_lr_is_stepped_as_adamw_at_that_lr(in_backward):
    """module_lr (train's --text-encoder-lr): that module's weights move as AdamW at its own lr moves them, the
    others as AdamW at lr, both through the warm-up (the loss is a sum of one term per module, so each module's
    gradients do not depend on the other)."""
    x = torch.randn(5, 4)
    modules, twins = {"unet": _mlp(2), "text_encoder": _mlp(1)}, {"unet": _mlp(2), "text_encoder": _mlp(1)}
    loss = lambda m: m["unet"](x).square().mean() + (m["text_encoder"](x) - 1).square().mean()  # noqa: E731
    s = LoopSettings(max_steps=3, lr=1e-2, module_lr=(("text_encoder", 3e-2),), warmup_steps=2, max_grad_norm=None,
                     optimizer_in_backward=in_backward)
    Trainer("base", modules, lambda g: (loss(modules), {}), s, seed=0).run()
    references = {k: torch.optim.AdamW(twins[k].parameters(), lr=lr, weight_decay=s.weight_decay)
                  for k, lr in (("unet", 1e-2), ("text_encoder", 3e-2))}
    for step in range(3):
        for k, opt in references.items():
            opt.param_groups[0]["lr"] = (3e-2 if k == "text_encoder" else 1e-2) * min(1.0, (step + 1) / 2)
            opt.zero_grad()
        loss(twins).backward()
        for opt in references.values():
            opt.step()
    for k in modules:
        for a, b in zip(modules[k].parameters(), twins[k].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{k}: not AdamW at its own lr")


def test_ema_is_the_moving_average():
    model = _mlp()
    ema = training.EMA({"m": model}, decay=0.9)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(step=1000)  # past the warm-up: d = 0.9
    torch.testing.assert_close(ema.modules["m"][0].weight, 0.9 * w0 + 0.1 * (w0 + 1))


def test_trainer_fits_and_checkpoints_resume_exactly(tmp_path):
    s = LoopSettings(max_steps=6, lr=1e-2, warmup_steps=2, checkpoint_every=2)
    full = _mlp()
    Trainer("base", {"m": full}, _regression(full), s, seed=3, checkpoint_path=tmp_path / "full.pt").run()
    first = _mlp()
    short = Trainer("base", {"m": first}, _regression(first), LoopSettings(**{**s.__dict__, "max_steps": 4}), seed=3,
                    checkpoint_path=tmp_path / "cut.pt")
    short.run()
    resumed = _mlp(seed=1)  # other initial weights: everything must come from the checkpoint
    t = Trainer("base", {"m": resumed}, _regression(resumed), s, seed=3, checkpoint_path=tmp_path / "cut.pt")
    t.load(training.load_checkpoint(tmp_path / "cut.pt"))
    t.run()
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b), "4 steps + resume to 6 must equal 6 steps, bit for bit"
    losses = [h["loss"] for h in t.history]
    assert len(losses) == 6, "the history of the run continues across the resume"


def test_exploding_loss_stops_before_its_weights_are_checkpointed(tmp_path):
    model = _mlp()
    s = LoopSettings(max_steps=10, lr=1e6, warmup_steps=1, checkpoint_every=1)
    trainer = Trainer("base", {"m": model}, _regression(model), s, seed=0, checkpoint_path=tmp_path / "c.pt")
    with pytest.raises(TrainingError, match="exploded"):
        trainer.run()
    if (tmp_path / "c.pt").exists():
        ckpt = training.load_checkpoint(tmp_path / "c.pt")
        biggest = max(v.abs().max().item() for v in ckpt["trainable"].values())
        assert biggest < 10, f"the checkpoint holds weights from before the blow-up, not {biggest:.3g}"


def test_a_full_disk_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    training.save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="no space left on device while writing"):
        training.save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], \
        "the previous checkpoint is intact and no temporary file is left"


def test_a_foreign_checkpoint_is_refused_by_name(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(UserError, match="not a tinybooth checkpoint"):
        training.load_checkpoint(bad)
