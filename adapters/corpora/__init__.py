"""Readers that turn literature corpora into citable passages for the literature index."""

__all__: list[str] = []
