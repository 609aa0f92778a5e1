"""What every served model has in common: a verified folder of the expected kind, its tokenizer,
and the settings its graphs open and batch with.

Why it exists: the four model adapters (image/text, text, dense+sparse text, reranker) must refuse
the same things in the same words (a folder that does not match its manifest, a folder of another
kind) and accept the same configuration (``session=`` or the ``providers=`` and
``intra_op_threads=`` shortcuts, ``batching=``); they inherit it from :class:`ServedModel`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import onnxruntime as ort

from adapters.models.batching import BatchSettings, MicroBatcher
from adapters.models.manifest import ManifestError, ModelKind, load_manifest
from adapters.models.session import (
    ModelRuntime,
    ModelSession,
    ProviderPreference,
    SessionSettings,
    session_settings,
)
from adapters.models.tokenization import TOKENIZER_NAME, load_tokenizer
from core.types import ModelCard

__all__ = ["ServedModel"]

T = TypeVar("T")
R = TypeVar("R")


class ServedModel:
    """A model folder verified against its manifest, ready for its graphs to be opened; each
    graph is opened with :meth:`_open_graph` and batched with :meth:`_batched`, which gives every
    subclass the same :attr:`runtime` and :meth:`aclose`.

    Args:
        directory: the exported model folder.
        kind: the kind of model the subclass serves; another kind is refused.
        session: how its graphs' sessions are created.
        batching: how simultaneous requests are batched.
        providers: shortcut for ``SessionSettings(providers=...)``.
        intra_op_threads: shortcut for ``SessionSettings(intra_op_threads=...)``.

    Attributes:
        directory: the folder.
        manifest: its verified manifest.
        model_id: the model's identity, for the stores.
        card: name and description of the model, for the clinician.
        session_settings: the settings the graphs open with.
        batch_settings: the settings the batchers use.

    Raises:
        ManifestError: the folder is not an intact export of ``kind``.
        ValueError: both ``session`` and a shortcut were given.

    Example:
        >>> class Mine(ServedModel):  # doctest: +SKIP
        ...     def __init__(self, directory):
        ...         super().__init__(directory, "text-embedder")
    """

    def __init__(
        self,
        directory: Path | str,
        kind: ModelKind,
        *,
        session: SessionSettings | None = None,
        batching: BatchSettings | None = None,
        providers: ProviderPreference | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.session_settings = session_settings(
            session, providers=providers, intra_op_threads=intra_op_threads
        )
        self.batch_settings = batching or BatchSettings()
        manifest = load_manifest(self.directory)
        if manifest.kind != kind:
            raise ManifestError(self.directory, f"kind is {manifest.kind!r}, not {kind!r}")
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.card: ModelCard = manifest.card
        self._tokenizer = load_tokenizer(
            self.directory / TOKENIZER_NAME, max_length=manifest.max_length
        )
        self._sessions: list[ModelSession] = []
        self._batchers: list[MicroBatcher[Any, Any]] = []

    @property
    def runtime(self) -> ModelRuntime:
        """What each graph really runs on (providers, precision, warm-up), for the logs."""
        return ModelRuntime(
            model_id=self.model_id, graphs=tuple(session.runtime for session in self._sessions)
        )

    async def aclose(self) -> None:
        """Stop batching: callers still waiting fail, a running batch completes."""
        for batcher in self._batchers:
            await batcher.aclose()

    def _open_graph(
        self,
        graph: str,
        *,
        check: Callable[[ort.InferenceSession], None],
        shapes: Mapping[str, Sequence[int | str]],
    ) -> ModelSession:
        """A session for one of the folder's graphs, with the served settings and a TensorRT
        profile up to the batcher's largest batch (see :class:`ModelSession`)."""
        return ModelSession(
            self.directory,
            self.manifest,
            graph,
            self.session_settings,
            check=check,
            shapes=shapes,
            max_batch=self.batch_settings.max_batch,
        )

    def _batched(
        self, session: ModelSession, fn: Callable[[list[T]], Sequence[R]]
    ) -> MicroBatcher[T, R]:
        """A batcher running ``fn`` (which runs ``session``) on simultaneous requests."""
        batcher = MicroBatcher.from_settings(
            fn, self.batch_settings, name=f"{self.manifest.name}/{session.graph}"
        )
        self._sessions.append(session)
        self._batchers.append(batcher)
        return batcher
