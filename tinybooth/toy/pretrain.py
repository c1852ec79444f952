"""Pretrain the embedded default: a tiny DeepFloyd-IF-shaped cascade on the toy world, saved in IF's public layout.

DreamBooth personalises a model that already has a prior (paper Sec. 3-4); on a random model there is nothing to
preserve. So the repo ships its own small pretrained text-to-image cascade, made by this command:

    python -m tinybooth.pretrain_toy --out tinybooth/assets --device cuda --seed 0

It writes, with the same classes and files as the public checkpoints (so it loads through the same code):

    toy-IF-I/    model_index.json, tokenizer/ (SentencePiece spiece.model), text_encoder/ (a tiny T5 v1.1),
                 unet/ (IF stage-I-like, 32 x 32, out_channels 6), scheduler/, TRAINING.md, results.json
    toy-IF-II/   model_index.json, unet/ (IF stage-II-like, 32 -> 64), scheduler/, image_noising_scheduler/
    toy-evaluator/  the CNN of tinybooth.toy_evaluator (prompt and subject fidelity)

The recipe, stage by stage:

1. Tokenizer: a SentencePiece unigram model (12000 pieces; T5's conventions pad 0, eos 1, unk 2, no bos, plus
   100 <extra_id_k> tokens) trained on toy captions and the ~33k whole words of CLIP's BPE vocabulary, so that
   the paper's rare-token search (ids 5000-10000) finds real short pieces.
2. Evaluator: the CNN reads shape, colour, size, texture, background colour and "is it the subject" on rendered
   pictures (with blur and noise so that it also reads generated ones).
3. Base model: the T5 encoder and the stage-I U-Net are trained together (the encoder is tiny, so it learns the toy
   language from scratch; IF's T5-XXL was pretrained on text and frozen), on 32 x 32 pictures, with
       L = || eps_hat - eps ||^2 + L_vlb
   the "hybrid" loss of Improved DDPM (Nichol & Dhariwal 2021) that IF uses: the eps-MSE of eq. (1) trains the
   first 3 output channels, and L_vlb (the KL between the true posterior q(z_s | z_t, x) and the model's, with the
   mean held fixed) trains the last 3, the learned-range variance (`variance_type: learned_range`). 10% of
   captions are replaced by "" so the model also learns the unconditional eps for classifier-free guidance.
4. Super-resolution model: T5 frozen; the stage-II U-Net learns 64 x 64 pictures given their 32 x 32 version,
   upscaled (tinybooth.cascade.upsample) and noise-augmented at a random IF level in 0..999
   (tinybooth.cascade.noise_augment, the function SR sampling and fine-tuning use), level passed as noise_level.
   Unlike IF's stage II it predicts v = alpha_t eps - sigma_t x (scheduler prediction_type "v_prediction"): the
   eps-MSE is eq. (1)'s x-hat loss weighted by SNR(t), ~0 at the noisiest steps, where only the low-res input
   tells the picture's colours, so an eps-model this small never learns to read it there (it drew sharp pictures
   in the wrong colours); the v-MSE weights the same x-hat error by SNR(t) + 1 >= 1 (lessons/07, section 6).
5. Quality bar, measured with the evaluator on >= 200 samples and written to results.json: with guidance, the base
   model draws the prompted shape, colour and background >= 90% of the time each, and the cascade's 64 x 64 output
   is sharper than bilinear upscaling of the base output (mean |Laplacian|, closer to real renders).

Weights are trained in fp32 under bf16 autocast (on CUDA), AdamW at a constant learning rate after a warm-up, and
the shipped weights are an exponential moving average (EMA) of the trained ones. Each stage stops after its step
count or its time limit, whichever comes first; results.json records the steps actually run, so
`--base-steps N --sr-steps M` with no time limits repeats a run, and `--resume` continues a stage from the weights
already in --out (the shipped base model was continued once and the SR model three times: see
toy-IF-I/TRAINING.md).
"""
import argparse
import copy
import gzip
import io
import json
import math
import os
import platform
import random
import re
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinybooth import toyworld
from tinybooth.cascade import IF_NOISE_LEVEL, guided_denoiser, noise_augment, upsample
from tinybooth.data import resize_images
from tinybooth.loss import diffusion_loss
from tinybooth.samplers import sample
from tinybooth.schedule import DiscreteSchedule, predict_x_and_eps
from tinybooth.text import T5Encoder, T5Tokenizer
from tinybooth.toy_evaluator import ATTRIBUTES, ToyEvaluator, read
from tinybooth.unet import UNet

ASSETS = Path(__file__).parent / "assets"
CLIP_VOCAB = ASSETS / "clip" / "bpe_simple_vocab_16e6.txt.gz"
BASE_RES, SR_RES, MAX_LENGTH = 32, 64, 77
SPM_PIECES, EXTRA_IDS = 12000, 100

T5_CONFIG = dict(  # a T5 v1.1 encoder (gated-GELU, RMS norm, relative position buckets), ~2.1 M params
    architectures=["T5EncoderModel"], model_type="t5", d_model=128, d_kv=32, d_ff=256, num_layers=3,
    num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    dropout_rate=0.0, layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, is_encoder_decoder=True, tie_word_embeddings=False,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, use_cache=True, torch_dtype="float32",
    vocab_size=math.ceil((SPM_PIECES + EXTRA_IDS) / 128) * 128)  # 12160: rounded up to 128 as public T5 is

_IF_UNET = dict(  # the keys every IF U-Net config shares (public DeepFloyd configs, diffusers' names)
    _class_name="UNet2DConditionModel", act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=4,
    attention_head_dim=32, center_input_sample=False, class_embed_type=None, cross_attention_norm="group_norm",
    downsample_padding=1, dropout=0.0, encoder_hid_dim=T5_CONFIG["d_model"], encoder_hid_dim_type="text_proj",
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    norm_eps=1e-5, norm_num_groups=8, only_cross_attention=False, out_channels=6, resnet_out_scale_factor=1.0,
    resnet_skip_time_act=False, resnet_time_scale_shift="scale_shift", time_embedding_act_fn=None,
    time_embedding_dim=None, time_embedding_type="positional", upcast_attention=True, use_linear_projection=False)
BASE_UNET_CONFIG = dict(  # IF-I-like, 32 x 32, ~2.4 M params
    _IF_UNET, sample_size=BASE_RES, in_channels=3, block_out_channels=[32, 64, 96], layers_per_block=1,
    cross_attention_dim=96,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"])
SR_UNET_CONFIG = dict(  # IF-II-like, 32 -> 64 (input: z_t and the upscaled low-res image), ~1.3 M params
    _IF_UNET, sample_size=SR_RES, in_channels=6, block_out_channels=[32, 48, 64], layers_per_block=[1, 1, 1],
    cross_attention_dim=64, class_embed_type="timestep", mid_block_scale_factor=1.4142135623730951,
    resnet_out_scale_factor=1.4142135623730951, resnet_skip_time_act=True, time_embedding_act_fn="gelu",
    time_embedding_dim=128, only_cross_attention=[False, False, False],
    down_block_types=["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"])
SCHEDULER_CONFIG = dict(  # IF's DDPMScheduler: cosine schedule, learned variance, dynamic thresholding
    _class_name="DDPMScheduler", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
    beta_end=0.02, prediction_type="epsilon", variance_type="learned_range", clip_sample=True, clip_sample_range=1.0,
    thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5, timestep_spacing="leading",
    steps_offset=0, trained_betas=None)
# Stage II predicts v = alpha_t eps - sigma_t x, not eps (recipe step 4 above: an eps-model never learns to read its
# low-res input at the noisiest steps, where only that input tells it the picture's colours)
SR_SCHEDULER_CONFIG = dict(SCHEDULER_CONFIG, sample_max_value=1.0, prediction_type="v_prediction")
NOISING_SCHEDULER_CONFIG = dict(SCHEDULER_CONFIG, variance_type="fixed_small", thresholding=False,
                                sample_max_value=1.0)
SR_GUIDANCE, SAMPLE_STEPS = 4.0, 50  # stage-II sampling for the quality bar (IF's stage-II pipeline defaults)
# stage-I samplings the quality bar tries: (guidance, sampler, steps, dynamic thresholding); the best feeds stage II
BASE_SAMPLINGS = ((1.0, "ddim", SAMPLE_STEPS, True), (3.0, "ddim", SAMPLE_STEPS, True),
                  (5.0, "ddim", SAMPLE_STEPS, True),
                  (2.0, "ancestral", 2 * SAMPLE_STEPS, True), (3.0, "ancestral", 2 * SAMPLE_STEPS, True),
                  (5.0, "ancestral", 2 * SAMPLE_STEPS, True), (7.0, "ancestral", 2 * SAMPLE_STEPS, True),
                  (3.0, "ancestral", 2 * SAMPLE_STEPS, False))


# ----------------------------------------------------------------------------------------------------------------
# data

def _render_chunk(args):
    """One worker's share (numpy and Pillow only: torch's thread pools do not survive a fork)."""
    seed, n, subject_fraction = args
    specs = toyworld.random_specs(np.random.default_rng(seed), n, subject_fraction)
    return np.stack([toyworld.render(s) for s in specs]), specs


def render_dataset(n, seed, workers, subject_fraction=0.0, chunk=1000):
    """n rendered 64 x 64 pictures (uint8 [n, 64, 64, 3]) and their specs, in chunks seeded seed*10^6 + k."""
    jobs = [(seed * 1_000_000 + k, min(chunk, n - k * chunk), subject_fraction) for k in range(math.ceil(n / chunk))]
    with Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]


class CaptionTable:
    """K random captions per picture (attributes left out at random, 10% of draws replaced by "" for guidance),
    tokenized once: `draw(idx)` gives (ids [B, L], mask [B, L]) for picture indices idx, on the device."""

    def __init__(self, specs, tokenizer, seed, device, k=4, drop_prob=0.1):
        rng = np.random.default_rng(seed)
        captions = [[toyworld.caption(s, rng) for _ in range(k)] for s in specs]
        unique = sorted({c for row in captions for c in row} | {""})
        where = {c: i for i, c in enumerate(unique)}
        ids, mask = tokenizer(unique, max_length=MAX_LENGTH)
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.table = torch.tensor([[where[c] for c in row] for row in captions], device=device)  # [N, k]
        self.empty, self.drop_prob, self.k = where[""], drop_prob, k

    def draw(self, idx, generator):
        col = torch.randint(self.k, idx.shape, device=idx.device, generator=generator)
        rows = self.table[idx, col]
        drop = torch.rand(idx.shape, device=idx.device, generator=generator) < self.drop_prob
        rows = torch.where(drop, torch.full_like(rows, self.empty), rows)
        return self.ids[rows], self.mask[rows]


def to_images(uint8, idx, device):
    """Pictures idx of a uint8 [N, 64, 64, 3] tensor -> float [B, 3, 64, 64] in [-1, 1] on device."""
    return uint8[idx.to(uint8.device)].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------------
# 1. tokenizer

def clip_words():
    """The whole lower-case words of CLIP's BPE vocabulary (merges whose result ends a word, '</w>')."""
    lines = gzip.open(CLIP_VOCAB, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]  # CLIP's merges
    words = {(a + b)[:-4] for a, b in (line.split() for line in lines) if (a + b).endswith("</w>")}
    return sorted(w for w in words if re.fullmatch("[a-z]+", w))


def train_tokenizer(out_dir, seed):
    """Train spiece.model (SentencePiece unigram, T5 conventions) and write the HF T5 tokenizer files."""
    import sentencepiece as spm
    r, rng = random.Random(seed), np.random.default_rng(seed)
    words = [w.capitalize() if r.random() < 0.1 else w for w in clip_words()]  # some capitals: "A sks star"
    captions = [toyworld.caption(toyworld.random_spec(rng), rng) for _ in range(20000)]
    punctuation = [f"{a}{p} {b}" for p in ",.;:!?'\"()-/&" for a, b in zip(words[::500], words[1::500])]
    corpus = words + captions + punctuation + [str(i) for i in range(1000)]
    r.shuffle(corpus)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=SPM_PIECES, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, num_threads=1, seed_sentencepiece_size=200000, minloglevel=2)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spiece.model").write_bytes(model.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>", additional_special_tokens=extra)
    config = dict(special, tokenizer_class="T5Tokenizer", extra_ids=EXTRA_IDS, model_max_length=MAX_LENGTH,
                  sp_model_kwargs={}, legacy=True, clean_up_tokenization_spaces=True)
    for name, content in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# 2. evaluator

def degrade(x, generator):
    """Evaluator augmentation: a random blur (down to 16-32 px and back) and pixel noise on some pictures, so it
    reads imperfect generated pictures as well as clean renders. x: [B, 3, 32, 32] in [-1, 1]."""
    B = x.shape[0]
    blurred = F.interpolate(F.interpolate(x, size=20, mode="bilinear", antialias=True), size=x.shape[-1],
                            mode="bilinear")
    pick = (torch.rand(B, 1, 1, 1, device=x.device, generator=generator) < 0.3).float()
    x = pick * blurred + (1 - pick) * x
    sigma = 0.08 * torch.rand(B, 1, 1, 1, device=x.device, generator=generator)
    return x + sigma * torch.randn(x.shape, device=x.device, generator=generator)


def evaluator_data(n, seed, workers):
    """World pictures, the subject anywhere (15%), and look-alikes: stars split into two world colours (10%)."""
    images, specs = render_dataset(n, seed, workers, subject_fraction=0.15)
    rng = np.random.default_rng(seed + 1)
    colours = list(toyworld.COLOURS.values())
    lookalike = np.zeros(n, dtype=bool)
    for i in rng.choice(n, size=n // 10, replace=False):
        if specs[i].subject:
            continue
        a, b = rng.choice(len(colours), size=2, replace=False)
        specs[i] = toyworld.with_attributes(specs[i], shape="star", subject=True, colour=None)
        images[i] = toyworld.render(specs[i], halves=(colours[a], colours[b]))
        lookalike[i] = True
    labels = {a: torch.tensor([(-100 if getattr(s, a) is None else list(cfg_labels(a)).index(getattr(s, a)))
                               for s in specs]) for a in ATTRIBUTES}  # -100: no colour for two-colour stars
    labels["subject"] = torch.tensor([float(s.subject and not lk) for s, lk in zip(specs, lookalike)])
    return torch.from_numpy(images), labels


def cfg_labels(attribute):
    return {"shape": toyworld.SHAPES, "colour": toyworld.COLOURS, "size": toyworld.SIZES,
            "texture": toyworld.TEXTURES, "bg_colour": toyworld.COLOURS}[attribute]


def train_evaluator(args, device, log):
    """Train the CNN of tinybooth.toy_evaluator; returns it (eval mode) and its held-out accuracies."""
    torch.manual_seed(args.seed)
    images, labels = evaluator_data(args.evaluator_images, args.seed + 100, args.workers)
    held_images, held_labels = evaluator_data(2000, args.seed + 200, args.workers)
    model = ToyEvaluator.from_config({}).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator(device).manual_seed(args.seed)
    labels = {k: v.to(device) for k, v in labels.items()}
    t0 = time.time()
    for step in range(args.evaluator_steps):
        idx = torch.randint(len(images), (256,), generator=gen, device=device).cpu()
        x = degrade(resize_images(to_images(images, idx, device), BASE_RES), gen)
        idx = idx.to(device)
        out = model(x)
        loss = sum(F.cross_entropy(out[a], labels[a][idx], ignore_index=-100) for a in ATTRIBUTES)
        loss = loss + F.binary_cross_entropy_with_logits(out["subject"], labels["subject"][idx])
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / args.evaluator_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            log(f"evaluator step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    model.eval()
    x = resize_images(to_images(held_images, torch.arange(len(held_images)), device), BASE_RES)
    with torch.no_grad():
        out = model(x)
    acc = {}
    for a in ATTRIBUTES:
        y = held_labels[a].to(device)
        keep = y != -100
        acc[a] = (out[a].argmax(1)[keep] == y[keep]).float().mean().item()
    acc["subject"] = ((out["subject"] > 0).float() == held_labels["subject"].to(device)).float().mean().item()
    log(f"evaluator held-out accuracy {acc} ({time.time() - t0:.0f} s)")
    return model, acc


# ----------------------------------------------------------------------------------------------------------------
# 3.-4. the diffusion models

def vlb_term(model_out, x, z_t, t, schedule):
    """L_vlb of Improved DDPM for the learned-range variance, per sample [B], in bits per dimension:

        KL( q(z_{t-1} | z_t, x) || p(z_{t-1} | z_t) ),  p = N(mu(z_t, x_hat.detach()), Sigma_theta)
        log Sigma_theta = frac log beta_t + (1 - frac) log beta~_t,  frac = (r + 1) / 2,  r = model_out[:, 3:]

    The mean is detached, so only the variance channels learn from it (the MSE of eq. (1) trains the mean). At t = 0 the
    true posterior variance beta~_0 = 0 is replaced by beta~_1 (the "clipped" log variance), for both sides.
    """
    C = x.shape[1]
    pred, r = model_out[:, :C].detach().float(), model_out[:, C:].float()  # prediction, variance channels
    ab = schedule.alphas_cumprod.to(x.device)
    ab_t = ab[t].view(-1, 1, 1, 1)
    x_hat, _ = predict_x_and_eps(pred, z_t.float(), ab_t.sqrt(), (1 - ab_t).sqrt(), schedule.prediction_type)
    ab_prev = torch.where(t > 0, ab[(t - 1).clamp(min=0)], torch.ones_like(ab[t])).view(-1, 1, 1, 1)
    beta = 1 - ab_t / ab_prev
    var_small = beta * (1 - ab_prev) / (1 - ab_t)  # beta~_t, the true posterior variance
    var_1 = (1 - ab[1] / ab[0]) * (1 - ab[0]) / (1 - ab[1])
    log_var_small = torch.log(torch.where(t.view(-1, 1, 1, 1) > 0, var_small, var_1))
    coef_x, coef_z = ab_prev.sqrt() * beta / (1 - ab_t), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
    mean_true, mean_model = coef_x * x.float() + coef_z * z_t.float(), coef_x * x_hat + coef_z * z_t.float()
    frac = (r + 1) / 2
    log_var_model = frac * torch.log(beta.clamp(min=1e-20)) + (1 - frac) * log_var_small
    kl = 0.5 * (-1 + log_var_model - log_var_small + torch.exp(log_var_small - log_var_model)
                + (mean_true - mean_model) ** 2 * torch.exp(-log_var_model))
    return kl.flatten(1).mean(1) / math.log(2)


class EMA:
    """Exponential moving average of a set of modules' parameters: theta_ema <- d theta_ema + (1 - d) theta."""

    def __init__(self, modules, decay):
        self.modules = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.sources, self.decay = modules, decay

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up of the average
        for ema, src in zip(self.modules, self.sources):
            torch._foreach_lerp_(list(ema.parameters()), list(src.parameters()), 1 - d)


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_loop(name, modules, params, loss_fn, steps, time_limit, lr, log, seed, device):
    """AdamW with a 200-step warm-up, EMA 0.997; stops after `steps` or `time_limit` seconds; returns
    (EMA copies of modules, steps run, seconds, final loss)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = EMA(modules, 0.997)
    gen = torch.Generator(device).manual_seed(seed)
    t0, losses, step = time.time(), [], 0
    while step < steps and time.time() - t0 < time_limit:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        with autocast(device):
            loss = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        losses.append(loss.detach())
        step += 1
        if step % 250 == 0 or step == 1:
            mean = torch.stack(losses[-250:]).mean().item()
            if not math.isfinite(mean):
                raise RuntimeError(f"{name}: the loss is {mean} at step {step}; lower --lr")
            log(f"{name} step {step} loss {mean:.4f} ({time.time() - t0:.0f} s)")
    final = torch.stack(losses[-250:]).mean().item()
    return ema.modules, step, time.time() - t0, final


def on_device(schedule, device):
    """The schedule with its tables on the device: no host-to-device copy (and GPU sync) in every step."""
    for name in ("betas", "alphas", "alphas_cumprod"):
        setattr(schedule, name, getattr(schedule, name).to(device))
    return schedule


def hybrid_loss(unet, x, c, gen, schedule, **cond):
    """Eq. (1) as IF trains it: the MSE of the prediction (eps for stage I, v for our stage II) on the first 3
    channels plus L_vlb on the variance channels."""
    t = torch.randint(schedule.num_train_timesteps, (x.shape[0],), device=x.device, generator=gen)
    eps = torch.randn(x.shape, device=x.device, generator=gen)
    z_t = schedule.q_sample(x, t, eps)
    out = unet(z_t, t, c, **cond)
    return diffusion_loss(out, x, eps, z_t, t, schedule) + vlb_term(out, x, z_t, t, schedule).mean()


def train_base(args, data, captions, tokenizer, device, log):
    """Train the T5 encoder and the stage-I U-Net together on 32 x 32 pictures (step 3 of the recipe)."""
    torch.manual_seed(args.seed)
    if args.resume:  # continue from the weights in --out
        t5 = T5Encoder.from_pretrained(Path(args.out) / "toy-IF-I" / "text_encoder", dtype=torch.float32)
        unet = UNet.from_pretrained(Path(args.out) / "toy-IF-I" / "unet", dtype=torch.float32)
    else:
        t5, unet = T5Encoder.from_config(T5_CONFIG), UNet.from_config(BASE_UNET_CONFIG)
    t5, unet = t5.to(device).train(), unet.to(device).train()
    schedule = on_device(DiscreteSchedule.from_config(SCHEDULER_CONFIG), device)

    def loss_fn(gen):
        idx = torch.randint(len(data), (args.batch_size,), generator=gen, device=device)
        x = resize_images(to_images(data, idx, device), BASE_RES)  # [B, 3, 32, 32]
        ids, mask = captions.draw(idx, gen)
        return hybrid_loss(unet, x, t5(ids, mask), gen, schedule)

    params = list(t5.parameters()) + list(unet.parameters())
    (t5, unet), steps, seconds, loss = train_loop("base", [t5, unet], params, loss_fn, args.base_steps,
                                                  args.base_time, args.lr, log, args.seed, device)
    return t5, unet, dict(steps=steps, seconds=round(seconds, 1), final_loss=round(loss, 4))


def train_sr(args, data, captions, t5, device, log):
    """Train the stage-II U-Net (32 -> 64) with the T5 encoder frozen, noise augmentation at random levels."""
    torch.manual_seed(args.seed + 1)
    unet = (UNet.from_pretrained(Path(args.out) / "toy-IF-II" / "unet", dtype=torch.float32) if args.resume
            else UNet.from_config(SR_UNET_CONFIG)).to(device).train()
    schedule = on_device(DiscreteSchedule.from_config(SR_SCHEDULER_CONFIG), device)
    noising = on_device(DiscreteSchedule.from_config(NOISING_SCHEDULER_CONFIG), device)
    t5.requires_grad_(False)

    def loss_fn(gen):
        idx = torch.randint(len(data), (args.sr_batch_size,), generator=gen, device=device)
        x = to_images(data, idx, device)  # [B, 3, 64, 64]
        x_up = upsample(resize_images(x, BASE_RES), SR_RES)  # the low-res picture, upscaled again
        level = torch.randint(noising.num_train_timesteps, (x.shape[0],), device=device, generator=gen)
        z_aug, level = noise_augment(x_up, level, noising, generator=gen)
        ids, mask = captions.draw(idx, gen)
        with torch.no_grad():
            c = t5(ids, mask)
        return hybrid_loss(lambda z, t, c_: unet(torch.cat([z, z_aug], 1), t, c_, noise_level=level), x, c, gen,
                           schedule)

    (unet,), steps, seconds, loss = train_loop("sr", [unet], list(unet.parameters()), loss_fn, args.sr_steps,
                                               args.sr_time, args.lr, log, args.seed + 1, device)
    return unet, dict(steps=steps, seconds=round(seconds, 1), final_loss=round(loss, 4),
                      prediction_type=schedule.prediction_type)


# ----------------------------------------------------------------------------------------------------------------
# 5. sampling and the quality bar

@torch.no_grad()
def encode(t5, tokenizer, prompts, device):
    ids, mask = tokenizer(prompts, max_length=MAX_LENGTH)
    return t5(ids.to(device), mask.to(device))


@torch.no_grad()
def generate(unet, schedule, c, c_uncond, guidance, generator, steps=SAMPLE_STEPS, sampler="ddim",
             low_res=None, noising=None, level=IF_NOISE_LEVEL):
    """A batch of images [B, 3, R, R] on the device from text embeddings c [B, L, D], with the cascade's guided
    denoiser; for a stage-II U-Net, low_res [B, 3, r, r] is upscaled and noise-augmented at `level` first.
    (tinybooth.cascade.sample_base / sample_super_resolution do the same one prompt at a time on the CPU.)"""
    B, device, R = c.shape[0], c.device, unet.cfg.sample_size
    extra, lv = None, None
    if low_res is not None:
        extra, lv = noise_augment(upsample(low_res, R), level, noising, generator=generator)
    denoise = guided_denoiser(unet, c, c_uncond, guidance, 3, extra_input=extra, noise_level=lv)
    with autocast(device):
        return sample(denoise, schedule, (B, 3, R, R), steps, sampler=sampler, generator=generator, device=device)


def laplacian_energy(x):
    """Mean |Laplacian| of images [B, 3, H, W] (a sharpness figure: blur lowers it), per image [B]."""
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    return F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), k).abs().reshape(x.shape[0], -1).mean(1)


def attribute_accuracy(evaluator, images, specs):
    """Per attribute, the fraction of images the evaluator reads as the spec says."""
    readings = read(evaluator, images)
    return {a: float(np.mean([r[a] == getattr(s, a) for r, s in zip(readings, specs)])) for a in ATTRIBUTES}


def measure(args, t5, tokenizer, base, sr, evaluator, device, log):
    """The quality bar (step 5 of the recipe); returns the dict written to results.json."""
    rng = np.random.default_rng(args.seed + 7)
    specs = [toyworld.random_spec(rng) for _ in range(args.num_samples)]
    prompts = [toyworld.caption(s) for s in specs]  # full captions: every attribute is asked for
    c, c_uncond = encode(t5, tokenizer, prompts, device), encode(t5, tokenizer, [""], device)
    results, gen = {"num_samples": len(specs), "base": {}}, lambda: torch.Generator(device).manual_seed(args.seed)
    real = toyworld.to_tensor([toyworld.render(s) for s in specs]).to(device)
    results["evaluator_on_renders"] = attribute_accuracy(evaluator, real, specs)
    best = None
    for guidance, sampler, steps, thresholding in BASE_SAMPLINGS:
        key = f"{sampler}{steps}_cfg{guidance:g}" + ("" if thresholding else "_nothreshold")
        if args.base_samplings != "all" and key not in args.base_samplings.split(","):
            continue  # not measured this time: results.json keeps the row measured before
        sched = on_device(DiscreteSchedule.from_config(dict(SCHEDULER_CONFIG, thresholding=thresholding)), device)
        x = generate(base, sched, c, c_uncond, guidance, gen(), steps=steps, sampler=sampler)
        acc = results["base"][key] = attribute_accuracy(evaluator, x, specs)
        log(f"base {key}: {acc}")
        score = min(acc["shape"], acc["colour"], acc["bg_colour"])  # the bar: each >= 0.9
        if best is None or score > best[0]:
            best, base_images = (score, dict(guidance=guidance, sampler=sampler, steps=steps,
                                             thresholding=thresholding, key=key)), x
    results["recommended_base_sampling"] = best[1]
    if sr is not None:
        noising = on_device(DiscreteSchedule.from_config(NOISING_SCHEDULER_CONFIG), device)
        sr_schedule = on_device(DiscreteSchedule.from_config(SR_SCHEDULER_CONFIG), device)
        sr_args = dict(steps=SAMPLE_STEPS, sampler="ancestral", noising=noising)
        x64 = generate(sr, sr_schedule, c, c_uncond, SR_GUIDANCE, gen(), low_res=base_images, **sr_args)
        bilinear = upsample(base_images, SR_RES)
        sharp = {"real_renders": laplacian_energy(real).mean().item(),
                 "cascade": laplacian_energy(x64).mean().item(),
                 "bilinear_of_base": laplacian_energy(bilinear).mean().item()}
        sharp["cascade_sharper_fraction"] = (laplacian_energy(x64) > laplacian_energy(bilinear)).float().mean().item()
        # the SR model alone on real low-res inputs: error to the true 64 px render vs bilinear upscaling
        low = resize_images(real, BASE_RES)
        sr_real = generate(sr, sr_schedule, c, c_uncond, SR_GUIDANCE, gen(), low_res=low, **sr_args)
        mse = lambda a: ((a - real) ** 2).mean().item()
        results["sr"] = dict(sharpness_mean_abs_laplacian=sharp, cascade_64px=attribute_accuracy(evaluator, x64, specs),
                             psnr_on_real_low_res={"sr": 10 * math.log10(4 / mse(sr_real)),
                                                   "bilinear": 10 * math.log10(4 / mse(upsample(low, SR_RES)))},
                             noise_level=IF_NOISE_LEVEL, guidance=SR_GUIDANCE, sampler="ancestral",
                             steps=SAMPLE_STEPS)
        log(f"sr: {results['sr']}")
        results["grids"] = dict(base=base_images[:32].cpu(), cascade=x64[:32].cpu())
    return results


# ----------------------------------------------------------------------------------------------------------------
# saving in the public layout

def write_model_index(path, pipeline, components):
    index = {"_class_name": pipeline, "_diffusers_version": "0.16.0", **components,
             "_tinybooth": {"class_noun": toyworld.SUBJECT_CLASS, "resolution": BASE_RES if pipeline == "IFPipeline"
                            else SR_RES, "trained_by": "python -m tinybooth.pretrain_toy"}}
    (Path(path) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_stage_one(out, t5, base, tokenizer_dir):
    path = Path(out) / "toy-IF-I"
    if Path(tokenizer_dir).resolve() != (path / "tokenizer").resolve():
        shutil.copytree(tokenizer_dir, path / "tokenizer", dirs_exist_ok=True)
    t5.save_pretrained(path / "text_encoder")
    base.save_pretrained(path / "unet")
    DiscreteSchedule.from_config(SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    write_model_index(path, "IFPipeline", dict(
        text_encoder=["transformers", "T5EncoderModel"], tokenizer=["transformers", "T5Tokenizer"],
        unet=["diffusers", "UNet2DConditionModel"], scheduler=["diffusers", "DDPMScheduler"],
        safety_checker=[None, None], feature_extractor=[None, None], watermarker=[None, None],
        requires_safety_checker=False))


def save_stage_two(out, sr):
    path = Path(out) / "toy-IF-II"
    sr.save_pretrained(path / "unet")
    DiscreteSchedule.from_config(SR_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    DiscreteSchedule.from_config(NOISING_SCHEDULER_CONFIG).save_pretrained(path / "image_noising_scheduler")
    write_model_index(path, "IFSuperResolutionPipeline", dict(
        unet=["diffusers", "UNet2DConditionModel"], scheduler=["diffusers", "DDPMScheduler"],
        image_noising_scheduler=["diffusers", "DDPMScheduler"], text_encoder=[None, None], tokenizer=[None, None],
        safety_checker=[None, None], feature_extractor=[None, None], watermarker=[None, None],
        requires_safety_checker=False))


def save_grid(images, path, nrow=8):
    from PIL import Image
    u = toyworld.to_uint8(images)
    n, h, w, _ = u.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * h, nrow * w, 3), 255, np.uint8)
    for i, im in enumerate(u):
        grid[(i // nrow) * h:(i // nrow + 1) * h, (i % nrow) * w:(i % nrow + 1) * w] = im
    Image.fromarray(grid).save(path)


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ASSETS), help="where toy-IF-I/, toy-IF-II/, toy-evaluator/ are written")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default="tokenizer,evaluator,base,sr,measure",
                   help="comma-separated; stages not run are loaded from --out")
    p.add_argument("--num-images", type=int, default=150_000, help="rendered training pictures")
    p.add_argument("--evaluator-images", type=int, default=60_000)
    p.add_argument("--evaluator-steps", type=int, default=1500)
    # the first shipped run stopped on its time limits (--base-time 285 --sr-time 125 on an H100) after these steps
    p.add_argument("--base-steps", type=int, default=2266)
    p.add_argument("--sr-steps", type=int, default=886)
    p.add_argument("--base-time", type=float, default=math.inf, help="time limit of the base stage, seconds")
    p.add_argument("--sr-time", type=float, default=math.inf, help="time limit of the SR stage, seconds")
    p.add_argument("--batch-size", type=int, default=1024, help="base model batch (large: small models are "
                   "launch-bound on a GPU, so a big batch is nearly free)")
    p.add_argument("--sr-batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-samples", type=int, default=256, help="samples for the quality bar (>= 200)")
    p.add_argument("--base-samplings", default="all",
                   help="stage-I samplings the quality bar measures, e.g. ancestral100_cfg5 (the others keep the "
                        "figures results.json already holds; the best measured one feeds stage II)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--log", default=None, help="also append the log to this file")
    p.add_argument("--resume", action="store_true",
                   help="start the base / SR stages from the weights already in --out (a run continued)")
    args = p.parse_args(argv)
    stages, device, out = args.stages.split(","), torch.device(args.device), Path(args.out)
    t_start = time.time()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    def log(msg):
        line = f"[{time.time() - t_start:7.1f} s] {msg}"
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")

    results_file = out / "toy-IF-I" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results.setdefault("stages", {})
    machine = f"{platform.node()} {platform.processor() or platform.machine()}, " + (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores")
    tok_dir = out / "toy-IF-I" / "tokenizer"
    if "tokenizer" in stages:
        train_tokenizer(tok_dir, args.seed)
        results["stages"]["tokenizer"] = dict(pieces=SPM_PIECES, extra_ids=EXTRA_IDS, seed=args.seed)
        log("tokenizer trained")
    tokenizer = T5Tokenizer.from_pretrained(tok_dir)
    if "evaluator" in stages:
        evaluator, acc = train_evaluator(args, device, log)
        evaluator.save_pretrained(out / "toy-evaluator")
        results["stages"]["evaluator"] = dict(steps=args.evaluator_steps, images=args.evaluator_images,
                                              held_out_accuracy=acc, machine=machine)
    if "base" in stages or "sr" in stages:
        t0 = time.time()
        data, specs = render_dataset(args.num_images, args.seed, args.workers)
        data = torch.from_numpy(data).to(device)  # 150k pictures: 1.8 GB of uint8, kept on the GPU
        captions = CaptionTable(specs, tokenizer, args.seed, device)
        log(f"rendered {len(data)} pictures, {len(captions.ids)} distinct captions ({time.time() - t0:.0f} s)")
    if "base" in stages:
        t5, base, info = train_base(args, data, captions, tokenizer, device, log)
        save_stage_one(out, t5, base, tok_dir)
        results["stages"]["base"] = dict(info, batch_size=args.batch_size, lr=args.lr, images=args.num_images,
                                         seed=args.seed, machine=machine,
                                         continues=results["stages"].get("base") if args.resume else None)
    if "sr" in stages or "measure" in stages:
        t5 = T5Encoder.from_pretrained(out / "toy-IF-I" / "text_encoder", device=device).eval()
    if "sr" in stages:
        sr, info = train_sr(args, data, captions, t5, device, log)
        save_stage_two(out, sr)
        results["stages"]["sr"] = dict(info, continues=results["stages"].get("sr") if args.resume else None,
                                       batch_size=args.sr_batch_size, lr=args.lr, images=args.num_images,
                                       seed=args.seed + 1, machine=machine)
    if "measure" in stages:
        evaluator = ToyEvaluator.from_pretrained(out / "toy-evaluator", device=device).eval()
        base = UNet.from_pretrained(out / "toy-IF-I" / "unet", device=device).eval()
        sr = (UNet.from_pretrained(out / "toy-IF-II" / "unet", device=device).eval()
              if (out / "toy-IF-II" / "unet").exists() else None)
        quality = measure(args, t5, tokenizer, base, sr, evaluator, device, log)
        for name, images in quality.pop("grids", {}).items():
            save_grid(images, out / "toy-IF-I" / f"samples_{name}.png")
        previous = results.get("quality", {}) if args.base_samplings != "all" else {}  # rows not measured now
        measured = {k: dict(v, machine=machine) for k, v in quality.pop("base").items()}
        results["quality"] = dict(previous, **quality, base={**previous.get("base", {}), **measured}, machine=machine)
    results.setdefault("wall_time_s", {})[args.stages] = round(time.time() - t_start, 1)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    log(f"done; results in {results_file}")


if __name__ == "__main__":
    main()
