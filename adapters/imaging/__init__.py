"""DICOM adapters behind :class:`core.ports.ImagingArchive`.

``archive`` finds a patient's chest radiographs through any dicomweb-client client (a PACS over
DICOMweb, or a folder of DICOM files); ``decode`` turns a DICOM image into display-ready pixels.
"""

__all__: list[str] = []
