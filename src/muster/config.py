"""Settings: what a host runs with, validated once when `muster install` or `muster start` begins
(flags over `MUSTER_*` environment variables over host.json over defaults), frozen, and passed
in; and reading and writing host.json."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from muster.address import check_database_url, host_port
from muster.domain.heartbeats import DEFAULT_HEARTBEAT_BUDGET, DEFAULT_MAX_INTERVAL_S
from muster.domain.models import ROLES
from muster.errors import InvalidInputError
from muster.hoststate import HostPaths, write_json
from muster.logs import LogFormat

ENV_PREFIX = "MUSTER_"
# More worker processes than cores only adds context switches; the cap keeps a typo from
# forking hundreds of servers.
MAX_WORKERS = 64
# The names a join accepts for zones and runner ids (muster.domain.runners checks them again).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")

# What the environment may set for one run. The rest of host.json is what the host's join
# established (its roles, runner id, address, port): its certificate and the platform's records
# say the same, so only host.json (written by the install) may hold them.
ENV_KEYS = (
    "database_url",
    "workers",
    "read_timeout_s",
    "agent_max_backoff_s",
    "bench_routes",
    "log_format",
    "lost_allocator_grace_s",
    "heartbeat_budget",
    "heartbeat_max_interval_s",
)
# The flag that sets each key, for error messages.
FLAGS = {
    "api_port": "--api-port",
    "availability_zone": "--availability-zone",
    "bind": "--bind",
    "database_url": "--database-url",
    "heartbeat_interval_s": "--heartbeat-interval",
    "heartbeat_budget": "--heartbeat-budget",
    "heartbeat_max_interval_s": "--heartbeat-max-interval",
    "host_ip": "--host-ip",
    "lost_allocator_grace_s": "--lost-allocator-grace",
    "region": "--region",
    "runner_id": "--runner-id",
    "workers": "--workers",
}
# host.json must name these; every other key has a default.
REQUIRED_KEYS = ("roles", "runner_id", "host_ip", "availability_zone")


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a port number from 1 to 65535, got {value}")
    return value


def _workers(value: object) -> object:
    # A JSON `true` or a fraction would otherwise pass as 1 or be rounded.
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"must be a whole number of server processes, got {value!r}")
    return value


def _worker_count(value: int) -> int:
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(
            f"must be a whole number of server processes from 1 to {MAX_WORKERS} (one per CPU "
            f"core is the most that helps), got {value}"
        )
    return value


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"{value!r} is not a name: 1-255 letters, digits, '.', '_', ':' or '-', starting with "
            "a letter or digit"
        )
    return value


def _ip_or_unset(value: str) -> str:
    if value:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
    return value


def _name_or_unset(value: str) -> str:
    return _name(value) if value else value


def _address(value: str) -> str:
    """What the server binds: '' or '0.0.0.0' (every address), an IP address or a host name."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if value:
            _name(value)
    return value


def _roles(value: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [role for role in value if role not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    return value


def _database_url(value: SecretStr | None) -> SecretStr | None:
    if value is not None:
        try:
            check_database_url(value.get_secret_value())
        except InvalidInputError as exc:
            raise ValueError(exc.message) from None
    return value


Port = Annotated[int, AfterValidator(_port)]
Workers = Annotated[int, BeforeValidator(_workers), AfterValidator(_worker_count)]
Seconds = Annotated[float, Field(gt=0, le=24 * 3600)]


class Settings(BaseSettings):
    """This host's settings: host.json's keys, plus what one run may add (`bench_routes`).

    `roles`, `runner_id`, `host_ip` and `coordinators` are left empty until the install has
    joined the platform; host.json always holds them."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    roles: Annotated[tuple[str, ...], AfterValidator(_roles)] = ()
    runner_id: Annotated[str, AfterValidator(_name_or_unset)] = ""
    host_ip: Annotated[str, AfterValidator(_ip_or_unset)] = ""
    availability_zone: Annotated[str, AfterValidator(_name)] = "ece-zone-1"
    coordinators: tuple[str, ...] = ()  # host:port of known coordinators
    api_port: Port = 12443
    bind: Annotated[str, AfterValidator(_address)] = "0.0.0.0"
    region: Annotated[str, AfterValidator(_name)] = "ece-region"
    heartbeat_interval_s: Annotated[float, Field(ge=0.2, le=3600)] = 10.0
    # The heartbeats per second the whole platform is held to: a larger fleet is told a longer
    # interval (never under heartbeat_interval_s, at most heartbeat_max_interval_s or
    # heartbeat_interval_s if longer). `--heartbeat-budget`, `--heartbeat-max-interval`.
    heartbeat_budget: Annotated[float, Field(ge=1, le=1_000_000)] = DEFAULT_HEARTBEAT_BUDGET
    heartbeat_max_interval_s: Annotated[float, Field(ge=1, le=3600)] = DEFAULT_MAX_INTERVAL_S
    # May carry the database password: a SecretStr shows `**********` in repr() and logs.
    database_url: Annotated[SecretStr | None, AfterValidator(_database_url)] = None
    serves_api: bool = False
    # Hardening knobs (docs/security.md): the time a client has to send a whole request, and the
    # longest wait of the agent between attempts while no coordinator answers.
    read_timeout_s: Seconds = 30.0
    agent_max_backoff_s: Seconds = 60.0
    # How long an allocator may stay disconnected before its instances are placed elsewhere
    # (`--lost-allocator-grace`, docs/deployments.md).
    lost_allocator_grace_s: Annotated[float, Field(ge=1, le=7 * 24 * 3600)] = 300.0
    # A proxy host's HAProxy ports: plain HTTP and HTTPS (`--proxy-http-port`,
    # `--proxy-https-port`; ECE's 9200 and 9243).
    proxy_http_port: Port = 9200
    proxy_https_port: Port = 9243
    # Coordinator server processes on this host (`--workers`, docs/high-availability.md).
    workers: Workers = 1
    # How the server writes its log lines: "text" or one JSON object a line (`--log-format`).
    log_format: LogFormat = "text"
    # The benchmark's floor route (bench/, muster.api.edge): MUSTER_BENCH_ROUTES=1 only,
    # never kept in host.json, never set in production.
    bench_routes: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what is passed in: `load_settings` reads the environment, once, at the top.
        return (init_settings,)

    def store_url(self, paths: HostPaths) -> str:
        """The store's URL: `database_url`, else the SQLite file under the storage path."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return paths.sqlite_url

    def advertised_address(self) -> str:
        """host:port where other hosts reach this host's API."""
        return host_port(self.host_ip, self.api_port)

    def local_api_address(self) -> str:
        """Where this host itself reaches its API: loopback when the server listens on every
        address, else the one address it listens on (a loopback connection would be refused)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.bind, self.bind)
        return host_port(host, self.api_port)

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, validated like the original. Raises InvalidInputError."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return _validated({**values, **changes}, {key: key for key in changes})

    def host_json(self) -> dict[str, Any]:
        """What host.json keeps: every key but the run's own, the database URL in clear."""
        data = self.model_dump(mode="json", exclude={"bench_routes"})
        if self.database_url is not None:
            data["database_url"] = self.database_url.get_secret_value()
        return data


HOST_KEYS = tuple(name for name in Settings.model_fields if name != "bench_routes")


def load_settings(flags: Mapping[str, object], saved: Settings | None = None) -> Settings:
    """The run's settings: the `flags` given (None: not given) over the `MUSTER_*` environment
    variables of ENV_KEYS over `saved` (host.json) over the defaults. Reads the environment;
    call it once, where the command starts. Raises InvalidInputError naming the flag or
    variable of a bad value."""
    source = EnvSettingsSource(Settings)
    env: dict[str, object] = {}
    for key in ENV_KEYS:  # only these: a variable for another key is not even parsed
        value, _name, _complex = source.get_field_value(Settings.model_fields[key], key)
        if value not in (None, ""):
            env[key] = value
    given = {key: value for key, value in flags.items() if value is not None}
    base = {} if saved is None else {name: getattr(saved, name) for name in HOST_KEYS}
    origin = {key: f"{ENV_PREFIX}{key.upper()}" for key in env}
    origin |= {key: FLAGS.get(key, "--" + key.replace("_", "-")) for key in given}
    return _validated({**base, **env, **given}, origin)


def read_host_file(paths: HostPaths) -> dict[str, Any] | None:
    """host.json's object as written, or None if there is none. Raises InvalidInputError if it
    cannot be read, is not a JSON object, names an unknown key or lacks a required one."""
    path = paths.host_file
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidInputError(f"cannot read {path}: {reason}", fields=["host.json"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"{path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            fields=["host.json"],
        ) from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: expected a JSON object", fields=["host.json"])
    # An unknown key is refused rather than dropped: a misspelt one (`read_timeout` for
    # `read_timeout_s`) would otherwise be ignored while the operator believes it applies.
    unknown = sorted(set(data) - set(HOST_KEYS))
    if unknown:
        raise InvalidInputError(
            f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(HOST_KEYS)}",
            fields=[unknown[0]],
        )
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise InvalidInputError(f"{path}: {missing[0]} is missing", fields=[missing[0]])
    return data


def load_host(paths: HostPaths) -> Settings | None:
    """The settings host.json holds (no flags, no environment), or None when the path holds no
    installation. Raises InvalidInputError naming the file and the key at fault."""
    data = read_host_file(paths)
    if data is None:
        return None
    return _validated(data, {key: f"{paths.host_file}: {key}" for key in data})


def save_host(paths: HostPaths, settings: Settings) -> None:
    """Write host.json (0600: it may hold the database password)."""
    write_json(paths.host_file, settings.host_json())


def _validated(values: Mapping[str, object], origin: Mapping[str, str]) -> Settings:
    try:
        return Settings.model_validate(dict(values))
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else ""
        raise InvalidInputError(
            f"{origin.get(key, key)}: {_message(error)}", fields=[key] if key else []
        ) from None


def _message(error: Any) -> str:
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    if error["type"] == "extra_forbidden":
        return "unknown setting"
    message = str(error["msg"])
    message = message[:1].lower() + message[1:]
    if (
        error["loc"] and error["loc"][0] != "database_url"
    ):  # never echo a URL: it may hold a password
        message += f", got {error['input']!r}"
    return message
