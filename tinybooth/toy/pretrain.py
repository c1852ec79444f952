"""How the embedded default was pretrained: a tiny DeepFloyd-IF-shaped cascade on the toy world, in IF's public layout.

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
import gzip
import io
import json
import math
import random
import re
import shutil
import statistics
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinybooth.toy import world
from tinybooth.cascade import noise_augment, upsample
from tinybooth.data import resize_images
from tinybooth.loss import diffusion_loss
from tinybooth.schedule import DiscreteSchedule, predict_x_and_eps
from tinybooth.text import T5Encoder
from tinybooth.toy.evaluator import ATTRIBUTES, ToyEvaluator
from tinybooth.training import LoopSettings, Trainer
from tinybooth.unet import UNet

ASSETS = Path(__file__).resolve().parent.parent / "assets"
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


# ----------------------------------------------------------------------------------------------------------------
# data

def _render_chunk(args):
    """One worker's share (numpy and Pillow only: torch's thread pools do not survive a fork)."""
    seed, n, subject_fraction, two_colour_fraction = args
    specs = world.random_specs(np.random.default_rng(seed), n, subject_fraction, two_colour_fraction)
    return np.stack([world.render(s) for s in specs]), specs


def render_dataset(n, seed, workers, subject_fraction=0.0, chunk=1000, two_colour_fraction=0.0):
    """n rendered 64 x 64 pictures (uint8 [n, 64, 64, 3]) and their specs, in chunks seeded seed*10^6 + k."""
    jobs = [(seed * 1_000_000 + k, min(chunk, n - k * chunk), subject_fraction, two_colour_fraction)
            for k in range(math.ceil(n / chunk))]
    with Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]


class CaptionTable:
    """K random captions per picture (attributes left out at random, 10% of draws replaced by "" for guidance),
    tokenized once: `draw(idx)` gives (ids [B, L], mask [B, L]) for picture indices idx, on the device."""

    def __init__(self, specs, tokenizer, seed, device, k=4, drop_prob=0.1):
        rng = np.random.default_rng(seed)
        captions = [[world.caption(s, rng) for _ in range(k)] for s in specs]
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
    captions = [world.caption(world.random_spec(rng), rng) for _ in range(20000)]
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
    colours = list(world.COLOURS.values())
    lookalike = np.zeros(n, dtype=bool)
    for i in rng.choice(n, size=n // 10, replace=False):
        if specs[i].subject:
            continue
        a, b = rng.choice(len(colours), size=2, replace=False)
        specs[i] = world.with_attributes(specs[i], shape="star", subject=True, colour=None)
        images[i] = world.render(specs[i], halves=(colours[a], colours[b]))
        lookalike[i] = True
    labels = {a: torch.tensor([(-100 if getattr(s, a) is None else list(cfg_labels(a)).index(getattr(s, a)))
                               for s in specs]) for a in ATTRIBUTES}  # -100: no colour for two-colour stars
    labels["subject"] = torch.tensor([float(s.subject and not lk) for s, lk in zip(specs, lookalike)])
    return torch.from_numpy(images), labels


def cfg_labels(attribute):
    return {"shape": world.SHAPES, "colour": world.COLOURS, "size": world.SIZES,
            "texture": world.TEXTURES, "bg_colour": world.COLOURS}[attribute]


def train_evaluator(args, device, log):
    """Train the CNN of tinybooth.toy_evaluator; returns it (eval mode) and its held-out accuracies."""
    torch.manual_seed(args.seed)
    images, labels = evaluator_data(args.evaluator_images, args.seed + 100, args.workers)
    t0 = time.time()
    held_images, held_labels = evaluator_data(2000, args.seed + 200, args.workers)
    model = ToyEvaluator.from_config({}).to(device)
    labels = {k: v.to(device) for k, v in labels.items()}

    def loss_fn(gen):
        idx = torch.randint(len(images), (256,), generator=gen, device=device).cpu()
        x = degrade(resize_images(to_images(images, idx, device), BASE_RES), gen)
        idx = idx.to(device)
        out = model(x)
        loss = sum(F.cross_entropy(out[a], labels[a][idx], ignore_index=-100) for a in ATTRIBUTES)
        return loss + F.binary_cross_entropy_with_logits(out["subject"], labels["subject"][idx]), {}

    s = LoopSettings(max_steps=args.evaluator_steps, lr=2e-3, warmup_steps=200, lr_schedule="cosine",
                     weight_decay=1e-4, max_grad_norm=None, log_every=500)
    Trainer("evaluator", {"evaluator": model}, loss_fn, s, args.seed, device).run()
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


def train_loop(name, modules, loss_fn, steps, time_limit, lr, seed, device):
    """tinybooth.training's loop as pretraining runs it: AdamW (betas 0.9, 0.99, no weight decay) after a 200-step
    warm-up, clipping at 1, bf16 autocast on CUDA, an EMA (0.997) of the weights; stops after `steps` or `time_limit`
    seconds. Returns (the EMA copies of modules {name: module}, steps run, seconds, final loss)."""
    s = LoopSettings(max_steps=steps, lr=lr, warmup_steps=200, weight_decay=0.0, betas=(0.9, 0.99),
                     mixed_precision="bf16" if device.type == "cuda" else "no", time_limit=time_limit,
                     ema_decay=0.997, log_every=250)
    trainer = Trainer(name, modules, lambda gen: (loss_fn(gen), {}), s, seed, device)
    trainer.run()
    final = statistics.fmean(h["loss"] for h in trainer.history[-250:])
    return trainer.final_modules, trainer.step, trainer.seconds, final


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


def train_base(args, data, captions, tokenizer, device):
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

    ema, steps, seconds, loss = train_loop("base", {"t5": t5, "unet": unet}, loss_fn, args.base_steps, args.base_time,
                                           args.lr, args.seed, device)
    return ema["t5"], ema["unet"], dict(steps=steps, seconds=round(seconds, 1), final_loss=round(loss, 4))


def train_sr(args, data, captions, t5, device):
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

    ema, steps, seconds, loss = train_loop("sr", {"unet": unet}, loss_fn, args.sr_steps, args.sr_time, args.lr,
                                           args.seed + 1, device)
    return ema["unet"], dict(steps=steps, seconds=round(seconds, 1), final_loss=round(loss, 4),
                      prediction_type=schedule.prediction_type)


# ----------------------------------------------------------------------------------------------------------------
# saving in the public layout

def write_model_index(path, pipeline, components):
    index = {"_class_name": pipeline, "_diffusers_version": "0.16.0", **components,
             "_tinybooth": {"class_noun": world.SUBJECT_CLASS, "resolution": BASE_RES if pipeline == "IFPipeline"
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
