"""The cascade: noise augmentation of the SR model's low-res input (vs diffusers' IF stage II), and the pipelines."""
import pytest
import torch
from safetensors.torch import load_file

from tinybooth import cascade
from tinybooth.schedule import DiscreteSchedule

from conftest import FIXTURES

NOISING = FIXTURES / "cascade"


@pytest.fixture(scope="module")
def noising_ref():
    return load_file(str(NOISING / "noising.safetensors"))


@pytest.fixture(scope="module")
def noising_schedule():
    return DiscreteSchedule.from_pretrained(NOISING / "noising")


def test_upsample_is_bilinear_align_corners_like_if(noising_ref):
    up = cascade.upsample(noising_ref["x_low"], 16)
    err = (up - noising_ref["upscaled"]).abs().max().item()
    assert err < 1e-6, (f"upsample must match IF's F.interpolate(bilinear, align_corners=True): max error {err:.2e}; "
                        "align_corners=False shifts the image by half a low-res pixel")
    # align_corners=True keeps the corner pixels exactly
    assert torch.equal(up[..., 0, 0], noising_ref["x_low"][..., 0, 0])
    assert torch.equal(up[..., -1, -1], noising_ref["x_low"][..., -1, -1])


@pytest.mark.task7_1
@pytest.mark.parametrize("level", [1, 100, 250, 999])
def test_noise_augment_matches_if_stage2_add_noise(noising_ref, noising_schedule, level):
    z_aug, lv = cascade.noise_augment(noising_ref["upscaled"], level, noising_schedule, noise=noising_ref["noise"])
    expected = noising_ref[f"augmented_{level}"]
    err = (z_aug - expected).abs().max().item()
    a = noising_schedule.alphas_cumprod[level].sqrt().item()
    assert err < 1e-5, (f"at IF noise level {level}, z_aug = alpha x_up + sigma eps with alpha = "
                        f"sqrt(alpha_bar[{level}]) "
                        f"= {a:.5f} of the squaredcos_cap_v2 image_noising_scheduler (diffusers' add_noise); "
                        f"max error {err:.2e}")
    assert lv.dtype == torch.long and lv.tolist() == [level, level], \
        f"the level to pass to the SR U-Net must be a LongTensor [B] of {level}, got {lv}"


@pytest.mark.task7_1
def test_noise_augment_level_zero_returns_clean_image(noising_ref, noising_schedule):
    x_up = noising_ref["upscaled"]
    z_aug, _ = cascade.noise_augment(x_up, 0, noising_schedule, noise=noising_ref["noise"])
    assert torch.equal(z_aug, x_up), "level 0 means no augmentation: the upscaled image must come back unchanged"


@pytest.mark.task7_1
def test_noise_augment_per_sample_levels_for_fine_tuning(noising_ref, noising_schedule):
    x_up, noise = noising_ref["upscaled"], noising_ref["noise"]
    z_aug, lv = cascade.noise_augment(x_up, torch.tensor([0, 250]), noising_schedule, noise=noise)
    assert torch.equal(z_aug[0], x_up[0]), "sample 0 has level 0 and must stay clean"
    err = (z_aug[1] - noising_ref["augmented_250"][1]).abs().max().item()
    assert err < 1e-5, f"sample 1 has level 250 and must match diffusers' add_noise at 250; max error {err:.2e}"


@pytest.mark.task7_1
def test_noise_augment_draws_from_generator_and_checks_range(noising_ref, noising_schedule):
    x_up = noising_ref["upscaled"]
    a, _ = cascade.noise_augment(x_up, 250, noising_schedule, generator=torch.Generator().manual_seed(3))
    b, _ = cascade.noise_augment(x_up, 250, noising_schedule, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b), "the same generator seed must give the same augmentation"
    with pytest.raises(ValueError, match="0..999"):
        cascade.noise_augment(x_up, 1000, noising_schedule)


@pytest.mark.task7_2
@pytest.mark.parametrize("t,k", [(0.0, 0), (1e-5, 0), (1e-3, 1), (0.25, 250), (1.0, 999)])
def test_level_from_continuous(t, k):
    got = cascade.level_from_continuous(t, 1000)
    assert got == k and isinstance(got, int), \
        f"the paper's continuous level t = {t} is IF's step round(t * 1000) = {k} (clamped to 999), got {got!r}"


@pytest.mark.task7_2
@pytest.mark.parametrize("k", [0, 1, 250, 999])
def test_continuous_from_level_inverts_the_mapping(k):
    t = cascade.continuous_from_level(k, 1000)
    assert t == pytest.approx(k / 1000), f"IF step {k} is continuous t = {k} / 1000, got {t}"
    assert cascade.level_from_continuous(t, 1000) == k, "the two mappings must be inverse on IF's grid"


def test_level_mapping_refuses_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cascade.level_from_continuous(1.5)
    with pytest.raises(ValueError, match="0..999"):
        cascade.continuous_from_level(1000)


def test_table_step_is_continuous_cosine_one_step_later(noising_schedule):
    """The docstring's claim: the table's alpha_bar[k] is the continuous cosine alpha_bar((k + 1) / T)."""
    from tinybooth.schedule import cosine_alpha_sigma
    for k in (0, 249, 250):
        alpha, _ = cosine_alpha_sigma((k + 1) / 1000)
        assert abs(alpha.item() ** 2 - noising_schedule.alphas_cumprod[k].item()) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# the stages against diffusers' pipelines on tiny random U-Nets (same text embeddings, same seeds)

@pytest.fixture(scope="module")
def pipes():
    import json
    from tinybooth.unet import UNet
    from tinybooth.vae import AutoencoderKL
    d = NOISING
    return dict(
        ref=load_file(str(d / "pipelines.safetensors")), meta=json.loads((d / "meta.json").read_text())["pipelines"],
        if1=UNet.from_pretrained(d / "if1" / "unet"), if2=UNet.from_pretrained(d / "if2" / "unet"),
        sd=UNet.from_pretrained(d / "sd" / "unet"), vae=AutoencoderKL.from_pretrained(d / "sd" / "vae"),
        if1_sched=DiscreteSchedule.from_pretrained(d / "if1" / "scheduler"),
        if2_sched=DiscreteSchedule.from_pretrained(d / "if2" / "scheduler"),
        noising=DiscreteSchedule.from_pretrained(d / "if2" / "image_noising_scheduler"),
        sd_sched=DiscreteSchedule.from_pretrained(d / "sd" / "scheduler"))


def close(got, expected, what, tol=1e-4):
    assert got.shape == expected.shape, f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    err = (got - expected).abs().max().item()
    assert err < tol, f"{what}: max |tinybooth - diffusers| = {err:.2e} > {tol}"


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_stage1_matches_if_pipeline(pipes, sampler):
    run, ref = pipes["meta"][f"if1_{sampler}"], pipes["ref"]
    x = cascade.sample_base(pipes["if1"], pipes["if1_sched"], ref["c"], ref["c_uncond"],
                            guidance=run["guidance_scale"], num_steps=run["num_inference_steps"], sampler=sampler,
                            generator=torch.Generator().manual_seed(run["seed"]))
    close(x, ref[f"if1_{sampler}"], f"IF stage I ({sampler}, CFG {run['guidance_scale']} on the eps half, "
                                    "variance from the conditional branch, dynamic thresholding)")


@pytest.mark.parametrize("level", [250, 100])
def test_stage2_matches_if_superresolution_pipeline(pipes, level):
    run, ref = pipes["meta"][f"if2_level{level}"], pipes["ref"]
    x = cascade.sample_super_resolution(pipes["if2"], pipes["if2_sched"], pipes["noising"], ref["if1_ancestral"],
                                        ref["c"], ref["c_uncond"], noise_level=level,
                                        guidance=run["guidance_scale"], num_steps=run["num_inference_steps"],
                                        generator=torch.Generator().manual_seed(run["seed"]))
    close(x, ref[f"if2_level{level}"], f"IF stage II at noise level {level} (upsample, noise_augment, "
                                       "concat with z_t, noise level as class label; draws: z_T, aug noise, steps)")


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_latent_path_matches_stable_diffusion_pipeline(pipes, sampler):
    run, ref = pipes["meta"][f"sd_{sampler}"], pipes["ref"]
    x = cascade.sample_latent(pipes["sd"], pipes["vae"], pipes["sd_sched"], ref["c"], ref["c_uncond"],
                              guidance=run["guidance_scale"], num_steps=run["num_inference_steps"], sampler=sampler,
                              generator=torch.Generator().manual_seed(run["seed"]))
    close((x / 2 + 0.5).clamp(0, 1), ref[f"sd_{sampler}"],
          f"SD latent path ({sampler}): latents at 1/{pipes['vae'].downscale} res, decode(z_0 / scale)")


def test_stages_take_a_timestep_list_like_the_if_pipeline(pipes):
    """timesteps=[...] as IFPipeline(timesteps=...): the grid of num_steps given as a list gives the same image."""
    from tinybooth.samplers import timesteps
    run, ref = pipes["meta"]["if1_ancestral"], pipes["ref"]
    grid = timesteps(pipes["if1_sched"], run["num_inference_steps"]).tolist()
    x = cascade.sample_base(pipes["if1"], pipes["if1_sched"], ref["c"], ref["c_uncond"],
                            guidance=run["guidance_scale"], sampler="ancestral", timesteps=grid,
                            generator=torch.Generator().manual_seed(run["seed"]))
    close(x, ref["if1_ancestral"], f"IF stage I with timesteps={grid}")


def test_guidance_one_is_the_conditional_prediction(pipes):
    ref, unet = pipes["ref"], pipes["if1"]
    z, t = torch.randn(2, 3, 8, 8), torch.tensor([500, 500])
    guided = cascade.guided_denoiser(unet, ref["c"], ref["c_uncond"], 1.0, 3)(z, t)
    with torch.no_grad():
        cond = unet(z, t, ref["c"])
    close(guided, cond, "guidance 1: eps = eps_uncond + 1 (eps_cond - eps_uncond) = eps_cond", tol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# prompts with a real (tiny, random) T5 and a SentencePiece tokenizer trained here; the embedding cache

T5_TINY = dict(model_type="t5", d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
               is_gated_act=True, dense_act_fn="gelu_new", layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1)
CAPTIONS = ["a photo of a dog", "a red star on a blue background", "a cat sitting on a mat", "the quick brown fox",
            "a small green square", "an oil painting of a dog on the beach"]


@pytest.fixture(scope="module")
def tiny_if_dir(tmp_path_factory):
    """IF stage I in the public layout: the fixture U-Net (T5 width 16) + a random T5 + a trained spiece.model."""
    import shutil
    import sentencepiece as spm
    from tinybooth.text import T5Encoder, T5Tokenizer
    root = tmp_path_factory.mktemp("tiny_if")
    shutil.copytree(NOISING / "if1", root, dirs_exist_ok=True)
    (root / "tokenizer").mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS * 10),
                                   model_prefix=str(root / "tokenizer" / "spiece"),
                                   vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (root / "tokenizer" / "spiece.vocab").unlink()
    torch.manual_seed(0)
    vocab = len(T5Tokenizer.from_pretrained(root / "tokenizer"))
    T5Encoder.from_config(dict(T5_TINY, vocab_size=vocab)).save_pretrained(root / "text_encoder")
    return root


def test_encode_prompts_caches_and_a_hit_never_loads_t5(tiny_if_dir, tmp_path, monkeypatch):
    from tinybooth import text
    cache = tmp_path / "cache"
    c, mask = cascade.encode_prompts(["A photo of a Dog ", "a red star"], tiny_if_dir, "if", cache_dir=cache)
    assert c.shape == (2, 77, 16) and mask.shape == (2, 77) and c.dtype == torch.float32
    assert mask[0].sum() < 77 and mask[0, 0] == 1, "the mask marks the tokens (1) and the padding (0)"
    assert len(list(cache.glob("*.safetensors"))) == 2 and not list(cache.glob("*.tmp"))

    def refuse(*a, **k):
        raise AssertionError("a cache hit must not load the text encoder or its tokenizer")
    monkeypatch.setattr(text.T5Encoder, "from_pretrained", refuse)
    monkeypatch.setattr(text.T5Tokenizer, "from_pretrained", refuse)
    again, _ = cascade.encode_prompts(["a photo of a dog", "a red star"], tiny_if_dir, "if", cache_dir=cache)
    assert torch.equal(again, c), "IF lower-cases and strips prompts: 'A photo of a Dog ' is 'a photo of a dog'"
    with pytest.raises(AssertionError, match="cache hit"):   # a new prompt (or another max_length) is a miss
        cascade.encode_prompts(["a red star"], tiny_if_dir, "if", cache_dir=cache, max_length=32)


def test_cached_embedding_equals_a_direct_t5_run(tiny_if_dir, tmp_path):
    from tinybooth.text import T5Encoder, T5Tokenizer
    c, _ = cascade.encode_prompts(["a cat sitting on a mat"], tiny_if_dir, "if", cache_dir=tmp_path)
    ids, mask = T5Tokenizer.from_pretrained(tiny_if_dir / "tokenizer")(["a cat sitting on a mat"], max_length=77)
    with torch.no_grad():
        direct = T5Encoder.from_pretrained(tiny_if_dir / "text_encoder")(ids, attention_mask=mask)
    assert torch.equal(c, direct), "the cache must hold exactly T5(ids, mask) (IF passes the padding mask to T5)"


def test_if_generate_end_to_end_shapes_and_seed(tiny_if_dir, tmp_path):
    from tinybooth.generate import text_to_image
    run = lambda: text_to_image(tiny_if_dir, ["a red star"], NOISING / "if2", num_images=2, seed=3,  # noqa: E731
                                  steps=1, sr_steps=1, cache_dir=tmp_path, progress=False)
    a, b = run(), run()
    assert a["stage1"].shape == (2, 3, 8, 8) and a["images"].shape == (2, 3, 16, 16), \
        "stage I at the base U-Net's sample_size (8), stage II at the SR U-Net's (16)"
    assert torch.equal(a["images"], b["images"]), "the same seed must give the same images"
    assert not torch.allclose(a["images"][0], a["images"][1]), "image i uses seed + i: the two images must differ"


CLIP_TINY = dict(model_type="clip_text_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 vocab_size=49408, pad_token_id=1, bos_token_id=49406, eos_token_id=49407, projection_dim=16)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    """SD 1.x in the public layout: the fixture U-Net and VAE + a random CLIP text model + CLIP's real BPE."""
    import shutil
    from conftest import ROOT
    from tinybooth.clip import CLIPTextEncoder
    root = tmp_path_factory.mktemp("tiny_sd")
    shutil.copytree(NOISING / "sd", root, dirs_exist_ok=True)
    shutil.copytree(ROOT / "tinybooth" / "assets" / "clip", root / "tokenizer")
    torch.manual_seed(0)
    CLIPTextEncoder.from_config(CLIP_TINY).save_pretrained(root / "text_encoder")
    return root


def test_sd_prompts_are_encoded_without_the_padding_mask(tiny_sd_dir, tmp_path):
    from tinybooth.clip import CLIPTextEncoder, CLIPTokenizer
    c, mask = cascade.encode_prompts(["a photo of a dog"], tiny_sd_dir, "sd", cache_dir=tmp_path)
    ids, _ = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")(["a photo of a dog"], max_length=77)
    with torch.no_grad():
        direct = CLIPTextEncoder.from_pretrained(tiny_sd_dir / "text_encoder")(ids)
    assert torch.equal(c, direct), ("SD's pipeline runs CLIP with its causal mask only; the U-Net reads all 77 "
                                    "outputs, padding included, so no padding mask may be passed")
    assert mask[0, :7].tolist() == [1] * 7 and mask[0, 7] == 0, "<start> a photo of a dog <end>: 7 tokens"


def test_sd_generate_end_to_end(tiny_sd_dir):
    from tinybooth.generate import text_to_image
    cache = tiny_sd_dir / "cache"   # shared with nothing else; the second run hits it
    out = text_to_image(tiny_sd_dir, ["a dog"], num_images=2, steps=1, cache_dir=cache, progress=False)
    again = text_to_image(tiny_sd_dir, ["a dog"], num_images=2, steps=1, cache_dir=cache, progress=False)
    assert out["images"].shape == (2, 3, 8, 8), "4x4 latents decoded by a x2 VAE"
    assert torch.equal(out["images"], again["images"]) and out["settings"]["sampler"] == "pndm"
