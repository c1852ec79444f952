"""DreamBooth-LoRA adapters (tinybooth.lora): h = W x + (alpha / r) B A x on the attention projections."""
import json
import sys

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from tinybooth import lora

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "reference"))
from lora_file_record import file_record  # noqa: E402  (the script that wrote the fixtures records with it too)


class Attention(nn.Module):
    """The public names of an IF/SD attention block: to_q/k/v, to_out = [Linear, Dropout], added-KV projections."""

    def __init__(self, d=16, d_text=12):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.add_k_proj, self.add_v_proj = nn.Linear(d_text, d), nn.Linear(d_text, d)
        self.to_out = nn.ModuleList([nn.Linear(d, d), nn.Dropout(0.0)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x, c):  # x: [B, N, d], c: [B, L, d_text]
        q = self.to_q(self.norm(x))
        k = torch.cat([self.add_k_proj(c), self.to_k(x)], 1)
        v = torch.cat([self.add_v_proj(c), self.to_v(x)], 1)
        a = torch.softmax(q @ k.transpose(1, 2) / 4, -1) @ v
        return self.to_out[1](self.to_out[0](a))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(), Attention()])
        self.proj = nn.Linear(16, 16)  # not an attention projection: must stay untouched

    def forward(self, x, c):
        for b in self.blocks:
            x = x + b(x, c)
        return self.proj(x)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 16, generator=g), torch.randn(2, 3, 12, generator=g)


def _train_adapters_a_bit(model):
    """Give B non-zero values, as a few fine-tuning steps would."""
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(0, 0.1)


@pytest.mark.task8_1
def test_lora_at_init_leaves_the_output_unchanged():
    model = Tiny()
    x, c = _inputs()
    before = model(x, c)
    lora.add_lora(model, rank=2)
    after = model(x, c)
    assert torch.equal(before, after), "B starts at zero, so at init W x + (alpha/r) B A x must equal W x exactly"


@pytest.mark.task8_1
def test_lora_forward_is_w_x_plus_scaled_b_a_x():
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = base(x) + (3.0 / 2) * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-6), \
        "LoRA output must be W x + b + (alpha / r) B A x with alpha=3, r=2 (scale 1.5)"


def test_only_adapters_require_grad_and_the_right_layers_are_wrapped():
    model = Tiny()
    names = lora.add_lora(model, rank=2)
    expected = {f"blocks.{i}.{n}" for i in range(2) for n in ("to_q", "to_k", "to_v", "to_out.0",
                                                               "add_k_proj", "add_v_proj")}
    assert set(names) == expected, f"wrapped {sorted(names)}, expected the 6 attention projections per block"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in expected for ab in "AB"}, \
        f"only lora_A / lora_B may require grad, got {sorted(trainable)[:6]}..."
    x, c = _inputs()
    model(x, c).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert any(m.lora_B.grad.abs().sum() > 0 for m in lora.lora_layers(model).values()), \
        "the loss must reach the adapters (B gets a gradient even though it starts at zero)"


@pytest.mark.task8_2
def test_merged_weight_is_w_plus_scaled_b_a():
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merged_linear()
    expected = base.weight + 1.5 * layer.lora_B @ layer.lora_A
    assert isinstance(merged, nn.Linear) and torch.allclose(merged.weight, expected, atol=1e-6), \
        "merged weight must be W + (alpha / r) B A with alpha=3, r=2 ([out, r] @ [r, in])"
    assert torch.equal(merged.bias, base.bias), "the bias is not touched by LoRA"


def test_merged_equals_unmerged():
    model = Tiny()
    lora.add_lora(model, rank=3, alpha=6)
    _train_adapters_a_bit(model)
    x, c = _inputs()
    unmerged = model(x, c)
    lora.merge_lora(model)
    assert not lora.lora_layers(model), "merge_lora must put plain nn.Linear layers back"
    assert isinstance(model.blocks[0].to_out[0], nn.Linear)
    merged = model(x, c)
    assert torch.allclose(merged, unmerged, atol=1e-5), \
        f"W + (alpha/r) B A must give the same output as the adapters; max diff {(merged - unmerged).abs().max():.2e}"
    # the merged model has exactly the public keys again, so it saves in the public layout
    assert set(model.state_dict()) == set(Tiny().state_dict())


def test_save_and_load_adapters_in_diffusers_naming(tmp_path):
    model = Tiny()
    lora.add_lora(model, rank=2)
    _train_adapters_a_bit(model)
    files = lora.save_lora(tmp_path, {"unet": model})
    assert [f.name for f in files] == ["pytorch_lora_weights.safetensors"]
    with safe_open(str(files[0]), framework="pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert "unet.blocks.0.to_out.0.lora_A.weight" in keys and "unet.blocks.1.add_v_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 12
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 2.0
    assert meta["unet.target_modules"] == sorted(lora.lora_layers(model)), "target_modules: every wrapped module"
    assert meta["unet.rank_pattern"] == {} and meta["unet.alpha_pattern"] == {}, \
        "diffusers builds a LoraConfig from the metadata and needs rank_pattern / alpha_pattern (KeyError otherwise)"

    fresh = Tiny()
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items()
                           if "lora_" not in k}, strict=True)  # same frozen base weights
    lora.load_lora(tmp_path, {"unet": fresh})  # wraps the layers itself, rank from the metadata
    x, c = _inputs()
    assert torch.equal(fresh(x, c), model(x, c)), "loading saved adapters must reproduce the trained model"
    with pytest.raises(ValueError, match="only \\['text_encoder'\\] were given"):
        lora.load_lora(tmp_path, {"text_encoder": Tiny()})


def test_load_refuses_adapters_for_other_layers(tmp_path):
    model = Tiny()
    lora.add_lora(model, rank=2)
    lora.save_lora(tmp_path, {"unet": model})
    other = Tiny()
    lora.add_lora(other, rank=2, targets=("to_q",))
    with pytest.raises(ValueError, match="unet .* do not match the model"):
        lora.load_lora(tmp_path, {"unet": other})


def test_bad_rank_and_missing_targets_are_clear_errors():
    with pytest.raises(ValueError, match="rank 99"):
        lora.LoRALinear(nn.Linear(8, 8), rank=99, alpha=1)
    with pytest.raises(ValueError, match="no Linear layer"):
        lora.add_lora(nn.Sequential(nn.Linear(4, 4)), rank=1)


def test_adapters_stay_fp32_on_a_bf16_model():
    model = Tiny().to(torch.bfloat16)
    lora.add_lora(model, rank=2)
    _train_adapters_a_bit(model)
    x, c = (t.to(torch.bfloat16) for t in _inputs())
    out = model(x, c)
    assert out.dtype == torch.bfloat16
    assert all(m.lora_A.dtype == torch.float32 for m in lora.lora_layers(model).values()), \
        "trainable adapters must stay fp32 (the optimizer updates them) even when the frozen base is bf16"


# ----------------------------------------------------------------------------------------------------------------
# tinybooth's files in diffusers and peft (fixtures from tests/reference/make_lora_fixtures.py): the script saved
# adapters with save_lora, loaded them with IFPipeline / IFSuperResolutionPipeline / StableDiffusionPipeline
# .load_lora_weights(dir) and PeftModel.from_pretrained(T5EncoderModel, dir/text_encoder), and recorded outputs.

CASES = {"if1": "t5", "if2": None, "sd": "clip"}


@pytest.fixture(scope="module")
def lora_fx(request):
    from safetensors.torch import load_file
    root = request.config.rootpath / "tests" / "fixtures"
    return root, load_file(root / "lora" / "expected.safetensors"), json.loads((root / "lora" / "meta.json").read_text())


def _base_models(root, case):
    from tinybooth.text import T5Encoder
    from tinybooth.clip import CLIPTextEncoder
    from tinybooth.unet import UNet
    models = {"unet": UNet.from_pretrained(root / "cascade" / case / "unet").eval()}
    if CASES[case]:
        cls, folder = (T5Encoder, "t5_gated") if CASES[case] == "t5" else (CLIPTextEncoder, "clip_quick_gelu")
        models["text_encoder"] = cls.from_pretrained(root / "text" / folder).eval()
    return models


def _outputs(models, case, want):
    x = {k: want[f"{case}_unet_{k}"] for k in ("sample", "t", "c", "noise_level") if f"{case}_unet_{k}" in want}
    out = {"unet": models["unet"](x["sample"], x["t"], x["c"], noise_level=x.get("noise_level"))}
    if CASES[case] == "t5":
        out["t5"] = models["text_encoder"](want["if1_t5_ids"], want["if1_t5_mask"])
    if CASES[case] == "clip":
        out["clip"] = models["text_encoder"](want["sd_clip_ids"])
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_lora_outputs_match_diffusers_and_peft_loading_our_files(lora_fx, case):
    root, want, meta = lora_fx
    models = _base_models(root, case)
    with torch.no_grad():
        base = _outputs(models, case, want)
        lora.load_lora(root / "lora" / case, models)  # strict: every adapter finds its layer
        got = _outputs(models, case, want)
    tol = meta["tolerance"]
    for part in got:
        ref = "unet" if part == "unet" else f"{part}"
        base_ref, lora_ref = want[f"{case}_{ref}_base"], want[f"{case}_{ref}_lora"]
        assert (base[part] - base_ref).abs().max() < tol, f"{case} {part} without LoRA differs from the reference"
        assert (lora_ref - base_ref).abs().max() > 1e-2, f"{case} {part}: the fixture's adapters change nothing"
        err = (got[part] - lora_ref).abs().max().item()
        assert err < tol, (f"{case} {part} with tinybooth's LoRA differs from diffusers/peft loading the same file "
                           f"by {err:.2e} (tolerance {tol}): h = W x + (alpha / r) B A x, r and alpha from the file")


@pytest.mark.parametrize("case", list(CASES))
def test_save_lora_writes_the_files_diffusers_loaded(lora_fx, case, tmp_path):
    root, want, meta = lora_fx
    models = lora.load_lora(root / "lora" / case, _base_models(root, case))
    lora.save_lora(tmp_path, models)
    written, loaded = file_record(tmp_path), meta[case]["files"]
    assert written.keys() == loaded.keys(), f"save_lora wrote {sorted(written)}, diffusers/peft loaded {sorted(loaded)}"
    for name in loaded:
        assert written[name] == loaded[name], f"{name}: keys, metadata or adapter_config.json differ from the file " \
                                              f"the reference libraries loaded"
    rec = meta[case]
    assert rec["same_as_diffusers_own_file"], "the reference saw different keys/config than diffusers' own save"
    assert rec["warnings"] == rec["warnings_loading_diffusers_own_file"], \
        f"loading tinybooth's file warned {rec['warnings']}, beyond what diffusers' own file of the same adapters does"
    if case == "sd":  # U-Net + CLIP adapters: not a single warning
        assert rec["warnings"] == [], rec["warnings"]
    # U-Net only, through the model's own loader: no warning, same output
    assert rec["unet_load_lora_adapter"] == {"warnings": [], "max_diff_to_pipeline": 0.0}, rec["unet_load_lora_adapter"]


def test_kohya_export_has_the_names_and_outputs_diffusers_read(lora_fx, tmp_path):
    """lora_unet_<path with _>.lora_down/.lora_up/.alpha, as A1111 and ComfyUI read them; diffusers' kohya converter
    loaded the fixture's file to the same outputs as the pipeline file (alpha = lora_alpha, not r)."""
    root, want, meta = lora_fx
    rec = meta["sd_kohya"]
    assert rec["keys_as_diffusers_convert_state_dict_to_kohya"] and rec["warnings"] == []
    assert rec["max_diff_to_pipeline_file"] < 1e-6
    models = lora.load_lora(root / "lora" / "sd", _base_models(root, "sd"))
    file = lora.save_kohya_lora(tmp_path / "kohya.safetensors", models)
    with safe_open(str(file), framework="pt") as f, safe_open(str(root / "lora" / "sd_kohya.safetensors"), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys()), "kohya key names differ from the file diffusers loaded"
        for k in g.keys():
            assert torch.equal(f.get_tensor(k), g.get_tensor(k)), f"{k} differs from the file diffusers loaded"
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in g.keys()
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in g.keys()
        assert g.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").item() == \
            meta["ranks"]["text_encoder"][1]
    with torch.no_grad():
        got = _outputs(models, "sd", want)
    for part, ref in (("unet", "sd_kohya_unet_lora"), ("clip", "sd_kohya_clip_lora")):
        assert (got[part] - want[ref]).abs().max() < meta["tolerance"], f"{part} differs from diffusers' kohya load"
    with pytest.raises(ValueError, match="no kohya form"):
        lora.save_kohya_lora(tmp_path / "t5.safetensors", lora.load_lora(root / "lora" / "if1",
                                                                         _base_models(root, "if1")))
