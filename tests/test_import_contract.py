"""The import contract between the sides, read from the source (ast), not from what a run happens to load.

host/ (torch) builds bundles, device/ runs them on plain onnxruntime, server/ merges deltas; they share
only edgecl/formats (+ errors.py, progress.py, http_client.py). So: no side imports another, formats imports no side,
and device/, server/ and formats/ never import the host's heavy stack, at module level or inside a
function. Orchestrators that wire the sides together (the demo, the release script, the CLI in cli/)
may import several sides.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SIDES = ("host", "device", "server")
HEAVY = ("torch", "torchvision", "timm", "onnx", "onnxscript", "onnx_ir")  # the host's stack (onnxruntime is not)
ORCHESTRATORS = {"edgecl/demo.py", "edgecl/release.py"}                    # cli/ lives outside edgecl/

# Known violations, each with why it is tolerated and until when. The test fails on an entry that is
# no longer needed, so none can outlive its reason. (Empty: host/apply.py imported edgecl.server.merge
# until the merge moved to edgecl/formats/merge.py.)
ALLOWED: dict[tuple[str, str], str] = {}


def _imports(path: Path, root: Path = REPO) -> list[tuple[str, int]]:
    """Absolute names of every module ``path`` imports (relative imports resolved), with line numbers."""
    package = path.relative_to(root).with_suffix("").parts[:-1]  # a module's (or __init__'s) package
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((name, node.lineno))
            # the names may be modules: `from edgecl import device` imports a side too
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
    return found


def _forbidden(rel: str) -> tuple[tuple[str, ...], bool]:
    """(the edgecl sub-packages ``rel`` may not import, whether the heavy stack is forbidden)."""
    parts = rel.split("/")
    if rel in ORCHESTRATORS:
        return (), False
    if len(parts) == 2:  # edgecl/errors.py, progress.py, http_client.py: shared helpers, like formats
        return SIDES, True
    side = parts[1]
    if side == "formats":
        return SIDES, True
    if side in SIDES:
        return tuple(s for s in SIDES if s != side), side != "host"
    return (), False


def violations(root: Path = REPO) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path in sorted((root / "edgecl").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        sides, no_heavy = _forbidden(rel)
        for name, _ in _imports(path, root):
            parts = name.split(".")
            if parts[0] == "edgecl" and len(parts) > 1 and parts[1] in sides:
                found.add((rel, name))
            elif no_heavy and parts[0] in HEAVY:
                found.add((rel, name))
    return found


def test_no_side_imports_another_and_no_heavy_stack_off_the_host() -> None:
    unexpected = sorted(v for v in violations() if v not in ALLOWED)
    assert not unexpected, "import contract broken (file, imported module):\n" + "\n".join(map(str, unexpected))


def test_every_allowed_violation_still_exists() -> None:
    stale = sorted(set(ALLOWED) - violations())
    assert not stale, f"remove these ALLOWED entries, they are no longer needed: {stale}"


def test_the_checker_sees_relative_function_level_and_package_imports(tmp_path: Path) -> None:
    """The checker on hand-written sources: each way of importing is caught (so the contract test can fail)."""
    (tmp_path / "edgecl" / "device").mkdir(parents=True)
    (tmp_path / "edgecl" / "formats").mkdir()
    probe = tmp_path / "edgecl" / "device" / "probe.py"
    probe.write_text("from ..host import export\n"
                     "from edgecl import server\n"
                     "def f():\n    import torch.nn\n    from .state import open_bundle\n")
    (tmp_path / "edgecl" / "formats" / "__init__.py").write_text("from ..device import infer\nimport onnxruntime\n")
    (tmp_path / "edgecl" / "demo.py").write_text("import torch\nfrom edgecl.host import export\n")
    names = {name for name, _ in _imports(probe, tmp_path)}
    assert {"edgecl.host.export", "edgecl.host", "edgecl.server", "torch.nn", "edgecl.device.state"} <= names
    assert violations(tmp_path) == {
        ("edgecl/device/probe.py", "edgecl.host"), ("edgecl/device/probe.py", "edgecl.host.export"),
        ("edgecl/device/probe.py", "edgecl.server"), ("edgecl/device/probe.py", "torch.nn"),
        ("edgecl/formats/__init__.py", "edgecl.device"), ("edgecl/formats/__init__.py", "edgecl.device.infer")}


def test_the_shared_http_client_needs_only_the_stdlib() -> None:
    """device (push, pull), the release and the CLI all use edgecl/http_client.py: it may import no
    side and nothing a device does not already install (stdlib + edgecl.errors)."""
    import sys

    names = {name.split(".")[0] if not name.startswith("edgecl.") else name
             for name, _ in _imports(REPO / "edgecl" / "http_client.py")}
    outside = {n for n in names if n not in sys.stdlib_module_names and n != "__future__"}
    assert outside <= {"edgecl.errors", "edgecl.errors.EdgeclError"}, outside
