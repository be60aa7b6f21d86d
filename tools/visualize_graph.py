"""Draw a workflow graph as Graphviz DOT or Mermaid.

Reads a graph definition as `POST /graph/create` accepts it (or `GET /graph/definition/{graph_id}` returns it) from a
JSON file, standard input, or a running server, and writes the picture's source to standard output:

    python tools/visualize_graph.py graph.json                      # DOT
    python tools/visualize_graph.py --format mermaid < graph.json   # Mermaid
    python tools/visualize_graph.py --url http://127.0.0.1:8000 --graph-id code_review --render svg -o graph.svg

Default edges are plain arrows; branch edges are dashed and labelled with their condition, `on_error` edges with
"on error". The start node gets an arrow from a `start` dot and every node that can end the run an arrow to an `end`
circle. `--render png|svg` also runs Graphviz's `dot` (it must be on PATH). Exit status: 0 done, 1 rendering failed,
2 bad input.
"""

import argparse
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

try:
    from tools.jsonsource import InputError, fetch_json, read_json  # the tests import with the repository on sys.path
except ImportError:
    from jsonsource import InputError, fetch_json, read_json  # `python tools/visualize_graph.py` puts tools/ on sys.path

EXIT_OK, EXIT_RENDER_FAILED, EXIT_BAD_INPUT = 0, 1, 2
START, END = "__start__", "__end__"
ON_ERROR_LABEL = "on error"
BRANCH_FIELDS = ("condition", "target")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(f"not a graph definition: {message}")


def _check_edge(name: str, edge: Any) -> None:
    _expect(isinstance(edge, dict), f"edges.{name} must be an object")
    for field in ("default_next", "on_error"):
        is_name = edge.get(field) is None or isinstance(edge[field], str)
        _expect(is_name, f"edges.{name}.{field} must be a string or null")
    branches = edge.get("branches", [])
    _expect(isinstance(branches, list), f"edges.{name}.branches must be an array")
    for index, branch in enumerate(branches):
        is_branch = isinstance(branch, dict) and all(isinstance(branch.get(key), str) for key in BRANCH_FIELDS)
        _expect(is_branch, f"edges.{name}.branches[{index}] must have string condition and target")


def check_graph(graph: Any) -> dict[str, Any]:
    """Return `graph` if it has the shape of a graph definition, or raise InputError saying what is wrong."""
    _expect(isinstance(graph, dict), "expected a JSON object")
    nodes = graph.get("nodes")
    _expect(isinstance(nodes, list), "nodes must be an array")
    for index, node in enumerate(nodes):
        is_node = isinstance(node, str) or isinstance(node, dict) and isinstance(node.get("name"), str)
        _expect(is_node, f"nodes[{index}] must be a name or an object with a string name")
    _expect(isinstance(graph.get("start_node"), str), "start_node must be a string")
    edges = graph.get("edges", {})
    _expect(isinstance(edges, dict), "edges must be an object")
    for name, edge in edges.items():
        _check_edge(name, edge)
    return graph


def _names(graph: dict[str, Any]) -> list[str]:
    """Return the node names; a node is a name or, with retries or a timeout, an object with a `name`."""
    return [node if isinstance(node, str) else node["name"] for node in graph["nodes"]]


def _edges(graph: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """Return (source, target, label) for every edge, the start and end markers included; default edges have none."""
    edges = [(START, graph["start_node"], None)]
    for node in _names(graph):
        edge = graph.get("edges", {}).get(node, {})
        edges += [(node, branch["target"], branch["condition"]) for branch in edge.get("branches", [])]
        edges += [(node, edge["on_error"], ON_ERROR_LABEL)] if edge.get("on_error") else []
        edges.append((node, edge.get("default_next") or END, None))
    return edges


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: dict[str, Any]) -> str:
    """Return the graph as Graphviz DOT."""
    lines = [
        f"digraph {_dot_quote(graph.get('graph_id') or 'workflow')} {{",
        "  rankdir=TB;",
        '  node [shape=box, style=rounded, fontname="Helvetica"];',
        '  edge [fontname="Helvetica"];',
        f'  {_dot_quote(START)} [label="start", shape=circle, style=filled, fillcolor=black, fontcolor=white];',
        f'  {_dot_quote(END)} [label="end", shape=doublecircle];',
    ]
    lines += [f"  {_dot_quote(node)};" for node in _names(graph)]
    for source, target, condition in _edges(graph):
        style = "" if condition is None else f" [label={_dot_quote(condition)}, style=dashed]"
        lines.append(f"  {_dot_quote(source)} -> {_dot_quote(target)}{style};")
    return "\n".join([*lines, "}"]) + "\n"


def _mermaid_label(text: str) -> str:
    return text.replace('"', "#quot;")


def to_mermaid(graph: dict[str, Any]) -> str:
    """Return the graph as a Mermaid flowchart; node ids are generated, so any node name is safe."""
    names = _names(graph)
    ids = {START: "start", END: "stop"} | {node: f"n{index}" for index, node in enumerate(names)}
    lines = ["flowchart TD", "  start((Start))", "  stop(((End)))"]
    lines += [f'  {ids[node]}["{_mermaid_label(node)}"]' for node in names]
    for source, target, condition in _edges(graph):
        ids.setdefault(target, f"n{len(ids)}")  # a target missing from `nodes` still gets an id
        arrow = "-->" if condition is None else f'-.->|"{_mermaid_label(condition)}"|'
        lines.append(f"  {ids[source]} {arrow} {ids[target]}")
    return "\n".join(lines) + "\n"


def render(dot_source: str, image_format: str, output: str) -> str | None:
    """Render `dot_source` to `output` with Graphviz; return an error message, or None when it worked."""
    dot = shutil.which("dot")
    if dot is None:
        return "--render needs Graphviz's `dot` on PATH (e.g. apt-get install graphviz)"
    result = subprocess.run([dot, f"-T{image_format}", "-o", output], input=dot_source, text=True,
                            capture_output=True, check=False)
    return f"dot failed: {result.stderr.strip()}" if result.returncode else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw a workflow graph definition as Graphviz DOT or Mermaid.")
    parser.add_argument("file", nargs="?", default="-", help="graph definition JSON file ('-' or none: stdin)")
    parser.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--graph-id", help="graph to fetch from --url")
    parser.add_argument("--format", choices=("dot", "mermaid"), default="dot", help="output language (default dot)")
    parser.add_argument("--render", choices=("png", "svg"), help="also render a picture with Graphviz's dot")
    parser.add_argument("-o", "--output", help="picture file for --render (default: GRAPH_ID.png or .svg)")
    return parser


def _load(args: argparse.Namespace) -> dict[str, Any]:
    if args.url is None:
        return check_graph(read_json(args.file))
    url = f"{args.url.rstrip('/')}/graph/definition/{urllib.parse.quote(args.graph_id, safe='')}"
    return check_graph(fetch_json(url))


def main(argv: list[str] | None = None) -> int:
    """Print the graph as DOT or Mermaid, render it if asked; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.url is None) != (args.graph_id is None):
        parser.error("--url and --graph-id go together")
    if args.render and args.format != "dot":
        parser.error("--render works with --format dot only")
    try:
        graph = _load(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    source = to_dot(graph) if args.format == "dot" else to_mermaid(graph)
    sys.stdout.write(source)
    if args.render:
        problem = render(source, args.render, args.output or f"{graph.get('graph_id') or 'graph'}.{args.render}")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_RENDER_FAILED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
