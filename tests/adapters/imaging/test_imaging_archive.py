"""DicomArchive over real DICOM folders (DICOMfileClient) and real DICOMwebClients.

The folder holds, under three patients: two NIH-built chest studies of different dates; the
real RG1 chest and RG3 extremity radiographs; and a good study beside a damaged JPEG 2000 file
and a truncated native one. The DICOMweb tests here talk to small stdlib HTTP servers on the
loopback interface that misbehave on purpose (a dropped connection, a 503 to everything) or
serve one hand-made dataset; the real PACS, Orthanc, is in test_imaging_orthanc.py.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom import Dataset

from adapters.imaging.archive import DicomArchive
from adapters.imaging.decode import decode_radiograph
from core.errors import SourceUnavailable
from core.ports import ImagingArchive
from fixtures.cxr_dicom import write_dicom
from fixtures.nih_labels import NihLabel
from fixtures.real_radiographs import REAL_CHEST, REAL_EXTREMITY, add_real_radiographs

pytestmark = pytest.mark.anyio

NihDicom = Callable[[NihLabel, str, date], Dataset]

OLD, NEW = date(2019, 1, 1), date(2021, 6, 1)


def _damage_codestream(source: Path, target: Path) -> None:
    data = bytearray(source.read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # JPEG 2000 SOC and SIZ markers
    data[start + 2 : start + 200] = bytes(198)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(data))


def _truncated_native(ds: Dataset, target: Path) -> None:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    target.write_bytes(buffer.getvalue()[:-1000])


@pytest.fixture(scope="module")
def folder(
    tmp_path_factory: pytest.TempPathFactory,
    dicom_dir: Path,
    nih_labels: tuple[NihLabel, ...],
    nih_dicom: NihDicom,
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("archive") / "dicom"
    old = nih_dicom(nih_labels[0], "P-A", OLD)
    new = nih_dicom(nih_labels[1], "P-A", NEW)
    write_dicom(old, root / "P-A" / "old.dcm")
    write_dicom(new, root / "P-A" / "new.dcm")
    real = add_real_radiographs(root, "P-B", source_dir=dicom_dir)
    good = nih_dicom(nih_labels[2], "P-C", OLD)
    write_dicom(good, root / "P-C" / "good.dcm")
    damaged = add_real_radiographs(root / "staging", "P-C", source_dir=dicom_dir)[REAL_CHEST]
    _damage_codestream(damaged, root / "P-C" / "damaged.dcm")
    shutil.rmtree(root / "staging")
    _truncated_native(nih_dicom(nih_labels[3], "P-C", NEW), root / "P-C" / "truncated.dcm")
    return {"root": root, "old": old, "new": new, "real": real, "good": good}


@pytest.fixture(scope="module")
def archive(
    folder: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DicomArchive]:
    opened = DicomArchive.from_folder(folder["root"], index_dir=tmp_path_factory.mktemp("index"))
    yield opened
    opened.close()


async def test_it_is_an_imaging_archive(archive: DicomArchive) -> None:
    assert isinstance(archive, ImagingArchive)


async def test_most_recent_first_and_at_most_limit(
    archive: DicomArchive, folder: dict[str, Any]
) -> None:
    both = await archive.chest_images("P-A", limit=4)
    assert [i.sop_instance_uid for i in both.images] == [
        folder["new"].SOPInstanceUID,
        folder["old"].SOPInstanceUID,
    ]
    assert both.skipped == ()
    newest = await archive.chest_images("P-A", limit=1)
    assert [i.study_uid for i in newest.images] == [folder["new"].StudyInstanceUID]
    assert (await archive.chest_images("P-A", limit=0)).images == ()


@pytest.mark.parametrize("newest_file", ["a.dcm", "b.dcm"])
async def test_studies_are_ordered_by_date_whatever_the_file_order(
    tmp_path: Path, nih_labels: tuple[NihLabel, ...], nih_dicom: NihDicom, newest_file: str
) -> None:
    root = tmp_path / "dicom"
    new, old = nih_dicom(nih_labels[6], "P-O", NEW), nih_dicom(nih_labels[7], "P-O", OLD)
    oldest_file = "b.dcm" if newest_file == "a.dcm" else "a.dcm"
    write_dicom(new, root / "P-O" / newest_file)
    write_dicom(old, root / "P-O" / oldest_file)
    archive = DicomArchive.from_folder(root, index_dir=tmp_path / "index")
    try:
        found = await archive.chest_images("P-O")
    finally:
        archive.close()
    assert [i.study_uid for i in found.images] == [new.StudyInstanceUID, old.StudyInstanceUID]


@pytest.mark.parametrize("newest_file", ["a.dcm", "b.dcm"])
@pytest.mark.parametrize("newest_series", ["2.25.1", "2.25.99999999999999999999999999999999999999"])
async def test_series_of_a_study_are_ordered_by_date_whatever_the_file_or_uid_order(
    tmp_path: Path,
    nih_labels: tuple[NihLabel, ...],
    nih_dicom: NihDicom,
    newest_file: str,
    newest_series: str,
) -> None:
    root = tmp_path / "dicom"
    old = nih_dicom(nih_labels[8], "P-S", OLD)
    new = copy.deepcopy(old)
    new.SeriesInstanceUID, new.SOPInstanceUID = newest_series, "2.25.1002"
    new.file_meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
    new.SeriesNumber, new.ContentDate = 2, NEW.strftime("%Y%m%d")
    oldest_file = "b.dcm" if newest_file == "a.dcm" else "a.dcm"
    write_dicom(new, root / "P-S" / newest_file)
    write_dicom(old, root / "P-S" / oldest_file)
    archive = DicomArchive.from_folder(root, index_dir=tmp_path / "index")
    try:
        found = await archive.chest_images("P-S")
    finally:
        archive.close()
    assert [i.sop_instance_uid for i in found.images] == ["2.25.1002", old.SOPInstanceUID]


async def test_the_image_is_the_stored_one(archive: DicomArchive, folder: dict[str, Any]) -> None:
    (image,) = (await archive.chest_images("P-A", limit=1)).images
    assert image.series_uid == folder["new"].SeriesInstanceUID
    np.testing.assert_array_equal(image.pixels, decode_radiograph(folder["new"]))


async def test_a_study_uid_selects_that_study(
    archive: DicomArchive, folder: dict[str, Any]
) -> None:
    old_study = folder["old"].StudyInstanceUID
    result = await archive.chest_images("P-A", study_uid=old_study)
    assert [i.study_uid for i in result.images] == [old_study]


async def test_another_patients_study_is_not_returned(
    archive: DicomArchive, folder: dict[str, Any]
) -> None:
    theirs = folder["good"].StudyInstanceUID
    result = await archive.chest_images("P-A", study_uid=theirs)
    assert result.images == ()
    assert [(s.study_uid, s.reason) for s in result.skipped] == [
        (theirs, "no such study for this patient")
    ]


async def test_the_real_chest_is_used_and_the_extremity_is_skipped(
    archive: DicomArchive, folder: dict[str, Any]
) -> None:
    chest = pydicom.dcmread(folder["real"][REAL_CHEST])
    extremity = pydicom.dcmread(folder["real"][REAL_EXTREMITY])
    result = await archive.chest_images("P-B")
    (image,) = result.images
    assert image.sop_instance_uid == chest.SOPInstanceUID
    assert image.pixels.shape == (1955, 1841)
    assert [(s.study_uid, s.reason) for s in result.skipped] == [
        (extremity.StudyInstanceUID, "series 1 (CR): body part EXTREMITY, not CHEST")
    ]


async def test_damaged_instances_are_skipped_with_reasons(
    archive: DicomArchive, folder: dict[str, Any]
) -> None:
    result = await archive.chest_images("P-C")
    assert [i.sop_instance_uid for i in result.images] == [folder["good"].SOPInstanceUID]
    reasons = sorted(s.reason for s in result.skipped)
    assert len(reasons) == 2
    assert reasons[0].endswith("pixel data could not be decoded (RuntimeError)")
    assert reasons[1].endswith("pixel data could not be decoded (ValueError)")


@pytest.mark.parametrize("patient_id", ["*", "P-*", "P-?", "no-such-patient"])
async def test_wildcards_and_unknown_patients_find_nothing(
    archive: DicomArchive, patient_id: str
) -> None:
    result = await archive.chest_images(patient_id)
    assert result.images == ()
    assert result.skipped == ()


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_a_read_only_shared_folder_works_and_is_not_written(
    dicom_dir: Path, tmp_path: Path
) -> None:
    before = _names(dicom_dir)
    archive = DicomArchive.from_folder(dicom_dir, index_dir=tmp_path / "index")
    try:
        chest = await archive.chest_images("9RG1")
        extremity = await archive.chest_images("11RG3")
    finally:
        archive.close()
    assert len(chest.images) == 1
    assert extremity.images == ()
    assert "EXTREMITY" in extremity.skipped[0].reason
    assert _names(dicom_dir) == before
    assert (tmp_path / "index" / ".dicom-file-client.db").is_file()


async def test_an_unchanged_folder_reuses_its_index(
    tmp_path: Path, nih_labels: tuple[NihLabel, ...], nih_dicom: NihDicom
) -> None:
    root, index = tmp_path / "dicom", tmp_path / "index"
    path = root / "P-D" / "a.dcm"
    write_dicom(nih_dicom(nih_labels[4], "P-D", OLD), path)
    first = DicomArchive.from_folder(root, index_dir=index)
    first.close()
    # Same size and times, another PatientID: only re-reading the file would notice.
    times = path.stat()
    renamed = pydicom.dcmread(path)
    renamed.PatientID = "P-X"
    write_dicom(renamed, path)
    assert path.stat().st_size == times.st_size
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    second = DicomArchive.from_folder(root, index_dir=index)
    try:
        assert len((await second.chest_images("P-D")).images) == 1
        assert (await second.chest_images("P-X")).images == ()
    finally:
        second.close()


async def test_a_changed_folder_is_indexed_again(
    tmp_path: Path, nih_labels: tuple[NihLabel, ...], nih_dicom: NihDicom
) -> None:
    root, index = tmp_path / "dicom", tmp_path / "index"
    write_dicom(nih_dicom(nih_labels[4], "P-D", OLD), root / "P-D" / "a.dcm")
    first = DicomArchive.from_folder(root, index_dir=index)
    assert len((await first.chest_images("P-D")).images) == 1
    first.close()

    write_dicom(nih_dicom(nih_labels[5], "P-E", OLD), root / "P-E" / "b.dcm")
    (root / "P-D" / "a.dcm").unlink()
    second = DicomArchive.from_folder(root, index_dir=index)
    try:
        assert len((await second.chest_images("P-E")).images) == 1
        assert (await second.chest_images("P-D")).images == ()
    finally:
        second.close()


async def test_a_file_deleted_while_open_is_skipped_not_fatal(
    tmp_path: Path, nih_labels: tuple[NihLabel, ...], nih_dicom: NihDicom
) -> None:
    root = tmp_path / "dicom"
    kept, gone = nih_dicom(nih_labels[9], "P-G", OLD), nih_dicom(nih_labels[10], "P-G", NEW)
    write_dicom(kept, root / "P-G" / "kept.dcm")
    write_dicom(gone, root / "P-G" / "gone.dcm")
    archive = DicomArchive.from_folder(root, index_dir=tmp_path / "index")
    try:
        (root / "P-G" / "gone.dcm").unlink()
        found = await archive.chest_images("P-G")
    finally:
        archive.close()
    assert [i.sop_instance_uid for i in found.images] == [kept.SOPInstanceUID]
    assert [(s.study_uid, s.reason) for s in found.skipped] == [
        (gone.StudyInstanceUID, "series 1 (DX): metadata not retrieved (answered HTTP 500)")
    ]


async def test_a_truncated_encapsulated_file_makes_the_folder_unavailable(
    tmp_path: Path, dicom_dir: Path
) -> None:
    # A known DICOMfileClient limitation: indexing gives up on the whole folder.
    data = (dicom_dir / REAL_CHEST).read_bytes()
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceUnavailable) as raised:
        DicomArchive.from_folder(tmp_path / "dicom", index_dir=tmp_path / "index")
    assert raised.value.source == "imaging"
    assert raised.value.reason == "could not open the archive (OSError)"


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        DicomArchive.from_folder(tmp_path / "absent", index_dir=tmp_path / "index")


def _pacs(url: str, *, attempts: int) -> DICOMwebClient:
    """A DICOMweb client that tries ``attempts`` times, 10 ms apart (its default is 5 times
    with exponential backoff, about 30 s in all)."""
    client = DICOMwebClient(url=url, timeout=2)
    client.set_http_retry_params(
        retry=attempts > 1, max_attempts=attempts, wait_exponential_multiplier=10
    )
    return client


async def test_a_pacs_nobody_listens_on_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    archive = DicomArchive(_pacs(f"http://127.0.0.1:{port}/dicom-web", attempts=1))
    try:
        with pytest.raises(SourceUnavailable) as raised:
            await archive.chest_images("P-A")
    finally:
        archive.close()
    assert (raised.value.source, raised.value.reason) == ("imaging", "could not connect")


class _Failing(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def failing_pacs() -> Iterator[str]:
    """A DICOMweb URL whose server answers 503 to everything."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("attempts", "reason"), [(1, "answered HTTP 503"), (2, "answered HTTP 503 after retries")]
)
async def test_a_pacs_answering_an_error_is_unavailable_without_the_patient(
    failing_pacs: str, attempts: int, reason: str
) -> None:
    archive = DicomArchive(_pacs(failing_pacs, attempts=attempts))
    try:
        with pytest.raises(SourceUnavailable) as raised:
            await archive.chest_images("P-SECRET-ID")
    finally:
        archive.close()
    assert raised.value.reason == reason
    assert "P-SECRET-ID" not in str(raised.value)


class _DicomWeb(ThreadingHTTPServer):
    """A minimal DICOMweb server (QIDO-RS, WADO-RS metadata and instance) over one dataset, a
    stand-in that can drop a connection on cue (test_imaging_orthanc.py has the real PACS).
    With ``drop_retrieve`` it closes the connection when the instance itself is asked for."""

    daemon_threads = True

    def __init__(self, dataset: Dataset, *, drop_retrieve: bool) -> None:
        super().__init__(("127.0.0.1", 0), _DicomWebHandler)
        self.dataset = dataset
        self.drop_retrieve = drop_retrieve


class _DicomWebHandler(BaseHTTPRequestHandler):
    server: _DicomWeb

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _json(self, content: Any) -> None:
        data = json.dumps(content).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        ds = self.server.dataset
        header = ds.to_json_dict()
        del header["7FE00010"]
        path = urlsplit(self.path).path.removeprefix("/dicom-web/").split("/")
        if path == ["studies"]:
            patient = parse_qs(urlsplit(self.path).query).get("PatientID", [""])[0]
            self._json([header] if patient == ds.PatientID else [])
        elif path[2:] == ["series"] or path[-1] == "metadata":
            self._json([header])
        elif self.server.drop_retrieve:
            self.close_connection = True
        else:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            body = b"".join(
                [b"--XX\r\nContent-Type: application/dicom\r\n\r\n", buffer.getvalue(),
                 b"\r\n--XX--\r\n"]
            )  # fmt: skip
            self.send_response(200)
            self.send_header(
                "Content-Type", 'multipart/related; type="application/dicom"; boundary=XX'
            )
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@pytest.mark.parametrize("drop_retrieve", [False, True])
async def test_a_dicomweb_archive_through_dicomweb_client(
    nih_labels: tuple[NihLabel, ...], nih_dicom: NihDicom, drop_retrieve: bool
) -> None:
    dataset = nih_dicom(nih_labels[11], "P-W", NEW)
    server = _DicomWeb(dataset, drop_retrieve=drop_retrieve)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    archive = DicomArchive(_pacs(url, attempts=1))
    try:
        if drop_retrieve:
            with pytest.raises(SourceUnavailable) as raised:
                await archive.chest_images("P-W")
            assert raised.value.reason == "could not connect"
        else:
            (image,) = (await archive.chest_images("P-W")).images
            assert image.sop_instance_uid == dataset.SOPInstanceUID
            np.testing.assert_array_equal(image.pixels, decode_radiograph(dataset))
            assert (await archive.chest_images("P-other")).images == ()
    finally:
        archive.close()
        server.shutdown()
        server.server_close()
