"""Readers that turn literature corpora into citable passages for the literature index.

``pubmedqa`` reads PubMedQA's JSON (one passage per labelled abstract section), ``pubmed_xml``
PubMed's own XML (efetch answers, baseline and update files, gzipped or not), and ``beir`` a
BEIR dataset: its corpus as passages, and its queries and relevance judgements for evaluation.
Each reader refuses a malformed file with a ``ValueError`` subclass naming the file and where in
it; ``beir`` and ``pubmed_xml`` also list what they leave out (an empty document, an article
without an abstract) with why.
"""

__all__: list[str] = []
