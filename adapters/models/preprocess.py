"""Image preprocessing for CLIP-style image towers, in numpy and Pillow (no torch at serving).

Why it exists: an image tower only gives the embeddings it was trained for when its input is
prepared the way its training pipeline prepared it. open_clip's evaluation transform (used by
BiomedCLIP) is: convert to RGB, resize the shortest side to the image size (bicubic), centre-crop a
square, scale to ``[0, 1]``, normalise each channel by the model's mean and std. This module does
the same for the service's ``(H, W)`` float32 images in ``[0, 1]`` (0 is black), with the settings
the exporter wrote to ``preprocess.json``.

Two deliberate differences from resizing an 8-bit RGB image: a grey image is resized once and then
copied to three channels (an RGB resize gives the same three channels), and resizing happens in
32-bit float rather than on 8-bit values, so high bit-depth radiographs are not quantised first.
Like the 8-bit pipeline, the resized values are clipped to ``[0, 1]``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
from PIL import Image

from core.types import Vector

__all__ = ["PREPROCESS_NAME", "ImagePreprocessing", "preprocess_image", "preprocess_images"]

PREPROCESS_NAME = "preprocess.json"
"""File name of the preprocessing settings inside an image-text model directory."""

Interpolation = Literal["bicubic", "bilinear"]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True, slots=True)
class ImagePreprocessing:
    """How images are prepared for an image tower (the contents of ``preprocess.json``).

    Args:
        image_size: side of the square the tower takes.
        mean: per-channel (RGB) mean subtracted after scaling to ``[0, 1]``.
        std: per-channel (RGB) standard deviation divided by after subtracting the mean.
        interpolation: resampling filter of the resize.
        resize_mode: only ``"shortest"``: resize the shortest side to ``image_size``, keeping the
            aspect ratio, then centre-crop.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bicubic"
    resize_mode: Literal["shortest"] = "shortest"

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std > 0")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        if self.resize_mode != "shortest":
            raise ValueError(f"unsupported resize_mode {self.resize_mode!r}")

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }

    def save(self, path: Path) -> None:
        """Write the settings as JSON."""
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ImagePreprocessing:
        """Read settings written by :meth:`save`.

        Raises:
            ValueError: a value is missing or unsupported.
        """
        raw = json.loads(path.read_text(encoding="utf-8"))
        try:
            return cls(
                image_size=int(raw["image_size"]),
                mean=cast(tuple[float, float, float], tuple(float(v) for v in raw["mean"])),
                std=cast(tuple[float, float, float], tuple(float(v) for v in raw["std"])),
                interpolation=raw["interpolation"],
                resize_mode=raw["resize_mode"],
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a valid preprocessing file: {error!r}") from None


def preprocess_image(image: Vector, settings: ImagePreprocessing) -> npt.NDArray[np.float32]:
    """One ``(H, W)`` image in ``[0, 1]`` as a normalised ``(3, S, S)`` float32 array.

    Args:
        image: grey image, float, 0 is black; any size of at least one pixel.
        settings: the tower's preprocessing.

    Returns:
        The tower input for this image, channels first.

    Raises:
        ValueError: the image is not 2-D, is empty, or has values outside ``[0, 1]`` or NaN.

    Example:
        >>> settings = ImagePreprocessing(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        >>> preprocess_image(np.ones((300, 200), dtype=np.float32), settings).shape
        (3, 224, 224)
    """
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"expected a non-empty (H, W) image, got shape {pixels.shape}")
    if not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0:
        raise ValueError("image values must be finite and within [0, 1]")
    size = settings.image_size
    height, width = pixels.shape
    # Same output size as torchvision's Resize(int): the short side becomes `size`, the long
    # side is scaled and truncated.
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    resized = Image.fromarray(pixels).resize(
        (new_width, new_height), resample=_RESAMPLE[settings.interpolation]
    )
    array = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    # torchvision's CenterCrop offsets: int(round((side - size) / 2)).
    top = round((new_height - size) / 2)
    left = round((new_width - size) / 2)
    square = array[top : top + size, left : left + size]
    mean = np.asarray(settings.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(settings.std, dtype=np.float32)[:, None, None]
    return ((square[None, :, :] - mean) / std).astype(np.float32)


def preprocess_images(
    images: Sequence[Vector], settings: ImagePreprocessing
) -> npt.NDArray[np.float32]:
    """A batch of ``(H, W)`` images as one ``(N, 3, S, S)`` float32 array (``(0, 3, S, S)`` when
    empty)."""
    size = settings.image_size
    if not images:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return np.stack([preprocess_image(image, settings) for image in images])
