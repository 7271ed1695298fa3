"""The install the Dockerfile makes, rebuilt in a fresh virtual environment without a Docker engine.

What the builder stage does: copy the files its `COPY` lines name (less what `.dockerignore` excludes) into
an empty directory, `pip install` that directory (not editable) into a new venv, and run from that venv.
Here:

1. The same `COPY` lines, read from the Dockerfile, fill a staging directory, so a file the build needs
   but the Dockerfile forgets (or `.dockerignore` drops) fails here as it would in `docker build`.
2. `pip wheel --no-deps` builds the project from that directory with build isolation, as `pip install
   /src` does inside the image (it needs the build backend from the package index, like the image build).
3. A venv made with `--without-pip` gets that wheel, installed `--no-deps`.
4. The dependencies are not downloaded again (the suite stays fast and works from the pip cache alone):
   the distributions that the wheel's `Requires-Dist` pulls in, followed transitively with markers and
   extras, are linked file by file from the test environment into the new venv's site-packages. Nothing
   else is: the dev tools (pytest, hypothesis, mypy...) are absent, as in the image, so an import of a
   package the project does not declare fails here as it would there. `pip check` then confirms the set is
   complete and consistent.

What this cannot show: the exact versions the image would resolve (it has no lock file, so `docker build`
takes the newest releases that satisfy the lower bounds, while the links carry the test environment's), and
anything about the base image itself (its Python patch level, Debian's libraries).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .deployfiles import DOCKERFILE, ROOT, Stage, dockerignore_patterns, dockerignored, parse_dockerfile

PROJECT: Final = "trio-shard-gateway"


@dataclass(frozen=True, slots=True)
class ImageVenv:
    path: Path
    python: Path
    site_packages: Path
    wheel: Path

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        """A clean environment for the venv's python: PATH through its bin first, nothing inherited from the
        test process but what a container would also have (PATH, HOME, LANG), and `extra` on top."""
        env = {key: os.environ[key] for key in ("HOME", "LANG", "TMPDIR") if key in os.environ}
        env["PATH"] = f"{self.python.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env.update(extra)
        return env


def builder_stage(stages: list[Stage]) -> Stage:
    """The stage the final one copies its venv from (`COPY --from=<name>`)."""
    final = stages[-1]
    sources = {item.flags()[0].get("from") for item in final.all("COPY")} - {None}
    assert len(sources) == 1, f"the final stage should copy from one builder stage, copies from {sources}"
    (name,) = sources
    return next(stage for stage in stages if stage.name == name)


def stage_build_context(stage: Stage, destination: Path) -> None:
    """Copy into `destination` what the stage's `COPY` lines take from the build context (the repository
    root), relative to its WORKDIR, skipping what `.dockerignore` excludes."""
    patterns = dockerignore_patterns(ROOT)
    for item in stage.all("COPY"):
        options, rest = item.flags()
        assert "from" not in options, "the builder stage copies only from the build context"
        *sources, target = rest.split()
        target_dir = destination if target in ("./", ".") else destination / target.removeprefix("./")
        for source in sources:
            origin = ROOT / source
            assert origin.exists(), f"COPY {source}: not in the repository"
            files = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*") if p.is_file())
            for file in files:
                relative = file.relative_to(ROOT)
                if dockerignored(relative, patterns):
                    continue
                if origin.is_file():
                    # `COPY a b ./`: the files land in the target directory by name.
                    placed = (
                        target_dir / file.name if target.endswith("/") or len(sources) > 1 else target_dir
                    )
                else:
                    # `COPY dir ./dir`: the directory's contents land in the target.
                    placed = target_dir / file.relative_to(origin)
                placed.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, placed)


def runtime_closure(wheel_requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions `wheel_requirements` need, transitively, markers and extras applied."""
    installed = {canonicalize_name(dist.metadata["Name"]): dist for dist in metadata.distributions()}
    needed: dict[str, metadata.Distribution] = {}
    pending: list[tuple[Requirement, frozenset[str]]] = [
        (Requirement(text), frozenset()) for text in wheel_requirements
    ]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, parent_extras = pending.pop()
        if requirement.marker is not None and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in (parent_extras or {""})
        ):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = installed.get(name)
        assert dist is not None, f"{requirement} is required but not installed in the test environment"
        assert requirement.specifier.contains(dist.version, prereleases=True), (
            f"{requirement}: the test environment has {dist.version}"
        )
        needed[name] = dist
        extras = frozenset(requirement.extras)
        pending.extend((Requirement(text), extras) for text in dist.requires or [])
    return list(needed.values())


def link_distribution(dist: metadata.Distribution, site_packages: Path) -> None:
    """Symlink the top-level entries a distribution installed (its packages, modules, .dist-info) into
    `site_packages`; scripts outside site-packages are skipped."""
    files = dist.files or []
    assert files, f"{dist.metadata['Name']} lists no files (no RECORD)"
    tops = {file.parts[0] for file in files if file.parts[0] not in ("..", "__pycache__")}
    for top in sorted(tops):
        origin = Path(str(dist.locate_file(top)))
        link = site_packages / top
        if origin.exists() and not link.exists():
            link.symlink_to(origin, target_is_directory=origin.is_dir())


def build_image_venv(workdir: Path) -> ImageVenv:
    """Build the Dockerfile's install under `workdir` (see the module docstring); about 5 s with a warm
    pip cache."""
    stages = parse_dockerfile(DOCKERFILE)
    context = workdir / "src"
    context.mkdir()
    stage_build_context(builder_stage(stages), context)
    wheels = workdir / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(context)])
    (wheel,) = wheels.glob("*.whl")

    venv = workdir / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--quiet", "--no-deps", "--no-index", str(wheel)])
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    site_packages = Path(purelib)
    requirements = (
        metadata.Distribution.at(next(site_packages.glob("trio_shard_gateway-*.dist-info"))).requires or []
    )
    for dist in runtime_closure(requirements):
        link_distribution(dist, site_packages)
    _run([*pip, "--python", str(python), "check"])
    return ImageVenv(venv, python, site_packages, wheel)


def _run(command: list[str]) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if completed.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
        )
