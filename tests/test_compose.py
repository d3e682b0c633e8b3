"""compose.yaml, checked without a container engine: what it sets is what the gateway reads,
and its services, profiles, volumes, ports, DSNs and commands agree with each other and with
the Dockerfile, so that a mistake fails here rather than at ``docker compose up``.

``problems`` returns every mistake it finds; the real file must have none, and each kind of
mistake, made on a copy, must be reported.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from gateway.settings import UPSTREAM_VARIABLES, VARIABLES, ConfigError, Settings, redis_url

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
DOCKERFILE = (REPO / "Dockerfile").read_text()

GATEWAY_IMAGE = ("gateway", "writer")  # the services that run the Dockerfile's image
PROFILE = "queue"
PROFILED = frozenset({"redis", "writer"})  # only with --profile queue
# What a DSN may name: the service, its image's port and the schemes that speak to it.
SERVERS = {"postgres": (5432, {"postgres", "postgresql"}), "redis": (6379, {"redis", "rediss"})}
DATA_DIRS = {"postgres": "/var/lib/postgresql/data", "redis": "/data"}  # the images' own
DEFAULT_PORTS = {scheme: port for port, schemes in SERVERS.values() for scheme in schemes}
QUEUE = "redis://redis:6379/0"  # what compose.yaml's comments say to set with the profile

READ = frozenset(v.name for v in VARIABLES)
PER_UPSTREAM = [re.compile(v.name.replace("<NAME>", "[A-Z0-9_]+")) for v in UPSTREAM_VARIABLES]
DSNS = [v.name for v in VARIABLES if v.field.endswith("_dsn") or v.parse is redis_url]
DIRS = ("MES_SPOOL_DIR", "MES_ARCHIVE_DIR")

INTERPOLATION = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?-)([^}]*))?\})")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` with Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}`` and
    ``$$`` replaced as ``docker compose`` would, given the shell's (or .env's) ``env``."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        dollar, name, operator, default = match.groups()
        if dollar:
            return "$"
        if (operator == ":-" and not env.get(name)) or (operator == "-" and name not in env):
            return default
        return env.get(name, "")

    return INTERPOLATION.sub(replace, value)


def dockerfile() -> dict[str, Any]:
    """The Dockerfile's ENV (a dict), VOLUME, EXPOSE, CMD and ENTRYPOINT (JSON forms)."""
    found: dict[str, Any] = {"ENV": {}, "VOLUME": [], "EXPOSE": [], "CMD": None, "ENTRYPOINT": None}
    for line in DOCKERFILE.replace("\\\n", " ").splitlines():
        instruction, _, rest = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "ENV":
            found["ENV"].update(item.split("=", 1) for item in shlex.split(rest))
        elif instruction == "VOLUME":
            found["VOLUME"] += json.loads(rest) if rest.startswith("[") else rest.split()
        elif instruction == "EXPOSE":
            found["EXPOSE"] += [int(port.split("/")[0]) for port in rest.split()]
        elif instruction in ("CMD", "ENTRYPOINT"):
            found[instruction] = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return found


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment``, either form, as the strings the container gets."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    return {name: str(value) for name, value in raw.items() if value is not None}


def mounts(service: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's mounts: target -> the named volume there (None for a bind mount)."""
    found: dict[str, str | None] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            named = volume.get("type", "volume") == "volume"
            source, target = volume.get("source"), volume["target"]
        else:
            source, target = volume.split(":")[:2]
            named = not source.startswith(("/", ".", "~"))
        found[target] = source if named else None
    return found


def container_ports(service: Mapping[str, Any]) -> list[int]:
    """The container side of each port a service publishes."""
    found = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            found.append(int(port["target"]))
        else:
            found.append(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return found


def command(value: Any) -> list[str] | None:
    """A command or health check test, either form, as a list."""
    return shlex.split(value) if isinstance(value, str) else value


def runs(services: Mapping[str, Any], image: Mapping[str, Any], name: str) -> dict[str, str]:
    """What a service's container sees: the Dockerfile's ENV, overridden by compose's."""
    return (image["ENV"] if name in GATEWAY_IMAGE else {}) | environment(services[name])


def settings(services: Mapping[str, Any], image: Mapping[str, Any], name: str) -> Settings:
    """A gateway-image service's settings, read by the gateway's own code (or ConfigError)."""
    return Settings.from_env(runs(services, image, name))


def problems(compose: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """Every mistake in ``compose`` (a parsed compose.yaml), as ``docker compose`` would run it
    with ``env`` in its shell or .env."""
    compose = interpolate(copy.deepcopy(compose), env)
    services: dict[str, Any] = compose.get("services") or {}
    missing = [f"no {name} service" for name in ("gateway", "postgres") if name not in services]
    if missing:
        return missing
    image = dockerfile()
    profiles = set(env.get("COMPOSE_PROFILES", "").split(","))
    return [
        *environment_problems(services, image, queue_profile=PROFILE in profiles),
        *dependency_problems(services),
        *dsn_problems(services, image),
        *volume_problems(compose.get("volumes") or {}, services, image),
        *port_problems(services, image),
        *command_problems(services, image),
    ]


def environment_problems(
    services: Mapping[str, Any], image: Mapping[str, Any], queue_profile: bool
) -> list[str]:
    """Only names the gateway reads, values it accepts, and a queue only with its profile."""
    found = []
    for name in (name for name in GATEWAY_IMAGE if name in services):
        for variable in environment(services[name]):
            if variable not in READ and not any(p.fullmatch(variable) for p in PER_UPSTREAM):
                found.append(f"{name}: {variable} is not a variable the gateway reads")
        try:
            queue = settings(services, image, name).queue_url
        except ConfigError as error:
            found.append(f"{name}: the gateway would not start: {error}")
            continue
        if name == "writer" and not queue:
            found.append("writer: MES_QUEUE is not set, and a writer reads nothing else")
        if name == "gateway" and queue and not queue_profile:
            found.append(f"gateway: MES_QUEUE is set without the {PROFILE} profile that runs Redis")
    return found


def dependency_problems(services: Mapping[str, Any]) -> list[str]:
    """Profiles as promised, and nothing waited for that is absent, off or (for the gateway,
    which serves as soon as it starts) not yet healthy."""
    found = []
    for name, service in services.items():
        profiles = service.get("profiles") or []
        wanted = [PROFILE] if name in PROFILED else []
        if profiles != wanted:
            found.append(f"{name}: profiles {profiles}, not {wanted}")
        if service.get("restart") != "unless-stopped":
            found.append(f"{name}: restart is not unless-stopped")
        depends = service.get("depends_on") or []
        for other in depends:
            condition = depends[other] if isinstance(depends, dict) else {}
            if other not in services:
                found.append(f"{name}: depends on {other}, which is not a service")
            elif set(services[other].get("profiles") or []) - set(profiles) and condition.get(
                "required", True
            ):
                found.append(f"{name}: depends on {other}, which is off when {name} is on")
            waits = condition.get("condition", "service_started")
            if name == "gateway" and waits != "service_started":
                found.append(f"gateway: waits for {other} to be {waits}")
    return found


def dsn_problems(services: Mapping[str, Any], image: Mapping[str, Any]) -> list[str]:
    """Each DSN names a service of this file, on its port, with the credentials it was made
    with."""
    found = []
    postgres = environment(services["postgres"])
    for name in (name for name in GATEWAY_IMAGE if name in services):
        for variable in DSNS:
            value = runs(services, image, name).get(variable, "").strip()
            if not value:
                continue
            url = urlsplit(value)
            scheme = url.scheme.split("+")[0]
            host, port = url.hostname, url.port or DEFAULT_PORTS.get(scheme)
            if host not in services or port != SERVERS.get(host, (None,))[0]:
                found.append(f"{name}: {variable} is {host}:{port}, no service of this file")
            elif scheme not in SERVERS[host][1]:
                found.append(f"{name}: {variable} speaks {scheme} to {host}")
            elif host == "postgres":
                user = postgres.get("POSTGRES_USER", "postgres")
                made = (user, postgres.get("POSTGRES_PASSWORD"), postgres.get("POSTGRES_DB", user))
                given = (unquote(url.username or ""), unquote(url.password or ""), url.path[1:])
                if given != made:
                    found.append(f"{name}: {variable} is not POSTGRES_USER, _PASSWORD and _DB")
    return found


def volume_problems(
    declared: Mapping[str, Any], services: Mapping[str, Any], image: Mapping[str, Any]
) -> list[str]:
    """Volumes declared and used alike; the databases' data, the spool and the archive on
    them, so that they outlive the containers."""
    used = {v for service in services.values() for v in mounts(service).values() if v}
    found = [f"volume {v} is used but not declared" for v in sorted(used - set(declared))]
    found += [f"volume {v} is declared but not used" for v in sorted(set(declared) - used)]
    for name, folder in DATA_DIRS.items():
        if name in services and not mounts(services[name]).get(folder):
            found.append(f"{name}: {folder} is not on a named volume")
    for name in (name for name in GATEWAY_IMAGE if name in services):
        # A named volume starts as the image's folder: only its VOLUMEs are the user's own.
        owned = [t for t, v in mounts(services[name]).items() if v and t in image["VOLUME"]]
        for variable in DIRS:
            folder = runs(services, image, name).get(variable)
            if folder is None and variable == "MES_ARCHIVE_DIR" and name == "gateway":
                found.append("gateway: MES_ARCHIVE_DIR is not set")
            elif folder is not None and not any(
                PurePosixPath(folder).is_relative_to(target) for target in owned
            ):
                found.append(f"{name}: {variable} {folder} is not on a volume the image owns")
    return found


def port_problems(services: Mapping[str, Any], image: Mapping[str, Any]) -> list[str]:
    """The gateway published and probed on the port it listens on, no other service
    published, and the databases' health checks the images' own tools."""
    found = [
        f"{name}: publishes a port"
        for name in services
        if name != "gateway" and services[name].get("ports")
    ]
    gateway = services["gateway"]
    try:
        port = settings(services, image, "gateway").port
    except ConfigError:
        port = None  # reported by environment_problems
    if port is not None:
        if container_ports(gateway) != [port] or port not in image["EXPOSE"]:
            found.append(f"gateway: publishes {container_ports(gateway)}, listens on {port}")
        probe = " ".join(command((gateway.get("healthcheck") or {}).get("test")) or [])
        urls = re.findall(r"https?://[^'\"\s]+", probe)
        if [urlsplit(u).port for u in urls] != [port] or not urls[0].endswith("/healthz"):
            found.append(f"gateway: health check {probe!r} is not GET /healthz on {port}")
    for name, words in (("postgres", ["pg_isready"]), ("redis", ["redis-cli", "ping"])):
        if name not in services:
            continue
        probe = " ".join(command((services[name].get("healthcheck") or {}).get("test")) or [])
        if not all(word in probe for word in words):
            found.append(f"{name}: health check {probe!r} does not run {' '.join(words)}")
    if "redis" in services:
        options = " ".join(command(services["redis"].get("command")) or [])
        for option in ("--appendonly yes", "--maxmemory-policy noeviction"):
            if option not in options:
                found.append(f"redis: not run with {option}: the stream must outlive Redis")
    return found


def command_problems(services: Mapping[str, Any], image: Mapping[str, Any]) -> list[str]:
    """The gateway built from this Dockerfile and run by its CMD; the writer the same image
    with ``writer``, and no health check, since it serves no HTTP."""
    found = []
    serve = ["python", "-m", "gateway"]
    if image["CMD"] != serve or image["ENTRYPOINT"]:
        found.append(f"Dockerfile: CMD {image['CMD']}, ENTRYPOINT {image['ENTRYPOINT']}")
    gateway = services["gateway"]
    if gateway.get("build") not in (".", {"context": "."}):
        found.append("gateway: not built from this folder's Dockerfile")
    if gateway.get("entrypoint") or command(gateway.get("command")) not in (
        None,
        serve,
        [*serve, "serve"],
    ):
        found.append(f"gateway: runs {gateway.get('entrypoint')} {gateway.get('command')}")
    if "writer" in services:
        writer = services["writer"]
        if writer.get("entrypoint") or command(writer.get("command")) != [*serve, "writer"]:
            found.append(f"writer: runs {writer.get('command')}, not python -m gateway writer")
        if writer.get("image") != gateway.get("image"):
            found.append("writer: not the gateway's image")
        if not (writer.get("healthcheck") or {}).get("disable"):
            found.append("writer: keeps the image's health check, but serves no HTTP")
    return found


ENVIRONMENTS = {
    "no .env": {},
    "the queue profile, secrets set": {
        "COMPOSE_PROFILES": PROFILE,
        "MES_QUEUE": QUEUE,
        "POSTGRES_PASSWORD": "s3cret",
        "UPSTREAM_API_KEY": "sk-upstream",
        "GATEWAY_ADMIN_KEY": "admin-key",
    },
}


@pytest.mark.parametrize("env", ENVIRONMENTS.values(), ids=ENVIRONMENTS.keys())
def test_compose_yaml_has_no_mistake(env: dict[str, str]) -> None:
    assert problems(COMPOSE, env) == []


def test_the_gateway_queues_only_with_the_profile() -> None:
    """Without MES_QUEUE in .env the gateway gets an empty one, which must mean no queue."""
    gateway = interpolate(COMPOSE["services"]["gateway"], {})
    assert environment(gateway)["MES_QUEUE"] == ""
    assert Settings.from_env(environment(gateway)).queue_url is None
    queued = interpolate(COMPOSE["services"]["gateway"], {"MES_QUEUE": QUEUE})
    assert Settings.from_env(environment(queued)).queue_url == QUEUE


def gateway_env(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]["gateway"]["environment"]


MISTAKES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "unknown variable": (
        lambda c: gateway_env(c).update(MES_SPOOL_DIRECTORY="/data/spool"),
        "MES_SPOOL_DIRECTORY is not a variable the gateway reads",
    ),
    "malformed setting": (lambda c: gateway_env(c).update(PORT="http"), "would not start"),
    "queue always on": (
        lambda c: gateway_env(c).update(MES_QUEUE=QUEUE),
        "MES_QUEUE is set without the queue profile",
    ),
    "missing dependency": (
        lambda c: c["services"]["writer"]["depends_on"].update(db={}),
        "depends on db, which is not a service",
    ),
    "gateway depends on redis": (
        lambda c: c["services"]["gateway"]["depends_on"].update(redis={}),
        "depends on redis, which is off",
    ),
    "gateway waits for postgres": (
        lambda c: c["services"]["gateway"]["depends_on"]["postgres"].update(
            condition="service_healthy"
        ),
        "waits for postgres",
    ),
    "postgres in the profile": (
        lambda c: c["services"]["postgres"].update(profiles=[PROFILE]),
        "postgres: profiles",
    ),
    "another profile": (
        lambda c: c["services"]["writer"].update(profiles=["writers"]),
        "writer: profiles",
    ),
    "wrong password": (
        lambda c: c["x-postgres-env"].update(POSTGRES_PASSWORD="other"),
        "SQL_DSN is not POSTGRES_USER, _PASSWORD and _DB",
    ),
    "wrong host": (
        lambda c: gateway_env(c).update(SQL_DSN="postgresql://mes:x@db:5432/mes"),
        "SQL_DSN is db:5432",
    ),
    "wrong port": (
        lambda c: gateway_env(c).update(MES_SQL_DSN="postgresql://mes:x@postgres:6432/mes"),
        "MES_SQL_DSN is postgres:6432",
    ),
    "undeclared volume": (lambda c: c["volumes"].pop("redis-data"), "redis-data is used"),
    "unused volume": (lambda c: c["volumes"].update(spare=None), "spare is declared"),
    "archive off the volume": (
        lambda c: gateway_env(c).update(MES_ARCHIVE_DIR="/var/lib/mes/archive"),
        "MES_ARCHIVE_DIR /var/lib/mes/archive",
    ),
    "no archive": (lambda c: gateway_env(c).pop("MES_ARCHIVE_DIR"), "MES_ARCHIVE_DIR is not set"),
    "spool on a folder the image does not own": (
        lambda c: c["services"]["gateway"].update(volumes=["gateway-data:/data/spool"]),
        "MES_SPOOL_DIR /data/spool",
    ),
    "postgres data in the container": (
        lambda c: c["services"]["postgres"].pop("volumes"),
        "postgres-data is declared",
    ),
    "another port": (lambda c: gateway_env(c).update(PORT="9000"), "listens on 9000"),
    "health check on another port": (
        lambda c: c["services"]["gateway"]["healthcheck"].update(
            test=["CMD", "python", "-c", "urlopen('http://127.0.0.1:80/healthz')"]
        ),
        "is not GET /healthz on 8000",
    ),
    "postgres published": (
        lambda c: c["services"]["postgres"].update(ports=["5432:5432"]),
        "postgres: publishes",
    ),
    "redis evicts": (
        lambda c: c["services"]["redis"].update(command="redis-server --appendonly yes"),
        "noeviction",
    ),
    "writer serves": (
        lambda c: c["services"]["writer"].update(command="python -m gateway"),
        "not python -m gateway writer",
    ),
    "writer health check": (
        lambda c: c["services"]["writer"].pop("healthcheck"),
        "serves no HTTP",
    ),
    "gateway migrates only": (
        lambda c: c["services"]["gateway"].update(command=["python", "-m", "gateway", "migrate"]),
        "gateway: runs",
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES, ids=MISTAKES.keys())
def test_each_kind_of_mistake_is_reported(mistake: str) -> None:
    make, expected = MISTAKES[mistake]
    compose = copy.deepcopy(COMPOSE)
    make(compose)
    found = problems(compose, ENVIRONMENTS["no .env"])
    assert any(expected in problem for problem in found), found
