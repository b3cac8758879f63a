"""Settings (muster.config): each bad value is refused with a message naming its flag, variable
or host.json key; flags over MUSTER_* variables over host.json; frozen; host.json round-trips;
the database password never shows in repr()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from muster.address import host_port
from muster.config import HOST_KEYS, Settings, load_host, load_settings, save_host
from muster.errors import InvalidInputError
from muster.hoststate import HostPaths
from muster.storage import open_store

PASSWORD = "s3cret-pw"
PG_URL = f"postgresql://muster:{PASSWORD}@db.example:5432/muster"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the caller's MUSTER_* variables (a developer's shell may set some)."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("MUSTER_"):
            monkeypatch.delenv(name)


def installed(**changes: object) -> Settings:
    values: dict[str, object] = {
        "roles": ("coordinator", "allocator"),
        "runner_id": "10.0.0.1",
        "host_ip": "10.0.0.1",
        "availability_zone": "ece-zone-1",
        "serves_api": True,
    }
    return Settings.model_validate({**values, **changes})


def write_host_json(tmp_path: Path, data: object) -> HostPaths:
    paths = HostPaths(tmp_path)
    paths.host_file.write_text(json.dumps(data))
    return paths


# -- each bad value, and its message ------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"database_url": "mysql://x/y"},
            "--database-url: unsupported database URL scheme 'mysql'",
        ),
        ({"database_url": "sqlite://"}, "--database-url: the SQLite store needs a file path"),
        ({"database_url": "sqlite:///:memory:"}, "--database-url: the SQLite store needs a file"),
        ({"database_url": "postgresql://h:port/db"}, "--database-url: the database URL's host"),
        ({"database_url": "db.example/muster"}, "--database-url: not a database URL"),
        ({"api_port": 0}, "--api-port: must be a port number from 1 to 65535, got 0"),
        ({"api_port": 70000}, "--api-port: must be a port number from 1 to 65535, got 70000"),
        ({"api_port": "https"}, "--api-port: input should be a valid integer"),
        ({"availability_zone": "zone 1"}, "--availability-zone: 'zone 1' is not a name"),
        ({"availability_zone": ""}, "--availability-zone: '' is not a name"),
        ({"region": "-region"}, "--region: '-region' is not a name"),
        ({"runner_id": "host/1"}, "--runner-id: 'host/1' is not a name"),
        ({"host_ip": "10.0.0.300"}, "--host-ip: '10.0.0.300' is not an IP address"),
        ({"bind": "every address"}, "--bind: 'every address' is not a name"),
        ({"heartbeat_interval_s": 0.1}, "--heartbeat-interval: input should be greater than"),
        ({"heartbeat_interval_s": "often"}, "--heartbeat-interval: input should be a valid number"),
        ({"heartbeat_budget": 0}, "--heartbeat-budget: input should be greater than or equal"),
        ({"heartbeat_max_interval_s": 0.5}, "--heartbeat-max-interval: input should be greater"),
        ({"workers": 0}, "--workers: must be a whole number of server processes from 1 to 64"),
        ({"workers": 65}, "--workers: must be a whole number of server processes from 1 to 64"),
        ({"workers": "two"}, "--workers: input should be a valid integer"),
        ({"workers": True}, "--workers: must be a whole number of server processes, got True"),
        ({"workers": 1.5}, "--workers: must be a whole number of server processes, got 1.5"),
    ],
)
def test_a_bad_flag_is_refused_naming_it(flags: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        load_settings(flags)
    assert refused.value.message.startswith(message), refused.value.message
    assert "\n" not in refused.value.message
    assert refused.value.fields == [next(iter(flags))]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MUSTER_DATABASE_URL", "mysql://x/y", "MUSTER_DATABASE_URL: unsupported database URL"),
        ("MUSTER_WORKERS", "lots", "MUSTER_WORKERS: input should be a valid integer"),
        ("MUSTER_READ_TIMEOUT_S", "-1", "MUSTER_READ_TIMEOUT_S: input should be greater than 0"),
        ("MUSTER_AGENT_MAX_BACKOFF_S", "soon", "MUSTER_AGENT_MAX_BACKOFF_S: input should be a"),
        ("MUSTER_BENCH_ROUTES", "perhaps", "MUSTER_BENCH_ROUTES: input should be a valid bool"),
        ("MUSTER_HEARTBEAT_BUDGET", "many", "MUSTER_HEARTBEAT_BUDGET: input should be a valid"),
    ],
)
def test_a_bad_variable_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidInputError) as refused:
        load_settings({})
    assert refused.value.message.startswith(message), refused.value.message


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("api_port", 99999, "api_port: must be a port number from 1 to 65535, got 99999"),
        ("workers", 0, "workers: must be a whole number of server processes from 1 to 64"),
        ("roles", ["janitor"], "roles: unknown role 'janitor'"),
        ("roles", "allocator", "roles: input should be a valid tuple"),
        ("availability_zone", "zone one", "availability_zone: 'zone one' is not a name"),
        ("read_timeout_s", "slow", "read_timeout_s: input should be a valid number"),
        ("serves_api", "perhaps", "serves_api: input should be a valid boolean"),
        ("database_url", "mysql://x/y", "database_url: unsupported database URL scheme"),
    ],
)
def test_a_bad_host_json_value_is_refused_naming_the_file_and_key(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    paths = write_host_json(tmp_path, {**installed().host_json(), key: value})
    with pytest.raises(InvalidInputError) as refused:
        load_host(paths)
    assert refused.value.message.startswith(f"{paths.host_file}: {message}"), refused.value.message


def test_an_unknown_host_json_key_is_refused_not_dropped(tmp_path: Path) -> None:
    # A misspelt key must not be silently ignored while the operator believes it applies.
    paths = write_host_json(tmp_path, {**installed().host_json(), "read_timeout": 5})
    with pytest.raises(InvalidInputError, match="unknown key 'read_timeout'; the keys are"):
        load_host(paths)


def test_the_run_only_bench_switch_is_not_a_host_json_key(tmp_path: Path) -> None:
    paths = write_host_json(tmp_path, {**installed().host_json(), "bench_routes": True})
    with pytest.raises(InvalidInputError, match="unknown key 'bench_routes'"):
        load_host(paths)


def test_a_host_json_without_a_runner_id_is_refused(tmp_path: Path) -> None:
    data = installed().host_json()
    del data["runner_id"]
    with pytest.raises(InvalidInputError, match=r"host\.json: runner_id is missing"):
        load_host(write_host_json(tmp_path, data))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", r"host\.json is not valid JSON: .* \(line 1, column 2\)"),
        ("[1, 2]", r"host\.json: expected a JSON object"),
        ("", r"host\.json is not valid JSON"),
    ],
)
def test_a_host_json_that_is_not_a_json_object_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    paths = HostPaths(tmp_path)
    paths.host_file.write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        load_host(paths)


def test_an_unreadable_host_json_is_refused(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    paths.host_file.mkdir()  # unreadable as a file, even for root
    with pytest.raises(InvalidInputError, match=r"cannot read .*host\.json: Is a directory"):
        load_host(paths)


def test_no_host_json_is_no_installation(tmp_path: Path) -> None:
    assert load_host(HostPaths(tmp_path)) is None


# -- where each value comes from ------------------------------------------------------------------
def test_flags_win_over_variables_which_win_over_host_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = HostPaths(tmp_path)
    save_host(paths, installed(workers=2, read_timeout_s=12.0))
    saved = load_host(paths)
    assert saved is not None
    assert load_settings({}, saved).workers == 2
    monkeypatch.setenv("MUSTER_WORKERS", "3")
    assert load_settings({}, saved).workers == 3
    assert load_settings({"workers": None}, saved).workers == 3  # None: the flag was not given
    assert load_settings({"workers": 4}, saved).workers == 4
    assert load_settings({"workers": 4}, saved).read_timeout_s == 12.0
    monkeypatch.setenv("MUSTER_DATABASE_URL", PG_URL)
    assert load_settings({}, saved).store_url(paths) == PG_URL
    flag = "postgresql://other@db.example/muster"
    assert load_settings({"database_url": flag}, saved).store_url(paths) == flag


def test_without_a_url_the_store_is_the_sqlite_file_under_the_storage_path(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    assert installed().store_url(paths) == f"sqlite:///{tmp_path}/coordinator/muster.db"
    assert installed().store_url(paths) == paths.sqlite_url


def test_a_bad_variable_is_named_even_when_host_json_has_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUSTER_WORKERS", "0")
    with pytest.raises(InvalidInputError, match=r"^MUSTER_WORKERS: must be a whole number"):
        load_settings({}, installed(workers=2))


def test_the_environment_cannot_change_what_the_join_established(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The certificate and the platform's records name the runner, its roles and its port.
    for name, value in [
        ("MUSTER_RUNNER_ID", "someone-else"),
        ("MUSTER_ROLES", '["director"]'),
        ("MUSTER_COORDINATORS", "not JSON"),
        ("MUSTER_API_PORT", "1"),
        ("MUSTER_SERVES_API", "false"),
    ]:
        monkeypatch.setenv(name, value)
    settings = load_settings({}, installed())
    assert settings == installed()


def test_the_bench_route_is_on_only_when_its_variable_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings({}, installed()).bench_routes is False
    monkeypatch.setenv("MUSTER_BENCH_ROUTES", "1")
    assert load_settings({}, installed()).bench_routes is True
    assert "bench_routes" not in load_settings({}, installed()).host_json()


def test_building_settings_directly_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSTER_WORKERS", "5")
    monkeypatch.setenv("MUSTER_DATABASE_URL", "mysql://x/y")
    assert Settings().workers == 1
    assert Settings().database_url is None


# -- frozen, secrets, host.json ------------------------------------------------------------------
def test_settings_are_frozen() -> None:
    settings = installed()
    with pytest.raises(ValidationError, match="frozen"):
        settings.workers = 3  # type: ignore[misc]
    assert settings.workers == 1


def test_replace_validates_the_copy_and_leaves_the_original() -> None:
    settings = installed()
    assert settings.replace(workers=3).workers == 3
    assert settings.workers == 1
    with pytest.raises(InvalidInputError, match=r"^api_port: must be a port number"):
        settings.replace(api_port=-1)


def test_the_database_password_never_shows_in_repr_or_str() -> None:
    settings = installed(database_url=PG_URL)
    for shown in (repr(settings), str(settings), repr(settings.database_url)):
        assert PASSWORD not in shown
        assert "**********" in shown


def test_a_bad_url_message_never_repeats_the_url() -> None:
    url = f"mysql://muster:{PASSWORD}@db.example/muster"
    with pytest.raises(InvalidInputError) as refused:
        load_settings({"database_url": url})
    assert PASSWORD not in refused.value.message


def test_host_json_round_trips_with_the_url_in_clear_and_mode_0600(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    original = installed(
        database_url=PG_URL, coordinators=("10.0.0.2:12443", "[fd00::3]:12443"), workers=3
    )
    save_host(paths, original)
    assert load_host(paths) == original
    stored = json.loads(paths.host_file.read_text())
    assert stored["database_url"] == PG_URL  # the coordinator needs it to open its store
    assert sorted(stored) == sorted(HOST_KEYS)
    assert paths.host_file.stat().st_mode & 0o777 == 0o600


def test_host_json_of_an_older_install_still_loads(tmp_path: Path) -> None:
    # Written before `workers`, `read_timeout_s` and `agent_max_backoff_s` existed.
    old = installed().host_json()
    for key in ("workers", "read_timeout_s", "agent_max_backoff_s"):
        del old[key]
    loaded = load_host(write_host_json(tmp_path, old))
    assert loaded == installed()


# -- addresses and stores ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.0.0.1", "10.0.0.1:12443"),
        ("coordinator.example", "coordinator.example:12443"),
        ("fd00::1", "[fd00::1]:12443"),
        ("[fd00::1]", "[fd00::1]:12443"),
    ],
)
def test_host_port_puts_ipv6_addresses_in_brackets(host: str, expected: str) -> None:
    assert host_port(host, 12443) == expected


@pytest.mark.parametrize(
    ("bind", "local"),
    [("0.0.0.0", "127.0.0.1:9443"), ("::", "[::1]:9443"), ("fd00::7", "[fd00::7]:9443")],
)
def test_the_host_reaches_its_own_api_where_the_server_listens(bind: str, local: str) -> None:
    settings = installed(bind=bind, api_port=9443, host_ip="fd00::2")
    assert settings.local_api_address() == local
    assert settings.advertised_address() == "[fd00::2]:9443"


def test_open_store_refuses_an_unsupported_scheme_as_invalid_input() -> None:
    with pytest.raises(InvalidInputError, match="unsupported database URL scheme 'mysql'"):
        open_store("mysql://x/y")
