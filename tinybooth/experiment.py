"""One DreamBooth run on disk: the method (tinybooth.dreambooth) wired to a pipeline directory, a folder of photos
and an output folder, with the training machinery (tinybooth.training). `python -m tinybooth.train` calls `run`.

    1. identifier and prompts   c = "a [V] star", c_pr = "a star"
    2. class images             x_pr from the frozen model, cached as PNGs (a rerun draws only what is missing)
    3. base model               eq. (2) on subject + prior batches          -> <out>/model (public layout)
    4. super-resolution model   (IF) subject pairs, noise-augmented input   -> <out>/sr_model
    5. outputs                  samples.png, samples_cascade.png, loss.png, settings.json, metrics.json

The output folder is never silently replaced: a finished or partial run there is refused unless `resume` (continue
it) or `overwrite` is set, the input model is never written to, and every file is written atomically.
"""
import time
from pathlib import Path

import numpy as np
import torch

from . import cascade, data, dreambooth, files, lora, models, plots
from .checkpoint import CheckpointError
from .generate import encode_prompts, generate, pick_sampler, stack, super_resolve
from .training import LoopSettings, Trainer, load_checkpoint, seed_everything
from .unet import UNet

FROZEN_DTYPE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# settings a resume may change: how long to train, how often to save, what to draw afterwards, where
FREE_ON_RESUME = {"resume", "overwrite", "dry_run", "memory_budget", "output_dir", "max_steps", "sr_steps",
                  "checkpoint_every", "num_samples", "sample_steps", "sr_sample_steps", "sr_guidance",
                  "device"}
TOY_CLASS_PROMPT_SAMPLES = 16  # samples of "a star" the toy scores (class_DIV of 3 samples spans 0.19-0.33 by seed)
OUTPUTS = ("model", "sr_model", "lora", "sr_lora", "checkpoint.pt", "metrics.json", "samples.png", "loss.png")


def run(s):
    """One DreamBooth run with the settings s (an object with the attributes train's flags declare, already checked
    and filled with the family's defaults). Returns the output directory. Torch's deterministic-algorithms switch
    is put back afterwards, so a notebook or a test session keeps its own setting."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _run(s)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def _run(s):
    t_start, out = time.time(), Path(s.output_dir)
    check_output_dir(s)
    ckpt = resume_checkpoint(s)
    seed_everything(s.seed, s.deterministic)
    device, frozen_dtype = torch.device(s.device), FROZEN_DTYPE[s.mixed_precision]
    pipe = models.load_pipeline(s.model, s.sr_model, device, frozen_dtype, text_encoder=s.train_text_encoder)

    # 1. identifier and prompts
    s.identifier = s.identifier or dreambooth.choose_identifier(pipe.tokenizer, s.seed, pipe.family == "if")
    c_prompt, c_pr_prompt = dreambooth.subject_prompt(s.identifier, s.class_noun), dreambooth.class_prompt(s.class_noun)
    templates = dreambooth.TOY_TEMPLATES if s.family == "toy" else dreambooth.PUBLIC_TEMPLATES
    prompts = dreambooth.grid_prompts(s.identifier, s.class_noun, templates)
    cache = encode_prompts(pipe, list(dict.fromkeys([c_prompt, c_pr_prompt, "", *prompts])), device, frozen_dtype)

    # 2. the subject's photos and the class images
    x_inst = data.load_instance_images(s.instance_dir, pipe.resolution).to(device)  # [N, 3, R, R]
    print_settings(s, c_prompt, c_pr_prompt, pipe, len(x_inst))
    files.atomic_write_json(out / "settings.json", settings_record(s, c_prompt, c_pr_prompt))
    t0 = time.time()
    x_class = class_images(s, pipe, cache, c_pr_prompt).to(device) if s.prior_preservation else None  # [M, 3, R, R]
    timings = {"class_images_s": round(time.time() - t0, 1)}

    # 3. the base model on eq. (2), 4. the super-resolution model on subject pairs
    history = []
    t0 = time.time()
    fine_tune_base(s, pipe, cache, c_prompt, c_pr_prompt, x_inst, x_class, ckpt, history)
    timings["base_s"] = round(time.time() - t0, 1)
    if s.train_text_encoder:  # the prompts mean something new now: encode them again
        cache = encode_prompts(pipe, list(cache), device)
    t0 = time.time()
    if pipe.sr_unet is not None and s.sr_steps > 0:
        fine_tune_sr(s, pipe, cache, c_prompt, ckpt, history)
    timings["sr_s"] = round(time.time() - t0, 1)

    # 5. samples, plot, metrics
    t0 = time.time()
    metrics = {"final_loss": final_losses(history)}
    if s.num_samples > 0:
        metrics.update(sample_grids(s, pipe, cache, prompts, c_prompt, x_inst, x_class))
    plots.save_loss_plot(history, out / "loss.png")
    timings["samples_s"] = round(time.time() - t0, 1)
    metrics["timings"] = {**timings, "total_s": round(time.time() - t_start, 1)}
    files.atomic_write_json(out / "metrics.json", {"settings": settings_record(s, c_prompt, c_pr_prompt),
                                                   "sample_prompts": prompts, **metrics, "history": history})
    print_outputs(out, metrics)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the output folder

def check_output_dir(s):
    """Refuse to write over the input model, or over a finished or partial run without resume / overwrite."""
    out = Path(s.output_dir)
    for src in [s.model] + ([s.sr_model] if s.sr_model else []):
        if files.is_inside(out, src) or files.is_inside(src, out):
            raise CheckpointError(f"--output-dir '{s.output_dir}' overlaps the input model '{src}'; the input model is "
                                  f"never written to: choose another --output-dir")
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found and not (s.resume or s.overwrite):
        raise CheckpointError(f"--output-dir '{s.output_dir}' already holds a run ({', '.join(found)}); add --resume "
                              f"to continue it, --overwrite to replace it, or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)


def resume_checkpoint(s):
    """The checkpoint to continue from with --resume, after checking it belongs to these settings (the identifier
    found by the rare-token search is taken from it); None without --resume."""
    path = Path(s.output_dir) / "checkpoint.pt"
    if not s.resume:
        return None
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at '{path}'; run without --resume to start, or point "
                              f"--output-dir at the run to continue")
    ckpt = load_checkpoint(path)
    old = ckpt["settings"]
    s.identifier = s.identifier or old.get("identifier")
    changed = {k: (old.get(k), v) for k, v in vars(s).items() if k not in FREE_ON_RESUME and old.get(k) != v}
    if ckpt["stage"] == "sr" and old.get("max_steps") != s.max_steps:
        changed["max_steps"] = (old.get("max_steps"), s.max_steps)  # the base stage is over: its optimizer is gone
    if changed:
        raise CheckpointError(f"--resume: these settings differ from the checkpoint's run (checkpoint, now): "
                              f"{changed}; resume with the original settings")
    print(f"resuming the {ckpt['stage']} stage at step {ckpt['step']} from '{path}'")
    return ckpt


def class_images(s, pipe, cache, c_pr_prompt):
    """Step 2: the class images x_pr [M, 3, R, R] the settings s ask for, drawn by the frozen model into --class-dir
    (default <output-dir>/class_images/<class prompt>), or read from there when already drawn."""
    folder = Path(s.class_dir) if s.class_dir else Path(s.output_dir) / "class_images" / slug(c_pr_prompt)
    paths = dreambooth.generate_class_images(pipe, cache, c_pr_prompt, folder, s.num_class_images,
                                             s.class_batch_size, s.seed, s.class_steps, s.class_sampler, s.guidance)
    return data.load_images(paths, pipe.resolution)


def slug(text):
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


def settings_record(s, c_prompt, c_pr_prompt):
    return {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()},
            "instance_prompt": c_prompt, "class_prompt": c_pr_prompt}


# ----------------------------------------------------------------------------------------------------------------
# the two fine-tuning stages

def loop_settings(s, max_steps, lr, module_lr=()):
    return LoopSettings(max_steps=max_steps, lr=lr, module_lr=module_lr, warmup_steps=s.lr_warmup_steps,
                        lr_schedule=s.lr_schedule, weight_decay=1e-2, max_grad_norm=s.max_grad_norm,
                        grad_accum=s.grad_accum, mixed_precision=s.mixed_precision,
                        gradient_checkpointing=s.gradient_checkpointing,
                        optimizer_in_backward=s.optimizer_in_backward, optimizer_states=s.optimizer_states,
                        checkpoint_every=s.checkpoint_every)


def make_trainable(module, rank, targets, frozen_dtype, states="fp32"):
    """Full fine-tuning (every weight: fp32, or bf16 with low-precision AdamW states; autocast runs the maths in
    bf16/fp16) or LoRA adapters of this rank on the attention projections (the frozen base weights then drop to the
    mixed-precision dtype)."""
    if rank:
        lora.add_lora(module.to(frozen_dtype), rank, targets=targets)
    else:
        module.to(torch.float32 if states == "fp32" else torch.bfloat16).requires_grad_(True)
    return module


def fine_tune_base(s, pipe, cache, c_prompt, c_pr_prompt, x_inst, x_class, ckpt, history):
    """Stage "base": eq. (2) with B subject images of c and B class images of c_pr per step; saves <out>/model."""
    out, B, frozen_dtype = Path(s.output_dir), s.batch_size, FROZEN_DTYPE[s.mixed_precision]
    if ckpt is not None and ckpt["stage"] == "sr":  # the base stage had finished before the interruption
        pipe.unet = UNet.from_pretrained(out / "model" / "unet", device=s.device)
        if s.train_text_encoder:
            pipe.text_encoder = models.load_text_encoder(out / "model", pipe.family, device=s.device)[1]
        history[:] = [h for h in ckpt["history"] if h["stage"] == "base"]
        return
    if s.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    modules = {"unet": make_trainable(pipe.unet, s.lora_rank, lora.UNET_TARGETS, frozen_dtype, s.optimizer_states)}
    if s.train_text_encoder:
        modules["text_encoder"] = make_trainable(pipe.text_encoder, s.lora_rank, lora.TEXT_TARGETS, frozen_dtype,
                                                 s.optimizer_states)

    def model_space(x, generator):
        """Pixels for IF; for SD the latents z_0 = s z, z ~ q(z | x), drawn afresh each step as diffusers does."""
        if pipe.vae is None:
            return x
        with torch.no_grad():
            return pipe.vae.latents_from_images(x.to(next(pipe.vae.parameters()).dtype), generator).float()

    def loss_fn(generator):
        # a trained encoder changes every step: the two prompts are encoded again, with gradients
        text = encode_prompts(pipe, [c_prompt, c_pr_prompt], s.device, grad=True) if s.train_text_encoder else cache
        i = torch.randint(len(x_inst), (B,), generator=generator, device=generator.device).cpu()
        x, c = model_space(x_inst[i], generator), text[c_prompt].expand(B, -1, -1)
        x_pr = c_pr = None
        if x_class is not None:
            j = torch.randint(len(x_class), (B,), generator=generator, device=generator.device).cpu()
            x_pr, c_pr = model_space(x_class[j], generator), text[c_pr_prompt].expand(B, -1, -1)
        return dreambooth.dreambooth_loss(pipe.unet, pipe.schedule, x, c, x_pr, c_pr, s.prior_loss_weight,
                                          generator)

    text_lr = (("text_encoder", s.text_encoder_lr),) if s.train_text_encoder and s.text_encoder_lr else ()
    trainer = Trainer("base", modules, loss_fn, loop_settings(s, s.max_steps, s.lr, text_lr), s.seed, s.device,
                      out / "checkpoint.pt", vars(s), history)
    if ckpt is not None:
        trainer.load(ckpt)
    trainer.run()
    save_trained(pipe.path, out, "model", "lora", dict(modules), s.lora_rank, kohya=pipe.family == "sd")


def fine_tune_sr(s, pipe, cache, c_prompt, ckpt, history):
    """Stage "sr": the super-resolution model on (low-res, high-res) pairs of the subject photos, its low-res input
    noise-augmented at --sr-noise-level (the paper's continuous t, mapped to IF's step); saves <out>/sr_model."""
    out, B = Path(s.output_dir), s.batch_size
    if s.gradient_checkpointing:
        pipe.sr_unet.enable_gradient_checkpointing()
    make_trainable(pipe.sr_unet, s.lora_rank, lora.UNET_TARGETS, FROZEN_DTYPE[s.mixed_precision], s.optimizer_states)
    x_high = data.load_instance_images(s.instance_dir, pipe.sr_resolution).to(s.device)  # [N, 3, H, W]
    level, c = dreambooth.sr_level(s.sr_noise_level, pipe.noising_schedule), cache[c_prompt].expand(B, -1, -1)

    def loss_fn(generator):
        i = torch.randint(len(x_high), (B,), generator=generator, device=generator.device).cpu()
        return dreambooth.sr_loss(pipe.sr_unet, pipe.sr_schedule, x_high[i], c, pipe.resolution, level,
                                  pipe.noising_schedule, generator)

    trainer = Trainer("sr", {"sr_unet": pipe.sr_unet}, loss_fn, loop_settings(s, s.sr_steps, s.sr_lr), s.seed + 1,
                      s.device, out / "checkpoint.pt", vars(s), history)
    if ckpt is not None and ckpt["stage"] == "sr":
        trainer.load(ckpt)
    trainer.run()
    save_trained(pipe.sr_path, out, "sr_model", "sr_lora", {"unet": pipe.sr_unet}, s.lora_rank)


def save_trained(src, out, name, lora_name, trained, rank, kohya=False):
    """out/name: the personalised pipeline in the public layout. LoRA: out/lora_name holds the adapters alone (in
    the form diffusers' load_lora_weights reads; T5's as a peft adapter folder; for SD also the kohya file A1111 and
    ComfyUI read), and the merged weights go to out/name."""
    if rank and any(lora.lora_layers(m) for m in trained.values()):
        lora.save_lora(out / lora_name, trained)
        if kohya:
            lora.save_kohya_lora(out / lora_name / "lora_kohya.safetensors", trained)
        for m in trained.values():
            lora.merge_lora(m)
    models.save_pipeline(src, out / name, trained)


# ----------------------------------------------------------------------------------------------------------------
# samples and scores

def sr_sampling_level(s, pipe):
    """The IF step of the SR stage's noise augmentation when sampling: the fine-tuning level (--sr-noise-level)
    when the SR model was fine-tuned, else IF's default 250."""
    if s.sr_steps == 0:
        return cascade.IF_NOISE_LEVEL
    return dreambooth.sr_level(s.sr_noise_level, pipe.noising_schedule)


def sample_grids(s, pipe, cache, prompts, c_prompt, x_inst, x_class):
    """samples.png (the base model: where [V] is bound to the subject) and, with an SR model, samples_cascade.png;
    the toy model's scores. Returns the metrics."""
    out, n = Path(s.output_dir), s.num_samples
    toy = s.family == "toy"
    # the toy scores the class prompt on more samples than its grid row shows: its diversity is the prior's test
    n_prior = max(n, TOY_CLASS_PROMPT_SAMPLES) if toy else n
    c, c_uncond = stack(cache, [p for p in prompts[:-1] for _ in range(n)] + [prompts[-1]] * n_prior)
    sampler, sampler_from = pick_sampler(pipe.schedule, s.family)
    steps, grid = dreambooth.steps_and_grid(s.sample_steps)
    print(f"sample grid: {sampler} ({sampler_from}), {steps or grid} steps")
    images = generate(pipe, c, c_uncond, steps, s.guidance, sampler, timesteps=grid,
                      generator=torch.Generator().manual_seed(s.seed))     # [(P - 1) n + n_prior, 3, R, R]
    shown = len(prompts) * n                                               # the grid: n per prompt
    plots.save_grid(images[:shown], len(prompts), out / "samples.png", titles=prompts)
    metrics, psnr = {}, None
    if pipe.sr_unet is not None:
        level = sr_sampling_level(s, pipe)
        sr_steps, sr_grid = dreambooth.steps_and_grid(s.sr_sample_steps)
        x_sr = super_resolve(pipe, images[:shown], c[:shown], c_uncond[:shown], level, sr_steps, s.sr_guidance,
                             timesteps=sr_grid, generator=torch.Generator().manual_seed(s.seed))
        plots.save_grid(x_sr, len(prompts), out / "samples_cascade.png", titles=prompts)
        psnr = super_resolution_psnr(pipe, cache, c_prompt, s.instance_dir, level, sr_steps, sr_grid, s.sr_guidance)
    if toy:
        from .toy import evaluator, scoring
        ev = evaluator.ToyEvaluator.from_pretrained()
        per = [(p, images[i * n:(i + 1) * n].float().cpu()) for i, p in enumerate(prompts[:-1])]
        prior = images[(len(prompts) - 1) * n:].float().cpu()             # [n_prior, 3, R, R]
        before = x_class.float().cpu() if x_class is not None else None
        metrics["toy"] = scoring.score(ev, per, prior, x_inst.float().cpu(), before)
        if psnr is not None:
            metrics["toy"]["sr_psnr_db"] = round(psnr, 4)
    return metrics


@torch.no_grad()
def super_resolution_psnr(pipe, cache, c_prompt, instance_dir, level, steps, grid=None, guidance=4.0):
    """How much of the subject's detail the SR stage keeps: PSNR (dB) of SR(the real photo shrunk to the base
    resolution) against the real photo, with the instance prompt, sampled at the fine-tuning augmentation level."""
    x_high = data.load_instance_images(instance_dir, pipe.sr_resolution)  # [N, 3, H, W]
    x_low = data.resize_images(x_high, pipe.resolution)
    c, c_uncond = stack(cache, [c_prompt] * len(x_high))
    x_sr = super_resolve(pipe, x_low, c, c_uncond, level, steps, guidance, timesteps=grid,
                         generator=torch.Generator().manual_seed(0))
    mse = ((x_sr.cpu() - x_high) / 2).square().mean()  # in [0, 1] pixel units
    return float(10 * torch.log10(1 / mse))


def final_losses(history):
    """Mean of each logged term over the last 10 steps of each stage."""
    out = {}
    for stage in ("base", "sr"):
        hs = [h for h in history if h["stage"] == stage][-10:]
        if hs:
            out[stage] = {k: round(float(np.mean([h[k] for h in hs])), 5) for k in hs[0]
                          if k not in ("stage", "step", "lr")}
    return out


def print_settings(s, c_prompt, c_pr_prompt, pipe, n_photos):
    print("tinybooth.train: DreamBooth fine-tuning with these settings (saved to settings.json):")
    for k, v in vars(s).items():
        print(f"  {k:24s} {v}")
    sr = f", super-resolution {pipe.sr_resolution} px" if pipe.sr_unet is not None else ""
    print(f"  {'instance prompt':24s} '{c_prompt}'\n  {'class prompt':24s} '{c_pr_prompt}'\n"
          f"  {'model':24s} {pipe.family.upper()} pipeline, base {pipe.resolution} px{sr}\n"
          f"instance images: {n_photos} from {s.instance_dir} at {pipe.resolution} px")


def print_outputs(out, metrics):
    print(f"\ndone in {metrics['timings']['total_s']:.0f} s. Outputs in {out.resolve()}:")
    for name, what in (("model", "the personalised pipeline (public layout; loads with from_pretrained)"),
                       ("sr_model", "the personalised super-resolution model"),
                       ("lora", "the LoRA adapters (pytorch_lora_weights.safetensors)"),
                       ("samples.png", "sample grid: recontextualisation, properties, and the bare class prompt"),
                       ("samples_cascade.png", "the same samples after the super-resolution stage"),
                       ("loss.png", "subject and prior loss per step"),
                       ("metrics.json", "settings, losses, timings" + (", toy-evaluator scores"
                                                                         if "toy" in metrics else "")),
                       ("checkpoint.pt", "last checkpoint (for --resume)")):
        if (out / name).exists():
            print(f"  {name:20s} {what}")
    if "toy" in metrics:
        print(f"toy evaluator: {metrics['toy']}")
