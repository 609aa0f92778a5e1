"""DicomArchive over DICOMweb against a real Orthanc (basic auth, only its DICOMweb plugin).

Fixture studies are loaded with STOW-RS (:func:`adapters.imaging.stow.store_datasets`): NIH
images as DX chest objects for a few patients (native, JPEG baseline, JPEG lossless), the real
RG1 chest (JPEG 2000, MONOCHROME1) and RG3 extremity with a CT beside them, and the faults an
archive can hold: a 10000 x 10000 image, a multi-frame object beyond the frame limit, a transfer
syntax no installed decoder reads. The same files also make a folder, so the embedded default
is checked against the PACS. Faults Orthanc cannot produce on demand (429, 404, 500) come from
a recording proxy in front of it (``proxy.py``); the request log of that proxy shows what was
and was not downloaded.
"""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from adapters.imaging.archive import DicomArchive
from adapters.imaging.decode import decode_radiograph
from adapters.imaging.dicomweb import open_dicomweb_archive
from adapters.imaging.stow import StoreFailure, store_datasets
from core.errors import SourceUnavailable
from core.ports import ImagingArchive
from fixtures.cxr_dicom import fixture_accession, fixture_uid, write_dicom
from fixtures.dicom_codecs import jpeg_baseline, jpeg_lossless
from fixtures.nih_labels import NihLabel
from fixtures.real_radiographs import REAL_CHEST, REAL_EXTREMITY, real_radiographs
from tests.adapters.imaging.proxy import Fault, Proxy, proxy_to
from tests.peers.orthanc import Orthanc, running_orthanc

pytestmark = pytest.mark.anyio

NihDicom = Callable[[NihLabel, str, date], Dataset]

OLD, NEW = date(2019, 1, 1), date(2021, 6, 1)
MAX_FRAMES = 2
JPEG2000_PART2 = UID("1.2.840.10008.1.2.4.92")


def _refiled(ds: Dataset, patient_id: str, tag: str) -> Dataset:
    """``ds`` as another object of ``patient_id``: new Study, Series and SOP Instance UIDs."""
    out = copy.deepcopy(ds)
    out.PatientID = patient_id
    out.StudyInstanceUID = fixture_uid("orthanc study", patient_id, tag)
    out.AccessionNumber = fixture_accession(out.StudyInstanceUID)
    out.SeriesInstanceUID = fixture_uid("orthanc series", patient_id, tag)
    out.SOPInstanceUID = fixture_uid("orthanc instance", patient_id, tag)
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def _multi_frame(ds: Dataset, frames: int) -> Dataset:
    out = copy.deepcopy(ds)
    out.NumberOfFrames = frames
    out.PixelData = np.stack([ds.pixel_array] * frames).tobytes()
    return out


@pytest.fixture(scope="module")
def studies(
    dicom_dir: Path, nih_labels: tuple[NihLabel, ...], nih_dicom: NihDicom
) -> dict[str, Any]:
    """The fixture objects, by role."""
    real = real_radiographs("O-B", source_dir=dicom_dir)
    ct = _refiled(pydicom.dcmread(get_testdata_file("CT_small.dcm")), "O-B", "ct")
    native = nih_dicom(nih_labels[20], "O-C", OLD)
    faulty = nih_dicom(nih_labels[21], "O-F", OLD)
    huge = _refiled(
        jpeg_baseline(faulty, pixels=np.zeros((10_000, 10_000), np.uint8), quality=50),
        "O-F",
        "huge",
    )
    part2 = _refiled(faulty, "O-F", "part2")
    part2.file_meta.TransferSyntaxUID = JPEG2000_PART2
    part2.PixelData = real[REAL_CHEST].PixelData  # a real JPEG 2000 codestream, encapsulated
    part2.Rows, part2.Columns = real[REAL_CHEST].Rows, real[REAL_CHEST].Columns
    part2.BitsAllocated, part2.BitsStored, part2.HighBit = 16, 10, 9
    return {
        "old": nih_dicom(nih_labels[22], "O-A", OLD),
        "new": nih_dicom(nih_labels[23], "O-A", NEW),
        "chest": real[REAL_CHEST],
        "extremity": real[REAL_EXTREMITY],
        "ct": ct,
        "native": native,
        "baseline": _refiled(jpeg_baseline(native), "O-C", "baseline"),
        "lossless": _refiled(jpeg_lossless(native), "O-C", "lossless"),
        "huge": huge,
        "frames": _refiled(_multi_frame(faulty, MAX_FRAMES + 1), "O-F", "frames"),
        "part2": part2,
        "faulty_good": faulty,
    }


def _client(orthanc: Orthanc, *, url: str | None = None) -> DICOMwebClient:
    return DICOMwebClient(url or orthanc.dicomweb_url, session=orthanc.session())


@pytest.fixture(scope="module")
def loaded(orthanc: Orthanc, studies: dict[str, Any]) -> dict[str, Any]:
    report = store_datasets(_client(orthanc), list(studies.values()), batch=4)
    assert report.failed == ()
    assert sorted(report.stored) == sorted(str(ds.SOPInstanceUID) for ds in studies.values())
    return studies


@pytest.fixture(scope="module")
def pacs(orthanc: Orthanc, loaded: dict[str, Any]) -> Iterator[DicomArchive]:
    archive = open_dicomweb_archive(
        orthanc.dicomweb_url,
        username=orthanc.username,
        password=orthanc.password,
        timeout_s=10,
        max_frames=MAX_FRAMES,
    )
    yield archive
    archive.close()


@pytest.fixture(scope="module")
def folder_archive(
    loaded: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DicomArchive]:
    root = tmp_path_factory.mktemp("same-files")
    for name, ds in loaded.items():
        write_dicom(ds, root / ds.PatientID / f"{name}.dcm")
    archive = DicomArchive.from_folder(
        root, index_dir=tmp_path_factory.mktemp("index"), max_frames=MAX_FRAMES
    )
    yield archive
    archive.close()


def _instances(orthanc: Orthanc) -> int:
    with orthanc.session() as session:
        return int(
            session.get(f"{orthanc.base_url}/statistics", timeout=5).json()["CountInstances"]
        )


async def test_it_is_an_imaging_archive(pacs: DicomArchive) -> None:
    assert isinstance(pacs, ImagingArchive)


def test_storing_again_changes_nothing(orthanc: Orthanc, loaded: dict[str, Any]) -> None:
    before = _instances(orthanc)
    again = store_datasets(_client(orthanc), [loaded["old"], loaded["chest"]], batch=2)
    assert again.failed == ()
    assert sorted(again.stored) == sorted(
        [loaded["old"].SOPInstanceUID, loaded["chest"].SOPInstanceUID]
    )
    assert _instances(orthanc) == before


def test_an_object_the_archive_refuses_is_reported_and_the_rest_stored(
    orthanc: Orthanc, nih_labels: tuple[NihLabel, ...], nih_dicom: NihDicom
) -> None:
    good = nih_dicom(nih_labels[24], "O-S", OLD)
    broken = nih_dicom(nih_labels[25], "O-S", NEW)
    del broken.SOPInstanceUID  # a mandatory attribute: Orthanc refuses the object
    report = store_datasets(_client(orthanc), [good, broken], batch=2)
    assert report.stored == (good.SOPInstanceUID,)
    assert report.failed == (StoreFailure(1, "", "HTTP 400"),)


def test_storing_with_a_wrong_password_is_unavailable(
    orthanc: Orthanc, loaded: dict[str, Any]
) -> None:
    client = DICOMwebClient(orthanc.dicomweb_url, session=requests.Session())
    with pytest.raises(SourceUnavailable) as raised:
        store_datasets(client, [loaded["old"]])
    assert raised.value.reason == "STOW-RS answered HTTP 401"


@pytest.mark.parametrize("patient_id", ["O-A", "O-B", "O-C", "O-F"])
async def test_the_pacs_gives_what_the_folder_gives(
    pacs: DicomArchive, folder_archive: DicomArchive, patient_id: str
) -> None:
    over_web = await pacs.chest_images(patient_id)
    from_folder = await folder_archive.chest_images(patient_id)
    assert [i.sop_instance_uid for i in over_web.images] == [
        i.sop_instance_uid for i in from_folder.images
    ]
    for web_image, file_image in zip(over_web.images, from_folder.images, strict=True):
        np.testing.assert_array_equal(web_image.pixels, file_image.pixels)
    assert over_web.skipped == from_folder.skipped
    assert over_web.images


async def test_most_recent_first_by_patient_id(pacs: DicomArchive, loaded: dict[str, Any]) -> None:
    result = await pacs.chest_images("O-A")
    assert [i.sop_instance_uid for i in result.images] == [
        loaded["new"].SOPInstanceUID,
        loaded["old"].SOPInstanceUID,
    ]
    np.testing.assert_array_equal(result.images[0].pixels, decode_radiograph(loaded["new"]))
    assert result.skipped == ()


async def test_an_accession_number_selects_its_study(
    pacs: DicomArchive, loaded: dict[str, Any]
) -> None:
    old = loaded["old"]
    result = await pacs.chest_images(
        "O-A", accession_number=fixture_accession(old.StudyInstanceUID)
    )
    assert [i.sop_instance_uid for i in result.images] == [old.SOPInstanceUID]


@pytest.mark.parametrize("accession", ["FX*", "FX?", ""])
async def test_accession_wildcards_match_nothing(pacs: DicomArchive, accession: str) -> None:
    result = await pacs.chest_images("O-A", accession_number=accession)
    assert result.images == ()
    assert [(s.study_uid, s.reason) for s in result.skipped] == [
        ("", "no such study for this patient")
    ]


async def test_another_patients_accession_finds_nothing(
    pacs: DicomArchive, loaded: dict[str, Any]
) -> None:
    theirs = fixture_accession(loaded["native"].StudyInstanceUID)
    assert (await pacs.chest_images("O-A", accession_number=theirs)).images == ()


async def test_a_study_uid_selects_that_study(pacs: DicomArchive, loaded: dict[str, Any]) -> None:
    old = loaded["old"]
    result = await pacs.chest_images("O-A", study_uid=old.StudyInstanceUID)
    assert [i.study_uid for i in result.images] == [old.StudyInstanceUID]


async def test_an_unknown_study_is_skipped_with_a_reason(pacs: DicomArchive) -> None:
    result = await pacs.chest_images("O-A", study_uid="2.25.404")
    assert result.images == ()
    assert [(s.study_uid, s.reason) for s in result.skipped] == [
        ("2.25.404", "no such study for this patient")
    ]


async def test_the_real_chest_is_used_the_extremity_skipped_and_the_ct_ignored(
    pacs: DicomArchive, loaded: dict[str, Any]
) -> None:
    result = await pacs.chest_images("O-B")
    (image,) = result.images
    assert image.sop_instance_uid == loaded["chest"].SOPInstanceUID
    np.testing.assert_array_equal(image.pixels, decode_radiograph(loaded["chest"]))
    assert [(s.study_uid, s.reason) for s in result.skipped] == [
        (loaded["extremity"].StudyInstanceUID, "series 1 (CR): body part EXTREMITY, not CHEST")
    ]


async def test_a_ct_asked_for_by_uid_says_it_has_no_radiograph(
    pacs: DicomArchive, loaded: dict[str, Any]
) -> None:
    ct = loaded["ct"].StudyInstanceUID
    result = await pacs.chest_images("O-B", study_uid=ct)
    assert [(s.study_uid, s.reason) for s in result.skipped] == [
        (ct, "no CR or DX series in the study")
    ]


async def test_jpeg_baseline_and_lossless_decode(
    pacs: DicomArchive, loaded: dict[str, Any]
) -> None:
    result = await pacs.chest_images("O-C")
    by_uid = {i.sop_instance_uid: i.pixels for i in result.images}
    native = decode_radiograph(loaded["native"])
    np.testing.assert_array_equal(by_uid[loaded["lossless"].SOPInstanceUID], native)
    baseline = by_uid[loaded["baseline"].SOPInstanceUID]
    assert float(np.abs(baseline - native).mean()) < 0.02
    assert not np.array_equal(baseline, native)  # it did go through the lossy codec


@pytest.fixture
def proxy(orthanc: Orthanc, loaded: dict[str, Any]) -> Iterator[Proxy]:
    with proxy_to(orthanc.base_url) as running:
        yield running


def _through(proxy: Proxy, orthanc: Orthanc, **options: Any) -> DicomArchive:
    return open_dicomweb_archive(
        f"{proxy.url}/dicom-web",
        username=orthanc.username,
        password=orthanc.password,
        timeout_s=5,
        max_frames=MAX_FRAMES,
        **options,
    )


async def test_oversized_and_many_frame_objects_are_skipped_without_downloading(
    proxy: Proxy, orthanc: Orthanc, loaded: dict[str, Any]
) -> None:
    archive = _through(proxy, orthanc)
    try:
        result = await archive.chest_images("O-F")
    finally:
        archive.close()
    reasons = {s.study_uid: s.reason for s in result.skipped}
    assert reasons[loaded["huge"].StudyInstanceUID] == (
        "series 1 (DX), instance 1: 10000x10000 exceeds the 25000000-pixel limit; not retrieved"
    )
    assert reasons[loaded["frames"].StudyInstanceUID] == (
        "series 1 (DX), instance 1: 3 frames exceed the 2-frame limit; not retrieved"
    )
    retrieved = proxy.paths("instance")
    assert not any(loaded["huge"].SOPInstanceUID in path for path in retrieved)
    assert not any(loaded["frames"].SOPInstanceUID in path for path in retrieved)
    # Their metadata was read, and the usable instance was retrieved: the log is complete.
    assert any(loaded["huge"].SeriesInstanceUID in path for path in proxy.paths("metadata"))
    assert any(loaded["faulty_good"].SOPInstanceUID in path for path in retrieved)
    assert [i.sop_instance_uid for i in result.images] == [loaded["faulty_good"].SOPInstanceUID]


async def test_an_unsupported_transfer_syntax_is_skipped_and_named(
    pacs: DicomArchive, loaded: dict[str, Any]
) -> None:
    result = await pacs.chest_images("O-F", study_uid=loaded["part2"].StudyInstanceUID)
    assert result.images == ()
    assert [s.reason for s in result.skipped] == [
        "series 1 (DX), instance 1: no decoder installed for transfer syntax "
        "1.2.840.10008.1.2.4.92 (JPEG 2000 Part 2 Multi-component Image Compression "
        "(Lossless Only))"
    ]


async def test_instances_are_asked_for_as_stored(
    proxy: Proxy, orthanc: Orthanc, loaded: dict[str, Any]
) -> None:
    # Orthanc has no JPEG 2000 transcoder here: asking for another transfer syntax is a 500.
    archive = _through(proxy, orthanc)
    try:
        (image,) = (await archive.chest_images("O-B")).images
    finally:
        archive.close()
    assert image.sop_instance_uid == loaded["chest"].SOPInstanceUID
    with pytest.raises(requests.HTTPError) as refused:
        _client(orthanc).retrieve_instance(
            loaded["chest"].StudyInstanceUID,
            loaded["chest"].SeriesInstanceUID,
            loaded["chest"].SOPInstanceUID,
            media_types=(("application/dicom", "1.2.840.10008.1.2.1"),),
        )
    assert refused.value.response.status_code == 500


async def test_a_wrong_password_is_unavailable_with_a_clear_reason(orthanc: Orthanc) -> None:
    archive = open_dicomweb_archive(
        orthanc.dicomweb_url, username=orthanc.username, password="wrong", timeout_s=5
    )
    try:
        with pytest.raises(SourceUnavailable) as raised:
            await archive.chest_images("O-A")
    finally:
        archive.close()
    assert raised.value.reason == "answered HTTP 401 (credentials missing or refused)"


async def test_a_stopped_orthanc_is_unavailable() -> None:
    with running_orthanc() as short_lived:
        archive = open_dicomweb_archive(
            short_lived.dicomweb_url,
            username=short_lived.username,
            password=short_lived.password,
            timeout_s=5,
        )
        assert (await archive.chest_images("nobody")).images == ()
    try:
        with pytest.raises(SourceUnavailable) as raised:
            await archive.chest_images("nobody")
    finally:
        archive.close()
    assert raised.value.reason == "could not connect"


async def test_a_busy_answer_within_the_budget_is_retried(
    proxy: Proxy, orthanc: Orthanc, loaded: dict[str, Any]
) -> None:
    proxy.faults["studies"] = [Fault(429, {"Retry-After": "1"})]
    archive = _through(proxy, orthanc, retry_after_max_s=2)
    started = time.monotonic()
    try:
        result = await archive.chest_images("O-A")
    finally:
        archive.close()
    assert time.monotonic() - started >= 1.0
    assert [i.sop_instance_uid for i in result.images] == [
        loaded["new"].SOPInstanceUID,
        loaded["old"].SOPInstanceUID,
    ]
    assert len(proxy.paths("studies")) == 2


async def test_a_busy_answer_beyond_the_budget_fails_at_once(
    proxy: Proxy, orthanc: Orthanc
) -> None:
    proxy.faults["studies"] = [Fault(429, {"Retry-After": "30"})]
    archive = _through(proxy, orthanc, retry_after_max_s=2)
    started = time.monotonic()
    try:
        with pytest.raises(SourceUnavailable) as raised:
            await archive.chest_images("O-A")
    finally:
        archive.close()
    assert time.monotonic() - started < 1.0
    assert raised.value.reason == "answered HTTP 429 (busy; retry after 30 s)"
    assert len(proxy.paths("studies")) == 1


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (500, "answered HTTP 500"),
        (403, "answered HTTP 403 (these credentials may not read the archive)"),
        (503, "answered HTTP 503"),
    ],
)
async def test_a_failed_search_is_unavailable(
    proxy: Proxy, orthanc: Orthanc, status: int, reason: str
) -> None:
    proxy.faults["studies"] = [Fault(status)]
    archive = _through(proxy, orthanc)
    try:
        with pytest.raises(SourceUnavailable) as raised:
            await archive.chest_images("O-A")
    finally:
        archive.close()
    assert raised.value.reason == reason
    assert "O-A" not in str(raised.value)


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [
        ("metadata", 500, "series 1 (DX): metadata not retrieved (answered HTTP 500)"),
        ("instance", 404, "series 1 (DX), instance 1: not retrieved (answered HTTP 404)"),
    ],
)
async def test_a_failed_retrieval_skips_that_image_only(
    proxy: Proxy, orthanc: Orthanc, loaded: dict[str, Any], kind: str, status: int, reason: str
) -> None:
    proxy.faults[kind] = [Fault(status)]
    archive = _through(proxy, orthanc)
    try:
        result = await archive.chest_images("O-A")
    finally:
        archive.close()
    assert [i.sop_instance_uid for i in result.images] == [loaded["old"].SOPInstanceUID]
    assert [(s.study_uid, s.reason) for s in result.skipped] == [
        (loaded["new"].StudyInstanceUID, reason)
    ]


async def test_a_server_that_never_answers_is_cut_by_the_timeout() -> None:
    # A listening socket nobody accepts on: the kernel completes the connection, no answer
    # ever comes (a stand-in for a hung PACS; Orthanc cannot be made to hang).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
        archive = open_dicomweb_archive(url, timeout_s=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(SourceUnavailable) as raised:
                await archive.chest_images("O-A")
        finally:
            archive.close()
    assert raised.value.reason == "timed out"
    assert time.monotonic() - started < 3.0
