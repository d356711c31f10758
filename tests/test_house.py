"""The house rules, checked on the tree itself: imports point one way and never round a circle, every
on-disk name and crop default is written once (schemas.layout, schemas.crop), functions stay small."""
import ast
from pathlib import Path

from conftest import REPO
from schemas import crop, layout

CODE = ("shell", "schemas", "photos", "trainer", "spark_jobs", "faceage", "bench")


def _files(*packages):
    return [p for package in packages for p in sorted((REPO / package).glob("*.py"))]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


PACKAGES = CODE  # each imports only those before it


def test_imports_point_one_way():
    """shell imports nothing of the project; schemas only shell; photos neither trainer nor spark_jobs;
    trainer never spark_jobs; nothing imports bench."""
    for i, package in enumerate(PACKAGES):
        forbidden = PACKAGES[i + 1:]
        for path in sorted((REPO / package).glob("*.py")):
            bad = [m for m in _imports(path) if m.split(".")[0] in forbidden]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def _module_graph():
    """{module: the project modules it imports anywhere in its file (function-local imports too)}."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for package in PACKAGES for p in (REPO / package).glob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # from schemas import layout
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _circles(graph):
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_round_a_circle():
    """No circle of imports between modules, counting imports inside functions: a circle hidden by a local
    import still means neither module can be read (or loaded) without the other."""
    graph = _module_graph()
    assert "shell.outputs" in graph["schemas.layout"] and "trainer.model" in graph["trainer.bundle"]  # it sees
    assert _circles(graph) == []
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # and would see one


# ============================================================================ each name once

def _layout_names():
    """{value: NAME} of schemas.layout's file and folder names that only ever mean a path: the ones with a dot
    or a leading underscore (plain words such as faces or predictions are also JSON keys of the manifests)."""
    tree = ast.parse((REPO / "schemas" / "layout.py").read_text())
    defined = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
               if isinstance(t, ast.Name)}
    return {v: k for k, v in vars(layout).items() if k in defined and k.isupper() and isinstance(v, str)
            and ("." in v or v.startswith("_") or k == "TENSORBOARD")}


def _string_constants(path: Path):
    """(value, line) of every string constant in `path`'s code: not docstrings, not f-string pieces."""
    tree = ast.parse(path.read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inside.update(id(n) for n in ast.walk(node))
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            inside.add(id(node.body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside:
            yield node.value, node.lineno


def test_every_layout_name_is_written_once():
    names = _layout_names()
    assert {"score_manifest.json", "summary.json", "model.pt", "metrics.jsonl", "_runs"} <= set(names)
    found = [f"{path.relative_to(REPO)}:{line} {value!r} (use layout.{names[value]})"
             for path in _files(*CODE) if path != REPO / "schemas" / "layout.py"
             for value, line in _string_constants(path) if value in names]
    assert found == []


SIZE_FLAGS = ("--size", "--image-size", "--start-size")


def _size_numbers(path: Path):
    """(line, code) of each place in `path` that writes the crop range (16 and 1024 in one call) or the crop
    default (128 as the default of a size flag, or as the value of a *size name other than batch_size)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            default = [k.value.value for k in node.keywords if k.arg == "default" and isinstance(k.value, ast.Constant)]
            if set(crop.SIZE_RANGE) <= set(args) or (set(args) & set(SIZE_FLAGS) and crop.DEFAULT_SIZE in default):
                yield node.lineno, ast.unparse(node)[:80]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if node.value.value == crop.DEFAULT_SIZE and any(n.endswith("size") and "batch" not in n for n in names):
                yield node.lineno, ast.unparse(node)[:80]


def test_the_crop_size_default_and_range_are_written_once():
    """128 (the default crop side) and 16..1024 (its range) appear in schemas.crop only; every size flag
    takes crop.pixel_size, every default crop.DEFAULT_SIZE."""
    assert crop.DEFAULT_SIZE == crop.CropSettings().size and crop.SIZE_RANGE[0] < crop.DEFAULT_SIZE
    found = [f"{path.relative_to(REPO)}:{line} {code}" for path in _files("shell", "schemas", "photos", "trainer", "spark_jobs", "faceage")
             if path != REPO / "schemas" / "crop.py" for line, code in _size_numbers(path)]
    assert found == []


# ============================================================================ small functions

MAX_LINES, MAX_PARAMETERS = 60, 7


def _long_functions(files):
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [p for p in (a.vararg, a.kwarg) if p]
                params = [p for p in params if p.arg not in ("self", "cls")]
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES or len(params) > MAX_PARAMETERS:
                    yield f"{path.name}:{node.lineno} {node.name}: {lines} lines, {len(params)} parameters"


def test_no_function_is_longer_than_60_lines_or_takes_more_than_7_parameters(tmp_path):
    """In shell/, schemas/, photos/, trainer/, spark_jobs/ and faceage/: a function that grows past either is split, or its
    parameters become one object (trainer.train.RunState, spark_jobs.prepare.PrepareRun, ...)."""
    assert list(_long_functions(_files("shell", "schemas", "photos", "trainer", "spark_jobs", "faceage"))) == []
    sample = tmp_path / "sample.py"  # and the rule sees both kinds
    sample.write_text("def wide(a, b, c, d, e, f, g, h):\n    pass\n\n\ndef long(self):\n" + "    x = 1\n" * 60)
    assert [line.split(" ")[1] for line in _long_functions([sample])] == ["wide:", "long:"]


# ============================================================================ docs name what exists

def _exported(package: str) -> set:
    """The names a package's __init__.py defines or imports (faceage.Estimator is a name, not a module)."""
    init = REPO / package / "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(init.read_text())) if init.exists() else ():
        if isinstance(node, (ast.ImportFrom, ast.Import)):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def test_the_docs_name_only_modules_that_exist():
    """README.md, BENCHMARKS.md and docs/*.md: every `package.module` and `package/module.py` they name is a
    file of the tree (a module renamed or moved is renamed in the docs too)."""
    import re

    named = re.compile(r"\b(" + "|".join(CODE) + r")([./])([A-Za-z_]\w*)(\.py)?")
    missing = []
    for doc in [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]:
        for m in named.finditer(doc.read_text()):
            package, sep, name, py = m.groups()
            if sep == "/" and not py:
                continue  # a folder or a file of another kind (bench/README.md, spark_jobs/log4j2.properties)
            if not (REPO / package / f"{name}.py").exists() and not (REPO / package / name).is_dir() \
                    and name not in _exported(package):
                missing.append(f"{doc.name}: {m.group(0)}")
    assert missing == []
