"""Tests for workflow_engine: models and converter, registry, validation, runner, store, HTTP, wiring, end to end."""

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import workflow_engine as we

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# Fixtures and test nodes
# ---------------------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


flaky_attempts: dict[str, int] = {}  # attempts of the `flaky` node, by run id
hang_started: dict[str, asyncio.Event] = {}  # set when a `hang` node starts, by the key in metadata["started"]


def make_registry() -> we.Registry:
    """A registry of tiny nodes and conditions used across the tests."""
    registry = we.Registry()

    @registry.node
    async def inc(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        return {"count": state.data.get("count", 0) + 1}

    @registry.node
    def double(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        return {"value": state.data.get("value", 1) * 2, "thread": threading.get_ident()}

    @registry.node
    async def boom(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        state.data["half_written"] = True
        raise ValueError("boom")

    @registry.node
    def tidy(state: we.WorkflowState, ctx: we.NodeContext) -> None:
        del state.data["temp"]
        state.data["note"] = "tidied"

    @registry.node
    async def returns_set(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        return {"tags": {"a"}}

    @registry.node
    async def returns_int(state: we.WorkflowState, ctx: we.NodeContext) -> int:
        return 5

    @registry.node
    async def tag(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        who = state.data["who"]
        await asyncio.sleep(0)  # let the other run interleave here
        return {"seen": [*state.data.get("seen", []), who]}

    @registry.node
    async def use_tool(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        ctx.logger.info("calling a tool")
        return {"shout": ctx.tool(state.data.get("tool", "upper"))(state.data["word"]), "run_id": ctx.run_id}

    @registry.tool
    def upper(text: str) -> str:
        return text.upper()

    @registry.condition
    def below_three(state: we.WorkflowState) -> bool:
        return state.data.get("count", 0) < 3

    @registry.condition
    def always(state: we.WorkflowState) -> bool:
        return True

    @registry.condition
    def never(state: we.WorkflowState) -> bool:
        return False

    @registry.condition
    def explodes(state: we.WorkflowState) -> bool:
        raise KeyError("missing")

    @registry.condition(name="not_bool")
    def returns_one(state: we.WorkflowState) -> int:
        return 1

    @registry.node
    async def flaky(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        """Fail until the attempt given in data["succeed_on"], counting attempts per run."""
        attempts = flaky_attempts[ctx.run_id] = flaky_attempts.get(ctx.run_id, 0) + 1
        if attempts < state.data["succeed_on"]:
            raise ConnectionError(f"attempt {attempts} failed")
        return {"attempts": attempts}

    @registry.node
    async def hang(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        """Signal that it started, then wait for ever (until cancelled or timed out)."""
        started = state.metadata.get("started")
        if started:
            hang_started[started].set()
        await asyncio.Event().wait()
        return {}

    @registry.node
    async def echo_config(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        return {ctx.node: ctx.config}

    @registry.node
    async def handle_error(state: we.WorkflowState, ctx: we.NodeContext) -> dict:
        return {"handled": state.data["last_error"]["node"]}

    return registry


@pytest.fixture
def registry() -> we.Registry:
    return make_registry()


@pytest.fixture
def store() -> we.MemoryStore:
    return we.MemoryStore()


@pytest.fixture
def app(registry: we.Registry, store: we.MemoryStore) -> Any:
    return we.create_app(registry=registry, store=store)


@pytest.fixture
async def client(app: Any) -> Any:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        yield client


def graph(nodes: list[str | dict], edges: dict | None = None, **extra: Any) -> dict:
    """A graph definition as JSON, starting at the first node."""
    start = nodes[0]["name"] if isinstance(nodes[0], dict) else nodes[0]
    return {"graph_id": "g", "start_node": start, "nodes": nodes, "edges": edges or {}, **extra}


def chain(*names: str) -> dict:
    """Edges that run `names` in order."""
    return {a: {"default_next": b} for a, b in itertools.pairwise(names)}


def steps(run: dict) -> list[tuple[str, str]]:
    """The (node, event) sequence of a run as returned by the API."""
    return [(entry["node"], entry["event"]) for entry in run["logs"]]


async def create_and_run(client: httpx.AsyncClient, definition: dict, data: dict | None = None, **extra: Any) -> dict:
    created = await client.post("/graph/create", json=definition)
    assert created.status_code == 201, created.text
    response = await client.post("/graph/run", json={"graph_id": definition["graph_id"], "state": {"data": data or {}}, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def run_keys() -> set[str]:
    return {"run_id", "graph_id", "status", "final_state", "logs", "iteration", "current_node", "error",
            "duration_ms", "engine_overhead_ms"}


# ---------------------------------------------------------------------------
# Converter and models
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "problems"),
    [
        ([], [("$", "expected a JSON object")]),
        ({"start_node": 5, "nodes": ["a"]}, [("$.start_node", "expected a string, got a number")]),
        ({"start_node": "a", "nodes": "abc"}, [("$.nodes", "expected an array, got a string")]),
        ({"start_node": "a", "nodes": ["a"], "max_iterations": True}, [("$.max_iterations", "expected an integer, got a boolean")]),
        ({"start_node": "a", "nodes": ["a"], "max_iterations": 2.0}, [("$.max_iterations", "expected an integer, got a number")]),
        ({"start_node": "a", "nodes": ["a"], "max_iterations": 0}, [("$", "max_iterations must be at least 1, got 0")]),
        ({"start_node": "a", "nodes": ["a"], "edges": []}, [("$.edges", "expected an object, got an array")]),
        ({"start_node": "a", "nodes": ["a"], "colour": "red"}, [("$", "extra fields found (colour)")]),
        ({"nodes": [1, "b"]}, [("$.start_node", "required field missing"), ("$.nodes[0]", "expected a node name or a node object, got a number")]),
        (
            {"start_node": "a", "nodes": ["a"], "edges": {"a": {"branches": [{"condition": 1}], "default_next": False}}},
            [
                ("$.edges.a.default_next", "expected a string, got a boolean"),
                ("$.edges.a.branches[0].condition", "expected a string, got a number"),
                ("$.edges.a.branches[0].target", "required field missing"),
            ],
        ),
        (
            {"start_node": "a", "nodes": ["a"], "edges": {"a b": {"branches": {}}}},
            [("$.edges['a b'].branches", "expected an array, got an object")],
        ),
    ],
    ids=["not-object", "int-for-str", "str-for-list", "bool-for-int", "float-for-int", "validator", "list-for-dict",
         "extra-key", "several", "nested-paths", "quoted-key"],
)
def test_structure_body_reports_every_problem_with_its_path(payload: object, problems: list[tuple[str, str]]) -> None:
    with pytest.raises(we.InvalidRequest) as caught:
        we.structure_body(payload, we.GraphDefinition)
    assert [(p.path, p.message) for p in caught.value.details] == problems
    assert caught.value.message == f"the request has {len(problems)} problem" + ("s" if len(problems) > 1 else "")


def test_structure_body_builds_typed_models() -> None:
    payload = {"graph_id": "g", "start_node": "a", "nodes": ["a", "b"],
               "edges": {"a": {"default_next": "b", "branches": [{"condition": "c", "target": "a"}]}}}
    assert we.structure_body(payload, we.GraphDefinition) == we.GraphDefinition(
        graph_id="g", start_node="a", nodes=("a", "b"),
        edges={"a": we.EdgeDef(default_next="b", branches=(we.BranchCondition(condition="c", target="a"),))},
    )


def test_structure_body_keeps_state_values_as_given() -> None:
    request = we.structure_body({"graph_id": "g", "state": {"data": {"n": 5, "s": "5", "f": False}}}, we.RunRequest)
    assert request.state.data == {"n": 5, "s": "5", "f": False}
    assert [type(v) for v in request.state.data.values()] == [int, str, bool]


def test_converter_unstructures_enums_and_datetimes_as_json() -> None:
    entry = we.LogEntry(iteration=1, node="a", event=we.LogEvent.ERROR, duration_ms=1.5,
                        started_at=we.datetime(2026, 1, 2, 3, 4, 5, tzinfo=we.UTC), error="x")
    assert we.converter.unstructure(entry) == {
        "iteration": 1, "node": "a", "event": "error", "started_at": "2026-01-02T03:04:05+00:00", "duration_ms": 1.5,
        "keys_changed": [], "updates": {}, "next": None, "branch": None, "error": "x", "attempt": 1,
    }


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": [1, 2.5, "x", None, True, {"b": []}]}, None),
        ({"a": float("nan")}, "nan is not a JSON number"),
        ([float("inf")], "inf is not a JSON number"),
        ({"a": {1, 2}}, "set is not a JSON type"),
        ({1: "a"}, "object keys must be strings"),
        ({"a": object()}, "object is not a JSON type"),
        (json.loads("[" * 65 + "]" * 65), "nesting deeper than 64 levels"),
        (json.loads("[" * 64 + "1" + "]" * 64), None),
    ],
    ids=["plain", "nan", "inf", "set", "int-key", "object", "too-deep", "deep-enough"],
)
def test_json_problem_finds_what_json_cannot_carry(value: object, problem: str | None) -> None:
    assert we.json_problem(value) == problem


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
def test_registry_decorators_return_the_function_unchanged() -> None:
    registry = we.Registry()

    def node(state: we.WorkflowState, ctx: we.NodeContext) -> None:
        return None

    assert registry.node(node) is node
    assert registry.node(name="alias")(node) is node
    assert registry.get_node("node") is node and registry.get_node("alias") is node


def test_registry_rejects_a_name_registered_twice(registry: we.Registry) -> None:
    with pytest.raises(ValueError, match="a condition named 'always' is already registered"):
        registry.condition(name="always")(lambda state: True)


def test_registry_unknown_name_lists_the_known_ones(registry: we.Registry) -> None:
    with pytest.raises(we.UnknownName, match=r"unknown tool 'lower'; registered: upper$"):
        registry.get_tool("lower")
    with pytest.raises(we.UnknownName, match=r"unknown condition 'x'; registered: always, below_three, explodes, never, not_bool$"):
        registry.get_condition("x")


def test_registry_add_graph_requires_a_unique_id(registry: we.Registry) -> None:
    registry.add_graph(we.GraphDefinition(graph_id="g", start_node="inc", nodes=("inc",)))
    with pytest.raises(ValueError, match="needs a graph_id"):
        registry.add_graph(we.GraphDefinition(start_node="inc", nodes=("inc",)))
    with pytest.raises(ValueError, match="graph 'g' is already registered"):
        registry.add_graph(we.GraphDefinition(graph_id="g", start_node="inc", nodes=("inc",)))
    assert [g.graph_id for g in registry.graphs] == ["g"]


# ---------------------------------------------------------------------------
# Graph validation
# ---------------------------------------------------------------------------
def test_validate_graph_reports_all_problems_at_once(registry: we.Registry) -> None:
    definition = we.GraphDefinition(
        graph_id="no spaces", start_node="ghost", nodes=("inc", "inc", "missing"), max_iterations=20_000,
        edges={
            "inc": we.EdgeDef(default_next="nowhere", branches=(we.BranchCondition(condition="nope", target="inc"),)),
            "stray": we.EdgeDef(branches=(we.BranchCondition(condition="always", target="void"),)),
        },
    )
    with pytest.raises(we.InvalidGraph, match="the graph has 9 problems") as caught:
        we.validate_graph(definition, registry)
    assert [(p.path, p.message) for p in caught.value.details] == [
        ("$.graph_id", "must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', '-'"),
        ("$.nodes[1]", "duplicate node 'inc'"),
        ("$.nodes[2]", "unknown node function 'missing'"),
        ("$.start_node", "unknown node 'ghost'"),
        ("$.edges.inc.default_next", "unknown node 'nowhere'"),
        ("$.edges.inc.branches[0].condition", "unknown condition 'nope'"),
        ("$.edges.stray", "unknown node 'stray'"),
        ("$.edges.stray.branches[0].target", "unknown node 'void'"),
        ("$.max_iterations", "must be at most 10000"),
    ]


def test_validate_graph_rejects_empty_nodes(registry: we.Registry) -> None:
    with pytest.raises(we.InvalidGraph) as caught:
        we.validate_graph(we.GraphDefinition(start_node="inc", nodes=()), registry)
    assert [(p.path, p.message) for p in caught.value.details] == [
        ("$.nodes", "nodes must not be empty"), ("$.start_node", "unknown node 'inc'")]


@pytest.mark.parametrize("graph_id", ["a", "A-z_0.9", "x" * 128, None], ids=["one", "mixed", "longest", "none"])
def test_validate_graph_accepts_valid_graphs(registry: we.Registry, graph_id: str | None) -> None:
    definition = we.GraphDefinition(graph_id=graph_id, start_node="inc", nodes=("inc", "double"),
                                    edges={"inc": we.EdgeDef(default_next="double")})
    assert we.validate_graph(definition, registry) is None


@pytest.mark.parametrize("graph_id", ["", "x" * 129, "a/b", "é"], ids=["empty", "too-long", "slash", "non-ascii"])
def test_validate_graph_rejects_bad_ids(registry: we.Registry, graph_id: str) -> None:
    with pytest.raises(we.InvalidGraph):
        we.validate_graph(we.GraphDefinition(graph_id=graph_id, start_node="inc", nodes=("inc",)), registry)


# ---------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------
async def test_run_follows_default_edges_to_the_end(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["inc", "double"], chain("inc", "double")), {"value": 3})
    assert set(run) == run_keys()
    assert (run["status"], run["iteration"], run["current_node"], run["error"]) == ("completed", 2, "double", None)
    assert steps(run) == [("inc", "executed"), ("double", "executed")]
    assert run["final_state"]["data"] == {"value": 6, "count": 1, "thread": run["final_state"]["data"]["thread"]}
    assert [(e["next"], e["branch"], e["keys_changed"]) for e in run["logs"]] == [
        ("double", None, ["count"]), (None, None, ["value", "thread"])]


async def test_run_takes_the_first_true_branch_in_order(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"default_next": None, "branches": [
        {"condition": "never", "target": "boom"}, {"condition": "always", "target": "double"},
        {"condition": "always", "target": "boom"}]}}
    run = await create_and_run(client, graph(["inc", "double", "boom"], edges))
    assert steps(run) == [("inc", "executed"), ("double", "executed")]
    assert (run["logs"][0]["next"], run["logs"][0]["branch"]) == ("double", "always")


async def test_run_uses_the_default_edge_when_no_branch_holds(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"default_next": "double", "branches": [{"condition": "never", "target": "boom"}]}}
    run = await create_and_run(client, graph(["inc", "double", "boom"], edges))
    assert run["status"] == "completed"
    assert steps(run) == [("inc", "executed"), ("double", "executed")]
    assert (run["logs"][0]["next"], run["logs"][0]["branch"]) == ("double", None)


async def test_run_ends_at_a_node_without_an_edge(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["inc", "boom"]))
    assert (run["status"], steps(run)) == ("completed", [("inc", "executed")])


async def test_run_loops_until_the_branch_stops(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"default_next": "double", "branches": [{"condition": "below_three", "target": "inc"}]}}
    run = await create_and_run(client, graph(["inc", "double"], edges))
    assert steps(run) == [("inc", "executed")] * 3 + [("double", "executed")]
    assert [e["branch"] for e in run["logs"]] == ["below_three", "below_three", None, None]
    assert (run["status"], run["iteration"], run["final_state"]["data"]["count"]) == ("completed", 4, 3)


async def test_run_stops_at_max_iterations_with_its_state(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"branches": [{"condition": "always", "target": "inc"}]}}
    run = await create_and_run(client, graph(["inc"], edges, max_iterations=5))
    assert (run["status"], run["iteration"], run["current_node"]) == ("stopped_max_iterations", 5, "inc")
    assert steps(run) == [("inc", "executed")] * 5
    assert run["final_state"]["data"] == {"count": 5}
    assert run["logs"][-1]["next"] == "inc"


async def test_run_request_max_iterations_overrides_the_graph(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"branches": [{"condition": "always", "target": "inc"}]}}
    run = await create_and_run(client, graph(["inc"], edges, max_iterations=5), max_iterations=2)
    assert (run["status"], run["iteration"]) == ("stopped_max_iterations", 2)


async def test_run_default_max_iterations_is_100(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"branches": [{"condition": "always", "target": "inc"}]}}
    run = await create_and_run(client, graph(["inc"], edges))
    assert (run["status"], run["iteration"], len(run["logs"])) == ("stopped_max_iterations", 100, 100)


async def test_run_node_error_fails_the_run_and_keeps_prior_state(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["inc", "boom", "double"], chain("inc", "boom", "double")))
    assert (run["status"], run["iteration"], run["current_node"]) == ("failed", 2, "boom")
    assert run["error"] == "node 'boom' raised ValueError: boom"
    assert steps(run) == [("inc", "executed"), ("boom", "error")]
    assert run["logs"][-1]["error"] == run["error"]
    assert (run["logs"][-1]["next"], run["logs"][-1]["keys_changed"]) == (None, [])
    assert run["final_state"]["data"] == {"count": 1}  # the half-written key is gone


async def test_run_condition_error_fails_the_run(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"default_next": "double", "branches": [{"condition": "explodes", "target": "double"}]}}
    run = await create_and_run(client, graph(["inc", "double"], edges))
    assert (run["status"], steps(run)) == ("failed", [("inc", "error")])
    assert run["error"] == "condition 'explodes' of node 'inc' raised KeyError: 'missing'"
    assert run["final_state"]["data"] == {"count": 1}


async def test_run_condition_must_return_a_bool(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"branches": [{"condition": "not_bool", "target": "double"}]}}
    run = await create_and_run(client, graph(["inc", "double"], edges))
    assert (run["status"], run["error"]) == ("failed", "condition 'not_bool' returned int, expected bool")


@pytest.mark.parametrize(
    ("node", "error"),
    [
        ("returns_int", "node 'returns_int' returned int, expected a dict or None"),
        ("returns_set", "node 'returns_set' wrote data that is not JSON: set is not a JSON type"),
    ],
    ids=["not-a-dict", "not-json"],
)
async def test_run_rejects_node_output_that_is_not_json_data(client: httpx.AsyncClient, node: str, error: str) -> None:
    run = await create_and_run(client, graph([node]), {"keep": 1})
    assert (run["status"], run["error"], steps(run)) == ("failed", error, [(node, "error")])
    assert run["final_state"]["data"] == {"keep": 1}


async def test_run_sync_node_runs_in_a_worker_thread(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["double"]), {"value": 21})
    assert run["final_state"]["data"]["value"] == 42
    assert run["final_state"]["data"]["thread"] != threading.get_ident()


async def test_run_logs_in_place_changes_and_removals(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["tidy"]), {"temp": 1, "keep": 2})
    assert run["final_state"]["data"] == {"keep": 2, "note": "tidied"}
    assert (run["logs"][0]["keys_changed"], run["logs"][0]["updates"]) == (["note", "temp"], {"note": "tidied"})


async def test_run_updates_replay_to_the_final_state(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"default_next": "tidy", "branches": [{"condition": "below_three", "target": "inc"}]},
             "tidy": {"default_next": "double"}}
    initial = {"temp": "x", "value": 5}
    run = await create_and_run(client, graph(["inc", "tidy", "double"], edges), initial)
    replayed = dict(initial)
    for entry in run["logs"]:
        for key in entry["keys_changed"]:
            if key in entry["updates"]:
                replayed[key] = entry["updates"][key]
            else:
                del replayed[key]
    assert replayed == run["final_state"]["data"]


async def test_run_timing_splits_node_time_from_engine_overhead(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["inc", "double"], chain("inc", "double")))
    node_ms = sum(entry["duration_ms"] for entry in run["logs"])
    assert run["engine_overhead_ms"] == pytest.approx(run["duration_ms"] - node_ms, abs=1e-9)
    assert 0 < run["engine_overhead_ms"] < run["duration_ms"]


async def test_run_node_context_gives_run_id_and_tools(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["use_tool"]), {"word": "hi"})
    assert run["final_state"]["data"] == {"word": "hi", "shout": "HI", "run_id": run["run_id"]}


async def test_run_unknown_tool_fails_naming_the_known_ones(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["use_tool"]), {"word": "hi", "tool": "lower"})
    assert run["error"] == "node 'use_tool' raised UnknownName: unknown tool 'lower'; registered: upper"


async def test_run_concurrent_runs_of_one_graph_are_isolated(client: httpx.AsyncClient) -> None:
    await client.post("/graph/create", json=graph(["tag", "inc"], chain("tag", "inc")))
    bodies = [{"graph_id": "g", "state": {"data": {"who": who, "seen": []}}} for who in ("ann", "bob", "cy")]
    responses = await asyncio.gather(*(client.post("/graph/run", json=body) for body in bodies))
    assert [r.json()["final_state"]["data"] for r in responses] == [
        {"who": who, "seen": [who], "count": 1} for who in ("ann", "bob", "cy")]


async def test_run_graph_leaves_the_callers_state_untouched(registry: we.Registry) -> None:
    definition = we.GraphDefinition(graph_id="g", start_node="tag", nodes=("tag", "tidy"),
                                    edges={"tag": we.EdgeDef(default_next="tidy")})
    state = we.WorkflowState(data={"who": "x", "seen": ["before"], "temp": 1}, metadata={"m": [1]})
    run = await we.run_graph(definition, state, registry)
    assert run.status is we.RunStatus.COMPLETED
    assert state.data == {"who": "x", "seen": ["before"], "temp": 1}
    assert run.state.data == {"who": "x", "seen": ["before", "x"], "note": "tidied"}
    assert run.state.metadata == {"m": [1]} and run.state.metadata["m"] is not state.metadata["m"]


async def test_engine_runs_a_definition_without_http(registry: we.Registry) -> None:
    engine = we.Engine(registry)
    definition = we.GraphDefinition(start_node="inc", nodes=("inc",))
    run = await engine.run(definition, we.WorkflowState(data={"count": 41}))
    assert (run.status, run.iteration, run.state.data) == (we.RunStatus.COMPLETED, 1, {"count": 42})
    assert engine.store.get_run(run.run_id) is run


async def test_engine_rejects_an_invalid_definition(registry: we.Registry) -> None:
    with pytest.raises(we.InvalidGraph, match="the graph has 1 problem$"):
        await we.Engine(registry).run(we.GraphDefinition(start_node="ghost", nodes=("inc",)))


def node(name: str, **settings: Any) -> dict:
    return {"name": name, **settings}


async def test_run_retries_a_failing_node_and_logs_each_retry(registry: we.Registry) -> None:
    definition = we.structure_body(graph([node("flaky", retry={"max_attempts": 3}), "inc"], chain("flaky", "inc")),
                                   we.GraphDefinition)
    run = await we.run_graph(definition, we.WorkflowState(data={"succeed_on": 3}), registry)
    assert run.status is we.RunStatus.COMPLETED
    assert [(e.node, e.event, e.attempt, e.error) for e in run.logs] == [
        ("flaky", we.LogEvent.RETRY, 1, "node 'flaky' raised ConnectionError: attempt 1 failed"),
        ("flaky", we.LogEvent.RETRY, 2, "node 'flaky' raised ConnectionError: attempt 2 failed"),
        ("flaky", we.LogEvent.EXECUTED, 3, None),
        ("inc", we.LogEvent.EXECUTED, 1, None),
    ]
    assert [e.iteration for e in run.logs] == [1, 1, 1, 2]
    assert run.state.data == {"succeed_on": 3, "attempts": 3, "count": 1}


async def test_run_fails_when_retries_run_out(registry: we.Registry) -> None:
    definition = we.structure_body(graph([node("flaky", retry={"max_attempts": 2})]), we.GraphDefinition)
    run = await we.run_graph(definition, we.WorkflowState(data={"succeed_on": 5}), registry)
    assert (run.status, run.error) == (we.RunStatus.FAILED, "node 'flaky' raised ConnectionError: attempt 2 failed")
    assert [(e.event, e.attempt) for e in run.logs] == [(we.LogEvent.RETRY, 1), (we.LogEvent.ERROR, 2)]


def test_retry_policy_backs_off_geometrically() -> None:
    policy = we.RetryPolicy(max_attempts=4, backoff_s=0.2, backoff_factor=3)
    assert [policy.delay_s(attempt) for attempt in (1, 2, 3)] == pytest.approx([0.2, 0.6, 1.8])


async def test_run_node_timeout_fails_the_node(registry: we.Registry) -> None:
    definition = we.structure_body(graph([node("hang", timeout_s=0.01)]), we.GraphDefinition)
    run = await we.run_graph(definition, we.WorkflowState(data={"keep": 1}), registry)
    assert (run.status, run.error) == (we.RunStatus.FAILED, "node 'hang' timed out after 0.01 s")
    assert [(e.node, e.event) for e in run.logs] == [("hang", we.LogEvent.ERROR)]
    assert run.state.data == {"keep": 1}


async def test_run_on_error_edge_recovers(registry: we.Registry) -> None:
    edges = {"boom": {"default_next": "inc", "on_error": "handle_error"}, "handle_error": {"default_next": "inc"}}
    definition = we.structure_body(graph(["boom", "handle_error", "inc"], edges), we.GraphDefinition)
    run = await we.run_graph(definition, we.WorkflowState(), registry)
    last_error = {"node": "boom", "error": "node 'boom' raised ValueError: boom"}
    assert (run.status, run.error) == (we.RunStatus.COMPLETED, None)
    assert [(e.node, e.event, e.next) for e in run.logs] == [
        ("boom", we.LogEvent.ERROR, "handle_error"), ("handle_error", we.LogEvent.EXECUTED, "inc"),
        ("inc", we.LogEvent.EXECUTED, None)]
    assert (run.logs[0].keys_changed, run.logs[0].updates) == (("last_error",), {"last_error": last_error})
    assert run.state.data == {"last_error": last_error, "handled": "boom", "count": 1}


async def test_run_one_function_serves_nodes_with_their_own_config(registry: we.Registry) -> None:
    nodes = [node("first", fn="echo_config", config={"n": 1}), node("second", fn="echo_config", config={"n": 2})]
    definition = we.structure_body(graph(nodes, chain("first", "second")), we.GraphDefinition)
    run = await we.run_graph(definition, we.WorkflowState(), registry)
    assert run.state.data == {"first": {"n": 1}, "second": {"n": 2}}
    assert [e.node for e in run.logs] == ["first", "second"]


async def test_run_timeout_ends_the_run_timed_out(registry: we.Registry) -> None:
    definition = we.structure_body(graph(["inc", "hang"], chain("inc", "hang")), we.GraphDefinition)
    run = await we.run_graph(definition, we.WorkflowState(), registry, timeout_s=0.05)
    assert (run.status, run.error) == (we.RunStatus.TIMED_OUT, "the run took longer than its timeout_s of 0.05 s")
    assert [(e.node, e.event, e.error) for e in run.logs] == [
        ("inc", we.LogEvent.EXECUTED, None), ("hang", we.LogEvent.TIMED_OUT, "the run timed out during node 'hang'")]
    assert (run.state.data, run.current_node) == ({"count": 1}, "hang")


async def test_run_cancelled_records_the_node_and_keeps_state(registry: we.Registry) -> None:
    hang_started["cancel"] = asyncio.Event()
    definition = we.structure_body(graph(["inc", "hang"], chain("inc", "hang")), we.GraphDefinition)
    run = we.new_run(definition, we.WorkflowState(metadata={"started": "cancel"}))
    task = asyncio.create_task(we.execute_run(run, definition, registry))
    await hang_started["cancel"].wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (run.status, run.error) == (we.RunStatus.CANCELLED, "the run was cancelled at node 'hang'")
    assert [(e.node, e.event) for e in run.logs] == [("inc", we.LogEvent.EXECUTED), ("hang", we.LogEvent.CANCELLED)]
    assert run.state.data == {"count": 1} and run.finished_at is not None


@pytest.mark.parametrize(
    ("nodes", "problems"),
    [
        ([node("inc", fn="ghost")], [("$.nodes[0].fn", "unknown node function 'ghost'")]),
        ([node("ghost")], [("$.nodes[0].name", "unknown node function 'ghost'")]),
        (["inc", node("inc", fn="double")], [("$.nodes[1]", "duplicate node 'inc'")]),
    ],
    ids=["unknown-fn", "unknown-name", "duplicate"],
)
def test_validate_graph_checks_node_objects(registry: we.Registry, nodes: list, problems: list) -> None:
    definition = we.structure_body(graph(nodes), we.GraphDefinition)
    with pytest.raises(we.InvalidGraph) as caught:
        we.validate_graph(definition, registry)
    assert [(p.path, p.message) for p in caught.value.details] == problems


def test_validate_graph_checks_on_error_targets(registry: we.Registry) -> None:
    definition = we.structure_body(graph(["inc"], {"inc": {"on_error": "ghost"}}), we.GraphDefinition)
    with pytest.raises(we.InvalidGraph) as caught:
        we.validate_graph(definition, registry)
    assert [(p.path, p.message) for p in caught.value.details] == [("$.edges.inc.on_error", "unknown node 'ghost'")]


@pytest.mark.parametrize(
    ("settings", "problems"),
    [
        ({"timeout_s": 0}, [("$.nodes[0]", "timeout_s must be more than 0 and at most 86400.0, got 0.0")]),
        ({"timeout_s": "5"}, [("$.nodes[0].timeout_s", "expected a number, got a string")]),
        ({"retry": {"max_attempts": 0}}, [("$.nodes[0].retry", "max_attempts must be at least 1, got 0")]),
        ({"retry": {"backoff_factor": 0.5}}, [("$.nodes[0].retry", "backoff_factor must be between 1 and 10, got 0.5")]),
        ({"retry": {"tries": 2}}, [("$.nodes[0].retry", "extra fields found (tries)")]),
        ({"config": []}, [("$.nodes[0].config", "expected an object, got an array")]),
    ],
    ids=["zero-timeout", "string-timeout", "zero-attempts", "small-factor", "extra-key", "list-config"],
)
def test_structure_body_checks_node_settings(settings: dict, problems: list) -> None:
    with pytest.raises(we.InvalidRequest) as caught:
        we.structure_body(graph([node("inc", **settings)]), we.GraphDefinition)
    assert [(p.path, p.message) for p in caught.value.details] == problems


# ---------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------
def make_run(run_id: str, status: we.RunStatus) -> we.RunContext:
    return we.RunContext(run_id=run_id, graph_id="g", status=status, state=we.WorkflowState(), created_at=we.datetime.now(we.UTC))


def test_store_evicts_the_oldest_finished_runs_only() -> None:
    store = we.MemoryStore(max_runs=2)
    store.put_run(make_run("running", we.RunStatus.RUNNING))
    for run_id in ("a", "b", "c"):
        store.put_run(make_run(run_id, we.RunStatus.COMPLETED))
    assert store.counts() == (0, 3)
    assert store.get_run("running").status is we.RunStatus.RUNNING
    assert [store.get_run(r).run_id for r in ("b", "c")] == ["b", "c"]
    with pytest.raises(we.RunNotFound, match="run 'a' does not exist"):
        store.get_run("a")


def test_store_counts_a_run_once_when_saved_twice() -> None:
    store = we.MemoryStore(max_runs=2)
    run = make_run("a", we.RunStatus.FAILED)
    store.put_run(run)
    store.put_run(run)
    store.put_run(make_run("b", we.RunStatus.COMPLETED))
    assert store.get_run("a") is run


def test_store_add_graph_is_idempotent_and_refuses_conflicts() -> None:
    store = we.MemoryStore(max_graphs=1)
    first = we.GraphDefinition(graph_id="g", start_node="a", nodes=("a",))
    assert store.add_graph(first) is True
    assert store.add_graph(we.GraphDefinition(graph_id="g", start_node="a", nodes=("a",))) is False
    with pytest.raises(we.GraphConflict, match="graph 'g' already exists with a different definition"):
        store.add_graph(we.GraphDefinition(graph_id="g", start_node="a", nodes=("a",), max_iterations=3))
    with pytest.raises(we.StoreFull, match="already holds 1 graphs"):
        store.add_graph(we.GraphDefinition(graph_id="h", start_node="a", nodes=("a",)))
    assert store.get_graph("g") is first


def test_store_get_graph_unknown_raises() -> None:
    with pytest.raises(we.GraphNotFound, match="graph 'x' does not exist"):
        we.MemoryStore().get_graph("x")


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------
async def test_get_health_answers_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert (response.status_code, response.json()) == (200, {"status": "ok", "graphs": 0, "runs": 0})


async def test_post_graph_create_stores_and_is_idempotent(client: httpx.AsyncClient) -> None:
    definition = graph(["inc", "double"], chain("inc", "double"))
    first = await client.post("/graph/create", json=definition)
    again = await client.post("/graph/create", json=definition)
    assert (first.status_code, first.json()) == (201, {"graph_id": "g"})
    assert (again.status_code, again.json()) == (200, {"graph_id": "g"})


async def test_post_graph_create_conflict_keeps_the_stored_graph(client: httpx.AsyncClient) -> None:
    await client.post("/graph/create", json=graph(["inc"]))
    response = await client.post("/graph/create", json=graph(["double"]))
    assert (response.status_code, response.json()) == (409, {"error": {
        "code": "graph_conflict", "message": "graph 'g' already exists with a different definition", "details": []}})
    stored = await client.get("/graph/definition/g")
    assert stored.json()["nodes"] == ["inc"]


async def test_post_graph_create_without_id_gets_a_new_one(client: httpx.AsyncClient) -> None:
    definition = {"start_node": "inc", "nodes": ["inc"]}
    first = (await client.post("/graph/create", json=definition)).json()["graph_id"]
    second = (await client.post("/graph/create", json=definition)).json()["graph_id"]
    assert len(first) == 32 and int(first, 16) >= 0 and first != second
    stored = await client.get(f"/graph/definition/{first}")
    assert stored.json() == {"graph_id": first, "start_node": "inc", "nodes": ["inc"], "edges": {}, "max_iterations": None}


async def test_post_graph_create_reports_graph_rules(client: httpx.AsyncClient) -> None:
    response = await client.post("/graph/create", json=graph(["inc"], {"inc": {"branches": [{"condition": "foo", "target": "inc"}]}}))
    assert (response.status_code, response.json()) == (422, {"error": {
        "code": "invalid_graph", "message": "the graph has 1 problem",
        "details": [{"path": "$.edges.inc.branches[0].condition", "message": "unknown condition 'foo'"}]}})


async def test_get_graph_definition_round_trips_through_create(client: httpx.AsyncClient) -> None:
    edges = {"inc": {"default_next": "double", "branches": [{"condition": "below_three", "target": "inc"}]}}
    definition = graph(["inc", "double"], edges, max_iterations=7)
    await client.post("/graph/create", json=definition)
    stored = await client.get("/graph/definition/g")
    assert (stored.status_code, stored.json()) == (200, {**definition, "edges": {
        "inc": {"default_next": "double", "branches": [{"condition": "below_three", "target": "inc"}], "on_error": None}}})
    assert (await client.post("/graph/create", json=stored.json())).status_code == 200


async def test_post_graph_run_without_state_starts_empty(client: httpx.AsyncClient) -> None:
    await client.post("/graph/create", json=graph(["inc"]))
    response = await client.post("/graph/run", json={"graph_id": "g"})
    assert response.status_code == 200
    assert response.json()["final_state"] == {"data": {"count": 1}, "metadata": {}}


async def test_post_graph_run_keeps_metadata(client: httpx.AsyncClient) -> None:
    await client.post("/graph/create", json=graph(["inc"]))
    response = await client.post("/graph/run", json={"graph_id": "g", "state": {"metadata": {"user": "ann"}}})
    assert response.json()["final_state"] == {"data": {"count": 1}, "metadata": {"user": "ann"}}


async def test_post_graph_run_failed_run_is_200(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["boom"]))
    assert (run["status"], run["error"]) == ("failed", "node 'boom' raised ValueError: boom")


async def test_get_graph_state_returns_the_run_record(client: httpx.AsyncClient) -> None:
    run = await create_and_run(client, graph(["inc"]))
    response = await client.get(f"/graph/state/{run['run_id']}")
    record = response.json()
    assert response.status_code == 200
    assert set(record) == {"run_id", "graph_id", "status", "current_node", "iteration", "max_iterations", "timeout_s", "state",
                           "logs", "error", "created_at", "started_at", "finished_at", "duration_ms", "engine_overhead_ms"}
    assert {k: record[k] for k in ("run_id", "graph_id", "status", "current_node", "iteration", "logs", "error")} == {
        k: run[k] for k in ("run_id", "graph_id", "status", "current_node", "iteration", "logs", "error")}
    assert record["state"] == run["final_state"]
    assert record["created_at"] <= record["started_at"] <= record["finished_at"]
    assert record["finished_at"].endswith("+00:00")


async def test_get_graph_state_evicted_run_is_404(registry: we.Registry) -> None:
    app = we.create_app(registry=registry, store=we.MemoryStore(max_runs=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        first = await create_and_run(client, graph(["inc"]))
        second = (await client.post("/graph/run", json={"graph_id": "g"})).json()
        assert (await client.get(f"/graph/state/{second['run_id']}")).status_code == 200
        response = await client.get(f"/graph/state/{first['run_id']}")
    assert (response.status_code, response.json()["error"]["code"]) == (404, "run_not_found")


def error(code: str, message: str, *details: tuple[str, str]) -> dict:
    return {"error": {"code": code, "message": message, "details": [{"path": p, "message": m} for p, m in details]}}


BAD_REQUESTS = [
    ("POST", "/graph/create", b"{nope", 400,
     error("invalid_json", "the request body is not valid JSON", ("$", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"))),
    ("POST", "/graph/run", b"", 400, error("invalid_json", "the request body is not valid JSON", ("$", "Expecting value: line 1 column 1 (char 0)"))),
    ("POST", "/graph/run", b"\xff\xfe", 400, error("invalid_json", "the request body is not valid JSON", ("$", "Expecting value: line 1 column 1 (char 0)"))),
    ("POST", "/graph/run", b'{"graph_id": "g", "state": {"data": {"x": NaN}}}', 400,
     error("invalid_json", "the request body is not valid JSON", ("$", "NaN is not valid JSON"))),
    ("POST", "/graph/run", b"[" * 100_000, 400, error("invalid_json", "the request body is not valid JSON", ("$", "nesting is too deep"))),
    ("POST", "/graph/run", json.dumps({"graph_id": "g", "state": {"data": json.loads("[" * 70 + "]" * 70)}}).encode(), 400,
     error("invalid_json", "the request body is not valid JSON", ("$", "nesting deeper than 64 levels"))),
    ("POST", "/graph/run", b"[1, 2]", 422, error("invalid_request", "the request has 1 problem", ("$", "expected a JSON object"))),
    ("POST", "/graph/run", b'{"graph_id": 5, "state": {"data": [], "extra": 1}, "max_iterations": "3"}', 422,
     error("invalid_request", "the request has 4 problems", ("$.graph_id", "expected a string, got a number"),
           ("$.state.data", "expected an object, got an array"), ("$.state", "extra fields found (extra)"),
           ("$.max_iterations", "expected an integer, got a string"))),
    ("POST", "/graph/run", b'{"graph_id": "g", "max_iterations": 10001}', 422,
     error("invalid_request", "the request has 1 problem", ("$.max_iterations", "must be at most 10000"))),
    ("POST", "/graph/run", b'{"graph_id": "ghost"}', 404, error("graph_not_found", "graph 'ghost' does not exist")),
    ("POST", "/graph/create", json.dumps({"start_node": "inc", "nodes": ["inc"], "pad": "x" * (1 << 20)}).encode(), 413,
     error("body_too_large", "the request body is over the limit of 1048576 bytes")),
    ("GET", "/graph/state/nope", b"", 404, error("run_not_found", "run 'nope' does not exist")),
    ("GET", "/graph/definition/nope", b"", 404, error("graph_not_found", "graph 'nope' does not exist")),
    ("GET", "/graph/nothing", b"", 404, error("not_found", "GET /graph/nothing: Not Found")),
    ("DELETE", "/graph/create", b"", 405, error("method_not_allowed", "DELETE /graph/create: Method Not Allowed")),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "expected"), BAD_REQUESTS,
    ids=["bad-json", "empty-body", "not-utf8", "nan", "deep-json", "deep-state", "array-body", "wrong-types",
         "over-cap", "unknown-graph", "too-large", "unknown-run", "unknown-definition", "unknown-route", "wrong-method"],
)
async def test_http_bad_requests_get_the_error_shape(
    client: httpx.AsyncClient, method: str, path: str, body: bytes, status: int, expected: dict
) -> None:
    await client.post("/graph/create", json=graph(["inc"]))
    response = await client.request(method, path, content=body)
    assert (response.status_code, response.json()) == (status, expected)
    assert response.headers["content-type"] == "application/json"
    runs = await client.get("/")
    assert runs.json() == {"status": "ok", "graphs": 1, "runs": 0}
    assert (await client.get("/graph/definition/g")).json()["nodes"] == ["inc"]


async def test_http_method_not_allowed_keeps_the_allow_header(client: httpx.AsyncClient) -> None:
    response = await client.put("/graph/run")
    assert (response.status_code, response.headers["allow"]) == (405, "POST")


async def test_http_body_over_limit_without_content_length_is_413(registry: we.Registry) -> None:
    app = we.create_app(registry=registry, settings=we.Settings(max_body_bytes=100))

    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 20

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await client.post("/graph/run", content=chunks())
    assert (response.status_code, response.json()) == (413, error("body_too_large", "the request body is over the limit of 100 bytes"))


async def test_http_unexpected_error_is_a_bare_500(registry: we.Registry, caplog: pytest.LogCaptureFixture) -> None:
    class BrokenStore(we.MemoryStore):
        def get_run(self, run_id: str) -> we.RunContext:
            raise RuntimeError("secret detail")

    app = we.create_app(registry=registry, store=BrokenStore())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/graph/state/x")
    assert (response.status_code, response.json()) == (500, error("internal_error", "internal error; see the server log"))
    assert "secret detail" not in response.text
    assert "RuntimeError: secret detail" in caplog.text


async def test_http_registered_graphs_are_stored_at_startup(registry: we.Registry) -> None:
    registry.add_graph(we.GraphDefinition(graph_id="builtin", start_node="inc", nodes=("inc",)))
    app = we.create_app(registry=registry)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await client.post("/graph/run", json={"graph_id": "builtin"})
    assert (response.status_code, response.json()["final_state"]["data"]) == (200, {"count": 1})


def test_create_app_refuses_an_invalid_registered_graph(registry: we.Registry) -> None:
    registry.add_graph(we.GraphDefinition(graph_id="broken", start_node="inc", nodes=("inc", "ghost")))
    with pytest.raises(we.InvalidGraph, match="the graph has 1 problem"):
        we.create_app(registry=registry)


# ---------------------------------------------------------------------------
# Settings and wiring
# ---------------------------------------------------------------------------
def test_settings_from_env_reads_every_variable() -> None:
    env = {"WORKFLOW_MAX_ITERATIONS": "7", "WORKFLOW_MAX_ITERATIONS_CAP": "70", "WORKFLOW_MAX_RUNS": "5",
           "WORKFLOW_MAX_GRAPHS": "4", "WORKFLOW_MAX_BODY_BYTES": "1000", "WORKFLOW_MODULES": " a, b ,,"}
    assert we.settings_from_env(env) == we.Settings(
        max_iterations=7, max_iterations_cap=70, max_runs=5, max_graphs=4, max_body_bytes=1000, workflow_modules=("a", "b"))
    assert we.settings_from_env({}) == we.Settings()


def test_settings_from_env_rejects_bad_numbers() -> None:
    with pytest.raises(ValueError, match="WORKFLOW_MAX_RUNS must be an integer, got 'lots'"):
        we.settings_from_env({"WORKFLOW_MAX_RUNS": "lots"})
    with pytest.raises(we.InvalidValue, match="max_runs must be at least 1, got 0"):
        we.settings_from_env({"WORKFLOW_MAX_RUNS": "0"})


async def test_settings_max_iterations_is_the_run_default(registry: we.Registry) -> None:
    app = we.create_app(registry=registry, settings=we.Settings(max_iterations=3))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        run = await create_and_run(client, graph(["inc"], {"inc": {"branches": [{"condition": "always", "target": "inc"}]}}))
    assert (run["status"], run["iteration"]) == ("stopped_max_iterations", 3)


def test_load_workflows_skips_a_missing_default_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(we, "DEFAULT_WORKFLOWS", ("no_such_workflow_module",))
    registry = we.Registry()
    we.load_workflows(registry, None)
    assert registry.graphs == ()


def test_load_workflows_refuses_a_missing_named_module() -> None:
    with pytest.raises(RuntimeError, match=r"workflow module 'no_such_workflow_module' \(from WORKFLOW_MODULES\) cannot be imported"):
        we.load_workflows(we.Registry(), ("no_such_workflow_module",))


def test_load_workflows_calls_register(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hello_flow.py").write_text(
        "def register(registry):\n"
        "    registry.node(name='hello')(lambda state, ctx: {'hi': 1})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = we.Registry()
    we.load_workflows(registry, ("hello_flow",))
    assert registry.has_node("hello")


def readme_block(opening: str) -> str:
    """The first ```python block of the README whose first line is `opening`."""
    blocks = (HERE / "README.md").read_text().split("```python\n")[1:]
    return next(block.split("```")[0] for block in blocks if block.startswith(opening))


async def test_readme_node_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "readme_flow.py").write_text(readme_block("# my_flow.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = we.Registry()
    we.load_workflows(registry, ("readme_flow",))
    definition = we.GraphDefinition(
        graph_id="demo", start_node="fetch", nodes=("fetch", "count_words"),
        edges={"fetch": we.EdgeDef(default_next="count_words"),
               "count_words": we.EdgeDef(branches=(we.BranchCondition(condition="too_short", target="fetch"),))},
        max_iterations=4,
    )
    run = await we.Engine(registry).run(definition, we.WorkflowState(data={"name": "ada lovelace"}))
    assert (run.status, [entry.node for entry in run.logs]) == (we.RunStatus.STOPPED_MAX_ITERATIONS, ["fetch", "count_words"] * 2)
    assert run.state.data == {"name": "ada lovelace", "text": "ADA LOVELACE", "words": 2}


# ---------------------------------------------------------------------------
# End to end: a real uvicorn on 127.0.0.1
# ---------------------------------------------------------------------------
E2E_FLOW = """
def register(registry):
    @registry.node
    async def count(state, ctx):
        return {"n": state.data.get("n", 0) + 1}

    @registry.condition
    def below_limit(state):
        return state.data["n"] < state.data.get("limit", 3)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uvicorn_command(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "workflow_engine:app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]


@pytest.fixture
def server(tmp_path: Path) -> Any:
    """Start `uvicorn workflow_engine:app` with a small workflow module on a free port; yield its URL; stop it."""
    (tmp_path / "e2e_flow.py").write_text(E2E_FLOW)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(tmp_path)]), "WORKFLOW_MODULES": "e2e_flow"}
    process = subprocess.Popen(uvicorn_command(port), cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else "server exited"
            try:
                httpx.get(base + "/", timeout=0.5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start in 20 s"
                time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_e2e_create_run_and_state_over_a_socket(server: str) -> None:
    definition = {"graph_id": "loop", "start_node": "count", "nodes": ["count"],
                  "edges": {"count": {"default_next": None, "branches": [{"condition": "below_limit", "target": "count"}]}}}
    with httpx.Client(base_url=server, timeout=10) as client:
        health = client.get("/")
        created = client.post("/graph/create", json=definition)
        run = client.post("/graph/run", json={"graph_id": "loop", "state": {"data": {"limit": 4}}})
        state = client.get(f"/graph/state/{run.json()['run_id']}")
    assert (health.status_code, health.json()) == (200, {"status": "ok", "graphs": 0, "runs": 0})
    assert (created.status_code, created.json()) == (201, {"graph_id": "loop"})
    body = run.json()
    assert (run.status_code, body["status"], body["iteration"]) == (200, "completed", 4)
    assert steps(body) == [("count", "executed")] * 4
    assert body["final_state"] == {"data": {"limit": 4, "n": 4}, "metadata": {}}
    assert (state.status_code, state.json()["state"], state.json()["logs"]) == (200, body["final_state"], body["logs"])


def test_e2e_errors_over_a_socket(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10) as client:
        missing = client.get("/graph/state/nope")
        big = client.post("/graph/create", content=b"x" * (1024 * 1024 + 1))
        bad = client.post("/graph/create", content=b"{", headers={"content-type": "application/json"})
        wrong = client.put("/")
    assert (missing.status_code, missing.json()) == (404, error("run_not_found", "run 'nope' does not exist"))
    assert (big.status_code, big.json()) == (413, error("body_too_large", "the request body is over the limit of 1048576 bytes"))
    assert (bad.status_code, bad.json()) == (400, error("invalid_json", "the request body is not valid JSON",
                                                          ("$", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")))
    allowed = set(wrong.headers["allow"].split(", "))  # Starlette keeps methods in a set: the order varies
    assert (wrong.status_code, allowed, wrong.json()["error"]["code"]) == (405, {"GET", "HEAD"}, "method_not_allowed")


def test_e2e_missing_named_module_stops_startup() -> None:
    env = {**os.environ, "PYTHONPATH": str(HERE), "WORKFLOW_MODULES": "no_such_workflow_module"}
    result = subprocess.run(uvicorn_command(free_port()), cwd=HERE, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "workflow module 'no_such_workflow_module' (from WORKFLOW_MODULES) cannot be imported" in result.stderr
