"""A minimal async workflow engine: graphs of Python nodes over a shared state, served over HTTP.

Nodes are registered Python functions (async, or plain ones run in a worker thread) that read and update a
`WorkflowState` (`data` and `metadata`). A graph, written as JSON, names a start node, its nodes, and per node a
default next node plus ordered branches on registered conditions; loops are allowed and bounded by
`max_iterations`. Every step is logged with the keys it changed and their new values.

Run it:    uvicorn workflow_engine:app            (WORKFLOW_* settings, read at startup; WORKFLOW_DB: SQLite/PostgreSQL)
Embed it:  app = create_app(registry=my_registry)  (a Starlette app with its own registry and store)
Call it:   run = await Engine(registry).run(graph, WorkflowState(data={...}))

Endpoints:
    GET  /                             health check
    POST /graph/create                 store a graph definition      -> 201 {"graph_id", "warnings"}
    POST /graph/run                    run a stored graph            -> 200 run record; "wait": false -> 202
    GET  /graph/state/{run_id}         a run's record; DELETE /graph/runs/{run_id} deletes one that is not active
    GET  /graph/definition/{graph_id}  a stored graph, as /graph/create accepts it; DELETE: delete it
    POST /graph/cancel/{run_id}        cancel a pending, running or paused run, on whichever server runs it
    GET  /graph/stream/{run_id}        the run's events as Server-Sent Events (WS /graph/ws/{run_id}: as JSON)
    GET  /graph/runs, /graph/list      run summaries (newest first) and graphs, paginated
    POST /graph/resume/{run_id}        go on with a waiting or interrupted run
    GET  /openapi.json, /metrics       the OpenAPI 3.1 document; this process's metrics for Prometheus

Every non-2xx answer has one shape:
    {"error": {"code": "graph_not_found", "message": "graph 'x' does not exist", "details": [{"path", "message"}]}}
"""

import asyncio
import base64
import contextlib
import enum
import functools
import gc
import hashlib
import hmac
import http.client
import importlib
import importlib.util
import inspect
import itertools
import json
import logging
import marshal
import math
import operator
import os
import re
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
import types
import typing
import urllib.parse
import weakref
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    is_mapping,
    is_mutable_sequence,
    is_sequence,
    list_structure_factory,
    mapping_structure_factory,
)
from cattrs.errors import AttributeValidationNote
from cattrs.fns import identity
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

__all__ = [
    "BearerAuth",
    "BranchCondition",
    "BranchResult",
    "Branches",
    "Busy",
    "ChangeHook",
    "EdgeDef",
    "Engine",
    "EngineError",
    "ErrorCode",
    "GraphConflict",
    "GraphDefinition",
    "GraphInUse",
    "GraphNotFound",
    "Heartbeat",
    "Interrupt",
    "InvalidGraph",
    "InvalidJson",
    "InvalidRequest",
    "JsonKind",
    "JsonLogFormatter",
    "Lease",
    "LeaseLost",
    "LogEntry",
    "LogEvent",
    "LogFormat",
    "MapDef",
    "MemoryStore",
    "MergePolicy",
    "MetricKind",
    "Metrics",
    "NodeContext",
    "NodeDef",
    "NodeIO",
    "NodePlan",
    "OPERATIONS",
    "Operation",
    "ParallelDef",
    "PlainText",
    "PostgresStore",
    "Problem",
    "RUN_MOVES",
    "Registry",
    "RequestMetrics",
    "ResumeRequest",
    "RetryPolicy",
    "RunConflict",
    "RunContext",
    "RunEvent",
    "RunNotFound",
    "RunRequest",
    "RunResponse",
    "RunStatus",
    "Settings",
    "SqlStore",
    "SqliteStore",
    "StatusChange",
    "Store",
    "StoreFull",
    "StoreUnavailable",
    "StreamEvent",
    "UnknownName",
    "UnsupportedMediaType",
    "WebhookDelivery",
    "WebhookEvent",
    "WebhookResult",
    "WorkflowState",
    "app",
    "build_engine",
    "create_app",
    "execute_run",
    "graph_warnings",
    "json_problem",
    "json_schema",
    "move_run",
    "new_run",
    "open_store",
    "openapi_document",
    "parse_webhook_hosts",
    "post_webhook",
    "run_events",
    "run_graph",
    "settings_from_env",
    "sign_webhook",
    "structure_body",
    "url_problem",
    "validate_graph",
    "webhook_event",
    "webhook_target",
    "worker_name",
]

T = TypeVar("T")

# ---------------------------------------------------------------------------
# Constants and limits
# ---------------------------------------------------------------------------
MAX_ITERATIONS = 100  # node executions per run unless the graph or the run request says otherwise
MAX_ITERATIONS_CAP = 10_000  # server-wide ceiling on any max_iterations a graph or run may ask for
MAX_STORED_RUNS = 10_000  # finished runs kept in memory; the oldest finished is evicted first
MAX_STORED_GRAPHS = 10_000  # graph definitions kept in memory
MAX_PLANS = 1_000  # graphs a registry keeps planned for the runner (see Registry.plan); the oldest is planned anew
RUN_COMPRESSION_LEVEL = 3  # zlib level of stored runs: about fourfold smaller; 6 shrinks 7% more in twice the time
# A finished run's JSON shorter than this is kept as it is: zlib would save a kilobyte or so, and cost at every read.
RUN_COMPRESSION_MIN_BYTES = 2 * 1024
OFF_LOOP_BYTES = 16 * 1024  # a record estimated over this much JSON is encoded on a store's thread, not the loop
MAX_BODY_BYTES = 1024 * 1024  # largest request body accepted
MAX_CONCURRENT_RUNS = 1_000  # runs executing at once; more wait as `pending`
MAX_PENDING_RUNS = 10_000  # runs waiting for a slot; beyond this a new run is refused with 503
MAX_PAUSED_RUNS = 10_000  # runs waiting or interrupted; a run that would pause beyond this fails instead
RETRY_AFTER_S = 1  # what a 503 tells the client to wait
STREAM_KEEPALIVE_S = 15.0  # an idle event stream sends a comment this often, so proxies keep it open
STREAM_POLL_S = 0.25  # how often a stream without notifications (SQLite) checks a run another process executes
CANCEL_POLL_S = 0.05  # how often a cancel of a run on another server checks whether it has stopped
SQLITE_BUSY_TIMEOUT_S = 10.0  # how long a write waits for another process's write to finish
HERE_CHECKPOINT_COMMITS = 200  # SQLite: commits on the caller's thread between WAL checkpoints (~4 MB, as SQLite's)
MAX_PAGE = 1_000  # most items one list request returns
MAX_NODES = 1_000  # nodes in one graph
MAX_BRANCHES = 100  # branches on one edge
MAX_FANOUT = 64  # most branches of one map or parallel node, running at once or in all (a map's items)
FANOUT_CONCURRENCY = 8  # branches of one map or parallel node running at once unless it says otherwise
MAX_STATE_BYTES = 4 * 1024 * 1024  # a run's data, counted as the JSON text of its values; past it the step fails
MAX_LOG_BYTES = 4 * 1024 * 1024  # the updates a run's log keeps, counted the same way; past it values are left out
MAX_ID_CHARS = 128  # longest graph or run id
SHUTDOWN_GRACE_S = 10.0  # on shutdown, how long running runs may go on before they are cancelled
LEASE_S = 10.0  # how long a server's claim on a run lasts unless renewed (every third of it); then others take over
MAX_RECOVERIES = 3  # takeovers of one run after its server stopped renewing; one more and the run fails
HEARTBEAT_S = 1.0  # most time between a server's looks at its leases, cancel requests, expired runs and the queue
MAX_TIMEOUT_S = 86_400.0  # longest timeout or backoff a graph or run may ask for
MAX_ATTEMPTS = 100  # most tries a retry policy may ask for
MAX_JSON_DEPTH = 64  # deepest nesting of lists and objects accepted in bodies and node output
GRAPH_ID_PATTERN = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_ID_CHARS}}}")  # every id: graphs and runs, body, path, query
ID_RULE = f"must be 1-{MAX_ID_CHARS} characters of A-Z, a-z, 0-9, '_', '.', '-'"  # what GRAPH_ID_PATTERN says
MAX_SHOWN_CHARS = MAX_ID_CHARS  # most characters of a client's value an error repeats: a valid id is shown whole
MAX_SHOWN_ITEMS = 10  # most client-named items (extra fields) that an error lists
MAX_PROBLEMS = 100  # most details an error lists; the message says how many there were
MAX_METRIC_GRAPHS = 100  # graph ids with a label of their own in /metrics; further graphs share OTHER_LABEL
OTHER_LABEL = "_other"  # the metric label value of every graph past the bound (and of those graphs' nodes)
UNMATCHED_ROUTE = "_unmatched"  # the route label of a request to a path no route matches
METRIC_BUCKETS_S = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0, 3600.0)  # histogram bounds, seconds
PROMETHEUS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text exposition format
SWEEP_INTERVAL_S = 60.0  # how often expired runs are deleted; with a shared store, by one server per interval
SWEEP_BATCH = 500  # runs one sweep transaction (or one slice of the memory store) deletes
IDEMPOTENCY_TTL_S = 86_400.0  # how long a store keeps an Idempotency-Key, counted from its first request
IDEMPOTENCY_RESERVE_S = 60.0  # a key whose first request has not started its run after this long is free again
IDEMPOTENCY_POLL_S = 0.05  # how often a request waits on the first request with its key to start the run
MAX_IDEMPOTENCY_KEYS = 100_000  # keys a memory store keeps; past it the oldest is forgotten before its time
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x20-\x7e]{1,255}")  # the Idempotency-Key header: printable ASCII
IDEMPOTENCY_KEY_RULE = "must be 1-255 printable ASCII characters"  # what IDEMPOTENCY_KEY_PATTERN says
WEBHOOK_TIMEOUT_S = 5.0  # how long a webhook attempt waits to connect, and then for each part of the answer
WEBHOOK_ATTEMPTS = 5  # tries of one webhook delivery unless WORKFLOW_WEBHOOK_ATTEMPTS says otherwise
WEBHOOK_BACKOFF_S = 1.0  # the wait after a webhook's first failed attempt; it doubles after each further one
WEBHOOK_MAX_BACKOFF_S = 3_600.0  # the longest wait between two attempts of a webhook
WEBHOOK_CLAIM_S = 30.0  # how long a server's claim on a webhook lasts; then another server may send it
WEBHOOK_POLL_S = 1.0  # how often an idle server looks for webhooks due (other servers' runs, retries, restarts)
WEBHOOK_BATCH = 8  # webhooks one server sends at once
WEBHOOK_ANSWER_BYTES = 64 * 1024  # most of a receiver's answer read before the connection is closed
MAX_URL_CHARS = 2_048  # longest webhook URL
DEFAULT_WORKFLOWS = ("code_review",)

_COUNT = re.compile(r"[0-9]{1,18}")  # a count in a header or query: ASCII digits, small enough for any use here

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
@enum.unique
class ErrorCode(enum.Enum):
    """The `error.code` values of the HTTP API."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    INVALID_GRAPH = "invalid_graph"
    UNKNOWN_NAME = "unknown_name"
    GRAPH_NOT_FOUND = "graph_not_found"
    RUN_NOT_FOUND = "run_not_found"
    GRAPH_CONFLICT = "graph_conflict"
    RUN_CONFLICT = "run_conflict"
    BUSY = "busy"
    STORE_UNAVAILABLE = "store_unavailable"
    STORE_FULL = "store_full"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"
    UNAUTHORIZED = "unauthorized"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    INTERNAL_ERROR = "internal_error"


def _shown(value: object) -> str:
    """Quote a client's value for an error message: a long one only by its start, so the answer stays short."""
    text = repr(value) if isinstance(value, str) else str(value)
    if len(text) <= MAX_SHOWN_CHARS + 2:  # room for the quotes
        return text
    if isinstance(value, str):
        return f"{value[:MAX_SHOWN_CHARS]!r}... ({len(value)} characters)"
    return f"{text[:MAX_SHOWN_CHARS]}... ({len(text)} characters)"


class InvalidValue(ValueError):
    """A value of the wrong JSON type or outside its bounds; the message is meant for the client."""


@attrs.frozen
class Problem:
    """One thing wrong with a request: a JSON path from `$` and what is wrong there."""

    path: str
    message: str


class EngineError(Exception):
    """Root of every error the engine raises on purpose; `status_code` and `code` give the HTTP answer."""

    status_code = 500
    code = ErrorCode.INTERNAL_ERROR
    headers: Mapping[str, str] | None = None

    def __init__(self, message: str, details: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidJson(EngineError):
    """The body is not JSON, or not a JSON object."""

    status_code = 400
    code = ErrorCode.INVALID_JSON


class InvalidRequest(EngineError):
    """The body is JSON but does not match the request's schema."""

    status_code = 422
    code = ErrorCode.INVALID_REQUEST

    def __init__(self, details: list[Problem]) -> None:
        super().__init__(_problems_message("request", details), details[:MAX_PROBLEMS])


class InvalidGraph(EngineError):
    """A graph definition breaks a graph rule (unknown node, bad edge, ...)."""

    status_code = 422
    code = ErrorCode.INVALID_GRAPH

    def __init__(self, details: list[Problem]) -> None:
        super().__init__(_problems_message("graph", details), details[:MAX_PROBLEMS])


class UnknownName(EngineError):
    """A node, condition or tool name that is not registered."""

    status_code = 422
    code = ErrorCode.UNKNOWN_NAME

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {_shown(name)}; registered: {', '.join(sorted(known)) or 'none'}")


class GraphNotFound(EngineError):
    """No graph is stored under the id."""

    status_code = 404
    code = ErrorCode.GRAPH_NOT_FOUND

    def __init__(self, graph_id: str) -> None:
        super().__init__(f"graph {_shown(graph_id)} does not exist")


class RunNotFound(EngineError):
    """No run is stored under the id (it never existed, or was evicted)."""

    status_code = 404
    code = ErrorCode.RUN_NOT_FOUND

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {_shown(run_id)} does not exist")


class GraphConflict(EngineError):
    """A different graph is already stored under the id."""

    status_code = 409
    code = ErrorCode.GRAPH_CONFLICT

    def __init__(self, graph_id: str) -> None:
        super().__init__(f"graph {_shown(graph_id)} already exists with a different definition")


class GraphInUse(EngineError):
    """A graph that cannot be deleted: it is registered in code, or runs of it are active."""

    status_code = 409
    code = ErrorCode.GRAPH_CONFLICT

    def __init__(self, graph_id: str, reason: str) -> None:
        super().__init__(f"graph {_shown(graph_id)} cannot be deleted: {reason}")


class StoreFull(EngineError):
    """The store holds as many graphs as it may."""

    status_code = 409
    code = ErrorCode.STORE_FULL

    def __init__(self, limit: int) -> None:
        super().__init__(f"the store already holds {limit} graphs, its limit")


class RunConflict(EngineError):
    """The run is not in a state that allows the request (cancelling a finished run)."""

    status_code = 409
    code = ErrorCode.RUN_CONFLICT


class Busy(EngineError):
    """The engine cannot take another run now; the client should retry later."""

    status_code = 503
    code = ErrorCode.BUSY
    headers: Mapping[str, str] | None = MappingProxyType({"Retry-After": str(RETRY_AFTER_S)})


class StoreUnavailable(EngineError):
    """The store refused a write the run needs (a full disk, a lost database); the run's stored record is unchanged."""

    status_code = 503
    code = ErrorCode.STORE_UNAVAILABLE
    headers: Mapping[str, str] | None = MappingProxyType({"Retry-After": str(RETRY_AFTER_S)})

    def __init__(self, run_id: str, cause: BaseException) -> None:
        super().__init__(f"the store could not save run {run_id!r}: {_describe(cause)}")


class LeaseLost(RunConflict):
    """A write for a run whose lease another worker (or a later attempt) now holds; nothing was written."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} is now owned by another worker; this one stopped executing it")


class IdempotencyKeyReused(EngineError):
    """An Idempotency-Key that an earlier, different request used: the key names that request alone."""

    status_code = 422
    code = ErrorCode.IDEMPOTENCY_KEY_REUSED

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {_shown(key)} was used with a different request",
                         [Problem("$.headers.Idempotency-Key", "was used with a different request")])


class BodyTooLarge(EngineError):
    """The request body is over the size limit."""

    status_code = 413
    code = ErrorCode.BODY_TOO_LARGE

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the limit of {limit} bytes")


class UnsupportedMediaType(EngineError):
    """The request has a body whose Content-Type is not JSON (`application/json` or a `+json` type), or none."""

    status_code = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE

    def __init__(self, content_type: str | None) -> None:
        got = "none" if content_type is None else _shown(content_type)
        super().__init__("the request body must be JSON, sent with Content-Type: application/json", [
            Problem("$.headers.Content-Type", f"expected application/json or a type ending in +json, got {got}")])


class Interrupt(Exception):
    """Raised by a node to pause its run for a person: the run ends `waiting`, and a resume runs the node again."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _problems_message(subject: str, details: list[Problem]) -> str:
    # A 1 MB body can hold 200,000 problems: listing them all would answer with tens of megabytes.
    listed = f"; the first {MAX_PROBLEMS} are listed" if len(details) > MAX_PROBLEMS else ""
    return f"the {subject} has {len(details)} problem{'' if len(details) == 1 else 's'}{listed}"


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
# Definitions are frozen; only the run record, which the runner updates step by step, is mutable.
@enum.unique
class RunStatus(enum.Enum):
    """Where a run is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED_MAX_ITERATIONS = "stopped_max_iterations"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    WAITING = "waiting"
    INTERRUPTED = "interrupted"

    # Members are singletons compared by identity, so they hash by identity: in C, where Enum's own __hash__ is a
    # Python call, and every move of a run looks its status up in RUN_MOVES.
    __hash__ = object.__hash__

    def __init__(self, value: str) -> None:
        # Plain attributes, set once per member: the run path reads them about a dozen times a run, and a property
        # is a Python call each time. Active: the run waits for a slot or executes. Resumable: it stopped part-way
        # (for a person, or because its process died) and may be resumed. Terminal: it has ended for good.
        self.is_active = value in ("pending", "running")
        self.is_resumable = value in ("waiting", "interrupted")
        self.is_terminal = not self.is_active and not self.is_resumable


# Every move a run's status may make; `move_run` applies one and refuses the rest. Nothing else sets a status.
# `interrupted` is what runs of a dead process became before leases; such runs can still be resumed or cancelled.
RUN_MOVES: Mapping[RunStatus, frozenset[RunStatus]] = MappingProxyType({
    RunStatus.PENDING: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.RUNNING: frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED_MAX_ITERATIONS,
                                  RunStatus.CANCELLED, RunStatus.TIMED_OUT, RunStatus.WAITING,
                                  RunStatus.PENDING}),  # back in the queue: its server stopped renewing its lease
    RunStatus.WAITING: frozenset({RunStatus.PENDING, RunStatus.CANCELLED}),  # resumed, or cancelled while paused
    RunStatus.INTERRUPTED: frozenset({RunStatus.PENDING, RunStatus.CANCELLED}),
    **{status: frozenset() for status in RunStatus if status.is_terminal},
})


@enum.unique
class LogFormat(enum.Enum):
    """How the server writes its own log: lines for people, or one JSON object per line for a log store."""

    TEXT = "text"
    JSON = "json"


@enum.unique
class LogEvent(enum.Enum):
    """What happened in one step of a run."""

    EXECUTED = "executed"
    ERROR = "error"
    RETRY = "retry"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    INTERRUPT = "interrupt"
    RESUMED = "resumed"
    RECOVERED = "recovered"

    __hash__ = object.__hash__  # as RunStatus's: the metrics count every run's steps by event


# Validators run once every field is structured, so cattrs would report their errors at the object's path; the note
# cattrs itself attaches to a failing field's error makes it report them at the field's path instead.
def _field_error(attribute: attrs.Attribute, message: str) -> InvalidValue:
    error = InvalidValue(message)
    error.add_note(AttributeValidationNote(f"validating field {attribute.name}", attribute.name, attribute.type))
    return error


def _positive(instance: object, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise _field_error(attribute, f"{attribute.name} must be at least 1, got {_shown(value)}")


def _seconds(instance: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not 0 < value <= MAX_TIMEOUT_S:
        raise _field_error(attribute, f"{attribute.name} must be more than 0 and at most {MAX_TIMEOUT_S}, "
                                      f"got {_shown(value)}")


def _id(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if not GRAPH_ID_PATTERN.fullmatch(value):
        raise _field_error(attribute, ID_RULE)


def _webhook_url(instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and (problem := url_problem(value)):
        raise _field_error(attribute, problem)


def url_problem(url: str) -> str | None:
    """What is wrong with `url` as a webhook target, or None: it must be an absolute http(s) URL with a host."""
    if len(url) > MAX_URL_CHARS:
        return f"must be at most {MAX_URL_CHARS} characters"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        return "must be a URL such as http://host:port/path"
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None or parts.fragment \
            or not url.isascii() or any(char.isspace() for char in url):
        return "must be an http:// or https:// URL with a host, no user name and no #fragment"
    return None


def webhook_target(url: str) -> str:
    """The `host:port` a webhook URL goes to, as WORKFLOW_WEBHOOK_HOSTS names it (lower case, port spelled out)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{f'[{host}]' if ':' in host else host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def parse_webhook_hosts(entries: Iterable[str]) -> tuple[str, ...]:
    """The allowed webhook targets `entries` name, each `host:port` (an IPv6 host in brackets), as webhook_target
    spells them; raise InvalidValue for an entry that is not one."""
    hosts = []
    for entry in (entry.strip() for entry in entries):
        try:
            parts = urllib.parse.urlsplit("//" + entry)
            is_pair = bool(parts.hostname) and parts.port is not None and not (
                parts.path or parts.query or parts.username)
        except ValueError:
            is_pair = False
        if not is_pair or any(char.isspace() for char in entry):
            raise InvalidValue(f"{_shown(entry)} is not a host:port pair such as 127.0.0.1:9000 or "
                               "hooks.example.com:443")
        hosts.append(webhook_target(f"http://{entry}"))
    return tuple(hosts)


def _between(low: float, high: float) -> Callable[[object, attrs.Attribute, float], None]:
    def check(instance: object, attribute: attrs.Attribute, value: float) -> None:
        if not low <= value <= high:
            raise _field_error(attribute, f"{attribute.name} must be between {low} and {high}, got {_shown(value)}")

    return check


@attrs.define(kw_only=True)
class WorkflowState:
    """The state nodes read and update: `data` for the workflow, `metadata` for the caller's bookkeeping."""

    data: dict[str, Any] = attrs.field(factory=dict)
    metadata: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class BranchCondition:
    """Go to `target` when the registered condition `condition` is true."""

    condition: str
    target: str


@attrs.frozen(kw_only=True)
class EdgeDef:
    """Where to go after a node: the first branch whose condition holds, else `default_next` (None ends the run).

    If the node fails (after its retries) and `on_error` names a node, the run goes there instead of failing.
    """

    default_next: str | None = None
    branches: tuple[BranchCondition, ...] = ()
    on_error: str | None = None


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Try a failing node up to `max_attempts` times, waiting `backoff_s`, then that times `backoff_factor`, ..."""

    max_attempts: int = attrs.field(default=1, validator=_between(1, MAX_ATTEMPTS))
    backoff_s: float = attrs.field(default=0.0, validator=_between(0.0, MAX_TIMEOUT_S))
    backoff_factor: float = attrs.field(default=2.0, validator=_between(1, 10))

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 for the first)."""
        return self.backoff_s * self.backoff_factor ** (attempt - 1)


NO_RETRY = RetryPolicy()


@enum.unique
class MergePolicy(enum.Enum):
    """How a parallel node joins a data key that its branches wrote: each branch's new value, in branch order."""

    ERROR = "error"  # more than one branch wrote it: the step fails, naming the key and the branches
    FIRST = "first"
    LAST = "last"
    APPEND = "append"  # a list of the values
    EXTEND = "extend"  # the lists, concatenated
    MERGE = "merge"  # the objects, joined; a key two branches set differently is an error
    SUM = "sum"
    MIN = "min"
    MAX = "max"


@attrs.frozen(kw_only=True)
class MapDef:
    """Run `graph` once per item of `data[over]` (as `data[as]`); collect each branch's `data[output]`, in order.

    `data[collect]` becomes the list of each branch's `data[output]` (its whole data without `output`), in the
    order of the items, whatever order the branches finish in.
    """

    over: str
    as_: str = attrs.field(metadata={"wire_name": "as"})  # a Python keyword
    graph: str
    collect: str
    output: str | None = None
    max_concurrency: int | None = attrs.field(default=None, validator=_positive)


def _not_empty(instance: object, attribute: attrs.Attribute, value: tuple) -> None:
    if not value:
        raise _field_error(attribute, f"{attribute.name} must not be empty")


@attrs.frozen(kw_only=True)
class ParallelDef:
    """Run each graph of `branches` from a copy of the data; join what they wrote, by `merge` where more wrote it."""

    branches: tuple[str, ...] = attrs.field(validator=_not_empty)
    merge: dict[str, MergePolicy] = attrs.field(factory=dict)
    max_concurrency: int | None = attrs.field(default=None, validator=_positive)


@attrs.frozen(kw_only=True)
class NodeDef:
    """A node with settings; in a graph's `nodes` a plain name stands for `NodeDef(name=...)`.

    `fn` names the registered function (default: `name`, so one function can serve several nodes), `config`
    reaches the node as `ctx.config`, and `timeout_s` bounds each attempt. Instead of a function, a node may run
    other graphs: `graph` (one, as a step), `map` (one per item of a list) or `parallel` (several side by side);
    then `timeout_s`, `retry` and `on_error` apply to the whole step.
    """

    name: str
    fn: str | None = None
    graph: str | None = None
    map: MapDef | None = None
    parallel: ParallelDef | None = None
    timeout_s: float | None = attrs.field(default=None, validator=_seconds)
    retry: RetryPolicy = NO_RETRY
    config: dict[str, Any] = attrs.field(factory=dict)

    @property
    def is_composite(self) -> bool:
        """Whether the node runs graphs (`graph`, `map` or `parallel`) rather than a function."""
        return self.graph is not None or self.map is not None or self.parallel is not None

    @property
    def function(self) -> str:
        """The name of the registered function this node calls; "" (never a registered name) for a composite."""
        return "" if self.is_composite else self.fn or self.name

    @property
    def graph_ids(self) -> tuple[str, ...]:
        """The graphs this node runs, in branch order."""
        if self.map is not None:
            return (self.map.graph,)
        return self.parallel.branches if self.parallel is not None else tuple(filter(None, [self.graph]))


@attrs.frozen(kw_only=True)
class GraphDefinition:
    """A workflow: its nodes, where it starts, and the edges between nodes."""

    graph_id: str | None = None
    start_node: str
    nodes: tuple[str | NodeDef, ...]
    edges: dict[str, EdgeDef] = attrs.field(factory=dict)
    max_iterations: int | None = attrs.field(default=None, validator=_positive)
    interrupt_before: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # data keys the initial state brings, for the check of what nodes declare they read

    @functools.cached_property
    def node_defs(self) -> dict[str, NodeDef]:
        """Every node as a NodeDef, by name (a name listed twice keeps its first definition)."""
        defs: dict[str, NodeDef] = {}
        for node in self.nodes:
            node_def = NodeDef(name=node) if isinstance(node, str) else node
            defs.setdefault(node_def.name, node_def)
        return defs

    @functools.cached_property
    def has_branches(self) -> bool:
        """Whether a node of the graph runs other graphs (`graph`, `map` or `parallel`)."""
        return any(node.is_composite for node in self.node_defs.values())


# Not frozen: a frozen attrs class costs twice as much to create and the runner makes one per step. The runner
# completes an entry (next node, branch) before it joins the run's log; nothing changes it after that.
@attrs.define(kw_only=True)
class LogEntry:
    """One step of a run: a node executed (or failed), the data keys it changed and where the run went next.

    Replaying `updates` rebuilds the state: a key in `keys_changed` but not in `updates` was removed, unless it is
    in `updates_omitted`: the run's log had reached its `max_log_bytes`, so the new value was left out.
    """

    iteration: int
    node: str
    event: LogEvent
    started_at: datetime
    duration_ms: float
    keys_changed: tuple[str, ...] = ()
    updates: dict[str, Any] = attrs.field(factory=dict)
    next: str | None = None
    branch: str | None = None
    error: str | None = None
    attempt: int = 1
    updates_omitted: tuple[str, ...] = ()
    path: str | None = None  # where a branch's step ran (`review_each[3]/extract`); None for the run's own steps


@attrs.frozen(kw_only=True)
class BranchResult:
    """What a finished branch changed in its copy of the data: new values, and the keys it removed."""

    updates: dict[str, Any]
    removed: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class StatusChange:
    """One move of a run's status: to what, when, and after how many of its log entries."""

    status: RunStatus
    at: datetime
    log_count: int


@attrs.define(kw_only=True)
class WebhookDelivery:
    """Where a run's completion webhook goes and how its latest delivery went (each stop is one delivery)."""

    url: str
    attempts: int = 0
    delivered_at: datetime | None = None
    last_error: str | None = None


@enum.unique
class WebhookResult(enum.Enum):
    """How one attempt to deliver a webhook went: `failed` is retried, `abandoned` was the last attempt."""

    DELIVERED = "delivered"
    FAILED = "failed"
    ABANDONED = "abandoned"


@attrs.define(kw_only=True)
class RunContext:
    """The record of one run: its status, where it is, its state and its log.

    `history` holds every status the run took, in order; with `logs` it is the run's event sequence, which streams
    number from 1, so an event keeps its id across pauses, resumes and restarts.
    """

    run_id: str
    graph_id: str
    status: RunStatus = RunStatus.PENDING
    current_node: str | None = None
    next_node: str | None = None  # the node to execute next; where a resumed run goes on
    iteration: int = 0
    max_iterations: int = MAX_ITERATIONS
    max_state_bytes: int = MAX_STATE_BYTES
    max_log_bytes: int = MAX_LOG_BYTES
    timeout_s: float | None = None
    state: WorkflowState
    logs: list[LogEntry] = attrs.field(factory=list)
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float = 0.0
    engine_overhead_ms: float = 0.0
    history: list[StatusChange] = attrs.field(factory=list)
    # The finished branches of the composite step at `next_node`, by branch (`review_each[3]`, `a[0]/b[1]`): saved
    # before the join, so a run resumed or taken over mid-step runs only the others. Empty between steps.
    branch_results: dict[str, BranchResult] = attrs.field(factory=dict)
    webhook: WebhookDelivery | None = None


def _refused(run_id: str, current: RunStatus, target: RunStatus) -> RunConflict:
    """The error for a move RUN_MOVES does not allow; it names both statuses."""
    allowed = sorted(status.value for status in RUN_MOVES[current])
    then = f"from {current.value} it can only become {' or '.join(allowed)}" if allowed else "it has ended"
    return RunConflict(f"run {run_id!r} is {current.value} and cannot become {target.value}; {then}")


def _delete_refused(run_id: str, status: RunStatus) -> RunConflict:
    """The error for deleting a run that is pending or running."""
    return RunConflict(f"run {run_id!r} is {status.value} and cannot be deleted; cancel it first, then delete it")


def move_run(run: RunContext, target: RunStatus, error: str | None = None) -> None:
    """Move `run` to `target` if RUN_MOVES allows it, stamping its times and history; else raise RunConflict."""
    if target not in RUN_MOVES[run.status]:
        raise _refused(run.run_id, run.status, target)
    now = datetime.now(UTC)
    if target is RunStatus.RUNNING:
        run.started_at = run.started_at or now
    run.finished_at = None if target.is_active else now
    run.status, run.error = target, error
    run.history.append(StatusChange(status=target, at=now, log_count=len(run.logs)))


@attrs.frozen(kw_only=True)
class RunRequest:
    """The body of `POST /graph/run`."""

    graph_id: str = attrs.field(validator=_id)
    state: WorkflowState = attrs.field(factory=WorkflowState)
    max_iterations: int | None = attrs.field(default=None, validator=_positive)
    timeout_s: float | None = attrs.field(default=None, validator=_seconds)
    wait: bool = True
    webhook: str | None = attrs.field(default=None, validator=_webhook_url)  # POSTed to whenever the run stops


@attrs.frozen(kw_only=True)
class ResumeRequest:
    """The body of `POST /graph/resume/{run_id}`; `updates` are merged into `state.data` first."""

    updates: dict[str, Any] = attrs.field(factory=dict)
    timeout_s: float | None = attrs.field(default=None, validator=_seconds)
    wait: bool = True


@attrs.frozen(kw_only=True)
class RunResponse:
    """The answer of `POST /graph/run`: the run record, its state as `final_state`."""

    run_id: str
    graph_id: str
    status: RunStatus
    final_state: WorkflowState
    logs: list[LogEntry]
    iteration: int
    current_node: str | None
    error: str | None
    duration_ms: float
    engine_overhead_ms: float


@attrs.frozen(kw_only=True)
class RunAccepted:
    """The answer of `POST /graph/run` with `"wait": false`."""

    run_id: str
    status: RunStatus


@attrs.frozen(kw_only=True)
class RunSummary:
    """One run in `GET /graph/runs`."""

    run_id: str
    graph_id: str
    status: RunStatus
    current_node: str | None
    iteration: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None


@attrs.frozen(kw_only=True)
class RunsPage:
    """The answer of `GET /graph/runs`: newest first."""

    runs: list[RunSummary]
    total: int
    limit: int
    offset: int


@attrs.frozen(kw_only=True)
class GraphSummary:
    """One graph in `GET /graph/list`."""

    graph_id: str
    start_node: str
    nodes: list[str]


@attrs.frozen(kw_only=True)
class GraphsPage:
    """The answer of `GET /graph/list`: in the order they were created."""

    graphs: list[GraphSummary]
    total: int
    limit: int
    offset: int


@enum.unique
class StreamEvent(enum.Enum):
    """The kinds of event a run's stream carries."""

    STATUS = "status"
    LOG = "log"
    END = "end"


@attrs.frozen(kw_only=True)
class RunEvent:
    """One event of a run's stream; `id` is its position in the run's event sequence, from 1."""

    id: int
    event: StreamEvent
    data: dict[str, Any]


@attrs.frozen(kw_only=True)
class StatusUpdate:
    """The data of a stream's `status` event: the status the run took."""

    status: RunStatus


@attrs.frozen(kw_only=True)
class RunEnd:
    """The data of a stream's last event."""

    status: RunStatus
    error: str | None
    iteration: int
    current_node: str | None
    state: WorkflowState


@attrs.frozen(kw_only=True)
class CreateGraphResponse:
    """The answer of `POST /graph/create`; `warnings` name declared inputs that nothing before their node writes."""

    graph_id: str
    warnings: list[Problem] = attrs.field(factory=list)


@enum.unique
class JsonKind(enum.Enum):
    """The JSON type of a data value, as a node declares what it reads and writes."""

    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    ARRAY = "array"
    OBJECT = "object"


@attrs.frozen(kw_only=True)
class NodeIO:
    """The `data` keys a node function reads (each must be there, of its kind) and may write (nothing else)."""

    reads: dict[str, JsonKind] = attrs.field(factory=dict)
    writes: dict[str, JsonKind] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ErrorBody:
    """What went wrong: a code for programs, a sentence for people, and each problem with its JSON path."""

    code: ErrorCode
    message: str
    details: list[Problem]


@attrs.frozen(kw_only=True)
class ErrorResponse:
    """Every answer that is not a 2xx."""

    error: ErrorBody


@attrs.frozen(kw_only=True)
class HealthResponse:
    """The answer of `GET /`."""

    status: str
    graphs: int
    runs: int


@attrs.frozen(kw_only=True)
class Settings:
    """Server settings; `settings_from_env` reads them from WORKFLOW_* environment variables."""

    max_iterations: int = attrs.field(default=MAX_ITERATIONS, validator=_positive)
    max_iterations_cap: int = attrs.field(default=MAX_ITERATIONS_CAP, validator=_positive)
    max_runs: int = attrs.field(default=MAX_STORED_RUNS, validator=_positive)
    max_graphs: int = attrs.field(default=MAX_STORED_GRAPHS, validator=_positive)
    max_body_bytes: int = attrs.field(default=MAX_BODY_BYTES, validator=_positive)
    max_concurrent_runs: int = attrs.field(default=MAX_CONCURRENT_RUNS, validator=_positive)
    max_pending_runs: int = attrs.field(default=MAX_PENDING_RUNS, validator=_positive)
    stream_keepalive_s: float = attrs.field(default=STREAM_KEEPALIVE_S, validator=_seconds)
    max_nodes: int = attrs.field(default=MAX_NODES, validator=_positive)
    max_branches: int = attrs.field(default=MAX_BRANCHES, validator=_positive)
    max_fanout: int = attrs.field(default=MAX_FANOUT, validator=_positive)
    max_state_bytes: int = attrs.field(default=MAX_STATE_BYTES, validator=_positive)
    shutdown_grace_s: float = attrs.field(default=SHUTDOWN_GRACE_S, validator=attrs.validators.ge(0.0))
    max_paused_runs: int = attrs.field(default=MAX_PAUSED_RUNS, validator=_positive)
    lease_s: float = attrs.field(default=LEASE_S, validator=_seconds)
    max_recoveries: int = attrs.field(default=MAX_RECOVERIES, validator=attrs.validators.ge(0))
    worker_id: str | None = None  # this server's name in the store's leases; None: host, pid and a random suffix
    db_path: str | None = None  # where to keep graphs and runs: a SQLite file or a postgresql:// URL; None: memory
    api_token: str | None = None  # when set, every endpoint but GET / wants `Authorization: Bearer <api_token>`
    log_format: LogFormat = LogFormat.TEXT
    # None means DEFAULT_WORKFLOWS, each skipped quietly when absent; named modules must exist.
    workflow_modules: tuple[str, ...] | None = None
    max_log_bytes: int = attrs.field(default=MAX_LOG_BYTES, validator=_positive)
    max_metric_graphs: int = attrs.field(default=MAX_METRIC_GRAPHS, validator=_positive)
    # How long a stopped run is kept, counted from its finished_at; None keeps it (finished ones until max_runs).
    run_ttl_s: float | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.gt(0.0)))
    paused_ttl_s: float | None = attrs.field(default=None,  # waiting and interrupted runs
                                             validator=attrs.validators.optional(attrs.validators.gt(0.0)))
    idempotency_ttl_s: float = attrs.field(default=IDEMPOTENCY_TTL_S, validator=attrs.validators.gt(0.0))
    # The host:port targets webhooks may go to; empty: webhooks are off.
    webhook_hosts: tuple[str, ...] = attrs.field(default=(), converter=parse_webhook_hosts)
    webhook_secret: str | None = None  # signs webhooks (Standard Webhooks); `whsec_<base64>` is the key's bytes
    webhook_attempts: int = attrs.field(default=WEBHOOK_ATTEMPTS, validator=_between(1, MAX_ATTEMPTS))
    webhook_backoff_s: float = attrs.field(default=WEBHOOK_BACKOFF_S, validator=_between(0.0, WEBHOOK_MAX_BACKOFF_S))

    def __attrs_post_init__(self) -> None:
        if self.max_iterations > self.max_iterations_cap:
            raise InvalidValue(f"max_iterations ({self.max_iterations}) must be at most max_iterations_cap "
                               f"({self.max_iterations_cap})")


DEFAULT_SETTINGS = Settings()


# ---------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------
# JSON is validated once, here, at the edge: strict types, no unknown keys, every problem reported with its path.
_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def _json_type(value: object) -> str:
    if isinstance(value, bool | type(None) | dict | list | str):
        return _JSON_TYPE_NAMES[type(value)]
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _strict(expected: type, name: str, accepts: tuple[type, ...], rejects: type | None = None) -> Callable:
    def hook(value: object, _: type) -> Any:
        if not isinstance(value, accepts) or type(value) is rejects:  # `rejects` is bool, which has no subclasses
            raise InvalidValue(f"expected {name}, got {_json_type(value)}")
        return expected(value) if expected is float or expected is dict else value  # an int as a float; a copy

    return hook


def _shape_guard(kind: type, name: str, factory: Callable) -> Callable:
    """Wrap a cattrs hook factory so its hooks reject anything that is not a JSON `kind` first."""

    def guarded_factory(type_: type, converter: cattrs.Converter) -> Callable:
        inner = factory(type_, converter)

        def hook(value: object, type_: type) -> Any:
            if not isinstance(value, kind):
                raise InvalidValue(f"expected {name}, got {_json_type(value)}")
            return inner(value, type_)

        return hook

    return guarded_factory


def _make_converter() -> cattrs.Converter:
    """Build the module's converter: strict JSON types, no extra keys, ISO 8601 datetimes, enums by value."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(str, _strict(str, "a string", (str,)))
    converter.register_structure_hook(int, _strict(int, "an integer", (int,), bool))
    converter.register_structure_hook(float, _strict(float, "a number", (int, float), bool))
    converter.register_structure_hook(bool, _strict(bool, "a boolean", (bool,)))
    # Later factories are tried first, so the predicates must stay disjoint.
    converter.register_structure_hook_factory(is_mutable_sequence, _shape_guard(
        list, "an array", list_structure_factory))
    converter.register_structure_hook_factory(lambda t: is_sequence(t) and not is_mutable_sequence(t),
                                              _shape_guard(list, "an array", homogenous_tuple_structure_factory))
    converter.register_structure_hook_factory(is_mapping, _shape_guard(dict, "an object", mapping_structure_factory))
    converter.register_structure_hook_func(lambda type_: type_ == dict[str, Any],  # JSON's keys are strings: copy
                                           _strict(dict, "an object", (dict,)))
    # Without this guard a model given a list or a scalar fails inside cattrs' generated code ("'list' object has no
    # attribute 'keys'", "expected WorkflowState"), which the client cannot act on.
    converter.register_structure_hook_factory(attrs.has, _shape_guard(
        dict, "an object", lambda type_, conv: conv.gen_structure_attrs_fromdict(type_)))

    def structure_node(value: object, _: type) -> str | NodeDef:
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return converter.structure(value, NodeDef)
        raise InvalidValue(f"expected a node name or a node object, got {_json_type(value)}")

    converter.register_structure_hook(str | NodeDef, structure_node)
    converter.register_structure_hook(MergePolicy, _structure_policy)
    # `as` is a Python keyword, so MapDef's field is `as_`; on the wire (and in its JSON schema) it is `as`.
    map_hook = make_dict_structure_fn(MapDef, converter, _cattrs_forbid_extra_keys=True, as_=override(rename="as"))
    converter.register_structure_hook(MapDef, _shape_guard(dict, "an object", lambda *_: _wire_as(map_hook))(
        MapDef, converter))
    converter.register_unstructure_hook(MapDef, make_dict_unstructure_fn(MapDef, converter, as_=override(rename="as")))
    converter.register_unstructure_hook(datetime, datetime.isoformat)
    # Hooks that cattrs inlines (an optional scalar is itself) or that cost one call (an enum's `_value_`), for saves.
    for scalar in (str, int, float, bool):
        converter.register_unstructure_hook(scalar | None, identity)
    converter.register_unstructure_hook(datetime | None, lambda value: None if value is None else value.isoformat())
    converter.register_unstructure_hook_func(lambda type_: isinstance(type_, type) and issubclass(type_, enum.Enum),
                                             operator.attrgetter("_value_"))
    # A `dict[str, Any]` field holds plain JSON (checked where it comes in): copied as it is, not value by value.
    converter.register_unstructure_hook_func(lambda type_: type_ == dict[str, Any], dict)
    converter.register_structure_hook(datetime, lambda value, _: datetime.fromisoformat(value))
    # A run's log and history are comprehensions, no call per entry (see _unstructure_logs); one entry, cattrs' hook.
    converter.register_unstructure_hook_func(lambda type_: type_ == list[LogEntry], _unstructure_logs)
    converter.register_unstructure_hook(LogEntry, make_dict_unstructure_fn(
        LogEntry, converter, updates_omitted=override(omit_if_default=True)))
    converter.register_unstructure_hook_func(lambda type_: type_ == list[StatusChange], lambda history: [
        {"status": change.status._value_, "at": change.at.isoformat(), "log_count": change.log_count}
        for change in history])
    # A node object shows the settings it has, so a function node reads as it did before graphs could be nodes.
    converter.register_unstructure_hook(NodeDef, make_dict_unstructure_fn(
        NodeDef, converter, **{name: override(omit_if_default=True) for name in ("graph", "map", "parallel")}))
    converter.register_unstructure_hook(RunContext, make_dict_unstructure_fn(
        RunContext, converter, branch_results=override(omit_if_default=True)))
    return converter


# A record may hold thousands of entries: no call per entry. A test checks the keys, in order, against the fields.
def _unstructure_logs(entries: Iterable[LogEntry]) -> list[dict[str, Any]]:
    return [{"iteration": entry.iteration, "node": entry.node, "event": entry.event._value_,
             "started_at": entry.started_at.isoformat(), "duration_ms": entry.duration_ms,
             "keys_changed": list(entry.keys_changed), "updates": dict(entry.updates), "next": entry.next,
             "branch": entry.branch, "error": entry.error, "attempt": entry.attempt, "path": entry.path,
             **({"updates_omitted": list(entry.updates_omitted)} if entry.updates_omitted else {})}
            for entry in entries]


def _wire_as(hook: Callable[[object, type], MapDef]) -> Callable[[object, type], MapDef]:
    """Make the errors of MapDef's hook name its `as_` field as the client wrote it: `as`."""

    def structure(value: object, type_: type) -> MapDef:
        try:
            return hook(value, type_)
        except cattrs.ClassValidationError as exc:
            for error in exc.exceptions:
                notes = getattr(error, "__notes__", [])
                notes[:] = [AttributeValidationNote(note.replace("as_", "as"), "as", note.type)
                            if isinstance(note, AttributeValidationNote) and note.name == "as_" else note
                            for note in notes]
            raise

    return structure


def _structure_policy(value: object, _: type) -> MergePolicy:
    if not isinstance(value, str):
        raise InvalidValue(f"expected a string, got {_json_type(value)}")
    try:
        return MergePolicy(value)
    except ValueError:
        known = ", ".join(policy.value for policy in MergePolicy)
        raise InvalidValue(f"unknown merge policy {_shown(value)}; use one of {known}") from None


converter = _make_converter()


def _format_problem(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, InvalidValue):
        return str(exc)
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):  # the default lists every key, whatever its length
        keys = sorted(exc.extra_fields)
        shown = [key if len(key) <= MAX_SHOWN_CHARS else f"{key[:MAX_SHOWN_CHARS]}..." for key in keys[:MAX_SHOWN_ITEMS]]
        more = f", ... and {len(keys) - MAX_SHOWN_ITEMS} more" if len(keys) > MAX_SHOWN_ITEMS else ""
        return f"extra fields found ({', '.join(shown)}{more})"
    return cattrs.v.format_exception(exc, type_)


_PLAIN_KEY = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_SHOWN_CHARS - 1}}}")
_QUOTED_PLAIN_KEY = re.compile(rf"\['({_PLAIN_KEY.pattern})'\]")
# cattrs writes a key as its repr(): in single quotes, or in double quotes when it holds a single one.
_QUOTED_KEY = re.compile(r"""\[('(?:[^'\\]++|\\.)*+'|"(?:[^"\\]++|\\.)*+")\]""")


def _cut_key(match: re.Match[str]) -> str:
    quoted = match[1]
    if len(quoted) <= MAX_SHOWN_CHARS + 2:
        return match[0]
    return f"[{quoted[:MAX_SHOWN_CHARS + 1]}{quoted[0]}... ({len(quoted) - 2} characters)]"


def _split(problem: str) -> Problem:
    """Turn cattrs' `"<message> @ <path>"` into a Problem, writing `$.edges['a']` as `$.edges.a` and cutting long keys."""
    message, _, path = problem.rpartition(" @ ")
    return Problem(_QUOTED_PLAIN_KEY.sub(r".\1", _QUOTED_KEY.sub(_cut_key, path)), message)


def key_path(path: str, key: str) -> str:
    """Extend a JSON path by an object key: `.key` for short plain names, `['key']` otherwise (a long key cut)."""
    return f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}[{_shown(key)}]"


def structure_body(payload: object, cls: type[T]) -> T:
    """Turn a decoded JSON body into `cls`, or raise InvalidRequest listing every problem."""
    if not isinstance(payload, dict):  # cattrs raises a bare AttributeError here
        raise InvalidRequest([Problem("$", "expected a JSON object")])
    try:
        return converter.structure(payload, cls)
    except cattrs.BaseValidationError as exc:
        raise InvalidRequest([_split(p) for p in cattrs.transform_error(exc, format_exception=_format_problem)]) from None


_PLAIN_SCALARS = frozenset({int, bool, type(None)})  # checked by exact type first: this runs on every step
_SAFE_INT = 10 ** sys.int_info.str_digits_check_threshold  # Python writes any int below this, whatever its digit limit


def json_problem(value: object) -> str | None:
    """Say why `value` is not plain JSON (see `_copy_json`), or None if it is."""
    try:
        _copy_json(value)
    except InvalidValue as exc:
        return str(exc)
    return None


def _copy_json(value: Any, depth: int = 0) -> Any:
    """Copy `value` into plain JSON types, sharing nothing mutable with it, or raise InvalidValue saying why it is not.

    Plain JSON is dict with str keys, list, str, int, float, bool and None: tuples become lists, and subclasses (an
    IntEnum, a numpy float) their base type. Not JSON: NaN and infinities, integers too long to write (Python's
    int-to-str digit limit), sets and other objects, keys that are not strings, text with a lone surrogate (JSON can
    escape one, UTF-8 cannot encode it), and nesting deeper than MAX_JSON_DEPTH. Checking and copying in one walk
    costs little more than checking: this runs on every step's output.
    """
    kind = type(value)
    if kind is dict or kind is list or isinstance(value, dict | list | tuple):
        if depth >= MAX_JSON_DEPTH:
            raise InvalidValue(f"nesting deeper than {MAX_JSON_DEPTH} levels")
        depth += 1
        # Items that are plain already are taken as they are, checked inline by exact type: no call per item.
        if kind is dict or isinstance(value, dict):
            copy: dict[str, Any] = {}
            for key, item in value.items():
                if type(key) is not str or not key.isascii():
                    key = _json_key(key)
                kind = type(item)
                is_plain = (kind is str and item.isascii()) or (kind is int and -_SAFE_INT < item < _SAFE_INT) or (
                    kind is bool or item is None)
                copy[key] = item if is_plain else _copy_json(item, depth)
            return copy
        items = []
        for item in value:
            kind = type(item)
            is_plain = (kind is str and item.isascii()) or (kind is int and -_SAFE_INT < item < _SAFE_INT) or (
                kind is bool or item is None)
            items.append(item if is_plain else _copy_json(item, depth))
        return items
    if isinstance(value, str):
        text = str.__str__(value)
        if text.isascii() or _is_unicode(text):
            return text
        raise InvalidValue("text with a lone surrogate is not valid Unicode")
    if type(value) is bool or value is None:
        return value
    if isinstance(value, int):
        number = int.__int__(value)
        if not -_SAFE_INT < number < _SAFE_INT:
            try:
                int.__repr__(number)
            except ValueError:  # over the int-to-str digit limit: the encoder would refuse it too
                limit = sys.get_int_max_str_digits()
                raise InvalidValue(f"an integer of more than {limit} digits is too long to write") from None
        return number
    if isinstance(value, float):
        number = float.__float__(value)
        if math.isfinite(number):
            return number
        raise InvalidValue(f"{number} is not a JSON number")
    raise InvalidValue(f"{type(value).__name__} is not a JSON type")


def _json_key(key: object) -> str:
    if isinstance(key, str):
        text = str.__str__(key)
        if text.isascii() or _is_unicode(text):
            return text
    raise InvalidValue("object keys must be strings of valid Unicode")


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
NodeResult = dict[str, Any] | None
NodeFn = Callable[[WorkflowState, "NodeContext"], NodeResult | Awaitable[NodeResult]]
ConditionFn = Callable[[WorkflowState], bool]
ToolFn = Callable[..., Any]
NodeCall = Callable[[WorkflowState, "NodeContext"], Awaitable[object]]  # what a step awaits, from its plan
F = TypeVar("F", bound=Callable[..., Any])


@attrs.frozen(kw_only=True)
class NodePlan:
    """What the runner needs of one node of a graph, decided once per graph rather than on every step: the node's
    definition, whether it runs graphs, how to call it and what its function declares it reads and writes, and its
    edge, with the function of each branch's condition."""

    node: NodeDef
    is_composite: bool
    call: NodeCall  # a composite's calls its NodeContext's fork
    io: NodeIO | None
    default_next: str | None
    branches: tuple[tuple[BranchCondition, ConditionFn], ...]
    on_error: str | None


class Registry:
    """Named node functions, conditions and tools, plus graphs to load at startup. There is no global one."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeFn] = {}
        self._async_nodes: set[str] = set()  # decided once here, not on every step
        self._io: dict[str, NodeIO] = {}
        self._conditions: dict[str, ConditionFn] = {}
        self._tools: dict[str, ToolFn] = {}
        self._graphs: dict[str, GraphDefinition] = {}
        self._plans: dict[int, tuple[GraphDefinition, dict[str, NodePlan]]] = {}  # by id(graph), oldest first

    def node(
        self, fn: F | None = None, /, *, name: str | None = None,
        reads: Mapping[str, type] | None = None, writes: Mapping[str, type] | None = None,
    ) -> Any:
        """Register a node function (`@registry.node` or `@registry.node(name=...)`); return it unchanged.

        `reads` and `writes` declare the `data` keys it reads and writes with their Python types (str, int, float,
        bool, list, dict): the runner then checks them on every call.
        """
        io = None if reads is None and writes is None else NodeIO(reads=_kinds(reads), writes=_kinds(writes))

        def add(fn: F) -> F:
            self._register(self._nodes, "node", fn, name)
            if inspect.iscoroutinefunction(fn):
                self._async_nodes.add(name or fn.__name__)
            if io is not None:
                self._io[name or fn.__name__] = io
            return fn

        return add if fn is None else add(fn)

    @property
    def node_names(self) -> list[str]:
        """The registered node function names, sorted."""
        return sorted(self._nodes)

    def node_io(self, name: str) -> NodeIO | None:
        """What node function `name` declares it reads and writes, if it does."""
        return self._io.get(name)

    def condition(self, fn: F | None = None, /, *, name: str | None = None) -> Any:
        """Register a condition `(state) -> bool`; return it unchanged."""
        return self._register(self._conditions, "condition", fn, name)

    def tool(self, fn: F | None = None, /, *, name: str | None = None) -> Any:
        """Register a tool that nodes can reach through `ctx.tool(name)`; return it unchanged."""
        return self._register(self._tools, "tool", fn, name)

    def add_graph(self, graph: GraphDefinition) -> None:
        """Register a graph that `create_app` stores at startup (it is validated then)."""
        if not graph.graph_id:
            raise ValueError("a registered graph needs a graph_id")
        if graph.graph_id in self._graphs:
            raise ValueError(f"graph {graph.graph_id!r} is already registered")
        self._graphs[graph.graph_id] = graph

    def get_node(self, name: str) -> NodeFn:
        """Return the node function registered as `name`, or raise UnknownName."""
        return _lookup(self._nodes, "node", name)

    def is_async_node(self, name: str) -> bool:
        """Whether node function `name` is a coroutine function (a plain one runs in a worker thread)."""
        return name in self._async_nodes

    def call_node(self, name: str, state: WorkflowState, ctx: "NodeContext") -> Awaitable[object]:
        """Call node function `name` and return what to await for its result; a plain function runs in a thread."""
        fn = self._nodes[name] if name in self._nodes else self.get_node(name)  # get_node raises UnknownName
        return fn(state, ctx) if name in self._async_nodes else _in_thread(fn, state, ctx)

    def plan(self, graph: GraphDefinition) -> Mapping[str, NodePlan]:
        """Return each node of `graph` as a NodePlan, by name; a graph object is planned once (MAX_PLANS kept).

        A graph that names a node function or condition not registered (yet) is planned anew on every call, so a
        later registration counts; until then its step fails with UnknownName, as it would have without a plan.
        """
        cached = self._plans.get(id(graph))
        if cached is not None and cached[0] is graph:
            return cached[1]
        plan = {name: self._plan_node(node, graph.edges.get(name)) for name, node in graph.node_defs.items()}
        if all((step.is_composite or step.node.function in self._nodes)
               and all(b.condition in self._conditions for b, _ in step.branches) for step in plan.values()):
            self._plans[id(graph)] = (graph, plan)
            if len(self._plans) > MAX_PLANS:
                del self._plans[next(iter(self._plans))]
        return plan

    def _plan_node(self, node: NodeDef, edge: EdgeDef | None) -> NodePlan:
        edge = edge or EdgeDef()
        branches = tuple((branch, self._conditions.get(branch.condition) or self._late_condition(branch.condition))
                         for branch in edge.branches)
        call = (lambda state, ctx: ctx.fork(node, state)) if node.is_composite else self._caller(node.function)
        return NodePlan(node=node, is_composite=node.is_composite, call=call, io=self._io.get(node.function),
                        default_next=edge.default_next, branches=branches, on_error=edge.on_error)

    def _caller(self, name: str) -> NodeCall:
        if name not in self._nodes:  # looked up on every call: UnknownName until `name` is registered
            return functools.partial(self.call_node, name)
        return self._nodes[name] if name in self._async_nodes else functools.partial(_in_thread, self._nodes[name])

    def _late_condition(self, name: str) -> ConditionFn:
        return lambda state: self.get_condition(name)(state)  # raises UnknownName until `name` is registered

    def get_condition(self, name: str) -> ConditionFn:
        """Return the condition registered as `name`, or raise UnknownName."""
        return _lookup(self._conditions, "condition", name)

    def get_tool(self, name: str) -> ToolFn:
        """Return the tool registered as `name`, or raise UnknownName."""
        return _lookup(self._tools, "tool", name)

    def has_node(self, name: str) -> bool:
        """Whether a node function is registered as `name`."""
        return name in self._nodes

    def has_condition(self, name: str) -> bool:
        """Whether a condition is registered as `name`."""
        return name in self._conditions

    @property
    def graphs(self) -> tuple[GraphDefinition, ...]:
        """The graphs registered for startup, in registration order."""
        return tuple(self._graphs.values())

    @staticmethod
    def _register(table: dict[str, Any], kind: str, fn: F | None, name: str | None) -> Any:
        def add(fn: F) -> F:
            key = name or fn.__name__
            if key in table:
                raise ValueError(f"a {kind} named {key!r} is already registered")
            table[key] = fn
            return fn

        return add if fn is None else add(fn)


_KINDS = {str: JsonKind.STRING, int: JsonKind.INTEGER, float: JsonKind.NUMBER, bool: JsonKind.BOOLEAN,
          list: JsonKind.ARRAY, dict: JsonKind.OBJECT}
_KIND_CHECKS: dict[JsonKind, Callable[[object], bool]] = {
    JsonKind.STRING: lambda value: isinstance(value, str),
    JsonKind.INTEGER: lambda value: isinstance(value, int) and not isinstance(value, bool),
    JsonKind.NUMBER: lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    JsonKind.BOOLEAN: lambda value: isinstance(value, bool),
    JsonKind.ARRAY: lambda value: isinstance(value, list | tuple),
    JsonKind.OBJECT: lambda value: isinstance(value, dict),
}


def _kinds(declared: Mapping[str, type] | None) -> dict[str, JsonKind]:
    unknown = [f"{key}: {kind!r}" for key, kind in (declared or {}).items() if kind not in _KINDS]
    if unknown:
        raise ValueError(f"declare data keys as str, int, float, bool, list or dict; got {', '.join(unknown)}")
    return {key: _KINDS[kind] for key, kind in (declared or {}).items()}


async def _in_thread(fn: NodeFn, state: WorkflowState, ctx: "NodeContext") -> object:
    # A plain function may block: a worker thread keeps the event loop serving meanwhile.
    result = await asyncio.to_thread(fn, state, ctx)
    return await result if inspect.isawaitable(result) else result


def _lookup(table: dict[str, T], kind: str, name: str) -> T:
    try:
        return table[name]
    except KeyError:
        raise UnknownName(kind, name, list(table)) from None


# ---------------------------------------------------------------------------
# Graph validation
# ---------------------------------------------------------------------------
# Every rule is checked and every problem collected, so the client can fix them all at once.
GraphLookup = Callable[[str], GraphDefinition | None]  # a stored or registered graph by id, None if there is none


def _no_graphs(graph_id: str) -> GraphDefinition | None:
    return None


def validate_graph(graph: GraphDefinition, registry: Registry, *, limits: Settings = DEFAULT_SETTINGS,
                   graphs: GraphLookup = _no_graphs) -> None:
    """Raise InvalidGraph listing every problem of `graph` against the names in `registry`, the graphs its nodes
    run (found by `graphs`) and the `limits`."""
    problems = [] if graph.graph_id is None or GRAPH_ID_PATTERN.fullmatch(graph.graph_id) else [
        Problem("$.graph_id", ID_RULE)]
    problems += [*_node_problems(graph, registry), *_edge_problems(graph, registry)]
    problems += [Problem(f"$.interrupt_before[{index}]", f"unknown node {_shown(name)}")
                 for index, name in enumerate(graph.interrupt_before) if name not in graph.node_defs]
    problems += _limit_problems(graph, limits)
    problems += _reference_problems(graph, registry, limits, graphs)
    if problems:
        raise InvalidGraph(problems)


def graph_references(graph: GraphDefinition) -> dict[str, tuple[str, ...]]:
    """The graphs each graph, map and parallel node of `graph` runs, by node name."""
    return {name: node.graph_ids for name, node in graph.node_defs.items() if node.is_composite}


def first_referrer(graphs: Iterable[GraphDefinition], graph_id: str) -> tuple[str, str] | None:
    """The first of `graphs` (other than `graph_id` itself) that runs graph `graph_id`, and its node; None if none."""
    for graph in graphs:
        for name, graph_ids in graph_references(graph).items():
            if graph_id in graph_ids and graph.graph_id != graph_id:
                return graph.graph_id or "", name
    return None


def unknown_graphs(graph: GraphDefinition, exists: Callable[[str], bool]) -> list[Problem]:
    """A problem, at its reference's path, for each graph that a node of `graph` runs and `exists` does not know."""
    return [Problem(path, f"unknown graph {_shown(graph_id)}")
            for index, node in enumerate(graph.nodes) if not isinstance(node, str) and node.is_composite
            for path, graph_id in _referencing_paths(f"$.nodes[{index}]", node) if not exists(graph_id)]


def _reference_problems(graph: GraphDefinition, registry: Registry, limits: Settings,
                        graphs: GraphLookup) -> list[Problem]:
    """Each graph a node runs exists and does not run `graph` again; a parallel node's branches fit the fan-out
    bound, and a key that two of them declare they write has a merge policy."""
    def find(graph_id: str) -> GraphDefinition | None:  # the graph itself may be named (a cycle) before it is stored
        return graph if graph_id == graph.graph_id else graphs(graph_id)

    problems = []
    for index, node in enumerate(graph.nodes):
        if isinstance(node, str) or not node.is_composite:
            continue
        for path, graph_id in _referencing_paths(f"$.nodes[{index}]", node):
            referenced = find(graph_id)
            if referenced is None:
                problems.append(Problem(path, f"unknown graph {_shown(graph_id)}"))
                continue
            chain = [graph_id] if graph_id == graph.graph_id else _chain(referenced, graph.graph_id, find)
            if chain is not None:
                problems.append(Problem(path, f"graph {_shown(graph.graph_id)} would run itself: "
                                              f"{' -> '.join([graph.graph_id or '', *chain])}"))
        if node.parallel is not None:
            problems += _parallel_problems(f"$.nodes[{index}].parallel", node.parallel, registry, limits, find)
    return problems


def _referencing_paths(path: str, node: NodeDef) -> list[tuple[str, str]]:
    if node.map is not None:
        return [(f"{path}.map.graph", node.map.graph)]
    if node.parallel is not None:
        return [(f"{path}.parallel.branches[{index}]", graph_id)
                for index, graph_id in enumerate(node.parallel.branches)]
    return [(f"{path}.graph", node.graph or "")]


def _chain(start: GraphDefinition, target: str | None, find: GraphLookup) -> list[str] | None:
    """The ids from `start` to a graph that runs `target`, through the graphs their nodes run; None if none does."""
    if target is None:  # a graph without an id gets a new one: nothing can run it yet
        return None
    chains, seen = [[start]], {start.graph_id}
    while chains:  # breadth first: the shortest chain is named
        chain = chains.pop(0)
        for graph_id in itertools.chain(*graph_references(chain[-1]).values()):
            if graph_id == target:
                return [str(graph.graph_id) for graph in chain] + [target]
            referenced = find(graph_id)
            if referenced is not None and graph_id not in seen:
                seen.add(graph_id)
                chains.append([*chain, referenced])
    return None


def _parallel_problems(path: str, parallel: ParallelDef, registry: Registry, limits: Settings,
                       find: GraphLookup) -> list[Problem]:
    if len(parallel.branches) > limits.max_fanout:
        return [Problem(f"{path}.branches", f"at most {limits.max_fanout} branches (WORKFLOW_MAX_FANOUT), "
                                            f"got {len(parallel.branches)}")]
    writers: dict[str, list[int]] = {}
    for index, graph_id in enumerate(parallel.branches):
        referenced = find(graph_id)
        for key in (None if referenced is None else _declared_writes(referenced, registry, find, set())) or ():
            writers.setdefault(key, []).append(index)
    policies = ", ".join(policy.value for policy in MergePolicy)
    return [Problem(f"{path}.merge", f"branches {' and '.join(_branch_names(parallel, indexes))} declare they write "
                                     f"data[{key!r}]; give it a merge policy ({policies})")
            for key, indexes in sorted(writers.items()) if len(indexes) > 1 and key not in parallel.merge]


def _branch_names(parallel: ParallelDef, indexes: list[int]) -> list[str]:
    return [f"{index} ({parallel.branches[index]})" for index in indexes]


def _declared_writes(graph: GraphDefinition, registry: Registry, find: GraphLookup, seen: set[str]) -> set[str] | None:
    """The data keys the nodes of `graph` declare they may write; None if one of them does not declare it."""
    if graph.graph_id in seen:  # a cycle, reported on its own
        return None
    seen = seen | {graph.graph_id or ""}
    keys = {"last_error"} if any(edge.on_error for edge in graph.edges.values()) else set()
    for node in graph.node_defs.values():
        if node.map is not None:
            keys.add(node.map.collect)
            continue
        if node.is_composite:
            found = [find(graph_id) for graph_id in node.graph_ids]
            inner = [None if other is None else _declared_writes(other, registry, find, seen) for other in found]
            if any(part is None for part in inner):
                return None
            keys.update(*inner)  # type: ignore[arg-type]
            continue
        io = registry.node_io(node.function)
        if io is None:
            return None
        keys.update(io.writes)
    return keys


def _limit_problems(graph: GraphDefinition, limits: Settings) -> list[Problem]:
    problems = []
    if len(graph.nodes) > limits.max_nodes:
        problems.append(Problem("$.nodes", f"at most {limits.max_nodes} nodes, got {len(graph.nodes)}"))
    problems += [Problem(f"{key_path('$.edges', source)}.branches", f"at most {limits.max_branches} branches, "
                         f"got {len(edge.branches)}")
                 for source, edge in graph.edges.items() if len(edge.branches) > limits.max_branches]
    if graph.max_iterations is not None and graph.max_iterations > limits.max_iterations_cap:
        problems.append(Problem("$.max_iterations", f"must be at most {limits.max_iterations_cap}"))
    return problems


def graph_warnings(graph: GraphDefinition, registry: Registry) -> list[Problem]:
    """Name each declared input that the initial state (`inputs`) and no node before its node provide.

    A node that declares nothing might write anything, so a node with such a node before it gets no warning.
    """
    names = list(graph.node_defs)
    ios = {name: registry.node_io(node.function) for name, node in graph.node_defs.items()}
    warnings = []
    for index, name in enumerate(names):
        io = ios[name]
        before = _reaching(graph, name)
        if io is None or any(ios[other] is None for other in before):
            continue
        available = set(graph.inputs).union(*(ios[other].writes for other in before if ios[other] is not None))
        warnings += [Problem(f"$.nodes[{index}]", f"node {_shown(name)} reads {key!r}, which no node before it writes "
                             "and inputs does not list") for key in io.reads if key not in available]
    return warnings


def _reaching(graph: GraphDefinition, target: str) -> set[str]:
    """The nodes from which a path of one or more edges leads to `target`."""
    targets = {source: {edge.default_next, edge.on_error, *(branch.target for branch in edge.branches)} - {None}
               for source, edge in graph.edges.items()}
    found, frontier = set(), {target}
    while frontier:
        frontier = {source for source, nexts in targets.items() if nexts & frontier} - found
        found |= frontier
    return found


def _node_problems(graph: GraphDefinition, registry: Registry) -> list[Problem]:
    problems = []
    if not graph.nodes:
        problems.append(Problem("$.nodes", "nodes must not be empty"))
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        node_def = NodeDef(name=node) if isinstance(node, str) else node
        path = f"$.nodes[{index}]" if isinstance(node, str) else f"$.nodes[{index}].{'fn' if node.fn else 'name'}"
        kinds = [kind for kind in ("fn", "graph", "map", "parallel") if getattr(node_def, kind) is not None]
        if node_def.name in seen:
            problems.append(Problem(f"$.nodes[{index}]", f"duplicate node {_shown(node_def.name)}"))
        elif len(kinds) > 1:
            problems.append(Problem(f"$.nodes[{index}]", f"a node has one of fn, graph, map or parallel; "
                                                         f"this one has {' and '.join(kinds)}"))
        elif not node_def.is_composite and not registry.has_node(node_def.function):
            problems.append(Problem(path, f"unknown node function {_shown(node_def.function)}"))
        seen.add(node_def.name)
    if graph.start_node not in seen:
        problems.append(Problem("$.start_node", f"unknown node {_shown(graph.start_node)}"))
    return problems


def _edge_problems(graph: GraphDefinition, registry: Registry) -> list[Problem]:
    nodes = graph.node_defs
    problems = []
    for source, edge in graph.edges.items():
        path = key_path("$.edges", source)
        if source not in nodes:
            problems.append(Problem(path, f"unknown node {_shown(source)}"))
        for field, target in (("default_next", edge.default_next), ("on_error", edge.on_error)):
            if target is not None and target not in nodes:
                problems.append(Problem(f"{path}.{field}", f"unknown node {_shown(target)}"))
        for index, branch in enumerate(edge.branches):
            branch_path = f"{path}.branches[{index}]"
            if not registry.has_condition(branch.condition):
                problems.append(Problem(f"{branch_path}.condition", f"unknown condition {_shown(branch.condition)}"))
            if branch.target not in nodes:
                problems.append(Problem(f"{branch_path}.target", f"unknown node {_shown(branch.target)}"))
    return problems


# ---------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------
# The runner never raises for a node or condition failure: it records it in the log and ends the run `failed`.
@attrs.frozen(kw_only=True)
class NodeContext:
    """What a node gets besides the state: its run's ids, its node's `config` (the run's own copy: a node that
    changes it changes nothing stored, nor another run), a logger, and the registered tools."""

    run_id: str
    graph_id: str
    node: str
    config: dict[str, Any]
    registry: Registry
    # Set for a graph, map or parallel node: runs its branches and returns the join, which the runner commits.
    fork: Callable[[NodeDef, WorkflowState], Awaitable[dict[str, Any]]] | None = None

    @functools.cached_property
    def logger(self) -> logging.LoggerAdapter:
        """The module's logger, with the run id and node name attached to every record."""
        return logging.LoggerAdapter(logger, {"run_id": self.run_id, "node": self.node})

    def tool(self, name: str) -> ToolFn:
        """Return the tool registered as `name`, or raise UnknownName."""
        return self.registry.get_tool(name)


class _StepFailed(Exception):
    """A node or condition failed; the message says which and why."""


OnChange = Callable[["RunContext"], None]
Checkpoint = Callable[["RunContext"], Awaitable[None]]
PauseCheck = Callable[["RunContext"], str | None]


@attrs.define(eq=False)
class ChangeHook:
    """What the runner calls after every log entry and status change of a run: `call(run)`, looked up each time. Set
    it at any moment (a stream that subscribes) to hear of every change from then on; while it is None, nothing is
    called, so a run nobody watches pays nothing per step for being watchable."""

    call: OnChange | None = None

    def report(self, run: RunContext) -> None:
        """Call `call(run)`, if it is set."""
        if self.call is not None:
            self.call(run)


def _now() -> datetime:
    return datetime.now(UTC)


def _ms_since(clock: float) -> float:
    return (time.perf_counter() - clock) * 1000


def _new_id() -> str:
    # 128 random bits as 32 hex digits, like uuid4().hex at a quarter of its cost (and secrets.token_hex's source,
    # without its three Python calls).
    return os.urandom(16).hex()


def new_run(
    graph: GraphDefinition, state: WorkflowState, *, max_iterations: int = MAX_ITERATIONS,
    timeout_s: float | None = None, max_state_bytes: int = MAX_STATE_BYTES, max_log_bytes: int = MAX_LOG_BYTES,
    run_id: str | None = None,
) -> RunContext:
    """Create a pending run record of `graph` that owns a copy of `state`; raise InvalidValue if it is not JSON."""
    created_at = datetime.now(UTC)
    return RunContext(run_id=run_id or _new_id(), graph_id=graph.graph_id or "", max_iterations=max_iterations,
                      max_state_bytes=max_state_bytes, max_log_bytes=max_log_bytes, timeout_s=timeout_s,
                      state=WorkflowState(data=_copy_json(state.data),
                                          metadata=_copy_json(state.metadata) if state.metadata else {}),
                      created_at=created_at, history=[StatusChange(status=RunStatus.PENDING, at=created_at,
                                                                   log_count=0)])


async def run_graph(
    graph: GraphDefinition, state: WorkflowState, registry: Registry, *,
    max_iterations: int = MAX_ITERATIONS, timeout_s: float | None = None,
) -> RunContext:
    """Run `graph` from its start node until it ends or hits `max_iterations`; return the finished run record."""
    run = new_run(graph, state, max_iterations=max_iterations, timeout_s=timeout_s)
    return await execute_run(run, graph, registry)


async def execute_run(
    run: RunContext, graph: GraphDefinition, registry: Registry, *,
    on_change: ChangeHook | None = None, checkpoint: Checkpoint | None = None, may_pause: PauseCheck | None = None,
    branches: "Branches | None" = None,
) -> RunContext:
    """Drive `run` through `graph` from its `next_node` (the start node for a new run), updating it in place; return it.

    A pending run is moved to running first; a running one (its caller moved and saved it) starts at once. `on_change`
    hears of every log entry and status change; `checkpoint(run)` is awaited once the run is running and after every
    step that has a next node (a durable store commits it there). `may_pause(run)`, if given, answers None to let the
    run pause, or the error that fails it instead. A run over its `timeout_s` ends `timed_out`; a cancelled one ends
    `cancelled`, and the CancelledError propagates once that is recorded. `branches` says where graph, map and
    parallel nodes find the graphs they run (default: those registered in `registry`) and bounds them.
    """
    is_resumed, is_moved = run.next_node is not None, run.status is RunStatus.PENDING
    run.next_node, on_change = run.next_node or graph.start_node, on_change or ChangeHook()
    if is_moved:
        move_run(run, RunStatus.RUNNING)
        on_change.report(run)
    clock, deadline = time.perf_counter(), None if run.timeout_s is None else asyncio.timeout(run.timeout_s)
    fork = None if not graph.has_branches else _Fork(  # most graphs have none: they pay nothing for branches
        run, branches or Branches(find_graph={g.graph_id: g for g in registry.graphs}.get), registry, on_change,
        checkpoint)
    try:
        if checkpoint is not None and is_moved:
            await checkpoint(run)
        drive = _drive(run, graph, registry, _Hooks(on_change, checkpoint, deadline, may_pause, fork), is_resumed)
        if deadline is None:  # entering asyncio.timeout costs as much as two steps (nullcontext, three calls)
            status, error = await drive
        else:
            async with deadline:
                status, error = await drive
    except (TimeoutError, asyncio.CancelledError):  # _stop_status decides the status and the last entry's event
        status = _stop_status(deadline)
        _end(run, status, _stop_error(run, status), clock, on_change)
        if asyncio.current_task().cancelling():  # type: ignore[union-attr]
            raise
        return run
    _end(run, status, error, clock, on_change)
    return run


def _stop_status(deadline: asyncio.Timeout | None) -> RunStatus:
    """Why a run's task was cancelled: its own deadline (even if a cancel came at the same time), else a cancel."""
    return RunStatus.TIMED_OUT if deadline is not None and deadline.expired() else RunStatus.CANCELLED


def _stop_error(run: RunContext, status: RunStatus) -> str:
    if status is RunStatus.TIMED_OUT:
        return f"the run took longer than its timeout_s of {run.timeout_s} s"
    where = "before its first node" if run.current_node is None else f"at node {run.current_node!r}"
    return f"the run was cancelled {where}"


def _end(run: RunContext, status: RunStatus, error: str | None, clock: float, on_change: ChangeHook) -> None:
    run.duration_ms += (time.perf_counter() - clock) * 1000
    # A branch's steps ran inside their graph, map or parallel step's own entry, so they are not counted again.
    run.engine_overhead_ms = max(
        run.duration_ms - sum([entry.duration_ms for entry in run.logs if entry.path is None]), 0.0)
    move_run(run, status, error)
    on_change.report(run)


@attrs.frozen
class _Hooks:
    on_change: ChangeHook
    checkpoint: Checkpoint | None
    deadline: asyncio.Timeout | None
    may_pause: PauseCheck | None
    fork: "_Fork | None"  # None when the graph has no graph, map or parallel node


async def _drive(
    run: RunContext, graph: GraphDefinition, registry: Registry, hooks: _Hooks, is_resumed: bool,
    budget: "_DataBudget | None" = None,
) -> tuple[RunStatus, str | None]:
    """Execute nodes from `run.next_node` until the run ends or pauses; return how it stopped, with its error.

    `budget` is the run's _DataBudget when the caller has counted its data already (a branch).
    """
    plan = registry.plan(graph)
    contexts: dict[str, NodeContext] = {}
    budget = budget or _DataBudget(run)
    while (name := run.next_node) is not None:
        if run.iteration >= run.max_iterations:
            return RunStatus.STOPPED_MAX_ITERATIONS, None
        if name in graph.interrupt_before and not is_resumed:
            return _pause(run, hooks)
        is_resumed = False  # only the first node of a resumed run passes its interrupt_before
        run.iteration, run.current_node, step = run.iteration + 1, name, plan[name]
        if name not in contexts:
            config = marshal.loads(marshal.dumps(step.node.config)) if step.node.config else {}  # the run's own
            contexts[name] = NodeContext(run_id=run.run_id, graph_id=run.graph_id, node=name, config=config,
                                         registry=registry, fork=hooks.fork if step.is_composite else None)
        clock = time.perf_counter()
        try:
            entry = await _run_node(run, step, contexts[name], hooks.on_change, budget, clock)
        except asyncio.CancelledError:
            run.logs.append(_interrupted(run, name, clock, hooks.deadline))
            raise
        if entry.event is not LogEvent.EXECUTED or step.branches:
            _route(run, step, entry, budget)
        run.logs.append(entry)
        run.next_node = entry.next
        if entry.event is LogEvent.INTERRUPT:
            return _pause(run, hooks)
        if entry.event is LogEvent.ERROR and entry.next is None:
            return RunStatus.FAILED, entry.error
        if hooks.on_change.call is not None:  # report's test, inline: this runs on every step
            hooks.on_change.call(run)
        if hooks.checkpoint is not None and entry.next is not None:  # a run's last step is saved with its end
            await hooks.checkpoint(run)
    return RunStatus.COMPLETED, None


def _pause(run: RunContext, hooks: _Hooks) -> tuple[RunStatus, str | None]:
    refusal = None if hooks.may_pause is None else hooks.may_pause(run)
    return (RunStatus.WAITING, None) if refusal is None else (RunStatus.FAILED, refusal)


def _interrupted(run: RunContext, name: str, clock: float, deadline: asyncio.Timeout | None) -> LogEntry:
    event = LogEvent.TIMED_OUT if _stop_status(deadline) is RunStatus.TIMED_OUT else LogEvent.CANCELLED
    duration_ms = _ms_since(clock)
    started_at = _now() - timedelta(milliseconds=duration_ms)
    reason = "the run timed out" if event is LogEvent.TIMED_OUT else "the run was cancelled"
    return LogEntry(iteration=run.iteration, node=name, event=event, started_at=started_at, duration_ms=duration_ms,
                    error=f"{reason} during node {name!r}")


def _route(run: RunContext, step: NodePlan, entry: LogEntry, budget: "_DataBudget") -> None:
    """Complete `entry`, unless it is a success and its node has no branches (its default next node is set): with
    the branch taken after success, the node itself after an interrupt, `on_error` after a failure."""
    if entry.event is LogEvent.INTERRUPT:
        entry.next = entry.node  # a resume runs the node again
    elif entry.event is LogEvent.ERROR:
        if step.on_error is not None:
            _recover(run, entry, step.on_error)
            budget.nested = _nested(run.state.data)
    else:
        try:
            entry.next, entry.branch = _next_node(step, run.state, entry.node)
        except _StepFailed as exc:
            entry.event, entry.error, entry.next = LogEvent.ERROR, str(exc), None


async def _run_node(
    run: RunContext, step: NodePlan, ctx: NodeContext, on_change: ChangeHook, budget: "_DataBudget", clock: float,
) -> LogEntry:
    """Call the node until an attempt succeeds or none are left, logging each failed one that is retried; return
    the last one's entry: `executed` (its changes committed to the run, its next node the default), `error` or
    `interrupt`. `clock` is when the step began (time.perf_counter())."""
    node, io, before, metadata, attempt = step.node, step.io, run.state.data, run.state.metadata, 1
    while True:
        # Each attempt works on copies of data and metadata, nested values too: what it changes in place, even from a
        # thread outliving its timeout, stays out of the run, which takes the checked copy of what changed in data only.
        working = WorkflowState(data=_private(before, budget.nested) if budget.nested else dict(before),
                                metadata=_private(metadata, budget.nested_metadata) if metadata else {})
        started_at = datetime.now(UTC)
        try:
            if io is not None:
                _check_reads(node.name, io, before)
            awaitable = step.call(working, ctx)
            result = await (awaitable if node.timeout_s is None else _within(node, awaitable))
            updates, removed = _changes(node.name, before, working.data, result)
            keys = (*updates, *removed)  # every changed key, removed last
            if io is not None:
                _check_writes(node.name, io, updates, keys)
            omitted = budget.charge(node.name, updates, keys)
        except Exception as exc:  # a failing node is recorded, never raised
            entry = _failed(run, node, exc, started_at, clock, attempt)
            if entry.event is not LogEvent.RETRY:
                return entry
            run.logs.append(entry)
            on_change.report(run)
            await asyncio.sleep(node.retry.delay_s(attempt))
            attempt, clock = attempt + 1, time.perf_counter()
            continue
        if keys:  # the run's next data: `before` with the updates, less the keys the node removed
            data = run.state.data = {**before, **updates}
            for key in removed:
                del data[key]
        logged = {key: value for key, value in updates.items() if key not in omitted} if omitted else updates
        return LogEntry(iteration=run.iteration, node=node.name, event=LogEvent.EXECUTED, started_at=started_at,
                        duration_ms=(time.perf_counter() - clock) * 1000, keys_changed=keys, updates=logged,
                        next=step.default_next, attempt=attempt, updates_omitted=omitted)


def _failed(run: RunContext, node: NodeDef, exc: Exception, started: datetime, clock: float, attempt: int) -> LogEntry:
    """The entry of a failed attempt: `interrupt` for an Interrupt, else `retry` while attempts are left, `error`."""
    if isinstance(exc, Interrupt):
        event, error = LogEvent.INTERRUPT, exc.reason or None
    else:
        event = LogEvent.RETRY if attempt < node.retry.max_attempts else LogEvent.ERROR
        error = str(exc) if isinstance(exc, _StepFailed) else f"node {node.name!r} raised {_describe(exc)}"
    return LogEntry(iteration=run.iteration, node=node.name, event=event, started_at=started,
                    duration_ms=_ms_since(clock), error=error, attempt=attempt)


def _private(values: dict[str, Any], nested: dict[str, bool]) -> dict[str, Any]:
    """Copy `values` for one attempt: the dict, and each container under `nested`, shallowly if it holds only
    scalars (which nothing can change in place), else deeply.

    The run's values are plain JSON already (checked on their way in), so marshal copies them deeply: in C, several
    times faster than a walk in Python, yet a list of a thousand numbers costs it ten times what `list.copy` does,
    and each branch of a map over that list would copy it.
    """
    copy, deep = dict(values), {}
    for key, is_deep in nested.items():
        if is_deep:
            deep[key] = values[key]
        else:
            copy[key] = values[key].copy()
    if deep:
        copy.update(marshal.loads(marshal.dumps(deep)))
    return copy


def _check_reads(name: str, io: NodeIO, data: dict[str, Any]) -> None:
    for key, kind in io.reads.items():
        value = data.get(key, _MISSING)
        if value is _MISSING:
            raise _StepFailed(f"node {name!r} reads data[{key!r}] ({kind.value}), which is missing")
        if not _KIND_CHECKS[kind](value):
            raise _StepFailed(f"node {name!r} reads data[{key!r}] as {kind.value}, got {_json_type(value)}")


def _check_writes(name: str, io: NodeIO, updates: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        kind = io.writes.get(key)
        if kind is None:
            raise _StepFailed(f"node {name!r} wrote data[{key!r}], which it does not declare")
        if key in updates and not _KIND_CHECKS[kind](updates[key]):
            raise _StepFailed(f"node {name!r} declares data[{key!r}] as {kind.value}, wrote {_json_type(updates[key])}")


_FLAT_ITEMS = frozenset({str, int, float, bool, type(None)})  # a container of only these needs no deep copy
_Measure = tuple[object, int, bool | None]  # a value, its size, and (a container) whether it holds containers
# One encoder for every measure (json.dumps builds one per call); its spaced separators count, as they always have.
_SIZE_ENCODER = json.JSONEncoder(ensure_ascii=False)


class _DataBudget:
    """Keep a run's data under its `max_state_bytes` and the updates its log keeps under its `max_log_bytes`, and
    know which keys of its data and metadata hold nested values (the ones an attempt must copy, and how deeply).

    Both limits count a value as the length of its JSON text. A step that would take the data over its limit fails;
    once the log is full, an entry keeps the keys a step changed but leaves out each new value that does not fit,
    so the log stays bounded while the run's data stays whole. All of it is counted once per run, then kept up to
    date from each step's changes: a step costs what it changes, not what the data holds.
    """

    def __init__(self, run: RunContext, known: Mapping[str, _Measure] | None = None) -> None:
        """Count `run`'s data; a value that `known` (key: its _measured) holds as the very same object is not
        measured again: the branches of a map or parallel step share their values with the step's data."""
        self.limit, self.log_limit = run.max_state_bytes, run.max_log_bytes
        known = known or {}
        self.sizes: dict[str, int] = {}
        self.nested: dict[str, bool] = {}  # see _nested
        for key, value in run.state.data.items():
            hit = known[key] if key in known else None
            _, self.sizes[key], is_deep = hit if hit is not None and hit[0] is value else _measured(value)
            if is_deep is not None:
                self.nested[key] = is_deep
        self.total = sum(self.sizes.values())
        self.logged = sum(_json_size(value) for entry in run.logs for value in entry.updates.values()) if run.logs else 0
        self.nested_metadata = _nested(run.state.metadata) if run.state.metadata else {}  # unchanged while it runs

    def charge(self, name: str, updates: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, ...]:
        """Count a step's changes, or raise _StepFailed (counting nothing) if they take the data over the limit.

        Return the keys whose new values the log leaves out, having counted those it keeps.
        """
        sizes, total, logged, previous, is_nested = self.sizes, self.total, 0, {}, False
        for key in keys:  # a plain loop with no calls for scalars: this runs on every step
            value = updates[key] if key in updates else _MISSING
            kind = type(value)
            is_container = kind is dict or kind is list
            size = len(value) + 2 if kind is str else 0 if value is _MISSING else (
                _json_size(value) if is_container else 8)
            previous[key] = sizes[key] if key in sizes else 0  # a key counts 0 while the data does not hold it
            total += size - previous[key]
            logged += size
            sizes[key] = size
            is_nested = is_nested or is_container
        if total > self.limit:
            sizes.update(previous)  # the step fails: it counts nothing
            raise _StepFailed(f"node {name!r} took the run's data to about {total} bytes, over its limit of {self.limit}")
        self.total = total
        if is_nested or self.nested:  # only data that holds containers pays for tracking them
            self.nested = {key: is_deep for key, is_deep in self.nested.items() if key not in previous}
            self.nested.update(_nested(updates))
        if self.logged + logged <= self.log_limit:
            self.logged += logged
            return ()
        omitted = []
        for key in keys:  # a removed key counts 0, so it always fits
            if self.logged + sizes[key] <= self.log_limit:
                self.logged += sizes[key]
            else:
                omitted.append(key)
        return tuple(omitted)


def _json_size(value: object) -> int:
    if type(value) is str:
        return len(value) + 2
    return 8 if type(value) in _PLAIN_SCALARS or type(value) is float else len(_SIZE_ENCODER.encode(value))


def _nested(values: dict[str, Any]) -> dict[str, bool]:
    """The keys of plain-JSON `values` that hold a list or a dict (what a node could change in place), each with
    whether that holds containers in turn (True: an attempt copies it deeply) or only scalars (a shallow copy)."""
    return {key: _is_deep(value) for key, value in values.items() if type(value) is dict or type(value) is list}


def _is_deep(container: dict[str, Any] | list[Any]) -> bool:
    return not _FLAT_ITEMS.issuperset(map(type, container.values() if type(container) is dict else container))


def _measured(value: object) -> _Measure:
    is_container = type(value) is dict or type(value) is list
    return value, _json_size(value), _is_deep(value) if is_container else None  # type: ignore[arg-type]


def _recover(run: RunContext, entry: LogEntry, target: str) -> None:
    """Send a failed step to its `on_error` node, with the error in `data["last_error"]`."""
    last_error = {"node": entry.node, "error": entry.error}
    run.state.data = {**run.state.data, "last_error": last_error}
    entry.keys_changed, entry.updates, entry.next = ("last_error",), {"last_error": last_error}, target


async def _within(node: NodeDef, awaitable: Awaitable[object]) -> object:
    try:
        async with asyncio.timeout(node.timeout_s):
            return await awaitable
    except TimeoutError:
        raise _StepFailed(f"node {node.name!r} timed out after {node.timeout_s} s") from None


_MISSING = object()


def _changes(name: str, before: dict[str, Any], data: dict[str, Any], result: object) -> tuple[dict, tuple[str, ...]]:
    """Return a step's changes: checked copies of the changed keys' new values, and the keys removed.

    A key changed if the node returned it, or bound, rebound, removed or changed in place its value in `data`, the
    node's own copy of `before`; a new value of the same type that compares equal to the old one is no change.
    """
    if result is not None and type(result) is not dict and not isinstance(result, dict):
        raise _StepFailed(f"node {name!r} returned {type(result).__name__}, expected a dict or None")
    changed: dict[str, Any] = result or {}  # copied by _copy_json below, like every changed value
    removed: tuple[str, ...] = ()
    if data != before:  # compared in C, so the per-key scan runs only for nodes that changed data
        changed = {}
        for key, value in data.items():
            old = before.get(key, _MISSING)
            if old is not value and (type(old) is not type(value) or old != value):
                changed[key] = value
        # A key removed in place and returned too is replaced, not removed: listed once.
        removed = tuple(sorted(key for key in before.keys() - data.keys() if not result or key not in result))
        if result:
            changed.update(result)
    elif not changed:
        return {}, ()
    try:
        updates = _copy_json(changed)
    except InvalidValue as exc:
        raise _StepFailed(f"node {name!r} wrote data that is not JSON: {exc}") from None
    return updates, removed


def _next_node(step: NodePlan, state: WorkflowState, name: str) -> tuple[str | None, str | None]:
    """Return the next node and the condition that chose it (None for the default edge)."""
    for branch, condition in step.branches:
        try:
            taken = condition(state)
        except Exception as exc:  # recorded as the step's error by _route
            raise _StepFailed(f"condition {branch.condition!r} of node {name!r} raised {_describe(exc)}") from exc
        if type(taken) is not bool:  # bool has no subclasses: this is isinstance
            raise _StepFailed(f"condition {branch.condition!r} returned {type(taken).__name__}, expected bool")
        if taken:
            return branch.target, branch.condition
    return step.default_next, None


# A graph, map or parallel node runs other graphs as branches: tasks on the run's event loop, each on its own copy
# of the data, at most max_concurrency at once. Their steps join the run's log with a `path` as they happen. Each
# branch's result is kept in the run (and checkpointed) when it finishes, and the results are joined in branch
# order once all have; a run resumed or taken over in the middle of the step runs only the branches not finished.
@attrs.frozen
class Branches:
    """What graph, map and parallel nodes need from their engine: graphs by id, and their bounds."""

    find_graph: GraphLookup
    max_fanout: int = MAX_FANOUT  # branches of one step running at once, and most items of a map
    max_iterations: int = MAX_ITERATIONS  # a branch's bound when its graph sets none


class _BranchFailed(_StepFailed):
    """A branch failed, stopped at its max_iterations or paused; the message names it and says why."""


@attrs.define(eq=False)
class _Saves:
    """Checkpoints of finished branches, one at a time: a save covers every branch finished before it began."""

    lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    finished: int = 0
    saved: int = 0


@attrs.define(eq=False)
class _Fork:
    """Run the branches of the composite steps of `root`, the run (or, with a `prefix`, a branch inside it)."""

    root: RunContext  # the run whose log and branch_results hold every branch, however deep
    branches: Branches
    registry: Registry
    on_change: ChangeHook
    checkpoint: Checkpoint | None
    prefix: str = ""  # where the forking step runs: "" in the run itself, "outer[2]/" in a branch of node outer
    saves: _Saves = attrs.field(factory=_Saves)

    async def __call__(self, node: NodeDef, working: WorkflowState) -> dict[str, Any]:
        """Run the branches of `node` from `working`, the step's copy of the data; return the step's updates."""
        place = self.prefix + node.name
        try:
            if node.map is not None:
                return await self._map(node, place, node.map, working.data)
            if node.parallel is not None:
                return await self._parallel(node, place, node.parallel, working.data)
            [result] = await self._run_all(node, [(place, self._graph(node, node.graph or ""), working.data)], 1)
            return _removing(working.data, [result], {**result.updates})
        finally:  # finished or failed, the step is over: a retry runs every branch again
            for key in [key for key in self.root.branch_results if _is_within(key, place)]:
                del self.root.branch_results[key]

    async def _map(self, node: NodeDef, place: str, spec: MapDef, data: dict[str, Any]) -> dict[str, Any]:
        items = data.get(spec.over, _MISSING)
        if not isinstance(items, list):
            got = "missing" if items is _MISSING else _json_type(items)
            raise _StepFailed(f"node {node.name!r} maps over data[{spec.over!r}], which is {got}; expected an array")
        if len(items) > self.branches.max_fanout:
            raise _StepFailed(f"node {node.name!r} maps over {len(items)} items of data[{spec.over!r}], more than "
                              f"the {self.branches.max_fanout} that WORKFLOW_MAX_FANOUT allows")
        graph = self._graph(node, spec.graph)
        starts = [{**data, spec.as_: item} for item in items]
        results = await self._run_all(node, [(f"{place}[{index}]", graph, start) for index, start in
                                             enumerate(starts)], spec.max_concurrency)
        collected = []
        for index, (start, result) in enumerate(zip(starts, results)):
            final = {**start, **result.updates}
            for key in result.removed:
                del final[key]
            if spec.output is not None and spec.output not in final:
                raise _StepFailed(f"branch {place}[{index}] ended without data[{spec.output!r}], the map's output")
            collected.append(final if spec.output is None else final[spec.output])
        return {spec.collect: collected}

    async def _parallel(self, node: NodeDef, place: str, spec: ParallelDef, data: dict[str, Any]) -> dict[str, Any]:
        graphs = [self._graph(node, graph_id) for graph_id in spec.branches]
        results = await self._run_all(node, [(f"{place}[{index}]", graph, data) for index, graph in enumerate(graphs)],
                                      spec.max_concurrency)
        joined: dict[str, Any] = {}
        for key in dict.fromkeys(key for result in results for key in (*result.updates, *result.removed)):
            writers = [index for index, result in enumerate(results) if key in result.updates or key in result.removed]
            policy = spec.merge.get(key, MergePolicy.ERROR)
            if policy is MergePolicy.ERROR and len(writers) > 1:
                raise _StepFailed(f"branches {' and '.join(_branch_names(spec, writers))} of node {node.name!r} all "
                                  f"wrote data[{key!r}]; declare how to join it in the node's parallel.merge")
            if policy in (MergePolicy.ERROR, MergePolicy.FIRST, MergePolicy.LAST):  # one writer's value, or removal
                chosen = results[writers[-1] if policy is MergePolicy.LAST else writers[0]]
                joined[key] = chosen.updates.get(key, _MISSING)
                continue
            if any(key in results[index].removed for index in writers):
                raise _StepFailed(f"a branch of node {node.name!r} removed data[{key!r}], which merge policy "
                                  f"{policy.value!r} cannot join")
            joined[key] = _merged(policy, [results[index].updates[key] for index in writers], node.name, key)
        return _removing(data, [], joined)

    def _graph(self, node: NodeDef, graph_id: str) -> GraphDefinition:
        graph = self.branches.find_graph(graph_id)
        if graph is None:  # a graph registered in code on the server that created this one, but not here
            raise _StepFailed(f"node {node.name!r} runs graph {graph_id!r}, which does not exist")
        return graph

    async def _run_all(self, node: NodeDef, plans: list[tuple[str, GraphDefinition, dict[str, Any]]],
                       max_concurrency: int | None) -> list[BranchResult]:
        """Run the branches not finished yet, each planned as (key, graph, start data); return all results in order.

        The first to fail cancels the others (they log `cancelled`) and fails the step with its error.
        """
        limit = asyncio.Semaphore(min(max_concurrency or FANOUT_CONCURRENCY, self.branches.max_fanout))
        log_share = max(self.root.max_log_bytes // max(len(plans), 1), 1)
        # The branches start from the step's data (a map's plus its item): each of its values is measured once.
        known = {key: _measured(value) for key, value in plans[0][2].items()} if plans else {}
        tasks = [asyncio.ensure_future(self._branch(key, graph, data, limit, log_share, known))
                 for key, graph, data in plans if key not in self.root.branch_results]
        failures: list[BaseException] = []  # in the order the branches failed
        for task in tasks:
            task.add_done_callback(functools.partial(_note_failure, failures))
        try:
            if tasks:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # a failure, or the step's own cancel or timeout
            await _cancelled_in_order(tasks)
        if failures:  # the first failure: a branch's (the usual), or an engine's
            raise next((exc for exc in failures if isinstance(exc, _BranchFailed)), failures[0])
        return [self.root.branch_results[key] for key, _, _ in plans]

    async def _branch(self, key: str, graph: GraphDefinition, data: dict[str, Any], limit: asyncio.Semaphore,
                      log_share: int, known: dict[str, _Measure]) -> None:
        async with limit:
            # A shallow copy is enough: the runner never changes a value of a run's data in place (each attempt of a
            # node works on copies that isolate it, see _private), so a branch never sees its siblings' writes, nor
            # they its.
            start = dict(data)
            # The branch's own record for the runner's step loop; not a run: no status moves, never stored.
            child = RunContext(run_id=self.root.run_id, graph_id=graph.graph_id or "", next_node=graph.start_node,
                               max_iterations=graph.max_iterations or self.branches.max_iterations,
                               max_state_bytes=self.root.max_state_bytes, max_log_bytes=log_share,
                               state=WorkflowState(data=start, metadata=self.root.state.metadata), created_at=_now())
            adopt = ChangeHook(functools.partial(self._adopt, key=key))
            fork = attrs.evolve(self, prefix=f"{key}/")
            try:
                status, error = await _drive(child, graph, self.registry, _Hooks(adopt, None, None, _branch_pause, fork),
                                             False, _DataBudget(child, known))
            finally:
                adopt.report(child)
            if status is RunStatus.STOPPED_MAX_ITERATIONS:
                error = f"it stopped at its graph's max_iterations ({child.max_iterations})"
            if status is not RunStatus.COMPLETED:
                raise _BranchFailed(f"branch {key} failed: {error}")
            updates, removed = _changes(key, start, child.state.data, None)
            self.root.branch_results[key] = BranchResult(updates=updates, removed=removed)
            await self._save()

    def _adopt(self, child: RunContext, key: str) -> None:
        """Move the branch's new log entries to the run's log, each with its path and the step's iteration."""
        for entry in child.logs:
            entry.path, entry.iteration = f"{key}/{entry.node}", self.root.iteration
            if entry.event is LogEvent.CANCELLED:
                entry.error = f"the branch was cancelled during node {entry.node!r}"
        self.root.logs += child.logs
        child.logs.clear()
        self.on_change.report(self.root)

    async def _save(self) -> None:
        saves = self.saves
        saves.finished += 1
        if self.checkpoint is None:  # the run lives in memory only: it holds the results already
            return
        wanted = saves.finished
        async with saves.lock:
            if saves.saved >= wanted:
                return
            saves.saved = saves.finished
            # A snapshot: the other branches go on adding to the log and results while the store writes.
            snapshot = attrs.evolve(self.root, logs=list(self.root.logs), branch_results=dict(self.root.branch_results))
            try:
                await self.checkpoint(snapshot)
            except EngineError as exc:
                raise _BranchFailed(f"the results of finished branches could not be saved: {exc.message}") from None


def _note_failure(failures: list[BaseException], task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        failures.append(task.exception())  # type: ignore[arg-type]


async def _cancelled_in_order(tasks: list[asyncio.Future[None]]) -> None:
    """Cancel the branch tasks still running and wait until every one has ended, even through a cancel of the
    caller, which is raised then. They are cancelled in branch order (a TaskGroup's order is its set's), so their
    `cancelled` entries join the log in that order: the same run logs the same way every time."""
    for task in tasks:
        task.cancel()
    cancel = None
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError as exc:
            cancel = exc
    if cancel is not None:
        raise cancel


def _branch_pause(run: RunContext) -> str | None:
    return (f"it paused at node {run.next_node!r} (interrupt_before or Interrupt), which a branch cannot do in this "
            "version")


def _is_within(key: str, place: str) -> bool:
    """Whether branch `key` (`a[1]`, `a[1]/b`) is a branch of the step at `place` (`a`), however deep."""
    return key == place or key.startswith((f"{place}[", f"{place}/"))


def _removing(data: dict[str, Any], results: list[BranchResult], updates: dict[str, Any]) -> dict[str, Any]:
    """Return the step's `updates`, having removed from `data` (the step's copy) each key a branch removed."""
    for key in [key for result in results for key in result.removed] + [k for k, v in updates.items() if v is _MISSING]:
        data.pop(key, None)
        updates.pop(key, None)
    return updates


# What each joining policy takes: extend lists, merge objects, sum, min and max numbers (append takes anything).
_MERGE_INPUTS: Mapping[MergePolicy, tuple[type | tuple[type, ...], str]] = MappingProxyType({
    MergePolicy.EXTEND: (list, "arrays"), MergePolicy.MERGE: (dict, "objects"),
    **{policy: ((int, float), "numbers") for policy in (MergePolicy.SUM, MergePolicy.MIN, MergePolicy.MAX)},
})


def _merged(policy: MergePolicy, values: list[Any], name: str, key: str) -> Any:
    """Join the branches' values of one key by `policy`, or raise _StepFailed saying which value does not fit."""
    if policy is MergePolicy.APPEND:
        return list(values)
    kind, kinds = _MERGE_INPUTS[policy]
    for value in values:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _StepFailed(f"node {name!r} cannot {policy.value} data[{key!r}]: a branch wrote {_json_type(value)}, "
                              f"expected {kinds}")
    if policy is MergePolicy.EXTEND:
        return [item for value in values for item in value]
    if policy is MergePolicy.MERGE:
        joined: dict[str, Any] = {}
        for value in values:
            for inner, item in value.items():
                if inner in joined and (type(joined[inner]) is not type(item) or joined[inner] != item):
                    raise _StepFailed(f"node {name!r} cannot merge data[{key!r}]: branches set its key {inner!r} "
                                      "to different values")
                joined[inner] = item
        return joined
    return {MergePolicy.SUM: sum, MergePolicy.MIN: min, MergePolicy.MAX: max}[policy](values)


# ---------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------
# Two stores share one interface: reads are plain calls, writes are awaited. MemoryStore never awaits, so no other
# task can see it between a read and a write. SqliteStore reads on the caller's thread (WAL readers never wait for
# writers) and writes on one thread of its own, so a busy database never stalls the event loop; a small write
# commits on the caller's thread when it can do so without waiting (see SqlStore._commit_here). A finished run is
# kept as compact JSON: a fifth of the memory of its objects, nothing for the garbage collector to scan again and
# again, and ready to send as it is. A big record (see _is_big) is encoded on a thread of the store's own, so that
# the event loop does no work that grows with a run's size when the run is saved.
def summarize(run: RunContext) -> RunSummary:
    """The few fields of a run that lists show and filter on."""
    return RunSummary(run_id=run.run_id, graph_id=run.graph_id, status=run.status, current_node=run.current_node,
                      iteration=run.iteration, error=run.error, created_at=run.created_at, finished_at=run.finished_at)


# One encoder for every record (json.dumps builds one per call); no cycle check: _copy_json let none through.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False)


def dump_json(value: Any) -> bytes:
    """Encode unstructured data as compact UTF-8 JSON, the way JSONResponse does."""
    return _JSON_ENCODER.encode(value).encode()


def _epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _active_runs(count: int) -> str:
    """Why a graph with active runs cannot be deleted."""
    if count == 1:
        return "1 run of it is pending or running; cancel it or wait for it to end"
    return f"{count} runs of it are pending or running; cancel them or wait for them to end"


def _runs_it(referrer: tuple[str, str]) -> str:
    """Why a graph that another graph's node runs cannot be deleted."""
    return f"node {referrer[1]!r} of graph {referrer[0]!r} runs it; delete that graph first"


_SIZE_PROBES = 256  # most values _is_big looks at; a record with more is big
_ENTRY_BYTES = 300  # about what a log entry's JSON takes besides its updates


def _is_big(run: RunContext, first_log: int = 0) -> bool:
    """Whether the record of `run` (its log from entry `first_log` on) may take more than OFF_LOOP_BYTES of JSON.

    A cheap look, whatever the run's size: it counts strings by their length and other values (and keys) as a few
    bytes, looks at no more than _SIZE_PROBES values (data, metadata, the log's updates), and calls big what it
    cannot finish. A plain loop with few calls: it runs on every save of a stopped run, and on every checkpoint.
    """
    entries = run.logs[first_log:]
    containers: list[Any] = [entry.updates for entry in entries]
    probes, size = _SIZE_PROBES - len(containers), len(containers) * _ENTRY_BYTES
    containers += (run.state.data, run.state.metadata)
    for container in containers:  # grows as it goes: nested containers are appended, and looked at in turn
        is_dict = type(container) is dict
        for item in container:  # a dict's values by subscript: no call per container or per value
            value = container[item] if is_dict else item
            probes -= 1
            if probes < 0:
                return True
            size += 8
            kind = type(value)
            if kind is str:
                size += len(value)
            elif kind is dict or kind is list:
                containers.append(value)
        if size > OFF_LOOP_BYTES:
            return True
    return False


async def _off_loop(thread: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    """Return `fn(*args)`, called on `thread`. A cancel waits for the call to end, then propagates: `fn` reads a run
    that its task changes as soon as the cancel reaches it (a run cancelled or timed out during a checkpoint)."""
    future = asyncio.get_running_loop().run_in_executor(thread, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError as exc:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved, so asyncio does not report it: the caller was cancelled
        raise exc


def _stored_record(run: RunContext) -> bytes:
    """The record a memory store keeps of a stopped run: its JSON, compressed once it is RUN_COMPRESSION_MIN_BYTES
    long. JSON text of an object starts with `{`, a zlib stream never does, so `_record_json` tells them apart."""
    record = dump_json(converter.unstructure(run))
    return record if len(record) < RUN_COMPRESSION_MIN_BYTES else zlib.compress(record, RUN_COMPRESSION_LEVEL)


def _record_json(record: bytes) -> bytes:
    return record if record[:1] == b"{" else zlib.decompress(record)


@attrs.frozen
class Lease:
    """Who executes a run, and in which attempt; a save that names any other lease is refused (LeaseLost)."""

    owner: str
    attempt: int


def worker_name() -> str:
    """A name for this server that no other shares: its host, its pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@attrs.frozen
class Heartbeat:
    """What a store tells a worker when it renews its leases: runs it lost, and runs someone asked to cancel."""

    lost: tuple[str, ...] = ()
    cancel_requested: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class IdempotencyKey:
    """A request's Idempotency-Key and the fingerprint of the request it came with."""

    key: str
    fingerprint: str


@attrs.frozen(kw_only=True)
class HeldKey:
    """What a store holds for a key that an earlier request reserved: that request's fingerprint, its run, and
    whether the run has started (`is_accepted`) or the request is still starting it."""

    fingerprint: str
    run_id: str
    is_accepted: bool


@attrs.frozen(kw_only=True)
class _StoredKey:
    held: HeldKey
    token: str  # the reserving request's, so that only it accepts or releases the key
    reserved_at: float  # time.monotonic()
    expires_at: float


@attrs.frozen
class _StoredRun:
    summary: RunSummary
    record: bytes  # the run record's JSON, compressed if it is long (see _stored_record)


@attrs.frozen(kw_only=True)
class WebhookEvent:
    """One webhook to deliver: a run's stop (an end or a pause), its payload, and the attempts made so far.

    `event_id` (the `webhook-id` header) is the run's id and the number of its status changes at the stop, the same
    on every retry of the event and on every server; a run that pauses and later ends sends two events.
    """

    event_id: str
    run_id: str
    url: str
    body: bytes
    attempts: int = 0


def webhook_event(run: RunContext) -> WebhookEvent | None:
    """The webhook event of a run that has just stopped (None while it is active, or without a webhook)."""
    if run.webhook is None or run.status.is_active:
        return None
    payload = {"run_id": run.run_id, "graph_id": run.graph_id, "status": run.status.value, "error": run.error,
               "iteration": run.iteration, "finished_at": converter.unstructure(run.finished_at)}
    return WebhookEvent(event_id=f"{run.run_id}.{len(run.history)}", run_id=run.run_id, url=run.webhook.url,
                        body=dump_json(payload))


@attrs.define(kw_only=True)
class _StoredWebhook:
    event: WebhookEvent
    delivery: WebhookDelivery
    next_at: float | None  # time.time() of the next attempt; None once delivered or abandoned
    owner: str | None = None
    claimed_until: float = 0.0


def _with_webhook(record: dict[str, Any], delivery: WebhookDelivery | None) -> dict[str, Any]:
    """A run record showing how its latest webhook delivery went (the run's own copy only names the URL)."""
    return record if delivery is None else {**record, "webhook": converter.unstructure(delivery)}


class MemoryStore:
    """Graphs and runs in memory: at most `max_runs` finished runs (oldest evicted first) and `max_graphs` graphs.

    Runs that are active or paused are never evicted; the engine bounds how many may be paused.
    """

    is_durable = False
    is_shared = False

    def __init__(self, *, max_runs: int = MAX_STORED_RUNS, max_graphs: int = MAX_STORED_GRAPHS) -> None:
        self.max_runs = max_runs
        self.max_graphs = max_graphs
        self._graphs: dict[str, GraphDefinition] = {}
        self._runs: dict[str, RunContext | _StoredRun] = {}  # oldest first; an active run is the live object
        self._leases: dict[str, Lease] = {}  # the last lease of each run; its owner is "" once the run stops
        self._finished: dict[str, None] = {}  # finished run ids, oldest first
        self._paused: set[str] = set()
        self._keys: dict[str, _StoredKey] = {}  # idempotency keys, oldest first (all live equally long)
        self._run_keys: dict[str, set[str]] = {}  # the keys naming each run, which go with it
        self._webhooks: dict[str, dict[str, _StoredWebhook]] = {}  # by run, then event, oldest first
        self._due: dict[str, str] = {}  # events not yet delivered or abandoned -> their run
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="workflow-encode")  # started when used

    async def reserve_key(self, key: IdempotencyKey, run_id: str, token: str, ttl_s: float,
                          reserve_s: float = IDEMPOTENCY_RESERVE_S) -> HeldKey | None:
        """Reserve `key` for the request `token` that will start (or resume) `run_id` and return None; or return
        what an earlier request holds. A key expires `ttl_s` after it was reserved, and a reservation whose run has
        not started `reserve_s` after it was made (its request died) is free again."""
        now = time.time()
        while self._keys and (next(iter(self._keys.values())).expires_at <= now
                              or len(self._keys) >= MAX_IDEMPOTENCY_KEYS):
            self._forget_key(next(iter(self._keys)))
        held = self._held(key.key, reserve_s, now)
        if held is not None:
            return held
        self._forget_key(key.key)  # a stale reservation goes to the end, with the young keys
        self._keys[key.key] = _StoredKey(held=HeldKey(fingerprint=key.fingerprint, run_id=run_id, is_accepted=False),
                                         token=token, reserved_at=now, expires_at=now + ttl_s)
        self._run_keys.setdefault(run_id, set()).add(key.key)
        return None

    def held_key(self, key: str, reserve_s: float = IDEMPOTENCY_RESERVE_S) -> HeldKey | None:
        """What an earlier request holds for `key` (a read: a request that waits on another's reservation polls
        it); None if nothing, or a reservation older than `reserve_s` whose run has not started."""
        return self._held(key, reserve_s, time.time())

    def _held(self, key: str, reserve_s: float, now: float) -> HeldKey | None:
        stored = self._keys.get(key)
        if stored is None or stored.expires_at <= now:
            return None
        if not stored.held.is_accepted and stored.reserved_at + reserve_s <= now:  # its request died
            return None
        return stored.held

    async def accept_key(self, key: str, token: str) -> None:
        """Mark `key`, reserved by `token`, as naming a run that has started."""
        stored = self._keys.get(key)
        if stored is not None and stored.token == token:
            self._keys[key] = attrs.evolve(stored, held=attrs.evolve(stored.held, is_accepted=True))

    async def release_key(self, key: str, token: str) -> None:
        """Forget `key`, reserved by `token`, whose request started nothing."""
        stored = self._keys.get(key)
        if stored is not None and stored.token == token:
            self._forget_key(key)

    async def delete_expired_keys(self, now: datetime | None, limit: int) -> int:
        """Forget at most `limit` keys expired at `now` (None: the time), oldest first; return how many."""
        clock = time.time() if now is None else now.timestamp()
        expired = list(itertools.islice(itertools.takewhile(lambda key: self._keys[key].expires_at <= clock,
                                                            self._keys), limit))
        for key in expired:
            self._forget_key(key)
        return len(expired)

    async def claim_webhooks(self, owner: str, limit: int, claim_s: float = WEBHOOK_CLAIM_S) -> list[WebhookEvent]:
        """Claim for `owner`, for `claim_s`, at most `limit` webhook events that are due and that no other
        claim holds; return them."""
        now, claimed = time.time(), []
        for event_id, run_id in self._due.items():
            stored = self._webhooks[run_id][event_id]
            if len(claimed) == limit:
                break
            if stored.next_at is not None and stored.next_at <= now and stored.claimed_until <= now:
                stored.owner, stored.claimed_until = owner, now + claim_s
                claimed.append(attrs.evolve(stored.event, attempts=stored.delivery.attempts))
        return claimed

    async def record_webhook(self, event: WebhookEvent, owner: str, delivery: WebhookDelivery,
                             retry_s: float | None) -> None:
        """Record an attempt `owner` made at `event` (`delivery` as it stands after it): due again in `retry_s`,
        or (None) delivered or abandoned. An attempt of a claim that is no longer `owner`'s is not recorded."""
        stored = self._webhooks.get(event.run_id, {}).get(event.event_id)
        if stored is None or stored.owner != owner:
            return
        stored.delivery, stored.owner, stored.claimed_until = delivery, None, 0.0
        stored.next_at = None if retry_s is None else time.time() + retry_s
        if retry_s is None:
            del self._due[event.event_id]
            self._forget_done_webhooks(event.run_id)

    def webhook_of(self, run_id: str) -> WebhookDelivery | None:
        """How the latest webhook event of a run went; None if it has none."""
        events = self._webhooks.get(run_id)
        return next(reversed(events.values())).delivery if events else None

    async def add_graph(self, graph: GraphDefinition, registered: Collection[str] = ()) -> bool:
        """Store `graph`; return False if the same definition was already there, raise GraphConflict if another.

        Every graph it runs must be stored or `registered` (in code): else InvalidGraph, as at validation. This
        check and delete_graph's of the graphs that run it hold together, so that a graph and one it runs are
        never deleted and created at once (SqlStore checks both in the transaction of the write).
        """
        assert graph.graph_id is not None
        stored = self._graphs.get(graph.graph_id)
        if stored is not None:
            if stored != graph:
                raise GraphConflict(graph.graph_id)
            return False
        missing = unknown_graphs(graph, lambda graph_id: graph_id in registered or graph_id in self._graphs)
        if missing:
            raise InvalidGraph(missing)
        if len(self._graphs) >= self.max_graphs:
            raise StoreFull(self.max_graphs)
        self._graphs[graph.graph_id] = graph
        return True

    def get_graph(self, graph_id: str) -> GraphDefinition:
        """Return the graph stored as `graph_id`, or raise GraphNotFound."""
        try:
            return self._graphs[graph_id]
        except KeyError:
            raise GraphNotFound(graph_id) from None

    def list_graphs(self, *, limit: int = 50, offset: int = 0) -> tuple[list[GraphDefinition], int]:
        """Return a page of graphs in the order they were created, and how many there are."""
        return list(itertools.islice(self._graphs.values(), offset, offset + limit)), len(self._graphs)

    async def claim_run(self, run: RunContext, expected: RunStatus | None, owner: str | None, saved_logs: int = 0,
                        lease_s: float = LEASE_S, origin: str | None = None, room: int | None = None) -> Lease:
        """Store `run` for `owner` if the stored run's status is `expected` and it has no owner (None: there is none
        yet); return the new lease, or raise RunConflict (RunNotFound) and store nothing. Memory is this process's
        alone, so nothing is queued here (`owner` None) and leases never expire."""
        record = await self._record(run)  # first: nothing awaits between reading and writing the dicts
        stored = self._runs.get(run.run_id)
        status = None if stored is None else _status_of(stored)
        previous = self._leases.get(run.run_id)
        if status is not expected or previous is not None and previous.owner:
            raise RunNotFound(run.run_id) if status is None else _refused(run.run_id, status, run.status)
        lease = Lease(owner=owner or "", attempt=1 if previous is None else previous.attempt + 1)
        self._put(run, lease, record)
        return lease

    async def save_run(self, run: RunContext, lease: Lease, saved_logs: int = 0, lease_s: float = LEASE_S) -> None:
        """Store `run`, executed under `lease`, or raise LeaseLost if that is no longer its lease."""
        record = await self._record(run)
        if self._leases.get(run.run_id) != lease:
            raise LeaseLost(run.run_id)
        self._put(run, lease, record)

    async def claim_next(self, owner: str, lease_s: float = LEASE_S) -> tuple[RunContext, Lease, bool] | None:
        """Nothing is ever queued in memory."""
        return None

    async def heartbeat(self, owner: str, leases: Mapping[str, int], lease_s: float = LEASE_S) -> Heartbeat:
        """Leases in memory never expire, and only this process can ask to cancel."""
        return Heartbeat()

    def expired(self, limit: int = 100) -> list[tuple[RunContext, Lease]]:
        """None: memory does not outlive the process that holds its leases."""
        return []

    async def delete_run(self, run_id: str) -> None:
        """Delete a run that is not pending or running; raise RunNotFound, or RunConflict naming its status."""
        status, lease = _status_of(self._entry(run_id)), self._leases.get(run_id)
        if status.is_active or lease is not None and lease.owner:
            raise _delete_refused(run_id, status)
        self._drop(run_id)

    async def delete_graph(self, graph_id: str) -> None:
        """Delete a stored graph unless another stored graph runs it or runs of it are pending or running
        (GraphInUse, naming the first of them); raise GraphNotFound."""
        if graph_id not in self._graphs:
            raise GraphNotFound(graph_id)
        referrer = first_referrer(self._graphs.values(), graph_id)
        if referrer is not None:
            raise GraphInUse(graph_id, _runs_it(referrer))
        active = sum(isinstance(entry, RunContext) and entry.graph_id == graph_id and entry.status.is_active
                     for entry in self._runs.values())
        if active:
            raise GraphInUse(graph_id, _active_runs(active))
        del self._graphs[graph_id]

    async def claim_sweep(self, now: datetime | None, every_s: float) -> bool:
        """True: memory is this process's alone, so no other server shares its sweeps."""
        return True

    async def delete_expired(self, is_paused: bool, ttl_s: float, now: datetime | None, limit: int) -> int:
        """Delete at most `limit` finished runs (`is_paused`: waiting and interrupted ones) whose finished_at is
        over `ttl_s` before `now` (None: the time); return how many. One call is one bounded slice of work."""
        cutoff = (now or _now()) - timedelta(seconds=ttl_s)

        def is_old(run_id: str) -> bool:
            entry = self._runs[run_id]
            finished_at = entry.finished_at if isinstance(entry, RunContext) else entry.summary.finished_at
            return finished_at is not None and finished_at < cutoff

        # Finished runs are kept in the order they finished, so the scan stops at the first young one; paused runs
        # are at most max_paused_runs.
        scan = filter(is_old, self._paused) if is_paused else itertools.takewhile(is_old, self._finished)
        expired = list(itertools.islice(scan, limit))
        for run_id in expired:
            self._drop(run_id)
        return len(expired)

    def count_paused(self) -> int:
        """How many runs are waiting or interrupted."""
        return len(self._paused)

    def has_run(self, run_id: str) -> bool:
        """Whether a run is stored as `run_id`."""
        return run_id in self._runs

    def get_run(self, run_id: str) -> RunContext:
        """Return the run stored as `run_id` (the live record while it is active, else a copy)."""
        entry = self._entry(run_id)
        if isinstance(entry, RunContext):
            return entry
        return converter.structure(_with_webhook(json.loads(_record_json(entry.record)), self.webhook_of(run_id)),
                                   RunContext)

    def get_run_json(self, run_id: str) -> bytes:
        """Return the record of the run stored as `run_id` as JSON, or raise RunNotFound."""
        entry, delivery = self._entry(run_id), self.webhook_of(run_id)
        if isinstance(entry, RunContext):
            return dump_json(_with_webhook(converter.unstructure(entry), delivery))
        record = _record_json(entry.record)
        return record if delivery is None else dump_json(_with_webhook(json.loads(record), delivery))

    def list_runs(
        self, *, graph_id: str | None = None, status: RunStatus | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[RunSummary], int]:
        """Return a page of run summaries, newest first, that match the filters, and how many match in all."""
        summaries = (summarize(entry) if isinstance(entry, RunContext) else entry.summary
                     for entry in reversed(self._runs.values()))
        matches = [summary for summary in summaries
                   if (graph_id is None or summary.graph_id == graph_id) and (status is None or summary.status is status)]
        return matches[offset:offset + limit], len(matches)

    def counts(self) -> tuple[int, int]:
        """Return how many graphs and runs are stored."""
        return len(self._graphs), len(self._runs)

    def close(self) -> None:
        """Stop the thread that encodes big records."""
        self._encoder.shutdown(wait=True)

    async def _record(self, run: RunContext) -> bytes | None:
        # What _put keeps of a stopped run: its JSON, made on a thread when it is big. Nothing changes a
        # stopped run meanwhile (the engine saves it once its runner has returned).
        if run.status.is_active:
            return None
        return await _off_loop(self._encoder, _stored_record, run) if _is_big(run) else _stored_record(run)

    def _put(self, run: RunContext, lease: Lease, record: bytes | None) -> None:
        # An active run is kept as the live object; a stopped one as its `record`, a copy nothing else changes.
        run_id, status = run.run_id, run.status
        (self._paused.add if status.is_resumable else self._paused.discard)(run_id)
        if status.is_active:
            self._runs[run_id], self._leases[run_id] = run, lease
            return
        assert record is not None
        self._runs[run_id] = _StoredRun(summary=summarize(run), record=record)
        self._leases[run_id] = Lease(owner="", attempt=lease.attempt)
        if run.webhook is not None:
            self._add_webhook(webhook_event(run))
        if not status.is_terminal:
            return
        self._finished[run_id] = None
        while len(self._finished) > self.max_runs:
            self._drop(next(iter(self._finished)))

    def _add_webhook(self, event: WebhookEvent | None) -> None:
        if event is None:
            return
        self._forget_done_webhooks(event.run_id)
        events = self._webhooks.setdefault(event.run_id, {})
        if event.event_id not in events:
            events[event.event_id] = _StoredWebhook(event=event, delivery=WebhookDelivery(url=event.url),
                                                    next_at=time.time())
            self._due[event.event_id] = event.run_id

    def _forget_done_webhooks(self, run_id: str) -> None:
        # A run keeps its events still to deliver, and the latest one whatever its state: what its record shows.
        events = self._webhooks.get(run_id, {})
        for event_id in [event_id for event_id in list(events)[:-1] if event_id not in self._due]:
            del events[event_id]

    def _forget_key(self, key: str) -> None:
        stored = self._keys.pop(key, None)
        if stored is not None:
            keys = self._run_keys.get(stored.held.run_id, set())
            keys.discard(key)
            if not keys:
                self._run_keys.pop(stored.held.run_id, None)

    def _entry(self, run_id: str) -> RunContext | _StoredRun:
        try:
            return self._runs[run_id]
        except KeyError:
            raise RunNotFound(run_id) from None

    def _drop(self, run_id: str) -> None:
        # Everything stored with the run goes: its idempotency keys (a retry of its request starts a new run) and
        # its webhook events, delivered or not.
        del self._runs[run_id]
        self._leases.pop(run_id, None)
        self._finished.pop(run_id, None)
        self._paused.discard(run_id)
        for key in list(self._run_keys.get(run_id, ())):
            self._forget_key(key)
        for event_id in self._webhooks.pop(run_id, {}):
            self._due.pop(event_id, None)


def _status_of(entry: RunContext | _StoredRun) -> RunStatus:
    return entry.status if isinstance(entry, RunContext) else entry.summary.status


_SCHEMA = (  # version 1; a later version appends its statements as a new entry of _MIGRATIONS
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE graphs (seq {serial}, graph_id TEXT NOT NULL UNIQUE, definition {json} NOT NULL)",
    "CREATE TABLE runs (seq {serial}, run_id TEXT NOT NULL UNIQUE, graph_id TEXT NOT NULL,"
    " status TEXT NOT NULL, owner TEXT, head {json} NOT NULL)",
    "CREATE INDEX runs_by_status ON runs (status, seq)",
    "CREATE INDEX runs_by_graph ON runs (graph_id, seq)",
    "CREATE TABLE logs (run_id TEXT NOT NULL, position INTEGER NOT NULL, entry {json} NOT NULL,"
    " PRIMARY KEY (run_id, position)){without_rowid}",
)
_LEASES = (  # version 2: leases (owner, attempt, a deadline on the database's clock), cancel requests, and what a
    # stream of another process needs to follow a run without reading its whole record (its history, its count)
    "ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE runs ADD COLUMN lease_until DOUBLE PRECISION",
    "ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE runs ADD COLUMN event_count INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE runs ADD COLUMN history {json}",
    "ALTER TABLE runs ADD COLUMN origin TEXT",  # the server that accepted the run: its pending bound counts them
    "CREATE INDEX runs_by_origin ON runs (origin, status)",
)
_ACTIVE = tuple(status.value for status in RunStatus if status.is_active)
_PAUSED = tuple(status.value for status in RunStatus if status.is_resumable)
_TERMINAL = tuple(status.value for status in RunStatus if status.is_terminal)
_SUMMARY_FIELDS = tuple(field.name for field in attrs.fields(RunSummary))
_IN_ACTIVE = f"status IN ({', '.join(repr(status) for status in _ACTIVE)})"  # constants only, never client values
_IN_PAUSED = f"status IN ({', '.join(repr(status) for status in _PAUSED)})"
_IN_TERMINAL = f"status IN ({', '.join(repr(status) for status in _TERMINAL)})"
_QUEUED = f"status = {RunStatus.PENDING.value!r} AND owner IS NULL"  # waiting for any server to claim it
_STOPS = (  # version 3: when a run last stopped (ended or paused) on the database's clock, which every server shares,
    # for the sweeper; runs stopped before the upgrade count from it
    "ALTER TABLE runs ADD COLUMN stopped_at DOUBLE PRECISION",
    f"UPDATE runs SET stopped_at = {{now}} WHERE NOT {_IN_ACTIVE}",
    "CREATE INDEX runs_by_stop ON runs (status, stopped_at)",
)
_KEYS = (  # version 4: Idempotency-Key headers, on the database's clock; the primary key lets one request have each
    "CREATE TABLE idempotency_keys (idempotency_key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, run_id TEXT NOT NULL,"
    " token TEXT NOT NULL, accepted INTEGER NOT NULL DEFAULT 0, reserved_at DOUBLE PRECISION NOT NULL,"
    " expires_at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at)",
)
_FINISHED = (  # version 5: how many runs have finished, kept in meta, and an index of them in order, so that keeping
    # at most max_runs costs a finishing run the same whether the store holds ten runs or a hundred thousand
    f"INSERT INTO meta VALUES ('finished_runs', (SELECT CAST(COUNT(*) AS TEXT) FROM runs WHERE {_IN_TERMINAL}))",
    f"CREATE INDEX runs_finished ON runs (seq) WHERE {_IN_TERMINAL}",
)
_WEBHOOKS = (  # version 6: completion webhooks, one row per event (a run's stop), on the database's clock; next_at
    # is when the next attempt is due, NULL once delivered or abandoned. Idempotency keys go with their run.
    "CREATE TABLE webhooks (seq {serial}, event_id TEXT NOT NULL UNIQUE, run_id TEXT NOT NULL, url TEXT NOT NULL,"
    " body {json} NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, delivered_at TEXT, last_error TEXT,"
    " next_at DOUBLE PRECISION, owner TEXT, claimed_until DOUBLE PRECISION)",
    "CREATE INDEX webhooks_by_due ON webhooks (next_at)",
    "CREATE INDEX webhooks_by_run ON webhooks (run_id, seq)",
    "CREATE INDEX idempotency_keys_by_run ON idempotency_keys (run_id)",
)


def _reference_rows(graph: GraphDefinition) -> list[tuple[str, int, str, str]]:
    """The graph_references rows of `graph`: (its id, the node's place among its composite nodes, the node, the
    graph the node runs), each once."""
    return list(dict.fromkeys((graph.graph_id or "", position, name, graph_id)
                              for position, (name, graph_ids) in enumerate(graph_references(graph).items())
                              for graph_id in graph_ids))


def _fill_references(store: "SqlStore", db: Any) -> None:
    """Index the references of the graphs stored before version 7."""
    rows = [row for (definition,) in store._all(db, "SELECT definition FROM graphs")
            for row in _reference_rows(converter.structure(json.loads(definition), GraphDefinition))]
    store._executemany(db, _INSERT_REFERENCE, rows)


_REFERENCES = (  # version 7: the graphs each stored graph's nodes run. A create checks that the graphs it runs are
    # stored, and a delete that no stored graph runs its graph, each in the transaction of its write: of a create of a
    # graph and a delete of one it runs, on two servers at once, the second to commit is refused.
    "CREATE TABLE graph_references (graph_id TEXT NOT NULL, position INTEGER NOT NULL, node TEXT NOT NULL,"
    " referenced TEXT NOT NULL, PRIMARY KEY (graph_id, position, referenced))",
    "CREATE INDEX graph_references_by_referenced ON graph_references (referenced)",
    _fill_references,
)
_INSERT_REFERENCE = "INSERT INTO graph_references (graph_id, position, node, referenced) VALUES (?, ?, ?, ?)"
_Migration = tuple["str | Callable[[SqlStore, Any], None]", ...]  # statements, and steps that SQL alone cannot do
_MIGRATIONS: tuple[_Migration, ...] = (_SCHEMA, _LEASES, _STOPS, _KEYS, _FINISHED, _WEBHOOKS, _REFERENCES)
_CHANNEL = "workflow_engine"  # PostgreSQL notifications: "run <id>", "queue", "cancel <id>"


@attrs.define(eq=False)
class _Write:
    """One write of a SqlStore's batch: `fn(db, *args)`, what it returned or raised, the future its caller awaits."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    is_progress: bool  # see SqlStore._write
    task: "asyncio.Task[Any] | None" = attrs.field(factory=asyncio.current_task)  # the caller's, as it writes
    has_failed: bool = False  # in a batch applied without savepoints on the caller's thread (see SqlStore._commit)
    result: Any = None
    error: Exception | None = None


class _WriteFailed(Exception):
    """One write of a batch applied without savepoints raised: the batch is undone, to be applied again with them."""


class SqlStore:
    """Graphs and runs in a SQL database that several servers share; SqliteStore and PostgresStore say how to
    connect and the few pieces of SQL that differ, everything else is here.

    Every step of a run is committed atomically (its record and its new log entries), so a crash loses at most the
    step that was executing; concurrent writes share transactions (group commit, see _write). Every write for an
    active run is guarded by its lease (owner and attempt), and a lease lasts until a deadline on the database's
    clock that its owner keeps renewing; a run whose deadline passed is anyone's to take over. Runs queued without
    an owner are claimed by whichever server has room. Threads: see the section's opening comment. At most
    `max_runs` finished runs are kept, the oldest deleted first (see _evict).
    """

    is_durable = True
    is_shared = True
    # What differs between databases, set by each subclass:
    NOW = ""  # the database's clock, in seconds since the epoch
    SERIAL = ""  # an auto-numbered primary key
    JSON = ""  # the type of a column of JSON bytes
    WITHOUT_ROWID = ""
    SKIP_LOCKED = ""  # how a queue claim skips rows that another transaction holds
    FINISHED_RUNS = "runs"  # the runs table, read through the index of finished runs in order (see _evict)
    IS_NARROW_CHECKPOINT = True  # a checkpoint's UPDATE leaves out the columns it does not change (see _save)
    HAS_META = ""  # a query that returns a row if the meta table exists

    def __init__(self, *, max_runs: int = MAX_STORED_RUNS, max_graphs: int = MAX_STORED_GRAPHS) -> None:
        self.max_runs, self.max_graphs = max_runs, max_graphs
        self._reader = self._connect()  # the caller's thread
        self._writer = self._connect()  # only ever used on self._thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="workflow-store")
        self._pending: list[_Write] = []  # writes waiting for the writer thread's next transaction
        self._pending_lock = threading.Lock()  # guards _pending and _is_draining, shared with the writer thread
        self._is_draining = False  # whose turn to write: a _drain queued or running, or _commit_here's
        self._here: Any = None  # SqliteStore's, for small writes on the caller's thread (see _commit_here)
        self._gathered: list[_Write] = []  # small writes for the caller's thread's next transaction
        self._here_commits = 0
        self._alone: asyncio.Task | None = None  # whose write was the last transaction's only one (see _write)
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="workflow-encode")  # started when used
        # The converter's hook for a run without the log, which the logs table holds (a checkpoint every step).
        self._unstructure_head = make_dict_unstructure_fn(RunContext, converter, logs=override(omit=True),
                                                          branch_results=override(omit_if_default=True))
        self._graph_cache: dict[str, tuple[int, GraphDefinition]] = {}  # by id, with its row's seq: new if made again
        with self._transaction() as db:
            self._migrate(db)
            self._evict(db, self._count_finished(db, 0))  # a store opened with a smaller max_runs than it holds

    async def reserve_key(self, key: IdempotencyKey, run_id: str, token: str, ttl_s: float,
                          reserve_s: float = IDEMPOTENCY_RESERVE_S) -> HeldKey | None:
        """Reserve `key` as MemoryStore does, in one transaction that also deletes expired keys; writes are
        serialized, so of two servers reserving one key at once, one wins and the other sees its reservation."""
        return await self._write(self._reserve_key, key.key, key.fingerprint, run_id, token, ttl_s, reserve_s)

    def held_key(self, key: str, reserve_s: float = IDEMPOTENCY_RESERVE_S) -> HeldKey | None:
        """What an earlier request holds for `key`, as MemoryStore says; a read, on the caller's thread."""
        row = self._read_one(f"SELECT fingerprint, run_id, accepted FROM idempotency_keys WHERE idempotency_key = ?"
                             f" AND expires_at > {self.NOW} AND (accepted = 1 OR reserved_at + ? > {self.NOW})",
                             (key, reserve_s))
        return None if row is None else HeldKey(fingerprint=row[0], run_id=row[1], is_accepted=bool(row[2]))

    async def accept_key(self, key: str, token: str) -> None:
        """Mark `key`, reserved by `token`, as naming a run that has started."""
        await self._write(self._update_key, "UPDATE idempotency_keys SET accepted = 1", key, token)

    async def release_key(self, key: str, token: str) -> None:
        """Forget `key`, reserved by `token`, whose request started nothing."""
        await self._write(self._update_key, "DELETE FROM idempotency_keys", key, token)

    async def delete_expired_keys(self, now: datetime | None, limit: int) -> int:
        """Delete, in one transaction, at most `limit` keys expired at `now` (None: the database's clock)."""
        return await self._write(self._delete_expired_keys, _epoch(now), limit)

    async def claim_webhooks(self, owner: str, limit: int, claim_s: float = WEBHOOK_CLAIM_S) -> list[WebhookEvent]:
        """Claim webhook events as MemoryStore does, in one transaction: of several servers, one sends each."""
        return await self._write(self._claim_webhooks, owner, limit, claim_s)

    async def record_webhook(self, event: WebhookEvent, owner: str, delivery: WebhookDelivery,
                             retry_s: float | None) -> None:
        """Record an attempt at `event` as MemoryStore does, if `owner` still holds its claim."""
        delivered_at = converter.unstructure(delivery.delivered_at)
        await self._write(self._record_webhook, event.event_id, event.run_id, owner, delivery.attempts, delivered_at,
                          delivery.last_error, retry_s)

    def webhook_of(self, run_id: str) -> WebhookDelivery | None:
        """How the latest webhook event of a run went; None if it has none."""
        return self._webhook_of(self._reader, run_id)  # one statement: no transaction (see _read_one)

    async def add_graph(self, graph: GraphDefinition, registered: Collection[str] = ()) -> bool:
        """Store `graph` as MemoryStore does; the graphs it runs are checked, and its references (see _REFERENCES)
        written, in the transaction of the insert."""
        assert graph.graph_id is not None
        stored = await self._write(self._insert_graph, graph, dump_json(converter.unstructure(graph)),
                                   frozenset(registered))
        if stored is not None and converter.structure(json.loads(stored), GraphDefinition) != graph:
            raise GraphConflict(graph.graph_id)
        return stored is None

    def get_graph(self, graph_id: str) -> GraphDefinition:
        """Return the graph stored as `graph_id`, or raise GraphNotFound."""
        row = self._read_one("SELECT seq, definition FROM graphs WHERE graph_id = ?", (graph_id,))
        if row is None:
            raise GraphNotFound(graph_id)
        cached = self._graph_cache.get(graph_id)
        if cached is None or cached[0] != row[0]:
            cached = self._graph_cache[graph_id] = (row[0], converter.structure(json.loads(row[1]), GraphDefinition))
        return cached[1]

    def list_graphs(self, *, limit: int = 50, offset: int = 0) -> tuple[list[GraphDefinition], int]:
        """Return a page of graphs in the order they were created, and how many there are."""
        with self._reading() as db:
            rows = self._all(db, "SELECT definition FROM graphs ORDER BY seq LIMIT ? OFFSET ?", (limit, offset))
            total = self._one(db, "SELECT COUNT(*) FROM graphs")[0]
        return [converter.structure(json.loads(row[0]), GraphDefinition) for row in rows], total

    async def claim_run(self, run: RunContext, expected: RunStatus | None, owner: str | None, saved_logs: int = 0,
                        lease_s: float = LEASE_S, origin: str | None = None, room: int | None = None) -> Lease:
        """Commit `run` for `owner` (None: queued for any server) if the stored run is `expected` and has no owner
        (None: there is none yet); return the new lease, or raise RunConflict (RunNotFound) and commit nothing.

        `origin` names the server that accepted the run; with `room`, an active run is refused (Busy) when that
        server already has `room` active runs, counted in the same transaction so simultaneous requests cannot pass.
        """
        values, is_small = await self._encoded(run, saved_logs)
        attempt = await self._write(self._claim, expected, owner, lease_s, origin, room, *values, is_small=is_small)
        return Lease(owner=owner or "", attempt=attempt)

    async def save_run(self, run: RunContext, lease: Lease, saved_logs: int = 0, lease_s: float = LEASE_S) -> None:
        """Commit `run`'s record and its log entries from position `saved_logs` on, in one transaction, if `lease`
        is still the run's (renewing it); else raise LeaseLost and commit nothing."""
        # Unchanged since the last save: the status, and the owner of an active run (its lease names it).
        is_same_status = run.status.is_active and run.history[-1].log_count < saved_logs
        values, is_small = await self._encoded(run, saved_logs)
        await self._write(self._save, lease, lease_s, is_same_status, *values, is_progress=run.status.is_active,
                          is_small=is_small)

    async def claim_next(self, owner: str, lease_s: float = LEASE_S) -> tuple[RunContext, Lease, bool] | None:
        """Take the oldest queued run for `owner`: the run, its lease, and whether someone asked to cancel it; or
        None when none is queued."""
        # Every run that ends wakes the worker to look: a read finds the queue empty without a write transaction.
        if self._read_one(f"SELECT 1 FROM runs WHERE {_QUEUED} LIMIT 1") is None:
            return None
        claimed = await self._write(self._claim_next, owner, lease_s)
        if claimed is None:
            return None
        run_id, attempt, is_cancel_requested = claimed
        return self.get_run(run_id), Lease(owner=owner, attempt=attempt), is_cancel_requested

    async def heartbeat(self, owner: str, leases: Mapping[str, int], lease_s: float = LEASE_S) -> Heartbeat:
        """Renew the leases `owner` holds (run id -> attempt); say which it lost and which runs to cancel."""
        return await self._write(self._heartbeat, owner, dict(leases), lease_s, is_progress=True)

    def expired(self, limit: int = 100) -> list[tuple[RunContext, Lease]]:
        """Active runs whose lease's deadline has passed (their owner stopped renewing), with that lease."""
        rows = self._read_all(f"SELECT run_id, owner, attempt FROM runs WHERE {_IN_ACTIVE} AND owner IS NOT NULL"
                              f" AND lease_until < {self.NOW} ORDER BY seq LIMIT ?", (limit,))
        return [(self.get_run(run_id), Lease(owner=owner, attempt=attempt)) for run_id, owner, attempt in rows]

    async def take_over(self, run: RunContext, lease: Lease, saved_logs: int) -> None:
        """Commit `run` (back in the queue, or ended) if `lease` is still its expired lease; else raise LeaseLost."""
        await self._write(self._take_over, lease, *(await self._encoded(run, saved_logs))[0])

    async def request_cancel(self, run_id: str) -> bool:
        """Flag an active run for its owner to cancel; return False if it is no longer active."""
        return await self._write(self._request_cancel, run_id)

    async def delete_run(self, run_id: str) -> None:
        """Delete a run and its log in one transaction if it is still neither pending nor running and has no owner
        (a resume or a claim committed first wins); else raise RunNotFound, or RunConflict naming its status."""
        await self._write(self._delete_run, run_id)

    async def delete_graph(self, graph_id: str) -> None:
        """Delete a stored graph unless another stored graph runs it or runs of it are pending or running
        (GraphInUse), both checked in the same transaction; raise GraphNotFound."""
        await self._write(self._delete_graph, graph_id)
        self._graph_cache.pop(graph_id, None)

    async def claim_sweep(self, now: datetime | None, every_s: float) -> bool:
        """Take the sweep of this round for this server; False if another server took one less than `every_s`
        ago. The meta row `sweep_until` says when the next round may start, on the database's clock (or `now`)."""
        return await self._write(self._claim_sweep, _epoch(now), every_s)

    async def delete_expired(self, is_paused: bool, ttl_s: float, now: datetime | None, limit: int) -> int:
        """Delete, in one transaction, at most `limit` finished runs (`is_paused`: waiting and interrupted ones)
        that stopped over `ttl_s` before `now` (None: the database's clock), with their logs; return how many."""
        return await self._write(self._delete_expired, is_paused, ttl_s, _epoch(now), limit)

    def count_paused(self) -> int:
        """How many runs are waiting or interrupted."""
        return self._read_one(f"SELECT COUNT(*) FROM runs WHERE {_IN_PAUSED}")[0]

    def has_run(self, run_id: str) -> bool:
        """Whether a run is stored as `run_id`."""
        return self._read_one("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)) is not None

    def get_run(self, run_id: str) -> RunContext:
        """Return a copy of the run stored as `run_id`, or raise RunNotFound."""
        return converter.structure(self._record(run_id), RunContext)

    def get_run_json(self, run_id: str) -> bytes:
        """Return the record of the run stored as `run_id` as JSON, or raise RunNotFound."""
        return dump_json(self._record(run_id))

    def progress(self, run_id: str, logs_from: int) -> tuple[int, list[StatusChange], list[LogEntry]] | None:
        """A run's event count, its history and its log entries from `logs_from` on: what a stream of a run that
        another server executes needs, without its state. None if the run is gone."""
        with self._reading() as db:
            row = self._one(db, "SELECT event_count, history FROM runs WHERE run_id = ?", (run_id,))
            if row is None or row[1] is None:
                return None
            entries = self._all(db, "SELECT entry FROM logs WHERE run_id = ? AND position >= ? ORDER BY position",
                                (run_id, logs_from))
        history = converter.structure(json.loads(row[1]), list[StatusChange])
        return row[0], history, [converter.structure(json.loads(entry), LogEntry) for (entry,) in entries]

    def event_count(self, run_id: str) -> int:
        """How many events (status changes and log entries) a run has; -1 if it is gone."""
        row = self._read_one("SELECT event_count FROM runs WHERE run_id = ?", (run_id,))
        return -1 if row is None else row[0]

    def list_runs(
        self, *, graph_id: str | None = None, status: RunStatus | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[RunSummary], int]:
        """Return a page of run summaries, newest first, that match the filters, and how many match in all."""
        where = "WHERE (CAST(? AS TEXT) IS NULL OR graph_id = ?) AND (CAST(? AS TEXT) IS NULL OR status = ?)"
        status_value = None if status is None else status.value
        values = (graph_id, graph_id, status_value, status_value)
        with self._reading() as db:
            rows = self._all(db, f"SELECT head FROM runs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                             (*values, limit, offset))
            total = self._one(db, f"SELECT COUNT(*) FROM runs {where}", values)[0]
        heads = (json.loads(row[0]) for row in rows)
        return [converter.structure({k: head[k] for k in _SUMMARY_FIELDS}, RunSummary) for head in heads], total

    def counts(self) -> tuple[int, int]:
        """Return how many graphs and runs are stored."""
        with self._reading() as db:
            return self._one(db, "SELECT COUNT(*) FROM graphs")[0], self._one(db, "SELECT COUNT(*) FROM runs")[0]

    def close(self) -> None:
        """Finish pending writes and close the database."""
        self._encoder.shutdown(wait=True)
        self._thread.shutdown(wait=True)
        for db in (self._reader, self._writer, self._here):
            if db is not None:
                db.close()

    # What each database does its own way.
    def _connect(self) -> Any:
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        return statement

    def _begin(self, db: Any, *, write: bool, is_progress: bool = False) -> None:
        """Begin a transaction; `is_progress`: a write transaction of progress writes only (see _write)."""
        db.execute("BEGIN")

    def _sync(self, db: Any) -> None:
        """Wait for the answers to every statement sent on `db` so far (see PostgresStore._transaction)."""

    def _changed(self, db: Any, statement: str, values: tuple) -> int:
        """Execute an UPDATE or DELETE; return how many rows it changed."""
        return db.execute(self._sql(statement), values).rowcount

    def _guard(self, db: Any, statement: str, values: tuple, error: EngineError) -> None:
        """Execute an UPDATE or DELETE that must change a row, else raise `error` (PostgreSQL: before the COMMIT)."""
        if not self._changed(db, statement, values):
            raise error

    def _check(self, db: Any, statement: str, values: tuple, error: EngineError) -> None:
        """Raise `error` unless `statement` returns a row, when _guard would."""
        if self._one(db, statement, values) is None:
            raise error

    # Shared plumbing.
    def _notify(self, db: Any, message: str) -> None:
        """Tell the other servers `message` if the transaction commits (without notifications, they poll)."""

    def _one(self, db: Any, statement: str, values: tuple = ()) -> Any:
        return db.execute(self._sql(statement), values).fetchone()

    def _all(self, db: Any, statement: str, values: tuple = ()) -> list:
        return db.execute(self._sql(statement), values).fetchall()

    # One statement reads one committed state on its own: it needs no transaction (and, on PostgreSQL, no round
    # trips to begin and end one).
    def _read_one(self, statement: str, values: tuple = ()) -> Any:
        return self._one(self._reader, statement, values)

    def _read_all(self, statement: str, values: tuple = ()) -> list:
        return self._all(self._reader, statement, values)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any]:
        # One read transaction, so that related rows come from the same committed state.
        self._begin(self._reader, write=False)
        try:
            yield self._reader
        finally:
            self._reader.execute("COMMIT")

    @contextlib.contextmanager
    def _transaction(self, *, is_progress: bool = False) -> Iterator[Any]:
        self._begin(self._writer, write=True, is_progress=is_progress)
        with self._committing(self._writer) as db:
            yield db

    @contextlib.contextmanager
    def _committing(self, db: Any) -> Iterator[Any]:
        # The rest of a write transaction that has begun on `db`: commit it, or roll it back.
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:  # a commit that fails is undone too, so the next transaction can begin
            with contextlib.suppress(Exception):  # the database may have rolled back already (SQLite on a full disk)
                self._undo(db, "ROLLBACK")
            raise

    def _undo(self, db: Any, statement: str) -> None:
        with contextlib.suppress(Exception):  # a pipeline (PostgreSQL) skips what follows an error until synced
            self._sync(db)
        db.execute(statement)

    async def _write(self, fn: Callable[..., T], *args: Any, is_progress: bool = False, is_small: bool = False) -> T:
        """Return `fn(db, *args)`, called in a transaction that commits before this returns.

        Group commit: writes that arrive together share a transaction (see _commit). Small ones (a few rows of
        little data) commit on the caller's thread if there is a connection for it (see _commit_here), others on
        the writer thread. A small write waits for the end of this turn of the event loop to share it with the
        turn's others (a task that has not written alone, a run starting say, may be one of several), but commits
        at once if none is gathered and its task's last write was alone in its transaction.

        `is_progress` marks a write that no client's answer waits for (an active run's checkpoint, a heartbeat): a
        transaction of such writes only may commit without waiting for the disk (see PostgresStore._begin).
        """
        loop = asyncio.get_running_loop()
        write = _Write(fn=fn, args=args, future=loop.create_future(), is_progress=is_progress)
        if is_small and self._here is not None:
            self._gathered.append(write)
            if len(self._gathered) == 1 and write.task is self._alone:
                self._commit_here()  # answered before the await below, which then does not yield
            elif len(self._gathered) == 1:
                loop.call_soon(self._commit_here)
        else:
            self._hand_over([write])
        return await write.future

    def _settle(self, writes: list[_Write]) -> None:  # a committed (or failed) batch's, on its callers' loop
        self._alone = writes[0].task if len(writes) == 1 else None
        for write in (write for write in writes if not write.future.cancelled()):
            if write.error is None:
                write.future.set_result(write.result)
            else:
                write.future.set_exception(write.error)

    def _hand_over(self, writes: list[_Write]) -> None:
        with self._pending_lock:
            self._pending += writes
            is_idle, self._is_draining = not self._is_draining, True
        if is_idle:
            self._thread.submit(self._drain)

    def _commit_here(self) -> None:
        """Commit the gathered writes on the caller's thread if the writer thread is idle and the write lock free
        at once (a hop to the writer thread and back costs several times a small SQLite transaction); else, or if
        one fails (see _commit), hand them to the writer thread. This never waits: the busy timeout is zero, and
        the writer thread checkpoints the WAL (a disk sync) every HERE_CHECKPOINT_COMMITS commits, alone."""
        batch, self._gathered = [write for write in self._gathered if not write.future.cancelled()], []
        with self._pending_lock:
            is_turn, self._is_draining = not self._is_draining, True  # the writer's turn is this thread's
        is_done = False
        if batch and is_turn and self._begin_here():  # else another process holds the lock: the thread waits
            try:
                with self._committing(self._here) as db:
                    self._apply_all(db, batch)
                is_done = True
            except _WriteFailed:  # the writer thread applies them again, with savepoints
                for write in batch:
                    write.has_failed = True
            except Exception as exc:  # nothing of the batch was committed
                for write in batch:
                    write.error, is_done = exc, True
        self._here_commits += is_done
        is_checkpoint = is_done and self._here_commits % HERE_CHECKPOINT_COMMITS == 0
        if is_turn:
            with self._pending_lock:  # the turn ends, or is the writer thread's if it has work (a checkpoint too)
                self._is_draining = is_busy = is_checkpoint or bool(self._pending)
            if is_busy:
                self._thread.submit(self._drain, is_checkpoint)
        (self._settle if is_done else self._hand_over)(batch)

    def _drain(self, is_checkpoint: bool = False) -> None:
        # On the writer thread: checkpoint if asked to (see _commit_here), then commit batches until no write waits.
        if is_checkpoint:  # SqliteStore._checkpoint logs its failures; the writes go on
            self._checkpoint()
        is_more = True
        while is_more:
            with self._pending_lock:
                batch, self._pending = [write for write in self._pending if not write.future.cancelled()], []
                self._is_draining = bool(batch)
            if not batch:
                return
            self._commit(batch)
            with self._pending_lock:  # before the callers go on: the next small write of theirs finds the turn free
                self._is_draining = is_more = bool(self._pending)
            for loop, writes in itertools.groupby(batch, key=lambda write: write.future.get_loop()):
                with contextlib.suppress(RuntimeError):  # a closed loop: its callers are gone
                    loop.call_soon_threadsafe(self._settle, list(writes))

    def _commit(self, batch: list["_Write"]) -> None:
        # One transaction, the writes one after another. If one of several raises (a lost lease, a conflict), the
        # transaction is undone and the batch applied again with a savepoint for each write, so that it is undone
        # alone and only its caller sees the error. A commit that fails fails every write of its batch.
        is_progress = all(write.is_progress for write in batch)
        try:
            try:
                if any(write.has_failed for write in batch):
                    raise _WriteFailed
                with self._transaction(is_progress=is_progress) as db:
                    self._apply_all(db, batch)
            except _WriteFailed:
                with self._transaction(is_progress=is_progress) as db:
                    for write in batch:
                        self._apply(db, write)
        except Exception as exc:  # nothing of the batch was committed
            for write in batch:
                write.result, write.error = None, exc

    def _apply_all(self, db: Any, batch: list["_Write"]) -> None:
        # Alone in its transaction, a write that raises needs no savepoint to undo: its caller gets the error.
        try:
            for write in batch:
                write.result = write.fn(db, *write.args)
            if len(batch) > 1:
                self._sync(db)  # a failure that the database reports later is still one of the writes'
        except Exception:
            if len(batch) == 1:
                raise
            raise _WriteFailed from None

    def _apply(self, db: Any, write: "_Write") -> None:
        db.execute("SAVEPOINT write")
        try:
            write.result = write.fn(db, *write.args)
            self._sync(db)  # a failure that the database reports later is still this write's
        except Exception as exc:
            write.error = exc
            try:
                self._undo(db, "ROLLBACK TO SAVEPOINT write")
            except Exception:  # the database rolled the whole transaction back (SQLite does on a full disk)
                raise exc from None
        db.execute("RELEASE SAVEPOINT write")

    def _record(self, run_id: str) -> dict[str, Any]:
        with self._reading() as db:
            row = self._one(db, "SELECT head FROM runs WHERE run_id = ?", (run_id,))
            entries = self._all(db, "SELECT entry FROM logs WHERE run_id = ? ORDER BY position", (run_id,))
            delivery = None if row is None else self._webhook_of(db, run_id)
        if row is None:
            raise RunNotFound(run_id)
        return _with_webhook({**json.loads(row[0]), "logs": [json.loads(entry) for (entry,) in entries]}, delivery)

    def _webhook_of(self, db: Any, run_id: str) -> WebhookDelivery | None:
        row = self._one(db, "SELECT url, attempts, delivered_at, last_error FROM webhooks WHERE run_id = ?"
                        " ORDER BY seq DESC LIMIT 1", (run_id,))
        if row is None:
            return None
        delivered_at = None if row[2] is None else datetime.fromisoformat(row[2])
        return WebhookDelivery(url=row[0], attempts=row[1], delivered_at=delivered_at, last_error=row[3])

    def _migrate(self, db: Any) -> None:
        version = int(self._one(db, "SELECT value FROM meta WHERE key = 'schema_version'")[0]) \
            if self._one(db, self.HAS_META) is not None else 0
        if version > len(_MIGRATIONS):
            raise RuntimeError(f"the database has schema version {version}, newer than this code's {len(_MIGRATIONS)}")
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                if not isinstance(statement, str):
                    statement(self, db)
                    continue
                db.execute(statement.format(serial=self.SERIAL, json=self.JSON, without_rowid=self.WITHOUT_ROWID,
                                            now=self.NOW))
        db.execute(self._sql("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value ="
                             " excluded.value"), (str(len(_MIGRATIONS)),))

    def _reserve_key(self, db: Any, key: str, fingerprint: str, run_id: str, token: str, ttl_s: float,
                     reserve_s: float) -> HeldKey | None:
        # The sweeper deletes the other expired keys, a batch at a time.
        db.execute(self._sql(f"DELETE FROM idempotency_keys WHERE idempotency_key = ? AND (expires_at <= {self.NOW}"
                             f" OR accepted = 0 AND reserved_at + ? <= {self.NOW})"), (key, reserve_s))
        row = self._one(db, "SELECT fingerprint, run_id, accepted FROM idempotency_keys WHERE idempotency_key = ?",
                        (key,))
        if row is not None:
            return HeldKey(fingerprint=row[0], run_id=row[1], is_accepted=bool(row[2]))
        db.execute(self._sql("INSERT INTO idempotency_keys (idempotency_key, fingerprint, run_id, token,"
                             f" reserved_at, expires_at) VALUES (?, ?, ?, ?, {self.NOW}, {self.NOW} + ?)"),
                   (key, fingerprint, run_id, token, ttl_s))
        return None

    def _update_key(self, db: Any, statement: str, key: str, token: str) -> None:
        db.execute(self._sql(f"{statement} WHERE idempotency_key = ? AND token = ?"), (key, token))

    def _delete_expired_keys(self, db: Any, now: float | None, limit: int) -> int:
        clock = self._one(db, f"SELECT {self.NOW}")[0] if now is None else now
        expired = self._all(db, "SELECT idempotency_key FROM idempotency_keys WHERE expires_at <= ?"
                            " ORDER BY expires_at LIMIT ?", (clock, limit))
        self._executemany(db, "DELETE FROM idempotency_keys WHERE idempotency_key = ?", expired)
        return len(expired)

    def _claim_webhooks(self, db: Any, owner: str, limit: int, claim_s: float) -> list[WebhookEvent]:
        rows = self._all(db, "SELECT event_id, run_id, url, body, attempts FROM webhooks"
                         f" WHERE next_at <= {self.NOW} AND (owner IS NULL OR claimed_until < {self.NOW})"
                         f" ORDER BY next_at LIMIT ?{self.SKIP_LOCKED}", (limit,))
        self._executemany(db, f"UPDATE webhooks SET owner = ?, claimed_until = {self.NOW} + ? WHERE event_id = ?",
                          [(owner, claim_s, row[0]) for row in rows])
        return [WebhookEvent(event_id=event_id, run_id=run_id, url=url, body=bytes(body), attempts=attempts)
                for event_id, run_id, url, body, attempts in rows]

    def _record_webhook(self, db: Any, event_id: str, run_id: str, owner: str, attempts: int, delivered_at: str | None,
                        last_error: str | None, retry_s: float | None) -> None:
        next_at = "NULL" if retry_s is None else f"{self.NOW} + ?"
        db.execute(self._sql("UPDATE webhooks SET attempts = ?, delivered_at = ?, last_error = ?,"
                             f" next_at = {next_at}, owner = NULL, claimed_until = NULL"
                             " WHERE event_id = ? AND owner = ?"),
                   (attempts, delivered_at, last_error, *(() if retry_s is None else (retry_s,)), event_id, owner))
        if retry_s is None:  # a run keeps its events still to deliver, and its latest one
            db.execute(self._sql("DELETE FROM webhooks WHERE run_id = ? AND next_at IS NULL AND seq <"
                                 " (SELECT MAX(seq) FROM webhooks WHERE run_id = ?)"), (run_id, run_id))

    def _add_webhook(self, db: Any, event: WebhookEvent) -> None:
        db.execute(self._sql("DELETE FROM webhooks WHERE run_id = ? AND next_at IS NULL"), (event.run_id,))
        db.execute(self._sql("INSERT INTO webhooks (event_id, run_id, url, body, next_at)"
                             f" VALUES (?, ?, ?, ?, {self.NOW}) ON CONFLICT (event_id) DO NOTHING"),
                   (event.event_id, event.run_id, event.url, event.body))

    def _delete_with_runs(self, db: Any, ids: list[tuple[str]]) -> None:
        # Everything stored with a run goes with it: its log, its webhook events (delivered or not) and the
        # idempotency keys naming it (a retry of its request starts a new run).
        for table in ("logs", "webhooks", "idempotency_keys", "runs"):
            self._executemany(db, f"DELETE FROM {table} WHERE run_id = ?", ids)

    def _insert_graph(self, db: Any, graph: GraphDefinition, definition: bytes,
                      registered: frozenset[str]) -> bytes | None:
        row = self._one(db, "SELECT definition FROM graphs WHERE graph_id = ?", (graph.graph_id,))
        if row is not None:
            return row[0]
        missing = unknown_graphs(graph, lambda graph_id: graph_id in registered or self._one(
            db, "SELECT 1 FROM graphs WHERE graph_id = ?", (graph_id,)) is not None)
        if missing:  # deleted by another server since the create's validation
            raise InvalidGraph(missing)
        if self._one(db, "SELECT COUNT(*) FROM graphs")[0] >= self.max_graphs:
            raise StoreFull(self.max_graphs)
        db.execute(self._sql("INSERT INTO graphs (graph_id, definition) VALUES (?, ?)"), (graph.graph_id, definition))
        self._executemany(db, _INSERT_REFERENCE, _reference_rows(graph))
        return None

    async def _encoded(self, run: RunContext, saved_logs: int) -> tuple[tuple[Any, ...], bool]:
        # The values of a write of `run`, and whether they are small. A big record is encoded on a thread of its
        # own, so the event loop goes on serving; _off_loop holds a cancelled checkpoint until then, so the runner
        # cannot change the run while the thread reads it.
        if _is_big(run, saved_logs):
            return await _off_loop(self._encoder, self._values, run, saved_logs), False
        return self._values(run, saved_logs), True

    def _values(self, run: RunContext, saved_logs: int) -> tuple[Any, ...]:
        # The writer thread gets values, not the live run, which the event loop may change meanwhile.
        head = self._unstructure_head(run)
        entries = [(run.run_id, position, dump_json(entry))
                   for position, entry in enumerate(_unstructure_logs(run.logs[saved_logs:]), start=saved_logs)]
        history, events = dump_json(head["history"]), len(run.history) + len(run.logs)
        return run.run_id, run.graph_id, run.status, dump_json(head), history, events, entries, webhook_event(run)

    def _claim(self, db: Any, expected: RunStatus | None, owner: str | None, lease_s: float, origin: str | None,
               room: int | None, run_id: str, graph_id: str, status: RunStatus, head: bytes, history: bytes,
               events: int, entries: list[tuple[str, int, bytes]], webhook: WebhookEvent | None) -> int:
        owner = owner if status.is_active else None  # a stopped run has no owner
        # stopped_at, what the sweeper counts a time to live from: now for a stopped run, NULL (NULL + now) if active
        lease, stopped = None if owner is None else lease_s, None if status.is_active else 0
        if room is not None and status.is_active:
            self._check(db, f"SELECT 1 WHERE (SELECT COUNT(*) FROM runs WHERE origin = ? AND {_IN_ACTIVE}) < ?",
                        (origin, room), Busy("too many runs are waiting; retry later"))
        if expected is None:
            attempt = 1
            db.execute(self._sql("INSERT INTO runs (run_id, graph_id, status, owner, attempt, lease_until, head,"
                                 " history, event_count, origin, stopped_at)"
                                 f" VALUES (?, ?, ?, ?, 1, {self.NOW} + ?, ?, ?, ?, ?, {self.NOW} + ?)"),
                       (run_id, graph_id, status.value, owner, lease, head, history, events, origin, stopped))
        else:
            row = self._one(db, "SELECT status, attempt, owner FROM runs WHERE run_id = ?", (run_id,))
            if row is None:
                raise RunNotFound(run_id)
            if row[0] != expected.value or row[2] is not None:
                raise _refused(run_id, RunStatus(row[0]), status)
            attempt = row[1] + 1
            db.execute(self._sql(f"UPDATE runs SET status = ?, owner = ?, attempt = ?, lease_until = {self.NOW} + ?,"
                                 " cancel_requested = 0, head = ?, history = ?, event_count = ?,"
                                 f" origin = COALESCE(?, origin), stopped_at = {self.NOW} + ? WHERE run_id = ?"),
                       (status.value, owner, attempt, lease, head, history, events, origin, stopped, run_id))
        self._add_logs(db, run_id, status, entries, webhook, queued=owner is None and status.is_active,
                       was_finished=expected is not None and expected.is_terminal)
        return attempt

    def _save(self, db: Any, lease: Lease, lease_s: float, is_same_status: bool, run_id: str, graph_id: str,
              status: RunStatus, head: bytes, history: bytes, events: int, entries: list[tuple[str, int, bytes]],
              webhook: WebhookEvent | None) -> None:
        # A checkpoint that leaves the status and owner alone does not name them: SQLite rewrites the index entries
        # of every column an UPDATE sets, changed or not (four times the cost of the rest of the statement).
        if is_same_status and self.IS_NARROW_CHECKPOINT and self._changed(
                db, f"UPDATE runs SET lease_until = {self.NOW} + ?, head = ?, event_count = ? WHERE run_id = ?"
                " AND owner = ? AND attempt = ? AND status = ?",
                (lease_s, head, events, run_id, lease.owner, lease.attempt, status.value)):
            self._add_logs(db, run_id, status, entries, webhook)
            return
        owner = lease.owner if status.is_active else None
        self._guard(db, f"UPDATE runs SET status = ?, owner = ?, lease_until = {self.NOW} + ?, head = ?, history = ?,"
                    f" event_count = ?, stopped_at = {self.NOW} + ? WHERE run_id = ? AND owner = ? AND attempt = ?",
                    (status.value, owner, lease_s if owner else None, head, history, events,
                     None if status.is_active else 0, run_id, lease.owner, lease.attempt), LeaseLost(run_id))
        self._add_logs(db, run_id, status, entries, webhook)

    def _take_over(self, db: Any, lease: Lease, run_id: str, graph_id: str, status: RunStatus, head: bytes,
                   history: bytes, events: int, entries: list[tuple[str, int, bytes]],
                   webhook: WebhookEvent | None) -> None:
        values = (status.value, head, history, events, None if status.is_active else 0, run_id, lease.owner,
                  lease.attempt)
        self._guard(db, f"UPDATE runs SET status = ?, owner = NULL, lease_until = NULL, head = ?, history = ?,"
                    f" event_count = ?, stopped_at = {self.NOW} + ? WHERE run_id = ? AND owner = ? AND attempt = ?"
                    f" AND lease_until < {self.NOW}", values, LeaseLost(run_id))
        self._add_logs(db, run_id, status, entries, webhook, queued=status.is_active)

    def _claim_next(self, db: Any, owner: str, lease_s: float) -> tuple[str, int, bool] | None:
        row = self._one(db, f"SELECT run_id, attempt, cancel_requested FROM runs WHERE {_QUEUED}"
                        f" ORDER BY seq LIMIT 1{self.SKIP_LOCKED}")
        if row is None:
            return None
        db.execute(self._sql(f"UPDATE runs SET owner = ?, attempt = ?, lease_until = {self.NOW} + ?"
                             " WHERE run_id = ?"), (owner, row[1] + 1, lease_s, row[0]))
        return row[0], row[1] + 1, bool(row[2])

    def _heartbeat(self, db: Any, owner: str, leases: dict[str, int], lease_s: float) -> Heartbeat:
        db.execute(self._sql(f"UPDATE runs SET lease_until = {self.NOW} + ? WHERE owner = ? AND {_IN_ACTIVE}"),
                   (lease_s, owner))
        held = {run_id: (attempt, flag) for run_id, attempt, flag in self._all(
            db, f"SELECT run_id, attempt, cancel_requested FROM runs WHERE owner = ? AND {_IN_ACTIVE}", (owner,))}
        lost = tuple(run_id for run_id, attempt in leases.items() if held.get(run_id, (None,))[0] != attempt)
        return Heartbeat(lost=lost, cancel_requested=tuple(run_id for run_id, (_, flag) in held.items() if flag))

    def _request_cancel(self, db: Any, run_id: str) -> bool:
        updated = self._changed(db, f"UPDATE runs SET cancel_requested = 1 WHERE run_id = ? AND {_IN_ACTIVE}",
                                (run_id,))
        self._notify(db, f"cancel {run_id}")
        return updated > 0

    def _delete_run(self, db: Any, run_id: str) -> None:
        row = self._one(db, "SELECT status FROM runs WHERE run_id = ?", (run_id,))
        if row is None:
            raise RunNotFound(run_id)
        self._guard(db, f"DELETE FROM runs WHERE run_id = ? AND NOT {_IN_ACTIVE} AND owner IS NULL", (run_id,),
                    _delete_refused(run_id, RunStatus(row[0])))
        self._delete_with_runs(db, [(run_id,)])
        if RunStatus(row[0]).is_terminal:
            self._count_finished(db, -1)
        self._notify(db, f"run {run_id}")

    def _delete_graph(self, db: Any, graph_id: str) -> None:
        if self._one(db, "SELECT 1 FROM graphs WHERE graph_id = ?", (graph_id,)) is None:
            raise GraphNotFound(graph_id)
        referrer = self._one(db, "SELECT g.graph_id, r.node FROM graph_references r JOIN graphs g ON g.graph_id ="
                             " r.graph_id WHERE r.referenced = ? AND r.graph_id <> ? ORDER BY g.seq, r.position"
                             " LIMIT 1", (graph_id, graph_id))
        if referrer is not None:
            raise GraphInUse(graph_id, _runs_it(referrer))
        active = self._one(db, f"SELECT COUNT(*) FROM runs WHERE graph_id = ? AND {_IN_ACTIVE}", (graph_id,))[0]
        if active:
            raise GraphInUse(graph_id, _active_runs(active))
        db.execute(self._sql("DELETE FROM graphs WHERE graph_id = ?"), (graph_id,))
        db.execute(self._sql("DELETE FROM graph_references WHERE graph_id = ?"), (graph_id,))

    def _claim_sweep(self, db: Any, now: float | None, every_s: float) -> bool:
        # Writes are serialized (SQLite's write lock, PostgreSQL's advisory lock), so one server wins each round.
        clock = self._one(db, f"SELECT {self.NOW}")[0] if now is None else now
        row = self._one(db, "SELECT value FROM meta WHERE key = 'sweep_until'")
        if row is not None and float(row[0]) > clock:
            return False
        db.execute(self._sql("INSERT INTO meta VALUES ('sweep_until', ?) ON CONFLICT (key) DO UPDATE SET value ="
                             " excluded.value"), (repr(clock + every_s),))
        return True

    def _delete_expired(self, db: Any, is_paused: bool, ttl_s: float, now: float | None, limit: int) -> int:
        clock = self._one(db, f"SELECT {self.NOW}")[0] if now is None else now
        expired = self._all(db, f"SELECT run_id FROM runs WHERE {_IN_PAUSED if is_paused else _IN_TERMINAL}"
                            " AND owner IS NULL AND stopped_at < ? ORDER BY stopped_at LIMIT ?", (clock - ttl_s, limit))
        self._delete_with_runs(db, expired)
        if not is_paused:
            self._count_finished(db, -len(expired))
        return len(expired)

    def _add_logs(self, db: Any, run_id: str, status: RunStatus, entries: list[tuple[str, int, bytes]],
                  webhook: WebhookEvent | None = None, *, queued: bool = False, was_finished: bool = False) -> None:
        self._executemany(db, "INSERT INTO logs (run_id, position, entry) VALUES (?, ?, ?)"
                          " ON CONFLICT (run_id, position) DO UPDATE SET entry = excluded.entry", entries)
        if webhook is not None:  # in the transaction of the stop itself: a crash cannot lose it
            self._add_webhook(db, webhook)
        if status.is_terminal and not was_finished:
            self._evict(db, self._count_finished(db, 1))
        self._notify(db, f"run {run_id}")
        if queued:
            self._notify(db, "queue")

    def _executemany(self, db: Any, statement: str, rows: list[tuple]) -> None:
        if rows:  # on a cursor: a psycopg connection has no executemany
            db.cursor().executemany(self._sql(statement), rows)

    def _count_finished(self, db: Any, change: int) -> int:
        """Add `change` to the count of finished runs (in meta); return the new count. No `RETURNING`: the SQLite
        that Python 3.11 links on older systems (before 3.35) has none."""
        if change:
            db.execute(self._sql("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + ? AS TEXT)"
                                 " WHERE key = 'finished_runs'"), (change,))
        return int(self._one(db, "SELECT value FROM meta WHERE key = 'finished_runs'")[0])

    def _evict(self, db: Any, finished: int) -> None:
        """Delete the oldest finished runs beyond max_runs, of the `finished` stored: the index of finished runs
        finds them without reading the others."""
        excess = finished - self.max_runs
        if excess > 0:
            oldest = f"SELECT run_id FROM {self.FINISHED_RUNS} WHERE {_IN_TERMINAL} ORDER BY seq LIMIT ?"
            for table in ("logs", "webhooks", "idempotency_keys", "runs"):  # as _delete_with_runs
                db.execute(self._sql(f"DELETE FROM {table} WHERE run_id IN ({oldest})"), (excess,))
            self._count_finished(db, -excess)


class SqliteStore(SqlStore):
    """The SQL store in a SQLite file (WAL), which every process on this machine that names it shares."""

    NOW = "((julianday('now') - 2440587.5) * 86400.0)"
    SERIAL = "INTEGER PRIMARY KEY AUTOINCREMENT"
    JSON = "TEXT"
    WITHOUT_ROWID = " WITHOUT ROWID"
    FINISHED_RUNS = "runs INDEXED BY runs_finished"  # else the planner reads runs_by_stop and sorts every finished run
    # WAL + NORMAL: a commit is in the WAL file before the caller hears of it, so a crashed or killed process loses
    # nothing committed; a power loss or OS crash may lose the last commits (never the file's consistency). FULL
    # syncs the WAL at every commit, which power loss cannot undo, at the cost measured by tools/bench.py.
    SYNCHRONOUS = "NORMAL"
    HAS_META = "SELECT 1 FROM sqlite_master WHERE name = 'meta'"

    def __init__(self, path: str | os.PathLike[str], *, max_runs: int = MAX_STORED_RUNS,
                 max_graphs: int = MAX_STORED_GRAPHS) -> None:
        self.path = str(path)
        super().__init__(max_runs=max_runs, max_graphs=max_graphs)
        self._here = self._connect()  # for small writes on the caller's thread, which never wait (see _commit_here)
        self._here.execute("PRAGMA busy_timeout = 0")  # refused at once when another process writes
        self._here.execute("PRAGMA wal_autocheckpoint = 0")  # the writer thread checkpoints (see _commit_here)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=SQLITE_BUSY_TIMEOUT_S)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.SYNCHRONOUS}")
        return db

    def _begin(self, db: sqlite3.Connection, *, write: bool, is_progress: bool = False) -> None:
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")  # a writer takes the lock first: no deadlocks

    def _begin_here(self) -> bool:
        try:
            self._here.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # "database is locked"
            return False
        return True

    def _checkpoint(self) -> None:
        """Copy the WAL's committed pages into the database (see _commit_here), without waiting for readers; a
        complete checkpoint lets the next write start the WAL file over."""
        try:
            self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as exc:  # the next one may succeed; meanwhile the WAL grows
            logger.warning("SQLite checkpoint of %s failed: %s", self.path, exc)


class PostgresStore(SqlStore):
    """The SQL store in a PostgreSQL database, which servers on many machines share (psycopg 3).

    Every committed change sends a notification, so other servers' streams and idle workers wake at once; one
    listening connection per process (`listen`) serves them all.
    """

    NOW = "extract(epoch from clock_timestamp())::double precision"
    SERIAL = "BIGSERIAL PRIMARY KEY"
    JSON = "BYTEA"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    IS_NARROW_CHECKPOINT = False  # an UPDATE that sets a column to its value costs nothing; a read first would wait
    HAS_META = "SELECT 1 FROM information_schema.tables WHERE table_name = 'meta' AND table_schema = current_schema()"

    def __init__(self, url: str, *, max_runs: int = MAX_STORED_RUNS, max_graphs: int = MAX_STORED_GRAPHS) -> None:
        self.url = url
        import psycopg  # only a PostgreSQL store needs it, so the single file runs without it  # noqa: PLC0415
        self._psycopg = psycopg
        self._pipeline: Any = None  # the writer's, during a write transaction (see _transaction)
        self._checks: list[tuple[Any, EngineError]] = []  # the transaction's, not yet read (see _check)
        self._messages: list[str] = []  # the transaction's notifications, not yet sent (see _notify)
        super().__init__(max_runs=max_runs, max_graphs=max_graphs)

    def listen(self, on_message: Callable[[str], None], stop: threading.Event) -> None:
        """Call `on_message(payload)` for every notification until `stop` is set (blocking: run it in a thread)."""
        with self._psycopg.connect(self.url, autocommit=True) as db:
            db.execute(f"LISTEN {_CHANNEL}")
            while not stop.is_set():
                for notification in db.notifies(timeout=0.5):
                    on_message(notification.payload)

    def _connect(self) -> Any:
        return self._psycopg.connect(self.url, autocommit=True)

    @functools.cache  # noqa: B019  # a few constant statements
    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    @contextlib.contextmanager
    def _transaction(self, *, is_progress: bool = False) -> Iterator[Any]:
        # In pipeline mode, statements go without waiting for each other's answers: only a read (a count) and the
        # end wait, for the answers so far. The checks (the leases' guards) are read at the end, before the COMMIT,
        # all at once: a batch of checkpoints takes two round trips, however many it holds.
        self._checks, self._messages = [], []
        try:
            with self._writer.pipeline() as self._pipeline, super()._transaction(is_progress=is_progress) as db:
                yield db
        finally:  # an error that the pipeline's end reported: the pipeline skipped what followed it, the ROLLBACK too
            if self._writer.info.transaction_status is self._psycopg.pq.TransactionStatus.INERROR:
                self._writer.execute("ROLLBACK")

    @contextlib.contextmanager
    def _committing(self, db: Any) -> Iterator[Any]:
        with super()._committing(db):
            yield db
            self._send_messages(db)
            self._checked()  # before the COMMIT, which the pipeline would send with them

    def _begin(self, db: Any, *, write: bool, is_progress: bool = False) -> None:
        # One writer at a time on every server, for the rules that count rows (graphs, a server's room, the finished
        # runs, the queue's order, migrations), taken first so no two transactions wait for each other's rows. A commit
        # is on disk before its callers hear of it, but for one of progress writes only: a database crash that loses
        # the last of those sends their runs back to an earlier step, as a crash of their server does.
        db.execute("BEGIN")
        if write:
            db.execute("SELECT pg_advisory_xact_lock(7261), set_config('synchronous_commit', %s, true)",
                       ("off" if is_progress else "on",))

    def _notify(self, db: Any, message: str) -> None:
        # Sent with the others of its write or batch, before the COMMIT (see _send_messages), each message once; a
        # write undone to its savepoint drops its own (with savepoints, every write's are sent before its sync).
        self._messages.append(message)

    def _send_messages(self, db: Any) -> None:
        # The notifications of every write so far, in one statement: a batch's writes send theirs together. One
        # parameter each (psycopg converts a statement of up to 50 once; an array parameter costs more calls).
        if self._messages:
            db.execute("SELECT " + ", ".join([f"pg_notify('{_CHANNEL}', %s)"] * len(self._messages)), self._messages)
            self._messages = []

    def _sync(self, db: Any) -> None:
        self._send_messages(db)
        self._pipeline.sync()
        self._checked()

    def _changed(self, db: Any, statement: str, values: tuple) -> int:
        # Read back: in the pipeline a row count is known only once the statement's answer has come.
        return len(self._all(db, f"{statement} RETURNING 1", values))

    def _guard(self, db: Any, statement: str, values: tuple, error: EngineError) -> None:
        self._check(db, f"{statement} RETURNING 1", values, error)

    def _check(self, db: Any, statement: str, values: tuple, error: EngineError) -> None:
        # Its answer is read with the others of its write, or of its batch (see _checked): no wait of its own.
        self._checks.append((db.execute(self._sql(statement), values), error))

    def _checked(self) -> None:
        # Raise the error of the first check that returned no row (waiting for answers not yet come); forget them.
        checks, self._checks = self._checks, []
        for cursor, error in checks:
            if cursor.fetchone() is None:
                raise error


def open_store(url: str, *, max_runs: int = MAX_STORED_RUNS, max_graphs: int = MAX_STORED_GRAPHS) -> SqlStore:
    """The store a WORKFLOW_DB value names: `postgresql://...` (or `postgres://`), `sqlite:///path`, or a path."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, max_runs=max_runs, max_graphs=max_graphs)
    return SqliteStore(url.removeprefix("sqlite:///"), max_runs=max_runs, max_graphs=max_graphs)


Store = MemoryStore | SqlStore


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------
# Counting costs the runner's step loop nothing: the engine counts a run when it starts and when it stops here, and
# the run's steps once, at its stop, from its log. Label values are bounded: graphs past `max_graphs` (and their
# nodes) share OTHER_LABEL. The page is the Prometheus text format, written here with the standard library.
@enum.unique
class MetricKind(enum.Enum):
    """What a metric family is, as its `# TYPE` line says."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


Labels = tuple[Any, ...]  # one series' label values: strings, numbers, or enums (written as their value)
_BUCKETS = len(METRIC_BUCKETS_S)
_SECOND = timedelta(seconds=1)  # a timedelta divided by it is its seconds, without total_seconds()'s call


def _new_series() -> list[float]:
    """A histogram series: a count per bucket (not cumulative; the last is +Inf), then the sum."""
    return [0] * (_BUCKETS + 1) + [0.0]


@attrs.define
class _Family:
    """One metric family: a number per series of label values, or for a histogram a list from `_new_series`."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    samples: dict[Labels, Any] = attrs.field(factory=dict)

    # Neither calls a function (the bisect is a linear scan): the engine counts every run's start and stop here.
    def add(self, values: Labels = (), amount: float = 1) -> None:
        self.samples[values] = self.samples[values] + amount if values in self.samples else amount

    def observe(self, values: Labels, seconds: float) -> None:
        series = self.samples[values] if values in self.samples else self.samples.setdefault(values, _new_series())
        bucket = 0
        while bucket < _BUCKETS and seconds > METRIC_BUCKETS_S[bucket]:
            bucket += 1
        series[bucket] += 1
        series[-1] += seconds

    def lines(self) -> Iterator[str]:
        """The family's `# HELP` and `# TYPE` lines, then its samples, series sorted by their labels."""
        yield f"# HELP {self.name} {_escaped(self.help)}"
        yield f"# TYPE {self.name} {self.kind.value}"
        series = sorted(((_label_pairs(self.labels, values), value) for values, value in self.samples.items()),
                        key=lambda pair: pair[0])
        for labels, value in series:
            if self.kind is not MetricKind.HISTOGRAM:
                yield f"{self.name}{_label_text(labels)} {_number(value)}"
                continue
            for bound, count in zip((*METRIC_BUCKETS_S, math.inf), itertools.accumulate(value[:-1]), strict=True):
                yield f"{self.name}_bucket{_label_text((*labels, ('le', _number(float(bound)))))} {count}"
            yield f"{self.name}_sum{_label_text(labels)} {_number(value[-1])}"
            yield f"{self.name}_count{_label_text(labels)} {sum(value[:-1])}"


def _label_pairs(names: tuple[str, ...], values: Labels) -> tuple[tuple[str, str], ...]:
    return tuple((name, value.value if isinstance(value, enum.Enum) else str(value))
                 for name, value in zip(names, values, strict=True))


def _escaped(text: str, quote: str = "") -> str:
    """`text` as the text format writes it: backslash and newline escaped (and `quote`, in a label value)."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace(quote, "\\" + quote) if quote else text


def _label_text(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(name + '="' + _escaped(value, '"') + '"' for name, value in pairs) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return ("+Inf" if value > 0 else "-Inf") if math.isinf(value) else repr(value)


class Metrics:
    """This process's counters and histograms: the engine counts into them, `page()` writes them for Prometheus.

    Graph ids get a label value of their own in the order this process first counts them, up to `max_graphs`;
    later graphs, and their nodes, share OTHER_LABEL, so the page stays small whatever the number of graphs.
    """

    def __init__(self, max_graphs: int = MAX_METRIC_GRAPHS) -> None:
        self.max_graphs = max_graphs
        self._graphs: set[str] = set()
        counter, histogram = MetricKind.COUNTER, MetricKind.HISTOGRAM
        self.runs_started = _Family("workflow_runs_started_total", counter, "Runs that started executing in this "
                                    "process: new, resumed, claimed from the queue or taken over", ("graph_id",))
        self.runs_finished = _Family("workflow_runs_finished_total", counter, "Runs that stopped in this process, "
                                     "by the status they stopped in (waiting: paused)", ("graph_id", "status"))
        self.steps = _Family("workflow_steps_total", counter, "Log entries the runner wrote in this process, by "
                             "event", ("graph_id", "event"))
        self.recoveries = _Family("workflow_recoveries_total", counter, "Runs this process took over from a server "
                                  "that stopped renewing its lease", samples={(): 0})
        self.store_errors = _Family("workflow_store_errors_total", counter, "Store operations that failed in this "
                                    "process", samples={(): 0})
        self.webhook_deliveries = _Family("workflow_webhook_deliveries_total", counter, "Completion webhook "
                                          "attempts this process made, by result (failed: to be retried; abandoned: "
                                          "the last attempt failed)", ("result",))
        self.http_requests = _Family("workflow_http_requests_total", counter, "HTTP requests and WebSocket "
                                     "handshakes, by route template and status (499: the client went away first)",
                                     ("route", "status"))
        self.run_seconds = _Family("workflow_run_duration_seconds", histogram, "How long runs executed here, from "
                                   "running until they stopped (ended or paused)", ("graph_id",))
        self.queue_seconds = _Family("workflow_run_queue_seconds", histogram, "How long runs that started here "
                                     "were pending before they ran", ("graph_id",))
        self.step_seconds = _Family("workflow_step_duration_seconds", histogram, "How long each step executed here "
                                    "took", ("graph_id", "node"))

    def graph_label(self, graph_id: str) -> str:
        """The label value of `graph_id`: itself while there is room for it, else OTHER_LABEL."""
        if graph_id in self._graphs:
            return graph_id
        if len(self._graphs) < self.max_graphs:
            self._graphs.add(graph_id)
            return graph_id
        return OTHER_LABEL

    def count_start(self, run: RunContext) -> int:
        """Count a run that has just moved to running, and its time pending (from its history); return where in
        its history that move is."""
        graph = self.graph_label(run.graph_id)
        self.runs_started.add((graph,))
        self.queue_seconds.observe((graph,), (run.history[-1].at - run.history[-2].at) / _SECOND)
        return len(run.history) - 1

    def count_stop(self, run: RunContext, started: int, *, is_lost: bool = False) -> None:
        """Count a run that stopped here: its status, and if it ran (`started` is what count_start returned, else
        -1) its running time and its steps since. A run whose lease another server took (`is_lost`) has its steps
        counted only: the new owner counts how it ends."""
        graph = self.graph_label(run.graph_id)
        if started >= 0:
            self._count_steps(graph, run.logs[run.history[started].log_count:])
        if is_lost:
            return
        self.runs_finished.add((graph, run.status))
        if started >= 0:
            self.run_seconds.observe((graph,), (run.history[-1].at - run.history[started].at) / _SECOND)

    def _count_steps(self, graph: str, entries: list[LogEntry]) -> None:
        # Nothing here calls a function, once per step or once per event: a LogEvent hashes in C (see its __hash__),
        # `add` and `observe` are inlined.
        steps, durations, bounds = self.steps.samples, self.step_seconds.samples, METRIC_BUCKETS_S
        for entry in entries:
            step_key = (graph, entry.event)
            steps[step_key] = steps[step_key] + 1 if step_key in steps else 1
            series_key = (graph, OTHER_LABEL if graph == OTHER_LABEL else entry.node)
            if series_key not in durations:  # once per node, not per step
                durations[series_key] = _new_series()
            series, seconds, bucket = durations[series_key], entry.duration_ms / 1000, 0
            while bucket < _BUCKETS and seconds > bounds[bucket]:
                bucket += 1
            series[bucket] += 1
            series[-1] += seconds

    def count_takeover(self, run: RunContext) -> None:
        """Count a run taken over from a server whose lease expired; one failed for too many recoveries ends here."""
        self.recoveries.add()
        if run.status.is_terminal:
            self.runs_finished.add((self.graph_label(run.graph_id), run.status))

    def count_store_error(self) -> None:
        """Count a store operation that failed."""
        self.store_errors.add()

    def count_webhook(self, result: WebhookResult) -> None:
        """Count an attempt to deliver a webhook."""
        self.webhook_deliveries.add((result,))

    def count_request(self, route: str, status: int) -> None:
        """Count an answered HTTP request or WebSocket handshake."""
        self.http_requests.add((route, status))

    def page(self, *, active: int, pending: int, paused: int | None) -> str:
        """The metrics in the Prometheus text format, with the gauges given (None: leave the sample out)."""
        gauge = MetricKind.GAUGE
        gauges = (
            _Family("workflow_runs_active", gauge, "Runs executing in this process", samples={(): active}),
            _Family("workflow_runs_pending", gauge, "Runs this process holds that wait for an execution slot",
                    samples={(): pending}),
            _Family("workflow_runs_paused", gauge, "Runs waiting or interrupted in the store (every server on one "
                    "store shows the same number)", samples={} if paused is None else {(): paused}),
        )
        families = (self.runs_started, self.runs_finished, self.steps, self.recoveries, self.store_errors,
                    self.webhook_deliveries, self.http_requests, *gauges, self.run_seconds, self.queue_seconds,
                    self.step_seconds)
        return "".join(line + "\n" for family in families for line in family.lines())


# ---------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------
# A run this engine executes has one record, `_ActiveRun`, from its launch until its task has saved it for the last
# time. That task is the only code that changes the run; it claims the run from the store first, and releases the
# record in its own `finally`, after the last save. Everything else (cancel, resume, streams, shutdown) asks it.
# Webhooks never hold up a run: the store keeps each event with the run's stop, and a task of their own sends them.
def sign_webhook(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` of Standard Webhooks: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`,
    keyed with `secret` (a `whsec_` secret is the base64 of the key's bytes, any other is its UTF-8)."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    digest = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def post_webhook(event: WebhookEvent, secret: str | None, timeout_s: float = WEBHOOK_TIMEOUT_S) -> str | None:
    """POST `event` to its URL (blocking: call it on a thread); return None if the receiver answered 2xx, else why
    the attempt failed. A redirect is a failed attempt: it is never followed."""
    parts, timestamp = urllib.parse.urlsplit(event.url), int(time.time())
    headers = {"content-type": "application/json", "user-agent": "workflow_engine", "webhook-id": event.event_id,
               "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign_webhook(secret, event.event_id, timestamp, event.body)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname or "", parts.port, timeout=timeout_s)
    try:
        connection.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), event.body,
                           headers)
        answer = connection.getresponse()
        answer.read(WEBHOOK_ANSWER_BYTES)
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except (OSError, http.client.HTTPException) as exc:
        return f"could not deliver: {_describe(exc)}"
    finally:
        connection.close()
    if 200 <= answer.status < 300:
        return None
    redirect = " (redirects are not followed)" if 300 <= answer.status < 400 else ""
    return f"the receiver answered {answer.status}{redirect}"


async def _stored(metrics: Metrics, run_id: str, write: Awaitable[T]) -> T:
    """Await a store's write; a failure of the store itself (not an EngineError) is counted, as StoreUnavailable."""
    try:
        return await write
    except EngineError:
        raise
    except Exception as exc:
        metrics.count_store_error()
        raise StoreUnavailable(run_id, exc) from exc


# As the runner's ChangeHook, its `call` is `notify` while something needs the run's changes (see notify).
@attrs.define(eq=False, kw_only=True)
class _ActiveRun(ChangeHook):
    run: RunContext
    graph: GraphDefinition
    expected: RunStatus | None  # the stored status the task claims the run from; None for a new run
    saved_logs: int  # how many of the run's log entries the store holds
    metrics: Metrics
    # Made only for who waits: the caller of a run launched in a task of its own (done once the store holds the
    # claim, or refused it), and waiters for the run to stop (done once the record is released, after its last save).
    accepted: asyncio.Future[None] | None = None
    stopped: asyncio.Future[None] | None = None
    is_accepted: bool = False  # the store holds the claim: from now on a cancel cancels the task
    task: asyncio.Task[Any] | None = None  # the task executing the run: its own, or the caller's for a waited run
    cancels: int = 0  # times `cancel` cancelled the task: those CancelledErrors end in the task, any other goes on
    lease: Lease | None = None
    failure: EngineError | None = None  # set when the store does not hold the run's last state
    changed: asyncio.Event | None = None  # set (and dropped) at the run's next change; streams wait on it
    logged: int = -1  # log entries written to the server log; -1 until the run's start is logged
    started: int = -1  # where in the run's history it moved to running here (see count_start); -1 until then
    is_cancel_requested: bool = False
    has_slot: bool = False  # whether the run holds one of the engine's max_concurrent_runs execution slots
    is_logging: bool = False  # the server log takes the run's progress (debug): asked once per run, not per step

    def cancel(self) -> None:
        """Cancel the run's task, unless it is in its first or last save: those are never cut short."""
        self.is_cancel_requested = True
        if self.is_accepted and self.run.status.is_active and self.task is not None:
            self.task.cancel()
            self.cancels += 1

    def notify(self, run: RunContext) -> None:
        """Wake the run's streams, count its start and log its progress (the runner's on_change, while set); unset
        the hook once nothing needs the next change: a stream sets it again (see _events)."""
        if self.changed is not None:
            self.changed.set()
            self.changed = None
        if self.started < 0 and run.status is RunStatus.RUNNING:  # its first change here: it has just started
            self.started = self.metrics.count_start(run)
        if self.is_logging:
            self.log_progress()
        elif self.started >= 0:
            self.call = None

    def log_progress(self) -> None:
        """Log the run's start and each of its new steps (debug), with fields a log store can index."""
        run = self.run
        ids = {"run_id": run.run_id, "graph_id": run.graph_id}
        if self.logged < 0:
            self.logged = len(run.logs)
            logger.debug("run %s of graph %s started", run.run_id, run.graph_id,
                         extra={"fields": {"event": "run_started", **ids}})
        for entry in run.logs[self.logged:]:
            fields = {"event": "step", **ids, "node": entry.node, "iteration": entry.iteration,
                      "step": entry.event.value, "duration_ms": round(entry.duration_ms, 3), "error": entry.error}
            logger.debug("run %s step %d: %s %s", run.run_id, entry.iteration, entry.node, entry.event.value,
                         extra={"fields": fields})
        self.logged = len(run.logs)

    def log_end(self) -> None:
        """Log the steps not logged yet (debug) and how the run stopped (info)."""
        run = self.run
        if self.is_logging:
            self.log_progress()
        fields = {"event": "run_finished", "run_id": run.run_id, "graph_id": run.graph_id, "status": run.status.value,
                  "iteration": run.iteration, "duration_ms": round(run.duration_ms, 3), "error": run.error}
        logger.info("run %s finished: %s", run.run_id, run.status.value, extra={"fields": fields})


async def _in_batches(delete: Callable[[int], Awaitable[int]], batch: int) -> int:
    """Call `delete(batch)` until it deletes fewer than `batch`; return how many it deleted in all."""
    deleted, count = 0, batch
    while count == batch:
        count = await delete(batch)
        deleted += count
        await asyncio.sleep(0)  # between a memory store's slices, the event loop serves everything else
    return deleted


class Engine:
    """The core the HTTP layer calls: it validates and stores graphs, and starts, tracks, streams and cancels runs.

    Graphs registered in code (`registry.add_graph`) are always available and never stored. Every run executes in a
    task of its own, or in its caller's when the caller waits for it (`wait`), and the engine keeps its record until
    it ends; at most `settings.max_concurrent_runs` execute at once, the rest wait as
    `pending`, and with `settings.max_pending_runs` waiting a new run is refused (Busy). `worker_id` names this
    engine in the store's leases (default: `settings.worker_id`, else host, pid and a random suffix).
    """

    def __init__(self, registry: Registry, store: Store | None = None, settings: Settings | None = None, *,
                 worker_id: str | None = None) -> None:
        self.registry = registry
        self.settings = settings or Settings()
        self.store = store or MemoryStore(max_runs=self.settings.max_runs, max_graphs=self.settings.max_graphs)
        self.worker_id = worker_id or self.settings.worker_id or worker_name()
        self._builtin = {graph.graph_id or "": graph for graph in registry.graphs}
        for graph in registry.graphs:  # all known first: a registered graph may run one registered after it
            validate_graph(graph, registry, limits=self.settings, graphs=self.find_graph)
        self._slots = asyncio.Semaphore(self.settings.max_concurrent_runs)  # first come, first served
        self._room = self.settings.max_concurrent_runs + self.settings.max_pending_runs  # runs this engine holds
        self._active: dict[str, _ActiveRun] = {}  # the runs this engine executes, by run id
        # The failures released runs stopped with, for a late `wait`: by id(record), each dropped with its record.
        self._failures: dict[int, tuple[weakref.ref[RunContext], EngineError]] = {}
        self._draining: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None  # with a shared store: claims queued runs, keeps leases
        self._sweeper: asyncio.Task[None] | None = None  # deletes expired runs and idempotency keys
        self._deliverer: asyncio.Task[None] | None = None  # with webhook hosts: sends webhooks as they come due
        self._webhooks_due = asyncio.Event()  # a run with a webhook stopped here, or the engine stops
        self._wake = asyncio.Event()  # a run was queued, a slot came free, or the store says something changed
        self._followers: dict[str, set[asyncio.Event]] = {}  # streams of runs that another server executes
        self._stopping = threading.Event()  # set to stop the worker and the thread that listens to the store
        self._listener: threading.Thread | None = None
        self.metrics = Metrics(self.settings.max_metric_graphs)
        self._branches = Branches(find_graph=self.find_graph, max_fanout=self.settings.max_fanout,
                                  max_iterations=self.settings.max_iterations)

    async def open(self) -> None:
        """Start the sweeper, the webhook deliverer if webhook hosts are set (it resumes a durable store's pending
        deliveries) and, with a shared store, start working the queue and keeping leases (create_app's lifespan calls
        this; a run started here calls it too)."""
        if self._draining is not None:
            return
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_often(), name=f"sweeper {self.worker_id}")
        self._deliver_soon()
        if self._worker is not None or not self.store.is_shared:
            return
        self._worker = asyncio.create_task(self._work(), name=f"worker {self.worker_id}")
        listen = getattr(self.store, "listen", None)
        if listen is not None:
            loop = asyncio.get_running_loop()
            self._listener = threading.Thread(target=listen, name="workflow-listen", daemon=True,
                                              args=(lambda message: loop.call_soon_threadsafe(self._heard, message),
                                                    self._stopping))
            self._listener.start()

    async def create_graph(self, graph: GraphDefinition) -> tuple[GraphDefinition, bool, list[Problem]]:
        """Validate and store `graph` (a new id if it has none); return it, whether it was new, and its warnings."""
        validate_graph(graph, self.registry, limits=self.settings, graphs=self.find_graph)
        if graph.graph_id is None:
            graph = attrs.evolve(graph, graph_id=_new_id())
        warnings = graph_warnings(graph, self.registry)
        builtin = self._builtin.get(graph.graph_id or "")
        if builtin is not None:
            if builtin != graph:
                raise GraphConflict(graph.graph_id or "")
            return graph, False, warnings
        return graph, await self.store.add_graph(graph, self._builtin.keys()), warnings

    def get_graph(self, graph_id: str) -> GraphDefinition:
        """Return a registered or stored graph, or raise GraphNotFound."""
        return self._builtin.get(graph_id) or self.store.get_graph(graph_id)

    def find_graph(self, graph_id: str) -> GraphDefinition | None:
        """Return a registered or stored graph, or None."""
        try:
            return self.get_graph(graph_id)
        except GraphNotFound:
            return None

    def list_graphs(self, *, limit: int, offset: int) -> tuple[list[GraphDefinition], int]:
        """Return a page of graphs, registered ones first, and how many there are."""
        builtin = list(self._builtin.values())
        page = builtin[offset:offset + limit]
        stored, total = self.store.list_graphs(limit=limit - len(page), offset=max(offset - len(builtin), 0))
        return page + stored, len(builtin) + total

    def counts(self) -> tuple[int, int]:
        """Return how many graphs (registered and stored) and runs there are."""
        graphs, runs = self.store.counts()
        return graphs + len(self._builtin), runs

    def get_run(self, run_id: str) -> RunContext:
        """Return a run's record: the live one while this engine executes it, else the stored one."""
        active = self._active.get(run_id)
        return self.store.get_run(run_id) if active is None else active.run

    def get_run_json(self, run_id: str) -> bytes:
        """Return a run's record as JSON."""
        active = self._active.get(run_id)
        if active is None:
            return self.store.get_run_json(run_id)
        delivery = None if active.run.webhook is None else self.store.webhook_of(run_id)  # of an earlier stop
        return dump_json(_with_webhook(converter.unstructure(active.run), delivery))

    def has_run(self, run_id: str) -> bool:
        """Whether a run exists, here or in the store."""
        return run_id in self._active or self.store.has_run(run_id)

    async def start(
        self, graph: GraphDefinition | str, state: WorkflowState | None = None, *,
        max_iterations: int | None = None, timeout_s: float | None = None, wait: bool = False, queue: bool = False,
        run_id: str | None = None, webhook: str | None = None,
    ) -> RunContext:
        """Start a run of a stored graph (by id) or of a definition (validated and stored first, so the run can be
        resumed); return its record once the store holds it, or with `wait` once the run has stopped (executed in
        the caller's task, so cancelling the caller cancels the run). `run_id` names the new run (None: a new id);
        `webhook`, a URL of a host in `settings.webhook_hosts`, is POSTed to whenever the run stops (ends or pauses).

        With `queue` (and a shared store) the run goes to the store's queue, for whichever server has room; the
        record returned is then the queued one, which `get_run` reads anew.
        """
        self._check_room()
        delivery = None if webhook is None else self._webhook(webhook)
        graph = self.get_graph(graph) if isinstance(graph, str) else (await self.create_graph(graph))[0]
        limit = self._max_iterations(graph, max_iterations)
        state = state or WorkflowState()
        try:  # new_run copies the state, checking it: a second walk only says what is wrong
            run = new_run(graph, state, max_iterations=limit, timeout_s=timeout_s,
                          max_state_bytes=self.settings.max_state_bytes, max_log_bytes=self.settings.max_log_bytes,
                          run_id=run_id)
        except InvalidValue:
            raise InvalidRequest([Problem(f"$.state.{name}", problem) for name, problem in
                                  (("data", json_problem(state.data)), ("metadata", json_problem(state.metadata)))
                                  if problem]) from None
        run.webhook = delivery
        return await self._submit(run, graph, None, wait, queue=queue)

    async def resume(self, run_id: str, updates: dict[str, Any] | None = None, *,
                     timeout_s: float | None = None, wait: bool = False, queue: bool = False) -> RunContext:
        """Go on with a waiting or interrupted run from its next node, after merging `updates` into its data;
        `wait` and `queue` as for `start`."""
        problem = json_problem(updates or {})
        if problem:
            raise InvalidRequest([Problem("$.updates", problem)])
        self._check_room()
        previous = self._active.get(run_id)
        if previous is not None:
            if previous.run.status.is_active:
                raise _refused(run_id, previous.run.status, RunStatus.PENDING)
            await self._until_stopped([previous])  # its last save: go on from what it saved
            if run_id in self._active:  # another resume was quicker
                raise _refused(run_id, self._active[run_id].run.status, RunStatus.PENDING)
        run = self.store.get_run(run_id)
        graph = self.get_graph(run.graph_id)  # before the move: a graph that is gone leaves the run as it was
        expected, saved_logs = run.status, len(run.logs)
        move_run(run, RunStatus.PENDING)
        run.timeout_s = timeout_s if timeout_s is not None else run.timeout_s
        if updates:
            run.state.data.update(_copy_json(updates))
            run.logs.append(LogEntry(iteration=run.iteration, node=run.next_node or "", event=LogEvent.RESUMED,
                                     started_at=_now(), duration_ms=0.0, keys_changed=tuple(updates),
                                     updates=_copy_json(updates)))
        return await self._submit(run, graph, expected, wait, saved_logs, queue=queue)

    async def run(
        self, graph: GraphDefinition | str, state: WorkflowState | None = None, *,
        max_iterations: int | None = None, timeout_s: float | None = None,
    ) -> RunContext:
        """Run to the end in the caller's task and return the finished record. Cancelling the caller cancels the
        run: it ends `cancelled`, is saved, and the CancelledError goes on."""
        return await self.start(graph, state, max_iterations=max_iterations, timeout_s=timeout_s, wait=True)

    async def wait(self, run: RunContext) -> RunContext:
        """Wait until the run stops and its record is saved; return it. Raise what the run stopped with, before or
        after the wait began: StoreUnavailable if its last save failed, LeaseLost if another worker took it over."""
        active = self._active.get(run.run_id)
        if active is not None and active.run is run:
            await self._stopped(active)
        if (failed := self._failures.get(id(run))) is not None and failed[0]() is run:
            raise failed[1]
        return run

    async def once(self, key: IdempotencyKey | None, run_id: str, wait: bool,
                   begin: Callable[[bool], Awaitable[RunContext]]) -> tuple[RunContext, bool]:
        """Start (or resume) run `run_id` with `begin(wait)`, which returns once the store holds it (with `wait`,
        once the run has stopped, executed in the caller's task), unless an earlier request with `key` did: then
        answer for that request's run. Return the run (with `wait`, once it has stopped) and whether it is an
        earlier request's; raise IdempotencyKeyReused if that request was different.

        The key is reserved before `begin(False)` and marked accepted after it, so of two requests with one key,
        here or on another server, only the first starts a run and the other waits until it has; a `begin` that
        fails releases the key, and a later request with it starts the run. Without a key the run is begun with
        `wait` itself: a waited run then needs no task of its own.
        """
        if key is None:
            return await begin(wait), False
        token, ttl_s = _new_id(), self.settings.idempotency_ttl_s
        while (held := await self.store.reserve_key(key, run_id, token, ttl_s)) is not None:
            if held.fingerprint == key.fingerprint and not held.is_accepted:
                held = await self._held_until_accepted(key.key)
            if held is None:  # the first request started nothing, or died: this one may
                continue
            if held.fingerprint != key.fingerprint:
                raise IdempotencyKeyReused(key.key)
            return await self._replayed(held.run_id, wait), True
        # Shielded: a client that goes away meanwhile still leaves the key accepted or released.
        run = await asyncio.shield(self._begin_once(key.key, token, begin))
        return (await self.wait(run) if wait else run), False

    async def cancel(self, run_id: str) -> RunContext:
        """Cancel a pending, running, waiting or interrupted run; return its record once the store holds it.

        A run that has ended, or ends before the cancel takes effect, is a RunConflict naming its status.
        """
        active = self._active.get(run_id)
        if active is not None:
            active.cancel()
            await self._stopped(active)
            if active.run.status is RunStatus.CANCELLED:
                return active.run
            if not active.run.status.is_resumable or run_id in self._active:
                raise _refused(run_id, self.get_run(run_id).status, RunStatus.CANCELLED)
        run = self.store.get_run(run_id)
        expected = run.status
        move_run(run, RunStatus.CANCELLED, f"the run was cancelled while {expected.value}")
        try:
            await _stored(self.metrics, run_id, self.store.claim_run(run, expected, self.worker_id, len(run.logs)))
        except RunConflict:  # another server holds it: ask its owner
            if not expected.is_active:
                raise
            return await self._cancel_elsewhere(run_id)
        self.metrics.count_stop(run, -1)
        if run.webhook is not None:
            self._deliver_soon()
        return run

    async def _cancel_elsewhere(self, run_id: str) -> RunContext:
        """Flag a run that another server executes; wait until its owner (or, if it died, the server that takes
        it over) has stopped it, and answer as a local cancel would."""
        await self.store.request_cancel(run_id)  # type: ignore[union-attr]
        deadline = time.monotonic() + 3 * self.settings.lease_s + 5
        while (run := self.store.get_run(run_id)).status.is_active and time.monotonic() < deadline:
            await asyncio.sleep(CANCEL_POLL_S)
        if run.status is RunStatus.CANCELLED:
            return run
        if run.status.is_active:
            raise RunConflict(f"run {run_id!r} is still {run.status.value} on another server; its cancel is requested")
        raise _refused(run_id, run.status, RunStatus.CANCELLED)

    async def delete_run(self, run_id: str) -> None:
        """Delete a run that is neither pending nor running (a paused one may go), with its log; raise RunNotFound,
        or RunConflict naming its status. A resume or claim that takes the run at the same moment wins."""
        active = self._active.get(run_id)
        if active is not None:
            if active.run.status.is_active:
                raise _delete_refused(run_id, active.run.status)
            await self._until_stopped([active])  # its last save; then the store decides
        await self.store.delete_run(run_id)

    async def delete_graph(self, graph_id: str) -> None:
        """Delete a stored graph that no other graph runs and no pending or running run uses; raise GraphNotFound,
        or GraphInUse. The store checks the stored graphs that run it in the transaction of the delete.

        Its stopped runs are kept, since a run's record holds all it shows; a paused one can still be cancelled or
        deleted, and a resume of it is a GraphNotFound that leaves it paused.
        """
        if graph_id in self._builtin:
            raise GraphInUse(graph_id, "it is registered in code")
        referrer = first_referrer(self._builtin.values(), graph_id)  # the store checks the stored graphs
        if referrer is not None:
            raise GraphInUse(graph_id, _runs_it(referrer))
        await self.store.delete_graph(graph_id)

    async def sweep(self, now: datetime | None = None, *, batch: int = SWEEP_BATCH) -> int:
        """Delete the runs and idempotency keys past their time to live as of `now` (None: the store's clock),
        `batch` per transaction; return how many. Finished runs expire `settings.run_ttl_s` after finished_at,
        waiting and interrupted ones `settings.paused_ttl_s` after, keys `settings.idempotency_ttl_s` after their
        first request; with a shared store one server sweeps per SWEEP_INTERVAL_S, the others get 0.
        """
        ttls = [(is_paused, ttl_s) for is_paused, ttl_s in ((False, self.settings.run_ttl_s),
                                                            (True, self.settings.paused_ttl_s)) if ttl_s is not None]
        if not await self.store.claim_sweep(now, SWEEP_INTERVAL_S):
            return 0
        deleted = 0
        for is_paused, ttl_s in ttls:
            deleted += await _in_batches(functools.partial(self.store.delete_expired, is_paused, ttl_s, now), batch)
        return deleted + await _in_batches(functools.partial(self.store.delete_expired_keys, now), batch)

    def follow(self, run_id: str, after: int = 0) -> AsyncIterator[RunEvent | None]:
        """Return the run's events after id `after`, live until it stops; None marks a quiet keep-alive interval."""
        return self._follow(self.get_run(run_id), after)

    async def drain(self, grace_s: float | None = None) -> None:
        """Refuse new runs, let running ones go on for `grace_s` (default: the setting), then cancel the rest and
        wait until each is saved. Calling it again waits for the first call."""
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain(grace_s), name="drain")
        await asyncio.wait([self._draining])

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Drain, then close the store."""
        await self.drain(grace_s)
        self.store.close()

    async def _drain(self, grace_s: float | None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])
        for events in self._followers.values():  # streams of other servers' runs end: the client may go elsewhere
            for event in events:
                event.set()
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        if self._active and grace_s > 0:
            await self._until_stopped(self._active.values(), grace_s)
        while self._active:  # cancel even the runs launched while the others were cancelled
            actives = list(self._active.values())
            for active in actives:
                active.cancel()
            await self._until_stopped(actives)
        # Only now: until its runs are saved, the worker renews their leases (it claims nothing new meanwhile).
        self._stopping.set()
        self._wake.set()
        self._webhooks_due.set()
        if self._deliverer is not None:  # it finishes (and records) the attempts it is making
            await asyncio.wait([self._deliverer])
        if self._worker is not None:  # stopped by the flag: Python 3.11's wait_for can swallow a cancel
            await asyncio.wait([self._worker])
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join)

    async def _held_until_accepted(self, key: str) -> HeldKey | None:
        """Wait until the request holding `key` has started its run (and return what it holds) or has let the key
        go (None); it only reads, so waiting requests add no writes to the store."""
        while (held := self.store.held_key(key)) is not None and not held.is_accepted:
            await asyncio.sleep(IDEMPOTENCY_POLL_S)
        return held

    async def _begin_once(self, key: str, token: str, begin: Callable[[bool], Awaitable[RunContext]]) -> RunContext:
        try:
            run = await begin(False)
        except Exception:
            await self.store.release_key(key, token)  # nothing started, so a retry with this key may start it
            raise
        await self.store.accept_key(key, token)
        return run

    async def _replayed(self, run_id: str, wait: bool) -> RunContext:
        # A run this engine executes is awaited; one that another server executes (or that waits in the queue) is
        # read from the store until it stops.
        while True:
            active = self._active.get(run_id)
            if active is not None and wait:
                await self._until_stopped([active])
                continue
            run = self.get_run(run_id)
            if not wait or not run.status.is_active:
                return run
            await asyncio.sleep(STREAM_POLL_S)

    def _check_room(self) -> None:
        if self._draining is not None:
            raise Busy("the server is shutting down")
        if len(self._active) >= self._room:
            raise Busy("too many runs are waiting; retry later")

    async def _submit(self, run: RunContext, graph: GraphDefinition, expected: RunStatus | None, wait: bool,
                      saved_logs: int = 0, *, queue: bool = False) -> RunContext:
        self._check_room()  # again, with no await between it and the reservation below
        if queue and self.store.is_shared and not wait:  # any server with room takes it from the queue
            await self.open()
            await _stored(self.metrics, run.run_id, self.store.claim_run(
                run, expected, None, saved_logs, self.settings.lease_s, self.worker_id, self._room))
            self._wake.set()
            return run
        active = self._new_active(run, graph, expected, saved_logs)
        if wait:  # the caller waits anyway: its task executes the run, and no task of the run's own is needed
            active.task = asyncio.current_task()
            await self._execute(active)
        else:
            active.accepted = asyncio.get_running_loop().create_future()
            active.task = asyncio.create_task(self._execute(active), name=f"run {run.run_id}")
            await asyncio.wait([active.accepted])  # unlike awaiting it, a caller that goes away cancels nothing
            active.accepted.result()  # raises the claim's error, if the store refused it
        if active.failure is not None:
            raise active.failure
        return run

    def _new_active(self, run: RunContext, graph: GraphDefinition, expected: RunStatus | None,
                    saved_logs: int) -> _ActiveRun:
        active = _ActiveRun(run=run, graph=graph, expected=expected, saved_logs=saved_logs, metrics=self.metrics,
                            is_logging=logger.isEnabledFor(logging.DEBUG))
        active.call = active.notify  # until its start is counted
        self._active[run.run_id] = active
        return active

    async def _stopped(self, active: _ActiveRun) -> None:
        await self._until_stopped([active])
        if active.failure is not None:
            raise active.failure

    async def _until_stopped(self, actives: Iterable[_ActiveRun], timeout_s: float | None = None) -> None:
        """Wait (at most `timeout_s`) until the runs' records are released, after their last saves."""
        loop, stopped = asyncio.get_running_loop(), []
        for active in actives:
            active.stopped = active.stopped or loop.create_future()
            stopped.append(active.stopped)
        await asyncio.wait(stopped, timeout=timeout_s)

    async def _execute(self, active: _ActiveRun) -> None:
        """Claim the run (unless it is claimed), execute and save it, release its record. A CancelledError that
        `active.cancel` caused ends here once the run is saved; any other (the caller's) propagates after that."""
        run = active.run
        if active.lease is None and not await self._claim(active):
            return
        active.is_accepted = True
        if active.accepted is not None:
            active.accepted.set_result(None)
        is_logged = is_cancelled = False
        try:
            if not active.graph.nodes:  # see _graph_or_none
                move_run(run, RunStatus.FAILED, f"graph {run.graph_id!r} was deleted before the run started")
            elif not active.is_cancel_requested:
                if not active.has_slot:
                    await self._slots.acquire()
                    active.has_slot = True
                checkpoint = functools.partial(self._save, active) if self.store.is_durable else None
                await execute_run(run, active.graph, self.registry, on_change=active,
                                  checkpoint=checkpoint, may_pause=self._may_pause, branches=self._branches)
        except asyncio.CancelledError:  # the runner recorded it, or the finally below does for a run not started
            task = asyncio.current_task()
            for _ in range(active.cancels):  # the engine's own cancels end here, after the last save
                task.uncancel()  # type: ignore[union-attr]
            is_cancelled = task.cancelling() > 0  # type: ignore[union-attr]
        except StoreUnavailable as exc:  # a checkpoint failed: fail the run with why, if the store still takes that
            logger.error("run %s: %s", run.run_id, exc.message)
            is_logged = True
            move_run(run, RunStatus.FAILED, exc.message)
        except LeaseLost as exc:
            logger.warning("run %s: %s", run.run_id, exc.message)
            active.failure = exc
        except Exception:  # a bug in the engine: a node's failure is recorded by the runner, never raised
            logger.exception("run %s crashed", run.run_id)
            if run.status.is_active:
                move_run(run, RunStatus.FAILED, "internal error; see the server log")
        finally:
            await self._finish(active, is_logged)
        if is_cancelled:
            raise asyncio.CancelledError

    async def _claim(self, active: _ActiveRun) -> bool:
        """Have the store hold the run for this engine: as running if a slot is free (one write, not a pending claim
        and a move to running), else as pending (it waits for a slot). If the store refuses, release the record and
        raise its error, or for a run launched in a task of its own put it on `active.accepted` and return False."""
        try:
            if self.store.is_shared:
                await self.open()
            if not self._slots.locked():  # so acquiring it waits for nothing
                await self._slots.acquire()
                active.has_slot = True
                move_run(active.run, RunStatus.RUNNING)
            active.lease = await _stored(self.metrics, active.run.run_id, self.store.claim_run(
                active.run, active.expected, self.worker_id, active.saved_logs, self.settings.lease_s, self.worker_id,
                self._room))
            active.saved_logs = len(active.run.logs)
        except EngineError as exc:
            self._release(active)
            if active.accepted is None:
                raise
            active.accepted.set_exception(exc)
            return False
        except asyncio.CancelledError:  # the caller's, during the claim: a claim the store took expires unrenewed,
            self._release(active)  # and the run is taken over like one of a server that died
            if active.accepted is not None:
                active.accepted.cancel()
            raise
        if active.run.status is RunStatus.RUNNING:
            active.notify(active.run)  # it has started: counted and logged once the store holds it
        return True

    def _release(self, active: _ActiveRun) -> None:
        if active.has_slot:  # held until the run's last save, like its record
            self._slots.release()
        del self._active[active.run.run_id]
        if active.failure is not None:
            key = id(active.run)
            self._failures[key] = (weakref.ref(active.run, lambda _: self._failures.pop(key, None)), active.failure)
        elif self._failures:  # the record was executed again, and stopped well this time
            self._failures.pop(id(active.run), None)
        if active.stopped is not None:
            active.stopped.set_result(None)

    async def _save(self, active: _ActiveRun, run: RunContext) -> None:
        """Save the run under its lease (the runner's checkpoint); raise StoreUnavailable, or LeaseLost."""
        assert active.lease is not None
        await _stored(self.metrics, run.run_id, self.store.save_run(run, active.lease, active.saved_logs,
                                                                    self.settings.lease_s))
        active.saved_logs = len(run.logs)

    async def _finish(self, active: _ActiveRun, is_logged: bool) -> None:
        """Save the run's last state (a lost lease leaves it to its new owner), count it, release its record and
        tell who waits. `is_logged`: the run's failure is in the server log already."""
        run = active.run
        if run.status.is_active:
            move_run(run, RunStatus.CANCELLED, "the run was cancelled before it started")
        try:
            if active.failure is None:
                await self._save(active, run)
        except EngineError as exc:
            active.failure = exc
            if not is_logged:
                logger.error("run %s: its last state (%s) was not saved: %s", run.run_id, run.status.value, exc.message)
        self.metrics.count_stop(run, active.started, is_lost=isinstance(active.failure, LeaseLost))
        if run.webhook is not None and active.failure is None:
            self._deliver_soon()
        self._release(active)
        active.report(run)
        self._wake.set()  # a slot came free
        if logger.isEnabledFor(logging.INFO):
            active.log_end()

    async def _work(self) -> None:
        """With a shared store: claim queued runs while there is room, and on every heartbeat renew leases, cancel
        what other servers asked to, and take over runs whose server stopped renewing."""
        loop, next_beat, is_failing = asyncio.get_running_loop(), 0.0, False
        tick = min(HEARTBEAT_S, self.settings.lease_s / 3)
        while not self._stopping.is_set():
            try:
                if loop.time() >= next_beat:
                    next_beat = loop.time() + tick
                    await self._beat()
                    await self._take_over_expired()
                await self._claim_queued()
                is_failing = False
            except Exception as exc:  # the database is away: keep trying, and say so once
                is_failing = self._store_failed("worker", exc, is_failing, tick)
            self._wake.clear()
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancel that comes as the event is set (a run that
            # has just freed its slot), and the worker would outlive the loop's shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(next_beat - loop.time(), 0.0)):
                    await self._wake.wait()

    async def _sweep_often(self) -> None:
        """Sweep every SWEEP_INTERVAL_S, from one interval after the start, until the engine drains; a failing
        store is said once, then tried again. (Not at once: every engine sweeps idempotency keys, and an engine
        opened for a moment, as in a script, would take a round of the sweep on a shared store for nothing.)"""
        is_failing = False
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                deleted = await self.sweep()
                if deleted:
                    logger.info("deleted %d runs and idempotency keys past their time to live", deleted)
                is_failing = False
            except Exception as exc:
                is_failing = self._store_failed("sweeper", exc, is_failing, SWEEP_INTERVAL_S)

    def _store_failed(self, task: str, exc: Exception, is_failing: bool, every_s: float) -> bool:
        """Count a store failure of a background task, and log it if the task was not failing yet; return True."""
        self.metrics.count_store_error()
        if not is_failing:
            logger.error("%s %s: the store failed (%s); trying again every %s s", task, self.worker_id,
                         _describe(exc), every_s)
        return True

    def _webhook(self, url: str) -> WebhookDelivery:
        """The webhook of a new run, or raise InvalidRequest: its target must be one of the allowed hosts."""
        problem = url_problem(url)  # the request's validator said so already; a caller in code may not have
        if problem is None and not self.settings.webhook_hosts:
            problem = "webhooks are off on this server; its operator turns them on by listing the host:port targets " \
                      "they may go to in WORKFLOW_WEBHOOK_HOSTS"
        elif problem is None and webhook_target(url) not in self.settings.webhook_hosts:
            problem = f"{_shown(webhook_target(url))} is not an allowed webhook target; the server sends webhooks " \
                      "only to the host:port targets in WORKFLOW_WEBHOOK_HOSTS"
        if problem:
            raise InvalidRequest([Problem("$.webhook", problem)])
        return WebhookDelivery(url=url)

    def _deliver_soon(self) -> None:
        """Have the deliverer look for webhooks due (started the first time; never once the engine stops)."""
        if not self.settings.webhook_hosts or self._stopping.is_set():
            return
        if self._deliverer is None:
            self._deliverer = asyncio.create_task(self._deliver_often(), name=f"webhooks {self.worker_id}")
        self._webhooks_due.set()

    async def _deliver_often(self) -> None:
        """Send webhooks as they come due until the engine stops; a failing store is said once, then tried again."""
        threads = ThreadPoolExecutor(max_workers=WEBHOOK_BATCH, thread_name_prefix="workflow-webhook")
        is_failing = False
        try:
            while not self._stopping.is_set():
                self._webhooks_due.clear()
                try:
                    wait_s = await self._deliver_due(threads)
                    is_failing = False
                except Exception as exc:
                    is_failing, wait_s = self._store_failed("webhooks", exc, is_failing, WEBHOOK_POLL_S), WEBHOOK_POLL_S
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):  # not wait_for: see _work
                        await self._webhooks_due.wait()
        finally:
            threads.shutdown(wait=False)

    async def _deliver_due(self, threads: ThreadPoolExecutor) -> float:
        """Make one attempt at each webhook due (a batch at once); return how long to wait before the next look."""
        events = await self.store.claim_webhooks(self.worker_id, WEBHOOK_BATCH)
        retries = await asyncio.gather(*(self._deliver(event, threads) for event in events))
        if len(events) == WEBHOOK_BATCH:
            return 0.0
        return min([WEBHOOK_POLL_S, *(retry_s for retry_s in retries if retry_s is not None)])

    async def _deliver(self, event: WebhookEvent, threads: ThreadPoolExecutor) -> float | None:
        """Make one attempt at `event` and record it; return when it is due again (None: delivered or abandoned)."""
        attempts, target = event.attempts + 1, webhook_target(event.url)
        if target in self.settings.webhook_hosts:  # checked again: the operator may have changed the list since
            error = await asyncio.get_running_loop().run_in_executor(threads, post_webhook, event,
                                                                     self.settings.webhook_secret)
        else:
            error = f"{target} is no longer in WORKFLOW_WEBHOOK_HOSTS"
        is_last = error is None or attempts >= self.settings.webhook_attempts
        retry_s = None if is_last else min(self.settings.webhook_backoff_s * 2 ** (attempts - 1), WEBHOOK_MAX_BACKOFF_S)
        delivery = WebhookDelivery(url=event.url, attempts=attempts, delivered_at=None if error else _now(),
                                   last_error=error)
        await self.store.record_webhook(event, self.worker_id, delivery, retry_s)
        if error is None:
            self.metrics.count_webhook(WebhookResult.DELIVERED)
            return None
        self.metrics.count_webhook(WebhookResult.ABANDONED if is_last else WebhookResult.FAILED)
        logger.warning("run %s: webhook %s attempt %d of %d failed: %s", event.run_id, event.event_id, attempts,
                       self.settings.webhook_attempts, error)
        return retry_s

    async def _beat(self) -> None:
        leases = {run_id: active.lease.attempt for run_id, active in self._active.items()
                  if active.lease is not None and active.lease.owner}
        beat = await self.store.heartbeat(self.worker_id, leases, self.settings.lease_s)
        for run_id in beat.lost:
            active = self._active.get(run_id)
            if active is not None and active.failure is None:
                active.failure = LeaseLost(run_id)
                logger.warning("run %s: this worker lost its lease; it stops executing the run", run_id)
                active.cancel()
        for run_id in beat.cancel_requested:
            self._cancel_here(run_id)

    def _cancel_here(self, run_id: str) -> None:
        active = self._active.get(run_id)
        if active is not None:
            active.cancel()

    async def _take_over_expired(self) -> None:
        for run, lease in self.store.expired():
            saved_logs, recoveries = len(run.logs), sum(entry.event is LogEvent.RECOVERED for entry in run.logs)
            if recoveries >= self.settings.max_recoveries:
                move_run(run, RunStatus.FAILED, f"the run's server stopped {recoveries + 1} times; it was recovered "
                         f"{recoveries} times, the limit (WORKFLOW_MAX_RECOVERIES)")
            else:
                run.logs.append(LogEntry(iteration=run.iteration, node=run.next_node or "", event=LogEvent.RECOVERED,
                                         started_at=_now(), duration_ms=0.0, attempt=lease.attempt,
                                         error=f"recovered from worker {lease.owner}, whose lease expired"))
                if run.status is RunStatus.RUNNING:
                    move_run(run, RunStatus.PENDING)
            with contextlib.suppress(LeaseLost):  # another server took it over first, or its owner came back
                await self.store.take_over(run, lease, saved_logs)  # type: ignore[union-attr]
                self.metrics.count_takeover(run)
                if run.webhook is not None:
                    self._deliver_soon()
                logger.warning("run %s: taken over from worker %s, whose lease expired", run.run_id, lease.owner)

    async def _claim_queued(self) -> None:
        while len(self._active) < self.settings.max_concurrent_runs and self._draining is None:
            claimed = await self.store.claim_next(self.worker_id, self.settings.lease_s)
            if claimed is None:
                return
            run, lease, is_cancel_requested = claimed
            active = self._new_active(run, self._graph_or_none(run.graph_id), run.status, len(run.logs))
            active.lease, active.is_cancel_requested = lease, is_cancel_requested
            active.task = asyncio.create_task(self._execute(active), name=f"run {run.run_id}")

    def _graph_or_none(self, graph_id: str) -> GraphDefinition:
        try:
            return self.get_graph(graph_id)
        except GraphNotFound:  # deleted meanwhile: the run fails when it starts, saying so
            return GraphDefinition(graph_id=graph_id, start_node="", nodes=())

    def _heard(self, message: str) -> None:
        """A notification from the store (PostgreSQL): a change to a run, a queued run, or a cancel request."""
        kind, _, run_id = message.partition(" ")
        if kind == "queue":
            self._wake.set()
        elif kind == "cancel":
            self._cancel_here(run_id)
        for event in self._followers.get(run_id, ()):
            event.set()

    def _may_pause(self, run: RunContext) -> str | None:
        limit = self.settings.max_paused_runs
        if self.store.count_paused() < limit:
            return None
        return f"the run cannot pause: {limit} runs are already waiting or interrupted, the limit; resume or cancel some"

    async def _follow(self, run: RunContext, after: int) -> AsyncIterator[RunEvent | None]:
        # A run that another server executes: its changes come as notifications (PostgreSQL) or by polling.
        notified = asyncio.Event()
        self._followers.setdefault(run.run_id, set()).add(notified)
        try:
            async for event in self._events(run, after, notified):
                yield event
        finally:
            followers = self._followers[run.run_id]
            followers.discard(notified)
            if not followers:
                del self._followers[run.run_id]

    async def _events(self, run: RunContext, after: int, notified: asyncio.Event) -> AsyncIterator[RunEvent | None]:
        poll_s = HEARTBEAT_S if hasattr(self.store, "listen") else STREAM_POLL_S
        quiet_s = 0.0
        while True:
            active = self._active.get(run.run_id)
            run = run if active is None else active.run
            # Register for the next change before reading the run, so a change made while we send is not missed.
            # Only a run executing here has changes to wait for; registering for another would leave the event behind.
            changed = None
            if active is not None and run.status.is_active:
                changed = active.changed = active.changed or asyncio.Event()
                active.call = active.notify  # until that change: see notify
            sent = False
            for event in run_events(run, after):
                after, sent = event.id, True
                yield event
            if not run.status.is_active:
                return
            if changed is not None:
                try:
                    await asyncio.wait_for(changed.wait(), self.settings.stream_keepalive_s)
                except TimeoutError:
                    yield None
                continue
            if self._draining is not None:  # the server is going away; the client may reconnect elsewhere
                return
            quiet_s = 0.0 if sent else quiet_s + poll_s
            if quiet_s >= self.settings.stream_keepalive_s:
                quiet_s = 0.0
                yield None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(notified.wait(), poll_s)
            notified.clear()
            run = self._caught_up(run)

    def _caught_up(self, run: RunContext) -> RunContext:
        """`run` with what another server has committed since: its new history and log entries only, and the whole
        record once it stops (its end event carries the state)."""
        if self._active.get(run.run_id) is not None or \
                self.store.event_count(run.run_id) == len(run.history) + len(run.logs):  # type: ignore[union-attr]
            return run
        progress = self.store.progress(run.run_id, len(run.logs))  # type: ignore[union-attr]
        if progress is None:  # deleted meanwhile
            return run
        _, history, entries = progress
        if not history[-1].status.is_active:
            return self.store.get_run(run.run_id)
        return attrs.evolve(run, status=history[-1].status, history=history, logs=[*run.logs, *entries])

    def metrics_page(self) -> str:
        """This process's metrics in the Prometheus text format. Active and pending runs are this process's own;
        paused runs are the store's count, left out (and counted as a store error) when the store does not answer."""
        statuses = [active.run.status for active in self._active.values()]
        try:
            paused: int | None = self.store.count_paused()
        except Exception as exc:  # the page matters most while the store is away
            logger.warning("metrics: the store did not count paused runs: %s", _describe(exc))
            self.metrics.count_store_error()
            paused = None
        return self.metrics.page(active=statuses.count(RunStatus.RUNNING), pending=statuses.count(RunStatus.PENDING),
                                 paused=paused)

    def _max_iterations(self, graph: GraphDefinition, requested: int | None) -> int:
        limit = requested or graph.max_iterations or self.settings.max_iterations
        if limit > self.settings.max_iterations_cap:
            raise InvalidRequest([Problem("$.max_iterations", f"must be at most {self.settings.max_iterations_cap}")])
        return limit


def run_events(run: RunContext, after: int = 0) -> Iterator[RunEvent]:
    """Yield the run's events after id `after`: each status change and log entry in the order they happened, then
    an end event if the run has stopped (ended, or paused to wait).

    Ids count the run's history and log together, from 1, and every stop takes one id for its end event, so ids
    never repeat across pauses, resumes and restarts, and every stream of one run shows the same ids. Only the
    last stop's end event is sent: the run went on after the others.
    """
    history, count = run.history[:], len(run.logs)  # read once: the run may move on while we yield
    event_id, logged = 0, 0
    for index, change in enumerate(history):
        yield from _log_events(run, logged, change.log_count, event_id, after)
        event_id, logged = event_id + change.log_count - logged + 1, change.log_count
        if event_id > after:
            yield RunEvent(id=event_id, event=StreamEvent.STATUS, data={"status": change.status.value})
        if not change.status.is_active:
            event_id += 1
            if index == len(history) - 1 and event_id > after:
                end = RunEnd(status=run.status, error=run.error, iteration=run.iteration,
                             current_node=run.current_node, state=run.state)
                yield RunEvent(id=event_id, event=StreamEvent.END, data=converter.unstructure(end))
    if history and not history[-1].status.is_active:
        return
    yield from _log_events(run, logged, count, event_id, after)


def _log_events(run: RunContext, first: int, stop: int, last_id: int, after: int) -> Iterator[RunEvent]:
    """The events of log entries `first` to `stop`, whose ids follow `last_id`, after id `after`."""
    for position in range(max(first, first + after - last_id), stop):
        event_id = last_id + position - first + 1
        yield RunEvent(id=event_id, event=StreamEvent.LOG, data=converter.unstructure(run.logs[position]))


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------
# Endpoints parse, call one engine method and answer; every error leaves through `error_response`.
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # json.loads would build one per body
_SSE_ENCODER = json.JSONEncoder(separators=(",", ":"))  # an event's data line; json.dumps would build one per event
# A media type's parameters (`; charset=utf-8`) do not matter: JSON is UTF-8 whatever they say.
_JSON_MEDIA_TYPE = re.compile(r"application/json|[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+\+json")


def _is_json(content_type: str | None) -> bool:
    return content_type == "application/json" or _JSON_MEDIA_TYPE.fullmatch(  # the usual one needs no parsing
        (content_type or "").partition(";")[0].strip().lower()) is not None


def _utf8_text(body: bytes | bytearray) -> str:
    """Decode a body as UTF-8, dropping a leading byte order mark (RFC 8259 §8.1 lets a parser ignore it).

    `json.loads` would take UTF-16 and UTF-32 bytes too; JSON between systems is UTF-8, so this refuses them.
    """
    rule = "JSON must be sent as UTF-8 (RFC 8259 §8.1)"
    skipped = 3 if body.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = body[skipped:].decode()
    except UnicodeDecodeError as exc:
        offset = skipped + exc.start
        raise ValueError(f"the body is not UTF-8 (byte {body[offset]:#04x} at offset {offset}); {rule}") from None
    if "\x00" in text:  # never in JSON text, and in UTF-16 or UTF-32 text of any ASCII character
        raise ValueError(f"the body holds a NUL byte (at offset {body.find(0)}), as UTF-16 and UTF-32 text does; {rule}")
    return text


def _header(request: Request, name: bytes) -> str | None:  # the first value: one call, not three
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_json(request: Request, max_bytes: int, *, empty: object = _MISSING) -> object:
    """Read the body (at most `max_bytes`) and decode it as strict JSON, or raise BodyTooLarge / InvalidJson.

    A body must come as `application/json` or a `+json` type, else UnsupportedMediaType; a request without a body
    needs no Content-Type. An empty body is `empty` when one is given (a request whose fields are all optional),
    else invalid JSON.
    """
    declared = _count_or_none(_header(request, b"content-length") or "")
    if declared is not None and declared > max_bytes:
        raise BodyTooLarge(max_bytes)
    body, receive, message = bytearray(), request.receive, {"more_body": True}
    while message.get("more_body", False):  # as request.stream(), without an async generator per request
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        if len(body) > max_bytes:
            raise BodyTooLarge(max_bytes)
    content_type = _header(request, b"content-type")
    if body and not _is_json(content_type):
        raise UnsupportedMediaType(content_type)
    if not body.strip() and empty is not _MISSING:
        return empty
    try:
        payload = _JSON_DECODER.decode(_utf8_text(body))
        problem = json_problem(payload)
    except (ValueError, RecursionError) as exc:
        problem = "nesting is too deep" if isinstance(exc, RecursionError) else str(exc)
    if problem:
        raise InvalidJson("the request body is not valid JSON", [Problem("$", problem)])
    return payload


class _Answer(Response):
    """JSONResponse's answer byte for byte, one call cheaper, by the module's one encoder (not one per answer)."""

    media_type = "application/json"
    render = staticmethod(dump_json)


def _engine(request: Request) -> Engine:
    engine = request.scope["app"].state.engine  # what request.app reads, without its property call
    if engine is None:
        raise RuntimeError("the app has not started: serve it (its lifespan builds the engine from the environment)")
    return engine


async def get_health(request: Request) -> Response:
    """Answer that the service is up, with how many graphs and runs it holds."""
    graphs, runs = _engine(request).counts()
    return _Answer(converter.unstructure(HealthResponse(status="ok", graphs=graphs, runs=runs)))


async def post_graph_create(request: Request) -> Response:
    """Validate and store a graph definition: 201 when new, 200 when identical to the stored one."""
    engine = _engine(request)
    graph = structure_body(await read_json(request, engine.settings.max_body_bytes), GraphDefinition)
    graph, created, warnings = await engine.create_graph(graph)
    body = converter.unstructure(CreateGraphResponse(graph_id=graph.graph_id or "", warnings=warnings))
    return _Answer(body, status_code=201 if created else 200)


async def post_graph_run(request: Request) -> Response:
    """Run a stored graph: to its end (200, a failed run included), or in the background with `"wait": false` (202).

    With an Idempotency-Key, a request like an earlier one with that key answers for the earlier one's run."""
    engine = _engine(request)
    body = structure_body(await read_json(request, engine.settings.max_body_bytes), RunRequest)
    run_id = _new_id()
    run, is_replayed = await engine.once(_idempotency_key(request, body), run_id, body.wait, lambda wait: engine.start(
        body.graph_id, body.state, max_iterations=body.max_iterations, timeout_s=body.timeout_s, wait=wait,
        queue=not body.wait, run_id=run_id, webhook=body.webhook))
    return _run_answer(run, body.wait, is_replayed)


async def post_graph_resume(request: Request) -> Response:
    """Go on with a waiting or interrupted run, after merging `updates` into its data; answers like /graph/run."""
    engine = _engine(request)
    body = structure_body(await read_json(request, engine.settings.max_body_bytes, empty={}), ResumeRequest)
    run_id = _path_id(request, "run_id")
    run, is_replayed = await engine.once(_idempotency_key(request, body), run_id, body.wait, lambda wait: engine.resume(
        run_id, body.updates, timeout_s=body.timeout_s, wait=wait, queue=not body.wait))
    return _run_answer(run, body.wait, is_replayed)


def _idempotency_key(request: Request, body: RunRequest | ResumeRequest) -> IdempotencyKey | None:
    """The request's Idempotency-Key, fingerprinted by method, path and body (parsed, defaults filled in, as
    canonical JSON: spacing, key order and spelled-out defaults do not make requests differ); None without one."""
    keys = [value.decode("latin-1") for key, value in request.scope["headers"] if key == b"idempotency-key"]
    if not keys:
        return None
    if len(keys) > 1 or not IDEMPOTENCY_KEY_PATTERN.fullmatch(keys[0]):
        rule = "must be given once" if len(keys) > 1 else IDEMPOTENCY_KEY_RULE
        raise InvalidRequest([Problem("$.headers.Idempotency-Key", rule)])
    canonical = json.dumps(converter.unstructure(body), ensure_ascii=False, allow_nan=False, sort_keys=True,
                           separators=(",", ":"))
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n{canonical}".encode()).hexdigest()
    return IdempotencyKey(key=keys[0], fingerprint=digest)


def _run_answer(run: RunContext, wait: bool, is_replayed: bool = False) -> Response:
    replayed = {"Idempotent-Replayed": "true"} if is_replayed else {}
    if wait:  # no headers as None, not {}, spares Response a pass over them
        answer = RunResponse(run_id=run.run_id, graph_id=run.graph_id, status=run.status, final_state=run.state,
                             logs=run.logs, iteration=run.iteration, current_node=run.current_node, error=run.error,
                             duration_ms=run.duration_ms, engine_overhead_ms=run.engine_overhead_ms)
        return _Answer(converter.unstructure(answer), headers=replayed or None)
    # "pending" as in accepted: the run may be waiting for a slot or running already, which /graph/state tells.
    accepted = converter.unstructure(RunAccepted(run_id=run.run_id, status=RunStatus.PENDING))
    return _Answer(accepted, status_code=202, headers={"Location": f"/graph/state/{run.run_id}", **replayed})


async def post_graph_cancel(request: Request) -> Response:
    """Cancel a pending or running run and answer with its record; a run that already ended is a 409."""
    run = await _engine(request).cancel(_path_id(request, "run_id"))
    return _Answer(converter.unstructure(run))


async def delete_graph_run(request: Request) -> Response:
    """Delete a run that is neither pending nor running, with its log: 204; an active run is a 409."""
    await _engine(request).delete_run(_path_id(request, "run_id"))
    return Response(status_code=204)


async def get_graph_runs(request: Request) -> Response:
    """List run summaries, newest first, optionally of one graph or in one status."""
    query = _query(request, {"graph_id", "status", "limit", "offset"})
    limit, offset = _page(query)
    status, graph_id = _status_filter(query.get("status")), _query_id(query, "graph_id")
    summaries, total = _engine(request).store.list_runs(graph_id=graph_id, status=status, limit=limit, offset=offset)
    return _Answer(converter.unstructure(RunsPage(runs=summaries, total=total, limit=limit, offset=offset)))


async def get_graph_list(request: Request) -> Response:
    """List stored graphs, in the order they were created."""
    limit, offset = _page(_query(request, {"limit", "offset"}))
    graphs, total = _engine(request).list_graphs(limit=limit, offset=offset)
    summaries = [GraphSummary(graph_id=g.graph_id or "", start_node=g.start_node, nodes=list(g.node_defs)) for g in graphs]
    return _Answer(converter.unstructure(GraphsPage(graphs=summaries, total=total, limit=limit, offset=offset)))


async def get_graph_stream(request: Request) -> Response:
    """Stream a run's events as Server-Sent Events until it ends; `Last-Event-ID` resumes after that event."""
    events = _engine(request).follow(_path_id(request, "run_id"), _last_event_id(request))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_server_sent(events), media_type="text/event-stream", headers=headers)


async def websocket_graph_ws(websocket: WebSocket) -> None:
    """Send a run's events as JSON messages over a WebSocket until it ends; `?after=N` resumes after event N."""
    await websocket.accept()
    engine: Engine = websocket.app.state.engine
    run_id, after = websocket.path_params["run_id"], _count_or_none(websocket.query_params.get("after", "0"))
    problems = [] if GRAPH_ID_PATTERN.fullmatch(run_id) else [Problem("$.path.run_id", ID_RULE)]
    problems += [] if after is not None else [Problem("$.query.after", "expected an integer")]
    if problems or not engine.has_run(run_id):
        # The HTTP error handlers cannot answer a WebSocket: send the same error body, then close with 4000 + status.
        error = InvalidRequest(problems) if problems else RunNotFound(run_id)
        await websocket.send_json(_error_body(error.code, error.message, error.details))
        await websocket.close(code=4000 + error.status_code)
        return
    try:
        async for event in engine.follow(run_id, after):
            if event is not None:
                # send_json's bytes, without the encoder its json.dumps builds for every message
                await websocket.send_text(_JSON_ENCODER.encode(converter.unstructure(event)))
        await websocket.close()
    except WebSocketDisconnect:  # the client went away: not the server's error
        logger.debug("websocket client of run %s went away", run_id)


async def _server_sent(events: AsyncIterator[RunEvent | None]) -> AsyncIterator[str]:
    async for event in events:
        yield (": keep-alive\n\n" if event is None
               else f"id: {event.id}\nevent: {event.event.value}\ndata: {_SSE_ENCODER.encode(event.data)}\n\n")


def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise InvalidRequest([Problem(f"$.query.{name}", "unknown query parameter") for name in unknown])
    return dict(request.query_params)


def _count_or_none(raw: str) -> int | None:
    """The number written in ASCII digits (at most 18 of them), or None: `str.isdigit` also takes '²' and '①'."""
    return int(raw) if _COUNT.fullmatch(raw) else None


def _query_int(query: dict[str, str], name: str, default: int, maximum: int) -> int:
    raw = query.get(name)
    value = default if raw is None else _count_or_none(raw)  # the default is within range
    if value is None or value > maximum:
        raise InvalidRequest([Problem(f"$.query.{name}", f"expected an integer from 0 to {maximum}, got {_shown(raw)}")])
    return value


_QUERY_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def _query_bool(query: dict[str, str], name: str) -> bool:
    raw = query.get(name, "false")
    if raw not in _QUERY_BOOLS:
        raise InvalidRequest([Problem(f"$.query.{name}", f"expected true, false, 1 or 0, got {_shown(raw)}")])
    return _QUERY_BOOLS[raw]


def _query_id(query: dict[str, str], name: str) -> str | None:
    raw = query.get(name)
    if raw is not None and not GRAPH_ID_PATTERN.fullmatch(raw):
        raise InvalidRequest([Problem(f"$.query.{name}", ID_RULE)])
    return raw


def _path_id(request: Request, name: str) -> str:
    """The id in the path parameter `name`, checked as every id is (so a huge one never reaches a message)."""
    raw = request.scope["path_params"][name]  # the router sets them; request.path_params costs two calls
    if not GRAPH_ID_PATTERN.fullmatch(raw):
        raise InvalidRequest([Problem(f"$.path.{name}", ID_RULE)])
    return raw


def _page(query: dict[str, str]) -> tuple[int, int]:
    return _query_int(query, "limit", 50, MAX_PAGE), _query_int(query, "offset", 0, 10**9)


def _status_filter(raw: str | None) -> RunStatus | None:
    try:
        return None if raw is None else RunStatus(raw)
    except ValueError:
        known = ", ".join(status.value for status in RunStatus)
        raise InvalidRequest([Problem("$.query.status", f"expected one of {known}, got {_shown(raw)}")]) from None


def _last_event_id(request: Request) -> int:
    raw = (_header(request, b"last-event-id") or "0").strip() or "0"
    event_id = _count_or_none(raw)
    if event_id is None:
        raise InvalidRequest([Problem("$.headers.Last-Event-ID", f"expected an event id, got {_shown(raw)}")])
    return event_id


async def get_graph_state(request: Request) -> Response:
    """Answer with a run's record, finished or still running."""
    record = _engine(request).get_run_json(_path_id(request, "run_id"))
    return Response(record, media_type="application/json")


async def get_graph_definition(request: Request) -> Response:
    """Answer with a stored graph, as JSON that `/graph/create` accepts; `?declarations=true` adds what its nodes
    declare they read and write."""
    engine = _engine(request)
    query = _query(request, {"declarations"})
    graph = engine.get_graph(_path_id(request, "graph_id"))
    body = converter.unstructure(graph)
    if _query_bool(query, "declarations"):
        declared = {name: engine.registry.node_io(node.function) for name, node in graph.node_defs.items()}
        body["declarations"] = {name: converter.unstructure(io) for name, io in declared.items() if io is not None}
    return _Answer(body)


async def get_metrics(request: Request) -> Response:
    """Answer with this process's metrics in the Prometheus text format."""
    return Response(_engine(request).metrics_page(), media_type=PROMETHEUS_MEDIA_TYPE)


async def delete_graph_definition(request: Request) -> Response:
    """Delete a stored graph: 204; a graph registered in code, or with pending or running runs, is a 409."""
    await _engine(request).delete_graph(_path_id(request, "graph_id"))
    return Response(status_code=204)


class BearerAuth:
    """Pure ASGI middleware: every request but `GET /` must carry `Authorization: Bearer <token>`.

    Without a `token` it uses the app's setting (`api_token`), read when a request comes, since the default app
    reads its settings only when it starts; with neither, every request passes.
    """

    def __init__(self, app: ASGIApp, token: str | None = None) -> None:
        self.app = app
        self._token = None if token is None else token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an open or authorized request on; answer any other with 401 (a WebSocket: close code 4401)."""
        token = self._token or _token_setting(scope)
        if token is None or scope["type"] not in ("http", "websocket") or self._is_open(scope) or \
                self._is_authorized(scope, token):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401})
        else:
            response = error_response(401, ErrorCode.UNAUTHORIZED, "a valid bearer token is required",
                                      headers={"WWW-Authenticate": 'Bearer realm="workflow_engine"'})
            await response(scope, receive, send)

    @staticmethod
    def _is_open(scope: Scope) -> bool:
        return scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD")

    @staticmethod
    def _is_authorized(scope: Scope, expected: bytes) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected)
        return False


def _token_setting(scope: Scope) -> bytes | None:
    engine = getattr(scope["app"].state, "engine", None) if "app" in scope else None
    return None if engine is None or engine.settings.api_token is None else engine.settings.api_token.encode()


class RequestMetrics:
    """Pure ASGI middleware: count each HTTP request and WebSocket handshake in the engine's metrics, by the
    template of the route that matched (UNMATCHED_ROUTE if none did) and the status of its answer.

    A WebSocket accepted counts as 101, one closed before that as 403 (what the server answers). A client that went
    away before its answer began counts as 499, not as the error the app answers to nobody.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, watching its messages; count it once it is over."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        status, is_answered, is_gone = 500, False, False  # an exception leaving the app becomes a 500 further out

        async def watched_receive() -> Message:
            nonlocal is_gone
            message = await receive()
            is_gone = is_gone or (not is_answered and message["type"].endswith(".disconnect"))
            return message

        async def watched_send(message: Message) -> None:
            nonlocal status, is_answered
            if not is_answered and message["type"] in _ANSWER_STATUS:
                status, is_answered = message.get("status", _ANSWER_STATUS[message["type"]]), True
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            engine = getattr(scope["app"].state, "engine", None) if "app" in scope else None
            if engine is not None:
                engine.metrics.count_request(_route_template(scope), 499 if is_gone else status)


# The first message of an answer, and its status when the message has none.
_ANSWER_STATUS = {"http.response.start": 500, "websocket.accept": 101, "websocket.close": 403,
                  "websocket.http.response.start": 403}


def _route_template(scope: Scope) -> str:
    """The path template of the route the router matched, or, for a request refused before routing (401), of the
    route it would have matched."""
    route = scope.get("route")
    if route is None and "app" in scope:
        route = next((route for route in scope["app"].routes if route.matches(scope)[0] is not Match.NONE), None)
    return UNMATCHED_ROUTE if route is None else route.path


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log record: time, level, message, and the record's `fields` (run id, node, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON."""
        payload = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(), "level": record.levelname.lower(),
                   "logger": record.name, "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def error_response(status_code: int, code: ErrorCode, message: str, details: list[Problem] | None = None,
                   headers: Mapping[str, str] | None = None) -> _Answer:
    """Build the one error shape every non-2xx answer has."""
    return _Answer(_error_body(code, message, details), status_code=status_code, headers=headers)


def _error_body(code: ErrorCode, message: str, details: list[Problem] | None) -> dict[str, Any]:
    return converter.unstructure(ErrorResponse(error=ErrorBody(code=code, message=message, details=details or [])))


async def on_engine_error(request: Request, exc: Exception) -> Response:
    """Answer an EngineError with its own status, code and details."""
    assert isinstance(exc, EngineError)
    return error_response(exc.status_code, exc.code, exc.message, exc.details, headers=exc.headers)


_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Answer the router's 404 and 405 in the error shape, keeping headers such as `Allow`."""
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def on_client_gone(request: Request, exc: Exception) -> Response:
    """A client that hung up mid-request is not an error: note it at DEBUG; nobody is there to read the answer."""
    logger.debug("client went away during %s %s", request.method, request.url.path)
    return Response(status_code=400)


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    """Answer a bug with a fixed 500 message; the traceback goes to the server log only."""
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, ErrorCode.INTERNAL_ERROR, "internal error; see the server log")


@attrs.frozen(kw_only=True)
class EventStream:
    """An answer of Server-Sent Events; each kind of event carries, in its `data` line, the JSON text of a model."""

    data: Mapping[StreamEvent, type]


@attrs.frozen(kw_only=True)
class PlainText:
    """An answer of text in the format its media type names, such as the Prometheus text format."""

    media_type: str


@attrs.frozen(kw_only=True)
class Operation:
    """One endpoint: its route, and what the OpenAPI document says of it (derived from the models it speaks)."""

    method: str
    path: str
    endpoint: Callable[..., Awaitable[Any]]
    summary: str
    body: type | None = None
    answers: Mapping[int, Any] = attrs.field(factory=dict)  # status -> model of the body, EventStream, PlainText, None
    query: Mapping[str, str] = attrs.field(factory=dict)  # parameter -> JSON type
    headers: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)  # optional request header -> its schema


async def get_openapi(request: Request) -> Response:
    """Answer with the OpenAPI 3.1 document of every endpoint."""
    return _Answer(request.app.state.openapi)


_IDEMPOTENCY_HEADER = {"Idempotency-Key": {
    "type": "string", "pattern": f"^{IDEMPOTENCY_KEY_PATTERN.pattern}$",
    "description": "A request like an earlier one with this key answers for that one's run"}}
OPERATIONS = (  # the router tries them in this order, so the busiest come first (each costs about four calls)
    Operation(method="POST", path="/graph/run", endpoint=post_graph_run, summary="Run a stored graph", body=RunRequest,
              answers={200: RunResponse, 202: RunAccepted}, headers=_IDEMPOTENCY_HEADER),
    Operation(method="GET", path="/graph/state/{run_id}", endpoint=get_graph_state, summary="A run's record",
              answers={200: RunContext}),
    Operation(method="GET", path="/", endpoint=get_health, summary="Health check", answers={200: HealthResponse}),
    Operation(method="POST", path="/graph/create", endpoint=post_graph_create, summary="Store a graph definition",
              body=GraphDefinition, answers={200: CreateGraphResponse, 201: CreateGraphResponse}),
    Operation(method="GET", path="/graph/definition/{graph_id}", endpoint=get_graph_definition,
              summary="A stored graph, as /graph/create takes it (`?declarations=true` adds what its nodes read and write)",
              answers={200: GraphDefinition}, query={"declarations": "boolean"}),
    Operation(method="DELETE", path="/graph/definition/{graph_id}", endpoint=delete_graph_definition,
              summary="Delete a stored graph that no pending or running run uses; its stopped runs stay",
              answers={204: None}),
    Operation(method="POST", path="/graph/cancel/{run_id}", endpoint=post_graph_cancel,
              summary="Cancel a pending or running run", answers={200: RunContext}),
    Operation(method="POST", path="/graph/resume/{run_id}", endpoint=post_graph_resume,
              summary="Go on with a waiting or interrupted run", body=ResumeRequest,
              answers={200: RunResponse, 202: RunAccepted}, headers=_IDEMPOTENCY_HEADER),
    Operation(method="GET", path="/graph/runs", endpoint=get_graph_runs, summary="Run summaries, newest first",
              answers={200: RunsPage},
              query={"graph_id": "string", "status": "string", "limit": "integer", "offset": "integer"}),
    Operation(method="DELETE", path="/graph/runs/{run_id}", endpoint=delete_graph_run,
              summary="Delete a run that is neither pending nor running, with its log", answers={204: None}),
    Operation(method="GET", path="/graph/list", endpoint=get_graph_list, summary="Graphs, oldest first",
              answers={200: GraphsPage}, query={"limit": "integer", "offset": "integer"}),
    Operation(method="GET", path="/graph/stream/{run_id}", endpoint=get_graph_stream,
              summary="A run's events as Server-Sent Events; each event's `data` line is JSON text",
              answers={200: EventStream(data={StreamEvent.STATUS: StatusUpdate, StreamEvent.LOG: LogEntry,
                                              StreamEvent.END: RunEnd})}),
    Operation(method="GET", path="/graph/ws/{run_id}", endpoint=websocket_graph_ws,
              summary="WebSocket: the stream's events as JSON messages `{id, event, data}`, `data` an object",
              answers={101: None}, query={"after": "integer"}),
    Operation(method="GET", path="/metrics", endpoint=get_metrics,
              summary="This process's counters, gauges and histograms in the Prometheus text format",
              answers={200: PlainText(media_type=PROMETHEUS_MEDIA_TYPE)}),
    Operation(method="GET", path="/openapi.json", endpoint=get_openapi, summary="This document", answers={200: Any}),
)


def json_schema(type_: Any, components: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of values of `type_` as the converter reads and writes them; attrs classes go to components."""
    origin, args = typing.get_origin(type_), typing.get_args(type_)
    if type_ is Any:
        return {}
    if attrs.has(type_):
        if type_.__name__ not in components:
            components[type_.__name__] = {}  # taken before the fields, in case a class refers to itself
            fields = attrs.fields(type_)
            components[type_.__name__] = {
                "type": "object", "description": (type_.__doc__ or "").split("\n")[0], "additionalProperties": False,
                "properties": {_wire_name(field): json_schema(field.type, components) for field in fields},
                "required": [_wire_name(field) for field in fields if field.default is attrs.NOTHING],
            }
        return {"$ref": f"#/components/schemas/{type_.__name__}"}
    if isinstance(type_, type) and issubclass(type_, enum.Enum):
        return {"type": "string", "enum": [member.value for member in type_]}
    if type_ in _KINDS or type_ is type(None):
        return {"type": "null" if type_ is type(None) else _KINDS[type_].value}
    if type_ is datetime:
        return {"type": "string", "format": "date-time"}
    if origin in (types.UnionType, typing.Union):
        return {"anyOf": [json_schema(arg, components) for arg in args]}
    if origin in (list, tuple):
        return {"type": "array", "items": json_schema(args[0], components)}
    if origin is dict:
        return {"type": "object", "additionalProperties": json_schema(args[1], components)}
    raise TypeError(f"no JSON schema for {type_!r}")


def _wire_name(field: attrs.Attribute) -> str:
    return field.metadata.get("wire_name", field.name)


def openapi_document(operations: tuple[Operation, ...]) -> dict[str, Any]:
    """Describe `operations` as an OpenAPI 3.1 document; every schema is derived from the models."""
    components: dict[str, Any] = {}
    error = {"description": "The error shape", "content": {"application/json": {
        "schema": json_schema(ErrorResponse, components)}}}
    paths: dict[str, Any] = {}
    for operation in operations:
        spec: dict[str, Any] = {"summary": operation.summary, "operationId": operation.endpoint.__name__,
                                "parameters": _parameters(operation), "responses": {"4XX": error, "5XX": error}}
        if operation.body is not None:
            spec["requestBody"] = {"content": {"application/json": {"schema": json_schema(operation.body, components)}}}
        for status, model in operation.answers.items():
            answer: dict[str, Any] = {"description": HTTPStatus(status).phrase}
            if isinstance(model, EventStream):
                answer["content"] = {"text/event-stream": {"schema": _event_stream_schema(model, components)}}
            elif isinstance(model, PlainText):
                answer["content"] = {model.media_type: {"schema": {"type": "string"}}}
            elif model is not None:
                answer["content"] = {"application/json": {"schema": json_schema(model, components)}}
            spec["responses"][str(status)] = answer
        paths.setdefault(operation.path, {})[operation.method.lower()] = spec
    info = {"title": "workflow_engine", "version": "1", "description": (__doc__ or "").split("\n")[0]}
    return {"openapi": "3.1.0", "info": info, "paths": paths, "components": {"schemas": components}}


def _event_stream_schema(stream: EventStream, components: dict[str, Any]) -> dict[str, Any]:
    """The schema of a whole stream, as an array of its events (OpenAPI 3.1 has no schema per item).

    Each event is modelled as the HTML standard parses it: an object of string fields, comments left out. Its
    `data` is JSON text, so JSON Schema's `contentMediaType` and `contentSchema` say what it holds.
    """
    events = [{
        "type": "object", "required": ["id", "event", "data"], "additionalProperties": False, "properties": {
            "id": {"type": "string", "pattern": "^[1-9][0-9]*$"}, "event": {"const": kind.value},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": json_schema(model, components)}},
    } for kind, model in stream.data.items()]
    return {"type": "array", "items": {"oneOf": events}}


def _parameters(operation: Operation) -> list[dict[str, Any]]:
    in_path = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
               for name in re.findall(r"{(\w+)}", operation.path)]
    in_query = [{"name": name, "in": "query", "required": False, "schema": {"type": kind}}
                for name, kind in operation.query.items()]
    return in_path + in_query + [{"name": name, "in": "header", "required": False, "schema": dict(schema)}
                                 for name, schema in operation.headers.items()]


# ---------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------
def _env_log_format(raw: str) -> LogFormat:
    try:
        return LogFormat(raw)
    except ValueError:
        raise ValueError("must be text or json") from None


def _env_number(kind: type) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}") from None
    return parse


def _env_modules(raw: str) -> tuple[str, ...]:
    return tuple(module.strip() for module in raw.split(",") if module.strip())


def _env_hosts(raw: str) -> tuple[str, ...]:
    return parse_webhook_hosts(entry for entry in raw.split(",") if entry.strip())


_ENV_SETTINGS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (  # variable, Settings field, parser
    ("WORKFLOW_MAX_ITERATIONS", "max_iterations", _env_number(int)),
    ("WORKFLOW_MAX_ITERATIONS_CAP", "max_iterations_cap", _env_number(int)),
    ("WORKFLOW_MAX_RUNS", "max_runs", _env_number(int)),
    ("WORKFLOW_MAX_GRAPHS", "max_graphs", _env_number(int)),
    ("WORKFLOW_MAX_BODY_BYTES", "max_body_bytes", _env_number(int)),
    ("WORKFLOW_MAX_CONCURRENT_RUNS", "max_concurrent_runs", _env_number(int)),
    ("WORKFLOW_MAX_PENDING_RUNS", "max_pending_runs", _env_number(int)),
    ("WORKFLOW_MAX_PAUSED_RUNS", "max_paused_runs", _env_number(int)),
    ("WORKFLOW_LEASE_S", "lease_s", _env_number(float)),
    ("WORKFLOW_MAX_RECOVERIES", "max_recoveries", _env_number(int)),
    ("WORKFLOW_WORKER_ID", "worker_id", str),
    ("WORKFLOW_MAX_NODES", "max_nodes", _env_number(int)),
    ("WORKFLOW_MAX_BRANCHES", "max_branches", _env_number(int)),
    ("WORKFLOW_MAX_FANOUT", "max_fanout", _env_number(int)),
    ("WORKFLOW_MAX_STATE_BYTES", "max_state_bytes", _env_number(int)),
    ("WORKFLOW_MAX_LOG_BYTES", "max_log_bytes", _env_number(int)),
    ("WORKFLOW_MAX_METRIC_GRAPHS", "max_metric_graphs", _env_number(int)),
    ("WORKFLOW_SHUTDOWN_GRACE_S", "shutdown_grace_s", _env_number(float)),
    ("WORKFLOW_RUN_TTL_S", "run_ttl_s", _env_number(float)),
    ("WORKFLOW_PAUSED_TTL_S", "paused_ttl_s", _env_number(float)),
    ("WORKFLOW_IDEMPOTENCY_TTL_S", "idempotency_ttl_s", _env_number(float)),
    ("WORKFLOW_WEBHOOK_HOSTS", "webhook_hosts", _env_hosts),
    ("WORKFLOW_WEBHOOK_SECRET", "webhook_secret", str),
    ("WORKFLOW_WEBHOOK_ATTEMPTS", "webhook_attempts", _env_number(int)),
    ("WORKFLOW_WEBHOOK_BACKOFF_S", "webhook_backoff_s", _env_number(float)),
    ("WORKFLOW_DB", "db_path", str),
    ("WORKFLOW_API_TOKEN", "api_token", str),
    ("WORKFLOW_LOG_FORMAT", "log_format", _env_log_format),
    ("WORKFLOW_MODULES", "workflow_modules", _env_modules),
)


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Read Settings from WORKFLOW_* variables (see the README's settings table); unset or empty ones keep defaults.

    A bad value raises ValueError naming the variable, what it holds and what it must be.
    """
    env = os.environ if environ is None else environ
    fields, values = attrs.fields_dict(Settings), {}
    for variable, name, parse in _ENV_SETTINGS:
        raw = env.get(variable)
        if raw is None or not raw.strip() and name != "workflow_modules":  # an empty module list loads none
            continue
        raw = raw.strip()
        try:
            value = parse(raw)
            if fields[name].validator is not None:
                fields[name].validator(None, fields[name], value)
        except ValueError as exc:  # a validator names the Settings field; the operator knows the variable, put first
            problem = str(exc).removeprefix(f"{name} ").removeprefix(f"'{name}' ")
            raise ValueError(f"{variable}={raw[:40]!r}: {problem}") from None
        values[name] = value
    iterations, cap = values.get("max_iterations", MAX_ITERATIONS), values.get("max_iterations_cap", MAX_ITERATIONS_CAP)
    if iterations > cap:  # else every run would be refused for a max_iterations its client never sent
        raise ValueError(f"WORKFLOW_MAX_ITERATIONS ({iterations}) must be at most WORKFLOW_MAX_ITERATIONS_CAP ({cap})")
    return Settings(**values)


def load_workflows(registry: Registry, modules: tuple[str, ...] | None) -> None:
    """Import each workflow module and call its `register(registry)`.

    With `modules` None the DEFAULT_WORKFLOWS are loaded, each skipped quietly when absent (this file copied alone);
    a module named explicitly must exist.
    """
    for name in DEFAULT_WORKFLOWS if modules is None else modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if modules is None and exc.name == name:
                logger.info("default workflow module %r not found; skipped", name)
                continue
            raise RuntimeError(f"workflow module {name!r} (from WORKFLOW_MODULES) cannot be imported: {exc}") from exc
        module.register(registry)


def _server_log_level(is_json: bool) -> int:
    """The level of the log handler a server sets up: every step in JSON (for a log store), how each run ended in
    text; or what uvicorn's `--log-level` asked for (it sets the level of its logger `uvicorn.error`) if higher."""
    asked = logging.getLogger("uvicorn.error").level
    return max(logging.DEBUG if is_json else logging.INFO, asked if asked > logging.INFO else logging.NOTSET)


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    """While serving: the engine (the default app builds it now, from the environment), a log handler if the host
    set none, and recovery; at shutdown, let runs finish for the grace period and close the store."""
    is_from_env = app.state.engine is None
    if is_from_env:
        _serve(app, build_engine(settings=settings_from_env()))
    engine: Engine = app.state.engine
    handler = None
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        is_json = engine.settings.log_format is LogFormat.JSON
        handler.setFormatter(JsonLogFormatter() if is_json else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(_server_log_level(is_json))
    if engine.settings.api_token is None:
        logger.warning("authentication is off: set WORKFLOW_API_TOKEN to require a bearer token")
    if importlib.util.find_spec("websockets") is None and importlib.util.find_spec("wsproto") is None:
        logger.warning("WebSockets are off: /graph/ws/{run_id} needs the websockets package (pip install websockets)")
    await engine.open()
    if is_from_env:
        # This process serves the default app: what exists now (modules, the registry, the routes, the converter's
        # generated code) lives as long as it does, so the collector's full passes, which stop the loop for every
        # request in flight, need not walk it again: about 35,000 objects, most of a 15 ms pass (0.3 to 2 ms without).
        gc.freeze()
    try:
        with _draining_on_exit_signals(engine):
            yield
        await engine.shutdown()
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        if is_from_env:
            gc.unfreeze()
            app.state.engine = None  # a later start reads the environment again


@contextlib.contextmanager
def _draining_on_exit_signals(engine: Engine) -> Iterator[None]:
    """While serving, SIGTERM and SIGINT also start the engine's drain, chained to the server's own handlers.

    uvicorn waits for open connections before it runs the lifespan's shutdown, so an open stream or a request
    that waits for a run would hold it up until the run ends; draining at once ends them within the grace period.
    Only a signal the server handles in Python (as uvicorn does) is chained; the others are left alone.
    """
    loop = asyncio.get_running_loop()
    is_main = threading.current_thread() is threading.main_thread()
    chained = {sig: handler for sig in (signal.SIGTERM, signal.SIGINT)
               if is_main and callable(handler := signal.getsignal(sig))}

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        loop.call_soon_threadsafe(lambda: loop.create_task(engine.drain(), name="drain on signal"))
        chained[signum](signum, frame)  # type: ignore[operator]

    for sig in chained:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in chained.items():
            signal.signal(sig, handler)


def build_engine(*, registry: Registry | None = None, store: Store | None = None,
                 settings: Settings | None = None) -> Engine:
    """Build an engine: without a `registry`, one filled from `settings.workflow_modules`; without a `store`,
    `settings.db_path` picks a SqliteStore, else a MemoryStore."""
    settings = settings or Settings()
    if registry is None:
        registry = Registry()
        load_workflows(registry, settings.workflow_modules)
    if store is None and settings.db_path:
        store = open_store(settings.db_path, max_runs=settings.max_runs, max_graphs=settings.max_graphs)
    return Engine(registry, store, settings)


def create_app(*, registry: Registry | None = None, store: Store | None = None,
               settings: Settings | None = None) -> Starlette:
    """Build the HTTP app with its own engine.

    Given any of `registry`, `store` and `settings`, the engine is built now (`build_engine`): graphs registered on
    the registry are validated at once, so a bad built-in graph stops it. Given none, the app builds its engine
    when it starts (its lifespan), from the WORKFLOW_* environment variables: importing this module reads no
    setting, imports no workflow module and opens no database, and a bad setting stops startup naming its variable.
    """
    by_path: dict[str, dict[str, Callable[..., Awaitable[Any]]]] = {}
    for operation in OPERATIONS:
        by_path.setdefault(operation.path, {})[operation.method] = operation.endpoint
    routes = [WebSocketRoute(path, endpoints["GET"]) if endpoints.get("GET") is websocket_graph_ws
              else Route(path, _Endpoints(endpoints), methods=list(endpoints)) for path, endpoints in by_path.items()]
    handlers = {EngineError: on_engine_error, HTTPException: on_http_error, ClientDisconnect: on_client_gone,
                Exception: on_unexpected_error}
    middleware = [Middleware(RequestMetrics), Middleware(BearerAuth)]  # outermost first: refused requests count too
    starlette_app = Starlette(routes=routes, exception_handlers=handlers, middleware=middleware, lifespan=_lifespan)
    starlette_app.router.redirect_slashes = False  # its 307 has no body; an unknown path is a JSON 404 instead
    starlette_app.state.engine = None
    if registry is not None or store is not None or settings is not None:
        _serve(starlette_app, build_engine(registry=registry, store=store, settings=settings))
    return starlette_app


class _Endpoints:
    """A path's ASGI app: the endpoint of the request's method answers, so a wrong method's 405 lists all in Allow.
    Starlette's wrapper of each function would add a Request and a second layer of exception handling: 5 calls."""

    def __init__(self, endpoints: dict[str, Callable[[Request], Awaitable[Response]]]) -> None:
        self.endpoints = {"HEAD": endpoints["GET"], **endpoints} if "GET" in endpoints else endpoints  # as Route does
        self.__name__ = next(iter(endpoints.values())).__name__  # the route's name (url_path_for), as Starlette's

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.endpoints[scope["method"]](Request(scope, receive, send))
        await response(scope, receive, send)


def _serve(app: Starlette, engine: Engine) -> None:
    app.state.engine = engine
    app.state.openapi = openapi_document(OPERATIONS)
    app.state.openapi["x-node-declarations"] = {  # what each registered node function reads and writes
        name: converter.unstructure(io) for name in engine.registry.node_names if (io := engine.registry.node_io(name))}


app = create_app()
