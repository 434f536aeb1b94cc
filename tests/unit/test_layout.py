"""The package's imports run one way: no module of finetune imports, directly or through others, a module that
imports it back, counting the imports inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "finetune"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the finetune modules it imports anywhere in its body."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("finetune"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("finetune"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_lazy_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package() -> None:
    graph = import_graph()
    assert "finetune.report.hydra_callback" in graph and "finetune.report.compare" in graph["finetune.report.hydra_callback"]
    assert cycles(graph) == []


# The layers, lowest first: a module imports only its own layer and those below it.
LAYERS = [
    ("finetune.config", "finetune.checks", "finetune.formats", "finetune.runs", "finetune.errors", "finetune.metrics",
     "finetune.platform"),  # contracts, services
    ("finetune.model", "finetune.data", "finetune.qat"),  # components
    ("finetune.evaluation", "finetune.export", "finetune.report"),  # what uses a model or a finished run
    ("finetune.training",),  # the stages of a run
    ("finetune.cli",),  # entrypoints
]


def layer_of(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_every_module_has_a_layer() -> None:
    assert [m for m in import_graph() if m != "finetune" and layer_of(m) is None] == []


def test_imports_run_one_way_down_the_layers() -> None:
    graph = import_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m))
    assert upward == []
    assert layer_of("finetune.cli.train") > layer_of("finetune.training.stages") > layer_of("finetune.model.load")


def _string_literals(tree: ast.Module) -> list[str]:
    """The string constants of a module that are not docstrings."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


# Each vocabulary word, and the modules that may spell it: adding a word of its kind touches those files only.
OWNERS = {
    # QAT target groups: named in config, mapped to every family's modules in the architecture table; "attn" is
    # also the name of a LoRA target preset.
    "ffn": {"finetune.config", "finetune.config.qat", "finetune.model.arch"},
    "attn": {"finetune.config", "finetune.config.qat", "finetune.model.arch", "finetune.model.lora"},
    # weight-quantization backends: named and checked in config, built in model/load.py; finetune-chat accepts
    # the Hugging Face flag load_in_4bit as a spelling of nf4.
    "nf4": {"finetune.config", "finetune.model.load", "finetune.cli.chat"},
    # dataset formats: one module each; sources.py serves the embedded ChnSentiCorp corpus to labelled_text only.
    "sharegpt": {"finetune.formats", "finetune.formats.sharegpt"},
    "alpaca": {"finetune.formats", "finetune.formats.alpaca"},
    "labelled_text": {"finetune.formats", "finetune.formats.labelled_text", "finetune.data.sources"},
}


def test_a_new_vocabulary_word_is_spelt_by_its_owners_only() -> None:
    spelt: dict[str, set[str]] = {word: set() for word in OWNERS}
    for name, tree in _modules().items():
        for literal in _string_literals(tree):
            if literal in spelt:
                spelt[literal].add(name)
    assert {w: sorted(m - OWNERS[w]) for w, m in spelt.items() if m - OWNERS[w]} == {}
    assert all(spelt[w] for w in OWNERS)  # the owners do spell them (the check looks at the right thing)


# The house's limits: a module of one concern (~400 lines), a function that reads at once (~60 lines; none past 75),
# and the package's top level kept to the contracts every layer shares (config, checks, metrics, runs, errors): any
# other concern gets a subpackage.
MAX_MODULE_LINES, MAX_FUNCTION_LINES, TOP_LEVEL = 400, 75, {"config", "checks", "metrics", "runs", "errors"}


def house_problems(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(root.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            problems.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    top = {p.stem for p in root.glob("*.py")} - {"__init__"}
    problems += [f"{root.name}/{m}.py: a top-level module outside the shared contracts" for m in sorted(top - TOP_LEVEL)]
    return problems


def test_the_house_limits_hold() -> None:
    assert house_problems() == []


def test_the_house_check_finds_a_long_function_a_long_module_and_a_new_top_level_module(tmp_path) -> None:
    pkg = tmp_path / "finetune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "config.py").write_text("def f():\n" + "    x = 1\n" * 80)
    (pkg / "sub" / "big.py").write_text("x = 1\n" * 401)
    (pkg / "helpers.py").write_text("")
    assert house_problems(pkg) == ["finetune/config.py:1 f: 81 lines", "finetune/sub/big.py: 401 lines",
                                   "finetune/helpers.py: a top-level module outside the shared contracts"]
