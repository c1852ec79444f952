"""Time full fine-tuning steps (forward + backward + AdamW) of tinybooth's U-Net, and of diffusers' when installed.

Both run the same config with the same random weights (diffusers' model loads tinybooth's state dict: the keys are
the same) and the same inputs. Figures go to benchmarks/README.md.

    python benchmarks/unet_step.py --config if-mid sd-mid --device cpu --batch 1 --steps 6
    python benchmarks/unet_step.py --config IF-I-M SD-1.5 --device cuda --amp bf16 --batch 4 --steps 10
    python benchmarks/unet_step.py --config path/to/unet/config.json ...

Timing: on a GPU each implementation runs alone in its own process (median step). On a CPU, which here is shared
with other jobs whose load comes and goes, both models live in one process and their steps alternate (A B A B ...),
so both see the same background load; the fastest step of each is reported.
Peak memory: always measured in a separate process per implementation: torch.cuda.max_memory_allocated on a GPU;
on a CPU the process's peak resident size (ru_maxrss), which includes Python and the imported libraries
(~0.3-0.5 GB; diffusers imports more).
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


def build(impl, config, device, grad_ckpt):
    """(model, forward(x, t, c, level) -> eps_hat) for 'tinybooth' or 'diffusers', weights from seed 0."""
    torch.manual_seed(0)
    with device:   # initialise the weights where they will live
        model = UNet.from_config(config)
        if impl == "diffusers":
            from diffusers import UNet2DConditionModel
            ref = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
            ref.load_state_dict(model.state_dict(), strict=True)
            model = ref
    if grad_ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    if impl == "diffusers":
        return model, lambda x, t, c, level: model(x, t, c, class_labels=level).sample
    return model, lambda x, t, c, level: model(x, t, c, noise_level=level)


def child(args):
    """Build the implementation(s) named by --impl ('both' alternates steps) and print one JSON line each."""
    config, device = get_config(args.config), torch.device(args.device)
    impls = ["tinybooth", "diffusers"] if args.impl == "both" else [args.impl]
    x, t, c, target, level = make_inputs(config, args.batch, device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {}
    for impl in impls:
        model, forward = build(impl, config, device, args.grad_ckpt)
        runs[impl] = dict(model=model, forward=forward, opt=torch.optim.AdamW(model.parameters(), lr=1e-5), times=[])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        for impl, r in runs.items():
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                r["loss"] = F.mse_loss(r["forward"](x, t, c, level).float(), target)
            r["loss"].backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            sync()
            if i >= args.warmup:
                r["times"].append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux -> GiB
    for impl, r in runs.items():
        print(json.dumps({"impl": impl, "min_s": min(r["times"]), "median_s": statistics.median(r["times"]),
                          "peak_gib": peak, "params": sum(p.numel() for p in r["model"].parameters()),
                          "loss": r["loss"].item()}))


def spawn(args, impl, config, steps, warmup):
    cmd = [sys.executable, __file__, "--impl", impl, "--config", config, "--device", args.device,
           "--batch", str(args.batch), "--steps", str(steps), "--warmup", str(warmup), "--amp", args.amp]
    run = subprocess.run(cmd + (["--grad-ckpt"] if args.grad_ckpt else []), capture_output=True, text=True)
    if run.returncode != 0:
        print(f"{config} {impl}: failed\n{run.stderr[-1500:]}", flush=True)
        return {}
    return {r["impl"]: r for r in (json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"impl'))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["if-mid", "sd-mid"],
                   help=f"{list(MID_CONFIGS)}, {list(PUBLIC_CONFIGS)} or a config.json path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both implementations")
    p.add_argument("--impl", choices=["tinybooth", "diffusers", "both"], help=argparse.SUPPRESS)   # internal
    args = p.parse_args()
    if args.impl:
        args.config = args.config[0]
        return child(args)

    try:
        import diffusers  # noqa: F401
        impls = ["tinybooth", "diffusers"]
    except ImportError:
        impls = ["tinybooth"]
    gpu = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, batch {args.batch}, amp {args.amp}, gradient checkpointing "
          f"{args.grad_ckpt}; {'median' if gpu else 'fastest'} of {args.steps} steps after {args.warmup} warm-up"
          f"{'' if gpu or len(impls) == 1 else ', implementations alternating in one process'}", flush=True)
    for config in args.config:
        results = {impl: spawn(args, impl, config, args.steps, args.warmup).get(impl) for impl in impls}
        if not gpu and len(impls) == 2:   # fair timing on a shared CPU; memory stays from the separate runs
            both = spawn(args, "both", config, args.steps, args.warmup)
            for impl in impls:
                if results.get(impl) and both.get(impl):
                    results[impl]["min_s"] = both[impl]["min_s"]
        key = "median_s" if gpu else "min_s"
        for impl, r in results.items():
            if r:
                print(f"{config:>8} {impl:>9}: {r['params'] / 1e6:8.1f} M params  {r[key] * 1000:9.1f} ms/step  "
                      f"peak {r['peak_gib']:6.2f} GiB  loss {r['loss']:.4f}", flush=True)
        if all(results.get(impl) for impl in ("tinybooth", "diffusers")):
            a, b = results["tinybooth"], results["diffusers"]
            print(f"{config:>8}     ratio: diffusers/tinybooth time {b[key] / a[key]:.2f}x, "
                  f"peak memory {b['peak_gib'] / a['peak_gib']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
