"""Review Python source with rules built on `ast`, fix what is safe to fix, and loop until the code is good enough.

Graph `code_review`: extract_functions -> check_complexity -> detect_issues -> suggest_improvements ->
evaluate_quality, which goes back to detect_issues while `quality_below_threshold` holds. Input: `data.code` (Python
source) and `data.quality_threshold` (0-100, default 75). Every node reviews `data.improved_code` when present, else
`data.code`; suggest_improvements writes the fixed source to `improved_code`, so each pass reviews the last one's
result. Register it with `code_review.register(registry)`.

| rule                | severity | detects                                                       | auto-fix            |
|---------------------|----------|---------------------------------------------------------------|---------------------|
| syntax-error        | error    | source that does not parse (then no other rule runs)          | no                  |
| too-deep-to-parse   | error    | source nested deeper than Python's parser goes, which CPython | no                  |
|                     |          | cannot compile either (then no other rule runs)               |                     |
| bare-except         | error    | `except:` without a type                                      | `except Exception:` |
| mutable-default     | error    | a list, dict or set display or comprehension, or a `list()`,  | None default, value |
|                     |          | `dict()` or `set()` call, as a parameter default              | built in the body   |
| high-complexity     | warning  | McCabe complexity over 10, counted as `radon cc` counts it    | no                  |
| long-function       | warning  | a function over 50 lines, `def` line to last line             | no                  |
| too-many-params     | warning  | over 5 parameters, `self`, `*args` and `**kwargs` included    | no                  |
| deep-nesting        | warning  | blocks (if, for, while, with, try, match) nested over 4 deep  | no                  |
| swallowed-exception | warning  | an `except` whose body is only `pass`                         | no                  |
| none-comparison     | warning  | `== None` or `!= None`                                        | `is` / `is not`     |
| builtin-shadowing   | warning  | a function, class, parameter, variable or import named like a | no                  |
|                     |          | builtin (class attributes and method names do not count)      |                     |
| wildcard-import     | warning  | `from module import *`                                        | no                  |
| unused-import       | warning  | an imported name never read, nor in `__all__` or a string     | import removed      |
|                     |          | annotation                                                    |                     |
| missing-docstring   | info     | a public function (no `_` in its qualified name, not nested   | a TODO stub         |
|                     |          | in a function) without a docstring                            |                     |

A fix is applied only when the function body starts on its own line, it overlaps no other fix, and the result still
parses; fixes edit the source text at the AST's positions, so comments and formatting survive. Each fix is checked by
parsing the statement it changes (see _FixCheck). A pass checks and applies at most MAX_FIX_CHECKS fixes and leaves the
rest to the next pass, and a run makes at most MAX_REVIEW_PASSES passes; code of any length is reviewed, in time linear
in its length apart from those checks.

Score: `quality_score = round(100 * size / (size + penalty))`, where `penalty` adds 10 per error, 5 per warning and
2 per info finding, and `size` is the number of non-blank, non-comment lines of `data.code` (at least 20), so the same
findings cost less in a bigger file. No findings scores 100; code that does not parse scores 0.
`quality_below_threshold` is true while the score is under the threshold, the last pass changed the code, and fewer
than 5 passes ran.
"""

import ast
import asyncio
import bisect
import builtins
import collections
import dataclasses
import enum
import functools
import io
import itertools
import re
import symtable
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

# workflow_engine imports this module while it starts (its `app` loads the default workflows), so importing it here
# at the top would be circular whenever this module is imported first: its names are imported where they are used.
if TYPE_CHECKING:
    from workflow_engine import GraphDefinition, NodeContext, Registry, WorkflowState

__all__ = [
    "DEFAULT_QUALITY_THRESHOLD",
    "GRAPH_ID",
    "Rule",
    "Severity",
    "check_complexity",
    "detect_issues",
    "evaluate_quality",
    "extract_functions",
    "graph_definition",
    "quality_below_threshold",
    "register",
    "suggest_improvements",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------
DEFAULT_QUALITY_THRESHOLD = 75
MAX_COMPLEXITY = 10
MAX_FUNCTION_LINES = 50
MAX_PARAMETERS = 5
MAX_NESTING = 4
MAX_REVIEW_PASSES = 5  # passes of detect_issues per run, so the loop ends even if fixes kept changing the code
MIN_SCORED_LINES = 20
DOCSTRING_STUB = '"""TODO: document {name}."""'
MUTABLE_FACTORIES = frozenset({"list", "dict", "set"})
# Names the `site` module adds to builtins; they depend on how Python was started, so they are not rules' business.
SITE_BUILTINS = frozenset({"copyright", "credits", "exit", "help", "license", "quit"})
BUILTIN_NAMES = frozenset(name for name in dir(builtins) if not name.startswith("_")) - SITE_BUILTINS

GRAPH_ID = "code_review"
MAX_FIX_CHECKS = 50  # fixes checked (each by parsing the statement it changes) and applied in one pass
INLINE_CODE_CHARS = 2_000  # code up to this size is reviewed on the event loop: under a millisecond a step


@enum.unique
class Severity(enum.Enum):
    """How much a finding costs in the score."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@enum.unique
class Rule(enum.Enum):
    """The review rules, in the order findings on the same line are listed."""

    SYNTAX_ERROR = "syntax-error"
    TOO_DEEP_TO_PARSE = "too-deep-to-parse"
    BARE_EXCEPT = "bare-except"
    MUTABLE_DEFAULT = "mutable-default"
    HIGH_COMPLEXITY = "high-complexity"
    LONG_FUNCTION = "long-function"
    TOO_MANY_PARAMS = "too-many-params"
    DEEP_NESTING = "deep-nesting"
    SWALLOWED_EXCEPTION = "swallowed-exception"
    NONE_COMPARISON = "none-comparison"
    BUILTIN_SHADOWING = "builtin-shadowing"
    WILDCARD_IMPORT = "wildcard-import"
    UNUSED_IMPORT = "unused-import"
    MISSING_DOCSTRING = "missing-docstring"


RULE_SEVERITY: Mapping[Rule, Severity] = MappingProxyType({
    Rule.SYNTAX_ERROR: Severity.ERROR,
    Rule.TOO_DEEP_TO_PARSE: Severity.ERROR,
    Rule.BARE_EXCEPT: Severity.ERROR,
    Rule.MUTABLE_DEFAULT: Severity.ERROR,
    Rule.HIGH_COMPLEXITY: Severity.WARNING,
    Rule.LONG_FUNCTION: Severity.WARNING,
    Rule.TOO_MANY_PARAMS: Severity.WARNING,
    Rule.DEEP_NESTING: Severity.WARNING,
    Rule.SWALLOWED_EXCEPTION: Severity.WARNING,
    Rule.NONE_COMPARISON: Severity.WARNING,
    Rule.BUILTIN_SHADOWING: Severity.WARNING,
    Rule.WILDCARD_IMPORT: Severity.WARNING,
    Rule.UNUSED_IMPORT: Severity.WARNING,
    Rule.MISSING_DOCSTRING: Severity.INFO,
})
UNPARSED_RULES = frozenset({Rule.SYNTAX_ERROR, Rule.TOO_DEEP_TO_PARSE})  # no other rule runs, and the score is 0
SEVERITY_WEIGHT: Mapping[Severity, int] = MappingProxyType({Severity.ERROR: 10, Severity.WARNING: 5, Severity.INFO: 2})

# What to do about a finding; `{function}` and `{detail}` come from the finding.
SUGGESTIONS: Mapping[Rule, str] = MappingProxyType({
    Rule.SYNTAX_ERROR: "Fix the syntax error ({detail}); nothing else is checked until the code parses.",
    Rule.TOO_DEEP_TO_PARSE: "Split the deeply nested expression or `elif` chain; nothing else is checked until "
                            "the code parses.",
    Rule.BARE_EXCEPT: "Catch `Exception` or a narrower type, so Ctrl-C and sys.exit() still work.",
    Rule.MUTABLE_DEFAULT: "Default `{detail}` to None and build a fresh value inside {function}.",
    Rule.HIGH_COMPLEXITY: "Split {function} into smaller functions or replace branches with a lookup table.",
    Rule.LONG_FUNCTION: "Split {function} into smaller functions, one job each.",
    Rule.TOO_MANY_PARAMS: "Group related parameters of {function} into a dataclass, or make rare ones keyword-only.",
    Rule.DEEP_NESTING: "Flatten {function} with early returns, `continue`, or a helper function.",
    Rule.SWALLOWED_EXCEPTION: "Handle, log or re-raise the error instead of `pass`, or catch only what is expected.",
    Rule.NONE_COMPARISON: "Compare with None using `is` or `is not`: `==` can be overridden.",
    Rule.BUILTIN_SHADOWING: "Rename `{detail}` so the builtin of that name stays usable.",
    Rule.WILDCARD_IMPORT: "Import the names you use from `{detail}` explicitly.",
    Rule.UNUSED_IMPORT: "Remove the unused import `{detail}`.",
    Rule.MISSING_DOCSTRING: "Add a docstring that says what {function} does.",
})

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
# What ast.parse raises for code it cannot parse: ValueError for null bytes, RecursionError or MemoryError for code
# nested deeper than Python's parser goes.
_UNPARSABLE = (SyntaxError, ValueError, RecursionError, MemoryError)
_BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.TryStar, ast.Match)
_BLANKS = re.compile(r"[ \t\f]*")
_NO_CODE_AFTER = re.compile(r"[ \t\f]*(?:#|\r|\n|$)")  # what may follow a statement that is alone on its line


# ---------------------------------------------------------------------------
# Source positions and edits
# ---------------------------------------------------------------------------
# The AST counts columns in UTF-8 bytes; edits work on str offsets, so every position goes through _Source.offset.
# One line may hold a whole file, so no method costs what its line costs: reviews stay linear in the code's size.
@dataclasses.dataclass(frozen=True)
class _Source:
    text: str
    lines: tuple[str, ...]  # with their line endings
    starts: tuple[int, ...]  # offset of each line, then len(text)
    wide: frozenset[int]  # the lines with non-ASCII text, where UTF-8 columns are not str columns
    # Of each wide line, once asked: the UTF-8 column where each of its characters starts.
    columns: dict[int, list[int]] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, text: str) -> "_Source":
        lines = tuple(io.StringIO(text, newline="").readlines())
        wide = frozenset(lineno for lineno, line in enumerate(lines, 1) if not line.isascii())
        return cls(text, lines, tuple(itertools.accumulate((len(line) for line in lines), initial=0)), wide)

    def line(self, lineno: int) -> str:
        return self.lines[lineno - 1] if lineno <= len(self.lines) else ""

    def line_start(self, lineno: int) -> int:
        return self.starts[min(lineno, len(self.lines) + 1) - 1]

    def offset(self, lineno: int, col: int) -> int:
        if lineno not in self.wide:
            return self.line_start(lineno) + col
        if lineno not in self.columns:
            sizes = (len(char.encode()) for char in self.line(lineno))
            self.columns[lineno] = list(itertools.accumulate(sizes, initial=0))
        return self.line_start(lineno) + bisect.bisect_left(self.columns[lineno], col)

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)

    def segment(self, node: ast.AST) -> str:
        return self.text[self.start(node) : self.end(node)]

    def indent(self, lineno: int) -> str:
        start = self.line_start(lineno)
        return self.text[start : _BLANKS.match(self.text, start).end()]

    def newline(self, lineno: int) -> str:
        line = self.line(lineno)
        return next((ending for ending in ("\r\n", "\n", "\r") if line.endswith(ending)), "\n")

    def starts_line(self, node: ast.AST) -> bool:
        """Tell whether only indentation stands before `node` on its first line."""
        return _BLANKS.match(self.text, self.line_start(node.lineno)).end() == self.start(node)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Edit:
    """Replace text[start:end] with `text`; insertions at one offset go in `order`."""

    start: int
    end: int
    text: str
    order: int = 0


def _overlap(first: _Edit, second: _Edit) -> bool:
    return first != second and first.start < second.end and second.start < first.end


def _apply(text: str, edits: Iterable[_Edit]) -> str:
    pieces, cursor = [], 0
    # dict.fromkeys drops duplicate edits (two findings fixed by removing one statement) and keeps their order.
    for edit in sorted(dict.fromkeys(edits), key=lambda edit: (edit.start, edit.end, edit.order)):
        pieces += [text[cursor : edit.start], edit.text]
        cursor = edit.end
    return "".join(pieces) + text[cursor:]


def _parses(text: str) -> bool:
    """Tell whether `text` parses, as `ast.parse` decides."""
    # symtable parses without building the Python objects of the tree, which costs most of ast.parse on big files;
    # what it accepts parses. It also rejects some code that parses (say `nonlocal` at module level): ast.parse decides.
    try:
        symtable.symtable(text, "<unknown>", "exec")
    except Exception:  # noqa: BLE001 - any rejection is only a reason to ask ast.parse
        try:
            ast.parse(text)
        except _UNPARSABLE:
            return False
    return True


def _children(node: ast.AST) -> list[ast.AST]:
    """Return the child nodes of `node` in `ast.iter_child_nodes`' order, but not the `Load`/`Store`/`Del` markers.

    No rule looks at those markers (rules read `ctx` from the node that has it), and skipping them makes walks faster.
    """
    children = []
    for field in node._fields:
        value = getattr(node, field, None)
        if isinstance(value, list):
            children += [item for item in value if isinstance(item, ast.AST)]
        elif isinstance(value, ast.AST) and not isinstance(value, ast.expr_context):
            children.append(value)
    return children


# ---------------------------------------------------------------------------
# Functions and complexity
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class _Function:
    node: FunctionNode
    qualname: str  # enclosing classes and functions, dotted
    class_name: str | None  # the class this function is a method of
    is_nested: bool  # defined inside another function
    complexity: int


@dataclasses.dataclass(frozen=True)
class _Scope:
    """Where a node sits: what its definitions are named after, and whether it binds class attributes."""

    prefix: str = ""  # of the qualified names defined here
    class_name: str | None = None  # the class whose methods are defined here
    in_function: bool = False  # inside a function body
    in_class: bool = False  # in a class body, not inside a function or lambda there

    def inner(self, node: ast.AST) -> "_Scope":
        """Return the scope of `node`'s children."""
        if isinstance(node, ast.ClassDef):
            return _Scope(self.prefix + node.name + ".", node.name, self.in_function, in_class=True)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return _Scope(self.prefix + node.name + ".", None, in_function=True)
        if isinstance(node, ast.Lambda):
            return dataclasses.replace(self, in_class=False)
        return self


def _walk(tree: ast.Module) -> list[tuple[ast.AST, _Scope]]:
    """Return every node of `tree` with its scope, in `ast.walk`'s order (breadth first)."""
    found = [(tree, _Scope())]
    for node, scope in found:  # the list grows while it is read, so this visits every node
        inner = scope.inner(node) if isinstance(node, (*_SCOPES, ast.Lambda)) else scope
        found += [(child, inner) for child in _children(node)]
    return found


def _function(node: FunctionNode, scope: _Scope) -> _Function:
    return _Function(node=node, qualname=scope.prefix + node.name, class_name=scope.class_name,
                     is_nested=scope.in_function, complexity=_complexity(node))


def _functions_in(walked: list[tuple[ast.AST, _Scope]]) -> list[_Function]:
    found = [_function(node, scope) for node, scope in walked if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    return sorted(found, key=lambda function: (function.node.lineno, function.node.col_offset))


def _functions(tree: ast.Module) -> list[_Function]:
    """Return every function and method in `tree`, nested ones included, in source order."""
    return _functions_in(_walk(tree))


def _parameter_count(node: FunctionNode) -> int:
    args = node.args
    return len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + (args.vararg is not None) + (
        args.kwarg is not None
    )


def _docstring(node: FunctionNode) -> ast.Expr | None:
    first = node.body[0]
    is_text = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return first if is_text and isinstance(first.value.value, str) else None


def _own_decisions(node: ast.AST) -> int:
    """Count the decision points `node` itself adds, as radon's ComplexityVisitor does."""
    match node:
        case ast.If() | ast.IfExp():
            return 1
        case ast.For() | ast.AsyncFor() | ast.While():
            return 1 + bool(node.orelse)
        case ast.Try():  # like radon 6, `except*` (ast.TryStar) adds nothing
            return len(node.handlers) + bool(node.orelse)
        case ast.BoolOp():
            return len(node.values) - 1
        case ast.comprehension():
            return 1 + len(node.ifs)
        case ast.Match():
            # Like radon, any irrefutable `case _:` or `case name:` makes the other cases the only decisions.
            catch_all = any(isinstance(case.pattern, ast.MatchAs) and not case.pattern.pattern for case in node.cases)
            return max(0, len(node.cases) - catch_all)
    return 0


def _complexity(node: FunctionNode) -> int:
    """Return the McCabe complexity of `node`: 1 plus its decision points, nested definitions excluded."""
    total, pending = 1, list(node.body)
    while pending:
        child = pending.pop()
        if isinstance(child, _SCOPES):
            continue
        if isinstance(child, ast.Assert):  # radon counts an assert once and does not look inside it
            total += 1
            continue
        total += _own_decisions(child)
        pending.extend(_children(child))
    return total


@dataclasses.dataclass(frozen=True)
class _Tree:
    """The reviewed code parsed once and walked once: rules filter `walked` instead of walking the tree again."""

    module: ast.Module
    walked: list[tuple[ast.AST, _Scope]]  # every node with its scope, in `ast.walk`'s order
    functions: list[_Function]

    @classmethod
    def parse(cls, code: str) -> "_Tree":
        """Parse `code`; raise one of _UNPARSABLE when it does not parse."""
        module = ast.parse(code)
        walked = _walk(module)
        return cls(module, walked, _functions_in(walked))

    def nodes(self, kind: type | tuple[type, ...]) -> list[Any]:
        """Return the nodes of type `kind`, in `ast.walk`'s order."""
        return [node for node, _ in self.walked if isinstance(node, kind)]


def _function_record(function: _Function) -> dict[str, Any]:
    node = function.node
    return {
        "name": node.name,
        "qualname": function.qualname,
        "class_name": function.class_name,
        "is_async": isinstance(node, ast.AsyncFunctionDef),
        "first_line": node.lineno,
        "last_line": node.end_lineno,
        "length": node.end_lineno - node.lineno + 1,
        "params": _parameter_count(node),
        "has_docstring": _docstring(node) is not None,
    }


def _complexity_report(functions: list[_Function]) -> dict[str, Any]:
    scores = [
        {"qualname": function.qualname, "line": function.node.lineno, "complexity": function.complexity}
        for function in functions
    ]
    # The first of equally complex functions is the worst: max() keeps the first maximum.
    worst = max(scores, key=lambda score: score["complexity"], default=None)
    average = round(sum(score["complexity"] for score in scores) / len(scores), 2) if scores else 0.0
    return {"functions": scores, "average": average, "worst": worst}


# ---------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class _Finding:
    rule: Rule
    line: int
    message: str
    function: str | None = None
    detail: str = ""  # the name or text the suggestion talks about
    edits: tuple[_Edit, ...] = ()  # the fix; empty when this finding cannot be fixed safely


def _finding_record(finding: _Finding) -> dict[str, Any]:
    return {
        "rule": finding.rule.value,
        "severity": RULE_SEVERITY[finding.rule].value,
        "line": finding.line,
        "function": finding.function,
        "message": finding.message,
        "fixable": bool(finding.edits),
    }


def _unparsed(exc: Exception) -> _Finding:
    """Return the finding for code that does not parse, from what ast.parse raised."""
    if isinstance(exc, RecursionError | MemoryError):
        return _Finding(rule=Rule.TOO_DEEP_TO_PARSE, line=1, message="the code nests too deeply for Python's parser")
    if isinstance(exc, SyntaxError):
        line = exc.lineno or 1
        return _Finding(rule=Rule.SYNTAX_ERROR, line=line, message=exc.msg, detail=f"line {line}: {exc.msg}")
    return _Finding(rule=Rule.SYNTAX_ERROR, line=1, message=str(exc), detail=str(exc))


def _limit(rule: Rule, function: _Function, template: str, value: int, limit: int) -> Iterator[_Finding]:
    if value > limit:
        message = template.format(name=function.qualname, value=value, limit=limit)
        yield _Finding(rule=rule, line=function.node.lineno, function=function.qualname, message=message)


def _check_size(function: _Function, source: _Source) -> Iterator[_Finding]:
    node, length = function.node, function.node.end_lineno - function.node.lineno + 1
    complexity, parameters = function.complexity, _parameter_count(node)
    yield from _limit(Rule.HIGH_COMPLEXITY, function, "{name} has complexity {value} (limit {limit})", complexity,
                      MAX_COMPLEXITY)
    yield from _limit(Rule.LONG_FUNCTION, function, "{name} is {value} lines long (limit {limit})", length,
                      MAX_FUNCTION_LINES)
    yield from _limit(Rule.TOO_MANY_PARAMS, function, "{name} takes {value} parameters (limit {limit})", parameters,
                      MAX_PARAMETERS)


def _inner_blocks(statement: ast.stmt, depth: int, source: _Source) -> list[tuple[list[ast.stmt], int]]:
    """Return the statement lists inside `statement` with their nesting depth; `elif` stays at its `if`'s depth."""
    if not isinstance(statement, _BLOCKS):
        return []
    if isinstance(statement, ast.Match):
        return [(case.body, depth + 1) for case in statement.cases]
    blocks = [(statement.body, depth + 1)]
    if isinstance(statement, ast.Try | ast.TryStar):
        blocks += [(handler.body, depth + 1) for handler in statement.handlers] + [(statement.finalbody, depth + 1)]
    orelse = getattr(statement, "orelse", [])
    is_elif = isinstance(statement, ast.If) and len(orelse) == 1 and source.text.startswith(
        "elif", source.start(orelse[0]))
    return blocks + [(orelse, depth if is_elif else depth + 1)]


def _deepest(statements: list[ast.stmt], source: _Source) -> tuple[int, int]:
    """Return the nesting depth and line of the first most deeply nested statement, not looking into definitions."""
    best, pending = (-1, 0), [(statements, 0)]
    while pending:  # depth first, in source order; a loop, as an `elif` chain nests as deep as it is long
        block, depth = pending.pop()
        if block and depth > best[0]:
            best = (depth, block[0].lineno)
        inner = [found for statement in block if not isinstance(statement, _SCOPES)
                 for found in _inner_blocks(statement, depth, source)]
        pending += reversed(inner)
    return best


def _check_nesting(function: _Function, source: _Source) -> Iterator[_Finding]:
    depth, line = _deepest(function.node.body, source)
    if depth > MAX_NESTING:
        message = f"{function.qualname} nests blocks {depth} deep (limit {MAX_NESTING})"
        yield _Finding(rule=Rule.DEEP_NESTING, line=line, function=function.qualname, message=message)


def _is_code(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _body_top(node: FunctionNode, source: _Source) -> int | None:
    """Return the offset where new first statements of `node` go (after its docstring), or None if none can."""
    first, docstring = node.body[0], _docstring(node)
    if not source.starts_line(first):
        return None
    if docstring is not None:
        shares_line = len(node.body) > 1 and node.body[1].lineno == docstring.end_lineno
        return None if shares_line else source.line_start(docstring.end_lineno + 1)
    # Go above the comments before the first statement: they belong to that statement, not to the new lines.
    line = first.lineno
    while not _is_code(source.line(line - 1)):
        line -= 1
    return source.line_start(line)


def _insertion(node: FunctionNode, lines: list[str], source: _Source, order: int) -> tuple[_Edit, ...]:
    offset = _body_top(node, source)
    if offset is None:
        return ()
    indent, newline = source.indent(node.body[0].lineno), source.newline(node.lineno)
    text = "".join(indent + line + newline for line in lines)
    if offset == len(source.text) and not source.text.endswith(("\n", "\r")):
        text = newline + text
    return (_Edit(start=offset, end=offset, text=text, order=order),)


def _is_public(function: _Function) -> bool:
    return not function.is_nested and not any(part.startswith("_") for part in function.qualname.split("."))


def _check_docstring(function: _Function, source: _Source) -> Iterator[_Finding]:
    node = function.node
    if _is_public(function) and _docstring(node) is None:
        edits = _insertion(node, [DOCSTRING_STUB.format(name=node.name)], source, order=0)
        message = f"public function {function.qualname} has no docstring"
        yield _Finding(rule=Rule.MISSING_DOCSTRING, line=node.lineno, function=function.qualname, message=message,
                       edits=edits)


def _is_mutable(default: ast.expr) -> bool:
    if isinstance(default, ast.List | ast.Dict | ast.Set | ast.ListComp | ast.DictComp | ast.SetComp):
        return True
    return isinstance(default, ast.Call) and isinstance(default.func, ast.Name) and default.func.id in MUTABLE_FACTORIES


def _defaults(node: FunctionNode) -> Iterator[tuple[ast.arg, ast.expr]]:
    positional = node.args.posonlyargs + node.args.args
    yield from zip(positional[len(positional) - len(node.args.defaults) :], node.args.defaults)
    yield from ((arg, default) for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults) if default)


def _mutable_default_fix(node: FunctionNode, arg: ast.arg, default: ast.expr, source: _Source) -> tuple[_Edit, ...]:
    """Default `arg` to None and rebuild the original value at the top of the body, after the docstring."""
    step = source.indent(node.body[0].lineno)[len(source.indent(node.lineno)) :] or "    "
    lines = [f"if {arg.arg} is None:", f"{step}{arg.arg} = {source.segment(default)}"]
    inserted = _insertion(node, lines, source, order=1)
    replaced = _Edit(start=source.start(default), end=source.end(default), text="None")
    return (replaced, *inserted) if inserted else ()


def _check_defaults(function: _Function, source: _Source) -> Iterator[_Finding]:
    for arg, default in _defaults(function.node):
        if _is_mutable(default):
            message = f"parameter `{arg.arg}` has a mutable default `{source.segment(default)}`, shared by every call"
            yield _Finding(rule=Rule.MUTABLE_DEFAULT, line=default.lineno, function=function.qualname,
                           message=message, detail=arg.arg,
                           edits=_mutable_default_fix(function.node, arg, default, source))


FunctionCheck = Callable[[_Function, _Source], Iterator[_Finding]]
_FUNCTION_CHECKS: tuple[FunctionCheck, ...] = (_check_size, _check_nesting, _check_docstring, _check_defaults)


def _check_excepts(tree: _Tree, source: _Source) -> Iterator[_Finding]:
    for handler in tree.nodes(ast.ExceptHandler):
        start = source.start(handler)
        if handler.type is None and source.text.startswith("except", start):
            fix = _Edit(start=start, end=start + len("except"), text="except Exception")
            yield _Finding(rule=Rule.BARE_EXCEPT, line=handler.lineno, edits=(fix,),
                           message="bare `except:` also catches KeyboardInterrupt and SystemExit")
        if all(isinstance(statement, ast.Pass) for statement in handler.body):
            yield _Finding(rule=Rule.SWALLOWED_EXCEPTION, line=handler.lineno,
                           message="the `except` body is only `pass`, so the error vanishes")


def _operator_fix(left: ast.expr, right: ast.expr, is_equal: bool, source: _Source) -> tuple[_Edit, ...]:
    """Replace the `==`/`!=` between `left` and `right` (past parentheses and comments) with `is`/`is not`."""
    start, gap = source.end(left), source.text[source.end(left) : source.start(right)]
    index = 0
    while index < len(gap) and gap[index : index + 2] not in ("==", "!="):
        index = gap.find("\n", index) if gap[index] == "#" else index + 1
        index = len(gap) if index < 0 else index
    if index >= len(gap):
        return ()
    before = "" if index and gap[index - 1].isspace() else " "
    after = "" if gap[index + 2 : index + 3].isspace() else " "
    text = f"{before}{'is' if is_equal else 'is not'}{after}"
    return (_Edit(start=start + index, end=start + index + 2, text=text),)


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _check_none_comparisons(tree: _Tree, source: _Source) -> Iterator[_Finding]:
    for compare in tree.nodes(ast.Compare):
        operands = [compare.left, *compare.comparators]
        for op, left, right in zip(compare.ops, operands, operands[1:]):
            if isinstance(op, ast.Eq | ast.NotEq) and (_is_none(left) or _is_none(right)):
                symbol = "==" if isinstance(op, ast.Eq) else "!="
                yield _Finding(rule=Rule.NONE_COMPARISON, line=compare.lineno,
                               message=f"comparison to None with `{symbol}`",
                               edits=_operator_fix(left, right, isinstance(op, ast.Eq), source))


def _bound_names(node: ast.AST, in_class: bool) -> Iterator[tuple[str, int]]:
    """Yield the names `node` itself binds, with their line; class attributes and methods bind none."""
    match node:
        case ast.FunctionDef() | ast.AsyncFunctionDef() | ast.ClassDef() if not in_class:
            yield node.name, node.lineno
        case ast.arg():
            yield node.arg, node.lineno
        case ast.Name(ctx=ast.Store()) if not in_class:
            yield node.id, node.lineno
        case ast.ExceptHandler(name=str()):
            yield node.name, node.lineno
        case ast.alias() if not in_class and node.name != "*":
            yield node.asname or node.name.partition(".")[0], node.lineno


def _check_shadowing(tree: _Tree, source: _Source) -> Iterator[_Finding]:
    # A class body is class scope down to its methods; a function body is never class scope (see _Scope.inner).
    for node, scope in tree.walked:
        for name, line in _bound_names(node, scope.in_class):
            if name in BUILTIN_NAMES:
                yield _Finding(rule=Rule.BUILTIN_SHADOWING, line=line, detail=name,
                               message=f"`{name}` shadows the builtin of the same name")


def _check_wildcards(tree: _Tree, source: _Source) -> Iterator[_Finding]:
    for node in tree.nodes(ast.ImportFrom):
        if any(alias.name == "*" for alias in node.names):
            module = "." * node.level + (node.module or "")
            yield _Finding(rule=Rule.WILDCARD_IMPORT, line=node.lineno, detail=module,
                           message=f"`from {module} import *` hides where names come from")


def _annotations(tree: _Tree) -> Iterator[ast.expr]:
    for node in tree.nodes((ast.FunctionDef, ast.AsyncFunctionDef, ast.arg, ast.AnnAssign)):
        annotation = node.returns if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else None
        annotation = node.annotation if isinstance(node, ast.arg | ast.AnnAssign) else annotation
        if annotation is not None:
            yield annotation


def _annotation_names(tree: _Tree) -> Iterator[str]:
    """Yield the names used inside string annotations such as `"Path"` or `list["Node"]`."""
    texts = [node.value for annotation in _annotations(tree) for node in ast.walk(annotation)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    for text in dict.fromkeys(texts):  # each distinct text once
        try:
            annotation = ast.parse(text)
        except _UNPARSABLE:
            continue
        yield from (node.id for node in ast.walk(annotation) if isinstance(node, ast.Name))


def _exported_names(tree: _Tree) -> Iterator[str]:
    for node in tree.module.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(target, ast.Name) and target.id == "__all__" for target in targets):
            yield from (item.value for item in ast.walk(node.value) if isinstance(item, ast.Constant))


def _used_names(tree: _Tree) -> set[str]:
    read = {node.id for node in tree.nodes(ast.Name) if not isinstance(node.ctx, ast.Store)}
    return read | set(_annotation_names(tree)) | {name for name in _exported_names(tree) if isinstance(name, str)}


def _statement_removal(statement: ast.Import | ast.ImportFrom, source: _Source) -> _Edit | None:
    """Remove the lines of `statement`, unless it shares them with other code."""
    if not _NO_CODE_AFTER.match(source.text, source.end(statement)) or not source.starts_line(statement):
        return None
    first, after = source.line_start(statement.lineno), source.line_start(statement.end_lineno + 1)
    return _Edit(start=first, end=after, text="")


def _alias_removal(statement: ast.Import | ast.ImportFrom, index: int, source: _Source) -> _Edit:
    aliases = statement.names
    if index + 1 < len(aliases):
        return _Edit(start=source.start(aliases[index]), end=source.start(aliases[index + 1]), text="")
    return _Edit(start=source.end(aliases[index - 1]), end=source.end(aliases[index]), text="")


def _imports(tree: _Tree) -> Iterator[ast.Import | ast.ImportFrom]:
    """Yield the import statements, except `from __future__` ones (they are compiler directives)."""
    for node in tree.nodes((ast.Import, ast.ImportFrom)):
        if isinstance(node, ast.Import) or node.module != "__future__":
            yield node


def _check_imports(tree: _Tree, source: _Source) -> Iterator[_Finding]:
    used = _used_names(tree)
    for statement in _imports(tree):
        bound = [alias.asname or alias.name.partition(".")[0] for alias in statement.names]
        unused = [name != "*" and name not in used for name in bound]
        is_all_unused = all(unused)  # once per statement: one statement may import 10,000 names
        whole = _statement_removal(statement, source) if is_all_unused else None
        for index, alias in enumerate(statement.names):
            if unused[index]:
                removal = whole if is_all_unused else _alias_removal(statement, index, source)
                yield _Finding(rule=Rule.UNUSED_IMPORT, line=alias.lineno, detail=alias.name,
                               message=f"`{bound[index]}` is imported but never used",
                               edits=(removal,) if removal else ())


ModuleCheck = Callable[[_Tree, _Source], Iterator[_Finding]]
_MODULE_CHECKS: tuple[ModuleCheck, ...] = (
    _check_excepts, _check_none_comparisons, _check_shadowing, _check_wildcards, _check_imports,
)


def _innermost_functions(functions: list[_Function], lines: Iterable[int]) -> dict[int, str | None]:
    """Return the qualified name of the innermost function around each of `lines`, in one sweep down the code."""
    names: dict[int, str | None] = {}
    around: list[_Function] = []  # the functions open at the line, each inside the one before
    ahead = collections.deque(functions)  # in source order
    for line in sorted(set(lines)):
        while ahead and ahead[0].node.lineno <= line:
            entering = ahead.popleft()
            while around and around[-1].node.end_lineno < entering.node.lineno:
                around.pop()
            around.append(entering)
        while around and around[-1].node.end_lineno < line:
            around.pop()
        names[line] = around[-1].qualname if around else None
    return names


Parses = Callable[[str], bool]
_COMPOUND = (*_BLOCKS, *_SCOPES)


def _statement_lists(node: ast.Module | ast.stmt) -> list[list[ast.stmt]]:
    """Return the blocks directly inside `node`, in source order; a simple statement has none."""
    if isinstance(node, ast.Match):
        return [case.body for case in node.cases]
    handlers = [handler.body for handler in getattr(node, "handlers", [])]
    return [getattr(node, "body", []), *handlers, getattr(node, "orelse", []), getattr(node, "finalbody", [])]


@dataclasses.dataclass(frozen=True)
class _FixCheck:
    """Tell whether edits keep the code parsing, by parsing only the statement they change.

    Python reads a statement that has its lines to itself the same wherever it stands in a block. So when the code
    parses and the edited statement parses on its own (under an `if 1:` when it is indented), the edited code parses
    too, and a check costs what that statement costs, not what the whole file costs.
    """

    module: ast.Module
    source: _Source
    parses: Parses

    def keeps_parsing(self, edits: tuple[_Edit, ...], done: Iterable[_Edit] = ()) -> bool:
        """Tell whether `edits` keep the code parsing, on top of the edits `done` (which keep it parsing)."""
        first, after, is_indented = self._unit(min(edit.start for edit in edits), max(edit.end for edit in edits))
        inside = [edit for edit in (*done, *edits) if first <= edit.start and edit.end <= after]
        shifted = [dataclasses.replace(edit, start=edit.start - first, end=edit.end - first) for edit in inside]
        text = _apply(self.source.text[first:after], shifted)
        return self.parses(f"if 1:\n{text}" if is_indented else text)

    def _lines(self, statement: ast.stmt) -> tuple[int, int]:
        """Return the offsets where the lines of `statement` (decorators included) start and end."""
        decorators = getattr(statement, "decorator_list", [])
        first, last = decorators[0].lineno if decorators else statement.lineno, statement.end_lineno
        while self.source.line(last).endswith(("\\\n", "\\\r\n", "\\\r")):  # the next line continues this one
            last += 1
        return self.source.line_start(first), self.source.line_start(last + 1)

    def _unit(self, start: int, end: int) -> tuple[int, int, bool]:
        """Return where the text to check for an edit of text[start:end] starts and ends, and whether it is indented.

        That is the innermost statement that holds the edit and has its lines to itself, unless the edit removes it:
        then its block is checked (a block may not end up empty; a module may). With no such statement, all the code.
        """
        unit, node = (0, len(self.source.text), False), self.module
        while True:
            holder = self._holder(node, start, end)
            if holder is None:
                return unit
            block, index = holder
            statement, (first, after) = block[index], self._lines(block[index])
            is_top = node is self.module
            if isinstance(statement, _COMPOUND):
                if not self._is_elif(statement):  # an `elif` is no statement of its own: its `if` is
                    unit = (first, after, not is_top)
                node = statement
                continue
            is_removed = (start, end) == (first, after)
            has_lines = self.source.starts_line(statement) and (
                index + 1 == len(block) or block[index + 1].lineno > statement.end_lineno)
            # A top-level statement may go: a module may be empty, a block may not.
            return (first, after, not is_top) if has_lines and (is_top or not is_removed) else unit

    def _holder(self, node: ast.Module | ast.stmt, start: int, end: int) -> tuple[list[ast.stmt], int] | None:
        for block in _statement_lists(node):
            for index, statement in enumerate(block):
                first, after = self._lines(statement)
                if first <= start and end <= after:
                    return block, index
        return None

    def _is_elif(self, statement: ast.stmt) -> bool:
        return isinstance(statement, ast.If) and self.source.text.startswith("elif", self.source.start(statement))


@dataclasses.dataclass(frozen=True)
class _Review:
    """The functions and findings of the reviewed code, and the check of its fixes (None when it does not parse)."""

    functions: list[_Function]
    findings: list[_Finding]
    check: _FixCheck | None


def _review(code: str, parses: Parses) -> _Review:
    """Return the functions in `code` and every finding in it, sorted by line and rule; `parses` checks fixes."""
    try:
        tree = _Tree.parse(code)
    except _UNPARSABLE as exc:
        return _Review([], [_unparsed(exc)], None)
    source, functions = _Source.of(code), tree.functions
    findings = [finding for function in functions for check in _FUNCTION_CHECKS for finding in check(function, source)]
    found = [finding for check in _MODULE_CHECKS for finding in check(tree, source)]
    names = _innermost_functions(functions, (finding.line for finding in found))
    findings += [dataclasses.replace(finding, function=names[finding.line]) for finding in found]
    fix_check = _FixCheck(tree.module, source, parses)
    findings = _checked_fixes(findings, fix_check)
    rule_order = list(Rule)
    findings.sort(key=lambda finding: (finding.line, rule_order.index(finding.rule), finding.message))
    return _Review(functions, findings, fix_check)


def _checked_fixes(findings: list[_Finding], check: _FixCheck) -> list[_Finding]:
    """Drop each fix that breaks the code on its own (say, removing the only statement of a block).

    A pass checks at most MAX_FIX_CHECKS fixes; the others are left for the next pass (their findings say
    `fixable: false` until then).
    """
    kept, checks = [], 0
    for finding in findings:
        if finding.edits:
            checks += 1
            if checks > MAX_FIX_CHECKS or not check.keeps_parsing(finding.edits):
                finding = dataclasses.replace(finding, edits=())
        kept.append(finding)
    return kept


KeepsParsing = Callable[[tuple[_Edit, ...], list[_Edit]], bool]


def _select(findings: list[_Finding], keeps_parsing: KeepsParsing) -> tuple[list[_Edit], list[bool]]:
    """Accept in turn each fix that overlaps no accepted one and `keeps_parsing`; say which were accepted."""
    accepted: list[_Edit] = []
    applied: list[bool] = []
    for finding in findings:
        fits = bool(finding.edits) and not any(_overlap(new, old) for new in finding.edits for old in accepted)
        is_applied = fits and keeps_parsing(finding.edits, accepted)
        if is_applied:
            accepted += finding.edits
        applied.append(is_applied)
    return accepted, applied


def _fix(code: str, review: _Review) -> tuple[str, list[bool]]:
    """Apply every fix that overlaps no earlier one and keeps the code parsing; say which were applied."""
    if review.check is None:  # code that does not parse has no fixes
        return code, [False] * len(review.findings)
    # Every fix parses on its own (_review checked). If all the fixes that fit parse together, each step of applying
    # them in turn parses too: leaving out later fixes only restores code, and no later fix repairs what earlier ones
    # broke (an insertion only goes into a function body, and sorts before every finding inside that body). So the
    # combined result is checked once; only when it does not parse is every step checked to find the culprits.
    accepted, applied = _select(review.findings, lambda edits, done: True)
    if accepted and not review.check.parses(_apply(code, accepted)):
        accepted, applied = _select(review.findings, review.check.keeps_parsing)
    return _apply(code, accepted), applied


def _suggestion(finding: _Finding, applied: bool) -> dict[str, Any]:
    text = SUGGESTIONS[finding.rule].format(function=finding.function or "the module", detail=finding.detail)
    return {"rule": finding.rule.value, "line": finding.line, "suggestion": text, "applied": applied}


# ---------------------------------------------------------------------------
# Input and score
# ---------------------------------------------------------------------------
def _code(data: dict[str, Any]) -> str:
    code = data.get("code")
    if not isinstance(code, str):
        raise ValueError(f"data.code must be a string of Python source, got {type(code).__name__}")
    return code


def _reviewed_code(data: dict[str, Any]) -> str:
    improved = data.get("improved_code")
    return improved if isinstance(improved, str) else _code(data)


def _threshold(data: dict[str, Any]) -> float:
    threshold = data.get("quality_threshold", DEFAULT_QUALITY_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 100:
        raise ValueError(f"data.quality_threshold must be a number from 0 to 100, got {threshold!r}")
    return threshold


def _earlier_fixes(data: dict[str, Any]) -> int:
    """Return how many fixes the earlier passes applied: none before the first pass is scored."""
    earlier = data.get("fixes_applied", 0) if data.get("score_history") else 0
    if isinstance(earlier, bool) or not isinstance(earlier, int):
        raise ValueError(f"data.fixes_applied must be the number of fixes applied so far, got {earlier!r}")
    return earlier


def _code_lines(code: str) -> int:
    return sum(1 for line in io.StringIO(code, newline="") if line.strip() and not line.lstrip().startswith("#"))


def _score(findings: list[dict[str, Any]], code: str) -> int:
    if any(finding["rule"] in {rule.value for rule in UNPARSED_RULES} for finding in findings):
        return 0
    penalty = sum(SEVERITY_WEIGHT[Severity(finding["severity"])] for finding in findings)
    size = max(MIN_SCORED_LINES, _code_lines(code))
    return round(100 * size / (size + penalty))


def _parsed_functions(code: str) -> list[_Function]:
    try:
        return _Tree.parse(code).functions
    except _UNPARSABLE:
        return []


def _analysis(functions: list[_Function]) -> dict[str, Any]:
    records = [_function_record(function) for function in functions]
    return {"functions": records, "complexity": _complexity_report(functions)}


def _changed(data: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keys whose value differs from `data`, so the run log records real changes."""
    return {key: value for key, value in update.items() if key not in data or data[key] != value}


# ---------------------------------------------------------------------------
# Nodes and condition
# ---------------------------------------------------------------------------
def extract_functions(state: "WorkflowState", ctx: "NodeContext") -> dict[str, Any]:
    """List every function, async function and method of the reviewed code, nested ones included.

    Each entry has `name`, `qualname`, `class_name` (None unless a method), `is_async`, `first_line` (the `def`
    line), `last_line`, `length`, `params` and `has_docstring`. Code that does not parse has no functions.
    """
    _threshold(state.data)  # fail on a bad threshold now rather than after four nodes
    return {"functions": _analysis(_parsed_functions(_reviewed_code(state.data)))["functions"]}


def check_complexity(state: "WorkflowState", ctx: "NodeContext") -> dict[str, Any]:
    """Compute each function's cyclomatic complexity as `radon cc` does, plus the average and the worst function."""
    return {"complexity": _analysis(_parsed_functions(_reviewed_code(state.data)))["complexity"]}


def detect_issues(state: "WorkflowState", ctx: "NodeContext") -> dict[str, Any]:
    """Run every rule on the reviewed code and store the findings, sorted by line.

    On later passes the reviewed code is the improved one, so `functions` and `complexity` are refreshed too.
    """
    # One node call checks a text at most once (duplicate fixes give the same text); no cache outlives the call.
    review = _review(_reviewed_code(state.data), functools.cache(_parses))
    findings = [_finding_record(finding) for finding in review.findings]
    ctx.logger.info("code review found %d issues", len(findings))
    return _changed(state.data, {**_analysis(review.functions), "findings": findings})


def suggest_improvements(state: "WorkflowState", ctx: "NodeContext") -> dict[str, Any]:
    """Suggest what to do about each finding, apply the safe fixes, and store the result in `improved_code`.

    `fixes_applied` counts the fixes of this pass and of every pass before it.
    """
    code = _reviewed_code(state.data)
    parses = functools.cache(_parses)  # _fix checks again texts _review checked; no cache outlives the call
    review = _review(code, parses)
    improved, applied = _fix(code, review)
    suggestions = [_suggestion(finding, was_applied) for finding, was_applied in zip(review.findings, applied)]
    ctx.logger.info("code review applied %d of %d fixes", sum(applied), len(applied))
    fixes_applied = _earlier_fixes(state.data) + sum(applied)
    update = {"suggestions": suggestions, "fixes_applied": fixes_applied, "code_changed": improved != code}
    return update | _changed(state.data, {"improved_code": improved})


def evaluate_quality(state: "WorkflowState", ctx: "NodeContext") -> dict[str, Any]:
    """Score the findings of this pass (0-100), record the score history, and say whether the threshold is met."""
    score = _score(state.data.get("findings", []), _code(state.data))
    history = [*state.data.get("score_history", []), score]
    return {"quality_score": score, "score_history": history, "threshold_met": score >= _threshold(state.data)}


NODES = (extract_functions, check_complexity, detect_issues, suggest_improvements, evaluate_quality)
_ANALYSIS = {"functions": list, "complexity": dict}
NODE_DATA: dict[str, tuple[dict[str, type], dict[str, type]]] = {  # node -> the data keys it reads, and may write
    "extract_functions": ({"code": str}, {"functions": list}),
    "check_complexity": ({"code": str}, {"complexity": dict}),
    "detect_issues": ({"code": str}, {**_ANALYSIS, "findings": list}),
    "suggest_improvements": ({"code": str, "findings": list},
                             {"suggestions": list, "fixes_applied": int, "code_changed": bool, "improved_code": str}),
    "evaluate_quality": ({"code": str, "findings": list},
                         {"quality_score": int, "score_history": list, "threshold_met": bool}),
}


def quality_below_threshold(state: "WorkflowState") -> bool:
    """Tell whether another pass is worth it: score under the threshold, code still changing, passes left."""
    data = state.data
    passes = len(data.get("score_history", []))
    is_below = data.get("quality_score", 0) < _threshold(data)
    return is_below and bool(data.get("code_changed")) and passes < MAX_REVIEW_PASSES


def graph_definition() -> "GraphDefinition":
    """Return the `code_review` graph: five nodes in a row, and a loop back to detect_issues."""
    from workflow_engine import BranchCondition, EdgeDef, GraphDefinition

    loop = BranchCondition(condition=quality_below_threshold.__name__, target=detect_issues.__name__)
    return GraphDefinition(
        graph_id=GRAPH_ID,
        start_node=extract_functions.__name__,
        nodes=tuple(node.__name__ for node in NODES),
        edges={
            **{node.__name__: EdgeDef(default_next=after.__name__) for node, after in itertools.pairwise(NODES)},
            evaluate_quality.__name__: EdgeDef(default_next=None, branches=(loop,)),
        },
        inputs=("code",),
    )


def register(registry: "Registry") -> None:
    """Register the code review nodes, its condition and the `code_review` graph on `registry`."""
    for node in NODES:
        reads, writes = NODE_DATA[node.__name__]
        registry.node(name=node.__name__, reads=reads, writes=writes)(_sized_to_fit(node))
    registry.condition(quality_below_threshold)
    registry.add_graph(graph_definition())


def _sized_to_fit(node: Callable[["WorkflowState", "NodeContext"], dict[str, Any]]) -> Callable[..., Any]:
    """Run `node` on the event loop for small code, where a step takes well under a millisecond and a hop to a
    worker thread and back would cost more than the work; big code goes to a worker thread, so no step blocks the
    server for long."""

    @functools.wraps(node)
    async def sized(state: "WorkflowState", ctx: "NodeContext") -> dict[str, Any]:
        code = state.data.get("improved_code", state.data.get("code"))
        if isinstance(code, str) and len(code) <= INLINE_CODE_CHARS:
            return node(state, ctx)
        return await asyncio.to_thread(node, state, ctx)

    return sized
