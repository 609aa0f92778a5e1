"""The use case: from a patient in context to a brief of similar cases and literature.

:class:`Advisor` wires the ports together. It asks for the patient's labs and chest images at
the same time, embeds the images, searches similar cases by image and by labs, builds a
literature query from what it found, and searches the literature. A failure of the imaging
archive leaves the image leg out and says so; a failure of the clinical record is the caller's
to handle (CDS Hooks answers 412), because without the record there is no patient to compare.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from core.errors import SourceUnavailable
from core.labs import lab_profile
from core.ports import (
    CaseIndex,
    ClinicalRecords,
    ImageEmbedder,
    ImagingArchive,
    LiteratureIndex,
    TextEmbedder,
)
from core.retrieval import (
    CaseSearchSettings,
    LiteratureSearchSettings,
    literature_query,
    search_literature,
    similar_cases,
)
from core.types import Brief, ImagingResult, PassageHit

__all__ = ["Advisor", "AdvisorSettings"]


@dataclass(frozen=True, slots=True)
class AdvisorSettings:
    """Search settings for one brief.

    Args:
        cases: how similar cases are searched.
        literature: how literature is searched.
        max_images: the most chest images of the patient to embed.
    """

    cases: CaseSearchSettings = field(default_factory=CaseSearchSettings)
    literature: LiteratureSearchSettings = field(default_factory=LiteratureSearchSettings)
    max_images: int = 4


@dataclass(frozen=True, slots=True)
class Advisor:
    """Builds briefs. One instance serves all requests; the clinical record varies per request.

    Args:
        imaging: the PACS (or DICOM folder) the patient's chest images come from.
        image_model: the image/text model whose space the cases are indexed in.
        text_model: the text model the literature is indexed with.
        cases: the similar-case index.
        literature: the literature index.
        settings: search settings.

    Examples:
        >>> # advisor = Advisor(imaging=..., image_model=..., text_model=..., cases=...,
        >>> #                   literature=...)
        >>> # brief = await advisor.brief("123", records)
    """

    imaging: ImagingArchive
    image_model: ImageEmbedder
    text_model: TextEmbedder
    cases: CaseIndex
    literature: LiteratureIndex
    settings: AdvisorSettings = field(default_factory=AdvisorSettings)

    async def _imaging(self, patient_id: str) -> ImagingResult | SourceUnavailable:
        try:
            return await self.imaging.chest_images(patient_id, limit=self.settings.max_images)
        except SourceUnavailable as error:
            return error

    async def brief(self, patient_id: str, records: ClinicalRecords) -> Brief:
        """Retrieve similar cases and literature for one patient.

        Args:
            patient_id: the FHIR id of the patient in context.
            records: where this request's clinical data comes from (prefetch, FHIR server).

        Raises:
            SourceUnavailable: the patient's laboratory results could not be obtained.
        """
        patient_ref = f"Patient/{patient_id}"
        results, imaging = await asyncio.gather(
            records.laboratory_results(patient_id), self._imaging(patient_id)
        )
        omissions: list[str] = []
        image_vectors = None
        if isinstance(imaging, SourceUnavailable):
            omissions.append(f"imaging unavailable ({imaging.reason}); cases matched by labs only")
        else:
            omissions.extend(f"image {s.study_uid} not used: {s.reason}" for s in imaging.skipped)
            if imaging.images:
                image_vectors = await self.image_model.embed_images(
                    [image.pixels for image in imaging.images]
                )
            else:
                omissions.append("no chest radiograph on file; cases matched by labs only")

        profile = lab_profile(results)
        cases, notes = await similar_cases(
            patient_ref=patient_ref,
            image_vectors=image_vectors,
            labs=profile,
            index=self.cases,
            settings=self.settings.cases,
        )
        omissions.extend(notes)

        query = literature_query(cases, profile)
        passages: tuple[PassageHit, ...] = ()
        if query is None:
            omissions.append(
                "literature not searched: no findings in similar cases and no abnormal labs"
            )
        else:
            passages = await search_literature(
                query,
                embedder=self.text_model,
                index=self.literature,
                settings=self.settings.literature,
            )
        return Brief(
            patient_ref=patient_ref,
            cases=cases,
            passages=passages,
            literature_query=query,
            omissions=tuple(omissions),
            models=(self.image_model.card, self.text_model.card),
        )
