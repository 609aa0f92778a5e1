"""DICOM radiographs as display-ready pixels for an image model.

An image model was trained on radiographs as a reader sees them: bone bright, air dark. The
stored values of a DICOM image are not that: they go through the modality transform (rescale or
Modality LUT), then the VOI transform (the window or VOI LUT chosen for display), and
MONOCHROME1 images are displayed inverted. :func:`decode_radiograph` applies that chain with
pydicom and returns float32 values in ``[0, 1]`` where 0 is black as displayed.

Scaling after the VOI transform uses the transform's full output range (not the image's own
minimum and maximum), so the contrast is the one the window defines. An image without a window
or VOI LUT is scaled by its own range instead.

Only the first frame of a multi-frame object is decoded (see :mod:`adapters.imaging.archive` for
why, and for the frame limit applied before retrieval). Images larger than a pixel limit are
refused before decoding, so one oversized object cannot exhaust the service's memory, and so is
pixel data in a transfer syntax no installed decoder reads, with the transfer syntax named.

Decoders are pydicom's plugins: Pillow (JPEG baseline and extended, JPEG 2000), pylibjpeg-openjpeg
(JPEG 2000, HTJ2K), python-gdcm (JPEG lossless, JPEG-LS) and pydicom itself (native, RLE,
deflate), all under permissive licences. pylibjpeg-libjpeg is GPL-3.0 and is not used.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

from core.errors import MedicalDataError

__all__ = ["MAX_PIXELS", "UndecodableImage", "decode_radiograph", "size_problem"]

MAX_PIXELS = 25_000_000
"""The largest frame decoded by default (5000 x 5000; 100 MB as float32)."""

_GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})

# Decoders raise these for damaged, truncated or unsupported pixel data (pydicom, pylibjpeg,
# openjpeg and pillow each have their own); anything else is a bug and propagates.
_DECODE_ERRORS = (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, OSError)

# Far outside any stored value: windowing maps these to the two ends of its output range.
_FAR = 1e300


class UndecodableImage(MedicalDataError):
    """A DICOM object that cannot be turned into a radiograph, and why (safe to show).

    Args:
        reason: what is wrong, without identifiers (``"no pixel data"``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"image not usable: {reason}")
        self.reason = reason


def size_problem(rows: int, columns: int, max_pixels: int) -> str | None:
    """Why a frame of this size is not decoded, or ``None`` when it may be.

    Args:
        rows: the Rows attribute (0 when absent).
        columns: the Columns attribute (0 when absent).
        max_pixels: the largest frame decoded.

    Returns:
        The reason, safe to show, or ``None``.

    Examples:
        >>> size_problem(10_000, 10_000, 25_000_000)
        '10000x10000 exceeds the 25000000-pixel limit'
        >>> size_problem(2048, 2500, 25_000_000) is None
        True
    """
    if rows < 1 or columns < 1:
        return "no image size"
    if rows * columns > max_pixels:
        return f"{columns}x{rows} exceeds the {max_pixels}-pixel limit"
    return None


def _check_transfer_syntax(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        return  # pydicom then reads it as the dataset was decoded; nothing to name
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all
        available = False
    if not available:
        name = syntax.name if syntax.name != str(syntax) else "unknown"
        raise UndecodableImage(f"no decoder installed for transfer syntax {syntax} ({name})")


def _check(ds: Dataset, max_pixels: int) -> None:
    if "PixelData" not in ds:
        raise UndecodableImage("no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _GREYSCALE:
        raise UndecodableImage(f"not a greyscale image ({photometric or 'no photometric'})")
    problem = size_problem(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), max_pixels)
    if problem is not None:
        raise UndecodableImage(problem)
    _check_transfer_syntax(ds)


def _display(
    values: npt.NDArray[np.generic], ds: Dataset
) -> tuple[npt.NDArray[np.float64], float, float]:
    """The VOI transform of modality values, with the transform's output range.

    Without a VOI LUT or a window, the values themselves and their own range.
    """
    if ds.get("VOILUTSequence"):
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries, first_map = int(descriptor[0]) or 2**16, int(descriptor[1])
        table = apply_voi_lut(np.arange(first_map, first_map + entries), ds)
        # A LUT is indexed by whole numbers; a rescale may have made the values floats.
        shown = apply_voi_lut(np.rint(values).astype(np.int64), ds)
        return np.asarray(shown, dtype=np.float64), float(table.min()), float(table.max())
    if "WindowCenter" in ds and "WindowWidth" in ds:
        shown = apply_voi_lut(values, ds)
        with np.errstate(over="ignore"):
            ends = apply_voi_lut(np.array([-_FAR, _FAR]), ds)
        return np.asarray(shown, dtype=np.float64), float(ends.min()), float(ends.max())
    plain = np.asarray(values, dtype=np.float64)
    return plain, float(plain.min()), float(plain.max())


def decode_radiograph(ds: Dataset, *, max_pixels: int = MAX_PIXELS) -> npt.NDArray[np.float32]:
    """The image as displayed, float32 ``(H, W)`` in ``[0, 1]`` with 0 black.

    Args:
        ds: a greyscale DICOM image (any transfer syntax pydicom and its plugins decode,
            JPEG 2000 included).
        max_pixels: frames with more pixels are refused without being decoded.

    Returns:
        The first frame after the modality and VOI transforms, inverted for MONOCHROME1.

    Raises:
        UndecodableImage: no pixel data, not greyscale, too large, a transfer syntax without an
            installed decoder, or pixel data that could not be decoded (damaged, truncated).

    Examples:
        >>> # pixels = decode_radiograph(pydicom.dcmread("RG1_J2KI.dcm"))
        >>> # pixels.shape, pixels.dtype -> ((1955, 1841), dtype('float32'))
    """
    _check(ds, max_pixels)
    try:
        shown, low, high = _display(apply_modality_lut(pixel_array(ds, index=0), ds), ds)
    except _DECODE_ERRORS as error:
        reason = f"pixel data could not be decoded ({type(error).__name__})"
        raise UndecodableImage(reason) from error
    if shown.ndim != 2:
        raise UndecodableImage(f"expected one greyscale frame, got shape {shown.shape}")
    scaled = (shown - low) / (high - low) if high > low else np.zeros_like(shown)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)
