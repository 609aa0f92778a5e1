"""A PACS over DICOMweb as the imaging archive: the client, its credentials, timeouts and retries.

:func:`open_dicomweb_archive` gives a :class:`adapters.imaging.archive.DicomArchive` over a
dicomweb-client ``DICOMwebClient`` whose HTTP session carries HTTP basic credentials (PS3.18
leaves authentication to the deployment; Orthanc and most PACS accept basic auth) and bounds
how long one hook call can wait on the archive:

* every request has a timeout (connecting, and each wait for data), so a server that accepts
  the connection and never answers fails the request as "timed out" instead of holding the
  archive's worker thread;
* dicomweb-client's own retrying (5 attempts with exponential backoff, about half a minute, and
  blind to ``Retry-After``) is switched off;
* a GET answered 429 (Too Many Requests) or 503 (Service Unavailable) with a ``Retry-After`` is
  retried after the wait the server asked for, only while the waits of that request add up to at
  most ``retry_after_max_s``. A longer or missing ``Retry-After`` fails at once, with the status
  (and the wait asked for) in the reason: the hook answers without images rather than late.
  Connection failures and timeouts are not retried: the hook's time budget is seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from requests.adapters import HTTPAdapter

from adapters.imaging.archive import MAX_FRAMES, DicomArchive
from adapters.imaging.decode import MAX_PIXELS
from adapters.retry_after import retry_after_seconds

__all__ = ["BoundedRetryAfter", "open_dicomweb_archive"]

logger = logging.getLogger(__name__)

_BUSY = frozenset({429, 503})


class BoundedRetryAfter(HTTPAdapter):
    """An HTTP adapter that honours ``Retry-After`` on 429 and 503 within a wait budget.

    Only GET requests are retried (QIDO-RS and WADO-RS); a STOW-RS body may be a stream that
    cannot be sent twice.

    Args:
        max_wait_s: the most seconds one request may spend waiting between its attempts.
        sleep: how to wait (``time.sleep``; tests may record instead).

    Examples:
        >>> session = requests.Session()
        >>> session.mount("http://", BoundedRetryAfter(max_wait_s=2.0))
    """

    def __init__(self, *, max_wait_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(max_retries=0)
        self._max_wait_s = max_wait_s
        self._sleep = sleep

    def send(  # type: ignore[override]  # requests' stubs type the keywords loosely
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        """Send, and send again after each ``Retry-After`` that fits the remaining budget."""
        waited = 0.0
        while True:
            response = super().send(request, **kwargs)
            if request.method != "GET" or response.status_code not in _BUSY:
                return response
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            if wait is None or waited + wait > self._max_wait_s:
                return response
            logger.info(
                "imaging archive busy (HTTP %s); retrying in %.1f s", response.status_code, wait
            )
            response.close()
            self._sleep(wait)
            waited += wait


def open_dicomweb_archive(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout_s: float = 10.0,
    retry_after_max_s: float = 2.0,
    max_pixels: int = MAX_PIXELS,
    max_frames: int = MAX_FRAMES,
) -> DicomArchive:
    """A :class:`DicomArchive` over a DICOMweb service (QIDO-RS, WADO-RS).

    Args:
        url: the DICOMweb root (``http://pacs:8042/dicom-web``).
        username: for HTTP basic authentication; with ``password``.
        password: for HTTP basic authentication; with ``username``.
        timeout_s: the limit on connecting and on each wait for data, per request.
        retry_after_max_s: the most one request waits on ``Retry-After`` answers in all (0:
            never wait).
        max_pixels: larger images are skipped without being retrieved or decoded.
        max_frames: objects with more frames are skipped without being retrieved.

    Returns:
        The archive; call its ``close`` when done. Nothing is sent until it is used.

    Raises:
        ValueError: only one of ``username`` and ``password`` is given.

    Examples:
        >>> archive = open_dicomweb_archive("http://127.0.0.1:8042/dicom-web",
        ...                                 username="medirag", password="secret", timeout_s=5)
        >>> archive.close()
    """
    if (username is None) != (password is None):
        raise ValueError("DICOMweb basic authentication needs both a username and a password")
    session = (
        create_session_from_user_pass(username, password)
        if username is not None and password is not None
        else requests.Session()
    )
    adapter = BoundedRetryAfter(max_wait_s=retry_after_max_s)
    session.mount("http://", adapter)
    session.mount("https://", adapter)

    def open_client() -> DICOMwebClient:
        client = DICOMwebClient(url, session=session, timeout=timeout_s)
        client.set_http_retry_params(retry=False)
        return client

    return DicomArchive.connect(open_client, max_pixels=max_pixels, max_frames=max_frames)
