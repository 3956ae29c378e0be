"""The trainer's image side: every odd file a user's photo folder can hold, made here in tmp_path.

Finding and loading photos is the core's (singlora_diffusion.images), run here with the
trainer's flags; turning them into training tensors is training/data.py's.
"""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from singlora_diffusion.bundled import bundled_subject
from singlora_diffusion.images import ImageFolderError, load_image, scan_images
from singlora_diffusion.training.data import Crop, augmentations_are_deterministic, check_sizes, prepare_image

RED, WHITE = (255, 0, 0), (255, 255, 255)
GRADIENT_16 = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)


def _halves(width=40, height=20) -> Image.Image:
    """Left half black, right half white, a red block top-left: asymmetric both ways."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, width // 2:] = 255
    a[: height // 2, : width // 4] = RED
    return Image.fromarray(a)


def _noise_jpeg(path, size=(64, 48)):
    rng = np.random.default_rng(0)  # noise: a JPEG with many bytes, so half of it is truly cut
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)


def _make_good(d):
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # pure red in CMYK
    Image.fromarray(GRADIENT_16).save(d / "gray16.png")
    Image.new("L", (30, 20), 100).save(d / "gray.png")
    p = Image.new("P", (20, 20), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 10, 20))  # left half red (index 1), right half index 0, transparent
    p.save(d / "palette.png", transparency=0)
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent black...
    rgba[:, :10] = (255, 0, 0, 255)  # ...except an opaque red left half
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _halves().save(d / "rotated.jpg", exif=exif, quality=95)
    _halves().save(d / "hündchen_狗.png")
    return sorted(["cmyk.jpg", "gray16.png", "gray.png", "palette.png", "rgba.png", "rotated.jpg",
                   "hündchen_狗.png"])


def _make_bad(d):
    _noise_jpeg(d / "whole.jpg")
    data = (d / "whole.jpg").read_bytes()
    (d / "whole.jpg").unlink()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "notes.txt").write_text("remember to crop")
    (d / "fake.jpg").write_text("this is not a jpeg")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _halves().save(d / ".hidden.png")  # a valid image, skipped for being hidden
    (d / "more_photos").mkdir()
    _halves().save(d / "more_photos" / "inside.png")  # not searched: non-recursive
    return ["truncated.jpg", "zero.png", "notes.txt", "fake.jpg", ".DS_Store", ".hidden.png", "more_photos"]


def _scan(folder, role="instance"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = scan_images(folder, f"--{role}_data_dir", f"{role} images")
    return paths, [w for w in caught if issubclass(w.category, UserWarning)]


def test_scan_keeps_good_images_and_names_each_skipped_file_in_one_warning(tmp_path):
    good, bad = _make_good(tmp_path), _make_bad(tmp_path)
    paths, caught = _scan(tmp_path)
    assert [p.name for p in paths] == good
    assert len(caught) == 1
    message = str(caught[0].message)
    for name in bad:
        assert name in message
    assert "inside.png" not in message and "--instance_data_dir" in message
    assert "truncated.jpg: corrupt or truncated" in message and "zero.png: empty file" in message
    assert ".hidden.png: hidden file" in message and "fake.jpg: not an image" in message


def test_bundled_subject_scans_clean():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        paths = scan_images(bundled_subject(), "--instance_data_dir")
        check_sizes(paths, 384)
    assert [p.name for p in paths] == [f"0{i}.jpg" for i in range(6)]


@pytest.mark.parametrize("case", ["missing", "file", "empty", "all_bad"])
def test_unusable_folder_raises_with_folder_and_flag(tmp_path, case):
    folder = tmp_path / "my_photos"
    if case == "file":
        folder.write_text("x")
    elif case != "missing":
        folder.mkdir()
    if case == "all_bad":
        (folder / "notes.txt").write_text("x")
        (folder / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageFolderError) as info, warnings.catch_warnings():
        warnings.simplefilter("error")  # the error carries the detail; no extra warning
        scan_images(folder, "--class_data_dir", "class images")
    message = str(info.value)
    assert "my_photos" in message and "--class_data_dir" in message and "\n" not in message
    if case == "all_bad":
        assert "notes.txt" in message and "zero.jpg" in message


def test_load_cmyk_l_and_non_ascii(tmp_path):
    _make_good(tmp_path)
    cmyk = np.asarray(load_image(tmp_path / "cmyk.jpg"), dtype=int)
    assert np.abs(cmyk - RED).max() <= 8  # JPEG round trip, not the inverted colours of a bad CMYK path
    assert np.asarray(load_image(tmp_path / "gray.png")).tolist()[0][0] == [100, 100, 100]
    image = load_image(tmp_path / "hündchen_狗.png")
    assert image.mode == "RGB" and image.size == (40, 20)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_load_16_bit_gray_scales_instead_of_clipping(tmp_path, mode):
    source = Image.fromarray(GRADIENT_16)
    if mode == "I":
        source = source.convert("I")
    path = tmp_path / ("g.png" if mode == "I;16" else "g.tif")  # Pillow 13 drops I-mode PNG writing
    source.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    out = np.asarray(load_image(path))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]  # 65535 -> 255, 32768 -> 128, not all 255
    assert (out[..., 0] == out[..., 2]).all()


def test_transparency_becomes_white(tmp_path):
    _make_good(tmp_path)
    for name in ("rgba.png", "palette.png"):
        out = np.asarray(load_image(tmp_path / name))
        assert out[:, :10].reshape(-1, 3).tolist() == [list(RED)] * 200, name
        assert out[:, 10:].reshape(-1, 3).tolist() == [list(WHITE)] * 200, name
    la = Image.fromarray(np.stack([np.full((4, 4), 0, np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert (np.asarray(load_image(tmp_path / "la.png")) == 255).all()  # transparent black -> white


def test_exif_orientation_is_applied(tmp_path):
    _make_good(tmp_path)
    path = tmp_path / "rotated.jpg"
    with Image.open(path) as raw:  # the pixels as stored, before turning
        stored = np.asarray(raw.convert("RGB"))
    image = load_image(path)
    assert image.size == (20, 40)  # width and height swapped
    out = np.asarray(image)
    assert (out == np.rot90(stored, k=-1)).all()  # turned clockwise, exactly
    assert out[2, -3, 0] > 200 and out[2, -3, 1] < 60  # the red corner went from top-left to top-right


def test_check_sizes_warns_once_naming_each_small_image(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "small.png")
    Image.new("RGB", (100, 500)).save(tmp_path / "thin.png")
    Image.new("RGB", (512, 400)).save(tmp_path / "big.png")
    paths = sorted(tmp_path.iterdir())
    with pytest.warns(UserWarning) as caught:
        check_sizes(paths, 256)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "small.png upscaled from 300x200" in message and "thin.png upscaled from 100x500" in message
    assert "big.png" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sizes([tmp_path / "big.png"], 256)


def test_prepare_image_shape_range_and_centre_crop():
    image = _halves(200, 100)  # short side 100 -> 64, width 128, centre crop keeps columns 32..96
    out, crop = prepare_image(image, 64, center_crop=True, flip=False)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, prepare_image(image, 64, True, False)[0])  # deterministic
    assert (out[:, 40:, :4] < -0.9).all() and (out[:, :, -4:] > 0.9).all()  # black left, white right
    assert crop == Crop((100, 200), (0, 32), (64, 64)) and crop.time_ids() == [100, 200, 0, 32, 64, 64]
    assert prepare_image(_halves(20, 10), 64, True, False)[0].shape == (3, 64, 64)  # upscaled


def test_flip_mirrors_and_random_crop_varies():
    image = _halves(200, 100)
    plain, _ = prepare_image(image, 64, True, False)
    flipped, crop = prepare_image(image, 64, True, True)
    assert torch.equal(flipped, plain.flip(-1)) and crop.top_left == (0, 128 - 32 - 64)
    crops = {prepare_image(image, 64, False, False)[1].top_left for _ in range(20)}
    assert len(crops) > 1 and all(top == 0 and 0 <= left <= 64 for top, left in crops)


def test_augmentations_are_deterministic():
    assert augmentations_are_deterministic(center_crop=True, random_flip=False)
    assert not augmentations_are_deterministic(center_crop=True, random_flip=True)
    assert not augmentations_are_deterministic(center_crop=False, random_flip=False)
    assert not augmentations_are_deterministic(center_crop=False, random_flip=True)
