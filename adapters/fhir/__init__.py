"""FHIR R4 adapters behind :class:`core.ports.ClinicalRecords`.

``client`` reads a FHIR server's REST API, ``prefetch`` a CDS Hooks request's prefetch (with the
server as fallback), ``bundle_folder`` a folder of Synthea bundles (the embedded default for the
demo and tests); ``parse`` and ``observations`` turn FHIR JSON into laboratory results for all
three.
"""

__all__: list[str] = []
