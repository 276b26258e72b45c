"""Typed errors of the core, each naming the gRPC status a service maps it to.

The core never imports grpc; services translate ``SpecdecError.status`` (the
name of a ``grpc.StatusCode``) in one interceptor.
"""

from __future__ import annotations


class SpecdecError(Exception):
    """Base class: an error a caller can act on. ``status`` names a grpc.StatusCode."""

    status: str = "INTERNAL"


class InvalidArgument(SpecdecError):
    """The request itself is wrong (bad ids, empty prompt, k out of range, NaN q...)."""

    status = "INVALID_ARGUMENT"


class NotFound(SpecdecError):
    """A named thing (session, worker) does not exist."""

    status = "NOT_FOUND"


class FailedPrecondition(SpecdecError):
    """The system is not in a state to do this (stale block, incompatible pair)."""

    status = "FAILED_PRECONDITION"


class VocabularyMismatch(FailedPrecondition):
    """Draft and oracle tokenizers differ: their outputs cannot be compared."""


class ResourceExhausted(SpecdecError):
    """A limit is reached (sessions, queue, KV memory); retry later or elsewhere."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(SpecdecError):
    """No worker can serve this now (none registered, peer gone)."""

    status = "UNAVAILABLE"


class Unauthenticated(SpecdecError):
    """The caller did not prove who it is (no bearer token, or an unknown one)."""

    status = "UNAUTHENTICATED"


class PermissionDenied(SpecdecError):
    """The caller is authenticated but not allowed to touch this resource."""

    status = "PERMISSION_DENIED"


class AlreadyExists(SpecdecError):
    """A name is taken (a live worker's id)."""

    status = "ALREADY_EXISTS"


def quoted(text: str, limit: int = 40) -> str:
    """``text`` for an error message or a log line: repr'd, cut to ``limit`` characters.

    Ids and strings a caller sends can be megabytes long: an error that repeated them
    whole would itself exceed the message limit (and fill the logs)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
