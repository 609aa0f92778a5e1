"""Real DICOM material for the imaging adapter tests (pydicom-data radiographs, NIH images) and
a real Orthanc PACS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import pydicom
import pytest

from fixtures.cxr_dicom import fixture_uid, png_to_dicom
from fixtures.nih_labels import NihLabel, read_nih_labels
from tests.peers.orthanc import Orthanc, OrthancMissing, running_orthanc

NihDicom = Callable[[NihLabel, str, date], pydicom.Dataset]


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    """``RG1_J2KI.dcm`` (CR chest, JPEG 2000, MONOCHROME1) and ``RG3_J2KI.dcm`` (extremity)."""
    return shared_data / "dicom"


@pytest.fixture(scope="session")
def nih_dir(shared_data: Path) -> Path:
    return shared_data / "cxr" / "nih1000"


@pytest.fixture(scope="session")
def nih_labels(nih_dir: Path) -> tuple[NihLabel, ...]:
    return read_nih_labels(nih_dir / "labels.csv")


@pytest.fixture(scope="session")
def nih_dicom(nih_dir: Path) -> NihDicom:
    """Makes the DX object of an NIH image for a patient, dated ``day``."""

    def make(label: NihLabel, patient_id: str, day: date) -> pydicom.Dataset:
        parts = (patient_id, label.image_index, day.isoformat())
        return png_to_dicom(
            nih_dir / label.image_index,
            label=label,
            patient_id=patient_id,
            patient_name="Test^Patient",
            study_uid=fixture_uid("test study", *parts),
            series_uid=fixture_uid("test series", *parts),
            sop_uid=fixture_uid("test instance", *parts),
            study_date=day,
        )

    return make


@pytest.fixture(scope="session")
def orthanc() -> Iterator[Orthanc]:
    """A real Orthanc with its DICOMweb plugin and basic auth, for the whole session."""
    try:
        with running_orthanc() as server:
            yield server
    except OrthancMissing as error:
        pytest.skip(str(error))
