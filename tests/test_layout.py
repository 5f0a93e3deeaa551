"""The house rules of shared/DESIGN.md, checked on the code itself: no import cycles, no layer
importing a higher one (runtime < export, runtime < app), the passes and the quantizer free of
torch and onnxscript, and `llamaonnx --help` free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "export", "app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> list[tuple[list[str], bool]]:
    """(what one imported name may be, at module level?) for every import of one file: for
    `from X import a`, the module X.a if there is one, else X; relative imports resolved."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [[a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [[f"{base}.{a.name}", base] for a in node.names]
        else:
            continue
        out += [(n, id(node) in top) for n in names if n[0].split(".")[0] in PACKAGES]
    return out


def _graph() -> tuple[set[str], dict[str, set[str]], dict[str, set[str]]]:
    """Project modules, their module-level imports, and all their imports (lazy ones too)."""
    files = {
        _module_name(p): p
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    eager: dict[str, set[str]] = {m: set() for m in files}
    every: dict[str, set[str]] = {m: set() for m in files}
    for m, p in files.items():
        for candidates, at_top in _imports(p, m):
            target = next((c for c in candidates if c in files), None)
            if target is not None and target != m:
                every[m].add(target)
                if at_top:
                    eager[m].add(target)
    return set(files), eager, every


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles_among_the_modules():
    modules, eager, every = _graph()
    assert len(modules) > 40  # the scan found the project
    assert _cycle(eager) is None, f"import cycle at module level: {_cycle(eager)}"
    assert _cycle(every) is None, (
        f"import cycle, counting imports inside functions: {_cycle(every)}"
    )


def test_no_layer_imports_a_higher_one():
    _, _, every = _graph()
    higher = {"runtime": ("export", "app"), "app": ("export",), "export": ("app",)}
    upward = [
        f"{m} → {n}"
        for m, targets in every.items()
        for n in targets
        if n.split(".")[0] in higher[m.split(".")[0]]
    ]
    assert upward == []


def _fresh(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_passes_and_quantizer_run_without_torch_or_onnxscript(tiny_folders, tmp_path):
    code = f"""
import sys, onnx
from export.passes import lower
from export.quant import QuantSettings, quantize_folder
lower(onnx.load({str(tiny_folders["portable"] / "model.onnx")!r}), "ort")
for precision in ("int4", "int8", "fp16"):
    quantize_folder({str(tiny_folders["ort"])!r}, {str(tmp_path)!r} + "/" + precision,
                    QuantSettings(precision), verify=False)
print(sorted(m for m in ("torch", "onnxscript") if m in sys.modules))
"""
    assert _fresh(code) == "[]"


def test_help_is_instant_and_imports_no_torch():
    code = """
import sys, contextlib, io
from runtime.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main(["--help"])
assert "export" in out.getvalue() and "generate" in out.getvalue()
print(sorted(m for m in ("torch", "onnxscript", "onnx", "gradio") if m in sys.modules))
"""
    assert _fresh(code) == "[]"


def test_a_source_checkout_finds_every_command_without_installing(monkeypatch):
    """python -m runtime.cli in a checkout that was never installed (the GPU machine's way):
    the entry points come from pyproject.toml."""
    import importlib.metadata

    from runtime import plugins
    from runtime.cli import build_parser

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert plugins.declared("llamaonnx.bench_engines") == {
        "torch": "export.bench_torch:TorchEngine"
    }
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"export", "quantize", "verify", "app", "generate", "bench", "table"} <= set(commands)
