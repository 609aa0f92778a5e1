"""A real FHIR search engine for tests: Medplum's FHIR router behind a loopback HTTP server.

:func:`running_medplum` starts ``node tests/peers/fhir_server/server.mjs`` (read its header for
what it serves and where it differs from a production server) with a folder of bundles and any
extra bundle files, waits for the one JSON line it prints when it is listening, and on exit
stops the process it started, by its PID: SIGTERM, then SIGKILL after 5 s. Loading the 40
Synthea bundles takes about 3 s.

The npm packages are installed by ``make peers`` (``npm ci`` in ``tests/peers/fhir_server``);
without them :class:`MedplumMissing` says so.

Examples:
    >>> # with running_medplum(synthea_dir) as medplum:
    >>> #     client = FhirClient(medplum.base_url)
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.peers.process import stop_process

__all__ = ["SERVER_DIR", "Medplum", "MedplumFailed", "MedplumMissing", "running_medplum"]

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"


class MedplumMissing(RuntimeError):
    """Node.js or the server's npm packages are not installed."""


class MedplumFailed(RuntimeError):
    """The server did not start; the message ends with what it wrote on stderr."""


@dataclass(frozen=True, slots=True)
class Medplum:
    """A running server.

    Attributes:
        base_url: the FHIR base without credentials (``http://127.0.0.1:<port>/fhir/R4``).
        secure_base_url: the same repository, only with an access token (``.../secure/R4``).
        token_endpoint: the SMART Backend Services token endpoint.
        origin: ``http://127.0.0.1:<port>``.
        loaded: what was loaded: resource counts by type.
        process: the node process.
    """

    base_url: str
    secure_base_url: str
    token_endpoint: str
    origin: str
    process: subprocess.Popen[bytes]
    loaded: dict[str, int] = field(default_factory=dict)

    def stop(self) -> None:
        """Stop the process by its PID (SIGTERM, then SIGKILL); stopping twice is harmless."""
        stop_process(self.process)


def _ready_line(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.1):
            line = process.stdout.readline()
            if line:
                return dict(json.loads(line))
        if process.poll() is not None:
            break
    return {}


@contextmanager
def running_medplum(
    data_dir: str | os.PathLike[str],
    *,
    bundles: Sequence[str | os.PathLike[str]] = (),
    clients_file: str | os.PathLike[str] | None = None,
    token_ttl: int = 300,
    export_polls: int = 1,
    export_retry_after: int = 1,
    start_timeout: float = 60.0,
) -> Iterator[Medplum]:
    """Start the server, yield it, stop it.

    Args:
        data_dir: a folder of bundles to load (``*.json``).
        bundles: more bundle files to load.
        clients_file: registered SMART clients (``{"clients": [{"client_id", "jwks"}]}``).
        token_ttl: seconds an access token is valid.
        export_polls: status polls of a Bulk export answered 202 before the manifest.
        export_retry_after: the ``Retry-After`` of those 202 answers, in seconds.
        start_timeout: seconds to wait for the ready line.

    Raises:
        MedplumMissing: ``node`` or the npm packages are missing (run ``make peers``).
        MedplumFailed: the server exited or did not become ready in time.
    """
    node = shutil.which("node")
    if node is None:
        raise MedplumMissing("node is not installed: run `make peers`")
    if not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        raise MedplumMissing(f"no npm packages in {SERVER_DIR}: run `make peers`")
    # The server runs in its own folder: paths are made absolute first.
    data = Path(data_dir).resolve()
    command = [node, "server.mjs", "--data", str(data), "--token-ttl", str(token_ttl)]
    command += ["--export-polls", str(export_polls)]
    command += ["--export-retry-after", str(export_retry_after)]
    for bundle in bundles:
        command += ["--bundle", str(Path(bundle).resolve())]
    if clients_file is not None:
        command += ["--clients", str(Path(clients_file).resolve())]
    # stderr goes to a file: a pipe nobody reads could fill and stall the server.
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, cwd=SERVER_DIR, stdout=subprocess.PIPE, stderr=errors)
        ready = _ready_line(process, start_timeout)
        if not ready:
            process.kill()
            process.wait()
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-2000:]
            raise MedplumFailed(f"the FHIR server did not start in {start_timeout:g} s: {tail}")
        medplum = Medplum(
            base_url=str(ready["base"]),
            secure_base_url=str(ready["secure_base"]),
            token_endpoint=str(ready["token_endpoint"]),
            origin=str(ready["base"]).removesuffix("/fhir/R4"),
            process=process,
            loaded=dict(ready["types"]),
        )
        try:
            yield medplum
        finally:
            medplum.stop()
            if process.stdout is not None:
                process.stdout.close()
