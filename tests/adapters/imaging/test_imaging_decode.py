"""decode_radiograph on real DICOM: RG1 (JPEG 2000, MONOCHROME1) and NIH-built DX objects."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.pixels.utils import pixel_array

from adapters.imaging.decode import UndecodableImage, decode_radiograph
from fixtures.nih_labels import NihLabel

NihDicom = Callable[[NihLabel, str, date], Dataset]


@pytest.fixture(scope="module")
def rg1(dicom_dir: Path) -> Dataset:
    return pydicom.dcmread(dicom_dir / "RG1_J2KI.dcm")


@pytest.fixture(scope="module")
def rg1_pixels(rg1: Dataset) -> np.ndarray:
    return decode_radiograph(copy.deepcopy(rg1))


@pytest.fixture(scope="module")
def nih(nih_labels: tuple[NihLabel, ...], nih_dicom: NihDicom) -> Dataset:
    return nih_dicom(nih_labels[0], "p1", date(2020, 1, 1))


def _png(nih_dir: Path, label: NihLabel) -> np.ndarray:
    with Image.open(nih_dir / label.image_index) as image:
        return np.asarray(image)[..., 0].astype(np.float64)


def test_rg1_decodes_to_a_float_image_in_the_unit_range(rg1_pixels: np.ndarray) -> None:
    assert rg1_pixels.shape == (1955, 1841)
    assert rg1_pixels.dtype == np.float32
    assert 0.0 <= rg1_pixels.min() < rg1_pixels.max() <= 1.0


def _lungs_and_mediastinum(pixels: np.ndarray) -> tuple[float, float]:
    height, width = pixels.shape
    rows = slice(int(0.25 * height), int(0.45 * height))
    lungs = np.concatenate(
        [
            pixels[rows, int(0.20 * width) : int(0.32 * width)].ravel(),
            pixels[rows, int(0.68 * width) : int(0.80 * width)].ravel(),
        ]
    )
    mediastinum = pixels[rows, int(0.47 * width) : int(0.53 * width)]
    return float(lungs.mean()), float(mediastinum.mean())


def test_rg1_is_displayed_with_dark_lungs(rg1_pixels: np.ndarray) -> None:
    lungs, mediastinum = _lungs_and_mediastinum(rg1_pixels)
    assert lungs < mediastinum - 0.1


def test_monochrome1_is_inverted(rg1: Dataset, rg1_pixels: np.ndarray) -> None:
    as_monochrome2 = copy.deepcopy(rg1)
    as_monochrome2.PhotometricInterpretation = "MONOCHROME2"
    uninverted = decode_radiograph(as_monochrome2)
    np.testing.assert_allclose(uninverted, 1.0 - rg1_pixels, atol=1e-6)
    lungs, mediastinum = _lungs_and_mediastinum(uninverted)
    assert lungs > mediastinum


def test_the_window_sets_the_contrast(rg1: Dataset, rg1_pixels: np.ndarray) -> None:
    # DICOM PS3.3 C.11.2.1.2.1 (linear window), computed here on the stored values.
    stored = pixel_array(copy.deepcopy(rg1), index=0).astype(np.float64)
    center, width = float(rg1.WindowCenter), float(rg1.WindowWidth)
    windowed = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(rg1_pixels, 1.0 - windowed, atol=1e-5)


def test_without_a_window_the_image_range_is_used(rg1: Dataset) -> None:
    plain = copy.deepcopy(rg1)
    del plain.WindowCenter
    del plain.WindowWidth
    pixels = decode_radiograph(plain)
    assert pixels.min() == 0.0
    assert pixels.max() == 1.0


def test_an_nih_object_round_trips_to_the_png(
    nih: Dataset, nih_dir: Path, nih_labels: tuple[NihLabel, ...]
) -> None:
    buffer = io.BytesIO()
    nih.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    decoded = decode_radiograph(pydicom.dcmread(buffer))
    np.testing.assert_allclose(decoded * 255.0, _png(nih_dir, nih_labels[0]), atol=1e-3)


def _with_voi_lut(ds: Dataset, data: list[int], bits: int) -> Dataset:
    out = copy.deepcopy(ds)
    del out.WindowCenter
    del out.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [len(data), 0, bits]
    item.add_new(0x00283006, "US", data)
    out.VOILUTSequence = [item]
    return out


def test_a_voi_lut_is_applied_and_scaled_by_its_own_range(
    nih: Dataset, nih_dir: Path, nih_labels: tuple[NihLabel, ...]
) -> None:
    png = _png(nih_dir, nih_labels[0])
    reversed_lut = _with_voi_lut(nih, [255 - v for v in range(256)], 8)
    np.testing.assert_allclose(decode_radiograph(reversed_lut) * 255.0, 255.0 - png, atol=1e-3)
    # Declared 16 bits, used 12: scaling by the declared depth would leave the image near black.
    narrow_lut = _with_voi_lut(nih, [16 * v for v in range(256)], 16)
    np.testing.assert_allclose(decode_radiograph(narrow_lut) * 255.0, png, atol=1e-3)


def test_only_the_first_frame_of_a_multiframe_object_is_decoded(
    nih: Dataset, nih_dir: Path, nih_labels: tuple[NihLabel, ...]
) -> None:
    first = np.frombuffer(nih.PixelData, dtype=np.uint8)
    frames = copy.deepcopy(nih)
    frames.NumberOfFrames = 2
    frames.PixelData = first.tobytes() + (255 - first).tobytes()
    decoded = decode_radiograph(frames)
    assert decoded.shape == (nih.Rows, nih.Columns)
    np.testing.assert_allclose(decoded * 255.0, _png(nih_dir, nih_labels[0]), atol=1e-3)


def test_missing_pixel_data_is_refused(nih: Dataset) -> None:
    empty = copy.deepcopy(nih)
    del empty.PixelData
    with pytest.raises(UndecodableImage) as raised:
        decode_radiograph(empty)
    assert raised.value.reason == "no pixel data"


def test_a_colour_image_is_refused(nih: Dataset) -> None:
    colour = copy.deepcopy(nih)
    colour.PhotometricInterpretation = "RGB"
    colour.SamplesPerPixel = 3
    with pytest.raises(UndecodableImage, match=r"not a greyscale image \(RGB\)"):
        decode_radiograph(colour)


def test_an_image_above_the_pixel_limit_is_refused(rg1: Dataset) -> None:
    with pytest.raises(UndecodableImage) as raised:
        decode_radiograph(copy.deepcopy(rg1), max_pixels=1_000_000)
    assert raised.value.reason == "1841x1955 exceeds the 1000000-pixel limit"


def test_a_truncated_jpeg2000_file_has_no_pixel_data(dicom_dir: Path) -> None:
    data = (dicom_dir / "RG1_J2KI.dcm").read_bytes()
    with pytest.warns(UserWarning, match="End of file"):
        truncated = pydicom.dcmread(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(UndecodableImage) as raised:
        decode_radiograph(truncated)
    assert raised.value.reason == "no pixel data"


def test_truncated_native_pixel_data_is_refused(nih: Dataset) -> None:
    short = copy.deepcopy(nih)
    short.PixelData = nih.PixelData[: len(nih.PixelData) // 2]
    with pytest.raises(UndecodableImage) as raised:
        decode_radiograph(short)
    assert raised.value.reason == "pixel data could not be decoded (ValueError)"


def test_a_damaged_jpeg2000_codestream_is_refused(dicom_dir: Path) -> None:
    data = bytearray((dicom_dir / "RG1_J2KI.dcm").read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # JPEG 2000 SOC and SIZ markers
    data[start + 2 : start + 200] = bytes(198)
    with pytest.raises(UndecodableImage) as raised:
        decode_radiograph(pydicom.dcmread(io.BytesIO(bytes(data))))
    assert raised.value.reason == "pixel data could not be decoded (RuntimeError)"
