"""Model adapters: ONNX Runtime implementations of the embedding ports in :mod:`core.ports`.

Serving code here needs only onnxruntime, tokenizers, numpy and Pillow. Exported model directories
carry a ``manifest.json`` (see :mod:`adapters.models.manifest`) that pins every file by sha256;
:mod:`adapters.models.export` builds them and is the only place that imports torch.
"""
