"""Peak memory and step time of DreamBooth fine-tuning steps, as `python -m tinybooth.train` runs them.

Each setting runs tinybooth.train's own training step (eq. 2: a subject batch + a prior batch through the U-Net,
AdamW, gradient clipping) on a U-Net config with random weights, in its own subprocess so that its peak is its own:

    full        every weight trained, fp32
    full-bf16   every weight trained (fp32 master weights) under bf16 autocast, gradient checkpointing
    full-fused  full-bf16 with the optimizer step fused into backward (--optimizer-in-backward: no full set of
                gradients is ever held)
    lora        LoRA rank 4 on the attention projections, frozen base in bf16, autocast, gradient checkpointing

    python benchmarks/train_memory.py --config IF-I-M SD-1.5 --device cuda --steps 5
    python benchmarks/train_memory.py --config if-mid sd-mid --device cpu --steps 3

Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak resident size (ru_maxrss,
which includes the interpreter and torch, ~0.3-0.5 GB). The text encoder is not loaded (train.py caches the
embeddings and frees it); random text embeddings of the right width stand in for them.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinybooth import dreambooth, experiment, lora  # noqa: E402
from tinybooth.schedule import DiscreteSchedule  # noqa: E402
from tinybooth.training import LoopSettings, Trainer  # noqa: E402
from tinybooth.unet import PUBLIC_CONFIGS, UNet  # noqa: E402

MID_CONFIGS = {  # the IF-I and SD layouts at a fraction of the width, for CPU runs
    "if-mid": dict(PUBLIC_CONFIGS["IF-I-M"], block_out_channels=[64, 128, 192, 256], layers_per_block=2,
                   cross_attention_dim=256, encoder_hid_dim=512, attention_head_dim=32,
                   addition_embed_type_num_heads=8, sample_size=32),
    "sd-mid": dict(PUBLIC_CONFIGS["SD-1.5"], block_out_channels=[64, 128, 256, 256], sample_size=32),
}
SETTINGS = {"full": dict(mixed_precision="no", checkpointing=False, lora_rank=0),
            "full-bf16": dict(mixed_precision="bf16", checkpointing=True, lora_rank=0),
            "full-fused": dict(mixed_precision="bf16", checkpointing=True, lora_rank=0, in_backward=True),
            "lora": dict(mixed_precision="bf16", checkpointing=True, lora_rank=4)}


def one(config_name, setting, device, steps, batch):
    """Run `steps` training steps in this process; return {seconds per step, peak GB, trained params}."""
    config = MID_CONFIGS.get(config_name) or PUBLIC_CONFIGS[config_name]
    s = SETTINGS[setting]
    torch.manual_seed(0)
    unet = UNet.from_config(config).to(device)
    if s["checkpointing"]:
        unet.enable_gradient_checkpointing()
    frozen = torch.bfloat16 if s["mixed_precision"] == "bf16" else torch.float32
    loop = LoopSettings(max_steps=steps + 1, lr=1e-5, warmup_steps=1, mixed_precision=s["mixed_precision"],
                        optimizer_in_backward=s.get("in_backward", False), gradient_checkpointing=s["checkpointing"])
    experiment.make_trainable(unet, s["lora_rank"], lora.UNET_TARGETS, frozen)
    schedule = DiscreteSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    C, R = unet.cfg.in_channels, unet.cfg.sample_size  # the config with diffusers' defaults filled in
    text_dim = unet.cfg.encoder_hid_dim or unet.cfg.cross_attention_dim
    x, x_pr = torch.randn(batch, C, R, R, device=device), torch.randn(batch, C, R, R, device=device)
    c, c_pr = torch.randn(batch, 77, text_dim, device=device), torch.randn(batch, 77, text_dim, device=device)
    loss_fn = lambda g: dreambooth.dreambooth_loss(unet, schedule, x, c, x_pr, c_pr, 1.0, g)  # noqa: E731
    stage = Trainer("bench", {"unet": unet}, loss_fn, loop, seed=0, device=device)
    stage.train_step(None)  # warm-up (allocator, kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(steps):
        stage.train_step(None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"config": config_name, "setting": setting, "batch": f"{batch}+{batch}",
            "s_per_step": round((time.time() - t0) / steps, 3), "peak_gb": round(peak, 2),
            "trained_params_m": round(sum(p.numel() for p in stage.params.values()) / 1e6, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=["if-mid", "sd-mid"])
    p.add_argument("--setting", nargs="+", default=list(SETTINGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="subject images per step (as many prior images join)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(*args.child, args.device, args.steps, args.batch)))
        return
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}, torch "
          f"{torch.__version__}")
    print(f"{'config':8s} {'setting':10s} {'batch':>6s} {'s/step':>8s} {'peak GiB':>8s} {'trained M':>10s}")
    for config in args.config:
        for setting in args.setting:
            proc = subprocess.run([sys.executable, __file__, "--child", config, setting, "--device", args.device,
                                   "--steps", str(args.steps), "--batch", str(args.batch)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{config:8s} {setting:10s} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{config:8s} {setting:10s} {r['batch']:>6s} {r['s_per_step']:8.3f} {r['peak_gb']:8.2f} "
                  f"{r['trained_params_m']:10.2f}")


if __name__ == "__main__":
    main()
