"""Readers for the deployment files in compose/, each following its tool's rules for the subset we use.

No Docker engine or systemd manager runs where the tests run, so the tests read the files the way those
tools would: Compose's variable interpolation and `.env` syntax, the Dockerfile's instructions (line
continuations, exec form as JSON), a systemd unit's sections and repeated keys. Each reader refuses syntax
it does not implement instead of guessing, so a file that grows past what the tests understand fails
loudly rather than being half-checked.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parents[2]
COMPOSE_DIR: Final = ROOT / "compose"
COMPOSE_FILE: Final = COMPOSE_DIR / "compose.yaml"
#: Cluster mode: two nodes (README, "Several hosts").
CLUSTER_FILE: Final = COMPOSE_DIR / "cluster.yaml"
DOCKERFILE: Final = COMPOSE_DIR / "Dockerfile"
UNIT_FILE: Final = COMPOSE_DIR / "supervisor.service"
#: Cluster mode under systemd: a template, one instance per node.
TEMPLATE_UNIT_FILE: Final = COMPOSE_DIR / "supervisor@.service"
EXAMPLE_ENV: Final = COMPOSE_DIR / "example.env"
BENCH_ENV: Final = COMPOSE_DIR / "bench.env"

# -- Compose -------------------------------------------------------------------------------------------------

#: `$$`, `${NAME}`, `${NAME:-default}` (and `-`, `:?`, `?`, `:+`, `+`), `$NAME`; a default holding another
#: `${...}` is Compose syntax this reader does not implement, and is refused.
_VARIABLE: Final = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^${}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """`value` (a loaded YAML tree) with Compose's variable interpolation applied to every string."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        unset_or_empty = not current
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else current is None) else current or ""
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else current is None:
                raise KeyError(f"{name} is required: {arg}")
            return current or ""
        if op in (":+", "+"):
            return arg if not (unset_or_empty if op == ":+" else current is None) else ""
        return current or ""

    result = _VARIABLE.sub(substitute, value)
    leftover = _VARIABLE.sub("", value)
    if "$" in leftover:
        raise ValueError(f"interpolation this reader does not implement: {value!r}")
    return result


_ENV_LINE: Final = re.compile(r"(?:export\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<value>.*)")


def parse_env_file(path: Path) -> dict[str, str]:
    """A Compose `.env` file: `KEY=value` lines, `#` comments, single quotes literal, double quotes with
    backslash escapes, and an unquoted value ending at ` #`."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"{path.name}:{number}: not a KEY=value line: {raw!r}")
        text = match["value"]
        if text[:1] == "'" and text.endswith("'") and len(text) > 1:
            value = text[1:-1]
        elif text[:1] == '"' and text.endswith('"') and len(text) > 1:
            value = json.loads(text)
        elif text[:1] in ("'", '"'):
            raise ValueError(f"{path.name}:{number}: unterminated quote: {raw!r}")
        else:
            value = re.split(r"\s+#", text, maxsplit=1)[0].strip()
        values[match["key"]] = value
    return values


def load_compose(env: Mapping[str, str] | None = None, path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """A compose file (compose.yaml unless `path` names another) as loaded (YAML merge keys resolved);
    interpolated with `env` unless it is None."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document if env is None else interpolate(document, env)


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment` (mapping or `KEY=value` list) as Compose hands it to the container: every
    value a string; a name without a value (taken from the shell) is left out."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        pairs = [item.split("=", 1) if "=" in item else [item, None] for item in environment]
        environment = dict(pairs)
    result: dict[str, str] = {}
    for key, value in environment.items():
        if value is None:
            continue
        result[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return result


_BYTE_UNITS: Final = {
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
}
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def compose_bytes(value: str | int) -> int:
    """A Compose byte value (`64mb`, `1g`, `512k`, or a number of bytes) in bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+)([a-z]*)", value.strip().lower())
    if match is None or match[2] not in ("", *_BYTE_UNITS):
        raise ValueError(f"not a Compose byte value: {value!r}")
    return int(match[1]) * _BYTE_UNITS.get(match[2], 1)


def compose_duration_s(value: str) -> float:
    """A Compose duration (`1m30s`, `40s`, `500ms`) in seconds."""
    text = value.strip()
    if not text or _DURATION_PART.sub("", text):
        raise ValueError(f"not a Compose duration: {value!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text))


# -- Dockerfile ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    #: The arguments as written, continuation lines joined.
    text: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        if not self.text.startswith("["):
            return None
        value = json.loads(self.text)
        assert isinstance(value, list) and all(isinstance(item, str) for item in value)
        return value

    def flags(self) -> tuple[dict[str, str], str]:
        """Leading `--name=value` options (COPY --from, HEALTHCHECK --interval) and the rest of the text."""
        options: dict[str, str] = {}
        rest = self.text
        while match := re.match(r"--([a-z-]+)=(\S+)\s+", rest):
            options[match[1]] = match[2]
            rest = rest[match.end() :]
        return options, rest


@dataclass(slots=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def environment(self) -> dict[str, str]:
        """The stage's ENV variables (`KEY=value` pairs; `$NAME` refers to an earlier value)."""
        env: dict[str, str] = {}
        for item in self.all("ENV"):
            for pair in shlex.split(item.text):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ValueError(f"ENV in the legacy `ENV KEY value` form: {item.text!r}")
                env[key] = re.sub(r"\$(\w+)", lambda m: env.get(m[1], f"${m[1]}"), value)
        return env


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of a Dockerfile, `FROM` arguments resolved against the global `ARG` defaults."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (and the `# syntax=` directive) may sit inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        word, _, text = line.partition(" ")
        keyword, text = word.upper(), text.strip()
        if keyword == "ARG" and not stages:
            name, _, default = text.partition("=")
            arguments[name] = default
            continue
        if keyword == "FROM":
            parts = text.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: arguments.get(m[1], m[0]), parts[0])
            stage_name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, stage_name))
            continue
        assert stages, f"{keyword} before the first FROM"
        stages[-1].instructions.append(Instruction(keyword, text))
    return stages


def dockerignore_patterns(context: Path) -> list[str]:
    """The patterns of `<context>/.dockerignore` (none if it is missing); `!` exceptions are refused."""
    path = context / ".dockerignore"
    if not path.exists():
        return []
    patterns = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            raise ValueError(f".dockerignore exceptions are not implemented here: {line!r}")
        patterns.append(line.strip("/"))
    return patterns


def dockerignored(relative: Path, patterns: list[str]) -> bool:
    """Whether Docker leaves `relative` (a path in the build context) out: a pattern matches the path or a
    directory above it; `**/` matches any number of leading directories."""
    parts = relative.parts
    for pattern in patterns:
        anchored = not pattern.startswith("**/")
        body = pattern.removeprefix("**/").split("/")
        starts = [0] if anchored else range(len(parts))
        for start in starts:
            window = parts[start : start + len(body)]
            if len(window) == len(body) and all(
                re.fullmatch(_glob_regex(glob), part) for glob, part in zip(body, window, strict=True)
            ):
                return True
    return False


def _glob_regex(glob: str) -> str:
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)


# -- systemd -------------------------------------------------------------------------------------------------


def parse_unit(path: Path = UNIT_FILE) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> every value given, in order (keys such as Environment= repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            raise ValueError(f"{path.name}:{number}: continuation lines are not implemented here")
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if not sep or current is None:
            raise ValueError(f"{path.name}:{number}: not a Key=value line in a section: {raw!r}")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_environment(service: Mapping[str, list[str]]) -> dict[str, str]:
    """The `Environment=` assignments of a [Service] section (quoted words as systemd splits them)."""
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for word in shlex.split(line):
            key, sep, value = word.partition("=")
            assert sep, f"Environment= word without '=': {word!r}"
            env[key] = value
    return env
