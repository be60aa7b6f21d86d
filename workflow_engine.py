"""A minimal async workflow engine: graphs of Python nodes over a shared state, served over HTTP.

Nodes are registered Python functions (async, or plain ones run in a worker thread) that read and update a
`WorkflowState` (`data` and `metadata`). A graph, written as JSON, names a start node, its nodes, and per node a
default next node plus ordered branches on registered conditions; loops are allowed and bounded by
`max_iterations`. Every step is logged with the keys it changed and their new values.

Run it:    uvicorn workflow_engine:app            (loads the modules in WORKFLOW_MODULES, default `code_review`)
Embed it:  app = create_app(registry=my_registry)  (a Starlette app with its own registry and store)
Call it:   run = await Engine(registry).run(graph, WorkflowState(data={...}))

Endpoints:
    GET  /                             health check
    POST /graph/create                 store a graph definition      -> 201 {"graph_id", "warnings"}
    POST /graph/run                    run a stored graph            -> 200 run record; "wait": false -> 202
    GET  /graph/state/{run_id}         a run's record
    GET  /graph/definition/{graph_id}  a stored graph, as /graph/create accepts it
    POST /graph/cancel/{run_id}        cancel a pending or running run
    GET  /graph/stream/{run_id}        the run's events as Server-Sent Events (WS /graph/ws/{run_id}: as JSON)
    GET  /graph/runs, /graph/list      run summaries (newest first) and graphs, paginated
    POST /graph/resume/{run_id}        go on with a waiting or interrupted run
    GET  /openapi.json                 the OpenAPI 3.1 document, derived from the models

Every non-2xx answer has one shape:
    {"error": {"code": "graph_not_found", "message": "graph 'x' does not exist", "details": [{"path", "message"}]}}
"""

import asyncio
import contextlib
import enum
import functools
import hmac
import importlib
import inspect
import itertools
import json
import logging
import marshal
import math
import os
import re
import secrets
import socket
import sqlite3
import sys
import time
import types
import typing
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
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
from cattrs.gen import make_dict_unstructure_fn, override
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

__all__ = [
    "BearerAuth",
    "BranchCondition",
    "Busy",
    "EdgeDef",
    "Engine",
    "EngineError",
    "ErrorCode",
    "GraphConflict",
    "GraphDefinition",
    "GraphNotFound",
    "Interrupt",
    "InvalidGraph",
    "InvalidJson",
    "InvalidRequest",
    "JsonKind",
    "JsonLogFormatter",
    "LogEntry",
    "LogEvent",
    "LogFormat",
    "MemoryStore",
    "NodeContext",
    "NodeDef",
    "NodeIO",
    "OPERATIONS",
    "Operation",
    "Problem",
    "Registry",
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
    "SqliteStore",
    "StoreFull",
    "StreamEvent",
    "UnknownName",
    "WorkflowState",
    "app",
    "create_app",
    "execute_run",
    "graph_warnings",
    "json_problem",
    "json_schema",
    "new_run",
    "openapi_document",
    "run_events",
    "run_graph",
    "settings_from_env",
    "structure_body",
    "validate_graph",
]

T = TypeVar("T")

# ---------------------------------------------------------------------------
# Constants and limits
# ---------------------------------------------------------------------------
MAX_ITERATIONS = 100  # node executions per run unless the graph or the run request says otherwise
MAX_ITERATIONS_CAP = 10_000  # server-wide ceiling on any max_iterations a graph or run may ask for
MAX_STORED_RUNS = 10_000  # finished runs kept in memory; the oldest finished is evicted first
MAX_STORED_GRAPHS = 10_000  # graph definitions kept in memory
RUN_COMPRESSION_LEVEL = 6  # zlib level of stored finished runs: a code-review record shrinks about fourfold
MAX_BODY_BYTES = 1024 * 1024  # largest request body accepted
MAX_CONCURRENT_RUNS = 1_000  # runs executing at once; more wait as `pending`
MAX_PENDING_RUNS = 10_000  # runs waiting for a slot; beyond this a new run is refused with 503
RETRY_AFTER_S = 1  # what a 503 tells the client to wait
STREAM_KEEPALIVE_S = 15.0  # an idle event stream sends a comment this often, so proxies keep it open
STREAM_POLL_S = 0.25  # how often a stream reads the store for a run that another process executes
SQLITE_BUSY_TIMEOUT_S = 10.0  # how long a write waits for another process's write to finish
MAX_PAGE = 1_000  # most items one list request returns
MAX_NODES = 1_000  # nodes in one graph
MAX_BRANCHES = 100  # branches on one edge
MAX_STATE_BYTES = 4 * 1024 * 1024  # a run's data, counted as the JSON text of its values; past it the step fails
MAX_LOG_BYTES = 4 * 1024 * 1024  # the updates a run's log keeps, counted the same way; past it values are left out
MAX_ID_CHARS = 128  # longest graph id
SHUTDOWN_GRACE_S = 10.0  # on shutdown, how long running runs may go on before they are cancelled
MAX_TIMEOUT_S = 86_400.0  # longest timeout or backoff a graph or run may ask for
MAX_ATTEMPTS = 100  # most tries a retry policy may ask for
MAX_JSON_DEPTH = 64  # deepest nesting of lists and objects accepted in bodies and node output
GRAPH_ID_PATTERN = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_ID_CHARS}}}")
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
    STORE_FULL = "store_full"
    BODY_TOO_LARGE = "body_too_large"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"
    UNAUTHORIZED = "unauthorized"
    INTERNAL_ERROR = "internal_error"


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
        super().__init__(f"the request has {_count(details, 'problem')}", details)


class InvalidGraph(EngineError):
    """A graph definition breaks a graph rule (unknown node, bad edge, ...)."""

    status_code = 422
    code = ErrorCode.INVALID_GRAPH

    def __init__(self, details: list[Problem]) -> None:
        super().__init__(f"the graph has {_count(details, 'problem')}", details)


class UnknownName(EngineError):
    """A node, condition or tool name that is not registered."""

    status_code = 422
    code = ErrorCode.UNKNOWN_NAME

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; registered: {', '.join(sorted(known)) or 'none'}")


class GraphNotFound(EngineError):
    """No graph is stored under the id."""

    status_code = 404
    code = ErrorCode.GRAPH_NOT_FOUND

    def __init__(self, graph_id: str) -> None:
        super().__init__(f"graph {graph_id!r} does not exist")


class RunNotFound(EngineError):
    """No run is stored under the id (it never existed, or was evicted)."""

    status_code = 404
    code = ErrorCode.RUN_NOT_FOUND

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} does not exist")


class GraphConflict(EngineError):
    """A different graph is already stored under the id."""

    status_code = 409
    code = ErrorCode.GRAPH_CONFLICT

    def __init__(self, graph_id: str) -> None:
        super().__init__(f"graph {graph_id!r} already exists with a different definition")


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


class BodyTooLarge(EngineError):
    """The request body is over the size limit."""

    status_code = 413
    code = ErrorCode.BODY_TOO_LARGE

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the limit of {limit} bytes")


class Interrupt(Exception):
    """Raised by a node to pause its run for a person: the run ends `waiting`, and a resume runs the node again."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


def _count(items: list[Any], noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


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

    @property
    def is_active(self) -> bool:
        """True while the run waits for a slot or executes."""
        return self is RunStatus.PENDING or self is RunStatus.RUNNING

    @property
    def is_resumable(self) -> bool:
        """True when the run stopped part-way (for a person, or because its process died) and may be resumed."""
        return self is RunStatus.WAITING or self is RunStatus.INTERRUPTED

    @property
    def is_terminal(self) -> bool:
        """True once the run has ended for good and will not change again."""
        return not self.is_active and not self.is_resumable


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


def _positive(instance: object, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise InvalidValue(f"{attribute.name} must be at least 1, got {value}")


def _seconds(instance: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not 0 < value <= MAX_TIMEOUT_S:
        raise InvalidValue(f"{attribute.name} must be more than 0 and at most {MAX_TIMEOUT_S}, got {value}")


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


def _backoff_factor(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 1 <= value <= 10:
        raise InvalidValue(f"backoff_factor must be between 1 and 10, got {value}")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Try a failing node up to `max_attempts` times, waiting `backoff_s`, then that times `backoff_factor`, ..."""

    max_attempts: int = attrs.field(default=1, validator=[_positive, attrs.validators.le(MAX_ATTEMPTS)])
    backoff_s: float = attrs.field(default=0.0, validator=attrs.validators.and_(
        attrs.validators.ge(0.0), attrs.validators.le(MAX_TIMEOUT_S)))
    backoff_factor: float = attrs.field(default=2.0, validator=_backoff_factor)

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 for the first)."""
        return self.backoff_s * self.backoff_factor ** (attempt - 1)


NO_RETRY = RetryPolicy()


@attrs.frozen(kw_only=True)
class NodeDef:
    """A node with settings; in a graph's `nodes` a plain name stands for `NodeDef(name=...)`.

    `fn` names the registered function (default: `name`, so one function can serve several nodes), `config`
    reaches the node as `ctx.config`, and `timeout_s` bounds each attempt.
    """

    name: str
    fn: str | None = None
    timeout_s: float | None = attrs.field(default=None, validator=_seconds)
    retry: RetryPolicy = NO_RETRY
    config: dict[str, Any] = attrs.field(factory=dict)

    @property
    def function(self) -> str:
        """The name of the registered function this node calls."""
        return self.fn or self.name


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


@attrs.define(kw_only=True)
class RunContext:
    """The record of one run: its status, where it is, its state and its log."""

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


@attrs.frozen(kw_only=True)
class RunRequest:
    """The body of `POST /graph/run`."""

    graph_id: str
    state: WorkflowState = attrs.field(factory=WorkflowState)
    max_iterations: int | None = attrs.field(default=None, validator=_positive)
    timeout_s: float | None = attrs.field(default=None, validator=_seconds)
    wait: bool = True


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
    max_state_bytes: int = attrs.field(default=MAX_STATE_BYTES, validator=_positive)
    shutdown_grace_s: float = attrs.field(default=SHUTDOWN_GRACE_S, validator=attrs.validators.ge(0.0))
    db_path: str | None = None  # a SQLite file to keep graphs and runs in; None keeps them in memory
    api_token: str | None = None  # when set, every endpoint but GET / wants `Authorization: Bearer <api_token>`
    log_format: LogFormat = LogFormat.TEXT
    # None means DEFAULT_WORKFLOWS, each skipped quietly when absent; named modules must exist.
    workflow_modules: tuple[str, ...] | None = None
    max_log_bytes: int = attrs.field(default=MAX_LOG_BYTES, validator=_positive)


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


def _strict(expected: type, name: str, accepts: tuple[type, ...], rejects: tuple[type, ...] = ()) -> Callable:
    def hook(value: object, _: type) -> Any:
        if not isinstance(value, accepts) or isinstance(value, rejects):
            raise InvalidValue(f"expected {name}, got {_json_type(value)}")
        return expected(value) if expected is float else value

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
    converter.register_structure_hook(int, _strict(int, "an integer", (int,), (bool,)))
    converter.register_structure_hook(float, _strict(float, "a number", (int, float), (bool,)))
    converter.register_structure_hook(bool, _strict(bool, "a boolean", (bool,)))
    # Later factories are tried first, so the predicates must stay disjoint.
    converter.register_structure_hook_factory(
        is_mutable_sequence, _shape_guard(list, "an array", list_structure_factory)
    )
    converter.register_structure_hook_factory(
        lambda t: is_sequence(t) and not is_mutable_sequence(t),
        _shape_guard(list, "an array", homogenous_tuple_structure_factory),
    )
    converter.register_structure_hook_factory(is_mapping, _shape_guard(dict, "an object", mapping_structure_factory))

    def structure_node(value: object, _: type) -> str | NodeDef:
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return converter.structure(value, NodeDef)
        raise InvalidValue(f"expected a node name or a node object, got {_json_type(value)}")

    converter.register_structure_hook(str | NodeDef, structure_node)
    converter.register_unstructure_hook(datetime, datetime.isoformat)
    converter.register_structure_hook(datetime, lambda value, _: datetime.fromisoformat(value))
    # A log entry names the keys whose values it left out only when it left some out (past max_log_bytes).
    converter.register_unstructure_hook(LogEntry, make_dict_unstructure_fn(
        LogEntry, converter, updates_omitted=override(omit_if_default=True)))
    return converter


converter = _make_converter()


def _format_problem(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, InvalidValue):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTED_PLAIN_KEY = re.compile(rf"\['({_PLAIN_KEY.pattern})'\]")


def _split(problem: str) -> Problem:
    """Turn cattrs' `"<message> @ <path>"` into a Problem, writing `$.edges['a']` as `$.edges.a`."""
    message, _, path = problem.rpartition(" @ ")
    return Problem(_QUOTED_PLAIN_KEY.sub(r".\1", path), message)


def key_path(path: str, key: str) -> str:
    """Extend a JSON path by an object key: `.key` for plain names, `['key']` otherwise."""
    return f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}[{key!r}]"


def structure_body(payload: object, cls: type[T]) -> T:
    """Turn a decoded JSON body into `cls`, or raise InvalidRequest listing every problem."""
    if not isinstance(payload, dict):  # cattrs raises a bare AttributeError here
        raise InvalidRequest([Problem("$", "expected a JSON object")])
    try:
        return converter.structure(payload, cls)
    except cattrs.BaseValidationError as exc:
        problems = cattrs.transform_error(exc, format_exception=_format_problem)
        raise InvalidRequest([_split(p) for p in problems]) from None


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
        if isinstance(value, dict):
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
F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Named node functions, conditions and tools, plus graphs to load at startup. There is no global one."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeFn] = {}
        self._async_nodes: set[str] = set()  # decided once here, not on every step
        self._io: dict[str, NodeIO] = {}
        self._conditions: dict[str, ConditionFn] = {}
        self._tools: dict[str, ToolFn] = {}
        self._graphs: dict[str, GraphDefinition] = {}

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
        fn = self._nodes.get(name) or self.get_node(name)
        return fn(state, ctx) if name in self._async_nodes else _in_thread(fn, state, ctx)

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
def validate_graph(graph: GraphDefinition, registry: Registry, *, limits: Settings = DEFAULT_SETTINGS) -> None:
    """Raise InvalidGraph listing every problem of `graph` against the names in `registry` and the `limits`."""
    problems = [*_id_problems(graph), *_node_problems(graph, registry), *_edge_problems(graph, registry)]
    problems += [Problem(f"$.interrupt_before[{index}]", f"unknown node {name!r}")
                 for index, name in enumerate(graph.interrupt_before) if name not in graph.node_defs]
    problems += _limit_problems(graph, limits)
    if problems:
        raise InvalidGraph(problems)


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
        warnings += [Problem(f"$.nodes[{index}]", f"node {name!r} reads {key!r}, which no node before it writes "
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


def _id_problems(graph: GraphDefinition) -> list[Problem]:
    if graph.graph_id is None or GRAPH_ID_PATTERN.fullmatch(graph.graph_id):
        return []
    return [Problem("$.graph_id", f"must be 1-{MAX_ID_CHARS} characters of A-Z, a-z, 0-9, '_', '.', '-'")]


def _node_problems(graph: GraphDefinition, registry: Registry) -> list[Problem]:
    problems = []
    if not graph.nodes:
        problems.append(Problem("$.nodes", "nodes must not be empty"))
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        node_def = NodeDef(name=node) if isinstance(node, str) else node
        path = f"$.nodes[{index}]" if isinstance(node, str) else f"$.nodes[{index}].{'fn' if node.fn else 'name'}"
        if node_def.name in seen:
            problems.append(Problem(f"$.nodes[{index}]", f"duplicate node {node_def.name!r}"))
        elif not registry.has_node(node_def.function):
            problems.append(Problem(path, f"unknown node function {node_def.function!r}"))
        seen.add(node_def.name)
    if graph.start_node not in seen:
        problems.append(Problem("$.start_node", f"unknown node {graph.start_node!r}"))
    return problems


def _edge_problems(graph: GraphDefinition, registry: Registry) -> list[Problem]:
    nodes = graph.node_defs
    problems = []
    for source, edge in graph.edges.items():
        path = key_path("$.edges", source)
        if source not in nodes:
            problems.append(Problem(path, f"unknown node {source!r}"))
        for field, target in (("default_next", edge.default_next), ("on_error", edge.on_error)):
            if target is not None and target not in nodes:
                problems.append(Problem(f"{path}.{field}", f"unknown node {target!r}"))
        for index, branch in enumerate(edge.branches):
            branch_path = f"{path}.branches[{index}]"
            if not registry.has_condition(branch.condition):
                problems.append(Problem(f"{branch_path}.condition", f"unknown condition {branch.condition!r}"))
            if branch.target not in nodes:
                problems.append(Problem(f"{branch_path}.target", f"unknown node {branch.target!r}"))
    return problems


# ---------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------
# The runner never raises for a node or condition failure: it records it in the log and ends the run `failed`.
@attrs.frozen(kw_only=True)
class NodeContext:
    """What a node gets besides the state: its run's ids, its node's `config`, a logger, and the registered tools."""

    run_id: str
    graph_id: str
    node: str
    config: dict[str, Any]
    registry: Registry

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


def _ignore(run: RunContext) -> None:
    return None


def _now() -> datetime:
    return datetime.now(UTC)


def _ms_since(clock: float) -> float:
    return (time.perf_counter() - clock) * 1000


def _new_id() -> str:
    # 128 random bits as 32 hex digits, like uuid4().hex at a quarter of its cost.
    return secrets.token_hex(16)


def new_run(
    graph: GraphDefinition, state: WorkflowState, *, max_iterations: int = MAX_ITERATIONS,
    timeout_s: float | None = None, max_state_bytes: int = MAX_STATE_BYTES, max_log_bytes: int = MAX_LOG_BYTES,
) -> RunContext:
    """Create a pending run record of `graph` that owns a copy of `state`; raise InvalidValue if it is not JSON."""
    return RunContext(
        run_id=_new_id(),
        graph_id=graph.graph_id or "",
        max_iterations=max_iterations,
        max_state_bytes=max_state_bytes,
        max_log_bytes=max_log_bytes,
        timeout_s=timeout_s,
        state=WorkflowState(data=_copy_json(state.data), metadata=_copy_json(state.metadata)),
        created_at=_now(),
    )


async def run_graph(
    graph: GraphDefinition, state: WorkflowState, registry: Registry, *,
    max_iterations: int = MAX_ITERATIONS, timeout_s: float | None = None,
) -> RunContext:
    """Run `graph` from its start node until it ends or hits `max_iterations`; return the finished run record."""
    run = new_run(graph, state, max_iterations=max_iterations, timeout_s=timeout_s)
    return await execute_run(run, graph, registry)


async def execute_run(
    run: RunContext, graph: GraphDefinition, registry: Registry, *,
    on_change: OnChange = _ignore, checkpoint: Checkpoint | None = None,
) -> RunContext:
    """Drive `run` through `graph` from its `next_node` (the start node for a new run), updating it in place.

    `on_change(run)` is called after every log entry and status change, and `checkpoint(run)` awaited after every
    step (a durable store commits it there). A run over its `timeout_s` ends `timed_out`; a cancelled run ends
    `cancelled` and the CancelledError propagates once that is recorded. Return the run.
    """
    is_resumed = run.next_node is not None
    run.next_node = run.next_node or graph.start_node
    run.status, run.started_at = RunStatus.RUNNING, run.started_at or _now()
    on_change(run)
    clock = time.perf_counter()
    # Entering asyncio.timeout costs as much as two steps, so a run without a timeout skips it.
    deadline = None if run.timeout_s is None else asyncio.timeout(run.timeout_s)
    try:
        async with deadline or contextlib.nullcontext():
            await _drive(run, graph, registry, _Hooks(on_change, checkpoint, deadline), is_resumed)
    except TimeoutError:
        run.status, run.error = RunStatus.TIMED_OUT, f"the run took longer than its timeout_s of {run.timeout_s} s"
    except asyncio.CancelledError:
        run.status, run.error = RunStatus.CANCELLED, f"the run was cancelled at node {run.current_node!r}"
        raise
    finally:
        run.finished_at = _now()
        run.duration_ms += _ms_since(clock)
        run.engine_overhead_ms = max(run.duration_ms - sum(entry.duration_ms for entry in run.logs), 0.0)
        on_change(run)
    return run


@attrs.frozen
class _Hooks:
    on_change: OnChange
    checkpoint: Checkpoint | None
    deadline: asyncio.Timeout | None


async def _drive(run: RunContext, graph: GraphDefinition, registry: Registry, hooks: _Hooks, is_resumed: bool) -> None:
    """Execute nodes from `run.next_node` until the run ends or pauses; set its status."""
    contexts: dict[str, NodeContext] = {}
    budget = _DataBudget(run)
    while (name := run.next_node) is not None:
        if run.iteration >= run.max_iterations:
            run.status = RunStatus.STOPPED_MAX_ITERATIONS
            return
        if name in graph.interrupt_before and not is_resumed:
            run.status = RunStatus.WAITING
            return
        is_resumed = False  # only the first node of a resumed run passes its interrupt_before
        run.iteration += 1
        run.current_node = name
        ctx = contexts.get(name) or contexts.setdefault(name, _node_context(run, graph.node_defs[name], registry))
        clock = time.perf_counter()
        try:
            entry = await _run_node(run, graph.node_defs[name], registry, ctx, hooks.on_change, budget)
        except asyncio.CancelledError:
            timed_out = hooks.deadline is not None and hooks.deadline.expired()
            run.logs.append(_interrupted(run, name, clock, LogEvent.TIMED_OUT if timed_out else LogEvent.CANCELLED))
            hooks.on_change(run)
            raise
        _route(run, graph.edges.get(name), entry, registry)
        run.logs.append(entry)
        run.next_node = entry.next
        if entry.event is LogEvent.INTERRUPT:
            run.status = RunStatus.WAITING
        elif entry.event is LogEvent.ERROR and entry.next is None:
            run.status, run.error = RunStatus.FAILED, entry.error
        hooks.on_change(run)
        if hooks.checkpoint is not None:
            await hooks.checkpoint(run)
        if run.status is not RunStatus.RUNNING:
            return
    run.status = RunStatus.COMPLETED


def _node_context(run: RunContext, node: NodeDef, registry: Registry) -> NodeContext:
    return NodeContext(run_id=run.run_id, graph_id=run.graph_id, node=node.name, config=node.config, registry=registry)


def _interrupted(run: RunContext, name: str, clock: float, event: LogEvent) -> LogEntry:
    duration_ms = _ms_since(clock)
    started_at = _now() - timedelta(milliseconds=duration_ms)
    reason = "the run timed out" if event is LogEvent.TIMED_OUT else "the run was cancelled"
    return LogEntry(iteration=run.iteration, node=name, event=event, started_at=started_at, duration_ms=duration_ms,
                    error=f"{reason} during node {name!r}")


def _route(run: RunContext, edge: EdgeDef | None, entry: LogEntry, registry: Registry) -> None:
    """Complete `entry` with the next node: a branch or the default after success, `on_error` after a failure."""
    if entry.event is LogEvent.INTERRUPT:
        entry.next = entry.node  # a resume runs the node again
        return
    if entry.event is LogEvent.ERROR:
        if edge is not None and edge.on_error is not None:
            _recover(run, entry, edge.on_error)
        return
    try:
        entry.next, entry.branch = _next_node(edge, run.state, registry, entry.node)
    except _StepFailed as exc:
        entry.event, entry.error = LogEvent.ERROR, str(exc)


_FLAT_TYPES = frozenset({str, int, float, bool, type(None)})  # values a node cannot change in place


async def _run_node(
    run: RunContext, node: NodeDef, registry: Registry, ctx: NodeContext, on_change: OnChange, budget: "_DataBudget"
) -> LogEntry:
    """Call the node until an attempt succeeds or none are left; log each failed attempt that is retried.

    Return the entry of the last attempt: `executed`, with its changes committed to the run, or `error`.
    """
    before, metadata = run.state.data, run.state.metadata
    function = node.function
    io = registry.node_io(function)
    nested = [key for key, value in before.items() if type(value) not in _FLAT_TYPES]  # what could change in place
    nested_metadata = [key for key, value in metadata.items() if type(value) not in _FLAT_TYPES] if metadata else []
    attempt = 1
    while True:
        # Each attempt works on copies of data and metadata, nested values too: whatever it changes in place, even
        # from a worker thread that outlives its timeout, stays out of the run. The run takes only the checked
        # copy of what changed, and drops every change to metadata (the caller's).
        working = WorkflowState(data=_private(before, nested) if nested else dict(before),
                                metadata=_private(metadata, nested_metadata) if metadata else {})
        started_at, clock = datetime.now(UTC), time.perf_counter()
        try:
            if io is not None:
                _check_reads(node.name, io, before)
            awaitable = registry.call_node(function, working, ctx)
            result = await (awaitable if node.timeout_s is None else _within(node, awaitable))
            updates, keys = _changes(node.name, before, working.data, result)
            if io is not None:
                _check_writes(node.name, io, updates, keys)
            omitted = budget.charge(node.name, updates, keys)
        except Interrupt as interrupt:
            return LogEntry(iteration=run.iteration, node=node.name, event=LogEvent.INTERRUPT, started_at=started_at,
                            duration_ms=_ms_since(clock), error=interrupt.reason or None, attempt=attempt)
        except Exception as exc:  # a failing node is recorded, never raised
            message = str(exc) if isinstance(exc, _StepFailed) else f"node {node.name!r} raised {_describe(exc)}"
            entry = LogEntry(iteration=run.iteration, node=node.name, event=LogEvent.ERROR, started_at=started_at,
                             duration_ms=_ms_since(clock), error=message, attempt=attempt)
            if attempt >= node.retry.max_attempts:
                return entry
            entry.event = LogEvent.RETRY
            run.logs.append(entry)
            on_change(run)
            await asyncio.sleep(node.retry.delay_s(attempt))
            attempt += 1
            continue
        if keys:
            run.state.data = _applied(before, updates, keys)
        entry = LogEntry(iteration=run.iteration, node=node.name, event=LogEvent.EXECUTED, started_at=started_at,
                         duration_ms=_ms_since(clock), keys_changed=keys, updates=updates, attempt=attempt)
        if omitted:
            entry.updates = {key: value for key, value in updates.items() if key not in omitted}
            entry.updates_omitted = omitted
        return entry


def _private(values: dict[str, Any], nested: list[str]) -> dict[str, Any]:
    """Copy `values` for one attempt: the dict, and deeply the values under `nested`.

    The run's values are plain JSON already (checked on their way in), so marshal copies them: in C, several times
    faster than a walk in Python.
    """
    copy = dict(values)
    if nested:
        copy.update(marshal.loads(marshal.dumps({key: values[key] for key in nested})))
    return copy


def _applied(before: dict[str, Any], updates: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The run's next data: a copy of `before` with `updates`, less the other `keys` (those the node removed)."""
    data = {**before, **updates}
    for key in keys:
        if key not in updates:
            del data[key]
    return data


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


class _DataBudget:
    """Keep a run's data under its `max_state_bytes` and the updates its log keeps under its `max_log_bytes`.

    Both count a value as the length of its JSON text. A step that would take the data over its limit fails; once
    the log is full, an entry keeps the keys a step changed but leaves out each new value that does not fit, so
    the log stays bounded while the run's data stays whole.
    """

    def __init__(self, run: RunContext) -> None:
        self.limit, self.log_limit = run.max_state_bytes, run.max_log_bytes
        self.sizes = {key: _json_size(value) for key, value in run.state.data.items()}
        self.total = sum(self.sizes.values())
        self.logged = sum(_json_size(value) for entry in run.logs for value in entry.updates.values())

    def charge(self, name: str, updates: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, ...]:
        """Count a step's changes, or raise _StepFailed (counting nothing) if they take the data over the limit.

        Return the keys whose new values the log leaves out, having counted those it keeps.
        """
        total, sizes, logged = self.total, [], 0
        for key in keys:  # a plain loop: this runs on every step
            size = _json_size(updates[key]) if key in updates else 0
            total += size - self.sizes.get(key, 0)
            logged += size
            sizes.append((key, size))
        if total > self.limit:
            raise _StepFailed(f"node {name!r} took the run's data to about {total} bytes, over its limit of {self.limit}")
        self.total = total
        self.sizes.update(sizes)
        if self.logged + logged <= self.log_limit:
            self.logged += logged
            return ()
        omitted = []
        for key, size in sizes:  # a removed key counts 0, so it always fits
            if self.logged + size <= self.log_limit:
                self.logged += size
            else:
                omitted.append(key)
        return tuple(omitted)


def _json_size(value: object) -> int:
    if type(value) is str:
        return len(value) + 2
    return 8 if type(value) in _PLAIN_SCALARS or type(value) is float else len(json.dumps(value, ensure_ascii=False))


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
    """Return a step's changes: checked copies of the changed keys' new values, and every changed key (removed last).

    A key changed if the node returned it, or bound, rebound, removed or changed in place its value in `data`, the
    node's own copy of `before`; a new value of the same type that compares equal to the old one is no change.
    """
    if result is not None and not isinstance(result, dict):
        raise _StepFailed(f"node {name!r} returned {type(result).__name__}, expected a dict or None")
    changed: dict[str, Any] = {}
    removed: tuple[str, ...] = ()
    if data != before:  # compared in C, so the per-key scan runs only for nodes that changed data
        for key, value in data.items():
            old = before.get(key, _MISSING)
            if old is not value and (type(old) is not type(value) or old != value):
                changed[key] = value
        # A key removed in place and returned too is replaced, not removed: listed once.
        removed = tuple(sorted(key for key in before.keys() - data.keys() if not result or key not in result))
    if result:
        changed.update(result)
    try:
        updates = _copy_json(changed)
    except InvalidValue as exc:
        raise _StepFailed(f"node {name!r} wrote data that is not JSON: {exc}") from None
    return updates, (*updates, *removed)


def _next_node(
    edge: EdgeDef | None, state: WorkflowState, registry: Registry, name: str
) -> tuple[str | None, str | None]:
    """Return the next node and the condition that chose it (None for the default edge)."""
    if edge is None:
        return None, None
    for branch in edge.branches:
        try:
            taken = registry.get_condition(branch.condition)(state)
        except Exception as exc:  # recorded as the step's error by _route
            raise _StepFailed(f"condition {branch.condition!r} of node {name!r} raised {_describe(exc)}") from exc
        if not isinstance(taken, bool):
            raise _StepFailed(f"condition {branch.condition!r} returned {type(taken).__name__}, expected bool")
        if taken:
            return branch.target, branch.condition
    return edge.default_next, None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------
# Two stores share one interface: reads are plain calls, writes are awaited. MemoryStore never awaits, so no other
# task can see it between a read and a write. SqliteStore reads on the caller's thread (WAL readers never wait for
# writers) and writes on one thread of its own, so a busy database never stalls the event loop. A finished run is
# kept as compact JSON: a fifth of the memory of its objects, nothing for the garbage collector to scan again and
# again, and ready to send as it is.
def summarize(run: RunContext) -> RunSummary:
    """The few fields of a run that lists show and filter on."""
    return RunSummary(run_id=run.run_id, graph_id=run.graph_id, status=run.status, current_node=run.current_node,
                      iteration=run.iteration, error=run.error, created_at=run.created_at, finished_at=run.finished_at)


def dump_json(value: Any) -> bytes:
    """Encode unstructured data as compact UTF-8 JSON, the way JSONResponse does."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _not_resumable(run_id: str, status: RunStatus) -> RunConflict:
    return RunConflict(f"run {run_id!r} is {status.value}; only a waiting or interrupted run can be resumed")


@attrs.frozen
class _StoredRun:
    summary: RunSummary
    record: bytes  # the run record's JSON, compressed


class MemoryStore:
    """Graphs and runs in memory: at most `max_runs` finished runs (oldest evicted first) and `max_graphs` graphs.

    Runs that are still going, waiting or interrupted are never evicted.
    """

    is_durable = False

    def __init__(self, *, max_runs: int = MAX_STORED_RUNS, max_graphs: int = MAX_STORED_GRAPHS) -> None:
        self.max_runs = max_runs
        self.max_graphs = max_graphs
        self._graphs: dict[str, GraphDefinition] = {}
        self._runs: dict[str, RunContext | _StoredRun] = {}  # oldest first; a run not yet finished is the live object
        self._finished: dict[str, None] = {}  # finished run ids, oldest first

    async def add_graph(self, graph: GraphDefinition) -> bool:
        """Store `graph`; return False if the same definition was already there, raise GraphConflict if another."""
        assert graph.graph_id is not None
        stored = self._graphs.get(graph.graph_id)
        if stored is not None:
            if stored != graph:
                raise GraphConflict(graph.graph_id)
            return False
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

    async def save_run(self, run: RunContext) -> None:
        """Store `run`, new or updated; once finished it is frozen and may be evicted to keep the store bounded."""
        if not run.status.is_terminal:
            self._runs[run.run_id] = run
            return
        record = zlib.compress(dump_json(converter.unstructure(run)), RUN_COMPRESSION_LEVEL)
        self._runs[run.run_id] = _StoredRun(summary=summarize(run), record=record)
        if run.run_id not in self._finished:
            self._finished[run.run_id] = None
            while len(self._finished) > self.max_runs:
                oldest = next(iter(self._finished))
                del self._finished[oldest], self._runs[oldest]

    async def claim_resumable(self, run_id: str) -> RunContext:
        """Mark a waiting or interrupted run pending again and return it; raise RunConflict for any other status."""
        run = self.get_run(run_id)
        if not run.status.is_resumable:
            raise _not_resumable(run_id, run.status)
        run.status = RunStatus.PENDING
        return run

    def has_run(self, run_id: str) -> bool:
        """Whether a run is stored as `run_id`."""
        return run_id in self._runs

    def get_run(self, run_id: str) -> RunContext:
        """Return the run stored as `run_id` (the live record until it finishes, then a copy)."""
        entry = self._entry(run_id)
        if isinstance(entry, RunContext):
            return entry
        return converter.structure(json.loads(zlib.decompress(entry.record)), RunContext)

    def get_run_json(self, run_id: str) -> bytes:
        """Return the record of the run stored as `run_id` as JSON, or raise RunNotFound."""
        entry = self._entry(run_id)
        return dump_json(converter.unstructure(entry)) if isinstance(entry, RunContext) else zlib.decompress(entry.record)

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
        """Nothing to release."""

    def _entry(self, run_id: str) -> RunContext | _StoredRun:
        try:
            return self._runs[run_id]
        except KeyError:
            raise RunNotFound(run_id) from None


def process_owner() -> str:
    """Name this process so that another can later tell whether it still lives: host, pid and start time."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    # Field 22 of /proc/PID/stat is when the process started, which tells a reused pid from the original.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _owner_is_alive(owner: str | None) -> bool:
    host, _, rest = (owner or "").partition(":")
    pid, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return host != socket.gethostname() and bool(host)  # another machine's process cannot be checked: trust it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return ticks in ("?", _start_ticks(int(pid)))


_SCHEMA = (  # version 1; a later version appends its statements as a new entry of _MIGRATIONS
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE graphs (seq INTEGER PRIMARY KEY AUTOINCREMENT, graph_id TEXT NOT NULL UNIQUE, definition TEXT NOT NULL)",
    "CREATE TABLE runs (seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL UNIQUE, graph_id TEXT NOT NULL,"
    " status TEXT NOT NULL, owner TEXT, head TEXT NOT NULL)",
    "CREATE INDEX runs_by_status ON runs (status, seq)",
    "CREATE INDEX runs_by_graph ON runs (graph_id, seq)",
    "CREATE TABLE logs (run_id TEXT NOT NULL, position INTEGER NOT NULL, entry TEXT NOT NULL,"
    " PRIMARY KEY (run_id, position)) WITHOUT ROWID",
)
_MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA,)
_TERMINAL = tuple(status.value for status in RunStatus if status.is_terminal)
_SUMMARY_FIELDS = tuple(field.name for field in attrs.fields(RunSummary))


class SqliteStore:
    """Graphs and runs in a SQLite file (WAL) that several server processes can share.

    Every step of a run is committed in one transaction (its record and its new log entries), so a crash loses at
    most the step that was executing. Opening the file creates or migrates the schema, then marks the runs whose
    process is gone as `interrupted`. At most `max_runs` finished runs are kept, the oldest deleted first.
    """

    is_durable = True

    def __init__(self, path: str | os.PathLike[str], *, max_runs: int = MAX_STORED_RUNS,
                 max_graphs: int = MAX_STORED_GRAPHS) -> None:
        self.path, self.max_runs, self.max_graphs = str(path), max_runs, max_graphs
        self.owner = process_owner()  # recorded with each active run, so a later process can tell if it died
        self._reader = self._connect()  # the caller's thread
        self._writer = self._connect()  # only ever used on self._thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="workflow-sqlite")
        self._saved_logs: dict[str, int] = {}  # log entries already written, by run id
        self._graph_cache: dict[str, GraphDefinition] = {}  # stored graphs never change
        self._migrate()
        self._recover()

    async def add_graph(self, graph: GraphDefinition) -> bool:
        """Store `graph`; return False if the same definition was already there, raise GraphConflict if another."""
        assert graph.graph_id is not None
        stored = await self._write(self._insert_graph, graph.graph_id, dump_json(converter.unstructure(graph)))
        if stored is not None and converter.structure(json.loads(stored), GraphDefinition) != graph:
            raise GraphConflict(graph.graph_id)
        return stored is None

    def get_graph(self, graph_id: str) -> GraphDefinition:
        """Return the graph stored as `graph_id`, or raise GraphNotFound."""
        graph = self._graph_cache.get(graph_id)
        if graph is None:
            row = self._reader.execute("SELECT definition FROM graphs WHERE graph_id = ?", (graph_id,)).fetchone()
            if row is None:
                raise GraphNotFound(graph_id)
            graph = self._graph_cache[graph_id] = converter.structure(json.loads(row[0]), GraphDefinition)
        return graph

    def list_graphs(self, *, limit: int = 50, offset: int = 0) -> tuple[list[GraphDefinition], int]:
        """Return a page of graphs in the order they were created, and how many there are."""
        with self._reading() as db:
            rows = db.execute("SELECT definition FROM graphs ORDER BY seq LIMIT ? OFFSET ?", (limit, offset)).fetchall()
            total = db.execute("SELECT COUNT(*) FROM graphs").fetchone()[0]
        return [converter.structure(json.loads(row[0]), GraphDefinition) for row in rows], total

    async def save_run(self, run: RunContext) -> None:
        """Commit `run`'s record and its log entries not yet written, in one transaction."""
        saved = self._saved_logs.get(run.run_id, 0)
        head = converter.unstructure(attrs.evolve(run, logs=[]))
        del head["logs"]
        entries = [(run.run_id, position, dump_json(converter.unstructure(entry)))
                   for position, entry in enumerate(run.logs[saved:], start=saved)]
        # The writer thread gets values, not the live run, which the event loop may change meanwhile.
        owner = self.owner if run.status.is_active else None
        await self._write(self._upsert_run, run.run_id, run.graph_id, run.status, dump_json(head), entries, owner)
        self._saved_logs[run.run_id] = len(run.logs)
        if not run.status.is_active:
            del self._saved_logs[run.run_id]

    async def claim_resumable(self, run_id: str) -> RunContext:
        """Mark a waiting or interrupted run pending for this process and return it; raise RunConflict otherwise."""
        await self._write(self._claim, run_id)
        run = self.get_run(run_id)
        self._saved_logs[run_id] = len(run.logs)
        return run

    def has_run(self, run_id: str) -> bool:
        """Whether a run is stored as `run_id`."""
        return self._reader.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None

    def get_run(self, run_id: str) -> RunContext:
        """Return a copy of the run stored as `run_id`, or raise RunNotFound."""
        return converter.structure(self._record(run_id), RunContext)

    def get_run_json(self, run_id: str) -> bytes:
        """Return the record of the run stored as `run_id` as JSON, or raise RunNotFound."""
        return dump_json(self._record(run_id))

    def list_runs(
        self, *, graph_id: str | None = None, status: RunStatus | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[RunSummary], int]:
        """Return a page of run summaries, newest first, that match the filters, and how many match in all."""
        # The SQL below is assembled from constant fragments only; every value is a bound parameter.
        where = "WHERE (?1 IS NULL OR graph_id = ?1) AND (?2 IS NULL OR status = ?2)"
        values = (graph_id, None if status is None else status.value)
        with self._reading() as db:
            rows = db.execute(f"SELECT head FROM runs {where} ORDER BY seq DESC LIMIT ?3 OFFSET ?4",
                              (*values, limit, offset)).fetchall()
            total = db.execute(f"SELECT COUNT(*) FROM runs {where}", values).fetchone()[0]
        heads = (json.loads(row[0]) for row in rows)
        return [converter.structure({k: head[k] for k in _SUMMARY_FIELDS}, RunSummary) for head in heads], total

    def counts(self) -> tuple[int, int]:
        """Return how many graphs and runs are stored."""
        with self._reading() as db:
            return (db.execute("SELECT COUNT(*) FROM graphs").fetchone()[0],
                    db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def close(self) -> None:
        """Finish pending writes and close the database."""
        self._thread.shutdown(wait=True)
        self._reader.close()
        self._writer.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=SQLITE_BUSY_TIMEOUT_S)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process crash loses no committed transaction
        return db

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        # One read transaction, so that related rows come from the same committed state.
        self._reader.execute("BEGIN")
        try:
            yield self._reader
        finally:
            self._reader.execute("COMMIT")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            yield self._writer
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise
        self._writer.execute("COMMIT")

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _record(self, run_id: str) -> dict[str, Any]:
        with self._reading() as db:
            row = db.execute("SELECT head FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            entries = db.execute("SELECT entry FROM logs WHERE run_id = ? ORDER BY position", (run_id,)).fetchall()
        if row is None:
            raise RunNotFound(run_id)
        return {**json.loads(row[0]), "logs": [json.loads(entry) for (entry,) in entries]}

    def _migrate(self) -> None:
        with self._transaction() as db:
            has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None
            version = int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]) if has_meta else 0
            if version > len(_MIGRATIONS):
                raise RuntimeError(f"{self.path} has schema version {version}, newer than this code's {len(_MIGRATIONS)}")
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(len(_MIGRATIONS)),))

    def _recover(self) -> None:
        """Mark runs left pending or running by a process that is gone as `interrupted`, keeping state and logs."""
        with self._transaction() as db:
            rows = db.execute("SELECT run_id, owner, head FROM runs WHERE status IN ('pending', 'running')").fetchall()
            for run_id, owner, head in rows:
                if _owner_is_alive(owner):
                    continue
                record = {**json.loads(head), "status": RunStatus.INTERRUPTED.value,
                          "error": "the server stopped while the run was going; resume it to go on"}
                db.execute("UPDATE runs SET status = ?, owner = NULL, head = ? WHERE run_id = ?",
                           (RunStatus.INTERRUPTED.value, dump_json(record), run_id))

    def _insert_graph(self, graph_id: str, definition: bytes) -> bytes | None:
        with self._transaction() as db:
            row = db.execute("SELECT definition FROM graphs WHERE graph_id = ?", (graph_id,)).fetchone()
            if row is not None:
                return row[0]
            if db.execute("SELECT COUNT(*) FROM graphs").fetchone()[0] >= self.max_graphs:
                raise StoreFull(self.max_graphs)
            db.execute("INSERT INTO graphs (graph_id, definition) VALUES (?, ?)", (graph_id, definition))
            return None

    def _upsert_run(self, run_id: str, graph_id: str, status: RunStatus, head: bytes,
                    entries: list[tuple[str, int, bytes]], owner: str | None) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO runs (run_id, graph_id, status, owner, head) VALUES (?, ?, ?, ?, ?)"
                       " ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, owner = excluded.owner,"
                       " head = excluded.head", (run_id, graph_id, status.value, owner, head))
            db.executemany("INSERT OR REPLACE INTO logs (run_id, position, entry) VALUES (?, ?, ?)", entries)
            if status.is_terminal:
                self._evict(db)

    def _evict(self, db: sqlite3.Connection) -> None:
        marks = ", ".join("?" * len(_TERMINAL))
        old = (f"SELECT run_id FROM runs WHERE status IN ({marks}) ORDER BY seq DESC LIMIT -1 OFFSET ?")
        db.execute(f"DELETE FROM logs WHERE run_id IN ({old})", (*_TERMINAL, self.max_runs))
        db.execute(f"DELETE FROM runs WHERE run_id IN ({old})", (*_TERMINAL, self.max_runs))

    def _claim(self, run_id: str) -> None:
        with self._transaction() as db:
            row = db.execute("SELECT status, head FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(run_id)
            status = RunStatus(row[0])
            if not status.is_resumable:
                raise _not_resumable(run_id, status)
            record = {**json.loads(row[1]), "status": RunStatus.PENDING.value}
            db.execute("UPDATE runs SET status = ?, owner = ?, head = ? WHERE run_id = ?",
                       (RunStatus.PENDING.value, self.owner, dump_json(record), run_id))


Store = MemoryStore | SqliteStore


# ---------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------
class Engine:
    """The core the HTTP layer calls: it validates and stores graphs, and starts, tracks, streams and cancels runs.

    Graphs registered in code (`registry.add_graph`) are always available and never stored. Every run executes in a
    task the engine keeps until it ends; at most `settings.max_concurrent_runs` execute at once, the rest wait as
    `pending`, and with `settings.max_pending_runs` waiting a new run is refused (Busy).
    """

    def __init__(self, registry: Registry, store: Store | None = None, settings: Settings | None = None) -> None:
        self.registry = registry
        self.settings = settings or Settings()
        self.store = store or MemoryStore(max_runs=self.settings.max_runs, max_graphs=self.settings.max_graphs)
        self._builtin: dict[str, GraphDefinition] = {}
        for graph in registry.graphs:
            validate_graph(graph, registry, limits=self.settings)
            self._builtin[graph.graph_id or ""] = graph
        self._slots = asyncio.Semaphore(self.settings.max_concurrent_runs)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._live: dict[str, RunContext] = {}  # runs this process executes, from start to their final save
        self._saves: set[asyncio.Task[None]] = set()  # final saves of runs cancelled before they began
        self._changed: dict[str, asyncio.Event] = {}  # set (and dropped) at a run's next change; streams wait on it
        self._logged: dict[str, int] = {}  # log entries already written to the server log, by run id
        self._is_closing = False

    async def create_graph(self, graph: GraphDefinition) -> tuple[GraphDefinition, bool, list[Problem]]:
        """Validate and store `graph` (a new id if it has none); return it, whether it was new, and its warnings."""
        validate_graph(graph, self.registry, limits=self.settings)
        if graph.graph_id is None:
            graph = attrs.evolve(graph, graph_id=_new_id())
        warnings = graph_warnings(graph, self.registry)
        builtin = self._builtin.get(graph.graph_id or "")
        if builtin is not None:
            if builtin != graph:
                raise GraphConflict(graph.graph_id or "")
            return graph, False, warnings
        return graph, await self.store.add_graph(graph), warnings

    def get_graph(self, graph_id: str) -> GraphDefinition:
        """Return a registered or stored graph, or raise GraphNotFound."""
        return self._builtin.get(graph_id) or self.store.get_graph(graph_id)

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
        """Return a run's record: the live one while this process executes it, else the stored one."""
        return self._live.get(run_id) or self.store.get_run(run_id)

    def get_run_json(self, run_id: str) -> bytes:
        """Return a run's record as JSON."""
        live = self._live.get(run_id)
        return self.store.get_run_json(run_id) if live is None else dump_json(converter.unstructure(live))

    def has_run(self, run_id: str) -> bool:
        """Whether a run exists, here or in the store."""
        return run_id in self._live or self.store.has_run(run_id)

    async def start(
        self, graph: GraphDefinition | str, state: WorkflowState | None = None, *,
        max_iterations: int | None = None, timeout_s: float | None = None,
    ) -> RunContext:
        """Start a run of a stored graph (by id) or a given definition in the background; return its record."""
        self._check_room()
        if isinstance(graph, str):
            graph = self.get_graph(graph)
        else:
            validate_graph(graph, self.registry, limits=self.settings)
        limit = self._max_iterations(graph, max_iterations)
        state = state or WorkflowState()
        problems = [Problem(f"$.state.{name}", problem) for name, problem in
                    (("data", json_problem(state.data)), ("metadata", json_problem(state.metadata))) if problem]
        if problems:
            raise InvalidRequest(problems)
        run = new_run(graph, state, max_iterations=limit, timeout_s=timeout_s,
                      max_state_bytes=self.settings.max_state_bytes, max_log_bytes=self.settings.max_log_bytes)
        await self.store.save_run(run)
        self._launch(run, graph)
        return run

    async def resume(self, run_id: str, updates: dict[str, Any] | None = None, *,
                     timeout_s: float | None = None) -> RunContext:
        """Go on with a waiting or interrupted run from its next node, after merging `updates` into its data."""
        self._check_room()
        problem = json_problem(updates or {})
        if problem:
            raise InvalidRequest([Problem("$.updates", problem)])
        run = await self.store.claim_resumable(run_id)
        if updates:
            run.state.data.update(_copy_json(updates))
            run.logs.append(LogEntry(iteration=run.iteration, node=run.next_node or "", event=LogEvent.RESUMED,
                                     started_at=_now(), duration_ms=0.0, keys_changed=tuple(updates),
                                     updates=_copy_json(updates)))
        run.error, run.finished_at = None, None
        run.timeout_s = timeout_s if timeout_s is not None else run.timeout_s
        self._launch(run, self.get_graph(run.graph_id))
        return run

    async def run(
        self, graph: GraphDefinition | str, state: WorkflowState | None = None, *,
        max_iterations: int | None = None, timeout_s: float | None = None,
    ) -> RunContext:
        """Run to the end and return the finished record; cancelling the caller does not cancel the run."""
        return await self.wait(await self.start(graph, state, max_iterations=max_iterations, timeout_s=timeout_s))

    async def wait(self, run: RunContext) -> RunContext:
        """Wait until the run stops (ends, pauses or fails) and its record is saved; return it."""
        task = self._tasks.get(run.run_id)
        if task is not None:
            await asyncio.wait([task])  # unlike awaiting the task, never cancels it nor raises
        return run

    async def cancel(self, run_id: str) -> RunContext:
        """Cancel a pending or running run and return its record once the cancellation is recorded."""
        task = self._tasks.get(run_id)
        if task is None:
            run = self.store.get_run(run_id)
            where = "has already ended as" if not run.status.is_active else "is executed by another process, status"
            raise RunConflict(f"run {run_id!r} {where} {run.status.value}")
        run = self._live[run_id]
        task.cancel()
        await asyncio.wait([task])
        return run

    def follow(self, run_id: str, after: int = 0) -> AsyncIterator[RunEvent | None]:
        """Return the run's events after id `after`, live until it stops; None marks a quiet keep-alive interval."""
        return self._follow(self.get_run(run_id), after)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Refuse new runs, let running ones go on for `grace_s` (default: the setting), cancel the rest, wait
        until each is saved, and close the store."""
        self._is_closing = True
        tasks = list(self._tasks.values())
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._saves, return_exceptions=True)
        self.store.close()

    def _check_room(self) -> None:
        if self._is_closing or len(self._tasks) >= self.settings.max_concurrent_runs + self.settings.max_pending_runs:
            raise Busy("the server is shutting down" if self._is_closing else "too many runs are waiting; retry later")

    def _launch(self, run: RunContext, graph: GraphDefinition) -> None:
        self._live[run.run_id] = run
        task = asyncio.create_task(self._execute(run, graph), name=f"run {run.run_id}")
        task.add_done_callback(functools.partial(self._finish, run))
        self._tasks[run.run_id] = task

    async def _execute(self, run: RunContext, graph: GraphDefinition) -> None:
        checkpoint = self.store.save_run if self.store.is_durable else None
        try:
            async with self._slots:
                await execute_run(run, graph, self.registry, on_change=self._notify, checkpoint=checkpoint)
        except Exception:  # a bug in the engine: a node's failure is recorded by the runner, never raised
            logger.exception("run %s crashed", run.run_id)
            run.status, run.error = RunStatus.FAILED, "internal error; see the server log"
        finally:
            self._mark_cancelled_before_start(run)
            await asyncio.shield(self._save_final(run))

    def _finish(self, run: RunContext, task: asyncio.Task[None]) -> None:
        """Forget the run's task; a task cancelled before it began never ran its own code, so save it here."""
        del self._tasks[run.run_id]
        if self._mark_cancelled_before_start(run):
            save = asyncio.ensure_future(self._save_final(run))
            self._saves.add(save)
            save.add_done_callback(self._saves.discard)

    @staticmethod
    def _mark_cancelled_before_start(run: RunContext) -> bool:
        if not run.status.is_active:
            return False
        run.status, run.error = RunStatus.CANCELLED, "the run was cancelled before it started"
        run.finished_at = _now()
        return True

    async def _save_final(self, run: RunContext) -> None:
        try:
            await self.store.save_run(run)
        finally:
            self._live.pop(run.run_id, None)
            self._notify(run)
            if logger.isEnabledFor(logging.INFO):
                self._log_end(run)

    def _notify(self, run: RunContext) -> None:
        changed = self._changed.pop(run.run_id, None)
        if changed is not None:
            changed.set()
        if run.status.is_active and logger.isEnabledFor(logging.INFO):
            self._log_progress(run)

    def _log_progress(self, run: RunContext) -> None:
        """Log a run's start (info) and each of its new steps (debug), with fields a log store can index."""
        ids = {"run_id": run.run_id, "graph_id": run.graph_id}
        if run.run_id not in self._logged:
            self._logged[run.run_id] = 0
            logger.info("run %s of graph %s started", run.run_id, run.graph_id,
                        extra={"fields": {"event": "run_started", **ids}})
        for entry in run.logs[self._logged[run.run_id]:] if logger.isEnabledFor(logging.DEBUG) else ():
            fields = {"event": "step", **ids, "node": entry.node, "iteration": entry.iteration,
                      "step": entry.event.value, "duration_ms": round(entry.duration_ms, 3), "error": entry.error}
            logger.debug("run %s step %d: %s %s", run.run_id, entry.iteration, entry.node, entry.event.value,
                         extra={"fields": fields})
        self._logged[run.run_id] = len(run.logs)

    def _log_end(self, run: RunContext) -> None:
        self._log_progress(run)  # the steps not logged yet
        del self._logged[run.run_id]
        fields = {"event": "run_finished", "run_id": run.run_id, "graph_id": run.graph_id, "status": run.status.value,
                  "iteration": run.iteration, "duration_ms": round(run.duration_ms, 3), "error": run.error}
        logger.info("run %s finished: %s", run.run_id, run.status.value, extra={"fields": fields})

    async def _follow(self, run: RunContext, after: int) -> AsyncIterator[RunEvent | None]:
        quiet_s = 0.0
        while True:
            run = self._live.get(run.run_id) or run
            # Register for the next change before reading the run, so a change made while we send is not missed.
            # Only a run executing here has changes to wait for; registering for another would leave the event behind.
            is_here = run.run_id in self._live and run.status.is_active
            changed = self._changed.setdefault(run.run_id, asyncio.Event()) if is_here else None
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
            # The run executes in another process: follow the store.
            quiet_s = 0.0 if sent else quiet_s + STREAM_POLL_S
            if quiet_s >= self.settings.stream_keepalive_s:
                quiet_s = 0.0
                yield None
            await asyncio.sleep(STREAM_POLL_S)
            run = self.store.get_run(run.run_id)

    def _max_iterations(self, graph: GraphDefinition, requested: int | None) -> int:
        limit = requested or graph.max_iterations or self.settings.max_iterations
        if limit > self.settings.max_iterations_cap:
            raise InvalidRequest([Problem("$.max_iterations", f"must be at most {self.settings.max_iterations_cap}")])
        return limit


def run_events(run: RunContext, after: int = 0) -> Iterator[RunEvent]:
    """Yield the run's events after id `after`: status pending, status running, each log entry, last status, end.

    An event's id is its position in that sequence, so every stream of one run shows the same ids. A run that
    stopped (ended, or paused to wait) gets its last status and an end event.
    """
    count, has_stopped = len(run.logs), not run.status.is_active  # read once: the run may move on while we yield
    statuses = (RunStatus.PENDING,) if run.started_at is None else (RunStatus.PENDING, RunStatus.RUNNING)
    for event_id, status in enumerate(statuses, start=1):
        if event_id > after:
            yield RunEvent(id=event_id, event=StreamEvent.STATUS, data={"status": status.value})
    first_log = len(statuses) + 1
    for event_id in range(max(after + 1, first_log), first_log + count):
        yield RunEvent(id=event_id, event=StreamEvent.LOG, data=converter.unstructure(run.logs[event_id - first_log]))
    final = first_log + count
    if has_stopped and final > after:
        yield RunEvent(id=final, event=StreamEvent.STATUS, data={"status": run.status.value})
    if has_stopped and final + 1 > after:
        end = RunEnd(status=run.status, error=run.error, iteration=run.iteration, current_node=run.current_node,
                     state=run.state)
        yield RunEvent(id=final + 1, event=StreamEvent.END, data=converter.unstructure(end))


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------
# Endpoints parse, call one engine method and answer; every error leaves through `error_response`.
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_bytes: int, *, empty: object = _MISSING) -> object:
    """Read the body (at most `max_bytes`) and decode it as strict JSON, or raise BodyTooLarge / InvalidJson.

    An empty body is `empty` when one is given (a request whose fields are all optional), else invalid JSON.
    """
    declared = _count_or_none(request.headers.get("content-length", ""))
    if declared is not None and declared > max_bytes:
        raise BodyTooLarge(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLarge(max_bytes)
    if not body.strip() and empty is not _MISSING:
        return empty
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = "nesting is too deep" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidJson("the request body is not valid JSON", [Problem("$", detail)]) from None
    problem = json_problem(payload)
    if problem:
        raise InvalidJson("the request body is not valid JSON", [Problem("$", problem)])
    return payload


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _run_response(run: RunContext) -> RunResponse:
    return RunResponse(
        run_id=run.run_id, graph_id=run.graph_id, status=run.status, final_state=run.state, logs=run.logs,
        iteration=run.iteration, current_node=run.current_node, error=run.error, duration_ms=run.duration_ms,
        engine_overhead_ms=run.engine_overhead_ms,
    )


async def get_health(request: Request) -> Response:
    """Answer that the service is up, with how many graphs and runs it holds."""
    graphs, runs = _engine(request).counts()
    return JSONResponse(converter.unstructure(HealthResponse(status="ok", graphs=graphs, runs=runs)))


async def post_graph_create(request: Request) -> Response:
    """Validate and store a graph definition: 201 when new, 200 when identical to the stored one."""
    engine = _engine(request)
    graph = structure_body(await read_json(request, engine.settings.max_body_bytes), GraphDefinition)
    graph, created, warnings = await engine.create_graph(graph)
    body = converter.unstructure(CreateGraphResponse(graph_id=graph.graph_id or "", warnings=warnings))
    return JSONResponse(body, status_code=201 if created else 200)


async def post_graph_run(request: Request) -> Response:
    """Run a stored graph: to its end (200, a failed run included), or in the background with `"wait": false` (202)."""
    engine = _engine(request)
    body = structure_body(await read_json(request, engine.settings.max_body_bytes), RunRequest)
    run = await engine.start(body.graph_id, body.state, max_iterations=body.max_iterations, timeout_s=body.timeout_s)
    return await _run_answer(engine, run, body.wait)


async def post_graph_resume(request: Request) -> Response:
    """Go on with a waiting or interrupted run, after merging `updates` into its data; answers like /graph/run."""
    engine = _engine(request)
    body = structure_body(await read_json(request, engine.settings.max_body_bytes, empty={}), ResumeRequest)
    run = await engine.resume(request.path_params["run_id"], body.updates, timeout_s=body.timeout_s)
    return await _run_answer(engine, run, body.wait)


async def _run_answer(engine: Engine, run: RunContext, wait: bool) -> Response:
    if wait:
        return JSONResponse(converter.unstructure(_run_response(await engine.wait(run))))
    accepted = converter.unstructure(RunAccepted(run_id=run.run_id, status=run.status))
    return JSONResponse(accepted, status_code=202, headers={"Location": f"/graph/state/{run.run_id}"})


async def post_graph_cancel(request: Request) -> Response:
    """Cancel a pending or running run and answer with its record; a run that already ended is a 409."""
    run = await _engine(request).cancel(request.path_params["run_id"])
    return JSONResponse(converter.unstructure(run))


async def get_graph_runs(request: Request) -> Response:
    """List run summaries, newest first, optionally of one graph or in one status."""
    query = _query(request, {"graph_id", "status", "limit", "offset"})
    limit, offset = _page(query)
    status = _status_filter(query.get("status"))
    summaries, total = _engine(request).store.list_runs(
        graph_id=query.get("graph_id"), status=status, limit=limit, offset=offset
    )
    return JSONResponse(converter.unstructure(RunsPage(runs=summaries, total=total, limit=limit, offset=offset)))


async def get_graph_list(request: Request) -> Response:
    """List stored graphs, in the order they were created."""
    limit, offset = _page(_query(request, {"limit", "offset"}))
    graphs, total = _engine(request).list_graphs(limit=limit, offset=offset)
    summaries = [GraphSummary(graph_id=g.graph_id or "", start_node=g.start_node, nodes=list(g.node_defs))
                 for g in graphs]
    return JSONResponse(converter.unstructure(GraphsPage(graphs=summaries, total=total, limit=limit, offset=offset)))


async def get_graph_stream(request: Request) -> Response:
    """Stream a run's events as Server-Sent Events until it ends; `Last-Event-ID` resumes after that event."""
    events = _engine(request).follow(request.path_params["run_id"], _last_event_id(request))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_server_sent(events), media_type="text/event-stream", headers=headers)


async def websocket_graph_ws(websocket: WebSocket) -> None:
    """Send a run's events as JSON messages over a WebSocket until it ends; `?after=N` resumes after event N."""
    await websocket.accept()
    engine: Engine = websocket.app.state.engine
    run_id, after = websocket.path_params["run_id"], _count_or_none(websocket.query_params.get("after", "0"))
    if after is None or not engine.has_run(run_id):
        # The HTTP error handlers cannot answer a WebSocket: send the same error body, then close with 4000 + status.
        bad_after = InvalidRequest([Problem("$.query.after", "expected an integer")])
        error = RunNotFound(run_id) if after is not None else bad_after
        await websocket.send_json(_error_body(error.code, error.message, error.details))
        await websocket.close(code=4000 + error.status_code)
        return
    async for event in engine.follow(run_id, after):
        if event is not None:
            await websocket.send_json(converter.unstructure(event))
    await websocket.close()


async def _server_sent(events: AsyncIterator[RunEvent | None]) -> AsyncIterator[str]:
    async for event in events:
        if event is None:
            yield ": keep-alive\n\n"
        else:
            data = json.dumps(event.data, separators=(",", ":"))
            yield f"id: {event.id}\nevent: {event.event.value}\ndata: {data}\n\n"


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
    if raw is None:
        return default
    value = _count_or_none(raw)
    if value is None or value > maximum:
        raise InvalidRequest([Problem(f"$.query.{name}", f"expected an integer from 0 to {maximum}, got {raw[:40]!r}")])
    return value


def _page(query: dict[str, str]) -> tuple[int, int]:
    return _query_int(query, "limit", 50, MAX_PAGE), _query_int(query, "offset", 0, 10**9)


def _status_filter(raw: str | None) -> RunStatus | None:
    try:
        return None if raw is None else RunStatus(raw)
    except ValueError:
        known = ", ".join(status.value for status in RunStatus)
        raise InvalidRequest([Problem("$.query.status", f"expected one of {known}, got {raw!r}")]) from None


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id", "0").strip() or "0"
    event_id = _count_or_none(raw)
    if event_id is None:
        raise InvalidRequest([Problem("$.headers.Last-Event-ID", f"expected an event id, got {raw[:40]!r}")])
    return event_id


async def get_graph_state(request: Request) -> Response:
    """Answer with a run's record, finished or still running."""
    record = _engine(request).get_run_json(request.path_params["run_id"])
    return Response(record, media_type="application/json")


async def get_graph_definition(request: Request) -> Response:
    """Answer with a stored graph, as JSON that `/graph/create` accepts; `?declarations=true` adds what its nodes
    declare they read and write."""
    engine = _engine(request)
    query = _query(request, {"declarations"})
    graph = engine.get_graph(request.path_params["graph_id"])
    body = converter.unstructure(graph)
    if query.get("declarations") == "true":
        declared = {name: engine.registry.node_io(node.function) for name, node in graph.node_defs.items()}
        body["declarations"] = {name: converter.unstructure(io) for name, io in declared.items() if io is not None}
    return JSONResponse(body)


class BearerAuth:
    """Pure ASGI middleware: every request but `GET /` must carry `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an open or authorized request on; answer any other with 401 (a WebSocket: close code 4401)."""
        if scope["type"] not in ("http", "websocket") or self._is_open(scope) or self._is_authorized(scope):
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

    def _is_authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)
        return False


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log record: time, level, message, and the record's `fields` (run id, node, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON."""
        payload = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(), "level": record.levelname.lower(),
                   "logger": record.name, "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def error_response(
    status_code: int, code: ErrorCode, message: str, details: list[Problem] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Build the one error shape every non-2xx answer has."""
    return JSONResponse(_error_body(code, message, details), status_code=status_code, headers=headers)


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


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    """Answer a bug with a fixed 500 message; the traceback goes to the server log only."""
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, ErrorCode.INTERNAL_ERROR, "internal error; see the server log")


@attrs.frozen(kw_only=True)
class Operation:
    """One endpoint: its route, and what the OpenAPI document says of it (derived from the models it speaks)."""

    method: str
    path: str
    endpoint: Callable[..., Awaitable[Any]]
    summary: str
    body: type | None = None
    answers: Mapping[int, Any] = attrs.field(factory=dict)  # status -> model of the body (None: no body)
    query: Mapping[str, str] = attrs.field(factory=dict)  # parameter -> JSON type
    media_type: str = "application/json"


async def get_openapi(request: Request) -> Response:
    """Answer with the OpenAPI 3.1 document of every endpoint."""
    return JSONResponse(request.app.state.openapi)


OPERATIONS = (
    Operation(method="GET", path="/", endpoint=get_health, summary="Health check", answers={200: HealthResponse}),
    Operation(method="POST", path="/graph/create", endpoint=post_graph_create, summary="Store a graph definition",
              body=GraphDefinition, answers={200: CreateGraphResponse, 201: CreateGraphResponse}),
    Operation(method="POST", path="/graph/run", endpoint=post_graph_run, summary="Run a stored graph", body=RunRequest,
              answers={200: RunResponse, 202: RunAccepted}),
    Operation(method="GET", path="/graph/state/{run_id}", endpoint=get_graph_state, summary="A run's record",
              answers={200: RunContext}),
    Operation(method="GET", path="/graph/definition/{graph_id}", endpoint=get_graph_definition,
              summary="A stored graph, as /graph/create takes it (`?declarations=true` adds what its nodes read and write)",
              answers={200: GraphDefinition}, query={"declarations": "string"}),
    Operation(method="POST", path="/graph/cancel/{run_id}", endpoint=post_graph_cancel,
              summary="Cancel a pending or running run", answers={200: RunContext}),
    Operation(method="POST", path="/graph/resume/{run_id}", endpoint=post_graph_resume,
              summary="Go on with a waiting or interrupted run", body=ResumeRequest,
              answers={200: RunResponse, 202: RunAccepted}),
    Operation(method="GET", path="/graph/runs", endpoint=get_graph_runs, summary="Run summaries, newest first",
              answers={200: RunsPage},
              query={"graph_id": "string", "status": "string", "limit": "integer", "offset": "integer"}),
    Operation(method="GET", path="/graph/list", endpoint=get_graph_list, summary="Graphs, oldest first",
              answers={200: GraphsPage}, query={"limit": "integer", "offset": "integer"}),
    Operation(method="GET", path="/graph/stream/{run_id}", endpoint=get_graph_stream,
              summary="A run's events as Server-Sent Events (each event's data as in RunEvent)",
              answers={200: RunEvent}, media_type="text/event-stream"),
    Operation(method="GET", path="/graph/ws/{run_id}", endpoint=websocket_graph_ws,
              summary="WebSocket: the same events as JSON messages (a RunEvent each)", answers={101: None},
              query={"after": "integer"}),
    Operation(method="GET", path="/openapi.json", endpoint=get_openapi, summary="This document", answers={200: Any}),
)
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


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
                "properties": {field.name: json_schema(field.type, components) for field in fields},
                "required": [field.name for field in fields if field.default is attrs.NOTHING],
            }
        return {"$ref": f"#/components/schemas/{type_.__name__}"}
    if isinstance(type_, type) and issubclass(type_, enum.Enum):
        return {"type": "string", "enum": [member.value for member in type_]}
    if type_ in _JSON_TYPES:
        return {"type": _JSON_TYPES[type_]}
    if type_ is datetime:
        return {"type": "string", "format": "date-time"}
    if origin in (types.UnionType, typing.Union):
        return {"anyOf": [json_schema(arg, components) for arg in args]}
    if origin in (list, tuple):
        return {"type": "array", "items": json_schema(args[0], components)}
    if origin is dict:
        return {"type": "object", "additionalProperties": json_schema(args[1], components)}
    raise TypeError(f"no JSON schema for {type_!r}")


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
            if model is not None:
                answer["content"] = {operation.media_type: {"schema": json_schema(model, components)}}
            spec["responses"][str(status)] = answer
        paths.setdefault(operation.path, {})[operation.method.lower()] = spec
    info = {"title": "workflow_engine", "version": "1", "description": (__doc__ or "").split("\n")[0]}
    return {"openapi": "3.1.0", "info": info, "paths": paths, "components": {"schemas": components}}


def _parameters(operation: Operation) -> list[dict[str, Any]]:
    in_path = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
               for name in re.findall(r"{(\w+)}", operation.path)]
    return in_path + [{"name": name, "in": "query", "required": False, "schema": {"type": kind}}
                      for name, kind in operation.query.items()]


# ---------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------
def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _env_log_format(environ: Mapping[str, str]) -> LogFormat:
    raw = environ.get("WORKFLOW_LOG_FORMAT", "").strip() or LogFormat.TEXT.value
    try:
        return LogFormat(raw)
    except ValueError:
        raise ValueError(f"WORKFLOW_LOG_FORMAT must be text or json, got {raw!r}") from None


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Read Settings from WORKFLOW_* variables (see the README's settings table); unset ones keep defaults."""
    env = os.environ if environ is None else environ
    modules = env.get("WORKFLOW_MODULES")
    return Settings(
        max_iterations=_env_int(env, "WORKFLOW_MAX_ITERATIONS", MAX_ITERATIONS),
        max_iterations_cap=_env_int(env, "WORKFLOW_MAX_ITERATIONS_CAP", MAX_ITERATIONS_CAP),
        max_runs=_env_int(env, "WORKFLOW_MAX_RUNS", MAX_STORED_RUNS),
        max_graphs=_env_int(env, "WORKFLOW_MAX_GRAPHS", MAX_STORED_GRAPHS),
        max_body_bytes=_env_int(env, "WORKFLOW_MAX_BODY_BYTES", MAX_BODY_BYTES),
        max_concurrent_runs=_env_int(env, "WORKFLOW_MAX_CONCURRENT_RUNS", MAX_CONCURRENT_RUNS),
        max_pending_runs=_env_int(env, "WORKFLOW_MAX_PENDING_RUNS", MAX_PENDING_RUNS),
        max_nodes=_env_int(env, "WORKFLOW_MAX_NODES", MAX_NODES),
        max_branches=_env_int(env, "WORKFLOW_MAX_BRANCHES", MAX_BRANCHES),
        max_state_bytes=_env_int(env, "WORKFLOW_MAX_STATE_BYTES", MAX_STATE_BYTES),
        shutdown_grace_s=_env_int(env, "WORKFLOW_SHUTDOWN_GRACE_S", int(SHUTDOWN_GRACE_S)),
        db_path=env.get("WORKFLOW_DB") or None,
        api_token=env.get("WORKFLOW_API_TOKEN") or None,
        log_format=_env_log_format(env),
        workflow_modules=None if modules is None else tuple(m.strip() for m in modules.split(",") if m.strip()),
        max_log_bytes=_env_int(env, "WORKFLOW_MAX_LOG_BYTES", MAX_LOG_BYTES),
    )


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


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    """While serving: a log handler if the host set none; at shutdown, let runs finish for the grace period."""
    engine: Engine = app.state.engine
    handler = None
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        is_json = engine.settings.log_format is LogFormat.JSON
        handler.setFormatter(JsonLogFormatter() if is_json else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if is_json else logging.INFO)  # JSON, for a log store, has every step
    if engine.settings.api_token is None:
        logger.warning("authentication is off: set WORKFLOW_API_TOKEN to require a bearer token")
    yield
    await engine.shutdown()
    if handler is not None:
        logger.removeHandler(handler)


def create_app(
    *, registry: Registry | None = None, store: Store | None = None, settings: Settings | None = None
) -> Starlette:
    """Build the HTTP app with its own engine.

    Without a `registry`, one is made and filled from `settings.workflow_modules`; graphs registered on the
    registry are validated at once, so a bad built-in graph stops startup. Without a `store`, `settings.db_path`
    picks a SqliteStore, else a MemoryStore.
    """
    settings = settings or Settings()
    if registry is None:
        registry = Registry()
        load_workflows(registry, settings.workflow_modules)
    if store is None and settings.db_path:
        store = SqliteStore(settings.db_path, max_runs=settings.max_runs, max_graphs=settings.max_graphs)
    engine = Engine(registry, store, settings)
    routes = [
        WebSocketRoute(op.path, op.endpoint) if op.endpoint is websocket_graph_ws
        else Route(op.path, op.endpoint, methods=[op.method])
        for op in OPERATIONS
    ]
    handlers = {EngineError: on_engine_error, HTTPException: on_http_error, Exception: on_unexpected_error}
    middleware = [] if settings.api_token is None else [Middleware(BearerAuth, token=settings.api_token)]
    starlette_app = Starlette(routes=routes, exception_handlers=handlers, middleware=middleware, lifespan=_lifespan)
    starlette_app.router.redirect_slashes = False  # its 307 has no body; an unknown path is a JSON 404 instead
    starlette_app.state.engine = engine
    starlette_app.state.openapi = openapi_document(OPERATIONS)
    starlette_app.state.openapi["x-node-declarations"] = {  # what each registered node function reads and writes
        name: converter.unstructure(io) for name in registry.node_names if (io := registry.node_io(name))}
    return starlette_app


app = create_app(settings=settings_from_env())
