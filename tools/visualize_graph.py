"""Draw a workflow graph as Graphviz DOT or Mermaid, with the graphs its nodes run drawn inside them.

Reads graph definitions as `POST /graph/create` accepts them (or `GET /graph/definition/{graph_id}` returns them)
from JSON files, directories of them, standard input, or a running server, and writes the picture's source to
standard output:

    python tools/visualize_graph.py graph.json                      # DOT
    python tools/visualize_graph.py --format mermaid < graph.json   # Mermaid
    python tools/visualize_graph.py main.json review_one.json       # main.json, with the graph it maps over
    python tools/visualize_graph.py graphs/ --graph-id main         # every *.json in graphs/ may be referenced
    python tools/visualize_graph.py --url http://127.0.0.1:8000 --graph-id code_review --render svg -o graph.svg

The first file's graph is drawn (or the one `--graph-id` names); the others are there to be referenced. A node that
runs other graphs (`{"graph": ID}`, `{"map": {...}}`, `{"parallel": {...}}`) is drawn as a cluster (a Mermaid
subgraph) holding them, recursively: a graph or map node holds its graph between its own start and end, a parallel
node holds one cluster per branch between a fork and a join. A referenced graph is looked up among the files read,
then, with `--url`, on the server. Node ids inside a cluster carry its path (`checks[1]/score`), so a graph
referenced twice is drawn twice. A missing graph, or a graph that contains itself, is reported as bad input.

Default edges are plain arrows; branch edges are dashed and labelled with their condition, `on_error` edges with
"on error". The start node gets an arrow from a `start` dot and every node that can end the run an arrow to an `end`
circle. `--render png|svg` also runs Graphviz's `dot` (it must be on PATH). Exit status: 0 done, 1 rendering failed,
2 bad input.
"""

import argparse
import dataclasses
import enum
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    from tools.jsonsource import InputError, fetch_json, read_json  # the tests import with the repository on sys.path
except ImportError:
    from jsonsource import InputError, fetch_json, read_json  # `python tools/visualize_graph.py` puts tools/ on sys.path

EXIT_OK, EXIT_RENDER_FAILED, EXIT_BAD_INPUT = 0, 1, 2
START, END, FORK, JOIN = "__start__", "__end__", "__fork__", "__join__"
ON_ERROR_LABEL = "on error"
BRANCH_FIELDS = ("condition", "target")
MAX_DRAWN_GRAPHS = 500  # referenced graphs drawn in one picture, counting each time a graph is drawn again
MAX_NESTING = 50  # graphs inside graphs inside ...: the drawing recurses once per level


@enum.unique
class Form(enum.Enum):
    """How a node object runs: its registered function, or other graphs (the field that says so)."""

    FUNCTION = "function"
    GRAPH = "graph"
    MAP = "map"
    PARALLEL = "parallel"


SUBGRAPH_FORMS = (Form.GRAPH, Form.MAP, Form.PARALLEL)


# ---------------------------------------------------------------------------
# Checking the input
# ---------------------------------------------------------------------------
def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(f"not a graph definition: {message}")


def _is_count(value: Any) -> bool:
    return value is None or isinstance(value, int) and not isinstance(value, bool)


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


def _check_map(where: str, spec: Any) -> None:
    _expect(isinstance(spec, dict), f"{where} must be an object")
    for field in ("over", "as", "graph", "collect"):
        _expect(isinstance(spec.get(field), str), f"{where}.{field} must be a string")
    _expect(spec.get("output") is None or isinstance(spec["output"], str), f"{where}.output must be a string or null")
    _expect(_is_count(spec.get("max_concurrency")), f"{where}.max_concurrency must be an integer or null")


def _check_parallel(where: str, spec: Any) -> None:
    _expect(isinstance(spec, dict), f"{where} must be an object")
    branches = spec.get("branches")
    _expect(isinstance(branches, list) and all(isinstance(branch, str) for branch in branches),
            f"{where}.branches must be an array of graph ids")
    merge = spec.get("merge") or {}
    _expect(isinstance(merge, dict) and all(isinstance(policy, str) for policy in merge.values()),
            f"{where}.merge must be an object of policy names")
    _expect(_is_count(spec.get("max_concurrency")), f"{where}.max_concurrency must be an integer or null")


def _check_node(index: int, node: Any) -> None:
    is_node = isinstance(node, str) or isinstance(node, dict) and isinstance(node.get("name"), str)
    _expect(is_node, f"nodes[{index}] must be a name or an object with a string name")
    present = [form.value for form in SUBGRAPH_FORMS if isinstance(node, dict) and node.get(form.value) is not None]
    _expect(len(present) <= 1, f"nodes[{index}] must have at most one of graph, map, parallel (it has "
                               f"{', '.join(present)})")
    where = f"nodes[{index}]"
    form, spec = _form(node)
    if form is Form.GRAPH:
        _expect(isinstance(spec, str), f"{where}.graph must be a graph id")
    elif form is Form.MAP:
        _check_map(f"{where}.map", spec)
    elif form is Form.PARALLEL:
        _check_parallel(f"{where}.parallel", spec)


def check_graph(graph: Any) -> dict[str, Any]:
    """Return `graph` if it has the shape of a graph definition, or raise InputError saying what is wrong."""
    _expect(isinstance(graph, dict), "expected a JSON object")
    nodes = graph.get("nodes")
    _expect(isinstance(nodes, list), "nodes must be an array")
    for index, node in enumerate(nodes):
        _check_node(index, node)
    _expect(isinstance(graph.get("start_node"), str), "start_node must be a string")
    _expect(graph.get("graph_id") is None or isinstance(graph["graph_id"], str), "graph_id must be a string or null")
    edges = graph.get("edges", {})
    _expect(isinstance(edges, dict), "edges must be an object")
    for name, edge in edges.items():
        _check_edge(name, edge)
    return graph


# ---------------------------------------------------------------------------
# Reading graphs
# ---------------------------------------------------------------------------
def _form(node: str | dict[str, Any]) -> tuple[Form, Any]:
    """Return how `node` runs and its form's settings; a server writes absent forms as null."""
    for form in SUBGRAPH_FORMS:
        if isinstance(node, dict) and node.get(form.value) is not None:
            return form, node[form.value]
    return Form.FUNCTION, None


def _name(node: str | dict[str, Any]) -> str:
    return node if isinstance(node, str) else node["name"]


def _referenced_ids(node: str | dict[str, Any]) -> list[str]:
    form, spec = _form(node)
    if form is Form.GRAPH:
        return [spec]
    if form is Form.MAP:
        return [spec["graph"]]
    return list(spec["branches"]) if form is Form.PARALLEL else []


def references(graph: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (node name, graph id) for each graph the nodes of `graph` run, in node and branch order."""
    for node in graph["nodes"]:
        yield from ((_name(node), graph_id) for graph_id in _referenced_ids(node))


def _source_files(sources: list[str]) -> list[str]:
    """Return the files to read: each source that is a file (or `-`), and the `*.json` files of each directory; a file
    named again (`main.json graphs/`, with main.json in graphs/) is read once."""
    files: dict[Path | str, str] = {}
    for source in sources:
        if source == "-" or not Path(source).is_dir():
            files.setdefault(source if source == "-" else Path(source).resolve(), source)
            continue
        found = sorted(path for path in Path(source).iterdir() if path.suffix == ".json" and path.is_file())
        if not found:
            raise InputError(f"{source} holds no .json files")
        for path in found:
            files.setdefault(path.resolve(), str(path))
    return list(files.values())


def read_definitions(sources: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Return (file, graph definition) for each file of `sources`, in order; when there are several, an error about
    a definition's shape names its file."""
    files = _source_files(sources)
    graphs = []
    for path in files:
        value = read_json(path)
        try:
            graphs.append((path, check_graph(value)))
        except InputError as exc:
            if len(files) == 1:
                raise
            raise InputError(f"{'standard input' if path == '-' else path}: {exc}") from None
    return graphs


def _by_id(read: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Index the graphs read by id; every one but the first must have one, and no id may come twice."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for position, (path, graph) in enumerate(read):
        graph_id = graph.get("graph_id")
        if graph_id is None and position:
            raise InputError(f"{path} has no graph_id, so no node can refer to it")
        if graph_id in found:
            raise InputError(f"graph '{graph_id}' is defined twice: in {found[graph_id][0]} and in {path}")
        if graph_id is not None:
            found[graph_id] = (path, graph)
    return {graph_id: graph for graph_id, (_, graph) in found.items()}


NOT_READ = "not among the definitions read (name its file or a directory holding it, or --url a server that has it)"


class Definitions:
    """Graph definitions by id: those read from files, then, given a server URL, those the server has."""

    def __init__(self, read: dict[str, dict[str, Any]], url: str | None) -> None:
        self.graphs, self.url = dict(read), url

    def find(self, graph_id: str) -> dict[str, Any] | None:
        """Return graph `graph_id`, fetching it from the server once; None if it was not read and there is no server.

        Raises InputError if the server cannot be asked, has no such graph, or answers with something else.
        """
        if graph_id not in self.graphs and self.url is not None:
            url = f"{self.url.rstrip('/')}/graph/definition/{urllib.parse.quote(graph_id, safe='')}"
            value = fetch_json(url)
            try:
                self.graphs[graph_id] = check_graph(value)
            except InputError as exc:
                raise InputError(f"{url}: {exc}") from None
        return self.graphs.get(graph_id)


def _graph_title(graph_id: str | None) -> str:
    return f"graph '{graph_id}'" if graph_id else "the graph drawn"


def _referenced(definitions: Definitions, reference: str, graph_id: str) -> dict[str, Any]:
    """Return the graph a reference names; `reference` says who refers to it, for the error."""
    try:
        graph = definitions.find(graph_id)
    except InputError as exc:
        raise InputError(f"{reference}: {exc}") from None
    if graph is None:
        raise InputError(f"{reference}, which is {NOT_READ}")
    return graph


def resolve(graph: dict[str, Any], definitions: Definitions) -> dict[str, dict[str, Any]]:
    """Return every graph that `graph` runs, directly or through others, by id.

    Raises InputError naming the node for a graph that cannot be found, the chain for a graph that contains itself,
    and the limit for a picture that would nest graphs deeper than MAX_NESTING or draw more than MAX_DRAWN_GRAPHS.
    """
    found: dict[str, dict[str, Any]] = {}
    inside: dict[str, int] = {}  # how many referenced graphs are drawn inside each graph found

    def visit(current: dict[str, Any], chain: list[str | None], via: list[str]) -> int:
        count = 0
        for node, graph_id in references(current):
            if graph_id in chain:
                start = chain.index(graph_id)
                steps = [f"{graph} (node {name})" for graph, name in zip(chain[start:], [*via, node][start:])]
                raise InputError(f"graph '{graph_id}' contains itself: {' -> '.join([*steps, graph_id])}")
            if len(chain) > MAX_NESTING:
                raise InputError(f"graphs are nested more than {MAX_NESTING} deep, through node '{node}' of "
                                 f"{_graph_title(chain[-1])}; draw a referenced graph on its own")
            if graph_id not in found:
                reference = f"node '{node}' of {_graph_title(chain[-1])} refers to graph '{graph_id}'"
                found[graph_id] = _referenced(definitions, reference, graph_id)
                inside[graph_id] = visit(found[graph_id], [*chain, graph_id], [*via, node])
            count += 1 + inside[graph_id]
            if count > MAX_DRAWN_GRAPHS:
                raise InputError(f"the picture would draw more than {MAX_DRAWN_GRAPHS} referenced graphs; "
                                 "draw a referenced graph on its own")
        return count

    visit(graph, [graph.get("graph_id")], [])
    return found


# ---------------------------------------------------------------------------
# Laying out: one tree of shapes and clusters, and a flat list of edges, for both output languages
# ---------------------------------------------------------------------------
@enum.unique
class Kind(enum.Enum):
    """What a drawn shape stands for."""

    NODE = "node"
    START = "start"
    END = "end"
    FORK = "fork"
    JOIN = "join"


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn node: `id` is unique in the picture (a path), `label` the node's own name."""

    id: str
    label: str
    kind: Kind = Kind.NODE


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A box around the shapes of the graphs one node runs."""

    id: str
    label: str
    items: list["Shape | Cluster"]


@dataclasses.dataclass(frozen=True)
class Edge:
    """An arrow; `label` is None for a default edge, else the condition (or "on error"), drawn dashed."""

    source: str
    target: str
    label: str | None = None


@dataclasses.dataclass
class Drawing:
    """The picture: what is drawn where, and every arrow."""

    items: list[Shape | Cluster] = dataclasses.field(default_factory=list)
    edges: list[Edge] = dataclasses.field(default_factory=list)


def _edges(graph: dict[str, Any]) -> list[Edge]:
    """Return every edge between the graph's node names, the start and end markers included."""
    edges = [Edge(START, graph["start_node"])]
    for node in map(_name, graph["nodes"]):
        edge = graph.get("edges", {}).get(node, {})
        edges += [Edge(node, branch["target"], branch["condition"]) for branch in edge.get("branches", [])]
        edges += [Edge(node, edge["on_error"], ON_ERROR_LABEL)] if edge.get("on_error") else []
        edges.append(Edge(node, edge.get("default_next") or END))
    return edges


def _map_label(name: str, spec: dict[str, Any]) -> str:
    at_once = f", {spec['max_concurrency']} at once" if spec.get("max_concurrency") else ""
    return (f"{name}: map {spec['graph']} over {spec['over']} as {spec['as']}, "
            f"collect {spec.get('output') or 'data'} -> {spec['collect']}{at_once}")


def _parallel_label(name: str, spec: dict[str, Any]) -> str:
    merge = ", ".join(f"{key} {policy}" for key, policy in (spec.get("merge") or {}).items())
    at_once = f", {spec['max_concurrency']} at once" if spec.get("max_concurrency") else ""
    return f"{name}: parallel{', merge ' + merge if merge else ''}{at_once}"


class _Layout:
    """Lays a graph out into a Drawing, drawing each referenced graph inside the node that runs it."""

    def __init__(self, graphs: dict[str, dict[str, Any]]) -> None:
        self.graphs, self.drawing = graphs, Drawing()

    def graph(self, graph: dict[str, Any], prefix: str, ends: tuple[str, str] | None = None) -> list[Shape | Cluster]:
        """Return the items of `graph` with ids under `prefix`, adding its edges; it starts and ends at `ends` (a
        parallel node's fork and join), or at start and end markers of its own."""
        items: list[Shape | Cluster] = []
        if ends is None:
            ends = prefix + START, prefix + END
            items += [Shape(ends[0], "start", Kind.START), Shape(ends[1], "end", Kind.END)]
        sources, targets = {START: ends[0]}, {END: ends[1]}  # where arrows from and to each name start and end
        edges_at = len(self.drawing.edges)
        for node in graph["nodes"]:
            item, targets[_name(node)], sources[_name(node)] = self.node(node, prefix)
            items.append(item)
        own = [Edge(sources.get(edge.source, prefix + edge.source), targets.get(edge.target, prefix + edge.target),
                    edge.label) for edge in _edges(graph)]
        self.drawing.edges[edges_at:edges_at] = own  # a graph's own edges before those of the graphs it runs
        return items

    def node(self, node: str | dict[str, Any], prefix: str) -> tuple[Shape | Cluster, str, str]:
        """Return the item drawn for `node`, where arrows into it end and where arrows out of it start."""
        name, (form, spec) = _name(node), _form(node)
        path = prefix + name
        if form is Form.FUNCTION:
            return Shape(path, name), path, path
        if form is Form.PARALLEL:
            fork, join = f"{path}/{FORK}", f"{path}/{JOIN}"
            branches: list[Shape | Cluster] = [Shape(fork, "fork", Kind.FORK), Shape(join, "join", Kind.JOIN)]
            for index, graph_id in enumerate(spec["branches"]):
                items = self.graph(self.graphs[graph_id], f"{path}[{index}]/", (fork, join))
                branches.append(Cluster(f"{path}[{index}]", f"{name}[{index}]: {graph_id}", items))
            return Cluster(path, _parallel_label(name, spec), branches), fork, join
        graph_id = spec if form is Form.GRAPH else spec["graph"]
        label = f"{name}: graph {graph_id}" if form is Form.GRAPH else _map_label(name, spec)
        return Cluster(path, label, self.graph(self.graphs[graph_id], f"{path}/")), f"{path}/{START}", f"{path}/{END}"


def layout(graph: dict[str, Any], graphs: dict[str, dict[str, Any]] | None = None) -> Drawing:
    """Return the drawing of `graph`; `graphs` holds every graph it runs, by id (see `resolve`)."""
    builder = _Layout(graphs or {})
    builder.drawing.items = builder.graph(graph, "")
    return builder.drawing


# ---------------------------------------------------------------------------
# Writing DOT and Mermaid
# ---------------------------------------------------------------------------
def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


DOT_MARKERS = {
    Kind.START: "shape=circle, style=filled, fillcolor=black, fontcolor=white",
    Kind.END: "shape=doublecircle",
    Kind.FORK: "shape=invtriangle",
    Kind.JOIN: "shape=triangle",
}


def _dot_items(items: list[Shape | Cluster], indent: str) -> list[str]:
    lines = []
    for item in items:
        if isinstance(item, Cluster):
            lines += [f"{indent}subgraph {_dot_quote('cluster_' + item.id)} {{",
                      f"{indent}  label={_dot_quote(item.label)};", f'{indent}  style=rounded; fontname="Helvetica";',
                      *_dot_items(item.items, indent + "  "), f"{indent}}}"]
        elif item.kind is Kind.NODE:
            label = "" if item.label == item.id else f" [label={_dot_quote(item.label)}]"
            lines.append(f"{indent}{_dot_quote(item.id)}{label};")
        else:
            lines.append(f"{indent}{_dot_quote(item.id)} [label={_dot_quote(item.label)}, {DOT_MARKERS[item.kind]}];")
    return lines


def to_dot(graph: dict[str, Any], graphs: dict[str, dict[str, Any]] | None = None) -> str:
    """Return the graph as Graphviz DOT; `graphs` holds every graph it runs, by id."""
    drawing = layout(graph, graphs)
    lines = [
        f"digraph {_dot_quote(graph.get('graph_id') or 'workflow')} {{",
        "  rankdir=TB;",
        '  node [shape=box, style=rounded, fontname="Helvetica"];',
        '  edge [fontname="Helvetica"];',
        *_dot_items(drawing.items, "  "),
    ]
    for edge in drawing.edges:
        style = "" if edge.label is None else f" [label={_dot_quote(edge.label)}, style=dashed]"
        lines.append(f"  {_dot_quote(edge.source)} -> {_dot_quote(edge.target)}{style};")
    return "\n".join([*lines, "}"]) + "\n"


def _mermaid_label(text: str) -> str:
    return text.replace('"', "#quot;")


MERMAID_SHAPES = {Kind.NODE: '["{}"]', Kind.START: "((Start))", Kind.END: "(((End)))", Kind.FORK: '{{{{"fork"}}}}',
                  Kind.JOIN: '{{{{"join"}}}}'}


class _MermaidIds:
    """Mermaid ids are generated (`n0`, `n1`, ...; clusters `s0`, ...), so any node name is safe; the top graph's
    markers are `start` and `stop`."""

    def __init__(self) -> None:
        self.ids, self.clusters = {START: "start", END: "stop"}, 0

    def shape(self, path: str) -> str:
        return self.ids.setdefault(path, f"n{len(self.ids) - 2}")

    def cluster(self) -> str:
        self.clusters += 1
        return f"s{self.clusters - 1}"


def _mermaid_items(items: list[Shape | Cluster], indent: str, ids: _MermaidIds) -> list[str]:
    lines = []
    for item in items:
        if isinstance(item, Cluster):
            lines += [f'{indent}subgraph {ids.cluster()} ["{_mermaid_label(item.label)}"]',
                      *_mermaid_items(item.items, indent + "  ", ids), f"{indent}end"]
        else:
            lines.append(f"{indent}{ids.shape(item.id)}{MERMAID_SHAPES[item.kind].format(_mermaid_label(item.label))}")
    return lines


def to_mermaid(graph: dict[str, Any], graphs: dict[str, dict[str, Any]] | None = None) -> str:
    """Return the graph as a Mermaid flowchart; every edge comes after every subgraph, so that no edge moves a node
    into a subgraph it does not belong to."""
    drawing, ids = layout(graph, graphs), _MermaidIds()
    lines = ["flowchart TD", *_mermaid_items(drawing.items, "  ", ids)]
    for edge in drawing.edges:
        arrow = "-->" if edge.label is None else f'-.->|"{_mermaid_label(edge.label)}"|'
        lines.append(f"  {ids.shape(edge.source)} {arrow} {ids.shape(edge.target)}")  # a target missing from `nodes`
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def render(dot_source: str, image_format: str, output: str) -> str | None:
    """Render `dot_source` to `output` with Graphviz; return an error message, or None when it worked."""
    dot = shutil.which("dot")
    if dot is None:
        return "--render needs Graphviz's `dot` on PATH (e.g. apt-get install graphviz)"
    result = subprocess.run([dot, f"-T{image_format}", "-o", output], input=dot_source, text=True,
                            capture_output=True, check=False)
    return f"dot failed: {result.stderr.strip()}" if result.returncode else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw a workflow graph definition as Graphviz DOT or Mermaid, with "
                                                 "the graphs its graph, map and parallel nodes run drawn inside.")
    parser.add_argument("sources", nargs="*", metavar="FILE",
                        help="graph definition JSON files or directories of them ('-': stdin; none, without --url: "
                             "stdin); the first is drawn, the others may be referenced")
    parser.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000; graphs not read "
                                      "from a file are fetched from it")
    parser.add_argument("--graph-id", help="graph to draw (default: the first file's)")
    parser.add_argument("--format", choices=("dot", "mermaid"), default="dot", help="output language (default dot)")
    parser.add_argument("--render", choices=("png", "svg"), help="also render a picture with Graphviz's dot")
    parser.add_argument("-o", "--output", help="picture file for --render (default: GRAPH_ID.png or .svg)")
    return parser


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Return the graph to draw and every graph it runs, by id."""
    read = read_definitions(args.sources or ([] if args.url else ["-"]))
    definitions = Definitions(_by_id(read), args.url)
    graph = read[0][1] if args.graph_id is None else definitions.find(args.graph_id)
    if graph is None:
        raise InputError(f"graph '{args.graph_id}' is {NOT_READ}")
    return graph, resolve(graph, definitions)


def main(argv: list[str] | None = None) -> int:
    """Print the graph as DOT or Mermaid, render it if asked; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.url is not None and args.graph_id is None and not args.sources:
        parser.error("--url needs --graph-id, or a definition file to draw")
    if args.render and args.format != "dot":
        parser.error("--render works with --format dot only")
    if args.graph_id is None and any(Path(source).is_dir() for source in args.sources[:1]):
        parser.error("--graph-id is needed to say which graph of a directory to draw")
    try:
        graph, graphs = _load(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    source = to_dot(graph, graphs) if args.format == "dot" else to_mermaid(graph, graphs)
    sys.stdout.write(source)
    if args.render:
        problem = render(source, args.render, args.output or f"{graph.get('graph_id') or 'graph'}.{args.render}")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_RENDER_FAILED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
