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
   extras, are linked file by file from the test environment into the new venv's site-packages, after a
   check that each is at the version the image's constraints file (the builder's `pip install
   --constraint`, requirements/service.txt) pins for this Python, the version `docker build` installs.
   Nothing else is: the dev tools (pytest, hypothesis, mypy...) are absent, as in the image, so an import of a
   package the project does not declare fails here as it would there. `pip check` then confirms the set is
   complete and consistent.

What this cannot show: anything about the base image itself (its Python patch level, Debian's libraries).
Where the tests run on another tested Python than the base image's, this is the same install on that
Python, with that Python's pins: what a base image of that Python would hold.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..locks import RELOCK, installed_closure, read_pins, versions
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


def install_constraints(stage: Stage, context: Path) -> Path:
    """The constraints file (`pip install --constraint`) of the stage's install, in the staged `context`."""
    workdir = stage.last("WORKDIR")
    assert workdir is not None, "the builder stage sets WORKDIR (the build context lands there)"
    installs = [shlex.split(item.flags()[1]) for item in stage.all("RUN") if " install " in item.text]
    assert len(installs) == 1, f"the builder stage runs one pip install, not {len(installs)}"
    (command,) = installs
    # The command may set the optional CA bundle (the pip_cert build secret) first: `if ...; fi && pip ...`.
    starts = [i for i, arg in enumerate(command[:-1]) if arg.endswith("/pip") and command[i + 1] == "install"]
    assert len(starts) == 1, f"expected one `.../pip install`, got {command}"
    argv = command[starts[0] :]
    options = [argv[i + 1] for i, arg in enumerate(argv) if arg in ("--constraint", "-c")]
    assert len(options) == 1, f"the image installs with one constraints file (requirements/), not {options}"
    (constraints,) = options
    inside = Path(constraints)
    assert inside.is_relative_to(workdir.text), f"{constraints}: not under WORKDIR {workdir.text}"
    staged = context / inside.relative_to(workdir.text)
    assert staged.is_file(), f"{constraints}: no COPY line brings it into the image"
    return staged


def image_dependencies(stage: Stage, context: Path, requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions the wheel's `requirements` need, each at the version the image's
    constraints file pins for this Python, so the links stand for what `docker build` installs."""
    dists = installed_closure(requirements)
    pins = read_pins(install_constraints(stage, context))
    for name, version in versions(dists).items():
        assert pins.get(name) == version, (
            f"{name} {version} is here, the image pins {pins.get(name)}: {RELOCK}"
        )
    return dists


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
    builder = builder_stage(stages)
    stage_build_context(builder, context)
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
    for dist in image_dependencies(builder, context, requirements):
        link_distribution(dist, site_packages)
    _run([*pip, "--python", str(python), "check"])
    return ImageVenv(venv, python, site_packages, wheel)


def _run(command: list[str]) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if completed.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
        )
