"""python -m tinybooth.train: whole runs, outputs, resume, Ctrl-C, NaN guard, bad inputs, public layouts.

Runs use tiny random checkpoints written here in the public layouts (IF stage I + II with a T5, SD 1.x with CLIP and
a VAE), built with tinybooth's own from_config + save_pretrained, and a few steps each. The embedded toy default is
exercised by a short run too (slow marker).
"""
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinybooth import data, dreambooth, experiment, train
from tinybooth.checkpoint import CheckpointError
from tinybooth.schedule import DiscreteSchedule
from tinybooth.training import TrainingError
from tinybooth.unet import UNet

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "tinybooth" / "assets"

IF_SCHEDULER = dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000,
                    prediction_type="epsilon", variance_type="learned_range", thresholding=True,
                    dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True)
NOISING_SCHEDULER = dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000,
                         variance_type="fixed_small", clip_sample=True)
SD_SCHEDULER = dict(_class_name="PNDMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                    skip_prk_steps=True)
T5 = dict(model_type="t5", d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
          relative_attention_max_distance=32, dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
          is_gated_act=True, dense_act_fn="gelu_new", pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
IF_UNET = dict(act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=2, attention_head_dim=8,
               block_out_channels=[8, 16], cross_attention_dim=32, cross_attention_norm="group_norm",
               down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"], encoder_hid_dim=16,
               encoder_hid_dim_type="text_proj", in_channels=3, out_channels=6, layers_per_block=1,
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_num_groups=4, resnet_time_scale_shift="scale_shift",
               sample_size=8, up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"])
IF_SR_UNET = dict(IF_UNET, in_channels=6, sample_size=16, class_embed_type="timestep", resnet_skip_time_act=True,
                  mid_block_scale_factor=1.4142135623730951, resnet_out_scale_factor=1.4142135623730951,
                  time_embedding_act_fn="gelu")
SD_UNET = dict(act_fn="silu", attention_head_dim=2, block_out_channels=[8, 16], cross_attention_dim=16,
               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], in_channels=4, out_channels=4,
               layers_per_block=1, norm_num_groups=4, sample_size=4, up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
SD_VAE = dict(act_fn="silu", block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2, in_channels=3,
              latent_channels=4, layers_per_block=1, norm_num_groups=4, out_channels=3, sample_size=8,
              scaling_factor=0.18215, up_block_types=["UpDecoderBlock2D"] * 2)
CLIP = dict(model_type="clip_text_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            vocab_size=49408, pad_token_id=1, bos_token_id=0, eos_token_id=2, projection_dim=16)



def _save_scheduler(path, config):
    DiscreteSchedule.from_config(config).save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_if(tmp_path_factory):
    """Random IF stage I (8 px) + stage II (8 -> 16 px) pipelines in the public layout, with the toy's tokenizer."""
    from tinybooth.text import T5Encoder, T5Tokenizer
    root = tmp_path_factory.mktemp("tiny_if")
    base, sr = root / "IF-I", root / "IF-II"
    shutil.copytree(TOY / "toy-IF-I" / "tokenizer", base / "tokenizer")
    torch.manual_seed(0)
    vocab = len(T5Tokenizer.from_pretrained(base / "tokenizer"))
    T5Encoder.from_config(dict(T5, vocab_size=vocab)).save_pretrained(base / "text_encoder")
    UNet.from_config(IF_UNET).save_pretrained(base / "unet")
    _save_scheduler(base / "scheduler", IF_SCHEDULER)
    UNet.from_config(IF_SR_UNET).save_pretrained(sr / "unet")
    _save_scheduler(sr / "scheduler", dict(IF_SCHEDULER, sample_max_value=1.0))
    _save_scheduler(sr / "image_noising_scheduler", NOISING_SCHEDULER)
    return base, sr


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A random SD 1.x pipeline (CLIP text, 4x4x4 latents, VAE x2) in the public layout."""
    from tinybooth.clip import CLIPTextEncoder
    from tinybooth.vae import AutoencoderKL
    root = tmp_path_factory.mktemp("tiny_sd") / "SD"
    shutil.copytree(TOY / "clip", root / "tokenizer")
    torch.manual_seed(0)
    CLIPTextEncoder.from_config(CLIP).save_pretrained(root / "text_encoder")
    UNet.from_config(SD_UNET).save_pretrained(root / "unet")
    AutoencoderKL.from_config(SD_VAE).save_pretrained(root / "vae")
    _save_scheduler(root / "scheduler", SD_SCHEDULER)
    return root


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Four 24 x 20 'photos' of a two-colour blob (non-square: centre-cropped by the loader)."""
    folder = tmp_path_factory.mktemp("photos") / "blob"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        img = np.full((20, 24, 3), rng.integers(0, 255, 3), np.uint8)
        img[6:14, 8:12], img[6:14, 12:16] = (0, 165, 165), (255, 105, 185)
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYBOOTH_CACHE", str(tmp_path / "cache"))  # text embeddings: never the user's cache


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one thread is faster than two fighting over a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _if_args(tiny_if, photos, out, *extra):
    base, sr = tiny_if
    return ["--model", str(base), "--sr-model", str(sr), "--instance-dir", str(photos), "--class-noun", "blob",
            "--output-dir", str(out), "--identifier", "sks", "--num-class-images", "4", "--class-batch-size", "2",
            "--class-steps", "2", "--class-sampler", "ddim", "--sample-steps", "2", "--num-samples", "1",
            "--batch-size", "2", "--lr", "1e-3", "--lr-warmup-steps", "1", "--max-steps", "4", "--sr-steps", "2",
            "--checkpoint-every", "2", *extra]


def _unet_state(path):
    return UNet.from_pretrained(path).state_dict()


# ----------------------------------------------------------------------------------------------------------------
# whole runs on tiny public-layout checkpoints

def test_if_run_writes_a_loadable_personalised_cascade(tiny_if, photos, tmp_path, capsys):
    out = tmp_path / "run"
    train.run(_if_args(tiny_if, photos, out))
    printed = capsys.readouterr().out
    assert "instance prompt" in printed and "a sks blob" in printed, "effective settings are printed at start"
    assert str(out.resolve()) in printed, "the run must say where its outputs are"
    for name in ("samples.png", "samples_cascade.png", "loss.png", "metrics.json", "settings.json", "checkpoint.pt"):
        assert (out / name).exists(), f"{name} missing from the outputs"
    assert len(list((out / "class_images" / "a_blob").glob("*.png"))) == 4
    base, sr = tiny_if
    for sub in ("tokenizer", "text_encoder", "scheduler"):
        assert (out / "model" / sub).is_dir(), f"the personalised pipeline must keep {sub}/ (public layout)"
    tuned, orig = _unet_state(out / "model" / "unet"), _unet_state(base / "unet")
    assert any(not torch.equal(tuned[k], orig[k]) for k in orig), "the base U-Net was not fine-tuned"
    tuned_sr, orig_sr = _unet_state(out / "sr_model" / "unet"), _unet_state(sr / "unet")
    assert any(not torch.equal(tuned_sr[k], orig_sr[k]) for k in orig_sr), "the SR U-Net was not fine-tuned"
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [h for h in metrics["history"] if h["stage"] == "base"]
    assert len(steps) == 4 and all("subject" in h and "prior" in h for h in steps), \
        "the subject and the prior loss are logged separately at every step"
    assert json.loads((out / "settings.json").read_text())["prior_loss_weight"] == 1.0


def test_sr_guidance_reaches_the_cascade_grid_and_the_psnr(tiny_if, photos, tmp_path, monkeypatch):
    guidances, real = [], experiment.super_resolve

    def spy(pipe, x_low, c, c_uncond, level, steps, guidance=4.0, *args, **kwargs):
        guidances.append(guidance)
        return real(pipe, x_low, c, c_uncond, level, steps, guidance, *args, **kwargs)

    monkeypatch.setattr(experiment, "super_resolve", spy)
    train.run(_if_args(tiny_if, photos, tmp_path / "run", "--sr-guidance", "1"))
    assert guidances == [1.0, 1.0], f"samples_cascade.png and the SR PSNR were drawn at guidance {guidances}"
    base, sr = tiny_if
    assert train.parse([]).sr_guidance == 1.0, "the toy's SR samples are unguided (models.FAMILY_DEFAULTS says why)"
    assert train.parse(["--model", str(base), "--instance-dir", str(photos), "--class-noun", "dog"]).sr_guidance == 4.0


def test_loss_decreases(tiny_if, photos, tmp_path):
    out = tmp_path / "run"
    train.run(_if_args(tiny_if, photos, out, "--max-steps", "30", "--sr-steps", "0", "--num-samples", "0",
                        "--no-prior-preservation", "--checkpoint-every", "100", "--lr", "3e-3", "--batch-size", "4"))
    losses = [h["subject"] for h in json.loads((out / "metrics.json").read_text())["history"]]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.8 * first, f"subject loss should fall on a random model: first 8 steps {first:.3f}, last {last:.3f}"


def test_resume_after_ctrl_c_reaches_the_same_weights(tiny_if, photos, tmp_path, monkeypatch):
    args = ["--sr-steps", "0", "--num-samples", "0", "--max-steps", "5", "--deterministic"]
    full = tmp_path / "full"
    train.run(_if_args(tiny_if, photos, full, *args))

    cut = tmp_path / "cut"
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def ctrl_c_inside_the_optimizer_step(self, *a, **k):  # Ctrl-C while step 4 updates the weights
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", ctrl_c_inside_the_optimizer_step)
    with pytest.raises(KeyboardInterrupt):
        train.run(_if_args(tiny_if, photos, cut, *args))
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4, "Ctrl-C waits for the step it arrived in: the checkpoint holds whole steps only"
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train.run(_if_args(tiny_if, photos, cut, *args, "--resume"))
    a, b = _unet_state(full / "model" / "unet"), _unet_state(cut / "model" / "unet")
    assert all(torch.equal(a[k], b[k]) for k in a), \
        "interrupted + resumed must give bit-identical weights to an uninterrupted run (--deterministic, CPU)"


def test_optimizer_in_backward_holds_ctrl_c_until_the_step_is_done(tiny_if, photos, tmp_path, monkeypatch):
    args = ["--sr-steps", "0", "--num-samples", "0", "--max-steps", "5", "--deterministic", "--optimizer-in-backward"]
    full = tmp_path / "full"
    train.run(_if_args(tiny_if, photos, full, *args))

    cut = tmp_path / "cut"
    real_loss, calls = dreambooth.dreambooth_loss, {"n": 0}

    def ctrl_c_mid_step(*a, **k):  # Ctrl-C arrives while step 4 computes its loss, before its backward
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*a, **k)

    monkeypatch.setattr(dreambooth, "dreambooth_loss", ctrl_c_mid_step)
    with pytest.raises(KeyboardInterrupt):
        train.run(_if_args(tiny_if, photos, cut, *args))
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4, "the step Ctrl-C arrived in is finished (its weights were already changing)"
    monkeypatch.setattr(dreambooth, "dreambooth_loss", real_loss)
    train.run(_if_args(tiny_if, photos, cut, *args, "--resume"))
    a, b = _unet_state(full / "model" / "unet"), _unet_state(cut / "model" / "unet")
    assert all(torch.equal(a[k], b[k]) for k in a), "interrupted + resumed must match the uninterrupted run"
    with pytest.raises(ValueError, match="--grad-accum 1"):
        train.run(_if_args(tiny_if, photos, tmp_path / "x", "--optimizer-in-backward", "--grad-accum", "2"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_if, photos, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_loss = dreambooth.dreambooth_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        total, parts = real_loss(*a, **k)
        return (total * float("nan"), parts) if calls["n"] == 3 else (total, parts)

    monkeypatch.setattr(dreambooth, "dreambooth_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*last good checkpoint is .*checkpoint\.pt"):
        train.run(_if_args(tiny_if, photos, out, "--sr-steps", "0", "--checkpoint-every", "1"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1, ("the checkpoint of step 1 survives; step 2's weights gave the NaN at step 3, so they "
                               "are never written")
    assert all(torch.isfinite(v).all() for v in ckpt["trainable"].values())


def test_class_images_are_cached_and_resumed(tiny_if, photos, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--max-steps", "1", "--sr-steps", "0", "--num-samples", "0", "--num-class-images", "5"]
    train.run(_if_args(tiny_if, photos, out, *extra))
    folder = out / "class_images" / "a_blob"
    before = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    assert sorted(before) == [f"{i:05d}.png" for i in range(5)]
    (folder / "00003.png").unlink()  # as if the run had been killed while drawing the second batch
    capsys.readouterr()
    train.run(_if_args(tiny_if, photos, out, *extra, "--overwrite"))
    assert "drawing 2 of 5" in capsys.readouterr().out, "only the unfinished batch (images 2-3) is drawn again"
    after = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    assert after == before, "a redrawn batch must be identical to the first draw (seeded per batch)"


def test_sd_lora_run_saves_adapters_and_a_merged_public_model(tiny_sd, photos, tmp_path):
    out = tmp_path / "run"
    train.run(["--model", str(tiny_sd), "--instance-dir", str(photos), "--class-noun", "blob", "--identifier", "sks",
                "--output-dir", str(out), "--num-class-images", "2", "--class-steps", "2", "--class-sampler", "ddim",
                "--sample-steps", "2", "--num-samples", "1", "--max-steps", "2", "--lora-rank", "2",
                "--train-text-encoder", "--lr", "1e-2"])
    adapters = out / "lora" / "pytorch_lora_weights.safetensors"
    assert adapters.exists() and adapters.stat().st_size < 200_000, "LoRA adapters alone are saved (small)"
    from safetensors import safe_open
    with safe_open(str(adapters), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys), "--train-text-encoder with LoRA adapts CLIP too"
    tuned = UNet.from_pretrained(out / "model" / "unet")  # merged: plain public keys, strict load
    assert set(tuned.state_dict()) == set(_unet_state(tiny_sd / "unet"))
    assert (out / "model" / "vae").is_dir() and (out / "samples.png").exists()


@pytest.mark.parametrize("lora_rank", ["0", "2"], ids=["full", "lora"])
def test_bf16_autocast_checkpointing_and_grad_accum_run(tiny_if, photos, tmp_path, lora_rank):
    out = tmp_path / "run"
    train.run(_if_args(tiny_if, photos, out, "--gradient-checkpointing", "--grad-accum", "2", "--max-steps", "2",
                        "--sr-steps", "1", "--num-samples", "0", "--mixed-precision", "bf16",
                        "--lora-rank", lora_rank))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["trainable"].values()), \
        "trained weights (full or LoRA) stay fp32 under bf16 autocast"
    assert UNet.from_pretrained(out / "model" / "unet") is not None


# ----------------------------------------------------------------------------------------------------------------
# bad inputs

def test_missing_weights_name_the_download_command(photos, tmp_path):
    with pytest.raises(CheckpointError, match="weights_download.py"):
        train.run(["--model", str(tmp_path / "IF-I-M-v1.0"), "--instance-dir", str(photos), "--class-noun", "dog",
                    "--output-dir", str(tmp_path / "run")])


def test_class_noun_is_required_for_user_photos(photos, tmp_path):
    with pytest.raises(ValueError, match="--class-noun is required"):
        train.parse(["--instance-dir", str(photos)])


def test_unreadable_instance_image_is_named(tiny_if, photos, tmp_path):
    bad = tmp_path / "dog"
    shutil.copytree(photos, bad)
    (bad / "03.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(data.InstanceImageError, match=r"'dog/03\.jpg' cannot be read"):
        train.run(_if_args(tiny_if, bad, tmp_path / "run"))


def test_resume_without_checkpoint_and_with_other_settings_are_refused(tiny_if, photos, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="no checkpoint"):
        train.run(_if_args(tiny_if, photos, out, "--resume"))
    train.run(_if_args(tiny_if, photos, out, "--max-steps", "2", "--sr-steps", "0", "--num-samples", "0"))
    with pytest.raises(ValueError, match="prior_loss_weight"):
        train.run(_if_args(tiny_if, photos, out, "--sr-steps", "0", "--prior-loss-weight", "0.5", "--resume"))


# ----------------------------------------------------------------------------------------------------------------
# the embedded default

def test_no_arguments_means_the_toy_cascade_and_subject():
    cfg = train.parse([])
    assert cfg.family == "toy" and Path(cfg.model) == TOY / "toy-IF-I" and Path(cfg.sr_model) == TOY / "toy-IF-II"
    assert Path(cfg.instance_dir) == ROOT / "examples" / "toy_subject"
    assert cfg.class_noun == json.loads((TOY / "toy_subject.json").read_text())["class_noun"]
    assert cfg.prior_preservation and cfg.prior_loss_weight == 0.5 and cfg.sr_noise_level == 1e-5, \
        "the toy default: prior preservation (lambda 0.5, issue 17's search), SR noise augmentation 1e-5"
    assert cfg.identifier == "fw", "the toy's identifier: a candidate of the paper's search (models.FAMILY_DEFAULTS)"
    assert cfg.train_text_encoder, "the toy T5 is fine-tuned by default (lessons/08_ablations.py says why)"
    assert not train.parse(["--no-train-text-encoder"]).train_text_encoder


def test_public_backbones_keep_the_text_encoder_frozen_unless_asked(tiny_if, tiny_sd, photos):
    for model in (tiny_if[0], tiny_sd):
        args = ["--model", str(model), "--instance-dir", str(photos), "--class-noun", "dog"]
        assert not train.parse(args).train_text_encoder, f"{model.name}: T5-XXL / CLIP stay frozen"
        assert train.parse([*args, "--train-text-encoder"]).train_text_encoder


@pytest.mark.slow
def test_default_toy_run_end_to_end_in_a_few_steps(tmp_path, capsys):
    out = tmp_path / "toy"
    train.run(["--output-dir", str(out), "--max-steps", "3", "--sr-steps", "2", "--num-class-images", "2",
                "--class-steps", "2", "--num-samples", "2", "--sample-steps", "2"])
    assert str(out.resolve()) in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"subject_probability", "PRES_subject_probability", "PRES", "class_DIV", "sr_psnr_db"} <= set(metrics["toy"])
    assert UNet.from_pretrained(out / "model" / "unet").config["sample_size"] == 32
    assert UNet.from_pretrained(out / "sr_model" / "unet").config["sample_size"] == 64


# ----------------------------------------------------------------------------------------------------------------
# memory: --dry-run, --memory-budget, low-precision optimizer states

def test_dry_run_predicts_every_stage_without_training(tmp_path, capsys):
    prediction = train.run(["--dry-run", "--output-dir", str(tmp_path / "run")])
    assert {"text", "class", "base", "sr", "sample"} <= set(prediction), "each stage of the run gets a prediction"
    assert "fine-tune base" in capsys.readouterr().out and not (tmp_path / "run").exists(), \
        "--dry-run prints the table and writes nothing"


def test_a_small_memory_budget_picks_cheaper_settings(tmp_path, capsys):
    from tinybooth import memory
    full = train.run(["--dry-run"])
    budget = 0.8 * memory.needed(full)
    prediction = train.run(["--dry-run", "--memory-budget", str(int(budget))])
    out = capsys.readouterr().out
    assert "chosen:" in out and memory.needed(prediction) <= budget, out
    s = prediction["settings"]
    assert s["gradient_checkpointing"] or s["mixed_precision"] == "bf16" or s["lora_rank"], \
        f"a budget below the default's need must switch a saving on: {s}"


@pytest.mark.parametrize("states", ["bf16", "8bit"])
def test_low_precision_optimizer_states_train_bf16_weights(tiny_if, photos, tmp_path, states):
    out = tmp_path / "run"
    train.run(_if_args(tiny_if, photos, out, "--max-steps", "2", "--sr-steps", "0", "--num-samples", "0",
                       "--optimizer-states", states))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in ckpt["trainable"].values()), "bf16 weights with low-precision states"
    assert "rounding" in ckpt["rng"], "the stochastic rounding's generator is saved, so resume stays exact"
