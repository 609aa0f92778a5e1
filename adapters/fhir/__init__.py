"""FHIR R4 adapters behind :class:`core.ports.ClinicalRecords`, and FHIR ingestion sources.

``client`` reads a FHIR server's REST API (with ``resilience``: retries and a circuit breaker;
``smart_backend``: SMART Backend Services tokens), ``prefetch`` a CDS Hooks request's prefetch
(with the server as fallback), ``bundle_folder`` a folder of Synthea bundles (the embedded
default for the demo and tests), ``bulk`` a Bulk Data export and its NDJSON files; ``parse``,
``observations`` and ``units`` turn FHIR JSON into laboratory results for all of them,
``radiology`` and ``cases`` turn ImagingStudy and radiology DiagnosticReport resources into past
cases for ingestion.
"""

__all__: list[str] = []
