"""Prefetch: templates announced in discovery, and the data a call brings or the service fetches.

Templates are checked when the service is defined, against the specification's rules:

* tokens are ``{{context.<field>}}`` for a root-level primitive field the hook defines, or one of
  ``{{userPractitionerId}}``, ``{{userPractitionerRoleId}}``, ``{{userPatientId}}``,
  ``{{userRelatedPersonId}}``;
* queries stay in the recommended subset: an instance read (``Patient/{{context.patientId}}``)
  or a type-level search whose parameters are references, token equality (optionally ``:in``),
  dates with the prefixes ``eq lt gt ge le``, ``_count`` and ``_sort``.

A call's prefetch is then resolved key by key when the service needs the key, as HAPI FHIR's
CDS Hooks module does with its ``FHIR_CLIENT`` strategy:

* a value that is a usable FHIR resource is used as is;
* ``null`` means the client knows there is no data: nothing is fetched;
* a missing key, an ``OperationOutcome`` (the client could not prefetch it), or a Bundle whose
  outcome reports an error, is fetched from the call's ``fhirServer`` with its access token, by
  the template's query with the call's tokens filled in (following ``next`` links);
* when that is impossible, a required key fails the call (412 Precondition Failed) and an
  optional key is left out.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote

from core.errors import SourceUnavailable

__all__ = [
    "USER_TOKENS",
    "FhirAccess",
    "FhirFetcher",
    "PrefetchResolver",
    "PrefetchTemplate",
    "PrefetchUnavailable",
    "user_tokens",
]

USER_TOKENS = {
    "Practitioner": "userPractitionerId",
    "PractitionerRole": "userPractitionerRoleId",
    "Patient": "userPatientId",
    "RelatedPerson": "userRelatedPersonId",
}
"""The user identifier tokens, by the resource type of the call's ``context.userId``."""

_TOKEN = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")
_DATE_VALUE = re.compile(r"^(eq|lt|gt|ge|le)?\d{4}(-\d{2}(-\d{2}(T[\d:.+\-Z]+)?)?)?$")
_FORBIDDEN = frozenset(
    {"_include", "_revinclude", "_has", "_elements", "_summary", "_contained", "_type", "_filter"}
)


class FhirFetcher(Protocol):
    """Runs a FHIR read or search (a relative URL) against one server, as one credential."""

    async def fetch(self, query: str) -> dict[str, Any]:
        """The resource read, or the search's Bundle with all its pages merged.

        Raises:
            SourceUnavailable: the server could not answer, or answered with an error.
        """
        ...


class FhirAccess(Protocol):
    """Makes fetchers for the FHIR servers that calls name."""

    def fetcher(self, base_url: str, access_token: str) -> FhirFetcher:
        """A fetcher for ``base_url`` presenting ``access_token``; the token is never stored."""
        ...


class PrefetchUnavailable(SourceUnavailable):
    """A required prefetch key could not be obtained: the call is answered 412."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"prefetch '{key}'", reason)
        self.key = key


def user_tokens(user_id: str) -> dict[str, str]:
    """The user identifier token a ``context.userId`` gives (``Practitioner/1`` gives
    ``{"userPractitionerId": "1"}``); none for other resource types.

    Examples:
        >>> user_tokens("PractitionerRole/abc")
        {'userPractitionerRoleId': 'abc'}
    """
    kind, _, ident = user_id.partition("/")
    token = USER_TOKENS.get(kind)
    return {token: ident} if token and ident and "/" not in ident else {}


def _check_query(template: str) -> None:
    """Raise ``ValueError`` unless the (token-free) query is in the recommended subset."""
    path, _, query = template.partition("?")
    segments = path.split("/")
    if not _TYPE.match(segments[0]):
        raise ValueError(f"prefetch template must start with a resource type: {template!r}")
    if len(segments) == 2 and not query:
        return  # an instance read
    if len(segments) != 1 or not query:
        raise ValueError(f"prefetch template is neither a read nor a type search: {template!r}")
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=True):
        base, _, modifier = name.partition(":")
        if base in _FORBIDDEN or "." in base:
            raise ValueError(f"prefetch parameter {name!r} is outside the recommended subset")
        if base == "_count":
            if not value.isdigit():
                raise ValueError(f"_count must be a number in {template!r}")
        elif base == "_sort":
            if not re.fullmatch(r"-?[A-Za-z_][\w-]*(,-?[A-Za-z_][\w-]*)*", value):
                raise ValueError(f"bad _sort in {template!r}")
        elif base.startswith("_"):
            raise ValueError(f"prefetch parameter {name!r} is outside the recommended subset")
        elif modifier not in ("", "in"):
            raise ValueError(f"modifier ':{modifier}' is outside the recommended subset")
        elif value[:2] in ("ne", "sa", "eb", "ap") and _DATE_VALUE.match(value[2:]):
            raise ValueError(f"date prefix {value[:2]!r} is outside the recommended subset")


@dataclass(frozen=True, slots=True)
class PrefetchTemplate:
    """One prefetch template, checked against the spec.

    Args:
        template: the FHIR query with ``{{...}}`` tokens.
        context_fields: the hook's root-level primitive context fields usable as tokens.

    Raises:
        ValueError: a token or the query breaks the spec's rules.

    Examples:
        >>> t = PrefetchTemplate("Patient/{{context.patientId}}", frozenset({"patientId"}))
        >>> t.render({"patientId": "123"}, user_id="Practitioner/9")
        'Patient/123'
    """

    template: str
    context_fields: frozenset[str]

    def __post_init__(self) -> None:
        for token in _TOKEN.findall(self.template):
            if token.startswith("context."):
                field = token.removeprefix("context.")
                if field not in self.context_fields:
                    raise ValueError(
                        f"{{{{{token}}}}} is not a root-level primitive field of the hook's context"
                    )
            elif token not in USER_TOKENS.values():
                raise ValueError(f"{{{{{token}}}}} is not a prefetch token")
        if "{" in _TOKEN.sub("", self.template) or "}" in _TOKEN.sub("", self.template):
            raise ValueError(f"unbalanced token delimiters in {self.template!r}")
        _check_query(_TOKEN.sub("x", self.template))

    def render(self, context: Mapping[str, Any], *, user_id: str) -> str | None:
        """The query for one call, or ``None`` when a token has no value in this call."""
        values = {f"context.{k}": v for k, v in context.items() if isinstance(v, str | int)}
        values.update(user_tokens(user_id))
        missing = False

        def fill(match: re.Match[str]) -> str:
            nonlocal missing
            value = values.get(match.group(1))
            if value is None:
                missing = True
                return ""
            return quote(str(value), safe="")

        rendered = _TOKEN.sub(fill, self.template)
        return None if missing else rendered


def _usable(value: Any) -> bool:
    """Whether a prefetched value can be used as is (not a failure report)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("resourceType"), str):
        return False
    if value["resourceType"] == "OperationOutcome":
        return False
    if value["resourceType"] == "Bundle":
        for entry in value.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, Mapping) else None
            if isinstance(resource, Mapping) and resource.get("resourceType") == "OperationOutcome":
                issues = resource.get("issue") or ()
                if any(
                    i.get("severity") in ("error", "fatal")
                    for i in issues
                    if isinstance(i, Mapping)
                ):
                    return False
    return True


class PrefetchResolver:
    """Resolves one call's prefetch keys on demand, each at most once.

    Keys are resolved when first asked for, so a key the service does not need in this call is
    never fetched, and fetches run concurrently with the service's other work (the caller bounds
    them in time).

    Args:
        templates: ``key -> (template, required)``.
        prefetch: the call's ``prefetch`` object, or ``None``.
        context: the call's context.
        user_id: the call's ``context.userId``.
        fetcher: the call's FHIR server (or the deployment's default), ``None`` when there is
            none to ask.
        no_fetcher: why there is none, for the 412 or the omission (default: no server).
    """

    def __init__(
        self,
        templates: Mapping[str, tuple[PrefetchTemplate, bool]],
        prefetch: Mapping[str, Any] | None,
        *,
        context: Mapping[str, Any],
        user_id: str,
        fetcher: FhirFetcher | None,
        no_fetcher: str = "no FHIR server to ask",
    ) -> None:
        self._templates = templates
        self._given = prefetch or {}
        self._context = context
        self._user_id = user_id
        self._fetcher = fetcher
        self._no_fetcher = no_fetcher
        self._tasks: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
        self.fetched: list[str] = []
        self.omitted: list[tuple[str, str]] = []

    async def value(self, key: str) -> dict[str, Any] | None:
        """The key's resource, or ``None`` when there is no data (or an optional key failed).

        Raises:
            PrefetchUnavailable: a required key could not be obtained.
            KeyError: ``key`` is not one of the service's prefetch keys.
        """
        if key not in self._templates:
            raise KeyError(key)
        if key not in self._tasks:
            self._tasks[key] = asyncio.ensure_future(self._resolve(key))
        return await asyncio.shield(self._tasks[key])

    def close(self) -> None:
        """Cancel fetches still running when the call is over (cut by its deadline)."""
        for task in self._tasks.values():
            task.cancel()

    async def _resolve(self, key: str) -> dict[str, Any] | None:
        template, required = self._templates[key]
        if key in self._given and self._given[key] is None:
            return None
        if key in self._given and _usable(self._given[key]):
            return dict(self._given[key])
        why = "not prefetched" if key not in self._given else "the client could not prefetch it"
        query = template.render(self._context, user_id=self._user_id)
        if self._fetcher is None:
            reason = f"{why}, and {self._no_fetcher}"
        elif query is None:
            reason = f"{why}, and the call lacks a value its query needs"
        else:
            try:
                found = await self._fetcher.fetch(query)
            except SourceUnavailable as error:
                reason = str(error)
            else:
                self.fetched.append(key)
                return found
        if required:
            raise PrefetchUnavailable(key, reason)
        self.omitted.append((key, reason))
        return None
