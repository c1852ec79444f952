"""The training machinery every job uses: DreamBooth's two stages and the toy model's pretraining.

One loop (`Trainer.run`) around a loss function `loss_fn(generator) -> (total, {term: value})`:

    lr warm-up (then constant or cosine)  ->  forward under autocast  ->  backward  ->  clip  ->  AdamW step  -> EMA

and what makes a long run safe to leave alone:

  * checkpoints: trained weights, optimizer, step count, history and every RNG state, written atomically (a crash
    mid-write never leaves a broken file), so `resume` continues to bit-identical weights (with deterministic
    kernels, `seed_everything(..., deterministic=True)`);
  * Ctrl-C waits for the step in flight to finish, then saves: a checkpoint never holds half an update;
  * a non-finite or exploding loss stops the run, and a checkpoint is only written once the weights it holds have
    produced a sane loss, so the one it names holds the last weights from before the blow-up;
  * optimizer in backward: each weight's AdamW step runs as soon as backward has its gradient, which is then freed,
    so a full fine-tune never holds every gradient at once.
"""
import contextlib
import functools
import math
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import files, optim
from .checkpoint import CheckpointError

EXPLODING = 1e4  # a loss this many times the median of the recent ones is a blow-up, not noise


class TrainingError(CheckpointError):
    """The run cannot go on (non-finite or exploding loss); the message says what happened and where the last good
    checkpoint is."""


@dataclass(frozen=True)
class LoopSettings:
    """How one stage is optimised."""
    max_steps: int
    lr: float
    module_lr: tuple = ()                  # ((module name, its own lr), ...): e.g. a text encoder's; others use lr
    warmup_steps: int = 0
    lr_schedule: str = "constant"          # after the warm-up: "constant" or "cosine" (to 0 at max_steps)
    weight_decay: float = 1e-2
    betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0             # None: no clipping
    grad_accum: int = 1
    mixed_precision: str = "no"            # autocast dtype: "no", "bf16" or "fp16" (trained weights stay fp32)
    gradient_checkpointing: bool = False
    optimizer_in_backward: bool = False
    optimizer_states: str = "fp32"         # AdamW's moments: "fp32", or "bf16" / "8bit" (tinybooth.optim, bf16 weights)
    checkpoint_every: int = 0              # 0: only at the end (when a checkpoint path is given)
    time_limit: float = math.inf           # seconds; the stage stops after max_steps or this, whichever first
    ema_decay: float = None                # keep an exponential moving average of the weights (pretraining)
    log_every: int = 0                     # print the mean loss every N steps (0: a progress bar instead)


# ----------------------------------------------------------------------------------------------------------------
# random number generators

def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def rng_state(generator):
    """Every random number generator a step touches, in a form torch.load(weights_only=True) reads back."""
    np_state = np.random.get_state()
    return {"train": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "python": random.getstate()}


def set_rng_state(state, generator):
    generator.set_state(state["train"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


# ----------------------------------------------------------------------------------------------------------------
# the checkpoint file

def save_checkpoint(path, payload):
    """torch.save to a temporary sibling, then rename (tinybooth.files): a crash or a full disk never leaves a broken
    checkpoint, and the previous one stays."""
    files.atomic_torch_save(payload, path)


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint: plain tensors, numbers and strings only (weights_only: never
    unpickles code)."""
    ckpt = files.load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"stage", "step", "trainable", "optimizer", "rng"} <= set(ckpt):
        raise CheckpointError(f"'{path}' is not a tinybooth checkpoint (missing entries); delete it and start "
                              f"afresh")
    return ckpt


@contextlib.contextmanager
def ctrl_c_held():
    """A Ctrl-C inside the block does not interrupt it: it is recorded in the list the block gets, for the caller to
    act on once its step is complete (outside the main thread, where signals cannot be caught, it does nothing)."""
    pressed = []
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------------------------
# optimizers

class OptimizerInBackward:
    """AdamW stepped inside backward, one weight tensor at a time.

    A normal step holds every gradient at once (4 bytes per trained weight: 3.4 GB for SD-1.5's 860 M) until
    optimizer.step(). Here a hook on each weight runs that weight's own AdamW update the moment backward has
    accumulated its gradient, then frees the gradient, so at most a few gradients exist at any time. What it
    gives up: no gradient accumulation (the weights change during backward), and clipping is per tensor
    (||g_i|| <= max_grad_norm for each tensor i) instead of over the global norm, which no moment of backward
    knows. Same update as torch.optim.AdamW otherwise (tests/test_training.py compares them).
    """

    def __init__(self, params, lr, weight_decay, max_grad_norm, betas=(0.9, 0.999), adamw=torch.optim.AdamW,
                 scales=None):
        scales = scales or {}  # {name: its lr / lr} (make_optimizer's lr_scales)
        self.optimizers = {k: adamw([{"params": [p], "lr_scale": scales.get(k, 1.0)}], lr=lr,
                                    weight_decay=weight_decay, betas=betas) for k, p in params.items()}
        self.max_grad_norm = max_grad_norm
        self.hooks = [p.register_post_accumulate_grad_hook(self._update(self.optimizers[k]))
                      for k, p in params.items()]

    def _update(self, optimizer):
        def hook(p):  # p.grad now holds this step's full gradient of p
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
            optimizer.step()
            p.grad = None  # freed: the point of stepping in backward
        return hook

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        pass  # every gradient was freed by its hook

    def state_dict(self):
        return {k: opt.state_dict() for k, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state[k])

    def remove_hooks(self):
        for h in self.hooks:
            h.remove()


def make_optimizer(params, s, rounding=None):
    """AdamW over params {name: tensor} as the settings s ask: stepped after backward or inside it, with fp32 moments
    (torch's) or low-precision ones (tinybooth.optim; `rounding` draws its stochastic rounding)."""
    adamw = torch.optim.AdamW
    if s.optimizer_states != "fp32":
        adamw = functools.partial(optim.AdamW, states=s.optimizer_states, generator=rounding)
    elif all(p.device.type == "cpu" for p in params.values()):
        # on the CPU torch's AdamW loops over the tensors (33 ms a step for the toy's 333); its fused kernel does the
        # same update in one pass (7 ms). On CUDA torch's default (foreach) stays: tinybooth.memory models it.
        adamw = functools.partial(torch.optim.AdamW, fused=True)
    scales = lr_scales(params, s)
    if s.optimizer_in_backward:
        return OptimizerInBackward(params, s.lr, s.weight_decay, s.max_grad_norm, s.betas, adamw, scales)
    groups = {}  # one parameter group per learning rate; the schedule sets each group's lr = lr_t * lr_scale
    for k, p in params.items():
        groups.setdefault(scales[k], []).append(p)
    return adamw([{"params": ps, "lr_scale": scale} for scale, ps in groups.items()], lr=s.lr,
                 weight_decay=s.weight_decay, betas=s.betas)


def lr_scales(params, s):
    """{parameter name: its learning rate / s.lr}: 1 except in the modules s.module_lr gives their own lr."""
    own = dict(s.module_lr)
    return {k: own.get(k.split(".")[0], s.lr) / s.lr for k in params}


def learning_rate(s, step):
    """Linear warm-up over s.warmup_steps, then constant or a cosine decay to 0 at s.max_steps."""
    lr = s.lr * min(1.0, (step + 1) / max(s.warmup_steps, 1))
    if s.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / s.max_steps))
    return lr


class EMA:
    """Exponential moving average of a set of modules' parameters: theta_ema <- d theta_ema + (1 - d) theta."""

    def __init__(self, modules, decay):
        import copy
        self.modules = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
        self.sources, self.decay = modules, decay

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up of the average
        for k, ema in self.modules.items():
            torch._foreach_lerp_(list(ema.parameters()), list(self.sources[k].parameters()), 1 - d)


# ----------------------------------------------------------------------------------------------------------------
# the loop

class Trainer:
    """One training stage: the trained parameters of `modules` ({name: nn.Module}), AdamW, the learning-rate
    schedule, the stage's RNG (seeded with `seed`; loss_fn draws every random number from it) and the step count.
    `run()` steps until s.max_steps; with checkpoint_path it checkpoints as it goes, and `load(checkpoint)`
    resumes. run_settings (a dict) is stored in each checkpoint so a resume can be checked against it."""

    def __init__(self, name, modules, loss_fn, s, seed, device="cpu", checkpoint_path=None, run_settings=None,
                 history=None):
        self.name, self.modules, self.loss_fn, self.s = name, modules, loss_fn, s
        self.params = {f"{k}.{n}": p for k, m in modules.items() for n, p in m.named_parameters() if p.requires_grad}
        self.generator = torch.Generator(device).manual_seed(seed)
        self.rounding = torch.Generator(device).manual_seed(seed + 7) if s.optimizer_states != "fp32" else None
        self.optimizer = make_optimizer(self.params, s, self.rounding)
        self.scaler = torch.amp.GradScaler("cuda", enabled=s.mixed_precision == "fp16")
        self.ema = EMA(modules, s.ema_decay) if s.ema_decay else None
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.run_settings, self.history = run_settings or {}, history if history is not None else []
        self.step, self.seconds, self.pending = 0, 0.0, False
        # autocast keeps a bf16/fp16 copy of every weight it casts until the step's forward ends (2 bytes per
        # weight: 1.6 GiB on SD-1.5); with checkpointing, where memory is what counts, each copy is made where
        # it is used and freed with the activations instead
        self.autocast = dict(device_type=torch.device(device).type, enabled=s.mixed_precision != "no",
                             dtype=torch.float16 if s.mixed_precision == "fp16" else torch.bfloat16,
                             cache_enabled=not s.gradient_checkpointing)

    # -- checkpoints
    def state(self, rng):
        return {"stage": self.name, "step": self.step, "finished": self.step >= self.s.max_steps,
                "trainable": {k: p.detach().cpu().clone() for k, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                "history": list(self.history), "settings": self.run_settings}

    def rng_state(self):
        """Every generator the step draws from; with low-precision states also the stochastic rounding's."""
        state = rng_state(self.generator)
        return state if self.rounding is None else {**state, "rounding": self.rounding.get_state()}

    def save(self, state=None):
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, state or self.state(self.rng_state()))

    def load(self, ckpt):
        if set(ckpt["trainable"]) != set(self.params):
            raise TrainingError(f"checkpoint '{self.checkpoint_path}' trains other weights than this run "
                                f"({len(ckpt['trainable'])} vs {len(self.params)} tensors): were --lora-rank or "
                                f"--train-text-encoder changed? Resume with the original settings")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(ckpt["trainable"][k])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], self.generator)
        if self.rounding is not None:
            self.rounding.set_state(ckpt["rng"]["rounding"])
        self.step = ckpt["step"]
        self.history[:] = ckpt["history"]

    # -- one optimizer step
    def forward(self):
        with torch.autocast(**self.autocast):
            total, parts = self.loss_fn(self.generator)
        return total, {"loss": float(total.detach()), **{k: float(v) for k, v in parts.items()}}

    def check(self, logs):
        """Stop on a non-finite or exploding loss, before its gradient touches the weights."""
        recent = [h["loss"] for h in self.history[-50:] if h["stage"] == self.name]
        loss = logs["loss"]
        exploding = recent and loss > EXPLODING * max(statistics.median(recent), 1e-12)
        if math.isfinite(loss) and not exploding:
            return
        last = (f"the last good checkpoint is '{self.checkpoint_path}', with weights from before the blow-up"
                if self.checkpoint_path and self.checkpoint_path.exists() else "no checkpoint was written yet")
        raise TrainingError(f"{self.name} loss {'exploded to' if exploding else 'became'} {loss:.4g} at step "
                            f"{self.step + 1} (terms: {logs}); stopping: {last}. Try a lower learning rate (now "
                            f"{self.s.lr:g}), --mixed-precision bf16 instead of fp16, or check the instance images")

    def train_step(self, rng_at_start):
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.s, self.step) * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        logs = {}
        for micro in range(self.s.grad_accum):
            total, parts = self.forward()
            self.check(parts)
            if micro == 0 and self.pending:  # the weights (still untouched) just gave a sane loss: keep them
                self.save(self.state(rng_at_start))
                self.pending = False
            # with the optimizer in backward the weights are updated during this call
            self.scaler.scale(total / self.s.grad_accum).backward()
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / self.s.grad_accum
        if not self.s.optimizer_in_backward:
            self.scaler.unscale_(self.optimizer)
            if self.s.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params.values(), self.s.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.step)
        return logs

    def run(self):
        """Step until max_steps (or the time limit). Ctrl-C: the step in flight completes, a checkpoint is written,
        KeyboardInterrupt goes on up."""
        for m in self.modules.values():
            m.train()
        bar = self.progress_bar()
        t0 = time.time() - self.seconds
        try:
            while self.step < self.s.max_steps and time.time() - t0 < self.s.time_limit:
                rng_at_start = self.rng_state()  # restored by a checkpoint written during this step
                with ctrl_c_held() as pressed:  # a step is never cut in half (an update half applied)
                    logs = self.train_step(rng_at_start)
                    self.after_step(logs, bar)
                if pressed:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.save()
            print(f"\ninterrupted at step {self.step}: checkpoint saved to {self.checkpoint_path}; continue with the "
                  f"same command plus --resume")
            raise
        finally:
            self.seconds = time.time() - t0
            if bar is not None:
                bar.close()
            if self.s.optimizer_in_backward:
                self.optimizer.remove_hooks()
        self.pending = False
        self.save()  # the stage's final weights
        for m in self.modules.values():
            m.eval()

    def after_step(self, logs, bar):
        self.step += 1
        self.history.append({"stage": self.name, "step": self.step, "lr": learning_rate(self.s, self.step - 1),
                             **{k: round(v, 6) for k, v in logs.items()}})
        if self.s.checkpoint_every and self.step % self.s.checkpoint_every == 0 and self.step < self.s.max_steps:
            self.pending = True  # written once the next step's loss shows these weights are sane
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        elif self.step % self.s.log_every == 0 or self.step == 1:
            mean = statistics.fmean(h["loss"] for h in self.history[-self.s.log_every:])
            print(f"{self.name} step {self.step} loss {mean:.4f} ({self.seconds_so_far():.0f} s)", flush=True)

    def progress_bar(self):
        if self.s.log_every:
            self._t_log = time.time()
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.s.max_steps, initial=self.step, desc=f"fine-tuning {self.name}", unit="step")

    def seconds_so_far(self):
        return time.time() - self._t_log

    @property
    def final_modules(self):
        """The trained modules, or their moving averages when the settings keep one."""
        return self.ema.modules if self.ema is not None else self.modules
