"""The denoiser x_hat_theta(z_t, t, c): one U-Net class that builds itself from a public `unet/config.json`.

DreamBooth fine-tunes this network (paper eq. 1-2): given a noisy image z_t = alpha_t x + sigma_t eps, the step t
and the text embedding c, it predicts the noise eps (IF also predicts a variance interpolation: out_channels 6).

    sample [B, C_in, H, W] -- conv_in --> down blocks (ResBlocks [+ attention], downsample) --> mid block
        --> up blocks (ResBlocks [+ attention] on [x ; skip], upsample) -- GN, act, conv_out --> [B, C_out, H, W]
    every down-path output is kept and concatenated back, in reverse order, on the up path (the skip connections)
    emb = MLP(sinusoid(t)) [+ MLP(sinusoid(noise_level))] [+ pooled text]  conditions every ResBlock

Three public families are built from the same pieces (tinybooth/unet_blocks.py), chosen by the config's block types:

  * DeepFloyd IF stage I (64 px) and stage II (64 -> 256 px super-resolution; its input is [z_t ; upscaled low-res
    image], 6 channels, and the low-res image's noise-augmentation level enters as `noise_level`):
    ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D / UNetMidBlock2DSimpleCrossAttn / SimpleCrossAttnUpBlock2D
    / ResnetUpsampleBlock2D: resampling ResBlocks with scale-shift time conditioning, added-KV text attention.
  * Stable Diffusion 1.x (64x64x4 latents): CrossAttnDownBlock2D / DownBlock2D / UNetMidBlock2DCrossAttn /
    UpBlock2D / CrossAttnUpBlock2D: ResBlocks, strided-conv resampling, a small transformer per attention layer.

Module and attribute names follow the public (diffusers) checkpoints, so `state_dict()` keys and shapes are those of
`diffusion_pytorch_model.safetensors` one-to-one and a fine-tuned model saved here loads in diffusers. One naming
trap of the public configs: `attention_head_dim` is the *width* of a head in IF blocks and the *number* of heads in
SD blocks (a historical misnomer the configs keep).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from tinybooth import checkpoint as ckpt
from tinybooth.errors import UserError
from tinybooth.unet_blocks import (ACTIVATIONS, AddedKVAttention, Downsample2D, ResnetBlock2D, TextTimeEmbedding,
                                   TimestepEmbedding, Transformer2DModel, Upsample2D, activation, timestep_embedding)

WEIGHTS_STEM = "diffusion_pytorch_model"

# block type -> (attention kind, resampling kind). "added_kv" + "resnet": IF; "transformer" + "conv": SD.
DOWN_BLOCKS = {"ResnetDownsampleBlock2D": (None, "resnet"), "SimpleCrossAttnDownBlock2D": ("added_kv", "resnet"),
               "DownBlock2D": (None, "conv"), "CrossAttnDownBlock2D": ("transformer", "conv")}
UP_BLOCKS = {"ResnetUpsampleBlock2D": (None, "resnet"), "SimpleCrossAttnUpBlock2D": ("added_kv", "resnet"),
             "UpBlock2D": (None, "conv"), "CrossAttnUpBlock2D": ("transformer", "conv")}
MID_BLOCKS = {"UNetMidBlock2DSimpleCrossAttn": "added_kv", "UNetMidBlock2DCrossAttn": "transformer", None: None}

# The published configs (public unet/config.json files, keys that differ from the defaults of UNetConfig).
# Used for meta-device parameter counts (tests, lesson 05) and benchmarks; loading always reads config.json.
_IF_I = dict(act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=64, attention_head_dim=64,
             cross_attention_norm="group_norm", encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
             in_channels=3, out_channels=6, layers_per_block=3, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
             resnet_time_scale_shift="scale_shift", sample_size=64,
             down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
             up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"])
PUBLIC_CONFIGS = {
    # IF-I-M-sized: the IF-I-XL pattern with IF-I-M's width 192 (published as "400M"; this dict, reconstructed and
    # not checked against the published file, has 371,605,830 params)
    "IF-I-M": dict(_IF_I, block_out_channels=[192, 384, 576, 768], cross_attention_dim=768),
    # DeepFloyd/IF-I-XL-v1.0: 4,304,695,110 params, 775 tensors
    "IF-I-XL": dict(_IF_I, block_out_channels=[704, 1408, 2112, 2816], cross_attention_dim=2816),
    # DeepFloyd/IF-II-L-v1.0: 1,243,277,190 params, 939 tensors
    "IF-II-L": dict(_IF_I, in_channels=6, sample_size=256, block_out_channels=[160, 320, 640, 960, 1280],
                    layers_per_block=[2, 2, 3, 5, 5], cross_attention_dim=1280, class_embed_type="timestep",
                    mid_block_scale_factor=1.4142135623730951, resnet_out_scale_factor=1.4142135623730951,
                    resnet_skip_time_act=True, time_embedding_act_fn="gelu", time_embedding_dim=1280,
                    only_cross_attention=[False, False, False, False, False],
                    down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
                    up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3),
    # runwayml/stable-diffusion-v1-5: 859,520,964 params, 686 tensors
    "SD-1.5": dict(sample_size=64, cross_attention_dim=768),
}


@dataclass(frozen=True)
class UNetConfig:
    """The fields of a public UNet2DConditionModel config.json, with their published defaults."""
    sample_size: object = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: object = False           # bool or one per block
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: object = 2                   # int or one per block
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: object = 1280             # int or one per block
    transformer_layers_per_block: object = 1       # int or one per block
    reverse_transformer_layers_per_block: object = None
    encoder_hid_dim: int = None
    encoder_hid_dim_type: str = None
    attention_head_dim: object = 8                 # int or one per block (IF: head width; SD: number of heads)
    num_attention_heads: object = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str = None
    addition_embed_type: str = None
    addition_time_embed_dim: int = None
    num_class_embeds: int = None
    upcast_attention: bool = False                 # no effect: SDPA kernels accumulate the softmax in fp32
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int = None
    time_embedding_act_fn: str = None
    timestep_post_act: str = None
    time_cond_proj_dim: int = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool = None
    cross_attention_norm: str = None
    addition_embed_type_num_heads: int = 64

    @classmethod
    def from_dict(cls, config):
        """Validate a config.json dict (keys starting with '_' are metadata) and refuse what tinybooth lacks."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
        if unknown:
            raise UserError(f"unsupported U-Net config field(s) {unknown}: tinybooth builds UNet2DConditionModel "
                             f"configs of the IF and SD 1.x families only")
        cfg = cls(**{k: v for k, v in config.items() if k in known})
        cfg.check()
        return cfg

    def check(self):
        def refuse(field, allowed):
            value = getattr(self, field)
            if value not in allowed:
                raise UserError(f"unsupported U-Net config value {field}={value!r}; tinybooth supports {allowed}")
        for field in ("num_attention_heads", "reverse_transformer_layers_per_block", "addition_time_embed_dim",
                      "num_class_embeds", "time_cond_proj_dim", "projection_class_embeddings_input_dim"):
            refuse(field, [None])
        refuse("dual_cross_attention", [False])
        refuse("time_embedding_type", ["positional"])
        refuse("attention_type", ["default"])
        refuse("encoder_hid_dim_type", [None, "text_proj"])
        refuse("class_embed_type", [None, "timestep"])
        refuse("addition_embed_type", [None, "text"])
        refuse("cross_attention_norm", [None, "group_norm"])
        refuse("resnet_time_scale_shift", ["default", "scale_shift"])
        refuse("mid_block_type", list(MID_BLOCKS))
        for field in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
            refuse(field, ([] if field == "act_fn" else [None]) + list(ACTIVATIONS))
        for t in self.down_block_types:
            if t not in DOWN_BLOCKS:
                raise UserError(f"unsupported down_block_types entry {t!r}; tinybooth supports {list(DOWN_BLOCKS)}")
        for t in self.up_block_types:
            if t not in UP_BLOCKS:
                raise UserError(f"unsupported up_block_types entry {t!r}; tinybooth supports {list(UP_BLOCKS)}")
        if not isinstance(self.norm_num_groups, int):
            raise UserError(f"unsupported U-Net config value norm_num_groups={self.norm_num_groups!r}; need an int")
        if self.encoder_hid_dim_type and self.encoder_hid_dim is None:
            raise UserError("encoder_hid_dim_type is set but encoder_hid_dim is not; give the text encoder's width")
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise UserError(f"down_block_types ({n}), up_block_types ({len(self.up_block_types)}) and "
                             f"block_out_channels ({len(self.block_out_channels)}) must have the same length")
        for field in ("only_cross_attention", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                      "transformer_layers_per_block"):
            value = getattr(self, field)
            if isinstance(value, (list, tuple)):
                if len(value) != n:
                    raise UserError(f"{field} has {len(value)} entries; it needs one per block ({n})")
                if any(isinstance(v, (list, tuple)) for v in value):
                    raise UserError(f"unsupported U-Net config value {field}={value!r}: nested lists")

    def per_block(self, field):
        """A config value as one entry per down block (ints and bools are repeated)."""
        value = getattr(self, field)
        return list(value) if isinstance(value, (list, tuple)) else [value] * len(self.down_block_types)

    @property
    def time_embed_dim(self):
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


# ----------------------------------------------------------------------------------------------------------------
# the blocks of one resolution

class Block(nn.Module):
    """Base of the down/mid/up blocks: runs a layer, through activation checkpointing when it is enabled."""
    gradient_checkpointing = False

    def run(self, layer, *args):
        # IF's attention layers are stored, not recomputed: scaled_dot_product_attention keeps little for backward
        # (q, k, v, the output), so recomputing them would cost more time than the memory it frees (diffusers
        # checkpoints IF blocks the same way; SD's transformer layers hold far more and are recomputed)
        recompute = not isinstance(layer, AddedKVAttention)
        if self.gradient_checkpointing and recompute and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


def make_resnet(cfg, in_ch, out_ch, temb_dim, if_style, scale, up=False, down=False):
    """A ResBlock of this config. IF-style blocks take resnet_skip_time_act; SD-style blocks ignore it (as the
    reference does)."""
    return ResnetBlock2D(in_ch, out_ch, temb_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                         cfg.resnet_time_scale_shift, skip_time_act=if_style and cfg.resnet_skip_time_act,
                         output_scale_factor=scale, dropout=cfg.dropout, up=up, down=down)


def make_attention(cfg, kind, ch, head_setting, cross_dim, only_cross, transformer_layers):
    if kind == "added_kv":   # head_setting = width of a head (None: one head)
        return AddedKVAttention(ch, head_setting or ch, cross_dim, cfg.norm_num_groups, only_cross,
                                cfg.cross_attention_norm)
    return Transformer2DModel(ch, head_setting, cross_dim, cfg.norm_num_groups, transformer_layers,
                              cfg.use_linear_projection, only_cross)   # head_setting = number of heads


class DownBlock(Block):
    """One encoder resolution: n x (ResBlock [-> attention]) [-> downsample]. Every output is a skip."""

    def __init__(self, cfg, kind, in_ch, out_ch, n, temb_dim, head_setting, cross_dim, only_cross,
                 transformer_layers, add_downsample):
        super().__init__()
        attn, resample = DOWN_BLOCKS[kind]
        self.if_style = resample == "resnet"
        scale = cfg.resnet_out_scale_factor if self.if_style else 1.0
        self.resnets = nn.ModuleList(make_resnet(cfg, in_ch if i == 0 else out_ch, out_ch, temb_dim, self.if_style,
                                                 scale) for i in range(n))
        if attn:
            self.attentions = nn.ModuleList(make_attention(cfg, attn, out_ch, head_setting, cross_dim, only_cross,
                                                           transformer_layers) for _ in range(n))
        else:
            self.attentions = None
        if add_downsample and self.if_style:
            self.downsamplers = nn.ModuleList([make_resnet(cfg, out_ch, out_ch, temb_dim, True, scale, down=True)])
        elif add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)])
        else:
            self.downsamplers = None

    def forward(self, x, emb, c, text_bias):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self.run(resnet, x, emb)
            if self.attentions is not None:
                x = self.run(self.attentions[i], x, c, text_bias)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.run(self.downsamplers[0], *((x, emb) if self.if_style else (x,)))   # [B, C, H/2, W/2]
            skips.append(x)
        return x, skips


class MidBlock(Block):
    """The bottleneck: ResBlock -> attention -> ResBlock (residuals scaled by mid_block_scale_factor)."""

    def __init__(self, cfg, kind, ch, temb_dim, head_setting, cross_dim, only_cross, transformer_layers):
        super().__init__()
        if_style = kind == "added_kv"
        self.resnets = nn.ModuleList(make_resnet(cfg, ch, ch, temb_dim, if_style, cfg.mid_block_scale_factor)
                                     for _ in range(2))
        # (the reference's SD mid block ignores only_cross_attention)
        self.attentions = nn.ModuleList([make_attention(cfg, kind, ch, head_setting, cross_dim,
                                                        if_style and only_cross, transformer_layers)])

    def forward(self, x, emb, c, text_bias):
        x = self.run(self.resnets[0], x, emb)
        x = self.run(self.attentions[0], x, c, text_bias)
        return self.run(self.resnets[1], x, emb)


class UpBlock(Block):
    """One decoder resolution: n x ([x ; skip] -> ResBlock [-> attention]) [-> upsample]."""

    def __init__(self, cfg, kind, in_ch, prev_ch, out_ch, n, temb_dim, head_setting, cross_dim, only_cross,
                 transformer_layers, add_upsample):
        super().__init__()
        attn, resample = UP_BLOCKS[kind]
        self.if_style = resample == "resnet"
        scale = cfg.resnet_out_scale_factor if self.if_style else 1.0
        # ResBlock i reads [x ; skip]: x has prev_ch channels (the block below), then out_ch; the skips have out_ch,
        # except the last, which is the input of this resolution's down block (in_ch channels)
        x_ch, skip_ch = [prev_ch] + [out_ch] * (n - 1), [out_ch] * (n - 1) + [in_ch]
        self.resnets = nn.ModuleList(make_resnet(cfg, x_ch[i] + skip_ch[i], out_ch, temb_dim, self.if_style, scale)
                                     for i in range(n))
        if attn:
            self.attentions = nn.ModuleList(make_attention(cfg, attn, out_ch, head_setting, cross_dim, only_cross,
                                                           transformer_layers) for _ in range(n))
        else:
            self.attentions = None
        if add_upsample and self.if_style:
            self.upsamplers = nn.ModuleList([make_resnet(cfg, out_ch, out_ch, temb_dim, True, scale, up=True)])
        elif add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])
        else:
            self.upsamplers = None

    def forward(self, x, skips, emb, c, text_bias):
        """skips: the list of down-path outputs; this block pops the ones it consumes (last first)."""
        for i, resnet in enumerate(self.resnets):
            # BEGIN ASSIGN 6.5
            # HINT: concatenate the most recent skip (skips.pop()) to x along channels, then run the ResBlock
            x = torch.cat([x, skips.pop()], dim=1)                            # [B, C + C_skip, H, W]
            x = self.run(resnet, x, emb)
            # END ASSIGN 6.5
            if self.attentions is not None:
                x = self.run(self.attentions[i], x, c, text_bias)
        if self.upsamplers is not None:
            if self.if_style:
                x = self.run(self.upsamplers[0], x, emb)                      # [B, C, 2H, 2W]
            else:   # to the size of the next skip (odd sizes round as on the way down)
                x = self.run(self.upsamplers[0], x, skips[-1].shape[-2:])
        return x


# ----------------------------------------------------------------------------------------------------------------
# the U-Net

class UNet(nn.Module):
    """x_hat_theta(z_t, t, c): see the module docstring. Build with from_config / from_pretrained."""

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        self.cfg = cfg = UNetConfig.from_dict(config)
        ch = list(cfg.block_out_channels)
        n = len(ch)
        temb_dim = cfg.time_embed_dim * (2 if cfg.class_embeddings_concat else 1)   # what the ResBlocks receive

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, cfg.act_fn, cfg.timestep_post_act)
        text_dim = cfg.encoder_hid_dim
        self.encoder_hid_proj = nn.Linear(text_dim, cfg.cross_attention_dim) if text_dim is not None else None
        self.class_embedding = (TimestepEmbedding(ch[0], cfg.time_embed_dim, cfg.act_fn)
                                if cfg.class_embed_type == "timestep" else None)
        if cfg.addition_embed_type == "text":   # pooled raw text (before encoder_hid_proj)
            self.add_embedding = TextTimeEmbedding(text_dim or cfg.cross_attention_dim, cfg.time_embed_dim,
                                                   cfg.addition_embed_type_num_heads)
        self.time_embed_act = activation(cfg.time_embedding_act_fn) if cfg.time_embedding_act_fn else None

        only_cross = cfg.per_block("only_cross_attention")
        mid_only_cross = cfg.mid_block_only_cross_attention
        if mid_only_cross is None:   # a single bool also applies to the mid block; a per-block list does not
            mid_only_cross = cfg.only_cross_attention if isinstance(cfg.only_cross_attention, bool) else False
        layers, cross_dim = cfg.per_block("layers_per_block"), cfg.per_block("cross_attention_dim")
        heads, t_layers = cfg.per_block("attention_head_dim"), cfg.per_block("transformer_layers_per_block")

        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, kind, in_ch=ch[max(i - 1, 0)], out_ch=ch[i], n=layers[i], temb_dim=temb_dim,
                      head_setting=heads[i], cross_dim=cross_dim[i], only_cross=only_cross[i],
                      transformer_layers=t_layers[i], add_downsample=i < n - 1)
            for i, kind in enumerate(cfg.down_block_types))
        kind = MID_BLOCKS[cfg.mid_block_type]
        self.mid_block = MidBlock(cfg, kind, ch[-1], temb_dim, heads[-1], cross_dim[-1], mid_only_cross,
                                  t_layers[-1]) if kind else None
        # up block i works at the resolution of down block n-1-i, so it reads the per-block settings reversed,
        # with one quirk kept from the reference: the head *width* of IF blocks is not reversed (heads[i]).
        rch, rlayers, rheads = ch[::-1], layers[::-1], heads[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg, kind, in_ch=rch[min(i + 1, n - 1)], prev_ch=rch[max(i - 1, 0)], out_ch=rch[i],
                    n=rlayers[i] + 1, temb_dim=temb_dim,
                    head_setting=heads[i] if UP_BLOCKS[kind][0] == "added_kv" else rheads[i],
                    cross_dim=cross_dim[::-1][i], only_cross=only_cross[::-1][i],
                    transformer_layers=t_layers[::-1][i], add_upsample=i < n - 1)
            for i, kind in enumerate(cfg.up_block_types))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = activation(cfg.act_fn)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel,
                                  padding=(cfg.conv_out_kernel - 1) // 2)

    # -- loading / saving ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config):
        """A randomly initialised U-Net for a config.json dict (works under `with torch.device("meta")`)."""
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, variant=None):
        """Load a public `unet/` directory (config.json + diffusion_pytorch_model[.fp16].safetensors), strictly."""
        return ckpt.load_pretrained(cls, path, WEIGHTS_STEM, dtype=dtype, device=device, variant=variant)

    def save_pretrained(self, path, variant=None):
        """Write config.json + diffusion_pytorch_model[.variant].safetensors (loads in diffusers too)."""
        return ckpt.save_pretrained(self, path, self.config, WEIGHTS_STEM, variant=variant)

    def enable_gradient_checkpointing(self, enabled=True):
        """Recompute each ResBlock (and SD's transformer layers) in backward instead of storing its activations."""
        for block in self.modules():
            if isinstance(block, Block):
                block.gradient_checkpointing = enabled
        return self

    # -- forward ---------------------------------------------------------------------------------------------------
    def embed_steps(self, t, sample):
        """Sinusoidal code of a step (scalar or [B]) for every sample: [B, block_out_channels[0]]."""
        t = torch.as_tensor(t, device=sample.device)
        t = t.reshape(1) if t.ndim == 0 else t
        emb = timestep_embedding(t.expand(sample.shape[0]), self.cfg.block_out_channels[0],
                                 self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        return emb.to(sample.dtype)

    def forward(self, sample, timesteps, encoder_hidden_states, *, noise_level=None, encoder_attention_mask=None):
        """eps_hat (and IF's variance channels) for z_t = sample [B, C_in, H, W] at steps `timesteps` (scalar or
        [B]) with text c = encoder_hidden_states [B, L, D]; encoder_attention_mask [B, L] (1 keep, 0 pad) hides
        padded text tokens; noise_level (scalar or [B]) is the stage-II augmentation level."""
        cfg = self.cfg
        # 1. conditioning vector: emb = MLP(sinusoid(t)) [+ MLP(sinusoid(noise_level))] [+ pooled text]
        emb = self.time_embedding(self.embed_steps(timesteps, sample))        # [B, D_t]
        if self.class_embedding is not None:
            if noise_level is None:
                raise ValueError("this U-Net embeds a noise level (class_embed_type 'timestep', an IF stage-II "
                                 "super-resolution model): pass noise_level=, e.g. 250")
            level = self.class_embedding(self.embed_steps(noise_level, sample)).to(sample.dtype)
            emb = torch.cat([emb, level], dim=-1) if cfg.class_embeddings_concat else emb + level
        if cfg.addition_embed_type == "text":
            emb = emb + self.add_embedding(encoder_hidden_states)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        # 2. text tokens and their mask, as an additive bias: 0 keeps a token, -10000 hides it
        c = self.encoder_hid_proj(encoder_hidden_states) if self.encoder_hid_proj is not None \
            else encoder_hidden_states                                        # [B, L, D_cross]
        text_bias = None
        if encoder_attention_mask is not None:
            text_bias = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None, :]  # [B, 1, 1, L]
        # 3. down, keeping every output for the skip connections; mid; up, consuming them in reverse
        x = self.conv_in(2 * sample - 1.0 if cfg.center_input_sample else sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, c, text_bias)
            skips += block_skips
        if self.mid_block is not None:
            x = self.mid_block(x, emb, c, text_bias)
        for block in self.up_blocks:
            x = block(x, skips, emb, c, text_bias)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))           # [B, C_out, H, W]
