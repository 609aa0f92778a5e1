"""The use case: from a patient in context to a brief of similar cases and literature.

:class:`Advisor` wires the ports together. It asks for the patient's labs and chest images at
the same time, embeds the images, searches similar cases by image and by labs, builds a
literature query from what it found, and searches the literature. For draft chest imaging
orders (:meth:`Advisor.brief_for_orders`) the orders' reason is a third search leg and the
literature query (see :mod:`core.orders`).

Every step answers to the call's deadline. Data still outstanding when the time for gathering
is up is cut: missing images leave the image leg out and say so; missing labs are the caller's
to handle (CDS Hooks answers 412), because without the record there is no patient to compare.
Literature that cannot be searched in the time left is left out and said so. A slow PACS
therefore never turns into a timeout at the EHR.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from core.errors import SourceUnavailable
from core.labs import lab_profile
from core.orders import no_reason_note, order_reasons, reason_basis
from core.ports import (
    CaseIndex,
    ClinicalRecords,
    ImageEmbedder,
    ImagingArchive,
    LiteratureIndex,
    Reranker,
    SparseTextEmbedder,
    TextEmbedder,
)
from core.retrieval import (
    CaseSearchSettings,
    LegResult,
    LiteratureSearchSettings,
    image_leg,
    lab_leg,
    literature_query,
    merge_legs,
    reason_leg,
    reason_literature_query,
    search_literature,
)
from core.types import (
    Brief,
    CaseHit,
    ImagingOrder,
    ImagingResult,
    LabProfile,
    ModelCard,
    PassageHit,
    Vector,
)

__all__ = ["Advisor", "AdvisorSettings", "Gathered"]

_T = TypeVar("_T")

CASES_AND_LABS_BASIS = (
    "the findings recorded in the similar cases and this patient's abnormal laboratory results"
)


@dataclass(frozen=True, slots=True)
class AdvisorSettings:
    """Search settings and time budget for one brief.

    Args:
        cases: how similar cases are searched.
        literature: how literature is searched.
        max_images: the most chest images of the patient to embed.
        compute_reserve_s: of the call's time, what is kept for embedding and searching after
            the patient's data has been gathered.
    """

    cases: CaseSearchSettings = field(default_factory=CaseSearchSettings)
    literature: LiteratureSearchSettings = field(default_factory=LiteratureSearchSettings)
    max_images: int = 4
    compute_reserve_s: float = 1.0


@dataclass(frozen=True, slots=True)
class Gathered:
    """A patient's data as gathered for a brief.

    Args:
        labs: the lab profile.
        image_vectors: embeddings of the chest images, ``None`` when there are none.
        omissions: what could not be gathered, and why.
    """

    labs: LabProfile
    image_vectors: Vector | None
    omissions: tuple[str, ...]


async def _before(deadline: float | None, work: Awaitable[_T]) -> _T:
    """``work``, cancelled with :class:`TimeoutError` if it is not done by ``deadline``."""
    if deadline is None:
        return await work
    async with asyncio.timeout_at(deadline):
        return await work


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
        sparse_model: the sparse model the literature's sparse weights were indexed with (it may
            be ``text_model`` itself, as BGE-M3 is both); ``None`` searches literature by dense
            vector alone.
        reranker: a cross-encoder that reorders the best literature candidates; ``None`` keeps
            the search order.

    Examples:
        >>> # advisor = Advisor(imaging=..., image_model=..., text_model=..., cases=...,
        >>> #                   literature=...)
        >>> # brief = await advisor.brief("123", records, deadline=loop.time() + 4.0)
    """

    imaging: ImagingArchive
    image_model: ImageEmbedder
    text_model: TextEmbedder
    cases: CaseIndex
    literature: LiteratureIndex
    settings: AdvisorSettings = field(default_factory=AdvisorSettings)
    sparse_model: SparseTextEmbedder | None = None
    reranker: Reranker | None = None

    @property
    def models(self) -> tuple[ModelCard, ...]:
        """The cards of the models behind a brief, each once (BGE-M3, dense and sparse, is one)."""
        models: list[ModelCard] = []
        for model in (self.image_model, self.text_model, self.sparse_model, self.reranker):
            if model is not None and model.card not in models:
                models.append(model.card)
        return tuple(models)

    async def _images(
        self, patient_id: str, deadline: float | None
    ) -> ImagingResult | SourceUnavailable:
        try:
            return await _before(
                deadline, self.imaging.chest_images(patient_id, limit=self.settings.max_images)
            )
        except SourceUnavailable as error:
            return error
        except TimeoutError:
            return SourceUnavailable("imaging", "no answer within the call's time budget")

    async def _labs(
        self, patient_id: str, records: ClinicalRecords, deadline: float | None
    ) -> LabProfile:
        try:
            results = await _before(deadline, records.laboratory_results(patient_id))
        except TimeoutError:
            raise SourceUnavailable(
                "clinical record", "no answer within the call's time budget"
            ) from None
        return lab_profile(results)

    async def gather(
        self, patient_id: str, records: ClinicalRecords, *, deadline: float | None = None
    ) -> Gathered:
        """Labs and embedded chest images of a patient, fetched at the same time.

        Gathering must end ``compute_reserve_s`` before ``deadline``; images not in by then
        are left out (and said so), labs not in by then raise.

        Raises:
            SourceUnavailable: the patient's laboratory results could not be obtained.
        """
        gather_by = None if deadline is None else deadline - self.settings.compute_reserve_s
        labs, imaging = await asyncio.gather(
            self._labs(patient_id, records, gather_by), self._images(patient_id, gather_by)
        )
        omissions: list[str] = []
        vectors = None
        if isinstance(imaging, SourceUnavailable):
            omissions.append(f"imaging unavailable ({imaging.reason}); cases matched without it")
        else:
            omissions.extend(f"image {s.study_uid} not used: {s.reason}" for s in imaging.skipped)
            if imaging.images:
                vectors = await self.image_model.embed_images(
                    [image.pixels for image in imaging.images]
                )
            else:
                omissions.append("no chest radiograph on file; cases matched without an image")
        return Gathered(labs=labs, image_vectors=vectors, omissions=tuple(omissions))

    async def patient_legs(
        self, patient_ref: str, gathered: Gathered
    ) -> tuple[list[LegResult], list[str]]:
        """The image and lab legs for a gathered patient, and notes on legs that could not run."""
        legs: list[LegResult] = []
        notes: list[str] = []
        if gathered.image_vectors is not None and len(gathered.image_vectors):
            legs.append(
                await image_leg(
                    gathered.image_vectors,
                    patient_ref=patient_ref,
                    index=self.cases,
                    k=self.settings.cases.leg_k,
                )
            )
        labs = await lab_leg(
            gathered.labs, patient_ref=patient_ref, index=self.cases, settings=self.settings.cases
        )
        if isinstance(labs, str):
            notes.append(labs)
        else:
            legs.append(labs)
        return legs, notes

    async def passages(
        self, query: str, *, deadline: float | None = None
    ) -> tuple[tuple[PassageHit, ...], str | None]:
        """Literature for ``query``, or no passages and why, when the deadline cuts it."""
        try:
            found = await _before(
                deadline,
                search_literature(
                    query,
                    embedder=self.text_model,
                    index=self.literature,
                    settings=self.settings.literature,
                    sparse_embedder=self.sparse_model,
                    reranker=self.reranker,
                ),
            )
        except TimeoutError:
            return (), "literature not searched: the call's time budget ran out"
        return found, None

    async def brief(
        self, patient_id: str, records: ClinicalRecords, *, deadline: float | None = None
    ) -> Brief:
        """Retrieve similar cases and literature for one patient.

        Args:
            patient_id: the FHIR id of the patient in context.
            records: where this request's clinical data comes from (prefetch, FHIR server).
            deadline: the event loop time (``loop.time()``) by which the brief must be done;
                ``None`` for no limit.

        Raises:
            SourceUnavailable: the patient's laboratory results could not be obtained.
        """
        patient_ref = f"Patient/{patient_id}"
        gathered = await self.gather(patient_id, records, deadline=deadline)
        legs, notes = await self.patient_legs(patient_ref, gathered)
        cases = self._merge(legs, patient_ref)
        query = literature_query(cases, gathered.labs)
        return await self._with_literature(
            patient_ref,
            cases,
            query,
            CASES_AND_LABS_BASIS,
            [*gathered.omissions, *notes],
            deadline=deadline,
        )

    async def brief_for_orders(
        self,
        patient_id: str,
        records: ClinicalRecords,
        orders: Sequence[ImagingOrder],
        *,
        deadline: float | None = None,
    ) -> Brief:
        """Retrieve similar cases and literature for a patient's draft chest imaging orders.

        The orders' reasons add a third case-search leg (``reason``: each reason embedded by
        the image model's text tower, matched against the cases' recorded findings) to the
        patient's image and lab legs, and are the literature search text, with the patient's
        abnormal labs. Orders that give no reason get :meth:`brief`'s search, and the brief
        says so.

        Args:
            patient_id: the FHIR id of the patient in context.
            records: where this request's clinical data comes from (prefetch, FHIR server).
            orders: the chest imaging orders, at least one.
            deadline: the event loop time by which the brief must be done; ``None`` for no
                limit. A reason search that cannot finish by then is left out and said so.

        Raises:
            SourceUnavailable: the patient's laboratory results could not be obtained.
        """
        patient_ref = f"Patient/{patient_id}"
        gathered = await self.gather(patient_id, records, deadline=deadline)
        legs, notes = await self.patient_legs(patient_ref, gathered)
        omissions = [*gathered.omissions, *notes]
        reasons = order_reasons(orders)
        if not reasons:
            omissions.append(no_reason_note(orders))
            cases = self._merge(legs, patient_ref)
            query = literature_query(cases, gathered.labs)
            return await self._with_literature(
                patient_ref, cases, query, CASES_AND_LABS_BASIS, omissions, deadline=deadline
            )
        try:
            legs.append(await _before(deadline, self._reason_leg(reasons, patient_ref)))
        except TimeoutError:
            omissions.append("reason search not run: the call's time budget ran out")
        return await self._with_literature(
            patient_ref,
            self._merge(legs, patient_ref),
            reason_literature_query(reasons, gathered.labs),
            reason_basis(orders, gathered.labs),
            omissions,
            deadline=deadline,
        )

    async def _reason_leg(self, reasons: Sequence[str], patient_ref: str) -> LegResult:
        vectors = await self.image_model.embed_findings(list(reasons))
        return await reason_leg(
            vectors, patient_ref=patient_ref, index=self.cases, k=self.settings.cases.leg_k
        )

    def _merge(self, legs: Sequence[LegResult], patient_ref: str) -> tuple[CaseHit, ...]:
        return merge_legs(
            legs,
            patient_ref=patient_ref,
            k=self.settings.cases.k,
            rrf_k=self.settings.cases.rrf_k,
        )

    async def _with_literature(
        self,
        patient_ref: str,
        cases: tuple[CaseHit, ...],
        query: str | None,
        basis: str,
        omissions: list[str],
        *,
        deadline: float | None,
    ) -> Brief:
        """The brief: ``cases``, and literature for ``query`` (built from ``basis``)."""
        passages: tuple[PassageHit, ...] = ()
        if query is None:
            omissions.append(
                "literature not searched: no findings in similar cases and no abnormal labs"
            )
        else:
            passages, cut = await self.passages(query, deadline=deadline)
            if cut:
                omissions.append(cut)
        return Brief(
            patient_ref=patient_ref,
            cases=cases,
            passages=passages,
            literature_query=query,
            literature_basis=basis if query else None,
            omissions=tuple(omissions),
            models=self.models,
        )
