"""The house's structure, checked from the code's own imports (static, from the AST)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "exporters", "robustness", "benchmarks")


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                target = resolve(name)
                if target and target != mod:
                    edges[mod].add(target)
    return edges


def _is_cli(mod: str) -> bool:
    return mod.split(".")[-1] in ("cli", "__main__") or ".cli." in mod + "."


def test_no_import_cycles() -> None:
    edges = _graph()
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, cycles


def test_no_library_module_imports_a_cli_module() -> None:
    bad = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets if _is_cli(b) and not _is_cli(a)]
    assert not bad, bad


def test_the_core_imports_no_ray_http_or_torch() -> None:
    for path in (ROOT / "service" / "core").rglob("*.py"):
        text = path.read_text()
        for banned in ("ray", "starlette", "httpx", "torch", "service.catalog", "service.dataplane"):
            assert not re.search(rf"^\s*(from|import) {re.escape(banned)}\b", text, re.M), f"{path.name} imports {banned}"


def test_the_readme_code_map_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Code map"):readme.index("## Command line")]
    for mod, path in _modules().items():
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or path.name == "__main__.py":
            continue
        folder = rel.rsplit("/", 1)[0] + "/"
        stem = path.stem
        listed = f"`{rel}`" in section or (f"`{folder}`" in section and re.search(rf"\b{stem}\b", section))
        assert listed, f"{rel} is missing from the README's code map"
