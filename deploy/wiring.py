"""Wiring: settings in, a running service's parts out.

The only place that knows which adapter implements which port. :func:`open_components` opens
the models, the index, the imaging archive and the optional bundle folder named by the settings;
:func:`build_runtime` turns them into the :class:`cds_hooks.app.Runtime` the HTTP layer serves.
The demo uses the same two functions, so it runs exactly what ``medirag serve`` runs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.fhir.client import HttpFhirAccess
from adapters.fhir.folder_fhir import BundleFolderFhir
from adapters.fhir.orders import chest_imaging_orders
from adapters.fhir.prefetch import PrefetchRecords
from adapters.fhir.resilience import BreakerRegistry, RetryPolicy
from adapters.imaging.archive import DicomArchive
from adapters.imaging.dicomweb import open_dicomweb_archive
from adapters.models.batching import BatchSettings
from adapters.models.clip import OnnxClipEmbedder
from adapters.models.manifest import ManifestError, read_manifest
from adapters.models.rerank import OnnxReranker
from adapters.models.session import SessionSettings
from adapters.models.sparse_text import OnnxBgeM3Embedder
from adapters.models.text import OnnxTextEmbedder
from adapters.store.embedded import EmbeddedPostgres
from adapters.store.ledger import PgCardLedger
from adapters.store.pgvector_store import PgVectorStore
from adapters.store.replay_guard import PostgresReplayGuard
from adapters.store.schema import HnswParams
from cds_hooks.app import Runtime, create_app
from cds_hooks.auth import Authenticator, TrustedClient, load_trusted_clients
from cds_hooks.calls import Caller, CallPolicy
from cds_hooks.idempotency import HookInstanceCache
from cds_hooks.replay import ReplayGuardUnavailable
from cds_hooks.services import (
    LABS_PREFETCH_KEY,
    PATIENT_VIEW,
    order_select_service,
    order_sign_service,
)
from core.advisor import Advisor, AdvisorSettings
from core.brief_cards import SmartApp
from core.errors import SourceUnavailable
from core.ingestion import FusionWeights
from core.ports import ClinicalRecords
from core.retrieval import CaseSearchSettings, LiteratureSearchSettings
from deploy.settings import Settings

__all__ = [
    "Components",
    "ConfigurationError",
    "LoadedModels",
    "app_for",
    "build_runtime",
    "load_models",
    "open_components",
    "open_index",
    "open_ledger",
    "trusted_clients",
]

log = logging.getLogger(__name__)


class ConfigurationError(Exception):
    """The settings cannot give a working service; the message says what to change."""


@dataclass(frozen=True, slots=True)
class LoadedModels:
    """The models a deployment serves.

    Args:
        image_model: the image/text model the cases are indexed with.
        text_model: the text model the literature's dense vectors come from.
        sparse_model: the model of the literature's sparse weights: the text model itself when
            it is BGE-M3 (one run gives both), else ``None`` (dense search only).
        reranker: the cross-encoder that reranks the literature's fused candidates, if any.
    """

    image_model: OnnxClipEmbedder
    text_model: OnnxTextEmbedder | OnnxBgeM3Embedder
    sparse_model: OnnxBgeM3Embedder | None
    reranker: OnnxReranker | None

    async def aclose(self) -> None:
        """Stop every model's batchers."""
        await self.image_model.aclose()
        await self.text_model.aclose()
        if self.reranker is not None:
            await self.reranker.aclose()


@dataclass(frozen=True, slots=True)
class Components:
    """The opened adapters of one deployment.

    Args:
        models: the models served.
        store: the case and literature index.
        ledger: the cards issued and the feedback on them, in the index database.
        replay_guard: the JWT ids already used, in the index database, so that every process
            of a deployment refuses a replayed token.
        imaging: the PACS, or the folder of DICOM files.
        bundles: the folder of FHIR bundles, when configured.
        http: the HTTP client shared by FHIR calls and JWK Set fetches.
        fusion: the late fusion weights of indexed cases.
    """

    models: LoadedModels
    store: PgVectorStore
    ledger: PgCardLedger
    replay_guard: PostgresReplayGuard
    imaging: DicomArchive
    bundles: BundleFolderRecords | None
    http: httpx.AsyncClient
    fusion: FusionWeights

    @property
    def image_model(self) -> OnnxClipEmbedder:
        """The image/text model the cases are indexed with."""
        return self.models.image_model

    @property
    def text_model(self) -> OnnxTextEmbedder | OnnxBgeM3Embedder:
        """The text model the literature is indexed with."""
        return self.models.text_model

    @property
    def sparse_model(self) -> OnnxBgeM3Embedder | None:
        """The model of the literature's sparse weights, if any."""
        return self.models.sparse_model

    @property
    def reranker(self) -> OnnxReranker | None:
        """The literature reranker, if any."""
        return self.models.reranker


def session_settings(settings: Settings) -> tuple[SessionSettings, BatchSettings]:
    """The ONNX Runtime session and batching settings of a deployment.

    Raises:
        ConfigurationError: an ONNX Runtime setting is invalid.
    """
    try:
        session = SessionSettings(
            providers=settings.onnx_providers,
            precision=settings.onnx_precision,
            graph_optimization=settings.onnx_graph_optimization,
            intra_op_threads=settings.onnx_intra_op_threads,
            inter_op_threads=settings.onnx_inter_op_threads,
            warmup=settings.onnx_warmup,
            trt_cache_dir=settings.onnx_trt_cache_dir,
            device_id=settings.onnx_device_id,
        )
    except ValueError as error:
        raise ConfigurationError(f"ONNX Runtime settings: {error}") from error
    return session, BatchSettings(
        max_batch=settings.batch_max, max_wait_ms=settings.batch_max_wait_ms
    )


def load_models(settings: Settings) -> LoadedModels:
    """Open the models the settings name, each from its folder under ``models_path``.

    The text model's folder decides whether literature search is hybrid: a BGE-M3 export
    (kind ``dense-sparse-text-embedder``) serves both the dense and the sparse leg; any other
    text embedder serves the dense leg alone. ``MEDIRAG_RERANKER`` adds the cross-encoder.

    Raises:
        ConfigurationError: a model folder is missing, damaged or of the wrong kind, or an ONNX
            Runtime setting is invalid.
    """
    session, batching = session_settings(settings)
    text_dir = settings.models_path / settings.text_model
    try:
        image_model = OnnxClipEmbedder(
            settings.models_path / settings.image_model, session=session, batching=batching
        )
        hybrid = read_manifest(text_dir).kind == "dense-sparse-text-embedder"
        text_model: OnnxTextEmbedder | OnnxBgeM3Embedder = (
            OnnxBgeM3Embedder(text_dir, session=session, batching=batching)
            if hybrid
            else OnnxTextEmbedder(text_dir, session=session, batching=batching)
        )
        reranker = (
            OnnxReranker(
                settings.models_path / settings.reranker, session=session, batching=batching
            )
            if settings.reranker
            else None
        )
    except ManifestError as error:
        raise ConfigurationError(
            f"{error}. `medirag demo` builds the default models into {settings.models_path}."
        ) from error
    except ValueError as error:
        raise ConfigurationError(f"ONNX Runtime settings: {error}") from error
    models = LoadedModels(
        image_model=image_model,
        text_model=text_model,
        sparse_model=text_model if isinstance(text_model, OnnxBgeM3Embedder) else None,
        reranker=reranker,
    )
    for model in (image_model, text_model, reranker):
        if model is not None:
            for graph in model.runtime.graphs:
                log.info("model graph loaded", extra=graph.to_log())
    return models


def _open_imaging(settings: Settings) -> DicomArchive:
    if settings.dicomweb_url:
        password = settings.dicomweb_password
        try:
            return open_dicomweb_archive(
                settings.dicomweb_url,
                username=settings.dicomweb_username,
                password=password.get_secret_value() if password is not None else None,
                timeout_s=settings.dicomweb_timeout_s,
                retry_after_max_s=settings.dicomweb_retry_after_max_s,
                max_pixels=settings.dicom_max_pixels,
                max_frames=settings.dicom_max_frames,
            )
        except ValueError as error:
            raise ConfigurationError(
                f"{error}: set both MEDIRAG_DICOMWEB_USERNAME and MEDIRAG_DICOMWEB_PASSWORD, "
                "or neither"
            ) from error
    try:
        return DicomArchive.from_folder(
            settings.dicom_path,
            max_pixels=settings.dicom_max_pixels,
            max_frames=settings.dicom_max_frames,
        )
    except NotADirectoryError as error:
        raise ConfigurationError(
            f"{error}: set MEDIRAG_DICOMWEB_URL or MEDIRAG_DICOM_DIR (`medirag demo` builds the "
            "fixture folder)"
        ) from error


@asynccontextmanager
async def open_index(settings: Settings) -> AsyncIterator[tuple[LoadedModels, PgVectorStore, str]]:
    """Open the models and the index the settings name (not the archive or the ledger), and
    close them on exit: what indexing literature needs, and the first part of
    :func:`open_components`.

    Yields:
        The models, the store, and the index database's DSN.

    Raises:
        ConfigurationError: a model named by the settings is unusable.
        SourceUnavailable: the database cannot be reached.
        IndexModelMismatch: the index was built with other models.
    """
    try:
        hnsw = HnswParams(m=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction)
    except ValueError as error:
        raise ConfigurationError(f"HNSW settings: {error}") from error
    models = load_models(settings)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(models.aclose)
        dsn = settings.dsn or stack.enter_context(EmbeddedPostgres(settings.postgres_path)).dsn
        store = await PgVectorStore.open(
            dsn,
            image_model=models.image_model.model_id,
            image_dim=models.image_model.dimension,
            text_model=models.text_model.model_id,
            text_dim=models.text_model.dimension,
            sparse_model=None if models.sparse_model is None else models.sparse_model.model_id,
            hnsw=hnsw,
            ef_search=settings.ef_search,
        )
        stack.push_async_callback(store.close)
        yield models, store, dsn


@asynccontextmanager
async def open_components(settings: Settings) -> AsyncIterator[Components]:
    """Open every adapter the settings name, and close them all on exit.

    Raises:
        ConfigurationError: a model, folder or database named by the settings is unusable.
        SourceUnavailable: the database cannot be reached.
    """
    async with AsyncExitStack() as stack:
        models, store, dsn = await stack.enter_async_context(open_index(settings))
        # After the store, whose migrations create the ledger's tables.
        ledger = await PgCardLedger.open(dsn)
        stack.push_async_callback(ledger.close)
        try:
            replay_guard = await PostgresReplayGuard.open(dsn)
        except ReplayGuardUnavailable as error:
            raise SourceUnavailable("JWT replay memory", str(error)) from error
        stack.push_async_callback(replay_guard.close)
        imaging = _open_imaging(settings)
        stack.callback(imaging.close)
        bundles = BundleFolderRecords(settings.fhir_bundles) if settings.fhir_bundles else None
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=settings.fhir_timeout_s))
        yield Components(
            models=models,
            store=store,
            ledger=ledger,
            replay_guard=replay_guard,
            imaging=imaging,
            bundles=bundles,
            http=http,
            fusion=FusionWeights(settings.fusion_image_weight, settings.fusion_findings_weight),
        )


@asynccontextmanager
async def open_ledger(settings: Settings) -> AsyncIterator[PgCardLedger]:
    """Open the card ledger alone (no models, no index), for reports; close it on exit.

    Raises:
        ConfigurationError: no ``MEDIRAG_DSN`` and no embedded database in the data directory.
        SourceUnavailable: the database cannot be reached or holds no ledger yet.
    """
    async with AsyncExitStack() as stack:
        dsn = settings.dsn
        if not dsn:
            # Refuse rather than initialise an empty database where none was meant to be.
            if not (settings.postgres_path / "PG_VERSION").is_file():
                raise ConfigurationError(
                    f"no database at {settings.postgres_path}: set MEDIRAG_DSN, or "
                    "MEDIRAG_DATA_DIR to the data directory the service runs with"
                )
            dsn = stack.enter_context(EmbeddedPostgres(settings.postgres_path)).dsn
        yield await stack.enter_async_context(await PgCardLedger.open(dsn))


def _labs_record(value: Mapping[str, Any] | None) -> ClinicalRecords:
    """The patient's record from a call's resolved labs prefetch value."""
    return PrefetchRecords({LABS_PREFETCH_KEY: value}, labs_key=LABS_PREFETCH_KEY)


def trusted_clients(
    settings: Settings, *, insecure_dev: bool = False
) -> dict[str, TrustedClient] | None:
    """The clients whose JWTs the service accepts; ``None`` in insecure development mode.

    Checked before anything is started, so a misconfigured service fails at once.

    Raises:
        ConfigurationError: no usable trusted clients and not insecure; a development-only
            setting in production.
    """
    if settings.env == "production" and (insecure_dev or settings.allow_loopback_http):
        raise ConfigurationError(
            "insecure development mode and MEDIRAG_ALLOW_LOOPBACK_HTTP are refused when "
            "MEDIRAG_ENV=production"
        )
    if settings.env == "production" and not settings.public_base_url.startswith("https://"):
        # CDS Hooks: all data MUST travel over HTTPS; EHRs sign JWTs for the https URL.
        raise ConfigurationError(
            "MEDIRAG_PUBLIC_BASE_URL must be https when MEDIRAG_ENV=production"
        )
    if insecure_dev:
        return None
    if settings.clients is None:
        raise ConfigurationError(
            "MEDIRAG_CLIENTS is not set: name a JSON file of trusted clients (see README)"
        )
    try:
        return load_trusted_clients(settings.clients)
    except ValueError as error:
        raise ConfigurationError(str(error)) from error


def build_runtime(
    components: Components,
    settings: Settings,
    clients: Mapping[str, TrustedClient] | None,
) -> Runtime:
    """The HTTP layer's runtime over opened components.

    Args:
        components: from :func:`open_components`.
        settings: the deployment's settings.
        clients: from :func:`trusted_clients`; ``None`` serves without authentication.
    """
    authenticator = (
        None
        if clients is None
        else Authenticator(
            clients,
            http=components.http,
            leeway_s=settings.jwt_leeway_s,
            max_lifetime_s=settings.jwt_max_lifetime_s,
            replay_guard=components.replay_guard,
        )
    )
    advisor = Advisor(
        imaging=components.imaging,
        image_model=components.image_model,
        text_model=components.text_model,
        sparse_model=components.sparse_model,
        reranker=components.reranker,
        cases=components.store,
        literature=components.store,
        settings=AdvisorSettings(
            cases=CaseSearchSettings(
                k=settings.cases_k, rrf_k=settings.rrf_k, min_labs=settings.min_labs
            ),
            literature=LiteratureSearchSettings(
                k=settings.passages_k,
                candidates=settings.literature_candidates,
                rrf_k=settings.rrf_k,
                rerank_top_n=settings.rerank_top_n,
            ),
        ),
    )
    caller = Caller(
        advisor=advisor,
        fhir=HttpFhirAccess(
            components.http,
            timeout=settings.fhir_timeout_s,
            # Waiting on a busy server never outlasts the call it serves.
            retry=RetryPolicy(
                max_attempts=settings.fhir_retry_attempts,
                budget=min(settings.fhir_timeout_s, settings.deadline_s),
            ),
            breakers=BreakerRegistry(
                failure_threshold=settings.fhir_breaker_failures,
                cool_down=settings.fhir_breaker_cool_down_s,
            ),
        ),
        parse_labs=_labs_record,
        default_fhir=BundleFolderFhir(components.bundles) if components.bundles else None,
        policy=CallPolicy(
            deadline_s=settings.deadline_s,
            max_body_bytes=settings.max_body_bytes,
            max_json_depth=settings.max_json_depth,
            allow_loopback_http=settings.allow_loopback_http,
        ),
        cache=HookInstanceCache(),
        smart_app=SmartApp(settings.smart_launch_url) if settings.smart_launch_url else None,
        ledger=components.ledger,
    )
    return Runtime(
        caller=caller,
        authenticator=authenticator,
        public_base_url=settings.public_base_url,
        services=(
            PATIENT_VIEW,
            order_select_service(chest_imaging_orders),
            order_sign_service(chest_imaging_orders),
        ),
    )


def app_for(runtime: Runtime, settings: Settings) -> FastAPI:
    """The FastAPI app serving an already-open runtime (its owner closes it)."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[Runtime]:
        yield runtime

    return create_app(opened, cors_origins=settings.cors_origin_list)
