"""A real Orthanc PACS for tests: the Debian package, its DICOMweb plugin, a private config.

:func:`running_orthanc` starts ``/usr/sbin/Orthanc`` (Debian ``orthanc``, 1.10 on bookworm) with
a configuration of its own in a fresh temporary folder, removed afterwards: storage and index
in that folder, HTTP on a free loopback port, the DICOM protocol off, remote access refused,
HTTP basic authentication on with one user (a random password), and only
``libOrthancDicomWeb.so`` (Debian ``orthanc-dicomweb``) loaded, at ``/dicom-web/``. (The Debian
GDCM plugin is not loaded: it crashes Orthanc 1.10.)

Orthanc refuses nothing as root, but a test has no business running a network server as root:
when the tests run as root (containers, CI) Orthanc runs as the ``orthanc`` user the Debian
package creates, or ``nobody``, and owns its folder (made directly under the system's temporary
directory, since pytest's own folders are private to root); otherwise as the current user. It
starts in about 0.2 s; the context manager waits until ``GET /system`` answers with the
credentials, and on exit stops the process it started, by its PID: SIGTERM, then SIGKILL after
5 s.

Examples:
    >>> # with running_orthanc() as orthanc:
    >>> #     client = DICOMwebClient(orthanc.dicomweb_url, session=orthanc.session())
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import requests

from tests.peers.process import stop_process

__all__ = [
    "DICOMWEB_PLUGIN",
    "Orthanc",
    "OrthancFailed",
    "OrthancMissing",
    "orthanc_config",
    "running_orthanc",
]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
_USER = "medirag"


class OrthancMissing(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed."""


class OrthancFailed(RuntimeError):
    """Orthanc did not start; the message ends with the tail of its log."""


@dataclass(frozen=True, slots=True)
class Orthanc:
    """A running Orthanc.

    Attributes:
        base_url: its REST API (``http://127.0.0.1:<port>``).
        dicomweb_url: its DICOMweb root (``<base_url>/dicom-web``).
        username: the registered user.
        password: that user's password.
        process: the Orthanc process.
        folder: its configuration, storage and log.
    """

    base_url: str
    dicomweb_url: str
    username: str
    password: str
    process: subprocess.Popen[bytes]
    folder: Path

    def session(self) -> requests.Session:
        """A requests session with this Orthanc's credentials."""
        session = requests.Session()
        session.auth = (self.username, self.password)
        return session

    def stop(self) -> None:
        """Stop the process by its PID (SIGTERM, then SIGKILL); stopping twice is harmless."""
        stop_process(self.process)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """The account Orthanc runs as when the tests run as root; ``None`` otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("orthanc", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise OrthancMissing("running as root, and neither an `orthanc` nor a `nobody` user exists")


def orthanc_config(
    storage: Path, *, http_port: int, username: str, password: str
) -> dict[str, object]:
    """The configuration :func:`running_orthanc` gives Orthanc (keys of Orthanc 1.10).

    Examples:
        >>> config = orthanc_config(Path("/tmp/s"), http_port=8042, username="u", password="p")
        >>> config["Plugins"], config["DicomServerEnabled"], config["RemoteAccessAllowed"]
        (['/usr/share/orthanc/plugins/libOrthancDicomWeb.so'], False, False)
    """
    return {
        "Name": "medirag-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        # Jobs and the REST API's file writes are not used; nothing else should be written.
        "SaveJobs": False,
    }


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def running_orthanc(*, start_timeout_s: float = 15.0) -> Iterator[Orthanc]:
    """Start Orthanc in a new temporary folder; stop it and remove the folder on exit.

    The folder holds the configuration, the storage and ``orthanc.log``.

    Args:
        start_timeout_s: how long to wait for ``GET /system`` to answer.

    Yields:
        The running Orthanc.

    Raises:
        OrthancMissing: Orthanc or its DICOMweb plugin is not installed (run `make peers`).
        OrthancFailed: it exited or did not answer in time; the message holds its log's tail.
    """
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if binary is None or not DICOMWEB_PLUGIN.is_file():
        raise OrthancMissing(
            "Orthanc or its DICOMweb plugin is not installed: run `make peers` "
            "(Debian packages orthanc and orthanc-dicomweb)"
        )
    account = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="medirag-orthanc-"))
    try:
        with _started(binary, folder, account) as orthanc:
            _wait_until_up(orthanc, start_timeout_s, folder / "orthanc.log")
            yield orthanc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _started(binary: str, folder: Path, account: pwd.struct_passwd | None) -> Iterator[Orthanc]:
    """Orthanc, configured in ``folder`` and started there; stopped on exit."""
    storage = folder / "storage"
    storage.mkdir()
    port = _free_port()
    password = secrets.token_urlsafe(16)
    config = folder / "orthanc.json"
    config.write_text(
        json.dumps(orthanc_config(storage, http_port=port, username=_USER, password=password))
    )
    if account is not None:
        for path in (folder, storage, config):
            os.chown(path, account.pw_uid, account.pw_gid)
    with (folder / "orthanc.log").open("wb") as log_file:
        process = _start(binary, config, log_file, account)
    orthanc = Orthanc(
        base_url=f"http://127.0.0.1:{port}",
        dicomweb_url=f"http://127.0.0.1:{port}/dicom-web",
        username=_USER,
        password=password,
        process=process,
        folder=folder,
    )
    try:
        yield orthanc
    finally:
        orthanc.stop()


def _start(
    binary: str, config: Path, log_file: BinaryIO, account: pwd.struct_passwd | None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [binary, str(config)],
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        user=account.pw_uid if account else None,
        group=account.pw_gid if account else None,
        extra_groups=[] if account else None,
    )


def _wait_until_up(orthanc: Orthanc, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    with orthanc.session() as session:
        while time.monotonic() < deadline:
            if orthanc.process.poll() is not None:
                raise OrthancFailed(
                    f"Orthanc exited with status {orthanc.process.returncode}; its log ends:\n"
                    + _log_tail(log)
                )
            try:
                if session.get(f"{orthanc.base_url}/system", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
    raise OrthancFailed(
        f"Orthanc did not answer within {timeout_s} s; its log ends:\n" + _log_tail(log)
    )
