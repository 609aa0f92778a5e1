"""A folder of FHIR bundles answering the service's own prefetch queries.

The embedded deployment has no FHIR server; when a call brings neither a prefetch key nor a
``fhirServer``, the service runs the key's query against this instead. It answers exactly the
queries the service's templates produce, and says so for any other:

* ``Patient/<id>``: the Patient;
* ``Observation?patient=<id>&category=laboratory`` with optional ``_sort=-date`` and
  ``_count``: a searchset Bundle of the patient's laboratory Observations, newest first.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.fhir.prefetch import laboratory_bundle, patient_resource
from core.errors import SourceUnavailable

__all__ = ["BundleFolderFhir"]

_SOURCE = "bundle folder"


class BundleFolderFhir:
    """The prefetch queries of the service, answered from a folder of bundles.

    Args:
        records: the folder.

    Examples:
        >>> # fhir = BundleFolderFhir(BundleFolderRecords("../shared/data/synthea"))
        >>> # await fhir.fetch("Observation?patient=123&category=laboratory&_sort=-date")
    """

    def __init__(self, records: BundleFolderRecords) -> None:
        self._records = records

    async def fetch(self, query: str) -> dict[str, Any]:
        """Answer a read of a Patient or the laboratory search.

        Raises:
            SourceUnavailable: an unknown patient on a read, or a query this source does not
                answer.
        """
        parts = urlsplit(query)
        path = parts.path.strip("/").split("/")
        if len(path) == 2 and path[0] == "Patient" and not parts.query:
            patient = patient_resource(self._records, path[1])
            if patient is None:
                raise SourceUnavailable(_SOURCE, "no such Patient")
            return patient
        params = dict(parse_qsl(parts.query))
        allowed = {"patient", "category", "_sort", "_count"}
        if (
            path == ["Observation"]
            and params.get("category") == "laboratory"
            and params.get("_sort", "-date") == "-date"
            and "patient" in params
            and set(params) <= allowed
        ):
            bundle = laboratory_bundle(self._records, params["patient"])
            count = params.get("_count")
            if count is not None and count.isdigit():
                bundle["entry"] = bundle.get("entry", [])[: int(count)]
                if not bundle["entry"]:
                    del bundle["entry"]
            return bundle
        raise SourceUnavailable(_SOURCE, "query not supported by the bundle folder")
