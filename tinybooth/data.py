"""Instance images: the 3-5 photos of the subject that DreamBooth fine-tunes on (paper Sec. 4).

Users bring photos from phones and the web, so a directory holds whatever a camera or an editor wrote. Every file
becomes one float tensor in [-1, 1] of shape [3, R, R], the range the diffusion models were trained on:

    1. open it and decode it fully; a file that cannot be decoded (empty, truncated, unreadable, or larger than
       Pillow's decompression-bomb limit) is an error naming the file, and a broken link is named in a warning
       (never skipped silently: a missing photo changes what the model learns),
    2. apply the EXIF orientation (phones store portrait photos as rotated landscape pixels plus a tag),
    3. convert to RGB in [0, 1]:  greyscale is repeated, a palette is expanded, 16-bit images keep their precision
       (/65535), and transparent images (RGBA, LA, palette with transparency) are composited on WHITE, the usual
       product-photo background (a black background would make dark subjects disappear),
    4. centre-crop to a square (the central min(H, W) x min(H, W) region: the subject is usually in the middle;
       squashing the whole frame would change its proportions), then
    5. resize to R x R with antialiased bicubic interpolation (a warning names images smaller than R: upsampled
       photos are blurry and the model learns the blur).

Files whose extension says they are notes or metadata (.txt, .md, .json, .yaml, ...) and hidden files are not
images and are left alone; any other file is expected to be an image.
"""
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .files import atomic_path

NOT_IMAGES = {".txt", ".md", ".json", ".yaml", ".yml", ".csv", ".toml", ".ini", ".py"}


class InstanceImageError(UserError):
    """An instance directory is empty, missing, or holds a file that is not a readable image."""


def list_images(directory):
    """The image files of an instance directory, sorted by name (so runs are reproducible).

    A symbolic link whose target is gone is named in a warning (an error when no image is left): a photo that
    silently goes missing changes what the model learns.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InstanceImageError(f"instance directory '{directory}' does not exist or is not a directory; "
                                 f"pass the folder holding the subject's photos")
    candidates = sorted(p for p in directory.iterdir()
                        if not p.name.startswith(".") and p.suffix.lower() not in NOT_IMAGES)
    broken = [p for p in candidates if p.is_symlink() and not p.exists()]
    files = [p for p in candidates if p.is_file()]
    names = ", ".join(f"'{_display_name(p)}' -> '{os.readlink(p)}'" for p in broken)
    if broken and not files:
        raise InstanceImageError(f"instance directory '{directory}' holds no images: {names} "
                                 f"{'is a broken link' if len(broken) == 1 else 'are broken links'} (the file "
                                 f"pointed to is gone); copy the photos themselves into the folder")
    if broken:
        warnings.warn(f"skipping broken link(s) in the instance directory: {names} (the file pointed to is gone); "
                      f"copy the photo itself into the folder to train on it", stacklevel=2)
    if not files:
        raise InstanceImageError(f"instance directory '{directory}' holds no images; put the 3-5 photos of your "
                                 f"subject there (PNG or JPEG)")
    return files


def _display_name(path):
    """'dog/03.jpg': the folder and file name, short enough for an error message and unambiguous."""
    return f"{path.parent.name}/{path.name}"


def open_image(path):
    """Decode an image file completely and apply its EXIF orientation; errors name the file and what to do."""
    path = Path(path)
    name = _display_name(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "file")  # 'JPEG' for .jpg, until Pillow says
    if path.stat().st_size == 0:
        raise InstanceImageError(f"instance image '{name}' cannot be read (empty file, 0 bytes); remove it or "
                                 f"re-export it")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(path)
            fmt = img.format or fmt
            img.load()  # decode now: a truncated file fails here, not halfway through training
    except PermissionError:
        raise InstanceImageError(f"instance image '{name}' cannot be read (permission denied); make it readable "
                                 f"(chmod u+r '{path}') or remove it") from None
    except Image.DecompressionBombError:
        raise InstanceImageError(f"instance image '{name}' is too large to open safely (over "
                                 f"{2 * Image.MAX_IMAGE_PIXELS} pixels, Pillow's guard against decompression bombs); "
                                 f"resize it to a few thousand pixels per side or remove it") from None
    except UnidentifiedImageError:
        raise InstanceImageError(f"instance image '{name}' cannot be read (not an image format Pillow knows); "
                                 f"remove it or re-export it as PNG/JPEG") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = f"truncated {fmt}" if "truncated" in str(e).lower() else f"{fmt}: {e}"
        raise InstanceImageError(f"instance image '{name}' cannot be read ({reason}); "
                                 f"remove it or re-export it") from None
    for w in caught:  # Pillow's size warning does not name the file: say which one it is
        if issubclass(w.category, Image.DecompressionBombWarning):
            warnings.warn(f"instance image '{name}' is {img.size[0]}x{img.size[1]} pixels, unusually large; it "
                          f"is read, but a smaller copy loads faster", stacklevel=2)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ImageOps.exif_transpose(img)  # portrait photos: rotate the pixels the way the EXIF tag says


def to_rgb_array(img):
    """A PIL image of any mode -> float32 array [H, W, 3] in [0, 1]; transparency is composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG scans, depth maps): keep the precision instead of clipping to 8 bits
        a = np.asarray(img, dtype=np.float32)
        a = a / (65535.0 if img.mode != "I" or a.max() > 255 else 255.0)
        return np.repeat(a[..., None], 3, axis=2).clip(0, 1)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        a = a / (255.0 if a.max() > 1 else 1.0)
        return np.repeat(a[..., None], 3, axis=2).clip(0, 1)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        return rgb * alpha + 1.0 * (1.0 - alpha)  # composite on white
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # L, P, CMYK, 1, RGB, YCbCr


def center_crop_resize(x, resolution):
    """[3, H, W] -> [3, R, R]: central square crop, then antialiased bicubic resize (clamped to [0, 1])."""
    _, h, w = x.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[:, top:top + s, left:left + s]
    if s != resolution:
        x = F.interpolate(x[None], size=(resolution, resolution), mode="bicubic", antialias=True,
                          align_corners=False)[0]
    return x.clamp(0, 1)


def resize_images(images, resolution):
    """[N, 3, H, W] in [-1, 1] -> [N, 3, R, R]: antialiased bicubic, e.g. the low-res half of a super-resolution
    pair (a 64 px photo of the subject shrunk to the 32 px that the base model draws)."""
    out = F.interpolate(images, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(-1, 1)


def load_image(path, resolution):
    """One image file -> float tensor [3, R, R] in [-1, 1] (steps 1-5 of the module docstring)."""
    path = Path(path)
    img = open_image(path)
    w, h = img.size
    if min(w, h) < resolution:
        warnings.warn(f"instance image '{_display_name(path)}' is {w}x{h}, smaller than the training resolution "
                      f"{resolution}x{resolution}; it will be upsampled and the model will learn the blur. Use a "
                      f"larger photo if you have one", stacklevel=2)
    x = torch.from_numpy(np.ascontiguousarray(to_rgb_array(img))).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    return center_crop_resize(x, resolution) * 2 - 1  # [0, 1] -> [-1, 1]


def load_images(paths, resolution):
    """A list of image files -> [N, 3, R, R] in [-1, 1]."""
    return torch.stack([load_image(p, resolution) for p in paths])


def load_instance_images(directory, resolution):
    """Every image of an instance directory -> [N, 3, R, R] in [-1, 1], sorted by file name."""
    return load_images(list_images(directory), resolution)


def to_uint8(x):
    """Images [N, 3, H, W] in [-1, 1] -> uint8 array [N, H, W, 3] (clamped), for PNGs and plots."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image(x, path):
    """[3, H, W] in [-1, 1] -> 8-bit PNG (written to a temporary name, then renamed, so a half-written file never
    looks finished: the class-image cache relies on that)."""
    path = Path(path)
    arr = to_uint8(x[None])[0]
    with atomic_path(path) as tmp:  # removed on failure; a full disk says so, naming path
        Image.fromarray(arr).save(tmp, format="PNG")
    return path
