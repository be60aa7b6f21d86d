"""Drive a live workflow_engine server with concurrent keep-alive clients and report throughput, latency and memory.

    python tools/loadtest.py --url http://127.0.0.1:8000 --clients 64 --seconds 60 --pid 12345 --json load.json

Before the load it checks that `GET /` answers, creates its graph once (`--workload quick`: extract_functions ->
check_complexity of code_review.py, created as `loadtest_quick`; `--workload review`: the built-in `code_review`
graph on the README's input) and runs it once. Then each client repeats the `--mix` of steps over one keep-alive
connection until the time is up (default `run,state`: POST /graph/run, then GET /graph/state/{run_id} of that run).
It prints requests per second, p50/p99 latency overall and per step, errors by HTTP status (a run that answers 200
but did not complete counts as a `run_<status>` error), and with `--pid` the server's RSS at start, along the way
and at the end, so a soak shows whether memory levels off.

Exit status: 0 no errors, 1 errors during the load or a server that does not answer, 2 bad arguments.
The HTTP client is `tools/bench.py`'s; standard library otherwise. RSS needs Linux (/proc/PID/status).
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from tools import bench  # the tests import this module with the repository root on sys.path
except ImportError:
    import bench  # `python tools/loadtest.py` puts tools/ itself on sys.path

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2
QUICK_GRAPH = {
    "graph_id": "loadtest_quick", "start_node": "extract_functions",
    "nodes": ["extract_functions", "check_complexity"],
    "edges": {"extract_functions": {"default_next": "check_complexity"}},
}
QUICK_CODE = "def add(a, b):\n    return a + b\n\n\ndef clamp(x, low, high):\n    if x < low:\n        return low\n" \
             "    return min(x, high)\n"
WORKLOADS = {
    "quick": (QUICK_GRAPH, {"graph_id": "loadtest_quick", "state": {"data": {"code": QUICK_CODE}}}),
    "review": (None, bench.REVIEW_INPUT),
}
STEPS = {
    "run": "POST /graph/run",
    "run_background": "POST /graph/run (wait false)",
    "state": "GET /graph/state/{run_id}",
    "definition": "GET /graph/definition/{graph_id}",
    "runs": "GET /graph/runs",
    "health": "GET /",
}
CONNECT_ERRORS = (OSError, EOFError, ValueError, bench.ProtocolError, asyncio.IncompleteReadError)
SETUP_TIMEOUT_S = 30.0
RUN_ID_PREFIX = b'{"run_id":"'


class LoadError(Exception):
    """The load cannot start (server missing or refusing the workload); the message says why."""


class Target:
    """Where the server listens, and the requests of every step, prebuilt as bytes."""

    def __init__(self, host: str, port: int, graph_id: str, run_body: bytes) -> None:
        self.host, self.port, self.graph_id = host, port, graph_id
        self.run = bench.http_request("POST", "/graph/run", port, run_body)
        background = json.loads(run_body) | {"wait": False}
        self.run_background = bench.http_request("POST", "/graph/run", port, json.dumps(background).encode())
        self.definition = bench.http_request("GET", f"/graph/definition/{graph_id}", port)
        self.runs = bench.http_request("GET", "/graph/runs?limit=10", port)
        self.health = bench.http_request("GET", "/", port)

    def request(self, step: str, run_id: str) -> bytes:
        """The bytes of `step`; the state step reads the client's latest run."""
        if step == "state":
            return bench.http_request("GET", f"/graph/state/{run_id}", self.port)
        return getattr(self, step)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Exchange one request over a fresh connection."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            return await bench.exchange(reader, writer, request)
        finally:
            writer.close()


class Stats:
    """Latencies of 2xx answers by step, and errors by kind (an HTTP status, `run_<status>` or a connection error)."""

    def __init__(self, steps: tuple[str, ...]) -> None:
        self.latencies: dict[str, list[float]] = {step: [] for step in steps}
        self.errors: Counter[str] = Counter()
        self.iterations = 0

    def record(self, step: str, status: int, seconds: float, body: bytes) -> None:
        """Count one answer: a 2xx as a latency (and a run that did not complete as an error too)."""
        if not 200 <= status < 300:
            self.errors[str(status)] += 1
            return
        self.latencies[step].append(seconds)
        if step == "run" and b'"status":"completed"' not in body:
            self.errors[f"run_{_field(body, 'status') or 'unreadable'}"] += 1


def _field(body: bytes, name: str) -> str | None:
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _run_id(body: bytes) -> str | None:
    # The answer starts with the run id: slicing it out spares the client a JSON parse per run.
    if body.startswith(RUN_ID_PREFIX) and body[43:44] == b'"':
        return body[11:43].decode("ascii")
    return _field(body, "run_id")


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------
def parse_url(url: str) -> tuple[str, int]:
    """Return the host and port of an `http://host[:port]` base URL, or raise ValueError saying what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"--url must start with http:// (got {url!r})")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"--url has a bad port: {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"--url has no host: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"--url must be the server's base URL, without a path or query (got {url!r})")
    return parts.hostname, port


async def prepare(host: str, port: int, workload: str) -> tuple[Target, str]:
    """Check the server, create the workload's graph once and run it once; return the target and that run's id."""
    graph, run_request = WORKLOADS[workload]
    target = Target(host, port, run_request["graph_id"], json.dumps(run_request, separators=(",", ":")).encode())
    try:
        status, body = await target.send(target.health)
    except CONNECT_ERRORS as exc:
        raise LoadError(f"no server answers at http://{host}:{port}/: {exc}") from None
    if status != 200 or _field(body, "status") != "ok":
        raise LoadError(f"GET / answered {status}, not a workflow_engine server: {body[:200]!r}")
    if graph is not None:
        created = bench.http_request("POST", "/graph/create", port, json.dumps(graph).encode())
        status, body = await target.send(created)
        if status not in (200, 201):
            raise LoadError(f"POST /graph/create of {graph['graph_id']!r} answered {status}: {body[:300]!r}")
    status, body = await target.send(target.run)
    run_status = _field(body, "status")
    if status != 200 or run_status != "completed":
        hint = " (is code_review registered? WORKFLOW_MODULES must include it)" if status in (404, 422) else ""
        raise LoadError(f"the first run answered {status}, run status {run_status}: {body[:300]!r}{hint}")
    return target, _run_id(body) or ""


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------
async def _client(target: Target, mix: tuple[str, ...], stats: Stats, run_id: str, until: float) -> None:
    reader = writer = None
    while time.perf_counter() < until:
        for step in mix:
            sent = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(target.host, target.port)
                status, body = await bench.exchange(reader, writer, target.request(step, run_id))
            except CONNECT_ERRORS as exc:
                stats.errors[type(exc).__name__] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)  # a refused connection must not spin
                break
            stats.record(step, status, time.perf_counter() - sent, body)
            if step.startswith("run") and 200 <= status < 300:
                run_id = _run_id(body) or run_id
        else:
            stats.iterations += 1
    if writer is not None:
        writer.close()


async def _sample_rss(pid: int, every: float, samples: list[dict[str, float]], start: float) -> None:
    while True:
        await asyncio.sleep(every)
        samples.append({"seconds": round(time.perf_counter() - start, 1), "rss_kib": bench.rss_kib(pid) or 0})


async def load(
    target: Target, mix: tuple[str, ...], clients: int, seconds: float, run_id: str, pid: int | None,
) -> dict[str, Any]:
    """Run `clients` clients for `seconds`; return the figures."""
    stats, samples = Stats(mix), []
    rss_start = bench.rss_kib(pid) if pid else None
    start = time.perf_counter()
    sampler = asyncio.create_task(_sample_rss(pid, max(seconds / 10, 1.0), samples, start)) if pid else None
    cpu = time.process_time()
    await asyncio.gather(*(_client(target, mix, stats, run_id, start + seconds) for _ in range(clients)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if sampler is not None:
        sampler.cancel()
    return figures(stats, elapsed, cpu) | {
        "clients": clients, "seconds": seconds, "mix": list(mix),
        "rss_start_kib": rss_start, "rss_end_kib": bench.rss_kib(pid) if pid else None, "rss_samples": samples,
    }


def _quantiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000, "max_ms": max(latencies) * 1000}


def figures(stats: Stats, elapsed: float, cpu: float) -> dict[str, Any]:
    """Throughput, latency quantiles overall and per step, and errors, from what the clients recorded."""
    everything = [latency for latencies in stats.latencies.values() for latency in latencies]
    steps = {step: {"requests": len(latencies), "rps": len(latencies) / elapsed, **_quantiles(latencies)}
             for step, latencies in stats.latencies.items()}
    return {
        "elapsed_s": elapsed, "requests": len(everything), "rps": len(everything) / elapsed,
        "iterations": stats.iterations, "iterations_per_s": stats.iterations / elapsed, **_quantiles(everything),
        "steps": steps, "errors": sum(stats.errors.values()), "errors_by_kind": dict(sorted(stats.errors.items())),
        "client_cpu": cpu / elapsed,
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def report(result: dict[str, Any], write: Callable[[str], object] = print) -> None:
    """Print the figures as a few aligned lines."""
    write(f"loadtest {result['url']}: {result['clients']} clients, {result['seconds']:g} s, workload "
          f"{result['workload']} (graph {result['graph_id']}), mix {','.join(result['mix'])}")
    write(f"  requests    {result['requests']:>9,}  {result['rps']:>9,.1f}/s   iterations {result['iterations']:,} "
          f"({result['iterations_per_s']:,.1f}/s)")
    write(f"  latency     p50 {result['p50_ms']:.2f} ms   p99 {result['p99_ms']:.2f} ms   "
          f"max {result['max_ms']:.2f} ms")
    for step, figures_ in result["steps"].items():
        write(f"    {STEPS[step]:<34} {figures_['requests']:>9,}  {figures_['rps']:>9,.1f}/s   "
              f"p50 {figures_['p50_ms']:.2f} ms   p99 {figures_['p99_ms']:.2f} ms")
    kinds = ", ".join(f"{kind}: {count:,}" for kind, count in result["errors_by_kind"].items())
    write(f"  errors      {result['errors']:,}" + (f"  ({kinds})" if kinds else ""))
    if result["pid"] is not None:
        along = " ".join(_mib(sample["rss_kib"]) for sample in result["rss_samples"])
        write(f"  server RSS  {_mib(result['rss_start_kib'])} at start, {_mib(result['rss_end_kib'])} at end "
              f"(pid {result['pid']}; along the way: {along or 'n/a'})")
    write(f"  client CPU  {result['client_cpu']:.0%} of one core")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _mix(text: str) -> tuple[str, ...]:
    steps = tuple(step.strip() for step in text.split(",") if step.strip())
    unknown = [step for step in steps if step not in STEPS]
    if not steps or unknown:
        named = ", ".join(unknown) or "(none)"
        raise argparse.ArgumentTypeError(f"unknown step {named}; choose from {', '.join(STEPS)}")
    return steps


def _positive(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its error message
    return convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loadtest.py", description=__doc__.split("\n\n")[0],
        epilog="Steps: " + "; ".join(f"{name} = {what}" for name, what in STEPS.items()),
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (default %(default)s)")
    parser.add_argument("--clients", type=_positive(int), default=64, help="concurrent clients (default %(default)s)")
    parser.add_argument("--seconds", type=_positive(float), default=60.0, help="how long (default %(default)s)")
    parser.add_argument("--mix", type=_mix, default=("run", "state"),
                        help="comma-separated steps each client repeats in order (default run,state)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="quick",
                        help="quick: a two-node graph of code_review nodes; review: the built-in code_review graph "
                             "(default %(default)s)")
    parser.add_argument("--pid", type=_positive(int), help="the server's process id, to report its RSS")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the load and print the figures; return 0 without errors, 1 with errors, 2 for bad arguments."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors
        return int(exc.code or 0)
    try:
        host, port = parse_url(args.url)
    except ValueError as exc:
        print(f"loadtest.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.pid is not None and bench.rss_kib(args.pid) is None:
        print(f"loadtest.py: error: cannot read the memory of pid {args.pid} (/proc/{args.pid}/status)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        result = asyncio.run(_main(args, host, port))
    except LoadError as exc:
        print(f"loadtest.py: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK if result["errors"] == 0 else EXIT_ERRORS


async def _main(args: argparse.Namespace, host: str, port: int) -> dict[str, Any]:
    try:
        target, run_id = await asyncio.wait_for(prepare(host, port, args.workload), SETUP_TIMEOUT_S)
    except TimeoutError:
        raise LoadError(f"the server at {args.url} did not answer the setup within {SETUP_TIMEOUT_S:g} s") from None
    result = await load(target, args.mix, args.clients, args.seconds, run_id, args.pid)
    return {"url": args.url, "workload": args.workload, "graph_id": target.graph_id, "pid": args.pid, **result}


if __name__ == "__main__":
    raise SystemExit(main())
