"""The autoencoder of latent diffusion (Stable Diffusion 1.x): images <-> latents 8x smaller per side.

DreamBooth's Imagen cascade diffuses pixels. Stable Diffusion (Rombach et al. 2022, "latent diffusion") diffuses
in the latent space of a pretrained KL-regularised autoencoder instead, which is what makes a 512x512 model fit a
consumer GPU: the U-Net sees [B, 4, 64, 64] latents rather than [B, 3, 512, 512] pixels.

    encoder:  x [B, 3, H, W] in [-1, 1]  ->  (mu, log sigma^2) [B, 2 x 4, H/8, W/8]     q(z | x) = N(mu, sigma^2)
    latent:   z = mu + sigma eps,  then  z_0 = s z    with s = scaling_factor (0.18215 for SD 1.x)
    decoder:  x_hat = D(z_0 / s)  [B, 3, H, W]

The scaling factor s was chosen so that the latents of the training images have roughly unit variance, the scale
the diffusion's noise schedule assumes (z_t = alpha_t z_0 + sigma_t eps). DreamBooth on SD fine-tunes only the
U-Net (and maybe the text encoder); the autoencoder stays frozen: it encodes the subject images once per step and
decodes samples.

The networks are plain ResBlock stacks (GroupNorm -> SiLU -> 3x3 conv, twice, plus a skip; no time embedding) with
stride-2 convolutions down and nearest x2 + conv up, and one single-head self-attention at the lowest resolution.
Key names are the public ones (diffusers' AutoencoderKL). One exception, in `LEGACY_ATTENTION_NAMES`: the SD 1.5
file (and other checkpoints converted before diffusers 0.14) names the mid-block attention's projections
query/key/value/proj_attn; both spellings load.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .unet_blocks import Downsample2D, Upsample2D, activation
from .errors import UserError

WEIGHTS_STEM = "diffusion_pytorch_model"
EPS = 1e-6  # GroupNorm epsilon everywhere in the autoencoder

# legacy key name (SD 1.5's vae/ file) -> public name today, for the mid-block attention
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

PRESETS = {
    # runwayml/stable-diffusion-v1-5 vae/config.json: 83,653,863 params
    "SD-1.5": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                   norm_num_groups=32, sample_size=512, down_block_types=["DownEncoderBlock2D"] * 4,
                   up_block_types=["UpDecoderBlock2D"] * 4),
}


@dataclass(frozen=True)
class VAEConfig:
    """The fields of a public AutoencoderKL config.json, with their published defaults."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: object = 32
    scaling_factor: float = 0.18215
    shift_factor: float = None
    latents_mean: tuple = None
    latents_std: tuple = None
    force_upcast: bool = True            # diffusers runs an fp16 SD VAE in fp32; tinybooth's pipelines decode in fp32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config):
        """Validate a config.json dict (keys starting with '_' are metadata) and refuse what tinybooth lacks."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
        if unknown:
            raise UserError(f"unsupported AutoencoderKL config field(s) {unknown}")
        cfg = cls(**{k: v for k, v in config.items() if k in known})
        n = len(cfg.block_out_channels)
        for field, kinds, allowed in (("down_block_types", cfg.down_block_types, "DownEncoderBlock2D"),
                                      ("up_block_types", cfg.up_block_types, "UpDecoderBlock2D")):
            if list(kinds) != [allowed] * n:
                raise UserError(f"AutoencoderKL config: {field} = {list(kinds)} is not supported; tinybooth builds "
                                 f"{n} x '{allowed}' (one per entry of block_out_channels)")
        for field in ("shift_factor", "latents_mean", "latents_std"):  # SD 3 / SDXL-era latent normalisations
            if getattr(cfg, field) is not None:
                raise UserError(f"AutoencoderKL config: {field} = {getattr(cfg, field)} is not supported; "
                                 "tinybooth handles the SD 1.x latent scaling (scaling_factor only)")
        activation(cfg.act_fn)  # KeyError -> unknown activation
        return cfg


# ----------------------------------------------------------------------------------------------------------------
# layers

class ResnetBlock(nn.Module):
    """out = skip(x) + conv2(act(norm2(conv1(act(norm1(x))))))  (no time embedding in the autoencoder)."""

    def __init__(self, in_ch, out_ch, groups, act_fn):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):                                                   # [B, C_in, H, W] -> [B, C_out, H, W]
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class SelfAttention(nn.Module):
    """One-head self-attention over all positions: x + W_o softmax(q k^T / sqrt(C)) v, q, k, v = W GN(x)."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)             # [B, HW, C]
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)                   # [B, HW, C] each (one head)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]   # [B, HW, C]
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """ResBlock -> self-attention -> ResBlock at the lowest resolution."""

    def __init__(self, ch, groups, act_fn, add_attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups, act_fn), ResnetBlock(ch, ch, groups, act_fn)])
        self.attentions = nn.ModuleList([SelfAttention(ch, groups)]) if add_attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """`n` ResBlocks, then (except at the last level) a stride-2 convolution: H -> H/2."""

    def __init__(self, in_ch, out_ch, n, groups, act_fn, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, act_fn) for i in range(n))
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if add_downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    """`n` ResBlocks, then (except at the last level) nearest x2 + 3x3 convolution: H -> 2H. No skip connections."""

    def __init__(self, in_ch, out_ch, n, groups, act_fn, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, act_fn) for i in range(n))
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, (2 * x.shape[2], 2 * x.shape[3]))
        return x


class Encoder(nn.Module):
    """x [B, 3, H, W] -> (mu, log sigma^2) stacked: [B, 2 latent_channels, H / 2^(n-1), W / 2^(n-1)]."""

    def __init__(self, cfg):
        super().__init__()
        ch, g, act = list(cfg.block_out_channels), cfg.norm_num_groups, cfg.act_fn
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, act, add_downsample=i < len(ch) - 1)
            for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], g, act, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_act = activation(act)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """z [B, latent_channels, h, w] -> x_hat [B, 3, h 2^(n-1), w 2^(n-1)]; one more ResBlock per level than the
    encoder."""

    def __init__(self, cfg):
        super().__init__()
        ch, g, act = list(cfg.block_out_channels)[::-1], cfg.norm_num_groups, cfg.act_fn   # widest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, act, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, act, add_upsample=i < len(ch) - 1)
            for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_act = activation(act)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------------------------
# the posterior q(z | x) and the autoencoder

class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's 2C channels [mean; logvar].

    logvar is clamped to [-30, 20] as in the reference, so exp() neither underflows to 0 nor overflows.
    """

    def __init__(self, moments):                                            # [B, 2C, h, w]
        self.mean, logvar = moments.chunk(2, dim=1)                          # [B, C, h, w] each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None, noise=None):
        """z = mean + std * eps with eps ~ N(0, I) (the reparameterisation trick, Kingma & Welling 2014)."""
        if noise is None:
            gen_device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, device=gen_device,
                                dtype=self.mean.dtype).to(self.mean.device)
        # BEGIN ASSIGN 7.3
        # HINT: z = mean + std * noise, with std = exp(logvar / 2)
        return self.mean + self.std * noise
        # END ASSIGN 7.3

    def mode(self):
        """The most likely latent: the mean."""
        return self.mean


class AutoencoderKL(nn.Module):
    """Stable Diffusion's autoencoder (see the module docstring). Build with from_config / from_pretrained."""

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        self.cfg = cfg = VAEConfig.from_dict(config)
        self.scaling_factor = cfg.scaling_factor
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    @property
    def downscale(self):
        """How much smaller a latent is per side than its image: 2^(number of levels - 1) (8 for SD)."""
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    # -- loading / saving ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config):
        """A randomly initialised autoencoder for a config.json dict (works under `with torch.device("meta")`)."""
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, variant=None):
        """Load a public `vae/` directory (config.json + diffusion_pytorch_model[.fp16].safetensors), strictly.

        Mid-block attention weights stored under the legacy names (SD 1.5) are renamed by LEGACY_ATTENTION_NAMES.
        """
        return ckpt.load_pretrained(cls, path, WEIGHTS_STEM, dtype=dtype, device=device, variant=variant,
                                    convert=lambda state, name: {rename_legacy_key(k): v for k, v in state.items()})

    def save_pretrained(self, path, variant=None):
        """Write config.json + diffusion_pytorch_model[.variant].safetensors, with today's key names."""
        return ckpt.save_pretrained(self, path, self.config, WEIGHTS_STEM, variant=variant)

    # -- encode / decode -------------------------------------------------------------------------------------------
    def encode(self, x):
        """q(z | x) for images x [B, 3, H, W] in [-1, 1]: a DiagonalGaussian over [B, C, H/8, W/8] (unscaled)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z):
        """Images [B, 3, 8h, 8w] (roughly in [-1, 1]) from unscaled latents z [B, C, h, w]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x, generator=None):
        """Reconstruction D(z), z ~ q(z | x) (the mean when no generator is given)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if generator is not None else posterior.mode())

    # -- what diffusion sees: latents scaled to unit variance ------------------------------------------------------
    def latents_from_images(self, x, generator=None):
        """z_0 = s z with z ~ q(z | x): the diffusion model's "clean image" for training images x."""
        return self.scaling_factor * self.encode(x).sample(generator)

    def images_from_latents(self, z_0):
        """x_hat = D(z_0 / s): decode what the diffusion sampler produced."""
        return self.decode(z_0 / self.scaling_factor)


def rename_legacy_key(key):
    """encoder.mid_block.attentions.0.query.weight -> encoder.mid_block.attentions.0.to_q.weight (etc.)."""
    parts = key.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in LEGACY_ATTENTION_NAMES:
        return ".".join(parts[:-2] + [LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return key
