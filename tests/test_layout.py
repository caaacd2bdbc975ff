"""The package's layout rules, read from its source (ast, nothing imported): SGLang's names come in
through the compat module only, and the pipeline's folders import without cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sgl_longspec"
COMPAT = PACKAGE / "adapter" / "sglang_compat.py"


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the runtime package (the sgl_kernel shim is a
    stand-in for another distribution and is not part of it)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "_shim" in rel.parts:
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in the file, function-level ones and
    importlib.import_module("...") with a literal name included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return found


def test_sglang_is_imported_by_the_compat_module_only():
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {mod}"
                 for path in package_modules().values() if path != COMPAT
                 for mod, line in imported_modules(path)
                 if mod == "sglang" or mod.startswith("sglang.")]
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_an_sglang_import(tmp_path):
    """The checker itself: a module-level, a function-level and an importlib import are found."""
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom sglang.srt import x\n\ndef g():\n    import sglang.srt.y\n"
                 "    importlib.import_module('sglang.z')\n")
    mods = [m for m, _ in imported_modules(f) if m.startswith("sglang")]
    assert {"sglang.srt", "sglang.srt.y", "sglang.z"} <= set(mods)


def test_no_import_cycle_between_modules():
    """Module-level imports between the package's modules form no cycle (imports inside functions
    are deferred on purpose and left out)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {n for n in names if n in modules and n != name}
        graph[name] = deps
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


# The stages that run without an engine: they may import each other and the options, never the
# SGLang side (adapter, attention backends) or the offline tools.
ENGINE_INDEPENDENT = ("sgl_longspec.step", "sgl_longspec.drafters", "sgl_longspec.verify",
                      "sgl_longspec.config")
ENGINE_SIDE = ("sgl_longspec.adapter", "sgl_longspec.attention", "sgl_longspec.tools",
               "sgl_longspec.training")
MAX_MODULE_LINES = 450  # a module a reader can hold at once (issue 27's target)


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_engine_independent_stages_do_not_import_the_engine_side():
    offenders = [f"{name}:{line} imports {mod}"
                 for name, path in package_modules().items() if _under(name, ENGINE_INDEPENDENT)
                 for mod, line in imported_modules(path) if _under(mod, ENGINE_SIDE)]
    assert not offenders, "\n".join(offenders)


def test_no_module_is_longer_than_a_reader_holds():
    long = {name: n for name, path in package_modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_the_package_tests_do_not_import_the_benchmarks():
    """The benchmark harnesses' own tests live in benchmarks/tests."""
    tests = Path(__file__).resolve().parent
    offenders = [f"{path.name}:{line} imports {mod}" for path in sorted(tests.glob("*.py"))
                 for mod, line in imported_modules(path) if _under(mod, ("benchmarks",))]
    assert not offenders, "\n".join(offenders)
