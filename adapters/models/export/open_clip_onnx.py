"""Export an open_clip image/text model (BiomedCLIP and models like it) as an
``image-text-embedder`` directory.

Why it exists: the case index embeds chest images and recorded findings in one space with a
CLIP-style model. BiomedCLIP is an open_clip ``CustomTextCLIP`` (timm ViT image tower, Hugging Face
BERT text tower); this module loads such a model the way open_clip does (``local-dir:PATH`` offline,
``hf-hub:ORG/NAME`` on a connected machine), writes each tower as an ONNX graph ending in L2
normalisation, writes the tokenizer and the image preprocessing beside them, and accepts the result
only when the graphs, fed by the service's own tokenization and preprocessing, reproduce the torch
model. Precision variants of both towers (fp16, int8) are written beside them and measured against
torch (:mod:`adapters.models.export.precision`). The tiny placeholder model goes through exactly
this code.

Layout written::

    image.onnx        pixel_values (batch, 3, S, S) float32 -> embeddings (batch, D)
    text.onnx         input_ids (batch, sequence) int64, padded with the pad id -> embeddings
    tokenizer.json    the model's tokenizer, truncating at the context length, padding to longest
    preprocess.json   image_size, mean, std, interpolation, resize_mode
    image.fp16.onnx, text.fp16.onnx, image.int8.onnx, text.int8.onnx   (precision variants)
    manifest.json
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer

from adapters.models.clip import IMAGE_GRAPH_NAME, TEXT_GRAPH_NAME, clean_text
from adapters.models.export import torchvision_standin
from adapters.models.export.graph import DEFAULT_OPSET, export_graph
from adapters.models.export.output import created_by, staged_directory
from adapters.models.export.parity import ParityError, require_parity
from adapters.models.export.precision import (
    DEFAULT_PRECISIONS,
    Feeds,
    by_precision,
    write_precision_variants,
)
from adapters.models.manifest import Manifest, Parity, hash_files, save_manifest
from adapters.models.preprocess import PREPROCESS_NAME, ImagePreprocessing, preprocess_images
from adapters.models.session import create_session
from adapters.models.tokenization import TOKENIZER_NAME, encode_batch, load_tokenizer

__all__ = ["export_open_clip", "load_open_clip", "parity_images"]

logger = logging.getLogger(__name__)

_PARITY_TEXTS = (
    "Small left pleural effusion.",
    "No acute cardiopulmonary abnormality.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "Mild cardiomegaly with pulmonary vascular congestion and interstitial edema.",
    "Endotracheal tube 4 cm above the carina; nasogastric tube below the diaphragm.",
    "Large  right\tpneumothorax &amp; mediastinal shift.",
    "pneumothorax",
    "Bilateral pleural effusions, larger on the right, with basilar atelectasis. " * 30,
)
# Batch sizes and padded lengths other than the tracing example's; the last text is truncated.
_TEXT_BATCHES = (_PARITY_TEXTS, _PARITY_TEXTS[:3], _PARITY_TEXTS[6:7])
_IMAGE_SHAPES = ((224, 224), (256, 320), (400, 300), (64, 64), (97, 301))


class _ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings: torch.Tensor = self.model.encode_image(pixel_values, normalize=True)
        return embeddings


class _TextTower(torch.nn.Module):
    # open_clip's Hugging Face text encoder derives the attention mask from the pad id itself.
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings: torch.Tensor = self.model.encode_text(input_ids, normalize=True)
        return embeddings


def load_open_clip(source: str) -> tuple[torch.nn.Module, Any]:
    """Load an open_clip model with its weights, in eval mode, and its tokenizer.

    Args:
        source: ``local-dir:PATH`` (a folder with ``open_clip_config.json`` and weights) or
            ``hf-hub:ORG/NAME``.

    Returns:
        ``(model, tokenizer)``, the tokenizer being open_clip's for that model.

    Raises:
        RuntimeError: the source has no weights (open_clip would otherwise initialise randomly).
    """
    torchvision_standin.ensure_importable()
    import open_clip

    # Without a checkpoint in the source, refuse rather than fall back to the text tower's base
    # weights or to random ones.
    model = open_clip.create_model(source, pretrained_text=False, require_pretrained=True)
    model.eval()
    return model, open_clip.get_tokenizer(source)


def parity_images() -> list[npt.NDArray[np.float32]]:
    """Synthetic ``(H, W)`` images in ``[0, 1]`` for parity checks: square, portrait, landscape,
    smaller than the model input, and odd-sized, with smooth and noisy content."""
    rng = np.random.default_rng(0)
    images = []
    for height, width in _IMAGE_SHAPES:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        radial = np.hypot(y / height - 0.5, x / width - 0.6)
        image = 0.8 - radial + 0.1 * rng.standard_normal((height, width)).astype(np.float32)
        image[height // 4 : height // 2, width // 5 : width // 3] += 0.3
        images.append(np.clip(image, 0.0, 1.0).astype(np.float32))
    return images


def export_open_clip(
    source: str,
    out_dir: Path | str,
    *,
    name: str | None = None,
    description: str | None = None,
    provenance: str | None = None,
    opset: int = DEFAULT_OPSET,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
) -> Path:
    """Export an open_clip model with a Hugging Face text tower to ``out_dir``.

    Args:
        source: ``local-dir:PATH`` or ``hf-hub:ORG/NAME``, as open_clip takes it.
        out_dir: the model directory to create; must not exist or be empty.
        name: the model's short name; defaults to the last component of ``source``.
        description: the line shown to clinicians; defaults to one naming the source.
        provenance: what the manifest records as the source; defaults to ``source``.
        opset: ONNX opset version.
        precisions: the precision variants to write for both towers (``()`` for none); for the
            tiny model they add about 1 s.

    Returns:
        The model directory.

    Raises:
        ValueError: the model's tokenizer or preprocessing is one the service cannot reproduce.
        ParityError: the graphs (or the saved tokenizer) do not reproduce the torch model, or a
            variant is below its bound (see :mod:`adapters.models.export.precision`).
        FileExistsError: ``out_dir`` holds files.

    Example:
        >>> export_open_clip(  # doctest: +SKIP
        ...     "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        ...     "/models/biomedclip",
        ...     name="BiomedCLIP",
        ...     description="BiomedCLIP (PubMedBERT + ViT-B/16), trained on PubMed figures.",
        ... )
    """
    started = time.perf_counter()
    name = name or source.rstrip("/").rsplit("/", 1)[-1].split(":")[-1]
    description = description or f"{name}: open_clip image/text model from {source}"
    model, reference_tokenizer = load_open_clip(source)
    pad_id = _check_supported(model, reference_tokenizer)
    settings = _preprocessing(model)
    context_length = int(reference_tokenizer.context_length)
    with staged_directory(out_dir) as staging:
        _write_tokenizer(reference_tokenizer, staging / TOKENIZER_NAME, context_length, pad_id)
        settings.save(staging / PREPROCESS_NAME)
        tokenizer = load_tokenizer(staging / TOKENIZER_NAME, max_length=context_length)

        images = parity_images()
        # Texts of different lengths, so that the traced example is padded.
        example_ids, _ = encode_batch(
            tokenizer, ["Effusion.", "No acute cardiopulmonary abnormality; the lungs are clear."]
        )
        export_graph(
            _ImageTower(model),
            [torch.from_numpy(preprocess_images(images[:2], settings))],
            staging / IMAGE_GRAPH_NAME,
            input_names=("pixel_values",),
            dynamic_axes={"pixel_values": {0: "batch"}},
            opset=opset,
        )
        export_graph(
            _TextTower(model),
            [torch.from_numpy(example_ids)],
            staging / TEXT_GRAPH_NAME,
            input_names=("input_ids",),
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}},
            opset=opset,
        )
        image_cosine, dimension = _image_parity(model, staging / IMAGE_GRAPH_NAME, images, settings)
        text_cosine = _text_parity(
            model, reference_tokenizer, staging / TEXT_GRAPH_NAME, tokenizer, pad_id
        )
        variants = {
            IMAGE_GRAPH_NAME: write_precision_variants(
                staging / IMAGE_GRAPH_NAME,
                [
                    {"pixel_values": preprocess_images(batch, settings)}
                    for batch in (images, images[3:4])
                ],
                reference=lambda feeds: [_torch_images(model, feeds)],
                reference_name="torch eager",
                inputs=f"{len(images)} synthetic images in batches of {len(images)} and 1",
                precisions=precisions,
            ),
            TEXT_GRAPH_NAME: write_precision_variants(
                staging / TEXT_GRAPH_NAME,
                [
                    {"input_ids": encode_batch(tokenizer, [clean_text(t) for t in batch])[0]}
                    for batch in _TEXT_BATCHES
                ],
                reference=lambda feeds: [_torch_texts(model, feeds)],
                reference_name="torch eager",
                inputs=(
                    f"{len(_PARITY_TEXTS)} texts in padded batches of "
                    f"{', '.join(str(len(b)) for b in _TEXT_BATCHES)}"
                ),
                precisions=precisions,
            ),
        }
        manifest = Manifest(
            name=name,
            kind="image-text-embedder",
            description=description,
            source=provenance or source,
            architecture=_architecture(model, dimension),
            dimension=dimension,
            max_length=context_length,
            image_size=settings.image_size,
            opset=opset,
            precision="fp32",
            files=hash_files(staging),
            parity=Parity(
                compared=(
                    "torch eager vs onnxruntime CPU, inputs prepared by the service's code: "
                    f"image tower on {len(images)} synthetic images in batches of "
                    f"{len(images)} and 1 (min {image_cosine:.7f}); text tower on "
                    f"{len(_PARITY_TEXTS)} texts in padded batches of "
                    f"{', '.join(str(len(b)) for b in _TEXT_BATCHES)}, one truncated "
                    f"(min {text_cosine:.7f}); token ids identical to open_clip's"
                ),
                min_cosine=min(image_cosine, text_cosine),
            ),
            created_by=created_by(
                __name__, "torch", "open_clip_torch", "timm", "transformers", "onnx"
            ),
            variants=by_precision(variants),
        )
        save_manifest(manifest, staging)
    logger.info(
        "model exported",
        extra={
            "model_id": manifest.model_id,
            "min_cosine": manifest.parity.min_cosine,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    return Path(out_dir).resolve()


def _check_supported(model: torch.nn.Module, tokenizer: Any) -> int:
    """The text tower's pad id, after checking that the service can reproduce the tokenizer."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer, get_clean_fn

    text = getattr(model, "text", None)
    if not isinstance(text, HFTextEncoder) or not isinstance(tokenizer, HFTokenizer):
        raise ValueError("only open_clip models with a Hugging Face text tower are supported")
    if tokenizer.tokenizer_mode or tokenizer.strip_sep_token:
        raise ValueError("open_clip tokenizer modes and sep-token stripping are not supported")
    if tokenizer.clean_fn is not get_clean_fn("whitespace"):
        raise ValueError("only open_clip's 'whitespace' text cleaning is supported")
    pad_id = text.config.pad_token_id
    if pad_id is None or tokenizer.tokenizer.pad_token_id != pad_id:
        raise ValueError(
            f"tokenizer pad id {tokenizer.tokenizer.pad_token_id} != text tower pad id {pad_id}"
        )
    return int(pad_id)


def _preprocessing(model: torch.nn.Module) -> ImagePreprocessing:
    visual: Any = model.visual
    config = dict(visual.preprocess_cfg)
    size = config["size"]
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"only square image inputs are supported, got {size}")
    return ImagePreprocessing(
        image_size=int(height),
        mean=tuple(float(v) for v in config["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in config["std"]),  # type: ignore[arg-type]
        interpolation=config["interpolation"],
        resize_mode=config["resize_mode"],
    )


def _write_tokenizer(reference: Any, path: Path, context_length: int, pad_id: int) -> None:
    """Save the model's tokenizer as ``tokenizer.json``, set to truncate at the context length
    and to pad with the text tower's pad id."""
    tokenizer = Tokenizer.from_str(reference.tokenizer.backend_tokenizer.to_str())
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=reference.tokenizer.pad_token)
    tokenizer.save(str(path))


def _torch_images(model: torch.nn.Module, feeds: Feeds) -> npt.NDArray[np.float32]:
    with torch.no_grad():
        embeddings: torch.Tensor = model.encode_image(  # type: ignore[operator]
            torch.from_numpy(feeds["pixel_values"]), normalize=True
        )
    return embeddings.numpy()


def _torch_texts(model: torch.nn.Module, feeds: Feeds) -> npt.NDArray[np.float32]:
    with torch.no_grad():
        embeddings: torch.Tensor = model.encode_text(  # type: ignore[operator]
            torch.from_numpy(feeds["input_ids"]), normalize=True
        )
    return embeddings.numpy()


def _image_parity(
    model: torch.nn.Module,
    graph: Path,
    images: Sequence[npt.NDArray[np.float32]],
    settings: ImagePreprocessing,
) -> tuple[float, int]:
    session = create_session(graph, providers="cpu")
    worst, dimension = 1.0, 0
    for batch in (images, images[3:4]):
        pixel_values = preprocess_images(batch, settings)
        expected = _torch_images(model, {"pixel_values": pixel_values})
        (actual,) = session.run(None, {"pixel_values": pixel_values})
        worst = min(worst, require_parity(expected, actual, "image tower"))
        dimension = int(expected.shape[1])
    return worst, dimension


def _text_parity(
    model: torch.nn.Module, reference: Any, graph: Path, tokenizer: Tokenizer, pad_id: int
) -> float:
    session = create_session(graph, providers="cpu")
    worst = 1.0
    for batch in _TEXT_BATCHES:
        expected_ids = reference(list(batch)).numpy()
        input_ids, _ = encode_batch(tokenizer, [clean_text(text) for text in batch])
        length = input_ids.shape[1]
        if not (
            np.array_equal(expected_ids[:, :length], input_ids)
            and (expected_ids[:, length:] == pad_id).all()
        ):
            raise ParityError("tokenizer.json does not reproduce open_clip's token ids")
        with torch.no_grad():
            expected = model.encode_text(  # type: ignore[operator]
                torch.from_numpy(expected_ids), normalize=True
            ).numpy()
        (actual,) = session.run(None, {"input_ids": input_ids})
        worst = min(worst, require_parity(expected, actual, "text tower"))
    return worst


def _architecture(model: torch.nn.Module, dimension: int) -> str:
    def size(module: Any) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters"

    visual: Any = model.visual
    trunk = getattr(visual, "trunk", visual)
    vision = getattr(trunk, "pretrained_cfg", {}).get("architecture") or type(trunk).__name__
    if hasattr(trunk, "blocks") and hasattr(trunk, "embed_dim"):
        vision += f", {len(trunk.blocks)} blocks, width {trunk.embed_dim}"
    text: Any = model.text
    config = text.config
    return (
        f"open_clip {type(model).__name__}; image: {vision} ({size(visual)}); "
        f"text: {config.model_type}, {config.num_hidden_layers} layers, width "
        f"{config.hidden_size} ({size(text)}); embedding {dimension}, L2-normalised"
    )
