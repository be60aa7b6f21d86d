"""Print a run's steps as a table: Iteration | Node | Event | Duration | Keys Changed (and Path, for branches).

Reads the answer of `POST /graph/run` or `GET /graph/state/{run_id}` (or just its list of log entries) from a JSON
file, standard input, or a running server:

    python tools/visualize_logs.py run.json
    curl -s -X POST localhost:8000/graph/run -d @request.json | python tools/visualize_logs.py
    python tools/visualize_logs.py --url http://127.0.0.1:8000 --run-id 3f2a...

Log entries that carry a full state snapshot (`"state": {"data": {...}}`) instead of `keys_changed` are accepted
too: the keys changed are found by diffing each snapshot with the one before it (the first with an empty state).

A step that ran inside a graph, map or parallel node has a `path` (`review_each[3]/extract_functions`); such steps
get a Path column, their node indented one level per `/`. The branches of one step run side by side, so their
entries arrive interleaved: they are listed branch by branch (by their index in the path), each in its own order,
where the step's branches ran (before the entry of the step itself, which is logged when they have all finished).
Entries without a `path` (older servers) are the run's own steps. Exit status: 0 done, 2 bad input.
"""

import argparse
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

try:
    from tools.jsonsource import InputError, fetch_json, read_json  # the tests import with the repository on sys.path
except ImportError:
    from jsonsource import InputError, fetch_json, read_json  # `python tools/visualize_logs.py` puts tools/ on sys.path

EXIT_OK, EXIT_BAD_INPUT = 0, 2
COLUMNS = ("Iteration", "Node", "Event", "Duration", "Keys Changed")
PATH_COLUMNS = ("Iteration", "Node", "Path", "Event", "Duration", "Keys Changed")
NO_VALUE = "-"
INDENT = "  "
BRANCH = re.compile(r"(?P<name>.*)\[(?P<index>[0-9]+)\]")  # one segment of a path: `review_each[3]`, or `summarise`
SUMMARY_FIELDS = (("run_id", "run"), ("graph_id", "graph"), ("status", "status"))


def _logs(run: Any) -> list[dict[str, Any]]:
    """Return the run's log entries, checking that each is an object with a node name."""
    logs = run if isinstance(run, list) else run.get("logs") if isinstance(run, dict) else None
    if not isinstance(logs, list):
        raise InputError("not a run: expected an object with a `logs` array, or an array of log entries")
    for index, entry in enumerate(logs):
        if not isinstance(entry, dict) or not isinstance(entry.get("node"), str):
            raise InputError(f"not a run: logs[{index}] must be an object with a string `node`")
        if not (entry.get("path") is None or isinstance(entry["path"], str) and entry["path"]):
            raise InputError(f"not a run: logs[{index}].path must be a non-empty string or null")
    return logs


def _branches(path: str | None) -> list[str]:
    """Return the branches a step ran in, outermost first: `["outer[2]", "inner[0]"]` for `outer[2]/inner[0]/node`."""
    return [] if path is None else path.split("/")[:-1]


def _branch_key(segment: str) -> int:
    match = BRANCH.fullmatch(segment)
    return int(match["index"]) if match else 0


def in_branch_order(entries: list[dict[str, Any]], depth: int = 0) -> list[dict[str, Any]]:
    """Return `entries` (all in one branch at `depth`, or the run's own at 0) with the entries of the branches of
    each step grouped branch by branch, recursively; the branch's own steps keep their places."""
    ordered: list[dict[str, Any]] = []
    block: list[dict[str, Any]] = []  # consecutive entries of deeper branches: those of one step's branches

    def flush() -> None:
        groups: dict[str, list[dict[str, Any]]] = {}
        for entry in block:
            groups.setdefault(_branches(entry.get("path"))[depth], []).append(entry)
        for segment in sorted(groups, key=_branch_key):  # a stable sort: same-index groups keep their order
            ordered.extend(in_branch_order(groups[segment], depth + 1))
        block.clear()

    for entry in entries:
        if len(_branches(entry.get("path"))) > depth:
            block.append(entry)
            continue
        flush()
        ordered.append(entry)
    flush()
    return ordered


def _snapshot_data(entry: dict[str, Any]) -> dict[str, Any]:
    state = entry.get("state")
    state = state.get("data", state) if isinstance(state, dict) else {}
    return state if isinstance(state, dict) else {}


def keys_changed(logs: list[dict[str, Any]]) -> list[list[str]]:
    """Return each entry's changed keys: its `keys_changed`, or the diff of its state snapshot with the last one."""
    changed, previous = [], {}
    for entry in logs:
        if isinstance(entry.get("keys_changed"), list):
            changed.append([str(key) for key in entry["keys_changed"]])
            continue
        current = _snapshot_data(entry)
        keys = set(previous) | set(current)
        changed.append(sorted(key for key in keys if previous.get(key, NO_VALUE) != current.get(key, NO_VALUE)))
        previous = current
    return changed


def _duration(entry: dict[str, Any]) -> str:
    duration = entry.get("duration_ms")
    is_number = isinstance(duration, int | float) and not isinstance(duration, bool)
    return f"{duration:.2f} ms" if is_number else NO_VALUE


def table(logs: list[dict[str, Any]]) -> str:
    """Return the aligned text table of `logs`, one row per step, branch steps grouped by branch and indented."""
    has_paths = any(entry.get("path") is not None for entry in logs)
    columns = PATH_COLUMNS if has_paths else COLUMNS
    row_of = {}  # by entry: the rows are built in log order, for the diffs of snapshots, then put in branch order
    for position, (entry, keys) in enumerate(zip(logs, keys_changed(logs)), start=1):
        node = INDENT * len(_branches(entry.get("path"))) + entry["node"]
        path = [entry.get("path") or ""] if has_paths else []
        row_of[id(entry)] = [str(entry.get("iteration", position)), node, *path, str(entry.get("event", NO_VALUE)),
                             _duration(entry), ", ".join(keys) or NO_VALUE]
    rows = [row_of[id(entry)] for entry in in_branch_order(logs)]
    widths = [max(len(row[column]) for row in [list(columns), *rows]) for column in range(len(columns))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [columns, *rows]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


def summary(run: Any, logs: list[dict[str, Any]]) -> str:
    """Return a line naming the run, its graph, status and step count, plus the run's error if it has one."""
    run = run if isinstance(run, dict) else {}
    labels = [f"{label} {run[key]}" for key, label in SUMMARY_FIELDS if run.get(key)]
    in_branches = sum(entry.get("path") is not None for entry in logs)
    counts = [f"{len(logs)} steps"] + ([f"{in_branches} in branches"] if in_branches else [])
    lines = [", ".join([*labels, *counts])]
    lines += [f"error: {run['error']}"] if run.get("error") else []
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Print a workflow run's log as a table of steps.")
    parser.add_argument("file", nargs="?", default="-", help="run JSON file ('-' or none: stdin)")
    parser.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--run-id", help="run to fetch from --url (GET /graph/state/RUN_ID)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the run's summary and step table; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.url is None) != (args.run_id is None):
        parser.error("--url and --run-id go together")
    try:
        if args.url is None:
            run = read_json(args.file)
        else:
            run = fetch_json(f"{args.url.rstrip('/')}/graph/state/{urllib.parse.quote(args.run_id, safe='')}")
        logs = _logs(run)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sys.stdout.write(summary(run, logs) + table(logs))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
