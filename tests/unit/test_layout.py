"""The repository layout and the dependency rule between device, guest and host."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPS = {"device": "gemu.device", "guest": "gemu.guest", "host": "gemu.host"}


def _modules(top: str):
    for path in sorted((ROOT / top).rglob("*.py")):
        rel = path.relative_to(ROOT / top).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield path, ".".join([TOPS[top], *parts])


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
                out.add(name)
                if node.module is None:
                    out.update(f"{name}.{a.name}" for a in node.names)
            else:
                out.add(node.module or "")
    return out


def test_every_package_is_listed_in_pyproject():
    """Each folder with an __init__.py under device/, guest/ and host/ is a listed package,
    so a wheel (not only an editable install) carries all of gemu."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for top, pkg in TOPS.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join([pkg, *rel]))
    assert found == listed, (
        f"pyproject packages differ: missing {found - listed}, stale {listed - found}"
    )


def test_guest_imports_only_the_published_device_interface():
    """The guest model is a driver: it may use gemu.device.abi (the hardware header) and
    nothing else of the device, and nothing of the host."""
    bad = []
    for path, mod in _modules("guest"):
        for imp in _imports(path, mod):
            if imp.startswith("gemu.host") or (
                imp.startswith("gemu.device") and not imp.startswith("gemu.device.abi")
            ):
                bad.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert not bad, "\n".join(bad)


def test_device_imports_nothing_from_guest_or_host():
    """The device model stands alone: it never reaches into the guest or the host."""
    bad = []
    for path, mod in _modules("device"):
        for imp in _imports(path, mod):
            if imp.startswith(("gemu.guest", "gemu.host")):
                bad.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert not bad, "\n".join(bad)


def test_published_interface_is_self_contained():
    """gemu.device.abi imports nothing else of gemu.device, so a driver that imports it gets
    only the hardware header and the protocol client."""
    bad = []
    for path, mod in _modules("device"):
        if not mod.startswith("gemu.device.abi"):
            continue
        for imp in _imports(path, mod):
            if imp.startswith("gemu.") and not imp.startswith("gemu.device.abi"):
                bad.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert not bad, "\n".join(bad)
