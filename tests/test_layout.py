"""The package's shape: its import graph has no circles, counting imports inside
functions (those under ``if TYPE_CHECKING:`` are for type checkers only) and the
subpackages' ``__init__`` modules a submodule import runs; at most 8 modules at the top,
no class over 250 lines."""
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).parents[1] / "spacy_m3el"


def module_names() -> Dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def runtime_imports(tree: ast.AST) -> List[ast.AST]:
    """Import nodes, leaving out the bodies of ``if TYPE_CHECKING:``."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = module_names()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                target = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
                targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                           for alias in node.names]
            else:
                targets = [alias.name for alias in node.names]
            # Importing a submodule first runs its packages' __init__ modules (the
            # top package's re-exports are left out: every module would sit in a circle with them).
            # A module's own packages are running already when it is imported.
            packages = {t.rsplit(".", i)[0] for t in targets for i in range(1, t.count("."))}
            packages = {p for p in packages if not name.startswith(p + ".")}
            graph[name] |= {t for t in {*targets, *packages} if t in modules and t != name}
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert "spacy_m3el.pipeline.linker" in graph["spacy_m3el.evaluation.end_to_end"]  # it sees real imports
    assert "spacy_m3el.kb" in graph["spacy_m3el.kb.changes"] or "spacy_m3el.kb" in graph["spacy_m3el.index.encoding"]
    assert circles(graph) == []


def test_the_top_holds_at_most_eight_modules():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_no_class_is_longer_than_250_lines():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250:
                long[f"{path.relative_to(PACKAGE)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}


def test_the_readme_map_names_every_folder_and_only_modules_that_exist():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Architecture\n", 1)[1].split("\nThe model, part by part:", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)/` \| (.*)$", section, re.M)}
    folders = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert set(rows) == folders
    for folder, row in rows.items():
        for module in re.findall(r"`(\w+)\.py`", row):
            assert (PACKAGE / folder / f"{module}.py").is_file(), f"{folder}/{module}.py"
    top = re.search(r"^\| top \| (.*)$", section, re.M).group(1)
    named = set(re.findall(r"`(\w+)\.py`", top))
    assert named == {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
