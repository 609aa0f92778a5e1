"""What every served model has in common: a verified folder of the expected kind, its tokenizer,
and the settings its graphs open and batch with.

Why it exists: the four model adapters (image/text, text, dense+sparse text, reranker) must refuse
the same things in the same words (a folder that does not match its manifest, a folder of another
kind) and accept the same configuration (``session=`` or the ``providers=`` and
``intra_op_threads=`` shortcuts, ``batching=``); they inherit it from :class:`ServedModel`.
"""

from __future__ import annotations

from pathlib import Path

from adapters.models.batching import BatchSettings
from adapters.models.manifest import ManifestError, ModelKind, load_manifest
from adapters.models.session import ProviderPreference, SessionSettings, session_settings
from adapters.models.tokenization import TOKENIZER_NAME, load_tokenizer
from core.types import ModelCard

__all__ = ["ServedModel"]


class ServedModel:
    """A model folder verified against its manifest, ready for its graphs to be opened.

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
