"""The container images and skaffold.yaml, checked statically against pyproject.toml.

There is no Docker engine on the project's machines, so nothing here builds an image. Instead the
Dockerfiles are parsed (a small line parser: ``\\`` continuations, comments, exec/shell form) and
held to what ``make`` does: torch first with pyproject's pin, then ``pip install .`` (non-editable,
``DS_BUILD_OPS=0``, so pyproject.toml stays the one package list), then ``pip check``; a runtime
stage that runs as a numeric non-root user on a read-only root filesystem, on a current base that
is upgraded at build time and with no compiler (DeepSpeed's CPU op is prebuilt in the builder).
``.dockerignore`` is
evaluated with Docker's own matching rules against the files the package needs, and skaffold.yaml
against the Dockerfiles and the Helm chart (the chart checks skip while charts/smartpath/Chart.yaml
is missing).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("docker/Dockerfile", "docker/Dockerfile.cuda")
CHART = ROOT / "charts" / "smartpath"
VENV = "/opt/venv"
WRITABLE = ("/tmp", "/tmp/ray", "/home/smartpath/.smartpath", "/home/smartpath/.cache")
OCI_LABELS = ("title", "description", "source", "licenses", "version")
# The base image: python:3.11.<patch>-slim-<Debian release>, optionally @sha256:<digest>. The newest
# 3.11 patch release in late 2026 is 3.11.17; trixie is Debian's stable release (bookworm left the
# Security Team's support in mid-2026). A base older than this, or on another release, fails.
BASE_IMAGE = re.compile(
    r"python:3\.11\.(?P<patch>\d+)-slim-(?P<debian>[a-z]+)(@sha256:[0-9a-f]{64})?"
)
MIN_PYTHON_311_PATCH = 17
DEBIAN_RELEASES = ("trixie",)
# Debian packages that are (or pull in) a C/C++ compiler, versioned (g++-14) and cross ones too.
COMPILER_PACKAGE = re.compile(
    r"(gcc|g\+\+|cpp|c\+\+|clang|clang\+\+|llvm|build-essential|tcc|gfortran)"
    r"(-\d+(\.\d+)?)?(-[a-z0-9_]+(-[a-z0-9_]+)*-linux-gnu\w*)?"
)
# The images' build platforms (skaffold.yaml): the CUDA image takes torch's x86-64 CUDA wheels.
PLATFORMS = {"smartpath": ["linux/amd64"], "smartpath-cuda": ["linux/amd64"]}


# ---- pyproject ----------------------------------------------------------------------------------


@cache
def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


@cache
def pins() -> dict[str, Requirement]:
    """pyproject's runtime dependencies by canonical name."""
    reqs = (Requirement(spec) for spec in pyproject()["project"]["dependencies"])
    return {canonicalize_name(r.name): r for r in reqs}


def package_dir(package: str) -> Path:
    """Source folder of ``package`` under [tool.setuptools] package-dir (longest prefix wins)."""
    mapping = pyproject()["tool"]["setuptools"]["package-dir"]
    for prefix in sorted(mapping, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            rest = package[len(prefix) :].lstrip(".").replace(".", "/")
            return ROOT / mapping[prefix] / rest
    return ROOT / package.replace(".", "/")


def package_roots() -> list[Path]:
    return [ROOT / d for d in pyproject()["tool"]["setuptools"]["package-dir"].values()]


def needed_files() -> list[Path]:
    """Every file `pip install .` reads: metadata, modules of every package, package data."""
    tool = pyproject()["tool"]["setuptools"]
    files = [ROOT / "pyproject.toml", ROOT / pyproject()["project"]["readme"]]
    for package in tool["packages"]:
        folder = package_dir(package)
        files += sorted(folder.glob("*.py"))
        for pattern in tool.get("package-data", {}).get(package, []):
            files += sorted(p for p in folder.glob(pattern) if p.is_file())
    return files


# ---- Dockerfile parser --------------------------------------------------------------------------


@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the logical line, continuations joined
    line: int


@dataclass
class Stage:
    name: str
    base: str  # image reference with the global ARG defaults substituted
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def args(self) -> dict[str, str]:
        """The stage's ARG defaults and ENV values (enough to expand ${VAR} in its RUN lines)."""
        values: dict[str, str] = {}
        for inst in self.instructions:
            if inst.cmd in ("ARG", "ENV"):
                values.update(key_values(inst.args))
        return values


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with ``\\`` continuations joined and comment lines dropped (also inside a
    continuation, as Docker does); each with the number of its first physical line."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(part for part in buf if part)))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def key_values(args: str) -> dict[str, str]:
    """``K=V K2="v 2"`` (ENV, ARG, LABEL) → dict; a bare ``ARG K`` maps to ''."""
    values = {}
    for token in shlex.split(args):
        key, _, value = token.partition("=")
        values[key] = value
    return values


def expand(text: str, values: dict[str, str]) -> str:
    """``${VAR}`` / ``$VAR`` with ``values``; unknown variables are left as they are."""
    pattern = re.compile(r"\$\{(\w+)\}|\$(\w+)")
    return pattern.sub(lambda m: values.get(m[1] or m[2], m[0]), text)


def exec_form(args: str) -> list[str] | None:
    return json.loads(args) if args.startswith("[") else None


@cache
def parse_dockerfile(rel: str) -> Dockerfile:
    path = ROOT / rel
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(path.read_text()):
        cmd, _, args = line.partition(" ")
        cmd, args = cmd.upper(), args.strip()
        if cmd == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=expand(words[0], global_args)))
        elif not stages:
            assert cmd == "ARG", f"{rel}:{number}: only ARG may come before the first FROM"
            global_args.update(key_values(args))
        else:
            stages[-1].instructions.append(Instruction(cmd, args, number))
    return Dockerfile(path, global_args, stages)


# ---- shell commands in RUN ----------------------------------------------------------------------

SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
# pip install options that take a value (as the next word, or as --opt=value).
PIP_VALUE_OPTIONS = {
    "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-r", "--requirement",
    "-c", "--constraint", "-t", "--target", "--prefix", "--root", "-C", "--config-settings",
    "--platform", "--python-version", "--implementation", "--abi", "--src", "--upgrade-strategy",
    "--trusted-host", "--cache-dir", "--log", "--timeout", "--retries", "--exists-action",
    "--cert", "--client-cert", "--proxy", "--global-option", "--no-binary", "--only-binary",
    "--report", "--progress-bar", "--root-user-action", "-e", "--editable",
}  # fmt: skip


@dataclass
class PipInstall:
    env: dict[str, str]  # assignments in front of the command (DS_BUILD_OPS=0 pip install .)
    options: dict[str, list[str]]  # option → values ('' for flags)
    targets: list[str]  # requirements and paths
    line: int


def run_script(inst: Instruction) -> str:
    """The shell command of a RUN line, without RUN's own --mount/--network flags."""
    words = inst.args.split(" ")
    while words and words[0].startswith("--"):
        words.pop(0)
    return " ".join(words)


def simple_commands(script: str) -> list[list[str]]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(stage: Stage) -> list[PipInstall]:
    found = []
    values = stage.args()
    for inst in stage.all("RUN"):
        for words in simple_commands(expand(run_script(inst), values)):
            env = {}
            while words and re.fullmatch(r"\w+=.*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if words[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
                words = ["pip", *words[3:]]
            if not words or PurePosixPath(words[0]).name not in ("pip", "pip3"):
                continue
            if words[1:2] != ["install"]:
                continue
            options: dict[str, list[str]] = {}
            targets: list[str] = []
            rest = iter(words[2:])
            for word in rest:
                if word.startswith("-"):
                    name, eq, value = word.partition("=")
                    if not eq and name in PIP_VALUE_OPTIONS:
                        value = next(rest, "")
                    options.setdefault(name, []).append(value)
                else:
                    targets.append(word)
            found.append(PipInstall(env, options, targets, inst.line))
    return found


def runs_command(stage: Stage, pattern: str) -> list[int]:
    """Lines of RUN instructions one of whose simple commands matches ``pattern``."""
    regex = re.compile(pattern)
    return [
        inst.line
        for inst in stage.all("RUN")
        if any(regex.search(" ".join(w)) for w in simple_commands(run_script(inst)))
    ]


def project_install(stage: Stage) -> PipInstall:
    installs = [p for p in pip_installs(stage) if "." in p.targets or ".[" in " ".join(p.targets)]
    assert len(installs) == 1, f"expected one `pip install .` in stage {stage.name}: {installs}"
    return installs[0]


# ---- Dockerfiles --------------------------------------------------------------------------------

dockerfiles = pytest.mark.parametrize("rel", DOCKERFILES)


@dockerfiles
def test_two_stages_and_the_runtime_gets_only_the_venv(rel: str) -> None:
    df = parse_dockerfile(rel)
    assert [s.name for s in df.stages] == ["builder", "runtime"]
    copies = [c.args.split() for c in df.final.all("COPY")]
    assert ["--from=builder", VENV, VENV] in copies, copies
    assert all(c[0].startswith("--from=builder") for c in copies), "runtime copies only the venv"
    assert not pip_installs(df.final), "nothing is pip-installed in the runtime stage"


@dockerfiles
def test_base_images_are_pinned_python_311(rel: str) -> None:
    requires = pyproject()["project"]["requires-python"]
    assert requires == ">=3.11"
    for stage in parse_dockerfile(rel).stages:
        ref = stage.base
        assert "$" not in ref, f"{stage.name}: unresolved ARG in FROM {ref}"
        name, _, tag = ref.split("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"{stage.name}: {ref} has no version tag"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{stage.name}: {ref} is not pinned to a release"
        assert name.endswith("python") and tag.startswith("3.11."), ref


def test_both_dockerfiles_use_one_current_base() -> None:
    bases = {}
    for rel in DOCKERFILES:
        df = parse_dockerfile(rel)
        base = df.global_args.get("PYTHON_IMAGE", "")
        assert base, f"{rel}: no ARG PYTHON_IMAGE before the first FROM"
        for stage in df.stages:
            assert stage.base == base, f"{rel} {stage.name}: FROM {stage.base}, not {base}"
        bases[rel] = base
    assert len(set(bases.values())) == 1, f"the images are built on different bases: {bases}"
    base = bases[DOCKERFILES[0]]
    match = BASE_IMAGE.fullmatch(base.removeprefix("docker.io/library/"))
    assert match, f"{base}: not python:3.11.<patch>-slim-<Debian release>"
    assert int(match["patch"]) >= MIN_PYTHON_311_PATCH, (
        f"{base} is older than Python 3.11.{MIN_PYTHON_311_PATCH}"
    )
    assert match["debian"] in DEBIAN_RELEASES, f"{base}: Debian {match['debian']}"


@dockerfiles
def test_torch_is_installed_first_with_pyprojects_pin(rel: str) -> None:
    builder = parse_dockerfile(rel).stage("builder")
    first, *_ = pip_installs(builder)
    assert [canonicalize_name(Requirement(t).name) for t in first.targets] == ["torch"], (
        f"line {first.line}: the first pip install must be torch alone, got {first.targets}"
    )
    torch = Requirement(first.targets[0])
    assert str(torch.specifier) == str(pins()["torch"].specifier) != "", (
        f"line {first.line}: {torch} differs from pyproject's {pins()['torch']}"
    )
    (index,) = first.options.get("--index-url", [""])
    assert index.startswith("https://download.pytorch.org/whl/"), index
    flavour = "cpu" if rel.endswith("Dockerfile") else "cu"
    assert index.rsplit("/", 1)[1].startswith(flavour), f"{rel} takes torch from {index}"
    assert project_install(builder).line > first.line


@dockerfiles
def test_project_is_installed_non_editable_with_ds_build_ops_0(rel: str) -> None:
    builder = parse_dockerfile(rel).stage("builder")
    install = project_install(builder)
    assert install.targets == ["."], f"line {install.line}: no extras (runtime deps only)"
    assert "-e" not in install.options and "--editable" not in install.options
    departures = {"--no-deps", "-r", "--requirement", "-c", "--constraint", "--no-build-isolation"}
    for option in sorted(departures & set(install.options)):
        pytest.fail(f"line {install.line}: {option} departs from the Makefile's install")
    ds_build_ops = install.env.get("DS_BUILD_OPS", builder.args().get("DS_BUILD_OPS"))
    assert ds_build_ops == "0", f"line {install.line}: DS_BUILD_OPS=0 must be set for the install"


@dockerfiles
def test_every_named_package_matches_a_pyproject_pin(rel: str) -> None:
    for stage in parse_dockerfile(rel).stages:
        for install in pip_installs(stage):
            for option in ("-r", "--requirement", "-c", "--constraint"):
                assert option not in install.options, (
                    f"line {install.line}: a package list beside pyproject.toml can drift from it"
                )
            for target in install.targets:
                if target == "." or target.startswith(("./", "/")):
                    continue
                try:
                    req = Requirement(target)
                except InvalidRequirement:
                    pytest.fail(f"line {install.line}: cannot read {target!r} as a requirement")
                pin = pins().get(canonicalize_name(req.name))
                assert pin is not None, f"line {install.line}: {req.name} is not in pyproject.toml"
                assert str(req.specifier) == str(pin.specifier) != "", (
                    f"line {install.line}: {req} differs from pyproject's {pin}"
                )


@dockerfiles
def test_pip_check_runs_after_the_install(rel: str) -> None:
    builder = parse_dockerfile(rel).stage("builder")
    checks = runs_command(builder, r"^(python3? -m )?pip3? check$")
    assert checks and max(checks) >= project_install(builder).line, "pip check after the install"


@dockerfiles
def test_builder_smoke_imports_the_generated_grpc_code_and_every_serve_app(rel: str) -> None:
    builder = parse_dockerfile(rel).stage("builder")
    script = " ".join(run_script(i) for i in builder.all("RUN"))
    assert "import smartpath.v1.pathology_pb2_grpc" in script
    for app in ("tiling", "encoding", "routing", "decoding", "gateway"):
        assert f"smartpath.services.{app}.service" in script, f"{app} is not smoke-imported"
    for module in ("smartpath.training.sft", "smartpath.training.grpo"):
        assert module in script, f"{module} (the RayJob entry point) is not smoke-imported"


@dockerfiles
def test_builder_copies_every_source_folder(rel: str) -> None:
    builder = parse_dockerfile(rel).stage("builder")
    sources = set()
    for copy in builder.all("COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        sources |= {w.rstrip("/") for w in words[:-1]}
    needed = {"pyproject.toml", pyproject()["project"]["readme"]}
    needed |= {p.relative_to(ROOT).parts[0] for p in package_roots()}
    assert "." in sources or needed <= sources, f"not copied: {sorted(needed - sources)}"


@dockerfiles
def test_runtime_runs_as_numeric_non_root_user(rel: str) -> None:
    (user,) = [u.args for u in parse_dockerfile(rel).final.all("USER")][-1:]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric, non-root (runAsNonRoot)"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user}"


@dockerfiles
def test_runtime_declares_the_writable_volumes(rel: str) -> None:
    volumes = []
    for inst in parse_dockerfile(rel).final.all("VOLUME"):
        volumes += exec_form(inst.args) or inst.args.split()
    missing = [v for v in WRITABLE if v not in volumes]
    assert not missing, f"VOLUME lacks {missing} (read-only root filesystem)"


@dockerfiles
def test_runtime_environment(rel: str) -> None:
    env = parse_dockerfile(rel).final.args()
    assert env.get("RAY_USAGE_STATS_ENABLED") == "0"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PATH", "").startswith(f"{VENV}/bin:"), env.get("PATH")
    assert env.get("HOME") == "/home/smartpath"
    for key in ("XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert any(env.get(key, "").startswith(v + "/") for v in ("/tmp", "/home/smartpath")), (
            f"{key}={env.get(key)!r} is not under a writable volume"
        )


@dockerfiles
def test_runtime_has_the_tools_kuberay_needs(rel: str) -> None:
    final = parse_dockerfile(rel).final
    packages: set[str] = set()
    for inst in final.all("RUN"):
        for words in simple_commands(run_script(inst)):
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    # tini: PID 1 of every Ray pod (the chart's smartpath.rayCommand forwards SIGTERM through it).
    assert {"bash", "wget", "procps", "tini"} <= packages, packages


def apt_runs(stage: Stage) -> list[tuple[Instruction, list[list[str]]]]:
    """RUN instructions that call apt-get (or apt), each with its simple commands; assignments in
    front of a command (DEBIAN_FRONTEND=noninteractive apt-get ...) are dropped."""
    runs = []
    for inst in stage.all("RUN"):
        commands = []
        for words in simple_commands(run_script(inst)):
            while words and re.fullmatch(r"\w+=.*", words[0]):
                words = words[1:]
            if words and words[0] == "apt":
                words = ["apt-get", *words[1:]]
            commands.append(words)
        if any(c[:1] == ["apt-get"] for c in commands):
            runs.append((inst, commands))
    return runs


def apt_installed(stage: Stage) -> set[str]:
    """Package names that the stage's apt-get install commands name (without =version, :arch)."""
    return {
        re.split(r"[=:]", word)[0]
        for _, commands in apt_runs(stage)
        for words in commands
        if words[:2] == ["apt-get", "install"]
        for word in words[2:]
        if not word.startswith("-")
    }


@dockerfiles
def test_apt_upgrades_wherever_packages_are_installed(rel: str) -> None:
    """Each RUN that installs Debian packages first upgrades the base's own: Debian's security fixes
    published after the base tag was built land at build time. The runtime stage must have one."""
    df = parse_dockerfile(rel)
    assert apt_runs(df.stage("runtime")), "the runtime stage installs its tools with apt-get"
    for stage in df.stages:
        for inst, commands in apt_runs(stage):
            where = f"{stage.name}, line {inst.line}"
            verbs = [c[1] if len(c) > 1 else "" for c in commands if c[:1] == ["apt-get"]]
            if "install" not in verbs:
                continue
            assert "update" in verbs and "upgrade" in verbs, f"{where}: update and upgrade first"
            assert verbs.index("update") < verbs.index("upgrade") < verbs.index("install"), where
            for words in commands:
                if words[:2] == ["apt-get", "upgrade"]:
                    yes = {"-y", "--yes", "--assume-yes"} & set(words) or any(
                        re.fullmatch(r"-[a-z]*y[a-z]*", w) for w in words[2:]
                    )
                    assert yes, f"{where}: apt-get upgrade without -y waits for an answer"
                if words[:2] == ["apt-get", "install"]:
                    assert "--no-install-recommends" in words, f"{where}: {words}"
            assert commands[-1][:2] == ["rm", "-rf"] and "/var/lib/apt/lists/*" in commands[-1], (
                f"{where}: the apt lists are removed in the same layer"
            )


@pytest.mark.parametrize(
    ("package", "compiler"),
    [
        ("g++", True), ("gcc", True), ("gcc-14", True), ("g++-14-x86-64-linux-gnu", True),
        ("clang", True), ("clang-19", True), ("cpp", True), ("build-essential", True),
        ("bash", False), ("tini", False), ("libgomp1", False), ("libstdc++6", False),
        ("procps", False), ("wget", False),
    ],
)  # fmt: skip
def test_compiler_package_pattern(package: str, compiler: bool) -> None:
    assert bool(COMPILER_PACKAGE.fullmatch(package)) is compiler


@dockerfiles
def test_no_compiler_in_the_runtime_stage(rel: str) -> None:
    """Serving, Ray and CPU training run without a compiler: DeepSpeed's shared-memory op, the one
    thing that JIT-compiled at run time, is built in the builder (next test)."""
    compilers = sorted(
        p for p in apt_installed(parse_dockerfile(rel).final) if COMPILER_PACKAGE.fullmatch(p)
    )
    assert not compilers, f"the runtime stage installs {compilers}"


@dockerfiles
def test_builder_prebuilds_deepspeeds_cpu_comm_op(rel: str) -> None:
    """On CPU, DeepSpeed's process group backend loads its shared-memory op whenever it starts and,
    unless DeepSpeed was installed with it, JIT-compiles it with the system compiler (which the
    runtime stage lacks). So the builder reinstalls DeepSpeed from its sdist with the op built."""
    builder = parse_dockerfile(rel).stage("builder")
    assert {p for p in apt_installed(builder) if COMPILER_PACKAGE.fullmatch(p)}, (
        "the builder needs a C++ compiler to build the op"
    )
    installs = [p for p in pip_installs(builder) if p.env.get("DS_BUILD_SHM_COMM") == "1"]
    assert len(installs) == 1, f"one pip install with DS_BUILD_SHM_COMM=1, got {installs}"
    (install,) = installs
    where = f"line {install.line}"
    assert install.env.get("DS_ACCELERATOR") == "cpu", f"{where}: the op is the CPU accelerator's"
    assert install.env.get("DS_BUILD_OPS") == "0", f"{where}: only that op, the rest stays JIT"
    assert [canonicalize_name(Requirement(t).name) for t in install.targets] == ["deepspeed"]
    assert str(Requirement(install.targets[0]).specifier) == str(pins()["deepspeed"].specifier)
    no_binary = ",".join(install.options.get("--no-binary", [])).split(",")
    assert "deepspeed" in no_binary or ":all:" in no_binary, f"{where}: a wheel has no op built in"
    for option in ("--force-reinstall", "--no-deps", "--no-build-isolation"):
        assert option in install.options, f"{where}: {option}"
    assert install.line > project_install(builder).line, "after the project's install"
    smoke = " ".join(run_script(i) for i in builder.all("RUN") if i.line > install.line)
    assert "ShareMemCommBuilder" in smoke and "absolute_name()" in smoke, (
        "the builder checks that the op loads as the installed module, not a JIT build"
    )


def test_installed_deepspeed_builds_that_op_as_the_images_assume() -> None:
    """The pinned DeepSpeed: its CPU backend loads the op, DS_BUILD_SHM_COMM selects it, and it is
    compiled without -march=native (the image's op must run on any x86-64 node)."""
    import importlib
    import inspect

    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    backend = importlib.import_module("deepspeed.comm.torch")
    assert "build_shm_op()" in inspect.getsource(backend.TorchBackend.__init__)
    assert "ShareMemCommBuilder" in inspect.getsource(backend.build_shm_op)
    assert ShareMemCommBuilder.BUILD_VAR == "DS_BUILD_SHM_COMM"
    args = ShareMemCommBuilder().cxx_args()
    assert not [a for a in args if a.startswith(("-march", "-mcpu", "-mtune"))], args


@dockerfiles
def test_oci_labels_match_pyproject(rel: str) -> None:
    final = parse_dockerfile(rel).final
    labels: dict[str, str] = {}
    for inst in final.all("LABEL"):
        labels.update(key_values(inst.args))
    labels = {k: expand(v, final.args()) for k, v in labels.items()}
    prefix = "org.opencontainers.image."
    missing = [k for k in OCI_LABELS if prefix + k not in labels]
    assert not missing, f"missing OCI labels: {missing}"
    assert labels[prefix + "version"] == pyproject()["project"]["version"]
    assert labels[prefix + "licenses"] == pyproject()["project"]["license"]["text"]
    assert labels[prefix + "title"].startswith("smartpath")


@dockerfiles
def test_entrypoint_is_the_cli_serving_by_default(rel: str) -> None:
    final = parse_dockerfile(rel).final
    (entrypoint,) = [exec_form(i.args) for i in final.all("ENTRYPOINT")][-1:]
    (cmd,) = [exec_form(i.args) for i in final.all("CMD")][-1:]
    assert entrypoint and entrypoint[-1] == "smartpath", entrypoint
    assert "smartpath" in pyproject()["project"]["scripts"]
    assert cmd == ["serve"]
    assert not final.all("HEALTHCHECK"), "Kubernetes probes, not a Docker HEALTHCHECK"


def test_both_images_install_the_same_way() -> None:
    cpu, cuda = (parse_dockerfile(rel) for rel in DOCKERFILES)
    assert cpu.global_args == cuda.global_args
    for stage in ("builder", "runtime"):
        a, b = (
            [(p.env, p.targets, sorted(p.options)) for p in pip_installs(df.stage(stage))]
            for df in (cpu, cuda)
        )
        assert a == b, f"{stage}: the CPU and CUDA images install differently"


# ---- the package itself -------------------------------------------------------------------------


def test_non_editable_install_ships_every_subpackage() -> None:
    """An editable install (make, pytest) finds every folder with an __init__.py; `pip install .`
    (the image) ships only the packages pyproject lists, so a missing one breaks only the image."""
    listed = {package_dir(p).resolve() for p in pyproject()["tool"]["setuptools"]["packages"]}
    on_disk = {
        init.parent.resolve()
        for root in package_roots()
        for init in root.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    missing = sorted(str(p.relative_to(ROOT)) for p in on_disk - listed)
    assert not missing, (
        f"packages in pyproject.toml [tool.setuptools] lacks {missing}: "
        "the image's non-editable install would not contain them"
    )


# ---- .dockerignore ------------------------------------------------------------------------------


def ignore_patterns() -> list[tuple[re.Pattern[str], bool]]:
    """.dockerignore as (regex, is_exception), translated as Docker's patternmatcher does."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = str(PurePosixPath(line.lstrip("!").strip())).lstrip("/")
        regex, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex, i = regex + line[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((re.compile(f"^{regex}$"), exception))
    return patterns


def ignored(rel: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = PurePosixPath(rel).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for regex, exception in patterns:
        if any(regex.match(c) for c in candidates):
            result = not exception
    return result


def test_dockerignore_keeps_everything_the_package_needs() -> None:
    patterns = ignore_patterns()
    files = needed_files()
    assert any("demo" in f.parts for f in files), "the demo model (package data) is checked too"
    rels = [str(f.relative_to(ROOT)) for f in files]
    dropped = [rel for rel in rels if ignored(rel, patterns)]
    assert not dropped, f".dockerignore leaves out files the package needs: {dropped}"


@pytest.mark.parametrize(
    "rel",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "out/demo/report.json",
        "reports/demo/metrics.json",
        ".pytest_cache/v/cache",
        "services/__pycache__/cli.cpython-311.pyc",
        "smartpath.egg-info/PKG-INFO",
        ".env",
    ],
)
def test_dockerignore_leaves_out_local_state(rel: str) -> None:
    assert ignored(rel, ignore_patterns()), f"{rel} would be sent to the builder"


# ---- skaffold.yaml ------------------------------------------------------------------------------


@cache
def skaffold() -> dict:
    return yaml.safe_load((ROOT / "skaffold.yaml").read_text())


def scopes() -> dict[str, dict]:
    """'base' and each profile, with the build/deploy each one ends up using."""
    config = skaffold()
    out = {"base": {"build": config.get("build", {}), "deploy": config.get("deploy", {})}}
    for profile in config.get("profiles", []):
        out[profile["name"]] = {
            "build": {**out["base"]["build"], **profile.get("build", {})},
            "deploy": profile.get("deploy", out["base"]["deploy"]),
            "profile": profile,
        }
    return out


def template_name(image: str) -> str:
    """Skaffold's name for an artifact in Helm templates ('/' and '-' become '_')."""
    return re.sub(r"[/-]", "_", image)


def test_skaffold_schema_version() -> None:
    assert re.fullmatch(r"skaffold/v4beta\d+", skaffold()["apiVersion"]), skaffold()["apiVersion"]
    assert skaffold()["kind"] == "Config"


def test_skaffold_artifacts_point_at_the_dockerfiles() -> None:
    artifacts = {}
    for scope in scopes().values():
        for artifact in scope["build"].get("artifacts", []):
            context = ROOT / artifact.get("context", ".")
            dockerfile = context / artifact["docker"]["dockerfile"]
            assert dockerfile.is_file(), f"{artifact['image']}: no {dockerfile}"
            artifacts[artifact["image"]] = str(dockerfile.resolve().relative_to(ROOT))
    assert artifacts == {"smartpath": DOCKERFILES[0], "smartpath-cuda": DOCKERFILES[1]}


def test_skaffold_profiles() -> None:
    all_scopes = scopes()
    assert {"cpu", "gpu", "dev"} <= set(all_scopes)
    built = {name: {a["image"] for a in s["build"]["artifacts"]} for name, s in all_scopes.items()}
    assert built["base"] == built["cpu"] == {"smartpath"}
    assert built["gpu"] == {"smartpath-cuda"}
    dev = all_scopes["dev"]
    assert dev["build"]["local"].get("useBuildkit") is True
    assert dev["build"]["local"].get("push") is False
    ports = {f["port"] for f in dev["profile"].get("portForward", [])}
    assert 9000 in ports, "dev forwards the Serve gRPC port"


def test_skaffold_uses_buildkit_where_the_dockerfiles_need_it() -> None:
    uses_mounts = any(
        "--mount=" in inst.args
        for rel in DOCKERFILES
        for stage in parse_dockerfile(rel).stages
        for inst in stage.all("RUN")
    )
    if uses_mounts:
        for name, scope in scopes().items():
            assert scope["build"].get("local", {}).get("useBuildkit") is True, name


def test_every_skaffold_artifact_names_its_build_platforms() -> None:
    """Every artifact of every profile, dev included (it builds the artifacts it inherits), is
    built for the platforms the images are made for, never for whatever the machine or cluster
    happens to be."""
    seen = set()
    for name, scope in scopes().items():
        build = scope["build"]
        for artifact in build.get("artifacts", []):
            image = artifact["image"]
            platforms = artifact.get("platforms", build.get("platforms"))
            assert platforms, f"{name}: {image} has no build platforms"
            assert platforms == PLATFORMS[image], f"{name}: {image} is built for {platforms}"
            seen.add(image)
    assert seen == set(PLATFORMS), seen
    assert PLATFORMS["smartpath-cuda"] == ["linux/amd64"]


def test_skaffold_helm_release_sets_the_built_image() -> None:
    for name, scope in scopes().items():
        releases = scope["deploy"]["helm"]["releases"]
        assert [r["name"] for r in releases] == ["smartpath"], name
        (release,) = releases
        assert release["chartPath"] == "charts/smartpath", name
        templates = release["setValueTemplates"]
        assert set(templates) >= {"image.repository", "image.tag"}, name
        (image,) = {a["image"] for a in scope["build"]["artifacts"]}
        key = template_name(image)
        assert templates["image.repository"] == f"{{{{.IMAGE_REPO_{key}}}}}", name
        assert f"{{{{.IMAGE_TAG_{key}}}}}" in templates["image.tag"], name
        referenced = set(re.findall(r"\.IMAGE_\w+?_(smartpath\w*)", " ".join(templates.values())))
        assert referenced == {key}, f"{name}: templates name {referenced}, the build has {key}"
        for path in release.get("valuesFiles", []):
            assert path.startswith("charts/smartpath/"), f"{name}: {path}"


def test_skaffold_profiles_use_the_ci_values() -> None:
    all_scopes = scopes()
    for profile in ("cpu", "gpu"):
        (release,) = all_scopes[profile]["deploy"]["helm"]["releases"]
        assert f"charts/smartpath/ci/{profile}-values.yaml" in release.get("valuesFiles", [])


def require_chart() -> None:
    if not (CHART / "Chart.yaml").is_file():
        pytest.skip("charts/smartpath/Chart.yaml does not exist yet (the chart is being written)")


def test_skaffold_values_files_exist() -> None:
    require_chart()
    for name, scope in scopes().items():
        for release in scope["deploy"]["helm"]["releases"]:
            for path in release.get("valuesFiles", []):
                assert (ROOT / path).is_file(), f"{name}: {path} does not exist"


def test_chart_takes_the_image_as_skaffold_sets_it() -> None:
    require_chart()
    values = yaml.safe_load((CHART / "values.yaml").read_text()) or {}
    image = values.get("image")
    assert isinstance(image, dict), "values.yaml has no image: mapping"
    assert {"repository", "tag", "pullPolicy"} <= set(image), sorted(image)
