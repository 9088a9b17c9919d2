"""The module graph of the package has no circle and no arrow up the stages (docs/architecture.md).

Every `import` and `from ... import` inside `src/mixsd`, at module level or inside a function, is an arrow
from the importing module to the imported one; the graph must be acyclic, so each module can be read
knowing only the modules below it. The stage folders are layered: core < method < corpora < training,
evaluation, editing < experiments (< the package's own `__init__` and `cli`); a module imports its own
folder and the folders below, never one above, and a folder of the same layer only where declared.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mixsd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports (a name imported from a package counts as its submodule
    when there is one: `from mixsd.corpora import probes` is an arrow to mixsd.corpora.probes)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {m for m in found if m in modules and m != name and m != "mixsd"}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that returns to its start, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    # a module-level import, a lazy one inside a function, and a submodule imported from its package
    assert "mixsd.training.sft" in graph["mixsd.training.opsd"]
    assert "mixsd.experiments.report" in graph["mixsd.experiments.experiment"]
    assert "mixsd.corpora.probes" in graph["mixsd.evaluation.evaluate"]


@pytest.mark.parametrize("module", ["mixsd.evaluation.evaluate", "mixsd.training.train"])
def test_commands_are_not_imported_by_library_modules(module):
    importers = sorted(name for name, targets in import_graph().items() if module in targets)
    assert importers in ([], ["mixsd.experiments.experiment"]), importers


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# --------------------------------------------------------------------------------------------------
# Layers: the folders show the pipeline, and arrows point down it
# --------------------------------------------------------------------------------------------------
LAYERS = {
    "core": 0,  # files, stages, options, the model loader, answers, records, statistics
    "method": 1,  # the decoder and the targets
    "corpora": 2,  # corpus and probe builders: they ask models the method's way, never evaluation's
    "training": 3,
    "evaluation": 3,
    "editing": 3,
    "experiments": 4,  # the grid, its results and the report
    "": 5,  # mixsd/__init__.py and mixsd/cli.py, which name every command
}
# arrows between folders of one layer, each with its reason
SAME_LAYER_ARROWS = {
    ("training", "evaluation"): "the learning curve scores the retention probes as `mixsd eval` does",
}


def folder_of(module: str) -> str:
    """The stage folder of `mixsd.<folder>.<module>` ("" for the package's top-level modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Arrows to a folder above the importer's, or to a folder of its layer that is not declared."""
    found = []
    for module, targets in sorted(graph.items()):
        here = folder_of(module)
        for target in sorted(targets):
            there = folder_of(target)
            if there == here:
                continue
            if LAYERS[there] > LAYERS[here] or (
                LAYERS[there] == LAYERS[here] and (here, there) not in SAME_LAYER_ARROWS
            ):
                found.append(f"{module} ({here or 'top'}) -> {target} ({there or 'top'})")
    return found


def test_every_module_sits_in_a_layered_folder():
    graph = import_graph()
    assert {folder_of(m) for m in graph} == set(LAYERS)
    top = sorted(m for m in graph if folder_of(m) == "")
    assert top == ["mixsd", "mixsd.cli"] and len(list(PACKAGE.glob("*.py"))) <= 8


def test_the_layer_check_sees_an_upward_arrow():
    graph = {
        "mixsd.core.files": set(),
        "mixsd.method.targets": {"mixsd.core.files"},
        "mixsd.corpora.probes": {"mixsd.evaluation.scoring", "mixsd.method.targets"},
        "mixsd.evaluation.scoring": {"mixsd.training.curve"},
        "mixsd.training.curve": {"mixsd.evaluation.scoring"},
        "mixsd.cli": {"mixsd.experiments.report"},
    }
    assert upward_arrows(graph) == [
        "mixsd.corpora.probes (corpora) -> mixsd.evaluation.scoring (evaluation)",
        "mixsd.evaluation.scoring (evaluation) -> mixsd.training.curve (training)",
    ]


def test_no_module_imports_a_folder_above_its_own():
    arrows = upward_arrows(import_graph())
    assert not arrows, "upward imports:\n" + "\n".join(arrows)


# --------------------------------------------------------------------------------------------------
# The report only draws (issue 22 step 2): the results side computes what it shows and writes it as JSON
# beside results.jsonl (mixsd.experiments.report_data); the drawing modules read those files, never a cell's own.
# --------------------------------------------------------------------------------------------------
DRAWING_MODULES = ("experiments/report.py", "experiments/report_figures.py", "experiments/report_sections.py")
# files only a cell's folder holds (a suffix match also catches "train/curve.jsonl", "eval.predictions.jsonl")
CELL_FILES = (
    "cell.json",
    "eval.json",
    "predictions.jsonl",
    "retention.json",
    "nll.json",
    "fisher.json",
    "curve.jsonl",
    "summary.json",
    "stage.json",
    "targets.jsonl",
)
# the path parts that lead into a cell's folder: OUT/cells/<cell>/train/...
CELL_PATH_PARTS = {"cells", "train"}
# the modules that compute from the cells what the report shows, and the curve module that writes a
# cell's curve: a drawing module reads their output files instead of importing them
COMPUTING_MODULES = {
    "mixsd.experiments.comparisons",
    "mixsd.experiments.correlations",
    "mixsd.training.curve",
    "mixsd.evaluation.forgetting",
    "mixsd.experiments.grid_summary",
    "mixsd.experiments.report_data",
    "mixsd.method.target_accounting",
    "mixsd.experiments.target_nll",
    "mixsd.experiments.tuning",
}


def cell_file_reads(path: Path, imports: set[str]) -> list[str]:
    """What in a module reaches a cell's files: a string naming a cell file, a path built with a cell
    folder's part (`x / "cells"`), a variable or parameter holding a cell folder, or an import of a
    module that computes from the cells (`imports`: the package modules it imports)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.endswith(CELL_FILES):
                found.append(f"line {node.lineno}: names the cell file {node.value!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in CELL_PATH_PARTS:
                    found.append(f"line {node.lineno}: builds a path into {side.value!r}")
        elif isinstance(node, ast.arg | ast.Name):
            name = node.arg if isinstance(node, ast.arg) else node.id
            if "cell_dir" in name or "cells_dir" in name:
                found.append(f"line {node.lineno}: holds a cell folder ({name})")
    found += [f"imports {m}, which computes from the cells" for m in sorted(imports & COMPUTING_MODULES)]
    return found


def test_the_report_reads_no_cell_file():
    graph = import_graph()
    drawing = [PACKAGE / name for name in DRAWING_MODULES if (PACKAGE / name).is_file()]
    assert PACKAGE / "experiments" / "report.py" in drawing
    reads = {path.name: cell_file_reads(path, graph[module_name(path)]) for path in drawing}
    assert not any(reads.values()), reads


def test_the_cell_file_check_sees_each_way_in(tmp_path):
    module = tmp_path / "drawing.py"
    module.write_text(
        "from pathlib import Path\n"
        "def figure(out: Path, cells_dir: Path, row: dict) -> None:\n"
        "    (out / 'cells' / row['cell'] / 'nll.json').read_text()\n"
        "    print(row['cells'])  # a key named cells is not a path\n"
    )
    reads = cell_file_reads(module, {"mixsd.experiments.tuning", "mixsd.experiments.results"})
    assert reads == [
        "line 2: holds a cell folder (cells_dir)",
        "line 3: names the cell file 'nll.json'",
        "line 3: builds a path into 'cells'",
        "imports mixsd.experiments.tuning, which computes from the cells",
    ]


def function_level_imports(path: Path) -> list[int]:
    """Lines of the imports inside a function or class of a module (a TYPE_CHECKING block counts too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.If)]
    return sorted(
        {
            node.lineno
            for scope in nested
            for node in ast.walk(scope)
            if isinstance(node, ast.Import | ast.ImportFrom)
        }
    )


def test_function_level_imports_stay_few():
    """Imports inside functions protect a heavy or optional dependency (torch, transformers, lm_eval, peft,
    matplotlib, gguf) from the commands that do not need it; issue 22 allows at most 40 in the package."""
    found = {p: lines for p in sorted(PACKAGE.rglob("*.py")) if (lines := function_level_imports(p))}
    assert sum(len(lines) for lines in found.values()) <= 40, {p.name: lines for p, lines in found.items()}
