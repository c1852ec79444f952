"""Instance-image loading (tinybooth.data): every kind of file a user's photo folder holds.

The images are generated here, in tmp_path, so each test shows exactly what it feeds the loader.
"""
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tinybooth import data


def _gradient(w, h):
    """An RGB uint8 image whose colour tells where each pixel came from (red grows to the right, green down)."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, np.full_like(x, 64)], axis=2).round().astype(np.uint8)


def test_rgb_png_becomes_minus_one_to_one(tmp_path):
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "black.png")
    x = data.load_instance_images(tmp_path, 16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    # sorted by name: black.png first
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0)), "a black pixel (0) must map to -1"
    assert torch.allclose(x[1], torch.full_like(x[1], 1.0)), "a white pixel (255) must map to +1"


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255          # pure red ...
    rgba[:, :4, 3] = 255        # ... opaque on the left half, fully transparent on the right half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = data.load_instance_images(tmp_path, 8)[0]
    assert torch.allclose(x[:, :, :4], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 8, 4)), \
        "opaque red pixels must stay red (1, -1, -1)"
    assert torch.allclose(x[:, :, 4:], torch.ones(3, 8, 4)), \
        "fully transparent pixels must become white (1, 1, 1): RGBA is composited on a white background"


def test_half_transparent_pixel_is_blended_with_white(tmp_path):
    Image.fromarray(np.array([[[0, 0, 0, 128]]], np.uint8).repeat(4, 0).repeat(4, 1), "RGBA").save(tmp_path / "a.png")
    x = data.load_instance_images(tmp_path, 4)[0]
    expected = (1 - 128 / 255) * 2 - 1  # black * alpha + white * (1 - alpha), then to [-1, 1]
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-6), \
        f"black at alpha 128/255 over white should be {expected:.4f}, got {x.mean():.4f}"


def test_palette_and_palette_with_transparency(tmp_path):
    rgb = Image.fromarray(_gradient(8, 8))
    rgb.convert("P", palette=Image.ADAPTIVE, colors=16).save(tmp_path / "p.png")
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 1  # palette index 1 (red) is transparent
    p.save(tmp_path / "q.png", transparency=1)
    x = data.load_instance_images(tmp_path, 8)
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x[1][:, 0, 0], torch.ones(3)), "a transparent palette entry must become white"
    assert torch.allclose(x[1][:, 4, 4], torch.tensor([-1.0, -1.0, 1.0])), "palette index 0 is blue (0, 0, 255)"


def test_greyscale_repeats_to_three_channels(tmp_path):
    Image.fromarray(np.full((8, 8), 51, np.uint8), "L").save(tmp_path / "g.png")
    x = data.load_instance_images(tmp_path, 8)[0]
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x, torch.full_like(x, 51 / 255 * 2 - 1), atol=1e-6)


def test_16bit_greyscale_keeps_its_precision(tmp_path):
    value = 40000  # between two 8-bit levels: 40000 / 65535 * 255 = 155.65
    Image.fromarray(np.full((8, 8), value, np.uint16)).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I"), "test set-up: PNG should reopen as a 16-bit mode"
    x = data.load_instance_images(tmp_path, 8)[0]
    expected = value / 65535 * 2 - 1
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-6), \
        f"a 16-bit value {value} must become {expected:.6f} (divided by 65535), got {x.mean():.6f}"


def test_exif_orientation_is_applied(tmp_path):
    # pixels stored as a 12x8 landscape with orientation 6 ("rotate 90 CW to display"): a phone's portrait photo
    img = np.zeros((8, 12, 3), np.uint8)
    img[:, :6] = (255, 0, 0)  # left half of the stored pixels red, right half black
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    shown = data.open_image(tmp_path / "phone.jpg")
    assert shown.size == (8, 12), f"orientation 6 must turn the 12x8 stored pixels into an 8x12 portrait, got {shown.size}"
    x = data.load_image(tmp_path / "phone.jpg", 8)
    # rotated 90 degrees clockwise, the stored left (red) half becomes the top half
    assert x[0, :2].mean() > 0.8 and x[0, -2:].mean() < -0.8, \
        "after applying the EXIF rotation the red half must be at the top"


def test_non_square_is_centre_cropped(tmp_path):
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 255  # only the central 10x10 square is white
    Image.fromarray(img).save(tmp_path / "wide.png")
    x = data.load_instance_images(tmp_path, 10)[0]
    assert torch.allclose(x, torch.ones_like(x)), \
        "a 30x10 image must be cropped to its central 10x10 square (all white here), not squashed or padded"


def test_resize_is_antialiased_and_exact_size(tmp_path):
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checker, "L").save(tmp_path / "c.png")
    x = data.load_instance_images(tmp_path, 16)[0]
    assert x.shape == (3, 16, 16)
    assert x.abs().max() < 0.1, "an antialiased 4x downscale of a 1-px checkerboard is flat grey (~0), " \
                                f"got values up to {x.abs().max():.3f} (aliasing)"


def test_small_image_warns_and_is_upsampled(tmp_path):
    Image.fromarray(_gradient(8, 8)).save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match=r"tiny\.png' is 8x8, smaller than the training resolution 32x32"):
        x = data.load_instance_images(tmp_path, 32)
    assert x.shape == (1, 3, 32, 32)


def test_large_image_does_not_warn(tmp_path):
    Image.fromarray(_gradient(40, 40)).save(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.load_instance_images(tmp_path, 32)


def test_truncated_jpeg_is_named(tmp_path):
    folder = tmp_path / "dog"
    folder.mkdir()
    Image.fromarray(_gradient(64, 64)).save(folder / "01.jpg", quality=90)
    raw = (folder / "01.jpg").read_bytes()
    (folder / "03.jpg").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.InstanceImageError, match=r"instance image 'dog/03\.jpg' cannot be read \(truncated JPEG\); remove it"):
        data.load_instance_images(folder, 32)


def test_truncated_png_is_named(tmp_path):
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.InstanceImageError, match=r"a\.png' cannot be read"):
        data.load_instance_images(tmp_path, 32)


@pytest.mark.parametrize("content", [b"", b"this is not an image"], ids=["empty", "text"])
def test_unreadable_file_is_named(tmp_path, content):
    Image.fromarray(_gradient(8, 8)).save(tmp_path / "good.png")
    (tmp_path / "bad.heic").write_bytes(content)
    with pytest.raises(data.InstanceImageError, match=r"'.*/bad\.heic' cannot be read .*re-export"):
        data.load_instance_images(tmp_path, 8)


def test_notes_and_hidden_files_are_not_images(tmp_path):
    Image.fromarray(_gradient(8, 8)).save(tmp_path / "a.png")
    (tmp_path / "subject.json").write_text('{"class_noun": "star"}')
    (tmp_path / "README.md").write_text("photos of my star")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    assert [p.name for p in data.list_images(tmp_path)] == ["a.png"]


def test_empty_and_missing_directory_are_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("no photos yet")
    with pytest.raises(data.InstanceImageError, match="holds no images"):
        data.load_instance_images(tmp_path, 8)
    with pytest.raises(data.InstanceImageError, match="does not exist"):
        data.load_instance_images(tmp_path / "nope", 8)


def test_save_image_round_trips(tmp_path):
    x = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8)
    data.save_image(x, tmp_path / "x.png")
    assert not list(tmp_path.glob("*.tmp")), "save_image must not leave its temporary file behind"
    y = data.load_image(tmp_path / "x.png", 8)
    assert (x - y).abs().max() <= 1 / 255 + 1e-6, "PNG round trip must be exact up to 8-bit quantisation"


def bomb_png(path, width=20000, height=20000):
    """A tiny PNG file whose header claims width x height pixels: Pillow's decompression-bomb check trips on it
    before decoding anything (a real 20000 x 20000 picture would take 400 MB to make)."""
    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


def test_broken_link_is_named_in_a_warning_and_skipped(tmp_path):
    Image.fromarray(_gradient(8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "moved-away.png")
    with pytest.warns(UserWarning, match=r"broken link.*'.*/b\.png' -> '.*moved-away\.png'"):
        assert [p.name for p in data.list_images(tmp_path)] == ["a.png"]


def test_folder_of_broken_links_is_an_error_naming_them(tmp_path):
    (tmp_path / "b.png").symlink_to(tmp_path / "moved-away.png")
    with pytest.raises(data.InstanceImageError, match=r"holds no images: '.*/b\.png' -> .* is a broken link"):
        data.list_images(tmp_path)


def test_decompression_bomb_is_named(tmp_path):
    bomb_png(tmp_path / "huge.png")
    with pytest.raises(data.InstanceImageError, match=r"'.*/huge\.png' is too large to open safely"):
        data.load_instance_images(tmp_path, 8)


def test_very_large_image_warning_names_the_file(tmp_path, monkeypatch):
    Image.fromarray(_gradient(40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 - 1)  # 40 x 40 now counts as 'large', not a bomb
    with pytest.warns(UserWarning, match=r"'.*/big\.png' is 40x40 pixels, unusually large"):
        data.load_instance_images(tmp_path, 8)


def test_zero_byte_file_says_it_is_empty(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(data.InstanceImageError, match=r"'.*/a\.jpg' cannot be read \(empty file, 0 bytes\)"):
        data.load_instance_images(tmp_path, 8)


def test_unreadable_file_names_the_permission_problem(tmp_path, monkeypatch):
    Image.fromarray(_gradient(8, 8)).save(tmp_path / "a.png")

    def denied(path, *args, **kwargs):  # what opening a chmod 000 file does (root would read it anyway)
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(data.InstanceImageError, match=r"'.*/a\.png' cannot be read \(permission denied\); make it "
                                                      r"readable"):
        data.load_instance_images(tmp_path, 8)


def test_instance_image_error_is_a_user_error():
    from tinybooth.errors import UserError
    assert issubclass(data.InstanceImageError, UserError), "commands print UserErrors as one 'error:' line"
