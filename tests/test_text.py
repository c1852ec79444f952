"""tinybooth.text encoders against transformers' T5EncoderModel / CLIPTextModel (fixtures from
tests/reference/make_text_fixtures.py): outputs, state-dict keys, strict loading, dtypes, full-size parameter counts."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tinybooth import checkpoint
from tinybooth.text import T5_PRESETS, T5Encoder, relative_position_bucket, rms_norm
from tinybooth.clip import CLIP_PRESETS, CLIPTextEncoder, causal_attention_mask

TEXT = Path(__file__).parent / "fixtures" / "text"
TOL = 1e-4  # the tolerance; the outputs agree to ~1e-6


@pytest.fixture(scope="module")
def text_dir():
    return TEXT


@pytest.fixture(scope="module")
def expected(text_dir):
    return load_file(text_dir / "encoders.safetensors")


def file_keys(directory, variant=None):
    keys = set()
    for f in checkpoint.find_weight_files(directory, "model", variant):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    return keys


def assert_close(got, want, what, tol=TOL):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, (f"{what}: max |tinybooth - transformers| = {err:.2e} > {tol:.0e}. Reference values start "
                        f"{want.flatten()[:3].tolist()}, got {got.flatten()[:3].tolist()}")


# ---- the formulas, one by one ---------------------------------------------------------------------------------

@pytest.mark.task4_1
def test_relative_position_bucket_values():
    """num_buckets 32, max_distance 128: 8 exact buckets per direction, then log-spaced up to 128 (bucket 15)."""
    rel = torch.tensor([0, -1, -7, -8, -16, -127, -128, -1000, 1, 7, 8, 16, 200])
    want = [0, 1, 7, 8, 10, 15, 15, 15, 17, 23, 24, 26, 31]
    # e.g. j - i = -16: 8 + floor(log(16/8) / log(128/8) * (16 - 8)) = 8 + floor(0.25 * 8) = 10; j > i adds 16
    got = relative_position_bucket(rel, 32, 128).tolist()
    assert got == want, f"buckets of j - i = {rel.tolist()}: expected {want}, got {got}"


@pytest.mark.task4_2
def test_rms_norm_has_no_mean_and_no_bias():
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    w = torch.tensor([1.0, 2.0])
    want = torch.tensor([[3.0, 8.0], [1.0, 2.0]]) / torch.tensor([[math.sqrt(12.5)], [1.0]])  # x / sqrt(mean(x^2)) * w
    got = rms_norm(x, w, eps=0.0)
    assert torch.allclose(got, want), f"RMSNorm([3, 4]) with w = [1, 2] should be {want[0].tolist()}, got {got[0]}"
    half = rms_norm(x.bfloat16(), w.bfloat16(), eps=1e-6)
    assert half.dtype == torch.bfloat16, "with bf16 weights the output is bf16 (the mean of squares is taken in fp32)"


@pytest.mark.task4_5
def test_causal_mask_hides_future_and_padding():
    m = causal_attention_mask(3, torch.tensor([[1, 1, 0], [1, 1, 1]]))  # [2, 1, 3, 3]
    assert m.shape == (2, 1, 3, 3) and m.dtype == torch.bool
    allowed = m[:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0], [1, 1, 0], [1, 1, 0]], f"query i sees keys j <= i that are tokens: {allowed[0]}"
    assert allowed[1] == [[1, 0, 0], [1, 1, 0], [1, 1, 1]], f"without padding, the causal mask only: {allowed[1]}"
    assert causal_attention_mask(2).int().tolist() == [[[[1, 0], [1, 1]]]]


# ---- T5 against transformers -----------------------------------------------------------------------------------

T5_CASES = [("t5_gated", None, "t5_gated"), ("t5_gated_sharded", None, "t5_gated"), ("t5_relu", None, "t5_relu")]


@pytest.mark.task4_1
@pytest.mark.task4_2
@pytest.mark.task4_3
@pytest.mark.parametrize("directory,variant,key", T5_CASES)
def test_t5_matches_transformers(text_dir, expected, directory, variant, key):
    model = T5Encoder.from_pretrained(text_dir / directory, variant=variant)
    with torch.no_grad():
        got = model(expected["t5_input_ids"], expected["t5_attention_mask"])
    assert got.shape == expected[key].shape
    assert_close(got, expected[key], f"T5 last_hidden_state of {directory} (with padding mask)")


@pytest.mark.task4_1
@pytest.mark.task4_2
@pytest.mark.task4_3
def test_t5_padding_mask_matters(text_dir, expected):
    model = T5Encoder.from_pretrained(text_dir / "t5_gated")
    with torch.no_grad():
        got = model(expected["t5_input_ids"])
    assert_close(got, expected["t5_gated_nomask"], "T5 without attention_mask")
    assert (got[2] - expected["t5_gated"][2]).abs().max() > 1e-2, "the mask must change the padded row's outputs"


@pytest.mark.parametrize("directory,variant", [("t5_gated", None), ("t5_gated_sharded", None),
                                               ("t5_gated_sharded", "fp16"), ("t5_relu", None)])
def test_t5_state_dict_keys_equal_the_file(text_dir, directory, variant):
    model = T5Encoder.from_pretrained(text_dir / directory, variant=variant)
    assert set(model.state_dict()) == file_keys(text_dir / directory, variant)


def test_t5_fp16_file_keeps_each_tensors_dtype(text_dir):
    """The public fp16 T5 shards keep `wo` in fp32: dtype=None keeps that, a dtype casts everything."""
    mixed = T5Encoder.from_pretrained(text_dir / "t5_gated_sharded", variant="fp16")
    wo = mixed.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and mixed.shared.weight.dtype == torch.float16, \
        f"dtype=None should keep the file's dtypes (wo fp32, the rest fp16); got wo {wo.dtype}"
    for dtype in (torch.float32, torch.bfloat16):
        model = T5Encoder.from_pretrained(text_dir / "t5_gated_sharded", variant="fp16", dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.task4_1
@pytest.mark.task4_2
@pytest.mark.task4_3
def test_t5_fp16_file_outputs(text_dir, expected):
    """The mixed file run as stored (transformers runs it in fp16 with wo in fp32), and cast to fp32."""
    ids, mask = expected["t5_input_ids"], expected["t5_attention_mask"]
    with torch.no_grad():
        mixed = T5Encoder.from_pretrained(text_dir / "t5_gated_sharded", variant="fp16")(ids, mask)
        fp32 = T5Encoder.from_pretrained(text_dir / "t5_gated_sharded", variant="fp16", dtype=torch.float32)(ids, mask)
    scale = expected["t5_gated"].abs().max().item()
    assert_close(mixed, expected["t5_gated_fp16"], "T5 fp16 file with dtype=None vs transformers in fp16", 1e-2 * scale)
    assert_close(fp32, expected["t5_gated"], "T5 fp16 weights in fp32 vs the fp32 model", 1e-2 * scale)


# ---- CLIP against transformers ---------------------------------------------------------------------------------

@pytest.mark.task4_5
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_matches_transformers(text_dir, expected, act):
    model = CLIPTextEncoder.from_pretrained(text_dir / f"clip_{act}")
    ids, mask = expected["clip_input_ids"], expected["clip_attention_mask"]
    with torch.no_grad():
        masked, causal_only = model(ids, mask), model(ids)
    assert_close(masked, expected[f"clip_{act}"], f"CLIP ({act}) with attention_mask")
    assert_close(causal_only, expected[f"clip_{act}_nomask"], f"CLIP ({act}) with the causal mask only")
    assert (masked[1] - causal_only[1]).abs().max() > 1e-2, "attention_mask must hide the padding keys"


def test_clip_fp16_variant(text_dir, expected):
    model = CLIPTextEncoder.from_pretrained(text_dir / "clip_gelu", variant="fp16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}, "dtype=None keeps the file's fp16"
    model = CLIPTextEncoder.from_pretrained(text_dir / "clip_gelu", variant="fp16", dtype=torch.float32)
    with torch.no_grad():
        got = model(expected["clip_input_ids"], expected["clip_attention_mask"])
    assert_close(got, expected["clip_gelu"], "CLIP fp16 weights run in fp32 vs the fp32 model", 2e-2)


def test_clip_state_dict_keys_sd_layout(text_dir):
    """SD 1.x layout: `text_model.` prefix; a stored position_ids buffer is accepted (we compute it)."""
    model = CLIPTextEncoder.from_pretrained(text_dir / "clip_quick_gelu")
    assert set(model.state_dict()) == file_keys(text_dir / "clip_quick_gelu") - {"text_model.embeddings.position_ids"}
    # the transformers 5 layout (no prefix, no position_ids) loads into the same names
    model = CLIPTextEncoder.from_pretrained(text_dir / "clip_gelu")
    assert set(model.state_dict()) == {"text_model." + k for k in file_keys(text_dir / "clip_gelu")}


@pytest.mark.parametrize("cls,directory", [(T5Encoder, "t5_gated"), (CLIPTextEncoder, "clip_gelu")])
def test_save_pretrained_round_trip(tmp_path, text_dir, cls, directory):
    model = cls.from_pretrained(text_dir / directory)
    model.save_pretrained(tmp_path / "copy")
    again = cls.from_pretrained(tmp_path / "copy")
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), f"{k} changed in save_pretrained -> from_pretrained"


# ---- strict loading --------------------------------------------------------------------------------------------

def corrupt_copy(tmp_path, text_dir, directory, edit):
    out = tmp_path / directory
    out.mkdir()
    (out / "config.json").write_text((text_dir / directory / "config.json").read_text())
    state = load_file(text_dir / directory / "model.safetensors")
    save_file(edit(state), out / "model.safetensors")
    return out


def test_t5_loading_names_missing_unexpected_and_misshaped(tmp_path, text_dir):
    def edit(state):
        del state["encoder.block.1.layer.0.SelfAttention.k.weight"]
        state["encoder.block.9.layer.0.SelfAttention.q.weight"] = torch.zeros(1)
        state["encoder.final_layer_norm.weight"] = torch.ones(7)
        return state
    with pytest.raises(checkpoint.CheckpointError) as err:
        T5Encoder.from_pretrained(corrupt_copy(tmp_path, text_dir, "t5_gated", edit))
    msg = str(err.value)
    for name in ("encoder.block.1.layer.0.SelfAttention.k.weight", "encoder.block.9.layer.0.SelfAttention.q.weight",
                 "encoder.final_layer_norm.weight: checkpoint (7,) vs model (32,)"):
        assert name in msg, f"the loading error should name {name!r}; it says:\n{msg}"


def test_clip_loading_names_missing_and_accepts_only_listed_extras(tmp_path, text_dir):
    def edit(state):
        del state["text_model.final_layer_norm.bias"]
        state["text_model.embeddings.position_id"] = torch.zeros(1)  # a typo is not in the accepted table
        return state
    with pytest.raises(checkpoint.CheckpointError) as err:
        CLIPTextEncoder.from_pretrained(corrupt_copy(tmp_path, text_dir, "clip_quick_gelu", edit))
    assert "text_model.final_layer_norm.bias" in str(err.value)
    assert "text_model.embeddings.position_id" in str(err.value)


def test_t5_tied_embedding_copy(tmp_path, text_dir):
    """Files that store the token embedding as encoder.embed_tokens.weight (alone or beside shared.weight) load."""
    def rename(state):
        state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
        return state
    model = T5Encoder.from_pretrained(corrupt_copy(tmp_path, text_dir, "t5_gated", rename))
    assert torch.equal(model.shared.weight, load_file(text_dir / "t5_gated" / "model.safetensors")["shared.weight"])

    def differ(state):
        state["encoder.embed_tokens.weight"] = state["shared.weight"] + 1
        return state
    (tmp_path / "t5_gated").rename(tmp_path / "first")
    with pytest.raises(checkpoint.CheckpointError, match="tied"):
        T5Encoder.from_pretrained(corrupt_copy(tmp_path, text_dir, "t5_gated", differ))


def test_unsupported_config_values_are_refused(text_dir):
    cfg = json.loads((text_dir / "t5_gated" / "config.json").read_text())
    with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
        T5Encoder.from_config(dict(cfg, feed_forward_proj="gated-silu"))
    cfg = json.loads((text_dir / "clip_gelu" / "config.json").read_text())
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        CLIPTextEncoder.from_config(dict(cfg, hidden_act="relu"))


# ---- full size on the meta device ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,config,count", [
    (T5Encoder, T5_PRESETS["t5-v1_1-xxl"], 4_762_310_656),
    (CLIPTextEncoder, CLIP_PRESETS["clip-vit-large-patch14"], 123_060_480)])
def test_full_size_parameter_counts_on_meta(cls, config, count):
    with torch.device("meta"):
        model = cls.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == count, f"{cls.__name__} {config}: expected {count:,} parameters (public checkpoint), got {n:,}"
    assert all(t.device.type == "meta" for t in model.state_dict().values())
