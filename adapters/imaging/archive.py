"""A DICOM archive as the source of a patient's chest radiographs.

:class:`DicomArchive` works through dicomweb-client's ``DICOMClient`` interface, so a PACS over
DICOMweb (``DICOMwebClient``) and a folder of DICOM files (``DICOMfileClient``, the embedded
default) are the same code: QIDO-RS finds the patient's studies (by PatientID, optionally
narrowed to one StudyInstanceUID or AccessionNumber) and their radiograph series (modality CR or
DX), WADO-RS metadata gives each instance's body part, dates, size and frame count, and WADO-RS
retrieves the instances that are worth decoding, most recent first, until ``limit`` images.
Instances are retrieved as ``application/dicom`` with ``transfer-syntax=*``, so the archive sends
them as stored instead of transcoding (Orthanc without a transcoder answers 500 to a request for
another transfer syntax of a JPEG 2000 object).

Size limits are applied to the metadata, before anything is downloaded: an instance whose
Rows x Columns exceeds ``max_pixels`` or whose NumberOfFrames exceeds ``max_frames`` is skipped
with a reason and never retrieved (a 10k x 10k object would be hundreds of megabytes). The
decoder checks the size again on what it receives.

Multi-frame objects: the CR and DX image IODs have no multi-frame module, so a chest radiograph
is one frame; a few frames in one object are vendor variants (views of one exposure), read
through their first frame as a viewer shows it first. Many frames are a cine or tomosynthesis
acquisition, not a radiograph: the frame limit (:data:`MAX_FRAMES` by default) skips those, and
bounds the download, which is every frame of the object.

What is not used is said, once per series or instance, in ``ImagingResult.skipped``: a series
whose BodyPartExamined is present and not CHEST or whose metadata the archive refused, an
instance that could not be retrieved or decoded. Studies without radiographs (a CT, an
ultrasound) are not reported unless they were asked for by ``study_uid``. An archive that cannot
be searched or reached at all is :class:`core.errors.SourceUnavailable` (source ``"imaging"``).

A DICOMwebClient retries failed requests by default (5 attempts with exponential backoff, about
half a minute) and waits 20 s per request: the caller sets ``set_http_retry_params`` and
``timeout`` to fit the request budget.

Two safety checks: QIDO matches PatientID and AccessionNumber with wildcards (a ``*`` in an id
would match other patients), so studies are kept only when their PatientID (and AccessionNumber,
when asked for) is exactly the one asked for; and reasons never include patient identifiers or
accession numbers.

dicomweb-client is synchronous. Its calls run on one worker thread owned by the archive, because
``DICOMfileClient`` keeps a SQLite connection that only the thread that opened it may use:
:meth:`DicomArchive.connect` and :meth:`DicomArchive.from_folder` open the client on that thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import requests
from dicomweb_client import DICOMfileClient
from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom.errors import InvalidDicomError
from retrying import RetryError

from adapters.imaging.decode import MAX_PIXELS, UndecodableImage, decode_radiograph, size_problem
from core.errors import SourceUnavailable
from core.types import ChestImage, ImagingResult, SkippedImage

__all__ = [
    "AS_STORED",
    "MAX_FRAMES",
    "RADIOGRAPHY",
    "DicomArchive",
    "DicomQueries",
    "default_index_dir",
]

logger = logging.getLogger(__name__)

RADIOGRAPHY = frozenset({"CR", "DX"})
"""The modalities whose series are read (computed and digital radiography)."""

MAX_FRAMES = 4
"""The most frames an object may have to be retrieved by default (its first frame is used)."""

AS_STORED = (("application/dicom", "*"),)
"""The WADO-RS media type asked for: the instance in the transfer syntax it was stored in."""

_SOURCE = "imaging"

# DICOMfileClient's index file, and the signature of the folder it was built from.
_INDEX_FILE = ".dicom-file-client.db"
_SIGNATURE_FILE = "folder-signature.txt"

_T = TypeVar("_T")

# DICOM JSON tags (PS3.18 F.2) of the attributes read from QIDO and metadata responses.
_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_PATIENT_ID = "00100020"
_ACCESSION = "00080050"
_ROWS, _COLUMNS, _FRAMES = "00280010", "00280011", "00280008"
_MODALITY = "00080060"
_BODY_PART = "00180015"
_SERIES_NUMBER = "00200011"
_INSTANCE_NUMBER = "00200013"
_STUDY_DATE, _STUDY_TIME = "00080020", "00080030"
_SERIES_DATE, _SERIES_TIME = "00080021", "00080031"
_ACQUISITION_DATE, _ACQUISITION_TIME = "00080022", "00080032"
_CONTENT_DATE, _CONTENT_TIME = "00080023", "00080033"

# A damaged file makes pydicom raise one of these while reading it.
_READ_ERRORS = (InvalidDicomError, EOFError, ValueError, struct.error, OSError)


def _value(item: Mapping[str, Any], tag: str) -> str | None:
    """The first value of an attribute of a DICOM JSON object, as text."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, Mapping) else None
    if not values:
        return None
    first = values[0]
    if isinstance(first, Mapping):  # a person name: {"Alphabetic": ...}
        return str(first.get("Alphabetic", ""))
    return str(first)


def _when(item: Mapping[str, Any], *pairs: tuple[str, str]) -> str:
    """``YYYYMMDDHHMMSS...`` from the first date/time pair present; ``""`` sorts oldest."""
    for date_tag, time_tag in pairs:
        day = _value(item, date_tag)
        if day:
            return day + (_value(item, time_tag) or "")
    return ""


def _number(item: Mapping[str, Any], tag: str) -> int:
    text = _value(item, tag)
    try:
        return int(float(text)) if text else 0
    except ValueError:
        return 0


def _failure_reason(error: requests.RequestException | RetryError) -> str:
    """Why a request to the archive failed, in words without identifiers (the exceptions' own
    messages hold the request URL, which holds the PatientID)."""
    if isinstance(error, RetryError):
        status = getattr(error.last_attempt.value, "status_code", None)
        return f"answered HTTP {status} after retries" if status else "failed after retries"
    if isinstance(error, requests.Timeout):
        return "timed out"
    if isinstance(error, requests.ConnectionError):
        return "could not connect"
    if error.response is not None:
        return _status_reason(error.response)
    return f"request failed ({type(error).__name__})"


def _status_reason(response: requests.Response) -> str:
    status = response.status_code
    if status == 401:
        return "answered HTTP 401 (credentials missing or refused)"
    if status == 403:
        return "answered HTTP 403 (these credentials may not read the archive)"
    if status == 429:
        wait = response.headers.get("Retry-After", "").strip()
        return (
            f"answered HTTP 429 (busy; retry after {wait} s)"
            if wait.isdigit()
            else ("answered HTTP 429 (busy)")
        )
    return f"answered HTTP {status}"


class DicomQueries(Protocol):
    """The part of dicomweb-client's ``DICOMClient`` interface the archive uses.

    ``DICOMwebClient`` and ``DICOMfileClient`` both provide it. (dicomweb-client's own
    ``DICOMClient`` Protocol is not satisfied by its ``DICOMfileClient`` under mypy, so the
    archive asks for only what it calls.)
    """

    def search_for_studies(
        self, *, search_filters: dict[str, Any] | None = ...
    ) -> list[dict[str, Any]]:
        """QIDO-RS: studies matching the filters."""
        ...

    def search_for_series(self, study_instance_uid: str | None = ...) -> list[dict[str, Any]]:
        """QIDO-RS: series of a study."""
        ...

    def retrieve_series_metadata(
        self, study_instance_uid: str, series_instance_uid: str
    ) -> list[dict[str, Any]]:
        """WADO-RS: metadata of every instance of a series."""
        ...

    def retrieve_instance(
        self,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        media_types: tuple[str | tuple[str, str], ...] | None = ...,
    ) -> Dataset:
        """WADO-RS: one instance, in one of the media types (and transfer syntaxes) given."""
        ...


def _keeping_pydicom_settings(function: Callable[[], _T]) -> _T:
    """Call ``function`` and put pydicom's validation modes back as they were.

    ``DICOMfileClient`` switches pydicom's process-wide reading and writing validation to
    "raise" while it indexes and does not switch it back when indexing fails; every later
    ``dcmread`` in the process would then reject files pydicom normally reads with a warning.
    """
    reading = pydicom_config.settings.reading_validation_mode
    writing = pydicom_config.settings.writing_validation_mode
    try:
        return function()
    finally:
        pydicom_config.settings.reading_validation_mode = reading
        pydicom_config.settings.writing_validation_mode = writing


def _folder_signature(root: Path) -> str:
    """A digest of every file's relative path, size and modification time under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def default_index_dir(folder: Path) -> Path:
    """Where the index of a DICOM folder is kept when no ``index_dir`` is given.

    One directory per folder (named by a digest of its resolved path) under the system's
    temporary directory: outside the folder, so a read-only folder works and the index does not
    show up as a file to index.
    """
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "medirag-dicom-index" / digest


@dataclass(frozen=True, slots=True)
class _Candidate:
    """An instance of a radiograph series that may be decoded."""

    series_uid: str
    sop_uid: str
    label: str
    when: str
    order: int


class DicomArchive:
    """Chest radiographs of a patient from a DICOM archive.

    Implements :class:`core.ports.ImagingArchive`.

    Args:
        client: a dicomweb-client client (``DICOMwebClient``, ``DICOMfileClient``).
        max_pixels: larger images are skipped without being retrieved (judged by their
            metadata) or decoded.
        max_frames: objects with more frames are skipped without being retrieved.
        worker: the single thread (``ThreadPoolExecutor(1)``) all of the client's calls run on;
            a new one by default. A client bound to the thread that made it must be made on
            this thread: :meth:`connect` does that.

    Examples:
        >>> # archive = DicomArchive.from_folder("fixtures-out/dicom")
        >>> # result = await archive.chest_images(patient_id, limit=1)
        >>> # result.images[0].pixels.shape, result.skipped
    """

    def __init__(
        self,
        client: DicomQueries,
        *,
        max_pixels: int = MAX_PIXELS,
        max_frames: int = MAX_FRAMES,
        worker: ThreadPoolExecutor | None = None,
    ) -> None:
        self._client = client
        self._max_pixels = max_pixels
        self._max_frames = max_frames
        self._worker = worker or ThreadPoolExecutor(1, thread_name_prefix="dicom-archive")

    @classmethod
    def connect(
        cls,
        open_client: Callable[[], DicomQueries],
        *,
        max_pixels: int = MAX_PIXELS,
        max_frames: int = MAX_FRAMES,
    ) -> DicomArchive:
        """An archive whose client is opened on the archive's worker thread.

        Args:
            open_client: makes the client (``lambda: DICOMfileClient(...)``).
            max_pixels: larger images are skipped without being retrieved or decoded.
            max_frames: objects with more frames are skipped without being retrieved.

        Raises:
            SourceUnavailable: the client could not be opened.
        """
        worker = ThreadPoolExecutor(1, thread_name_prefix="dicom-archive")
        try:
            client = worker.submit(_keeping_pydicom_settings, open_client).result()
        except (requests.RequestException, OSError, ValueError) as error:
            worker.shutdown()
            raise SourceUnavailable(
                _SOURCE, f"could not open the archive ({type(error).__name__})"
            ) from error
        return cls(client, max_pixels=max_pixels, max_frames=max_frames, worker=worker)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike[str],
        *,
        index_dir: str | os.PathLike[str] | None = None,
        max_pixels: int = MAX_PIXELS,
        max_frames: int = MAX_FRAMES,
    ) -> DicomArchive:
        """An archive over a folder of DICOM files (searched recursively).

        ``DICOMfileClient`` keeps an SQLite index of the files' headers in ``index_dir``, never
        in the folder, so a read-only folder works. Its own incremental update is not used: in
        dicomweb-client 0.61 it re-reads every file on each start and never drops entries of
        deleted files. Instead the index is rebuilt from scratch when the folder's signature
        (each file's path, size and modification time) differs from the one recorded beside
        the index, and reused as is otherwise, so a second start over an unchanged folder reads
        no DICOM file.

        Args:
            folder: the folder of DICOM files; only read.
            index_dir: where to keep the index (created if missing); by default
                :func:`default_index_dir`.
            max_pixels: larger images are skipped without being retrieved or decoded.
            max_frames: objects with more frames are skipped without being retrieved.

        Raises:
            NotADirectoryError: ``folder`` is not a directory.
            SourceUnavailable: the index could not be built. ``DICOMfileClient`` gives up on
                the whole folder when one file's encapsulated pixel data is truncated.
        """
        root = Path(folder).resolve()
        if not root.is_dir():
            raise NotADirectoryError(f"not a folder of DICOM files: {root}")
        index = Path(index_dir) if index_dir is not None else default_index_dir(root)
        index.mkdir(parents=True, exist_ok=True)
        signature = _folder_signature(root)
        stamp = index / _SIGNATURE_FILE
        fresh = (index / _INDEX_FILE).is_file() and (
            stamp.is_file() and stamp.read_text(encoding="utf-8") == signature
        )
        if not fresh:
            logger.info("indexing the DICOM folder (new, or changed since it was indexed)")
        # dicomweb-client reads the folder path from the URL without unquoting it, so the path
        # is given as is rather than through Path.as_uri().
        archive = cls.connect(
            partial(
                DICOMfileClient,
                url=f"file://{root}",
                db_dir=index,
                update_db=False,
                recreate_db=not fresh,
            ),
            max_pixels=max_pixels,
            max_frames=max_frames,
        )
        if not fresh:
            stamp.write_text(signature, encoding="utf-8")
        return archive

    def close(self) -> None:
        """Stop the worker thread (the client itself is the caller's to close)."""
        self._worker.shutdown(wait=False)

    async def _call(self, function: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, _keeping_pydicom_settings, function)

    async def _query(self, function: Callable[[], _T]) -> _T:
        try:
            return await self._call(function)
        except (requests.RequestException, RetryError) as error:
            raise SourceUnavailable(_SOURCE, _failure_reason(error)) from error
        except OSError as error:
            raise SourceUnavailable(_SOURCE, f"read failed ({type(error).__name__})") from error
        except ValueError as error:
            # dicomweb-client's checks of what the archive sent (UIDs, media types).
            raise SourceUnavailable(
                _SOURCE, f"sent an unusable answer ({type(error).__name__})"
            ) from error

    async def _studies(
        self, patient_id: str, study_uid: str | None, accession_number: str | None
    ) -> list[dict[str, Any]]:
        filters = {"PatientID": patient_id}
        if study_uid is not None:
            filters["StudyInstanceUID"] = study_uid
        if accession_number is not None:
            filters["AccessionNumber"] = accession_number
        found = await self._query(partial(self._client.search_for_studies, search_filters=filters))
        studies = [
            s
            for s in found
            if _value(s, _PATIENT_ID) == patient_id
            and accession_number in (None, _value(s, _ACCESSION))
        ]
        # The UIDs break ties, so that every archive (a PACS, a folder) lists the same order.
        studies.sort(
            key=lambda s: (_when(s, (_STUDY_DATE, _STUDY_TIME)), _value(s, _STUDY_UID) or ""),
            reverse=True,
        )
        return studies

    async def _candidates(
        self, study_uid: str, skipped: list[SkippedImage]
    ) -> tuple[list[_Candidate], bool]:
        """The study's chest radiograph instances, most recent first, and whether the study has
        radiograph series at all."""
        series = await self._query(partial(self._client.search_for_series, study_uid))
        radiographs = [s for s in series if _value(s, _MODALITY) in RADIOGRAPHY]
        candidates: list[_Candidate] = []
        for item in radiographs:
            series_uid = _value(item, _SERIES_UID)
            if series_uid is None:
                continue
            label = f"series {_number(item, _SERIES_NUMBER)} ({_value(item, _MODALITY)})"
            try:
                metadata = await self._call(
                    partial(self._client.retrieve_series_metadata, study_uid, series_uid)
                )
            except (requests.HTTPError, RetryError) as error:
                reason = f"{label}: metadata not retrieved ({_failure_reason(error)})"
                skipped.append(SkippedImage(study_uid, reason))
                continue
            except requests.RequestException as error:
                raise SourceUnavailable(_SOURCE, _failure_reason(error)) from error
            body_parts = {(_value(m, _BODY_PART) or "").strip().upper() for m in metadata}
            other = sorted(part for part in body_parts if part and part != "CHEST")
            if other:
                skipped.append(
                    SkippedImage(study_uid, f"{label}: body part {', '.join(other)}, not CHEST")
                )
                continue
            for instance in metadata:
                sop_uid = _value(instance, _SOP_UID)
                if sop_uid is None:
                    continue
                number = _number(instance, _INSTANCE_NUMBER)
                too_large = self._too_large(instance)
                if too_large is not None:
                    reason = f"{label}, instance {number}: {too_large}; not retrieved"
                    skipped.append(SkippedImage(study_uid, reason))
                    continue
                when = _when(
                    instance,
                    (_ACQUISITION_DATE, _ACQUISITION_TIME),
                    (_CONTENT_DATE, _CONTENT_TIME),
                    (_SERIES_DATE, _SERIES_TIME),
                )
                candidates.append(
                    _Candidate(series_uid, sop_uid, f"{label}, instance {number}", when, number)
                )
        candidates.sort(key=lambda c: (c.when, c.order, c.series_uid, c.sop_uid), reverse=True)
        return candidates, bool(radiographs)

    def _too_large(self, instance: Mapping[str, Any]) -> str | None:
        """Why an instance's metadata rules out retrieving it, or ``None``.

        A missing Rows or Columns is left to the decoder: the archive may not list them.
        """
        frames = _number(instance, _FRAMES)
        if frames > self._max_frames:
            return f"{frames} frames exceed the {self._max_frames}-frame limit"
        rows, columns = _number(instance, _ROWS), _number(instance, _COLUMNS)
        if rows and columns:
            return size_problem(rows, columns, self._max_pixels)
        return None

    def _retrieve_and_decode(self, study_uid: str, candidate: _Candidate) -> ChestImage | str:
        """The decoded image, or why it is not usable (runs on the worker thread)."""
        try:
            dataset = self._client.retrieve_instance(
                study_uid, candidate.series_uid, candidate.sop_uid, media_types=AS_STORED
            )
        except (requests.HTTPError, RetryError) as error:
            return f"{candidate.label}: not retrieved ({_failure_reason(error)})"
        except requests.RequestException:
            raise  # the archive is unreachable, not this instance unusable (an OSError too)
        except _READ_ERRORS as error:
            return f"{candidate.label}: not readable as DICOM ({type(error).__name__})"
        try:
            pixels = decode_radiograph(dataset, max_pixels=self._max_pixels)
        except UndecodableImage as error:
            return f"{candidate.label}: {error.reason}"
        return ChestImage(study_uid, candidate.series_uid, candidate.sop_uid, pixels)

    async def chest_images(
        self,
        patient_id: str,
        *,
        limit: int = 4,
        study_uid: str | None = None,
        accession_number: str | None = None,
    ) -> ImagingResult:
        """Decoded chest radiographs of the patient, most recent first.

        Args:
            patient_id: the DICOM PatientID (the FHIR Patient.id in this service's archives).
            limit: the most images returned; instances beyond it are not retrieved.
            study_uid: only this study (it must belong to the patient).
            accession_number: only the study with this AccessionNumber (of the patient).

        Returns:
            The images (studies by StudyDate/StudyTime, then instances by acquisition, content
            or series date and time, newest first; ties by UID) and what was skipped, with
            reasons.

        Raises:
            SourceUnavailable: the archive could not be queried (connection refused, timed
                out, an HTTP error on a search, a file client that cannot read its index).
        """
        if limit < 1:
            return ImagingResult()
        images: list[ChestImage] = []
        skipped: list[SkippedImage] = []
        studies = await self._studies(patient_id, study_uid, accession_number)
        asked = study_uid is not None or accession_number is not None
        if asked and not studies:
            # No UID to name when only an accession number was asked for; it is not repeated.
            skipped.append(SkippedImage(study_uid or "", "no such study for this patient"))
        for study in studies:
            uid = _value(study, _STUDY_UID)
            if uid is None:
                continue
            candidates, has_radiographs = await self._candidates(uid, skipped)
            if not has_radiographs and asked:
                skipped.append(SkippedImage(uid, "no CR or DX series in the study"))
            for candidate in candidates:
                if len(images) == limit:
                    break
                try:
                    outcome = await self._call(partial(self._retrieve_and_decode, uid, candidate))
                except requests.RequestException as error:
                    raise SourceUnavailable(_SOURCE, _failure_reason(error)) from error
                if isinstance(outcome, str):
                    skipped.append(SkippedImage(uid, outcome))
                else:
                    images.append(outcome)
            if len(images) == limit:
                break
        return ImagingResult(images=tuple(images), skipped=tuple(skipped))
