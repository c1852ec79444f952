"""tinybooth.memory: parameter counts from config alone, the fake-tensor step against a real one, the optimizer's
bytes against a real optimizer, the ladder of savings, sizes."""
import json

import pytest
import torch

from tinybooth import memory, memory_trace, optim
from tinybooth.memory import GB, GiB

TOY = memory.PUBLIC_DIR.parent / "toy-IF-I"
TOY_UNET = json.loads((TOY / "unet" / "config.json").read_text())
FULL = dict(lora_rank=0, mixed_precision="no", gradient_checkpointing=False, optimizer_in_backward=False,
            optimizer_states="fp32", frozen_weights="fp32", device="cpu")


@pytest.mark.parametrize("name, part, published", [
    ("IF-I-XL", "unet", 4_304_695_110), ("IF-II-L", "unet", 1_243_277_190), ("SD-1.5", "unet", 859_520_964),
    ("IF-I-XL", "text_encoder", 4_762_310_656), ("SD-1.5", "text_encoder", 123_060_480),
    ("SD-1.5", "vae", 83_653_863)])
def test_parameter_counts_from_config_alone_match_published(name, part, published):
    config = memory.model_configs(name)[part]
    n = memory.count_params("text" if part == "text_encoder" else part, config)
    assert n == published, (f"{name} {part}: {n:,} parameters built from the shipped config, the published "
                            f"model has {published:,}: tinybooth/assets/public_configs/{name}.json is wrong")


def test_every_shipped_config_builds_with_its_recorded_count():
    for name in memory.public_models():
        c = memory.model_configs(name)
        assert memory.count_params("unet", c["unet"]) == c["unet_params"], f"{name}.json's unet_params is stale"


def test_simulated_step_on_fake_tensors_allocates_what_a_real_step_does():
    """The whole predictor rests on this: the same step run on fake tensors and on real ones (the toy U-Net, bf16
    autocast with checkpointing) leaves the tracker with the same bytes."""
    s = dict(FULL, mixed_precision="bf16", gradient_checkpointing=True)
    fake = memory.cached(memory_trace.simulate_training, TOY_UNET, s, 32, 2)
    real = memory_trace.simulate_training(TOY_UNET, s, 32, 2, fake=False)
    for part in fake:  # (checkpointing saves the RNG state, a few kB that differ between fake and real)
        assert abs(fake[part] - real[part]) <= 1e-3 * real[part], (
            f"the fake-tensor step's {part} ({fake[part]} bytes) differs from the real step's ({real[part]})")


def _real_step_bytes(params, optimizer):
    """(bytes of the optimizer's state tensors, peak bytes of its second step's temporaries), measured."""
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        with memory_trace.PeakTracker() as tracker:
            optimizer.step()
    states = sum(t.numel() * t.element_size() for st in optimizer.state.values() for k, v in st.items()
                 if k != "step" for t in (v if isinstance(v, tuple) else (v,)))
    return states, tracker.peak


@pytest.mark.parametrize("states, foreach", [("fp32", True), ("fp32", False), ("bf16", False), ("8bit", False)])
def test_optimizer_bytes_match_a_real_optimizer_step(states, foreach):
    torch.manual_seed(0)
    dtype = torch.float32 if states == "fp32" else torch.bfloat16
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in (3000, 70_000, 500)]
    optimizer = (torch.optim.AdamW(params, foreach=foreach) if states == "fp32"
                 else optim.AdamW(params, states=states))
    real_states, real_temp = _real_step_bytes(params, optimizer)
    s = dict(FULL, optimizer_states=states, device="cuda" if foreach else "cpu")
    pred_states, pred_temp = memory_trace.optimizer_bytes(params, s)
    assert pred_states == real_states, f"{states} states: predicted {pred_states} bytes, the optimizer holds " \
                                       f"{real_states}"
    assert real_temp <= pred_temp <= 1.25 * real_temp, (
        f"{states} (foreach={foreach}) step temporaries: predicted {pred_temp} bytes, measured {real_temp}")


def test_savings_lower_what_they_should_on_the_toy_model():
    base = memory.cached(memory_trace.simulate_training, TOY_UNET, FULL, 32, 1)
    ckpt = memory.cached(memory_trace.simulate_training, TOY_UNET, dict(FULL, gradient_checkpointing=True), 32, 1)
    bigger = memory.cached(memory_trace.simulate_training, TOY_UNET, FULL, 32, 2)
    assert ckpt["activations"] < 0.5 * base["activations"], "checkpointing should keep far fewer activations"
    assert bigger["activations"] > 1.8 * base["activations"], "activations should grow with the batch"
    eight = memory_trace.optimizer_bytes([torch.zeros(4096)], dict(FULL, optimizer_states="8bit"))[0]
    bf16 = memory_trace.optimizer_bytes([torch.zeros(4096)], dict(FULL, optimizer_states="bf16"))[0]
    fp32 = memory_trace.optimizer_bytes([torch.zeros(4096)], dict(FULL, optimizer_states="fp32"))[0]
    assert eight < bf16 < fp32, f"states: 8bit {eight}, bf16 {bf16}, fp32 {fp32} bytes"


def test_fit_budget_takes_the_ladder_in_order(monkeypatch):
    """A stand-in cost (GB): 20, minus 4 for checkpointing, 6 for in-backward, ... LoRA resets the states."""
    def fake_predict(model, sr_model=None, **s):
        cost = 20 - 4 * bool(s.get("gradient_checkpointing")) - 6 * bool(s.get("optimizer_in_backward")) \
            - {"fp32": 0, "bf16": 3, "8bit": 5}[s.get("optimizer_states", "fp32")] - 12 * bool(s.get("lora_rank"))
        settings = dict(s, device="cpu", model=model, sr_model=sr_model)
        return {"settings": settings, "base": {"peak": cost * GB}}
    monkeypatch.setattr(memory, "predict", fake_predict)
    s, why = memory.fit_budget(25 * GB, "m")
    assert "gradient_checkpointing" not in s and "as given" in why, "a run that fits should be left alone"
    s, why = memory.fit_budget(10 * GB, "m")
    assert s["gradient_checkpointing"] and s["optimizer_in_backward"] and "lora_rank" not in s, why
    s, why = memory.fit_budget(6 * GB, "m")
    assert s["optimizer_states"] == "8bit" and "lora_rank" not in s, why
    s, why = memory.fit_budget(4 * GB, "m")
    assert s["lora_rank"] == 4 and s["optimizer_states"] == "fp32", f"LoRA should be the last resort: {why}"
    with pytest.raises(memory.MemoryBudgetError, match="even with every saving"):
        memory.fit_budget(1 * GB, "m")


def test_parse_size_reads_decimal_and_binary_units():
    assert memory.parse_size("12GB") == 12 * GB
    assert memory.parse_size("12 GiB") == 12 * GiB
    assert memory.parse_size("1.5gb") == int(1.5 * GB)
    assert memory.parse_size("500MB") == 500 * 10 ** 6
    for bad in ("twelve", "12 GX", "-3GB", ""):
        with pytest.raises(ValueError, match="e.g. 12GB"):
            memory.parse_size(bad)
