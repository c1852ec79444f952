"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018): the
perceptual distance behind the paper's diversity metric DIV (Sec. 4.1, "Evaluation Metrics").

Two images are passed through AlexNet; at each of its five ReLU outputs l the C_l-dim feature vector of every
pixel is scaled to unit length, the two images' normalised features are subtracted, squared, weighted per channel
by a learned non-negative w_l (fitted to human similarity judgements), summed over channels and averaged over
space (eq. 1 of the LPIPS paper):

    d(x_0, x_1) = sum_l 1/(H_l W_l) sum_{h,w} || w_l * (yhat^l_0[h,w] - yhat^l_1[h,w]) ||_2^2
    yhat^l[h,w] = y^l[h,w] / (||y^l[h,w]||_2 + 1e-10)

("w_l * (.)" squared is implemented, as in the reference, as a 1x1 conv with weight w_l on the squared difference.)
0 means identical; unrelated natural images land around 0.5-0.8. Inputs are RGB in [-1, 1]; before AlexNet they
are shifted and scaled by the constants of the reference `ScalingLayer` (ImageNet statistics in that range).

Weights ("LPIPS v0.1, alex", the default of the `lpips` package):
  - AlexNet trunk: torchvision's ImageNet AlexNet, https://download.pytorch.org/models/alexnet-owt-7be5be79.pth
    (BSD-3-Clause, torchvision); only `features.*` is used.
  - linear weights w_l: `lpips/weights/v0.1/alex.pth` of the `lpips` package (BSD-2-Clause, (c) 2018 Richard Zhang,
    Phillip Isola, Alexei A. Efros, Eli Shechtman, Oliver Wang), in its PyPI wheel lpips-0.1.4 and at
    https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth
convert_original() turns those two files into tinybooth's layout, a directory with config.json
({"model_type": "lpips", "net": "alex", "version": "0.1"}) and model.safetensors holding the public names
`features.{0,3,6,8,10}.{weight,bias}` (torchvision) and `lin{0..4}.weight` [1, C_l, 1, 1]. The one rename, from
the lpips package's names:  lin{l}.model.1.weight -> lin{l}.weight  (their index 1 skips a training-time Dropout).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
CONFIG = {"model_type": "lpips", "net": "alex", "version": "0.1"}

# the reference ScalingLayer: x -> (x - shift) / scale, per RGB channel, for inputs in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TAPS = (1, 4, 7, 9, 11)           # indices of AlexNet's five ReLUs in `features`
CHANNELS = (64, 192, 384, 256, 256)


def lpips_distance(feats0, feats1, weights):
    """d = sum_l mean_{h,w} sum_c w_l[c] (yhat0_l - yhat1_l)[c, h, w]^2 with yhat = y / (||y||_2 over c + 1e-10).

    feats0, feats1: lists of [B, C_l, H_l, W_l] features of the two images; weights: list of [1, C_l, 1, 1].
    Returns [B] distances.
    """
    # BEGIN ASSIGN 9.4
    # HINT: per layer: unit-normalise each pixel's channel vector (eps 1e-10 added to the norm), square the difference, weight the channels, sum over channels, average over h, w; sum the layers
    d = 0
    for y0, y1, w in zip(feats0, feats1, weights):
        y0 = y0 / (y0.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # yhat_0   [B, C, H, W]
        y1 = y1 / (y1.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # yhat_1
        d = d + F.conv2d((y0 - y1) ** 2, w).mean(dim=(1, 2, 3))      # sum_c w_c (.)^2, mean over h, w   [B]
    return d
    # END ASSIGN 9.4


def alexnet_features():
    """torchvision's AlexNet `features` stack (the names features.0, .3, .6, .8, .10 are the checkpoint's)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU())  # the final MaxPool is never tapped


class LPIPS(nn.Module):
    """d(x_0, x_1) for RGB batches in [-1, 1] of the same size (at least 64 x 64 for AlexNet's strides)."""

    def __init__(self, config):
        super().__init__()
        if {k: config.get(k) for k in CONFIG} != CONFIG:
            raise ValueError(f"LPIPS config {config} is not supported: only {CONFIG} (AlexNet, v0.1) is implemented")
        self.config = config
        self.features = alexnet_features()
        for l, c in enumerate(CHANNELS):
            self.add_module(f"lin{l}", nn.Conv2d(c, 1, 1, bias=False))

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        return checkpoint.load_pretrained(cls, path, "model", dtype=dtype, device=device)

    def save_pretrained(self, path):
        return checkpoint.save_pretrained(self, path, self.config, "model")

    def taps(self, x):
        """The five ReLU outputs of AlexNet on x in [-1, 1] (after the ScalingLayer shift/scale)."""
        shift = torch.tensor(SHIFT, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        scale = torch.tensor(SCALE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        h, out = (x - shift) / scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x0, x1):
        """x0, x1: [B, 3, H, W] in [-1, 1] -> [B] LPIPS distances."""
        if x0.shape != x1.shape or x0.dim() != 4 or x0.shape[1] != 3:
            raise ValueError(f"LPIPS compares two [B, 3, H, W] batches of one shape, got {tuple(x0.shape)} and "
                             f"{tuple(x1.shape)}")
        if min(x0.shape[-2:]) < 64:
            raise ValueError(f"LPIPS(alex) needs images of at least 64x64, got {tuple(x0.shape[-2:])}; upsample "
                             f"them first")
        weights = [getattr(self, f"lin{l}").weight for l in range(len(CHANNELS))]
        return lpips_distance(self.taps(x0), self.taps(x1), weights)


def convert_original(alexnet_pth, lin_pth, out_dir):
    """Write tinybooth's LPIPS directory from the two original files (see the module docstring for their URLs):
    torchvision's alexnet-owt-7be5be79.pth and the lpips package's weights/v0.1/alex.pth. Both are read with
    torch.load(weights_only=True). Returns the path of the written model.safetensors."""
    trunk = torch.load(alexnet_pth, map_location="cpu", weights_only=True)
    lin = torch.load(lin_pth, map_location="cpu", weights_only=True)
    state = {k: v for k, v in trunk.items() if k.startswith("features.")}
    state.update({k.replace(".model.1.", "."): v for k, v in lin.items()})  # lin{l}.model.1.weight -> lin{l}.weight
    with torch.device("meta"):
        model = LPIPS.from_config(CONFIG)
    checkpoint.load_into(model, state, name=f"LPIPS from '{alexnet_pth}' + '{lin_pth}'")
    return model.save_pretrained(Path(out_dir))
