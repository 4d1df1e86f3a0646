"""The import contracts (pyproject.toml, [tool.importlinter]) hold, and they catch a crossing
import: each test copies the five layered packages into a scratch tree, adds one import that
breaks the architecture, and runs ``lint-imports`` on the copy, which must fail naming it."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "model", "services", "training", "client")


def lint_imports(pyproject: Path, source_root: Path | None = None) -> subprocess.CompletedProcess:
    """Run lint-imports with ``pyproject``'s contracts. With ``source_root``, ``smartpath.*``
    is read from that folder instead of the installed (editable) package."""
    env = dict(os.environ)
    cmd = [sys.executable]
    if source_root is not None:
        # -S: no site, so the editable install's finder is absent and smartpath.* resolves to
        # the copy; import-linter itself still comes from site-packages.
        cmd.append("-S")
        env["PYTHONPATH"] = os.pathsep.join([str(source_root), *site.getsitepackages()])
    cmd += ["-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    cmd += ["--config", str(pyproject), "--no-cache", "--no-logo"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the layered packages laid out as ``smartpath/<package>``."""
    root = tmp_path_factory.mktemp("layers")
    for name in PACKAGES:
        shutil.copytree(
            ROOT / name, root / "src" / "smartpath" / name, ignore=shutil.ignore_patterns("demo")
        )
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold_on_the_tree_as_it_is(scratch: Path) -> None:
    result = lint_imports(scratch / "pyproject.toml", scratch / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "crossing", "contract"),
    [
        ("model/grammar.py", "smartpath.services.contracts", "Layers"),
        ("core/errors.py", "smartpath.model.grammar", "Layers"),
        ("services/models.py", "smartpath.training.rewards", "Layers"),
        ("training/data.py", "smartpath.services.contracts", "Layers"),
        ("services/encoding/cache.py", "smartpath.services.decoding.decoder", "five services"),
    ],
)
def test_a_crossing_import_fails_the_run(
    scratch: Path, module: str, crossing: str, contract: str
) -> None:
    path = scratch / "src" / "smartpath" / module
    original = path.read_text()
    path.write_text(original + f"\nimport {crossing}  # a deliberate crossing\n")
    try:
        result = lint_imports(scratch / "pyproject.toml", scratch / "src")
    finally:
        path.write_text(original)
    importer = "smartpath." + module.removesuffix(".py").replace("/", ".")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 broken" in result.stdout
    broken = result.stdout.split("Broken contracts")[1]
    assert contract in broken and f"{importer} -> {crossing}" in broken
