"""tinybooth.unet against diffusers' UNet2DConditionModel (fixtures from tests/reference/make_unet_fixtures.py)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinybooth.checkpoint import CheckpointError
from tinybooth.unet import PUBLIC_CONFIGS, UNet
from tinybooth.unet_blocks import AddedKVAttention, ResnetBlock2D, timestep_embedding

TOL = 2e-4
IF_TASKS = [pytest.mark.task6_1, pytest.mark.task6_2, pytest.mark.task6_3, pytest.mark.task6_5]
SD_TASKS = [pytest.mark.task6_1, pytest.mark.task6_2, pytest.mark.task6_4, pytest.mark.task6_5]
FAMILIES = [pytest.param("if1", marks=IF_TASKS), pytest.param("if2", marks=IF_TASKS),
            pytest.param("sd_conv", marks=SD_TASKS), pytest.param("sd_linear", marks=SD_TASKS)]
IF1, SD_CONV = FAMILIES[0], FAMILIES[2]   # tests that run a whole forward carry the markers of what it needs
WHAT = {"if1": "IF stage-I-like (added-KV attention, text pooling, text mask)",
        "if2": "IF stage-II-like (noise level embedding, skip_time_act, output scales, only_cross_attention)",
        "sd_conv": "SD-like (transformer blocks, conv projections, odd 10x10 input, text mask)",
        "sd_linear": "SD-2-like (linear projections, per-block heads, 2 transformer layers)"}


def load(fixtures_dir, name):
    model = UNet.from_pretrained(fixtures_dir / "unet" / name / "unet")
    return model, load_file(str(fixtures_dir / "unet" / name / "io.safetensors"))


def run(model, io, sample=None, text=None):
    return model(io["sample"] if sample is None else sample, io["timesteps"],
                 io["encoder_hidden_states"] if text is None else text,
                 noise_level=io.get("noise_level"), encoder_attention_mask=io.get("encoder_attention_mask"))


def input_grads(model, io):
    sample = io["sample"].clone().requires_grad_()
    text = io["encoder_hidden_states"].clone().requires_grad_()
    out = run(model, io, sample, text)
    (out * io["weight"]).sum().backward()
    return out, sample.grad, text.grad


def assert_close(got, want, what, tol=TOL):
    err = (got - want).abs().max().item()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert err <= tol, f"{what}: max |difference| from diffusers = {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name", FAMILIES)
def test_output_and_input_gradients_match_diffusers(fixtures_dir, name):
    model, io = load(fixtures_dir, name)
    out, grad_sample, grad_text = input_grads(model, io)
    assert_close(out, io["out"], f"{WHAT[name]} output")
    assert_close(grad_sample, io["grad_sample"], f"{WHAT[name]} d loss / d sample")
    assert_close(grad_text, io["grad_encoder_hidden_states"], f"{WHAT[name]} d loss / d encoder_hidden_states")


@pytest.mark.parametrize("name", ["if1", "if2", "sd_conv", "sd_linear"])
def test_state_dict_keys_and_shapes_are_the_public_file_keys(fixtures_dir, name):
    file = load_file(str(fixtures_dir / "unet" / name / "unet" / "diffusion_pytorch_model.safetensors"))
    with open(fixtures_dir / "unet" / name / "unet" / "config.json") as f:
        config = json.load(f)
    with torch.device("meta"):
        model = UNet.from_config(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in file.items()}
    assert sorted(ours) == sorted(theirs), (f"keys only in tinybooth: {sorted(set(ours) - set(theirs))[:5]}, "
                                            f"only in the file: {sorted(set(theirs) - set(ours))[:5]}")
    assert ours == theirs


def test_fp16_variant_loads_as_the_rounded_fp32_weights(fixtures_dir):
    d = fixtures_dir / "unet" / "if1" / "unet"
    full = UNet.from_pretrained(d)
    half = UNet.from_pretrained(d, variant="fp16")
    cast = UNet.from_pretrained(d, variant="fp16", dtype=torch.float32)
    assert next(half.parameters()).dtype == torch.float16
    assert next(cast.parameters()).dtype == torch.float32
    for k, v in full.state_dict().items():
        assert torch.equal(half.state_dict()[k], v.half()), f"fp16 variant tensor {k} is not the fp32 one rounded"


@pytest.mark.parametrize("name", [SD_CONV])
def test_timesteps_as_scalar_or_per_sample_agree(fixtures_dir, name):
    model, io = load(fixtures_dir, name)               # the sd_conv fixture passes a scalar step (417)
    with torch.no_grad():
        a = run(model, io)
        b = model(io["sample"], torch.full((2,), 417), io["encoder_hidden_states"],
                  encoder_attention_mask=io["encoder_attention_mask"])
        c = model(io["sample"], 417, io["encoder_hidden_states"],
                  encoder_attention_mask=io["encoder_attention_mask"])
    assert torch.equal(a, b) and torch.equal(a, c), "a scalar step must mean the same step for every sample"


@pytest.mark.task6_1
def test_noise_level_is_required_by_a_stage_two_model(fixtures_dir):
    model, io = load(fixtures_dir, "if2")
    with pytest.raises(ValueError, match="noise_level"):
        model(io["sample"], io["timesteps"], io["encoder_hidden_states"])


# -- strict loading ------------------------------------------------------------------------------------------------

def broken_copy(fixtures_dir, tmp_path, edit):
    src = fixtures_dir / "unet" / "if1" / "unet"
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    edit(state)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text((src / "config.json").read_text())
    save_file(state, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    return tmp_path / "unet"


def test_loading_names_missing_unexpected_and_misshaped_tensors(fixtures_dir, tmp_path):
    def edit(state):
        del state["conv_in.weight"]
        state["mid_block.extra.weight"] = torch.zeros(3)
        state["conv_out.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        UNet.from_pretrained(broken_copy(fixtures_dir, tmp_path, edit))
    msg = str(err.value)
    assert "missing (1): conv_in.weight" in msg
    assert "unexpected (1): mid_block.extra.weight" in msg
    assert "conv_out.bias: checkpoint (7,) vs model (6,)" in msg


@pytest.mark.parametrize("field, value", [("time_embedding_type", "fourier"), ("attention_type", "gated"),
                                          ("mid_block_type", "UNetMidBlock2D"), ("class_embed_type", "projection"),
                                          ("act_fn", "tanh"), ("flux_capacitor", 1)])
def test_unsupported_config_values_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        UNet.from_config(dict(PUBLIC_CONFIGS["SD-1.5"], **{field: value}))


def test_unsupported_block_type_is_refused():
    config = dict(PUBLIC_CONFIGS["SD-1.5"], down_block_types=["AttnDownBlock2D"] * 4)
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        UNet.from_config(config)


# -- full-size configs on the meta device ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, params, tensors", [("IF-I-XL", 4_304_695_110, 775), ("IF-II-L", 1_243_277_190, 939),
                                                   ("SD-1.5", 859_520_964, 686)])
def test_published_parameter_counts_on_the_meta_device(name, params, tensors):
    with torch.device("meta"):
        model = UNet.from_config(PUBLIC_CONFIGS[name])
    state = model.state_dict()
    assert all(t.is_meta for t in state.values()), "from_config must not allocate under torch.device('meta')"
    got = sum(t.numel() for t in state.values())
    assert (got, len(state)) == (params, tensors), \
        f"{name}: {got:,} params in {len(state)} tensors, the published file has {params:,} in {tensors}"


# -- saving, training features --------------------------------------------------------------------------------------

def test_save_pretrained_round_trip(fixtures_dir, tmp_path):
    model, _ = load(fixtures_dir, "if2")
    model.save_pretrained(tmp_path / "unet")
    again = UNet.from_pretrained(tmp_path / "unet")
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), f"{k} changed in the save/load round trip"
    saved = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(fixtures_dir / "unet" / "if2" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sorted(saved) == sorted(original), "saved keys must be the public ones"


@pytest.mark.parametrize("name", [IF1, SD_CONV])
def test_gradient_checkpointing_gives_the_same_gradients(fixtures_dir, name):
    model, io = load(fixtures_dir, name)
    model.train()
    _, gs, gt = input_grads(model, io)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    out, gs2, gt2 = input_grads(model, io)
    assert_close(out, io["out"], "output with gradient checkpointing", 1e-5)
    assert_close(gs2, gs, "d loss / d sample with checkpointing", 1e-5)
    assert_close(gt2, gt, "d loss / d text with checkpointing", 1e-5)
    for k, p in model.named_parameters():
        assert_close(p.grad, grads[k], f"gradient of {k} with checkpointing", 1e-5)
    saved = {}
    for enabled in (False, True):   # and it must actually store less for backward
        model.enable_gradient_checkpointing(enabled)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            run(model, io, io["sample"].requires_grad_())
        saved[enabled] = sum(sizes)
    assert saved[True] < 0.5 * saved[False], f"checkpointing saved {saved[True]} vs {saved[False]} numbers"


@pytest.mark.parametrize("name", [IF1, SD_CONV])
def test_bf16_autocast_runs_and_stays_close(fixtures_dir, name):
    model, io = load(fixtures_dir, name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, io)
    assert torch.isfinite(out).all()
    err = (out.float() - io["out"]).abs().max().item()
    assert err < 0.1 * io["out"].abs().max().item(), f"bf16 autocast output off by {err:.3f}"


# -- the formulas of the docstrings ---------------------------------------------------------------------------------

@pytest.mark.task6_1
def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = timestep_embedding(t, 8, flip_sin_to_cos=True, freq_shift=0)
    assert emb.shape == (3, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4)), "t = 0 must give cos = 1, sin = 0"
    for i in range(4):   # w_i = 10000^(-i / 4)
        w = 10000 ** (-i / 4)
        assert math.isclose(emb[2, i].item(), math.cos(999 * w), abs_tol=1e-4), f"cos(t w_{i}) wrong"
        assert math.isclose(emb[2, 4 + i].item(), math.sin(999 * w), abs_tol=1e-4), f"sin(t w_{i}) wrong"
    shifted = timestep_embedding(t, 8, flip_sin_to_cos=False, freq_shift=1)   # [sin, cos], w_i = 10000^(-i / 3)
    assert math.isclose(shifted[1, 3].item(), math.sin(10 * 10000 ** (-3 / 3)), abs_tol=1e-5)
    assert timestep_embedding(t, 9).shape == (3, 9) and torch.all(timestep_embedding(t, 9)[:, -1] == 0)


@pytest.mark.task6_2
def test_resblock_scale_shift_conditioning():
    block = ResnetBlock2D(4, 4, 3, groups=2, eps=1e-5, act_fn="silu", time_scale_shift="scale_shift")
    x, emb = torch.randn(2, 4, 5, 5), torch.randn(2, 3)
    e = block.time_emb_proj(torch.nn.functional.silu(emb))[:, :, None, None]
    scale, shift = e[:, :4], e[:, 4:]
    h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
    h = torch.nn.functional.silu(block.norm2(h) * (1 + scale) + shift)
    assert_close(block(x, emb), x + block.conv2(h), "ResBlock with norm2(h) * (1 + scale) + shift", 1e-5)


@pytest.mark.task6_3
def test_added_kv_attention_mask_hides_exactly_the_masked_text_tokens():
    attn = AddedKVAttention(8, 4, 32, groups=2, cross_attention_norm=None)
    x, c = torch.randn(1, 8, 3, 3), torch.randn(1, 5, 32)
    bias = torch.tensor([0.0, 0.0, 0.0, -10000.0, -10000.0]).view(1, 1, 1, 5)
    assert_close(attn(x, c, bias), attn(x, c[:, :3]), "attention with tokens 3, 4 masked vs. removed", 1e-5)
    alone = AddedKVAttention(8, 4, 32, groups=2, only_cross_attention=True)
    # with one text token and no self-attention, every position receives that token's value
    want = x + alone.to_out[0](alone.add_v_proj(c[:, :1])).view(1, 8, 1, 1)
    assert_close(alone(x, c[:, :1]), want, "only-cross attention to a single token", 1e-5)
