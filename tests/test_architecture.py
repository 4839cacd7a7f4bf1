"""The floor plan holds: modules import one way, and every config key is read somewhere.

Both tests read the source (``ast``), function-level imports included, so a cycle or an
upward import hidden inside a function is found too.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from unisrec.jobs import JOB_CONFIGS, config_class

ROOT = Path(__file__).resolve().parents[1]
# Layers, lowest first: a module may import its own layer and the layers below it. unisrec/
# is the foundations (config, errors, tags, runtime, tracking); the top, recipes/, is the
# command line and the demo, which nothing imports.
LAYERS = "unisrec sharding pretrain adaptors serving cluster experiments recipes".split()


def _modules() -> dict[str, Path]:
    mods = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The project module an imported name lives in (``a.b.c`` -> ``a.b`` if c is a symbol)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(_owner(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.update(_owner(f"{base}.{a.name}") or _owner(base) for a in node.names)
    found.discard(None)
    found.discard(module)
    # A submodule importing its own package's __init__ is not a dependency cycle.
    return {m for m in found if not module.startswith(m + ".")}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_no_module_imports_a_module_that_imports_it_back():
    graph = {m: _imports(m) for m in MODULES}
    cycles = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in graph[m]:
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    upward = [
        f"{m} ({LAYERS[_layer(m)]}) imports {dep} ({LAYERS[_layer(dep)]})"
        for m in sorted(MODULES)
        for dep in sorted(_imports(m))
        if _layer(dep) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_the_cli_and_demo_are_imported_by_nothing():
    top = LAYERS.index("recipes")
    importers = [
        f"{m} imports {dep}"
        for m in MODULES
        if _layer(m) != top
        for dep in _imports(m)
        if _layer(dep) == top
    ]
    assert not importers, importers


# ---- every config field is read -----------------------------------------------------------
# A field counts as read where the code reads it *through its own config type*: as
# ``<x>.<holder>.<field>`` (holder: a config field or class attribute of that type, e.g.
# ``cfg.loss.lam``, ``self.cfg.max_seq_len``), as ``<p>.<field>`` for a parameter ``p``
# annotated with the type, or as ``self.<field>`` in the type's own methods. Reads inside
# ``validate`` methods do not count: checking a value is not using it.


def _config_types() -> dict[type, set[str]]:
    """Every config dataclass reachable from a job config -> names of the fields holding it."""
    holders: dict[type, set[str]] = {}

    def walk(cls: type) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for t in (hints[f.name], *typing.get_args(hints[f.name])):
                if dataclasses.is_dataclass(t):
                    known = t in holders
                    holders.setdefault(t, set()).add(f.name)
                    if not known:
                        walk(t)

    for job in JOB_CONFIGS:
        root = config_class(job)
        holders.setdefault(root, {"cfg"})
        walk(root)
    return holders


def _annotation_names(node: ast.AST | None) -> set[str]:
    """Class names an annotation mentions (``X``, ``X | None``, ``"X"``, ``list[X]``)."""
    if node is None:
        return set()
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {part.strip() for part in node.value.replace("|", " ").split()}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def _types_of(expr: ast.AST, names, holder_of, typed) -> set[str]:
    """Config class names an expression evaluates to (or holds items of)."""
    if isinstance(expr, ast.Name):
        return set(typed.get(expr.id, ()))
    if isinstance(expr, ast.Attribute):
        return set(holder_of.get(expr.attr, ()))
    if isinstance(expr, ast.Call):
        func = expr.func.id if isinstance(expr.func, ast.Name) else getattr(expr.func, "attr", "")
        if func in names:
            return {func}
        if expr.args and isinstance(expr.args[0], ast.Name) and expr.args[0].id in names:
            return {expr.args[0].id}  # from_dict(C, ...), load_config(C, ...)
        if func == "get" and isinstance(expr.func, ast.Attribute):
            return _types_of(expr.func.value, names, holder_of, typed)
    if isinstance(expr, ast.ListComp | ast.GeneratorExp):
        return _types_of(expr.elt, names, holder_of, typed)
    if isinstance(expr, ast.DictComp):
        return _types_of(expr.value, names, holder_of, typed)
    if isinstance(expr, ast.IfExp):
        return _types_of(expr.body, names, holder_of, typed) | _types_of(
            expr.orelse, names, holder_of, typed
        )
    if isinstance(expr, ast.List | ast.Tuple):
        return set().union(*(_types_of(e, names, holder_of, typed) for e in expr.elts))
    return set()


def _typed_names(fn: ast.AST, names, holder_of) -> dict[str, set[str]]:
    """Names inside ``fn`` bound to config objects: annotated parameters, assignments from
    a config expression, loop variables over one (two passes, so chains resolve)."""
    args = fn.args.args + fn.args.kwonlyargs + fn.args.posonlyargs
    typed = {a.arg: _annotation_names(a.annotation) & names for a in args}
    for _ in range(2):
        for n in ast.walk(fn):
            if isinstance(n, ast.Assign) and len(n.targets) == 1:
                target, value = n.targets[0], n.value
            elif isinstance(n, ast.For | ast.comprehension):
                target, value = n.target, n.iter
            else:
                continue
            if isinstance(target, ast.Name):
                found = _types_of(value, names, holder_of, typed)
                if found:
                    typed.setdefault(target.id, set()).update(found)
    return typed


def _reads_by_type(types: dict[type, set[str]]) -> dict[str, set[str]]:
    """Config class name -> the field names read through that type (rules above)."""
    by_name = {t.__name__: holders for t, holders in types.items()}
    holder_of: dict[str, set[str]] = {}  # attribute name -> config class names it holds
    for cls_name, holders in by_name.items():
        for h in holders:
            holder_of.setdefault(h, set()).add(cls_name)
    trees = [ast.parse(p.read_text(encoding="utf-8")) for p in MODULES.values()]
    for tree in trees:  # class-level annotations such as ``cfg: BackboneConfig``
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                for cls_name in _annotation_names(node.annotation) & by_name.keys():
                    holder_of.setdefault(node.target.id, set()).add(cls_name)
    reads: dict[str, set[str]] = {name: set() for name in by_name}
    for tree in trees:
        skip = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name == "validate"
            for n in ast.walk(f)
        }
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            if cls.name in by_name:
                for n in ast.walk(cls):
                    if isinstance(n, ast.Attribute) and id(n) not in skip:
                        if isinstance(n.value, ast.Name) and n.value.id == "self":
                            reads[cls.name].add(n.attr)
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.Lambda)):
            typed = _typed_names(fn, by_name.keys(), holder_of)
            for n in ast.walk(fn):
                if not isinstance(n, ast.Attribute) or id(n) in skip:
                    continue
                if isinstance(n.value, ast.Name):
                    for cls_name in typed.get(n.value.id, ()):
                        reads[cls_name].add(n.attr)
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and id(n) not in skip:
                if isinstance(n.value, ast.Attribute):
                    for cls_name in holder_of.get(n.value.attr, ()):
                        reads[cls_name].add(n.attr)
    return reads


_TYPES = _config_types()
_READS = _reads_by_type(_TYPES)
_FIELDS = sorted(
    (f"{cls.__name__}.{f.name}", cls.__name__, f.name)
    for cls in _TYPES
    for f in dataclasses.fields(cls)
)


@pytest.mark.parametrize("key,cls_name,field", _FIELDS, ids=[k for k, _, _ in _FIELDS])
def test_config_field_is_read_by_the_code(key, cls_name, field):
    assert field in _READS[cls_name], f"{key} is accepted but nothing reads it"
