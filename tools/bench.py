"""Benchmark the workflow engine against its ceiling: the runner in-process, the HTTP server, memory, the stores.

Usage:  python tools/bench.py [engine] [http] [memory] [stores] [fanout] [--quick] [--json PATH] [--markdown PATH]
                               [--memory-runs N] [--http-requests N] [--postgres-url URL] [--fill N]
                               (default: all sections)

engine  The five-node loop A -> B -> C -> D -> E, E back to B while data["i"] < N, with full per-step logging,
        through Engine.run (the run record created, and saved to the memory store at the end): microseconds and
        function calls (counted with cProfile, which does not depend on the machine's load) per step of a long run
        (N = 2000) and per short run (N = 1, five steps), next to two baselines measured in the same invocation: a
        bare asyncio loop awaiting the same node functions, and that loop plus a minimal attrs log record per step.
        Also shown: the runner alone (run_graph, no store), and PocketFlow running the same nodes when it is
        importable (`pip install pocketflow` in the benchmark's own environment; never a project dependency), and
        where Engine.run's calls are made: by section of workflow_engine.py (or library) of the calling code.
http    `uvicorn workflow_engine:app` and a bare Starlette endpoint that parses a 300-byte JSON body (one worker
        each, 127.0.0.1, the same server stack on both), driven by the same keep-alive HTTP/1.1 client at 1, 16 and
        64 connections: requests/s, p50/p99 latency and errors of POST /graph/run (a trivial 1-node run and a
        trivial 5-node run, waited for; the 5-node run with "wait": false) and GET /graph/state/{run_id}, each body
        300 bytes. Measured on uvicorn's h11 + asyncio stack, and on httptools + uvloop when this interpreter has
        both (the servers run on it). Each case runs for a fixed time, or sends a fixed number of requests with
        --http-requests (whatever the machine's speed).
memory  Bytes held per stored finished run of the code-review input (tracemalloc over Engine.run, and the server's
        RSS), and the server's RSS over 50,000 runs with the default WORKFLOW_MAX_RUNS: it must level off.
stores  Trivial runs (the engine loop with N = 1: five steps) through the memory store, SQLite and PostgreSQL,
        each starting empty: in process, runs/s of Engine.run one after another (median of a few rounds); over
        HTTP, one `uvicorn workflow_engine:app` per store (WORKFLOW_DB set) at 1, 16 and 64 connections, POST
        /graph/run with "wait": true, requests/s and p50/p99 next to the bare endpoint given the same body.
        For the SQL stores, what one run costs them: writes, those through the writer thread, transactions, and
        PostgreSQL's round trips (counted by a relay between the store and the server).
        Then SQLite filling up: --fill N runs one after another into a file with max_runs = N, runs/s of the
        last chunk against the first (default 10,000; issue 14 asks for 100,000) and, for information, the
        process's CPU time per run of each chunk (which another process's load moves far less); and what PRAGMA
        synchronous FULL costs against NORMAL (the store's setting), one run at a time and 16 at once.
        PostgreSQL only with --postgres-url (default $WORKFLOW_TEST_POSTGRES_URL): a server on which the bench
        creates databases of its own and drops them afterwards; without one its row says it was skipped.
fanout  A `map` node over 1,000 items (200 with --quick) of a one-node trivial graph (E: i += 1), with the default
        max_concurrency, next to as many trivial runs of that graph one after another, in process: the map may cost
        at most a few times the sequential runs (issue 15). Each branch starts from the run's data, which holds the
        list mapped over, so a third row gives the sequential runs that data too (for information).

Absolute times drift on a shared machine; the ratios to baselines measured in the same invocation drift far less.
Targets come from issue 7 (the engine, http and stores sections' from issue 14, fanout's from issue 15); a
missed target is reported, not an error, and a full invocation ends with a table of every section's
targets (see TARGET_KEYS). The exit status is 1 when a section could not run (e.g. the code_review workflow
is missing). Standard library plus the project's dependencies; RSS needs Linux.
"""

import argparse
import asyncio
import contextlib
import cProfile
import gc
import importlib
import importlib.util
import inspect
import json
import os
import platform
import pstats
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.parse
import warnings
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SECTIONS = ("engine", "http", "memory", "stores", "fanout")

REVIEW_CODE = '''import os
import sys


def load_config(path, cache={}):
    if path == None:
        return None
    try:
        with open(path) as handle:
            data = handle.read()
    except:
        pass
    return data
'''
REVIEW_INPUT = {"graph_id": "code_review", "state": {"data": {"code": REVIEW_CODE, "quality_threshold": 75}}}

# Targets of issue 7 (the engine and http sections' are issue 14's: HttpCase.share, and the p99 spread below).
TARGET_ENGINE_RATIO = 5.0  # Engine.run time at most this many times the bare loop's, per step and per short run
TARGET_CALLS_PER_STEP = 20  # function calls (cProfile) per step of Engine.run's long run
TARGET_CALLS_PER_RUN = 150  # function calls of one short run through Engine.run, its record and save included
TARGET_P99_OVER_P50 = 3.0  # each HTTP case's p99 at most this many times its p50 at 64 connections
TARGET_FANOUT_RATIO = 3.0  # a map of N trivial branches at most this many times N sequential trivial runs
TARGET_BYTES_PER_RUN = 4096  # memory held per stored finished run
FLAT_TOLERANCE = 0.05  # RSS may grow at most this share once the store has been full for max_runs runs

MEMORY_CONNECTIONS = 16
SERVER_START_SECONDS = 30.0

BARE_APP = '''"""The HTTP ceiling: one POST endpoint that decodes a JSON body and answers a small JSON."""
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def post_echo(request):
    payload = await request.json()
    return JSONResponse({"ok": True, "keys": len(payload)})


app = Starlette(routes=[Route("/echo", post_echo, methods=["POST"])])
'''


@attrs.frozen(kw_only=True)
class Profile:
    """How long and how often each section measures."""

    repeats: int  # engine samples per variant, after a warm-up
    sample_seconds: float  # engine: length of one sample
    long_n: int  # engine: N of the long run
    http_seconds: float  # http: measured seconds per case
    http_warmup: float  # http: unmeasured seconds before each case
    traced_runs: int  # memory: runs under tracemalloc
    memory_runs: int  # memory: runs sent to the server
    memory_checkpoints: int  # memory: RSS readings over those runs
    memory_max_runs: int | None  # memory: WORKFLOW_MAX_RUNS for the server; None keeps the default
    store_rounds: int  # stores: timed rounds of in-process runs per store, after a warm-up run
    store_runs: int  # stores: runs per round
    fill_runs: int  # stores: runs into one SQLite file whose bound (max_runs) is that many
    fill_chunk: int  # stores: runs per timed chunk of the fill; the first chunk's runs/s is the baseline
    sync_runs: int  # stores: runs per SQLite synchronous setting and concurrency
    http_requests: int | None = None  # http, stores: requests per case instead of http_seconds of them
    fanout_items: int = 1000  # fanout: items of the map, and sequential runs it is compared with
    http_rounds: int = 1  # http: rounds of every case and the bare endpoint in turn, http_seconds shared out


FULL = Profile(
    repeats=7, sample_seconds=0.2, long_n=2000, http_seconds=2.0, http_warmup=0.5,
    traced_runs=500, memory_runs=50_000, memory_checkpoints=10, memory_max_runs=None,
    store_rounds=5, store_runs=200, fill_runs=10_000, fill_chunk=1000, sync_runs=640, http_rounds=3,
)
QUICK = Profile(
    repeats=3, sample_seconds=0.02, long_n=200, http_seconds=0.8, http_warmup=0.2,
    traced_runs=200, memory_runs=3000, memory_checkpoints=6, memory_max_runs=500,
    store_rounds=3, store_runs=20, fill_runs=400, fill_chunk=100, sync_runs=32, fanout_items=200,
)


class BenchError(Exception):
    """A section cannot run; the message says why."""


# ---------------------------------------------------------------------------
# Target rows
# ---------------------------------------------------------------------------
# Every section returns its targets as a list of rows of one shape, under its result's "targets" key, and a full
# invocation ends with one table of all of them (print_targets). A row is a dict with exactly these keys:
#   "target"    str: what is measured, with its unit ("POST /graph/run, 1 trivial node, wait, h11+asyncio, 64
#               conns: req/s")
#   "figure"    float | int | None: the measured value (None: not measured, e.g. a skipped server stack)
#   "baseline"  float | int | None: what the figure is compared with, measured in the same invocation (the bare
#               endpoint's req/s, the bare loop's µs/step, the case's own p50); None for an absolute goal
#   "ratio"     float | None: figure / baseline (None without a baseline)
#   "goal"      str: the target the ratio (or, without a baseline, the figure) must meet (">= 0.75x bare",
#               "<= 3x p50", "0")
#   "met"       bool
# Build rows with target_row(), which computes the ratio.
TARGET_KEYS = ("target", "figure", "baseline", "ratio", "goal", "met")


def target_row(target: str, figure: float | None, baseline: float | None, goal: str, met: bool) -> dict[str, Any]:
    """Return one target row (see TARGET_KEYS)."""
    ratio = figure / baseline if figure is not None and baseline else None
    return {"target": target, "figure": figure, "baseline": baseline, "ratio": ratio, "goal": goal, "met": met}


def _import_engine() -> ModuleType:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("workflow_engine")


def _status(met: bool) -> str:
    return "met" if met else "NOT MET"


# ---------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------
# The same five node functions serve the engine and both baselines; each updates one key, E increments i.
async def node_a(state: Any, ctx: object) -> dict[str, Any]:
    return {"a": state.data["i"]}


async def node_b(state: Any, ctx: object) -> dict[str, Any]:
    return {"b": state.data["i"]}


async def node_c(state: Any, ctx: object) -> dict[str, Any]:
    return {"c": state.data["i"]}


async def node_d(state: Any, ctx: object) -> dict[str, Any]:
    return {"d": state.data["i"]}


async def node_e(state: Any, ctx: object) -> dict[str, Any]:
    return {"i": state.data["i"] + 1}


def more(state: Any) -> bool:
    """Loop back to B while i < n."""
    return state.data["i"] < state.data["n"]


NODE_FUNCTIONS = {"A": node_a, "B": node_b, "C": node_c, "D": node_d, "E": node_e}
NEXT_NODE = {"A": "B", "B": "C", "C": "D", "D": "E", "E": None}


def steps_for(n: int) -> int:
    """Return how many steps a run with loop count `n` takes: A once, then B..E `n` times."""
    return 1 + 4 * n


class _BareState:
    __slots__ = ("data", "metadata")

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.metadata: dict[str, Any] = {}


@attrs.frozen(kw_only=True)
class StepRecord:
    """The minimal log record of the second baseline."""

    iteration: int
    node: str
    duration: float
    updates: dict[str, Any]


async def bare_run(n: int) -> int:
    """Run the five functions in turn with the graph's branch logic in plain Python; return the step count."""
    state, node, steps = _BareState({"i": 0, "n": n}), "A", 0
    while node is not None:
        result = await NODE_FUNCTIONS[node](state, None)
        state.data.update(result)
        steps += 1
        node = "B" if node == "E" and more(state) else NEXT_NODE[node]
    return steps


async def bare_logged_run(n: int) -> int:
    """Run `bare_run`'s loop, keeping a StepRecord with the step's duration and updates per step."""
    state, node, steps, records = _BareState({"i": 0, "n": n}), "A", 0, []
    while node is not None:
        started = time.perf_counter()
        result = await NODE_FUNCTIONS[node](state, None)
        state.data.update(result)
        steps += 1
        records.append(StepRecord(iteration=steps, node=node, duration=time.perf_counter() - started, updates=result))
        node = "B" if node == "E" and more(state) else NEXT_NODE[node]
    return steps


def bench_registry(we: ModuleType) -> Any:
    """Return a Registry holding the five nodes and the `more` condition."""
    registry = we.Registry()
    for name, fn in NODE_FUNCTIONS.items():
        registry.node(fn, name=name)
    registry.condition(more)
    return registry


def bench_graph(we: ModuleType) -> Any:
    """Return the graph A -> B -> C -> D -> E with E branching back to B on `more`."""
    edges = {name: we.EdgeDef(default_next=NEXT_NODE[name]) for name in "ABCD"}
    edges["E"] = we.EdgeDef(branches=(we.BranchCondition(condition="more", target="B"),))
    return we.GraphDefinition(graph_id="bench", start_node="A", nodes=tuple(NODE_FUNCTIONS), edges=edges)


async def _sample(fn: Callable[[], Awaitable[object]], loops: int) -> float:
    gc.collect()
    started = time.perf_counter()
    for _ in range(loops):
        await fn()
    return time.perf_counter() - started


async def measure(variants: dict[str, Callable[[], Awaitable[object]]], repeats: int, sample_seconds: float) -> dict:
    """Return the median seconds per call of each variant.

    Each variant is first calibrated (which warms it up) to about `sample_seconds` per sample; the samples are then
    taken in turn, variant after variant, so that drift on a shared machine hits all of them alike.
    """
    loops = {}
    for name, fn in variants.items():
        count = 1
        while (elapsed := await _sample(fn, count)) < sample_seconds / 4:
            count *= 2
        loops[name] = max(1, round(count * sample_seconds / elapsed))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(await _sample(fn, loops[name]) / loops[name])
    return {name: statistics.median(values) for name, values in samples.items()}


# The rows of the engine section, in print order: the two baselines, the engine through Engine.run (the targets),
# the runner alone, and PocketFlow when it is importable.
ENGINE_ROWS = {
    "bare": "bare asyncio loop",
    "bare_log": "bare loop + attrs log record per step",
    "engine": "Engine.run (memory store, run saved)",
    "runner": "runner alone (run_graph, no store)",
    "pocketflow": "PocketFlow, same nodes, a dict log record",
}


def pocketflow_run() -> tuple[str, Callable[[int], Awaitable[int]]] | None:
    """Return PocketFlow's version and a function running the loop as a PocketFlow AsyncFlow; None without it.

    Each node awaits the same node function, merges its result into the shared state and appends a dict log record
    with the step's duration, as the second baseline does; E's "more" action goes back to B.
    """
    try:
        import pocketflow  # noqa: PLC0415  # optional, and never a project dependency
    except ImportError:
        return None
    from importlib.metadata import version  # noqa: PLC0415

    class Step(pocketflow.AsyncNode):  # type: ignore[misc, name-defined]
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def prep_async(self, shared: dict[str, Any]) -> Any:
            return shared["state"]

        async def exec_async(self, state: Any) -> tuple[dict[str, Any], float]:
            started = time.perf_counter()
            return await NODE_FUNCTIONS[self.name](state, None), started

        async def post_async(self, shared: dict[str, Any], state: Any, outcome: tuple[dict[str, Any], float]) -> str:
            result, started = outcome
            state.data.update(result)
            shared["log"].append({"node": self.name, "duration": time.perf_counter() - started, "updates": result})
            return "more" if self.name == "E" and more(state) else "default"

    nodes = {name: Step(name) for name in NODE_FUNCTIONS}
    for name, following in NEXT_NODE.items():
        if following is not None:
            nodes[name] >> nodes[following]
    nodes["E"] - "more" >> nodes["B"]
    flow = pocketflow.AsyncFlow(start=nodes["A"])

    async def run(n: int) -> int:
        shared = {"state": _BareState({"i": 0, "n": n}), "log": []}
        await flow.run_async(shared)
        return len(shared["log"])

    # E ends the flow with an action it has no successor for, which PocketFlow warns about on every run.
    warnings.filterwarnings("ignore", message="Flow ends", module="pocketflow")
    return version("pocketflow"), run


async def _check_engine(we: ModuleType, engine: Any, n: int, pocketflow: Callable | None) -> None:
    """Fail loudly if the engine does not run the loop as the baselines do (a failing run would look fast)."""
    for name, run in (("Engine.run", await engine.run("bench", _bench_state(we, n), max_iterations=steps_for(n))),
                      ("run_graph", await we.run_graph(bench_graph(we), _bench_state(we, n), bench_registry(we),
                                                       max_iterations=steps_for(n)))):
        if run.status is not we.RunStatus.COMPLETED or run.iteration != steps_for(n) or len(run.logs) != run.iteration:
            raise BenchError(f"the engine's bench run ({name}) ended {run.status.value} after {run.iteration} steps: "
                             f"{run.error}")
    steps = [await bare_run(n), await bare_logged_run(n)] + ([await pocketflow(n)] if pocketflow else [])
    if steps != [steps_for(n)] * len(steps):
        raise BenchError(f"a baseline does not take the engine's {steps_for(n)} steps: {steps}")


def _bench_state(we: ModuleType, n: int) -> Any:
    return we.WorkflowState(data={"i": 0, "n": n})


def _engine_variants(
    we: ModuleType, n: int, pocketflow: Callable | None
) -> tuple[dict[str, Callable[[], Awaitable[object]]], Any]:
    """Return a function per row that runs its loop once with loop count `n`, and the Engine the engine row uses."""
    registry, graph = bench_registry(we), bench_graph(we)
    engine = we.Engine(registry, we.MemoryStore(max_runs=100))  # a store that stays small over many long runs
    variants = {
        "bare": lambda: bare_run(n),
        "bare_log": lambda: bare_logged_run(n),
        "engine": lambda: engine.run("bench", _bench_state(we, n), max_iterations=steps_for(n)),
        "runner": lambda: we.run_graph(graph, _bench_state(we, n), registry, max_iterations=steps_for(n)),
    }
    if pocketflow is not None:
        variants["pocketflow"] = lambda: pocketflow(n)
    return variants, engine


async def profiled(fn: Callable[[], Awaitable[object]]) -> pstats.Stats:
    """Return cProfile's statistics of one call of `fn` (after one unprofiled warm-up call).

    The profiler sees every task of this thread's event loop, not the threads of a store (which encode big
    records): the count of a long run leaves out the encoding of its record.
    """
    await fn()
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        await fn()
    finally:
        profiler.disable()
    return pstats.Stats(profiler)


def sections_of(path: str) -> list[tuple[int, str]]:
    """Return (first line, name) of each section of a module whose sections are headed `# ---` / `# Name` / `# ---`."""
    lines = Path(path).read_text().splitlines()
    return [(number + 1, lines[number][2:]) for number in range(1, len(lines) - 1)
            if lines[number - 1].startswith("# ---") and lines[number + 1].startswith("# ---")]


def calls_by_section(stats: pstats.Stats, module: ModuleType) -> dict[str, int]:
    """Return how many of the profiled calls each place made, most first: a call counts for the section of
    workflow_engine.py its caller is in (a built-in such as len or perf_counter, or attrs' generated __init__,
    counts for the section that called it), or for the caller's library (asyncio, cattrs, ...) outside it."""
    sections = sections_of(module.__file__)

    def place(where: tuple[str, int, str]) -> str:
        path, line, _ = where
        if path == module.__file__:
            return next((name for first, name in reversed(sections) if first <= line), "module top")
        if path == __file__:
            return "bench"
        if "site-packages" in path:
            return Path(path).parent.name  # the library's package
        return Path(path).stem if path.endswith(".py") else path.split()[0].strip("<")  # "<attrs generated ...>"

    counts: dict[str, int] = {}
    for _, (_, calls, _, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        for caller, (_, caller_calls, _, _) in (callers.items() if callers else [((__file__, 0, ""), (0, calls, 0, 0))]):
            counts[place(caller)] = counts.get(place(caller), 0) + caller_calls
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


async def _engine_figures(we: ModuleType, profile: Profile, pocketflow: Callable | None) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for kind, n in (("long", profile.long_n), ("short", 1)):
        variants, engine = _engine_variants(we, n, pocketflow)
        await engine.create_graph(bench_graph(we))
        await _check_engine(we, engine, n, pocketflow)
        stats = {name: await profiled(fn) for name, fn in variants.items()}
        seconds = await measure(variants, profile.repeats, profile.sample_seconds)
        figures[kind] = {"n": n, "seconds": seconds, "calls": {name: stat.total_calls for name, stat in stats.items()},
                         "by_section": calls_by_section(stats["engine"], we)}
    return figures


def _engine_result(kind: str, n: int, seconds: dict[str, float], calls: dict[str, int],
                   by_section: dict[str, int]) -> dict[str, Any]:
    steps = steps_for(n)
    per, unit = (steps, "step") if kind == "long" else (1, "run")
    rows = {name: {f"us_per_{unit}": seconds[name] * 1e6 / per, f"calls_per_{unit}": calls[name] / per,
                   "ratio_to_bare": seconds[name] / seconds["bare"]} for name in seconds}
    what = f"per step, N={n}" if kind == "long" else "per short run, N=1"
    calls_limit = TARGET_CALLS_PER_STEP if kind == "long" else TARGET_CALLS_PER_RUN
    targets = [_target(f"Engine.run time {what}", f"us/{unit}", rows, f"us_per_{unit}", TARGET_ENGINE_RATIO),
               _target(f"Engine.run function calls {what}", f"calls/{unit}", rows, f"calls_per_{unit}", calls_limit)]
    return {"n": n, "steps": steps, "unit": unit, "rows": rows, "targets": targets,
            "calls_by_section": {place: count / per for place, count in by_section.items()}}


def _target(name: str, unit: str, rows: dict[str, Any], key: str, limit: float) -> dict[str, Any]:
    """A target on the engine row's `key`, with the bare loop's as its baseline: a time target bounds the ratio
    (the machine's speed drops out), a calls target the figure itself."""
    figure, baseline = rows["engine"][key], rows["bare"][key]
    bounded = figure / baseline if unit.startswith("us/") else figure
    return {"target": name, "unit": unit, "figure": figure, "baseline": baseline, "ratio": figure / baseline,
            "limit": limit, "met": bounded <= limit}


def run_engine(profile: Profile) -> dict[str, Any]:
    """Measure Engine.run, the runner alone, both baselines (and PocketFlow if installed); return the figures in
    microseconds and function calls, per step of the long run and per short run, with the targets."""
    we = _import_engine()
    found = pocketflow_run()
    figures = asyncio.run(_engine_figures(we, profile, found[1] if found else None))
    result = {kind: _engine_result(kind, figure["n"], figure["seconds"], figure["calls"], figure["by_section"])
              for kind, figure in figures.items()}
    targets = [target_row(row["target"] + f" ({row['unit']})", row["figure"], row["baseline"],
                          _limit_text(row), row["met"]) for kind in result for row in result[kind]["targets"]]
    return {"repeats": profile.repeats, "pocketflow": found[0] if found else None, **result, "targets": targets}


def print_engine(result: dict[str, Any]) -> None:
    """Print the engine section: every row with its time, ratio and calls, then each target with its verdict."""
    print(f"== engine: A -> B -> C -> D -> E, E back to B while i < N; full logging; "
          f"median of {result['repeats']} after warm-up; calls counted by cProfile")
    pocketflow = result["pocketflow"]
    for kind, head in (("long", f"long run, N={result['long']['n']} ({result['long']['steps']} steps)"),
                       ("short", "short run, N=1 (5 steps, the new run record and its save)")):
        figures, unit = result[kind], result[kind]["unit"]
        print(f"  {head:<56}{'us/' + unit:>10}{'x bare':>9}{'calls/' + unit:>13}")
        for name, label in ENGINE_ROWS.items():
            row = figures["rows"].get(name)
            if name == "pocketflow":
                label = f"PocketFlow {pocketflow}, same nodes, a dict log record" if pocketflow else label
            if row is None:
                print(f"    {label:<54}  not installed (pip install pocketflow, in a venv of its own)")
                continue
            print(f"    {label:<54}{row[f'us_per_{unit}']:>10.2f}{row['ratio_to_bare']:>8.2f}x"
                  f"{row[f'calls_per_{unit}']:>13.1f}")
    for kind in ("long", "short"):
        by_section = result[kind]["calls_by_section"]
        places = ", ".join(f"{place} {count:.1f}" if kind == "long" else f"{place} {count:.0f}"
                           for place, count in by_section.items() if count >= sum(by_section.values()) / 100)
        print(f"  where Engine.run's calls per {result[kind]['unit']} are made ({kind} run): {places}")
    print("  targets (Engine.run, each against the bare loop of this invocation)")
    for target in result["long"]["targets"] + result["short"]["targets"]:
        print(f"    {target['target']:<44}{target['figure']:>10.2f} {target['unit']:<11} "
              f"bare {target['baseline']:>8.2f}  {target['ratio']:6.2f}x  "
              f"target {_limit_text(target)}: {_status(target['met'])}")


def _limit_text(target: dict[str, Any]) -> str:
    return f"<= {target['limit']}x bare" if target["unit"].startswith("us/") else f"<= {target['limit']} {target['unit']}"


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------
def rss_kib(pid: int) -> int | None:
    """Return the resident set size of process `pid` in KiB (VmRSS), or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_ns(pid: int) -> int | None:
    """Return the CPU time process `pid` has run for, in nanoseconds, its threads included: /proc/PID/schedstat,
    or, on a kernel without it, /proc/PID/stat's user and system time (in clock ticks); None where /proc cannot
    tell."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[0])
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@attrs.define
class Server:
    """A uvicorn subprocess serving `app` on 127.0.0.1."""

    name: str
    process: subprocess.Popen
    port: int

    def rss(self) -> int | None:
        """Return the server's RSS in KiB."""
        return rss_kib(self.process.pid)

    def cpu_ns(self) -> int | None:
        """Return the CPU time the server has used, in nanoseconds."""
        return cpu_ns(self.process.pid)


@contextlib.contextmanager
def uvicorn_server(
    name: str, app: str, cwd: Path, env: dict[str, str], options: tuple[str, ...] = ()
) -> Iterator[Server]:
    """Start `uvicorn app` (one worker, with `options` such as `--http h11`) on a free port, wait until it accepts
    connections, and stop it by pid."""
    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port),
               "--workers", "1", "--log-level", "warning", *options]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(name, process, port, log)
            yield Server(name, process, port)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(name: str, process: subprocess.Popen, port: int, log: Any) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
            raise BenchError(f"the {name} server exited with status {process.returncode}:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"the {name} server did not accept connections within {SERVER_START_SECONDS:.0f} s")


# ---------------------------------------------------------------------------
# HTTP client
# ---------------------------------------------------------------------------
# A tiny HTTP/1.1 keep-alive client on asyncio streams: each connection sends a request, reads the response by its
# Content-Length and sends the next. A general client (httpx) costs more per request than a fast server does.
class ProtocolError(Exception):
    """The server's answer is not the HTTP/1.1 this client reads."""


def http_request(method: str, path: str, port: int, body: bytes = b"") -> bytes:
    """Return the bytes of one HTTP/1.1 request."""
    head = f"{method} {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\n"
    if body:
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode("ascii") + b"\r\n" + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send `request` and return the response's status and body; raise ProtocolError if the server closes."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    start = head.find(b"\r\ncontent-length:")
    if not head.startswith(b"http/1.1 ") or start < 0:
        raise ProtocolError(f"unexpected response head {head[:80]!r}")
    length = int(head[start + 17:head.index(b"\r\n", start + 2)])
    body = await reader.readexactly(length)
    if b"\r\nconnection: close" in head:
        raise ProtocolError("the server closed the connection")
    return int(head[9:12]), body


async def request_once(port: int, request: bytes) -> tuple[int, bytes]:
    """Open a connection, exchange one request, and close it."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        return await exchange(reader, writer, request)
    finally:
        writer.close()


@attrs.define
class Tally:
    """What a load produced: latencies of 2xx answers, and errors (other statuses, broken connections)."""

    latencies: list[float] = attrs.Factory(list)
    errors: int = 0
    sent: int = 0


async def _connection(port: int, request: bytes, tally: Tally, measure_from: float, keep_going: Callable) -> None:
    reader = writer = None
    while keep_going():
        sent = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            status, _ = await exchange(reader, writer, request)
        except (OSError, EOFError, ValueError, ProtocolError, asyncio.IncompleteReadError) as exc:
            if sent >= measure_from:
                tally.errors += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            if not isinstance(exc, ProtocolError):
                await asyncio.sleep(0.01)  # a refused connection must not spin
            continue
        if sent >= measure_from:
            tally.sent += 1
            if 200 <= status < 300:
                tally.latencies.append(time.perf_counter() - sent)
            else:
                tally.errors += 1
    if writer is not None:
        writer.close()


async def load_for(port: int, request: bytes, connections: int, warmup: float, seconds: float) -> dict[str, Any]:
    """Send `request` over `connections` keep-alive connections for `warmup` + `seconds`; measure the last part."""
    measure_from = time.perf_counter() + warmup
    until = measure_from + seconds
    tally, cpu = Tally(), time.process_time()
    await asyncio.gather(*(
        _connection(port, request, tally, measure_from, lambda: time.perf_counter() < until)
        for _ in range(connections)
    ))
    return _load_figures(tally, connections, seconds, (time.process_time() - cpu) / (warmup + seconds))


async def load_counted(port: int, request: bytes, connections: int, total: int) -> dict[str, Any]:
    """Send `request` `total` times over `connections` keep-alive connections, after one warm-up request each."""
    await load_count(port, request, connections, connections)
    started, cpu = time.perf_counter(), time.process_time()
    tally = await load_count(port, request, connections, total)
    seconds = time.perf_counter() - started
    return _load_figures(tally, connections, seconds, (time.process_time() - cpu) / seconds)


def _load_figures(tally: Tally, connections: int, seconds: float, client_cpu: float) -> dict[str, Any]:
    latencies = sorted(tally.latencies)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {
        "connections": connections, "seconds": seconds, "requests": len(latencies), "errors": tally.errors,
        "rps": len(latencies) / seconds, "p50_ms": quantiles[49] * 1000, "p99_ms": quantiles[98] * 1000,
        "client_cpu": client_cpu,
    }


async def load_count(port: int, request: bytes, connections: int, total: int) -> Tally:
    """Send `request` `total` times over `connections` keep-alive connections; return the tally."""
    tally, left = Tally(), [total]

    def take() -> bool:
        left[0] -= 1
        return left[0] >= 0

    await asyncio.gather(*(_connection(port, request, tally, 0.0, take) for _ in range(connections)))
    return tally


# ---------------------------------------------------------------------------
# Code review in-process
# ---------------------------------------------------------------------------
def review_engine(max_runs: int) -> tuple[ModuleType, Any]:
    """Return workflow_engine and an Engine holding the code_review workflow, or raise BenchError without it."""
    we = _import_engine()
    try:
        code_review = importlib.import_module("code_review")
    except ModuleNotFoundError as exc:
        raise BenchError(f"the code_review workflow cannot be imported: {exc}") from None
    registry = we.Registry()
    code_review.register(registry)
    return we, we.Engine(registry, settings=we.Settings(max_runs=max_runs))  # registered graphs come with it


async def _review_run(we: ModuleType, engine: Any) -> Any:
    return await engine.run(REVIEW_INPUT["graph_id"], we.WorkflowState(data=dict(REVIEW_INPUT["state"]["data"])))


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------
# Issue 14's requests against the bare endpoint, on one server stack at a time: both servers are started with the
# same uvicorn `--http` and `--loop`, and at each connection count the bare endpoint is loaded just before the
# engine's cases, so drift on a shared machine hits them alike. Every request body is HTTP_BODY_BYTES long.
HTTP_CONNECTIONS = (1, 16, 64)
HTTP_BODY_BYTES = 300
ONE_NODE_GRAPH = {"graph_id": "bench_one", "start_node": "A", "nodes": ["A"], "edges": {}}
# uvicorn's pure-Python stack (what requirements.txt alone gave before issue 14) and its optional C-backed one.
SERVER_STACKS = {"h11+asyncio": ("h11", "asyncio"), "httptools+uvloop": ("httptools", "uvloop")}


@attrs.frozen(kw_only=True)
class HttpCase:
    """One request the http section loads, and its target as a share of the bare endpoint's requests/s."""

    name: str
    method: str
    payload: dict[str, Any] | None  # a POST body, padded to HTTP_BODY_BYTES; None: GET the state of a fresh run
    share: float


HTTP_CASES = (
    HttpCase(name="POST /graph/run, 1 trivial node, wait", method="POST", share=0.75,
             payload={"graph_id": "bench_one", "state": {"data": {"i": 0, "n": 1}}, "wait": True}),
    HttpCase(name="POST /graph/run, 5 trivial nodes, wait", method="POST", share=0.6,
             payload={"graph_id": "bench", "state": {"data": {"i": 0, "n": 1}}, "wait": True}),
    HttpCase(name='POST /graph/run, 5 nodes, "wait": false', method="POST", share=0.75,
             payload={"graph_id": "bench", "state": {"data": {"i": 0, "n": 1}}, "wait": False}),
    HttpCase(name="GET /graph/state/{run_id}", method="GET", payload=None, share=0.95),
)
BARE_CASE = "bare POST /echo"


def padded_body(payload: dict[str, Any], size: int = HTTP_BODY_BYTES) -> bytes:
    """Return `payload` as compact JSON of exactly `size` bytes: a `pad` string in its state data takes the rest."""
    data = payload.get("state", {}).get("data")
    scratch = {**payload, "state": {**payload["state"], "data": {**data, "pad": ""}}} if data is not None else \
        {**payload, "pad": ""}
    room = size - len(_json_bytes(scratch))
    if room < 0:
        raise BenchError(f"a request body is over {size} bytes: {_json_bytes(scratch)[:80]!r}")
    holder = scratch["state"]["data"] if data is not None else scratch
    holder["pad"] = "x" * room
    return _json_bytes(scratch)


def _review_body() -> bytes:
    return json.dumps(REVIEW_INPUT, separators=(",", ":")).encode()


async def probe_review_run(port: int) -> dict[str, Any]:
    """Run the code-review input once; return the run record, or raise BenchError if the server refuses it."""
    status, body = await request_once(port, http_request("POST", "/graph/run", port, _review_body()))
    if status != 200:
        hint = " (is code_review.py there, registering the 'code_review' graph?)" if status == 404 else ""
        raise BenchError(f"POST /graph/run of the code-review input answered {status}: {body[:300].decode()!r}{hint}")
    return json.loads(body)


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def stack_missing(stack: str) -> str | None:
    """What this interpreter lacks to serve on `stack` (None: nothing); the servers run on sys.executable."""
    missing = [name for name in SERVER_STACKS[stack] if name != "asyncio" and importlib.util.find_spec(name) is None]
    return f"not installed here: pip install {' '.join(missing)}" if missing else None


def _stack_options(stack: str) -> tuple[str, ...]:
    http, loop = SERVER_STACKS[stack]
    return ("--http", http, "--loop", loop)


def run_http(profile: Profile) -> dict[str, Any]:
    """Load the bare endpoint and the engine's cases on each server stack this interpreter has; return the cases
    and the target rows of every stack measured."""
    stacks = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        env = _stores_env(scratch)
        for stack in SERVER_STACKS:
            row: dict[str, Any] = {"stack": stack, "skipped": stack_missing(stack), "cases": []}
            if row["skipped"] is None:
                options = _stack_options(stack)
                with uvicorn_server("engine", "workflow_engine:app", scratch, env, options) as engine, \
                        uvicorn_server("bare", "bench_bare_app:app", scratch, env, options) as bare:
                    row["cases"] = asyncio.run(_http_cases(engine, bare, profile))
            stacks.append(row)
    targets = [target for row in stacks for target in _http_targets(row)]
    return {"connections": list(HTTP_CONNECTIONS), "body_bytes": HTTP_BODY_BYTES, "stacks": stacks,
            "targets": targets}


async def _probe_http_graphs(port: int) -> None:
    """Create both bench graphs on the server and run each once; raise BenchError unless that works."""
    for graph in (ONE_NODE_GRAPH, BENCH_GRAPH):
        status, answer = await _post_json(port, "/graph/create", graph)
        if status not in (200, 201):
            raise BenchError(f"POST /graph/create of {graph['graph_id']} answered {status}: {answer}")
    for case, steps in zip(HTTP_CASES[:2], (1, steps_for(1)), strict=True):
        status, run = await _post_json(port, "/graph/run", case.payload)
        if status != 200 or run["status"] != "completed" or run["iteration"] != steps:
            raise BenchError(f"{case.name} answered {status}: {str(run)[:300]}")


async def _state_request(port: int) -> bytes:
    """A GET of a run finished just now, so that a small WORKFLOW_MAX_RUNS cannot have evicted it."""
    status, run = await _post_json(port, "/graph/run", HTTP_CASES[1].payload)
    if status != 200:
        raise BenchError(f"a run for GET /graph/state answered {status}: {str(run)[:300]}")
    return http_request("GET", f"/graph/state/{run['run_id']}", port)


async def _http_cases(engine: Server, bare: Server, profile: Profile) -> list[dict[str, Any]]:
    """Load the bare endpoint and each case in turn, `profile.http_rounds` times at each connection count: a case's
    share of bare is the median of its rounds' shares, each against the bare load measured just before it."""
    await _probe_http_graphs(engine.port)
    results = []
    for connections in HTTP_CONNECTIONS:
        loads = {BARE_CASE: (bare, http_request("POST", "/echo", bare.port, padded_body(HTTP_CASES[0].payload)))}
        loads.update({case.name: (engine, http_request(case.method, "/graph/run", engine.port,
                                                       padded_body(case.payload)))
                      for case in HTTP_CASES if case.payload is not None})
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in (BARE_CASE, *(case.name for case in HTTP_CASES))}
        for _ in range(profile.http_rounds):
            for name in rounds:
                server, request = loads[name] if name in loads else (engine, await _state_request(engine.port))
                rounds[name].append(await _http_load(server, request, connections, profile))
        for name, figures in rounds.items():
            pairs = list(zip(figures, rounds[BARE_CASE], strict=True))
            shares = [load["rps"] / bare["rps"] if bare["rps"] else 0.0 for load, bare in pairs]
            cpu_shares = [bare["server_cpu_us"] / load["server_cpu_us"] for load, bare in pairs
                          if load["server_cpu_us"] and bare["server_cpu_us"]]
            results.append({"case": name, **_over_rounds(figures), "share_of_bare": statistics.median(shares),
                            "cpu_share_of_bare": statistics.median(cpu_shares) if cpu_shares else None})
    return results


async def _http_load(server: Server, request: bytes, connections: int, profile: Profile) -> dict[str, Any]:
    """Load `server` with `request`, after a warm-up, and add the server's CPU time per answer (`server_cpu_us`):
    unlike requests/s, it hardly changes with what else the machine runs."""
    if profile.http_requests is None:
        await load_for(server.port, request, connections, 0.0, profile.http_warmup)
        before = server.cpu_ns()
        figures = await load_for(server.port, request, connections, 0.0, profile.http_seconds / profile.http_rounds)
        answered = figures["requests"] + figures["errors"]
    else:
        before = server.cpu_ns()
        figures = await load_counted(server.port, request, connections, profile.http_requests)
        answered = figures["requests"] + figures["errors"] + connections  # and its warm-up, one per connection
    after = server.cpu_ns()
    has_cpu = None not in (before, after) and answered > 0
    return {**figures, "server_cpu_us": (after - before) / 1000 / answered if has_cpu else None}


def _over_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's figures over its rounds: counts added up, rates and latencies their median."""
    figures = {key: sum(load[key] for load in rounds) for key in ("seconds", "requests", "errors")}
    figures.update({key: statistics.median(load[key] for load in rounds)
                    for key in ("rps", "p50_ms", "p99_ms", "client_cpu")})
    cpu = [load["server_cpu_us"] for load in rounds if load["server_cpu_us"] is not None]
    figures["server_cpu_us"] = statistics.median(cpu) if cpu else None
    return {"connections": rounds[0]["connections"], **figures, "rounds": len(rounds)}


def _http_targets(row: dict[str, Any]) -> list[dict[str, Any]]:
    if row["skipped"] is not None:
        return [target_row(f"http on {row['stack']}: skipped ({row['skipped']})", None, None, "measured", False)]
    by_key = {(case["case"], case["connections"]): case for case in row["cases"]}
    targets = []
    for case in HTTP_CASES:
        for connections in HTTP_CONNECTIONS:
            figures, bare = by_key[case.name, connections], by_key[BARE_CASE, connections]
            targets.append(target_row(f"{case.name}, {row['stack']}, {connections} conns: req/s", figures["rps"],
                                      bare["rps"], f">= {case.share:g}x bare", figures["share_of_bare"] >= case.share))
        busiest = by_key[case.name, HTTP_CONNECTIONS[-1]]
        targets.append(target_row(f"{case.name}, {row['stack']}, {HTTP_CONNECTIONS[-1]} conns: p99 ms vs p50",
                                  busiest["p99_ms"], busiest["p50_ms"], f"<= {TARGET_P99_OVER_P50:g}x p50",
                                  busiest["p99_ms"] <= TARGET_P99_OVER_P50 * busiest["p50_ms"]))
    errors = sum(case["errors"] for case in row["cases"])
    targets.append(target_row(f"http on {row['stack']}: errors", errors, None, "0", errors == 0))
    return targets


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def print_http(result: dict[str, Any], profile: Profile) -> None:
    """Print the http section: a table per server stack."""
    rounds = profile.http_rounds
    load = (f"{profile.http_seconds / rounds:g} s after {profile.http_warmup:g} s warm-up"
            if profile.http_requests is None else f"{profile.http_requests} requests after one per connection")
    print(f"== http: one uvicorn worker per server, the same stack on both, keep-alive HTTP/1.1 client; {rounds} "
          f"round{'s' if rounds > 1 else ''} of each case and the bare endpoint in turn, {load} each (figures: "
          f"medians of the rounds); every body {result['body_bytes']} bytes")
    for row in result["stacks"]:
        if row["skipped"] is not None:
            print(f"  {row['stack']}: skipped, {row['skipped']}")
            continue
        print(f"  {row['stack']:<40}{'conns':>6}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}{'vs bare':>8}"
              f"{'server cpu us/req':>18}{'vs bare':>8}{'client cpu':>11}")
        for case in row["cases"]:
            cpu, cpu_share = case["server_cpu_us"], case["cpu_share_of_bare"]
            print(f"    {case['case']:<38}{case['connections']:>6}{case['rps']:>9.0f}{case['p50_ms']:>8.2f}"
                  f"{case['p99_ms']:>8.2f}{case['errors']:>7}{case['share_of_bare']:>8.2f}"
                  f"{'-' if cpu is None else f'{cpu:.0f}':>18}{'-' if cpu_share is None else f'{cpu_share:.2f}':>8}"
                  f"{case['client_cpu']:>10.0%}")
    print("  (server cpu: the server's CPU time per answer, which drifts far less than req/s when other processes "
          "share the cores; its 'vs bare' is the share of bare's req/s the server would reach with a core of its "
          "own)")


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------
def traced_bytes_per_run(runs: int) -> dict[str, Any]:
    """Return the bytes that `runs` stored Engine.run records of the code-review input hold, per run (tracemalloc)."""
    we, engine = review_engine(max_runs=runs * 2)
    return asyncio.run(_traced(we, engine, runs))


async def _traced(we: ModuleType, engine: Any, runs: int) -> dict[str, Any]:
    first = await _review_run(we, engine)  # warm caches first
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(runs):
            await _review_run(we, engine)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return {"runs": runs, "bytes_per_run": held / runs, "run_status": first.status.value, "steps": first.iteration}


def run_memory(profile: Profile) -> dict[str, Any]:
    """Measure memory per stored run in-process, then the server's RSS over `profile.memory_runs` runs."""
    we = _import_engine()
    traced = traced_bytes_per_run(profile.traced_runs)
    env = _server_env()
    env.pop("WORKFLOW_MAX_RUNS", None)
    if profile.memory_max_runs is not None:
        env["WORKFLOW_MAX_RUNS"] = str(profile.memory_max_runs)
    max_runs = profile.memory_max_runs or we.MAX_STORED_RUNS
    with uvicorn_server("engine", "workflow_engine:app", ROOT, env) as server:
        checkpoints = asyncio.run(_server_checkpoints(server, profile))
    return {"traced": traced, "max_runs": max_runs, "checkpoints": checkpoints, **_memory_verdicts(traced,
            checkpoints, max_runs)}


async def _server_checkpoints(server: Server, profile: Profile) -> list[dict[str, Any]]:
    await probe_review_run(server.port)
    request = http_request("POST", "/graph/run", server.port, _review_body())
    await load_count(server.port, request, MEMORY_CONNECTIONS, 99)  # warm-up: 100 runs with the probe
    checkpoints = [await _checkpoint(server, 0, 0, 0.0)]
    _print_checkpoint(checkpoints[-1], 0)
    chunk = profile.memory_runs // profile.memory_checkpoints
    for index in range(1, profile.memory_checkpoints + 1):
        started = time.perf_counter()
        tally = await load_count(server.port, request, MEMORY_CONNECTIONS, chunk)
        checkpoints.append(await _checkpoint(server, index * chunk, tally.errors, time.perf_counter() - started))
        _print_checkpoint(checkpoints[-1], chunk)
    return checkpoints


async def _checkpoint(server: Server, runs: int, errors: int, seconds: float) -> dict[str, Any]:
    status, body = await request_once(server.port, http_request("GET", "/", server.port))
    stored = json.loads(body)["runs"] if status == 200 else None
    return {"runs": runs, "stored": stored, "rss_kib": server.rss(), "errors": errors, "seconds": seconds}


def _memory_verdicts(traced: dict[str, Any], checkpoints: list[dict[str, Any]], max_runs: int) -> dict[str, Any]:
    """The memory section's figures and its target rows: bytes held per stored run (tracemalloc, and the server's
    RSS until the store is full), and the RSS growth once the store has been full for `max_runs` runs."""
    base = checkpoints[0]
    full = max((cp for cp in checkpoints if cp["runs"] <= max_runs), key=lambda cp: cp["runs"])
    settled = min((cp for cp in checkpoints if cp["runs"] >= 2 * max_runs), key=lambda cp: cp["runs"], default=None)
    last = checkpoints[-1]
    goal = f"<= {TARGET_BYTES_PER_RUN} B"
    verdicts: dict[str, Any] = {"traced_met": traced["bytes_per_run"] <= TARGET_BYTES_PER_RUN}
    targets = [target_row("held per stored run, tracemalloc (B)", traced["bytes_per_run"], None, goal,
                          verdicts["traced_met"])]
    if None not in (base["rss_kib"], full["rss_kib"]) and full["stored"] != base["stored"]:
        per_run = (full["rss_kib"] - base["rss_kib"]) * 1024 / (full["stored"] - base["stored"])
        verdicts.update(rss_bytes_per_run=per_run, rss_met=per_run <= TARGET_BYTES_PER_RUN)
        targets.append(target_row("held per stored run, server RSS (B)", per_run, None, goal, verdicts["rss_met"]))
    if settled is not None and None not in (settled["rss_kib"], last["rss_kib"]):
        growth = (last["rss_kib"] - settled["rss_kib"]) / settled["rss_kib"]
        verdicts.update(growth_after_full=growth, flat_from_runs=settled["runs"], flat_met=growth <= FLAT_TOLERANCE)
        targets.append(target_row(f"server RSS at {last['runs']:,} runs against {settled['runs']:,} (KiB)",
                                  last["rss_kib"], settled["rss_kib"], f"<= {1 + FLAT_TOLERANCE:.2f}x",
                                  verdicts["flat_met"]))
    return {**verdicts, "targets": targets}


def _print_checkpoint(checkpoint: dict[str, Any], chunk: int) -> None:
    rate = f"{chunk / checkpoint['seconds']:.0f}" if checkpoint["seconds"] else "-"
    print(f"    {checkpoint['runs']:>8}{checkpoint['stored']:>9}{_mib(checkpoint['rss_kib']):>10}{rate:>10}"
          f"{checkpoint['errors']:>8}", flush=True)


def print_memory_head(profile: Profile, max_runs: int) -> None:
    """Print the memory section's header; the checkpoints follow as they are measured."""
    print(f"== memory: the code-review input; server with WORKFLOW_MAX_RUNS={max_runs}, "
          f"{MEMORY_CONNECTIONS} connections")
    print(f"    {'runs':>8}{'stored':>9}{'RSS MiB':>10}{'runs/s':>10}{'errors':>8}   (runs counted after a 100-run "
          f"warm-up)", flush=True)


def print_memory(result: dict[str, Any]) -> None:
    """Print the memory section's figures and targets (after the checkpoints)."""
    traced = result["traced"]
    print(f"  held per stored run, tracemalloc over {traced['runs']} Engine.run ({traced['run_status']}, "
          f"{traced['steps']} steps): {traced['bytes_per_run']:.0f} B   "
          f"target <= {TARGET_BYTES_PER_RUN} B: {_status(result['traced_met'])}")
    if "rss_bytes_per_run" in result:
        print(f"  held per stored run, server RSS until the store is full: {result['rss_bytes_per_run']:.0f} B   "
              f"target <= {TARGET_BYTES_PER_RUN} B: {_status(result['rss_met'])}")
    if "growth_after_full" in result:
        print(f"  RSS growth from {result['flat_from_runs']} runs to the end: {result['growth_after_full']:+.1%}   "
              f"target flat (<= {FLAT_TOLERANCE:.0%}): {_status(result['flat_met'])}")
    else:
        print("  RSS growth after the store filled: not measured (too few runs for the store's bound)")


# ---------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------
# The engine section's loop with N = 1 (five trivial steps) through each store: in process, runs one after another
# through Engine.run; over HTTP, POST /graph/run with "wait": true against one server per store (all of them up at
# once), next to the bare endpoint with the same body. Each store starts empty: a new SQLite file, a new PostgreSQL
# database, for each part.
STORES = ("memory", "sqlite", "postgres")
STORE_CONNECTIONS = (1, 16, 64)
TARGET_FILL_SHARE = 0.8  # SQLite filling up: runs/s of the last chunk at least this share of the first chunk's
SYNC_MODES = ("NORMAL", "FULL")  # PRAGMA synchronous settings measured; the first is SqliteStore's
SYNC_CONCURRENCY = (1, 16)  # runs at once while measuring them
POSTGRES_URL_VARIABLE = "WORKFLOW_TEST_POSTGRES_URL"  # the tests' server, the default of --postgres-url
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# Targets of issue 14: a trivial 5-node run over HTTP, as a share of the bare endpoint.
TARGET_STORE_SHARE = {"memory": 0.6, "sqlite": 0.35, "postgres": 0.25}
TRAFFIC_KEYS = ("writes_per_run", "hops_per_run", "transactions_per_run", "round_trips_per_run")  # store_traffic
_IN_PROCESS_WIDTH = 45  # the table's columns before the HTTP ones: the store's name and its in-process figures
BENCH_GRAPH = {  # bench_graph() as POST /graph/create takes it
    "graph_id": "bench", "start_node": "A", "nodes": list(NODE_FUNCTIONS),
    "edges": {**{name: {"default_next": NEXT_NODE[name]} for name in "ABCD"},
              "E": {"branches": [{"condition": "more", "target": "B"}]}},
}
TRIVIAL_RUN = {"graph_id": "bench", "state": {"data": {"i": 0, "n": 1}}, "wait": True}


class RoundTrips:
    """A TCP relay to a PostgreSQL server that counts round trips: how many times a client sent something after
    the server had answered (a pipeline of statements sent at once, then waited for, is one). Threads of its own,
    so that a client blocking the event loop (a store's reads) cannot stall it; `close` stops them."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self._target = (parts.hostname or HOST, parts.port or 5432)
        self._listener = socket.create_server((HOST, 0))
        self.url = parts._replace(netloc=f"{parts.username or ''}@{HOST}:{self._listener.getsockname()[1]}").geturl()
        self.count = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="round-trips", daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._target)
                for sock in (client, server):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets += [client, server]
                answered = [True]  # whether the server spoke last on this connection
                for source, sink, is_client in ((client, server, True), (server, client, False)):
                    threading.Thread(target=self._pump, args=(source, sink, is_client, answered), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, is_client: bool, answered: list[bool]) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                with self._lock:
                    if is_client and answered[0]:
                        self.count += 1
                    answered[0] = not is_client
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop relaying: close the listener and every connection."""
        for sock in (self._listener, *self._sockets):
            with contextlib.suppress(OSError):
                sock.close()


def bench_flow_source() -> str:
    """Return a workflow module that registers the bench's own node functions and condition, for a server."""
    nodes = ", ".join(f"{name!r}: {fn.__name__}" for name, fn in NODE_FUNCTIONS.items())
    register = (f"def register(registry: Any) -> None:\n"
                f"    for name, fn in {{{nodes}}}.items():\n"
                f"        registry.node(fn, name=name)\n"
                f"    registry.condition(more)\n")
    head = '"""The nodes of tools/bench.py for a server: WORKFLOW_MODULES=bench_flow."""\nfrom typing import Any\n'
    return "\n\n".join([head, *(inspect.getsource(fn) for fn in (*NODE_FUNCTIONS.values(), more)), register])


def _postgres_admin(psycopg: ModuleType, url: str, statement: str) -> None:
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(statement)
    except psycopg.Error as exc:
        raise BenchError(f"PostgreSQL refused {statement.split(' WITH')[0]!r}: {exc}") from None


@contextlib.contextmanager
def fresh_postgres(url: str) -> Iterator[str]:
    """Create a database of the bench's own on the PostgreSQL server `url` names, yield its URL, and drop it."""
    try:
        import psycopg  # only PostgreSQL needs it  # noqa: PLC0415
    except ModuleNotFoundError:
        raise BenchError("psycopg is not installed (requirements.txt names it)") from None
    name = f"bench_stores_{secrets.token_hex(4)}"
    _postgres_admin(psycopg, url, f"CREATE DATABASE {name}")
    try:
        yield urllib.parse.urlsplit(url)._replace(path=f"/{name}").geturl()
    except psycopg.Error as exc:
        raise BenchError(f"PostgreSQL: {exc}") from None
    finally:
        _postgres_admin(psycopg, url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def store_location(kind: str, scratch: Path, use: str, postgres_url: str | None) -> Iterator[str | None]:
    """Yield a new, empty place for a store of `kind`, as WORKFLOW_DB names it (None: memory); `use` tells apart
    the places one store needs."""
    if kind == "memory":
        yield None
    elif kind == "sqlite":
        yield str(scratch / f"{use}.db")
    else:
        assert postgres_url is not None
        with fresh_postgres(postgres_url) as url:
            yield url


async def _in_process(we: ModuleType, location: str | None, profile: Profile) -> dict[str, Any]:
    engine = we.Engine(bench_registry(we), we.open_store(location) if location else None)
    try:
        await engine.create_graph(bench_graph(we))
        first = await engine.run("bench", we.WorkflowState(data={"i": 0, "n": 1}))  # and a warm-up
        if first.status is not we.RunStatus.COMPLETED or first.iteration != steps_for(1):
            raise BenchError(f"a trivial run ended {first.status.value} after {first.iteration} steps: {first.error}")
        rates, not_completed = [], 0
        for _ in range(profile.store_rounds):
            gc.collect()
            started = time.perf_counter()
            for _ in range(profile.store_runs):
                run = await engine.run("bench", we.WorkflowState(data={"i": 0, "n": 1}))
                not_completed += run.status is not we.RunStatus.COMPLETED
            rates.append(profile.store_runs / (time.perf_counter() - started))
    finally:
        await engine.shutdown()
    median = statistics.median(rates)
    traffic = await store_traffic(we, location, profile.store_runs) if location else dict.fromkeys(TRAFFIC_KEYS)
    return {"rounds": profile.store_rounds, "runs_per_round": profile.store_runs, "runs_per_s": median,
            "us_per_run": 1e6 / median, "rounds_runs_per_s": rates, "not_completed": not_completed, **traffic}


async def store_traffic(we: ModuleType, location: str, runs: int) -> dict[str, Any]:
    """What `runs` trivial runs cost a SQL store, per run: its writes, those handed to its writer thread (each a hop
    there and back; the others commit on the event loop's thread), the transactions they take, and on PostgreSQL
    the round trips of all its connections (counted by a relay, which slows them: these runs are not timed). The
    worker's heartbeats are not counted."""
    relay = RoundTrips(location) if location.startswith(POSTGRES_SCHEMES) else None
    store = we.open_store(relay.url if relay else location)
    counts = dict.fromkeys(("writes", "hops", "transactions"), 0)
    apply_all = store._apply_all

    def counted(db: Any, batch: list[Any]) -> None:  # every transaction of writes, on either thread
        writes = sum(write.fn.__name__ != "_heartbeat" for write in batch)
        counts["writes"] += writes
        counts["hops"] += writes if db is not store._here else 0
        counts["transactions"] += writes > 0
        apply_all(db, batch)

    store._apply_all = counted
    engine = we.Engine(bench_registry(we), store)
    try:
        await engine.create_graph(bench_graph(we))
        await _runs(we, engine, 1)  # warm-up: the graph read and cached, the worker started
        counts.update(dict.fromkeys(counts, 0))
        trips = relay.count if relay else 0
        not_completed = await _runs(we, engine, runs)
        trips = relay.count - trips if relay else None
    finally:
        await engine.shutdown()
        if relay:
            relay.close()
    if not_completed:
        raise BenchError(f"{not_completed} of {runs} trivial runs did not complete while their writes were counted")
    return {"writes_per_run": counts["writes"] / runs, "hops_per_run": counts["hops"] / runs,
            "transactions_per_run": counts["transactions"] / runs,
            "round_trips_per_run": None if trips is None else trips / runs}


async def _runs(we: ModuleType, engine: Any, count: int) -> int:
    """Run the trivial run `count` times, one after another; return how many did not complete."""
    not_completed = 0
    for _ in range(count):
        run = await engine.run("bench", we.WorkflowState(data={"i": 0, "n": 1}))
        not_completed += run.status is not we.RunStatus.COMPLETED
    return not_completed


async def sqlite_fill(we: ModuleType, path: Path, profile: Profile) -> dict[str, Any]:
    """Fill a new SQLite file whose bound is the run count, one run after another: runs/s of each chunk, and the
    process's CPU time per run (every thread's; another process's load moves it far less than runs/s)."""
    engine = we.Engine(bench_registry(we), we.SqliteStore(path, max_runs=profile.fill_runs))
    rates, cpu_us, not_completed = [], [], 0
    try:
        await engine.create_graph(bench_graph(we))
        for _ in range(profile.fill_runs // profile.fill_chunk):
            started, cpu_started = time.perf_counter(), time.process_time()
            not_completed += await _runs(we, engine, profile.fill_chunk)
            rates.append(profile.fill_chunk / (time.perf_counter() - started))
            cpu_us.append((time.process_time() - cpu_started) * 1e6 / profile.fill_chunk)
        stored = engine.store.counts()[1]
    finally:
        await engine.shutdown()
    return {"runs": len(rates) * profile.fill_chunk, "chunk": profile.fill_chunk, "chunks_runs_per_s": rates,
            "chunks_cpu_us_per_run": cpu_us, "first_runs_per_s": rates[0], "last_runs_per_s": rates[-1],
            "last_share_of_first": rates[-1] / rates[0], "max_runs": profile.fill_runs, "runs_stored": stored, "not_completed": not_completed}


async def sqlite_synchronous(we: ModuleType, path: Path, mode: str, concurrency: int, runs: int) -> dict[str, Any]:
    """Runs/s of `runs` trivial runs, `concurrency` at a time, through a new SQLite file with PRAGMA synchronous
    `mode`."""
    store_class = type(f"{mode.title()}SqliteStore", (we.SqliteStore,), {"SYNCHRONOUS": mode})
    engine = we.Engine(bench_registry(we), store_class(path))
    try:
        await engine.create_graph(bench_graph(we))
        await _runs(we, engine, 1)  # warm-up
        started = time.perf_counter()
        not_completed = sum(await asyncio.gather(*(_runs(we, engine, runs // concurrency) for _ in range(concurrency))))
        rate = concurrency * (runs // concurrency) / (time.perf_counter() - started)
    finally:
        await engine.shutdown()
    return {"synchronous": mode, "concurrency": concurrency, "runs_per_s": rate, "not_completed": not_completed}


def run_sqlite_figures(we: ModuleType, scratch: Path, profile: Profile) -> dict[str, Any]:
    """SQLite's own figures: filling up, and the synchronous settings (each in a new file)."""
    fill = asyncio.run(sqlite_fill(we, scratch / "fill.db", profile))
    synchronous = [asyncio.run(sqlite_synchronous(we, scratch / f"sync-{mode}-{concurrency}.db", mode, concurrency,
                                                  profile.sync_runs))
                   for concurrency in SYNC_CONCURRENCY for mode in SYNC_MODES]
    return {"fill": fill, "synchronous": synchronous}


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


async def _post_json(port: int, path: str, payload: object) -> tuple[int, Any]:
    status, answer = await request_once(port, http_request("POST", path, port, _json_bytes(payload)))
    return status, json.loads(answer)


async def _get_json(port: int, path: str) -> tuple[int, Any]:
    status, answer = await request_once(port, http_request("GET", path, port))
    return status, json.loads(answer)


async def probe_trivial_run(port: int) -> None:
    """Create the bench graph on the server and run it once; raise BenchError unless both work."""
    status, answer = await _post_json(port, "/graph/create", BENCH_GRAPH)
    if status not in (200, 201):
        raise BenchError(f"POST /graph/create of the bench graph answered {status}: {answer}")
    status, run = await _post_json(port, "/graph/run", TRIVIAL_RUN)
    if status != 200 or run["status"] != "completed" or run["iteration"] != steps_for(1):
        raise BenchError(f"POST /graph/run of a trivial run answered {status}: {str(run)[:300]}")


async def _run_counts(server: Server) -> dict[str, int]:
    counts = []
    for query in ("graph_id=bench", "graph_id=bench&status=completed"):
        status, page = await _get_json(server.port, f"/graph/runs?{query}&limit=1")
        if status != 200:
            raise BenchError(f"GET /graph/runs?{query} answered {status}: {page}")
        counts.append(page["total"])
    return {"runs_stored": counts[0], "runs_not_completed": counts[0] - counts[1]}


async def _store_loads(
    bare: Server, servers: dict[str, Server], profile: Profile
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Load the bare endpoint, then each store's server, at each connection count in turn: the figures compared
    are measured within seconds of each other, so drift on a shared machine hits them alike."""
    ceiling: list[dict[str, Any]] = []
    cases: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
    for connections in STORE_CONNECTIONS:
        echo = http_request("POST", "/echo", bare.port, _json_bytes(TRIVIAL_RUN))
        ceiling.append(await _http_load(bare, echo, connections, attrs.evolve(profile, http_rounds=1)))
        for kind, server in servers.items():
            request = http_request("POST", "/graph/run", server.port, _json_bytes(TRIVIAL_RUN))
            figures = await _http_load(server, request, connections, attrs.evolve(profile, http_rounds=1))
            figures["share_of_bare"] = figures["rps"] / ceiling[-1]["rps"] if ceiling[-1]["rps"] else 0.0
            cases[kind].append(figures)
    return ceiling, {kind: {"cases": cases[kind], **await _run_counts(server)} for kind, server in servers.items()}


@contextlib.contextmanager
def _recorded(row: dict[str, Any]) -> Iterator[None]:
    """Keep what stops one store's measurement as its row's error, so that the other rows still get measured."""
    try:
        yield
    except (BenchError, OSError) as exc:  # OSError: a server that stopped answering
        row["error"] = str(exc)


@contextlib.contextmanager
def store_server(kind: str, scratch: Path, env: dict[str, str], postgres_url: str | None) -> Iterator[Server]:
    """Serve `workflow_engine:app` on a new, empty store of `kind`, with the bench graph created and run once."""
    with store_location(kind, scratch, "http", postgres_url) as location:
        server_env = env if location is None else {**env, "WORKFLOW_DB": location}
        with uvicorn_server(f"{kind} engine", "workflow_engine:app", scratch, server_env) as server:
            asyncio.run(probe_trivial_run(server.port))
            yield server


def _stores_env(scratch: Path) -> dict[str, str]:
    Path(scratch, "bench_bare_app.py").write_text(BARE_APP, encoding="utf-8")
    Path(scratch, "bench_flow.py").write_text(bench_flow_source(), encoding="utf-8")
    env = _server_env()
    env["PYTHONPATH"] = os.pathsep.join([str(scratch), env["PYTHONPATH"]])
    env["WORKFLOW_MODULES"] = "bench_flow"
    env.pop("WORKFLOW_DB", None)  # each server is told its own store
    return env


def run_stores(profile: Profile, postgres_url: str | None) -> dict[str, Any]:
    """Measure trivial runs through each store in process, then over HTTP with the bare endpoint as the ceiling;
    PostgreSQL in databases created on the server `postgres_url` names, or skipped without one."""
    we = _import_engine()
    rows = [{"store": kind, "skipped": None, "error": None, "in_process": None, "http": None} for kind in STORES]
    if postgres_url is None:
        rows[STORES.index("postgres")]["skipped"] = (f"no PostgreSQL server named: give --postgres-url URL or set "
                                                    f"{POSTGRES_URL_VARIABLE}")
    with tempfile.TemporaryDirectory() as scratch_dir, contextlib.ExitStack() as running:
        scratch = Path(scratch_dir)
        env = _stores_env(scratch)
        for row in rows:
            if row["skipped"] is None:
                with _recorded(row), store_location(row["store"], scratch, "in_process", postgres_url) as location:
                    row["in_process"] = asyncio.run(_in_process(we, location, profile))
        sqlite = run_sqlite_figures(we, scratch, profile)
        bare = running.enter_context(uvicorn_server("bare", "bench_bare_app:app", scratch, env))
        servers = {}
        for row in rows:
            if row["skipped"] is None and row["error"] is None:
                with _recorded(row):
                    servers[row["store"]] = running.enter_context(store_server(row["store"], scratch, env,
                                                                               postgres_url))
        ceiling, http = asyncio.run(_store_loads(bare, servers, profile))
    for row in rows:
        row["http"] = http.get(row["store"])
    return {"connections": list(STORE_CONNECTIONS), "bare": ceiling, "stores": rows, "sqlite": sqlite,
            "targets": _store_targets(rows, ceiling, sqlite)}


def _store_targets(rows: list[dict[str, Any]], ceiling: list[dict[str, Any]],
                   sqlite: dict[str, Any]) -> list[dict[str, Any]]:
    measured = [row for row in rows if row["http"] is not None]
    targets = []
    for row in measured:
        share, cases = TARGET_STORE_SHARE[row["store"]], row["http"]["cases"]
        for case, bare in zip(cases, ceiling, strict=True):
            targets.append(target_row(f"{row['store']} trivial 5-node run, wait, {case['connections']} conns: req/s",
                                      case["rps"], bare["rps"], f">= {share:g}x bare",
                                      case["rps"] >= share * bare["rps"]))
        busiest = cases[-1]
        targets.append(target_row(f"{row['store']} trivial 5-node run, {busiest['connections']} conns: p99 ms vs p50",
                                  busiest["p99_ms"], busiest["p50_ms"], f"<= {TARGET_P99_OVER_P50:g}x p50",
                                  busiest["p99_ms"] <= TARGET_P99_OVER_P50 * busiest["p50_ms"]))
    fill = sqlite["fill"]
    targets.append(target_row(f"sqlite filling up, last {fill['chunk']:,} of {fill['runs']:,} runs: runs/s vs the "
                              f"first {fill['chunk']:,}", fill["last_runs_per_s"], fill["first_runs_per_s"],
                              f">= {TARGET_FILL_SHARE:g}x", fill["last_runs_per_s"] >= TARGET_FILL_SHARE * fill[
                                  "first_runs_per_s"]))
    errors = sum(row["in_process"]["not_completed"] + row["http"]["runs_not_completed"]
                 + sum(case["errors"] for case in row["http"]["cases"]) for row in measured)
    errors += fill["not_completed"] + sum(case["not_completed"] for case in sqlite["synchronous"])
    targets.append(target_row("stores: errors", errors, None, "0", errors == 0))
    return targets


def print_stores(result: dict[str, Any], profile: Profile) -> None:
    """Print the stores section as one table: a row per store, a line per connection count."""
    load = (f"{profile.http_seconds:g} s per case after {profile.http_warmup:g} s warm-up"
            if profile.http_requests is None else f"{profile.http_requests} requests per case after one per connection")
    print(f"== stores: trivial 5-node runs (A -> B -> C -> D -> E, N = 1); in process: Engine.run one after another, "
          f"median of {profile.store_rounds} rounds of {profile.store_runs}; over HTTP: POST /graph/run "
          f'"wait": true, one uvicorn worker per store, {load}')
    print(f"  {'store':<18}{'runs/s':>8}{'us/run':>9}{'vs memory':>10}  |{'conns':>6}{'req/s':>8}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'errors':>7}{'vs bare':>8}{'server cpu us/req':>18}")
    for index, case in enumerate(result["bare"]):
        print(f"  {'bare POST /echo' if index == 0 else '':<{_IN_PROCESS_WIDTH}}  |{_store_case(case, 1.0)}")
    memory = next((row["in_process"] for row in result["stores"] if row["store"] == "memory"), None)
    for row in result["stores"]:
        for line in _store_lines(row, memory):
            print(line)
    for row in result["stores"]:
        if row["in_process"] is not None and row["in_process"]["writes_per_run"] is not None:
            print(traffic_line(row["store"], row["in_process"]))
    print_sqlite_figures(result["sqlite"])


def traffic_line(store: str, figures: dict[str, Any]) -> str:
    """What one trivial run costs a SQL store (see store_traffic)."""
    trips = figures["round_trips_per_run"]
    return (f"  {store} per run: {figures['writes_per_run']:.2f} writes, {figures['hops_per_run']:.2f} of them "
            f"through the writer thread, {figures['transactions_per_run']:.2f} transactions"
            + ("" if trips is None else f", {trips:.1f} round trips to the server"))


def _tenths(values: list[float]) -> float:
    """The median of the last tenth of `values` (at least one) against the median of the first tenth."""
    tenth = max(1, len(values) // 10)
    return statistics.median(values[-tenth:]) / statistics.median(values[:tenth])


def print_sqlite_figures(sqlite: dict[str, Any]) -> None:
    """Print SQLite filling up, chunk by chunk, and what each synchronous setting costs."""
    fill = sqlite["fill"]
    rates = " ".join(f"{rate:.0f}" for rate in fill["chunks_runs_per_s"])
    print(f"  sqlite filling up, {fill['runs']:,} runs one after another into a file with max_runs = {fill['max_runs']:,},"
          f" runs/s per {fill['chunk']:,}: {rates}")
    cpu = fill["chunks_cpu_us_per_run"]
    print(f"  sqlite filling up, CPU µs per run per {fill['chunk']:,}: {' '.join(f'{us:.0f}' for us in cpu)}; the "
          f"last tenth against the first (medians): runs/s {_tenths(fill['chunks_runs_per_s']):.2f}x, CPU µs per run "
          f"{_tenths(cpu):.2f}x  (for information)")
    cases = {(case["synchronous"], case["concurrency"]): case["runs_per_s"] for case in sqlite["synchronous"]}
    for concurrency in SYNC_CONCURRENCY:
        normal, full = cases[SYNC_MODES[0], concurrency], cases[SYNC_MODES[1], concurrency]
        print(f"  sqlite synchronous, {concurrency} run{'' if concurrency == 1 else 's'} at a time: NORMAL "
              f"{normal:.0f} runs/s, FULL {full:.0f} runs/s = {full / normal:.2f}x  (for information)")


def _store_case(case: dict[str, Any], share: float) -> str:
    return (f"{case['connections']:>6}{case['rps']:>8.0f}{case['p50_ms']:>8.2f}{case['p99_ms']:>8.2f}"
            f"{case['errors']:>7}{share:>8.0%}{_cpu_text(case['server_cpu_us']):>18}")


def _cpu_text(cpu_us: float | None) -> str:
    return "-" if cpu_us is None else f"{cpu_us:.0f}"


def _store_lines(row: dict[str, Any], memory: dict[str, Any] | None) -> list[str]:
    figures = row["in_process"]
    if figures is None:
        return [f"  {row['store']:<18}{'skipped: ' + row['skipped'] if row['skipped'] else 'error: ' + row['error']}"]
    versus = f"{figures['runs_per_s'] / memory['runs_per_s']:.0%}" if memory else "-"
    lead = f"{row['store']:<18}{figures['runs_per_s']:>8.0f}{figures['us_per_run']:>9.0f}{versus:>10}"
    if row["http"] is None:
        return [f"  {lead}  | error: {row['error']}"]
    return [f"  {lead if index == 0 else '':<{_IN_PROCESS_WIDTH}}  |{_store_case(case, case['share_of_bare'])}"
            for index, case in enumerate(row["http"]["cases"])]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": model, "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load": " / ".join(f"{load:.2f}" for load in os.getloadavg())}


# ---------------------------------------------------------------------------
# Fan-out: a map node against sequential runs
# ---------------------------------------------------------------------------
async def _fanout_figures(we: ModuleType, profile: Profile) -> dict[str, float]:
    registry, items = bench_registry(we), profile.fanout_items
    trivial = we.GraphDefinition(graph_id="trivial", start_node="E", nodes=("E",))
    mapped = we.GraphDefinition(graph_id="mapped", start_node="each", nodes=(we.NodeDef(name="each", map=we.MapDef(
        over="items", as_="i", graph="trivial", collect="out", output="i")),))
    branches = we.Branches(find_graph={"trivial": trivial}.get, max_fanout=items)

    async def map_run() -> Any:
        run = we.new_run(mapped, we.WorkflowState(data={"items": list(range(items))}))
        return await we.execute_run(run, mapped, registry, branches=branches)

    async def sequential_runs(data: dict[str, Any]) -> None:
        for _ in range(items):
            await we.run_graph(trivial, we.WorkflowState(data=data), registry)

    run = await map_run()
    if run.status is not we.RunStatus.COMPLETED or run.state.data["out"] != list(range(1, items + 1)) or len(run.logs) != items + 1:
        raise BenchError(f"the bench map ended {run.status.value}: {run.error}")
    variants = {"map": map_run, "sequential": lambda: sequential_runs({"i": 0}),
                "sequential_branch_data": lambda: sequential_runs({"items": list(range(items)), "i": 0})}
    return await measure(variants, profile.repeats, profile.sample_seconds)


def run_fanout(profile: Profile) -> dict[str, Any]:
    """Time one map of `fanout_items` trivial branches and as many sequential trivial runs; return both and the ratio."""
    seconds = asyncio.run(_fanout_figures(_import_engine(), profile))
    ratio = seconds["map"] / seconds["sequential"]
    return {"items": profile.fanout_items, "repeats": profile.repeats, "map_ms": seconds["map"] * 1e3,
            "sequential_ms": seconds["sequential"] * 1e3, "ratio": ratio, "target_ratio": TARGET_FANOUT_RATIO,
            "met": ratio <= TARGET_FANOUT_RATIO,
            "sequential_branch_data_ms": seconds["sequential_branch_data"] * 1e3,
            "ratio_to_branch_data": seconds["map"] / seconds["sequential_branch_data"],
            "targets": [target_row(f"a map of {profile.fanout_items:,} trivial branches (ms)", seconds["map"] * 1e3,
                                   seconds["sequential"] * 1e3, f"<= {TARGET_FANOUT_RATIO}x sequential runs",
                                   ratio <= TARGET_FANOUT_RATIO)]}


def print_fanout(result: dict[str, Any]) -> None:
    """Print the fanout section of the table."""
    items = f"{result['items']:,}"
    print(f"== fanout: a one-node graph (E: i += 1); median of {result['repeats']} after warm-up{'ms':>22}")
    print(f"    {items + ' sequential runs':<46}{result['sequential_ms']:>10.2f}")
    print(f"    {items + ' sequential runs, each with a branch data':<46}{result['sequential_branch_data_ms']:>10.2f}")
    print(f"    {'one map of ' + items + ' branches':<46}{result['map_ms']:>10.2f}   {result['ratio']:5.2f}x sequential"
          f"  target <= {TARGET_FANOUT_RATIO}x: {_status(result['met'])}; "
          f"{result['ratio_to_branch_data']:.2f}x with a branch's data")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n")[0],
        epilog="Sections: engine, http, memory, stores, fanout (default: all). Targets are those of issue 7 "
               "(engine, http and stores: issue 14; fanout: issue 15); a full invocation ends with a table "
               "of all of them.",
    )
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help="engine, http, memory, stores or fanout (default: all)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: few repeats, short loads, few runs")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON to PATH")
    parser.add_argument("--markdown", metavar="PATH", type=Path,
                        help="also write the closing target table as Markdown to PATH (the README's table)")
    parser.add_argument("--memory-runs", metavar="N", type=int,
                        help=f"runs sent to the server in the memory section (default {FULL.memory_runs:,}; "
                             f"--quick {QUICK.memory_runs:,})")
    parser.add_argument("--http-requests", metavar="N", type=int,
                        help="send N requests per http and stores case instead of loading it for a fixed time")
    parser.add_argument("--fill", metavar="N", type=int,
                        help=f"runs the stores section puts into a SQLite file with max_runs = N (default "
                             f"{FULL.fill_runs:,}; --quick {QUICK.fill_runs:,}; issue 14 asks for 100,000)")
    parser.add_argument("--postgres-url", metavar="URL",
                        help=f"a PostgreSQL server (postgresql://user@host:port/db) on which the stores section "
                             f"creates and then drops databases of its own (default ${POSTGRES_URL_VARIABLE}; "
                             f"without one, PostgreSQL is skipped)")
    return parser


def _run_section(name: str, profile: Profile, results: dict[str, Any], postgres_url: str | None) -> bool:
    try:
        if name == "engine":
            results["engine"] = run_engine(profile)
            print_engine(results["engine"])
        elif name == "http":
            results["http"] = run_http(profile)
            print_http(results["http"], profile)
        elif name == "memory":
            print_memory_head(profile, profile.memory_max_runs or _import_engine().MAX_STORED_RUNS)
            results["memory"] = run_memory(profile)
            print_memory(results["memory"])
        elif name == "fanout":
            results["fanout"] = run_fanout(profile)
            print_fanout(results["fanout"])
        else:
            results["stores"] = run_stores(profile, postgres_url)
            print_stores(results["stores"], profile)
            _raise_store_errors(results["stores"])
    except (BenchError, OSError) as exc:  # OSError: a server that stopped answering
        print(f"bench.py: {name}: {exc}", file=sys.stderr)
        results.setdefault("errors", {})[name] = str(exc)
        return False
    print(flush=True)
    return True


def _figure(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if type(value) is int else str(value)


def _target_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every measured section's target rows, in section order, each with its section's name."""
    return [(name, row) for name in SECTIONS if isinstance(results.get(name), dict)
            for row in results[name].get("targets", [])]


def print_targets(results: dict[str, Any]) -> None:
    """Print every section's target rows as one table (a row missing a key of TARGET_KEYS shows '-' there)."""
    measured = [name for name in SECTIONS if isinstance(results.get(name), dict)]
    rows = _target_rows(results)
    if not rows:
        return
    width = max(len(row.get("target", "")) for _, row in rows)
    goal_width = max(len(row.get("goal", "-")) for _, row in rows) + 2
    print(f"== targets: {sum(bool(row.get('met')) for _, row in rows)} of {len(rows)} met")
    print(f"  {'section':<8}{'target':<{width}}{'figure':>10}{'baseline':>10}{'ratio':>7}  {'goal':<{goal_width}}met")
    for name, row in rows:
        figure = row.get("figure", row.get("value"))  # "value": a section not yet moved to TARGET_KEYS
        ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.2f}"
        print(f"  {name:<8}{row.get('target', ''):<{width}}{_figure(figure):>10}{_figure(row.get('baseline')):>10}"
              f"{ratio:>7}  {row.get('goal', '-'):<{goal_width}}{_status(bool(row.get('met')))}")
    for name in measured:
        if "targets" not in results[name]:
            print(f"  {name:<8}(no target rows: the section prints its targets above)")


def markdown_targets(results: dict[str, Any]) -> str:
    """The closing target table as Markdown, headed by when and where it was measured (the README's table)."""
    machine = results["machine"]
    rows = _target_rows(results)
    lines = [f"Measured {machine['date']} on {machine['cpu']}, {machine['cpus']} cpus, load average "
             f"{machine['load']} at the start, Python {machine['python']}: {sum(bool(row.get('met')) for _, row in rows)}"
             f" of {len(rows)} targets met.", "",
             "| section | target | figure | baseline | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for name, row in rows:
        ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.2f}"
        met = "met" if row.get("met") else "**not met**"
        lines.append(f"| {name} | {row.get('target', '')} | {_figure(row.get('figure', row.get('value')))} | "
                     f"{_figure(row.get('baseline'))} | {ratio} | {row.get('goal', '-')} | {met} |")
    return "\n".join(lines) + "\n"


def _raise_store_errors(result: dict[str, Any]) -> None:
    failed = [f"{row['store']}: {row['error']}" for row in result["stores"] if row["error"]]
    if failed:
        raise BenchError("; ".join(failed))


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, print the table, and optionally write JSON; return 1 if a section could not run."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors
        return int(exc.code or 0)
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        print(f"bench.py: unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    profile = QUICK if args.quick else FULL
    if args.memory_runs is not None:
        if args.memory_runs < profile.memory_checkpoints:
            print(f"bench.py: --memory-runs must be at least {profile.memory_checkpoints}", file=sys.stderr)
            return 2
        profile = attrs.evolve(profile, memory_runs=args.memory_runs)
    if args.http_requests is not None:
        if args.http_requests < 1:
            print("bench.py: --http-requests must be at least 1", file=sys.stderr)
            return 2
        profile = attrs.evolve(profile, http_requests=args.http_requests)
    if args.fill is not None:
        if args.fill < 2 * profile.fill_chunk:
            print(f"bench.py: --fill must be at least {2 * profile.fill_chunk:,}", file=sys.stderr)
            return 2
        profile = attrs.evolve(profile, fill_runs=args.fill)
    postgres_url = args.postgres_url or os.environ.get(POSTGRES_URL_VARIABLE) or None
    if postgres_url is not None and not postgres_url.startswith(POSTGRES_SCHEMES):
        print(f"bench.py: --postgres-url must start with {' or '.join(POSTGRES_SCHEMES)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"machine": _machine(), "quick": args.quick}
    print(f"bench.py {results['machine']['date']}  {results['machine']['cpu']}, {results['machine']['cpus']} cpus, "
          f"Python {results['machine']['python']}, load average {results['machine']['load']}"
          f"{'  (quick)' if args.quick else ''}\n")
    ok = all([_run_section(name, profile, results, postgres_url) for name in (args.sections or SECTIONS)])
    print_targets(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.markdown is not None:
        args.markdown.write_text(markdown_targets(results), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
