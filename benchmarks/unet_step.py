"""Time full fine-tuning steps (forward + backward + AdamW) of tinybooth's U-Net, and of diffusers' when installed.

Both run the same config with the same random weights (diffusers' model loads tinybooth's state dict: the keys are
the same), each in its own subprocess so peak memory is its own. Figures go to benchmarks/README.md.

    python benchmarks/unet_step.py --config if-mid sd-mid --device cpu --batch 1 --steps 3 --rounds 3
    python benchmarks/unet_step.py --config IF-I-M SD-1.5 --device cuda --amp bf16 --batch 4 --steps 10
    python benchmarks/unet_step.py --config path/to/unet/config.json ...

Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak resident size (ru_maxrss), which
includes the Python interpreter and torch itself (~0.3-0.5 GB).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinybooth.unet import PUBLIC_CONFIGS, UNet  # noqa: E402

# mid-size configs for CPU runs: the IF-I and SD layouts at a fraction of the width
MID_CONFIGS = {
    "if-mid": dict(PUBLIC_CONFIGS["IF-I-M"], block_out_channels=[64, 128, 192, 256], layers_per_block=2,
                   cross_attention_dim=256, encoder_hid_dim=512, attention_head_dim=32,
                   addition_embed_type_num_heads=8, sample_size=32),
    "sd-mid": dict(PUBLIC_CONFIGS["SD-1.5"], block_out_channels=[64, 128, 256, 256], sample_size=32),
}
TEXT_LEN = 77


def get_config(name):
    if name in MID_CONFIGS:
        return MID_CONFIGS[name]
    if name in PUBLIC_CONFIGS:
        return PUBLIC_CONFIGS[name]
    with open(name) as f:
        return json.load(f)


def make_inputs(config, batch, device):
    g = torch.Generator().manual_seed(0)
    res = config.get("sample_size") or 64
    text_dim = config.get("encoder_hid_dim") or config.get("cross_attention_dim", 1280)
    x = torch.randn(batch, config.get("in_channels", 4), res, res, generator=g)
    c = torch.randn(batch, TEXT_LEN, text_dim, generator=g)
    target = torch.randn(batch, config.get("out_channels", 4), res, res, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    level = torch.full((batch,), 250) if config.get("class_embed_type") == "timestep" else None
    return [v.to(device) if v is not None else None for v in (x, t, c, target, level)]


def child(args):
    """Run one implementation and print one JSON line."""
    config = get_config(args.config)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:   # initialise the weights where they will live
        model = UNet.from_config(config)
        if args.impl == "diffusers":
            from diffusers import UNet2DConditionModel
            ref = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
            ref.load_state_dict(model.state_dict(), strict=True)
            del model
            model = ref
    if args.impl == "diffusers":
        forward = lambda x, t, c, level: model(x, t, c, class_labels=level).sample   # noqa: E731
    else:
        forward = lambda x, t, c, level: model(x, t, c, noise_level=level)           # noqa: E731
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x, t, c, target, level = make_inputs(config, args.batch, device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.mse_loss(forward(x, t, c, level).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux -> GiB
    print(json.dumps({"impl": args.impl, "step_s": min(times), "median_s": statistics.median(times),
                      "peak_gib": peak, "params": sum(p.numel() for p in model.parameters()), "loss": loss.item()}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["if-mid", "sd-mid"],
                   help=f"{list(MID_CONFIGS)}, {list(PUBLIC_CONFIGS)} or a config.json path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the implementations this many times (each in a fresh process) and keep the "
                        "fastest step: on a shared machine the minimum is the figure least disturbed by others")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both implementations")
    p.add_argument("--impl", choices=["tinybooth", "diffusers"], help=argparse.SUPPRESS)   # internal: one child
    args = p.parse_args()
    if args.impl:
        args.config = args.config[0]
        return child(args)

    try:
        import diffusers  # noqa: F401
        impls = ["tinybooth", "diffusers"]
    except ImportError:
        impls = ["tinybooth"]
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    print(f"device: {name}, torch {torch.__version__}, batch {args.batch}, amp {args.amp}, "
          f"gradient checkpointing {args.grad_ckpt}; fastest of {args.steps} steps (after {args.warmup} warm-up) "
          f"x {args.rounds} round(s)")
    for config in args.config:
        results = {}
        for _ in range(args.rounds):
            for impl in impls:
                cmd = [sys.executable, __file__, "--impl", impl, "--config", config, "--device", args.device,
                       "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--amp", args.amp] + (["--grad-ckpt"] if args.grad_ckpt else [])
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode != 0:
                    print(f"{config} {impl}: failed\n{run.stderr[-2000:]}")
                    continue
                r = json.loads(run.stdout.strip().splitlines()[-1])
                best = results.setdefault(impl, r)
                best["step_s"] = min(best["step_s"], r["step_s"])
                best["peak_gib"] = max(best["peak_gib"], r["peak_gib"])
        for impl, r in results.items():
            print(f"{config:>8} {impl:>9}: {r['params'] / 1e6:8.1f} M params  {r['step_s'] * 1000:9.1f} ms/step  "
                  f"peak {r['peak_gib']:6.2f} GiB  loss {r['loss']:.4f}", flush=True)
        if len(results) == 2:
            a, b = results["tinybooth"], results["diffusers"]
            print(f"{config:>8}     ratio: diffusers/tinybooth time {b['step_s'] / a['step_s']:.2f}x, "
                  f"peak memory {b['peak_gib'] / a['peak_gib']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
