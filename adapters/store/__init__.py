"""The index store: PostgreSQL with pgvector for similar cases and literature passages.

``embedded`` runs a local PostgreSQL (pgserver) for the demo and the tests, ``schema`` holds the
versioned migrations and the record of which models built the index, and ``pgvector_store``
implements the case and literature index ports on any PostgreSQL with pgvector.
"""

__all__: list[str] = []
