"""Loading DICOM objects into an archive with STOW-RS, as fixture studies are loaded.

:func:`store_datasets` sends datasets in batches through dicomweb-client's ``store_instances``
and reports, per object, whether the archive holds it afterwards. Storing is idempotent: an
archive that already holds an instance (same SOP Instance UID) answers success again (Orthanc
keeps the stored copy), so a loader can be rerun.

Every object is sent as a DICOM file (PS3.10: preamble, ``DICM``, file meta information), as
PS3.18 requires of ``application/dicom``. dicomweb-client writes a dataset that was built in
memory (it has no preamble) without the ``DICM`` prefix; Orthanc accepts that, stores it as
received and serves it back so, and dicomweb-client's own WADO-RS reader then refuses it. A
dataset without a preamble is therefore sent with an empty one.

An archive that refuses a whole batch (HTTP 400 or 409, as Orthanc does for an object without a
mandatory attribute) is asked again one object at a time, so that the report names each object
it refused and the rest are still stored.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from pydicom import Dataset

from core.errors import SourceUnavailable

__all__ = ["DicomStore", "StoreFailure", "StoreReport", "store_datasets"]

_SOURCE = "imaging archive"

# PS3.18 Table I.2-1 / PS3.4 C.4.2.1.4: the FailureReason codes an archive sends.
_FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
}


class DicomStore(Protocol):
    """The part of dicomweb-client's ``DICOMwebClient`` a loader uses (STOW-RS)."""

    def store_instances(
        self, datasets: Sequence[Dataset], study_instance_uid: str | None = ...
    ) -> Dataset:
        """STOW-RS: store the datasets; the archive's response."""
        ...


@dataclass(frozen=True, slots=True)
class StoreFailure:
    """An object the archive did not store.

    Attributes:
        index: its position in the sequence given to :func:`store_datasets`.
        sop_instance_uid: its SOPInstanceUID (``""`` when it has none).
        reason: the archive's reason, in words.
    """

    index: int
    sop_instance_uid: str
    reason: str


@dataclass(frozen=True, slots=True)
class StoreReport:
    """What a load did: the SOP Instance UIDs the archive confirmed, and the failures."""

    stored: tuple[str, ...] = ()
    failed: tuple[StoreFailure, ...] = ()


def _reason(item: Dataset) -> str:
    code = item.get("FailureReason")
    if code is None:
        return "refused"
    return _FAILURE_REASONS.get(int(code), f"failure reason {int(code):#06x}")


def _outcome(
    response: Dataset, batch: Sequence[tuple[int, Dataset]]
) -> tuple[list[str], list[StoreFailure]]:
    """The archive's STOW-RS response read against the batch that was sent."""
    failed_items: dict[str, Any] = {
        str(item.get("ReferencedSOPInstanceUID", "")): item
        for item in response.get("FailedSOPSequence", [])
    }
    stored = [
        str(item.ReferencedSOPInstanceUID)
        for item in response.get("ReferencedSOPSequence", [])
        if "ReferencedSOPInstanceUID" in item
    ]
    failures = [
        StoreFailure(index, uid, _reason(failed_items[uid]))
        for index, ds in batch
        if (uid := str(ds.get("SOPInstanceUID", ""))) in failed_items
    ]
    return stored, failures


def _as_file(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy of it with the empty preamble that makes it a PS3.10 file."""
    if getattr(ds, "preamble", None) is not None:
        return ds
    framed = copy.copy(ds)
    framed.preamble = bytes(128)
    return framed


def _send(
    client: DicomStore, batch: Sequence[tuple[int, Dataset]]
) -> tuple[list[str], list[StoreFailure]]:
    try:
        response = client.store_instances([_as_file(ds) for _, ds in batch])
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status not in (400, 409):
            raise SourceUnavailable(_SOURCE, f"STOW-RS answered HTTP {status}") from error
        if len(batch) > 1:
            stored: list[str] = []
            failures: list[StoreFailure] = []
            for single in batch:
                one_stored, one_failed = _send(client, [single])
                stored += one_stored
                failures += one_failed
            return stored, failures
        index, ds = batch[0]
        return [], [StoreFailure(index, str(ds.get("SOPInstanceUID", "")), f"HTTP {status}")]
    except requests.RequestException as error:
        raise SourceUnavailable(_SOURCE, f"STOW-RS failed ({type(error).__name__})") from error
    return _outcome(response, batch)


def store_datasets(
    client: DicomStore, datasets: Sequence[Dataset], *, batch: int = 16
) -> StoreReport:
    """Store DICOM objects with STOW-RS, ``batch`` objects per request.

    Args:
        client: a ``DICOMwebClient`` of the archive.
        datasets: the objects, with file meta information (their transfer syntax is kept).
        batch: objects per request (at least 1).

    Returns:
        The SOP Instance UIDs the archive confirmed and the objects it refused, with reasons.

    Raises:
        SourceUnavailable: the archive could not be reached or failed (other than by refusing
            objects), e.g. HTTP 401 or 500.
        ValueError: ``batch`` is below 1.

    Examples:
        >>> # report = store_datasets(DICOMwebClient(url, session=session), datasets)
        >>> # report.stored -> ('2.25....', ...); report.failed -> ()
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    numbered = list(enumerate(datasets))
    stored: list[str] = []
    failures: list[StoreFailure] = []
    for start in range(0, len(numbered), batch):
        one_stored, one_failed = _send(client, numbered[start : start + batch])
        stored += one_stored
        failures += one_failed
    return StoreReport(stored=tuple(stored), failed=tuple(failures))
