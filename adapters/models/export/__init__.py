"""Exporters: turn torch models into verified ONNX model directories.

The only package allowed to import torch, transformers, open_clip and timm. Its modules are imported
by export commands and tests, never by the service.
"""
