"""Image preprocessing reproduces open_clip's eval transform on grey float images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapters.models.preprocess import ImagePreprocessing, preprocess_image, preprocess_images

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SETTINGS = ImagePreprocessing(image_size=224, mean=MEAN, std=STD)


def _pil_rgb_reference(grey: np.ndarray, size: int) -> np.ndarray:
    """What torchvision's Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize do to
    an 8-bit RGB PIL image (torchvision resizes PIL images with PIL itself)."""
    image = Image.fromarray(grey).convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    resized = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    left = round((resized.width - size) / 2)
    top = round((resized.height - size) / 2)
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    scaled = cropped.transpose(2, 0, 1) / 255.0
    normalised: np.ndarray = (scaled - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    return normalised


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (64, 64), (224, 224), (97, 301)])
def test_matches_the_8_bit_rgb_pipeline(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    smooth = 127 + 100 * np.sin(y / 17.0) * np.cos(x / 23.0)
    grey = np.clip(smooth + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
    ours = preprocess_image(grey.astype(np.float32) / 255.0, SETTINGS)
    reference = _pil_rgb_reference(grey, 224)
    assert ours.shape == reference.shape == (3, 224, 224)
    assert ours.dtype == np.float32
    # In grey levels. The reference resizes in two 8-bit passes, rounding (and clipping
    # overshoot) after each: about one level apart, a few levels at rare clipped noisy pixels.
    levels = np.abs(ours - reference) * np.array(STD)[:, None, None] * 255
    assert levels.mean() < 0.4
    assert np.quantile(levels, 0.999) < 1.1
    assert levels.max() < 5


def test_constant_image_normalises_each_channel() -> None:
    out = preprocess_image(np.full((123, 77), 0.25, np.float32), SETTINGS)
    for channel in range(3):
        expected = (0.25 - MEAN[channel]) / STD[channel]
        np.testing.assert_allclose(out[channel], expected, atol=1e-5)


@pytest.mark.parametrize("landscape", [True, False])
def test_long_side_is_centre_cropped(landscape: bool) -> None:
    # Thirds: black | white | black along the long side; the centre crop is the white third.
    stripes = np.zeros((300, 900), np.float32)
    stripes[:, 300:600] = 1.0
    image = stripes if landscape else stripes.T
    out = preprocess_image(image, SETTINGS)
    white = (1.0 - MEAN[0]) / STD[0]
    interior = out[0, 8:-8, 8:-8]
    np.testing.assert_allclose(interior, white, atol=1e-4)


def test_batch_of_mixed_sizes_and_empty_batch() -> None:
    images = [np.zeros((64, 64), np.float32), np.ones((512, 400), np.float32)]
    assert preprocess_images(images, SETTINGS).shape == (2, 3, 224, 224)
    assert preprocess_images([], SETTINGS).shape == (0, 3, 224, 224)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((2, 64, 64), np.float32),
        np.zeros((0, 10), np.float32),
        np.full((8, 8), 1.5, np.float32),
        np.full((8, 8), np.nan, np.float32),
    ],
)
def test_invalid_images_are_rejected(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="image"):
        preprocess_image(image, SETTINGS)


def test_settings_round_trip_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "preprocess.json"
    SETTINGS.save(path)
    assert ImagePreprocessing.load(path) == SETTINGS
    with pytest.raises(ValueError, match="resize_mode"):
        ImagePreprocessing(224, MEAN, STD, resize_mode="squash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interpolation"):
        ImagePreprocessing(224, MEAN, STD, interpolation="nearest")  # type: ignore[arg-type]
    path.write_text('{"image_size": 224}')
    with pytest.raises(ValueError, match="not a valid preprocessing file"):
        ImagePreprocessing.load(path)
