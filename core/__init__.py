"""The domain of MediRAG CDS, free of I/O: types, ports, fusion, labs, retrieval, cards.

Nothing here imports an adapter, a web framework or a database driver; ``adapters/`` implements
the ports in :mod:`core.ports`, and ``cds_hooks/`` turns requests into calls of
:class:`core.advisor.Advisor`.
"""
