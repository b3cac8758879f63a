"""The allocator's container runtime against the real Docker Engine: start, adopt, remove, fence,
restart with backoff on the injected clock, leave foreign containers alone, survive no engine.

Skips when no engine answers, except under CI=true, where that fails the run (.ci/run starts it).
"""

from __future__ import annotations

import secrets
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.errors import NotFound

from muster.agent.instances import (
    LABEL_DEPLOYMENT,
    LABEL_INSTANCE,
    LABEL_PLAN_VERSION,
    LABEL_RESOURCE,
    LABEL_RUNNER,
    InstanceSpec,
    InstanceState,
)
from muster.agent.runtime import Backoff, Runtime
from muster.clock import FakeClock
from muster.errors import InvalidInputError
from tests.images import HTTPD_COMMAND, collect_failed_connections, connect_engine, offline_image
from tests.processes import free_port, wait_until

BACKOFF = Backoff(base_s=10, cap_s=40, reset_after_s=100)
MB = 1024 * 1024


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    client = connect_engine()
    yield client
    client.close()


@pytest.fixture(scope="session")
def image(engine: Any) -> str:
    return offline_image(engine)


@pytest.fixture
def runner_id(engine: Any) -> Iterator[str]:
    """A runner id of this test's own; every container labelled with it goes at teardown."""
    runner = f"test-{secrets.token_hex(6)}"
    yield runner
    for container in engine.containers.list(
        all=True, filters={"label": f"{LABEL_RUNNER}={runner}"}
    ):
        container.remove(force=True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_runtime(runner_id: str, clock: FakeClock) -> Iterator[Callable[[], Runtime]]:
    made: list[Runtime] = []

    def make() -> Runtime:
        runtime = Runtime(runner_id, clock=clock, backoff=BACKOFF, stop_timeout_s=0)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


@pytest.fixture
def foreign(engine: Any) -> Iterator[Callable[..., Any]]:
    """Start containers Muster's runtime under test does not own; removed at teardown."""
    started: list[Any] = []

    def start(image: str, *, name: str | None = None, labels: dict[str, str] | None = None) -> Any:
        container = engine.containers.run(
            image,
            ["sleep", "600"],
            name=name or f"muster-test-foreign-{secrets.token_hex(4)}",
            labels=labels or {},
            network_mode="host",
            detach=True,
        )
        started.append(container)
        return container

    yield start
    for container in started:
        container.remove(force=True)


def spec(
    image: str,
    deployment_id: str,
    number: int = 0,
    *,
    port: int | None = None,
    plan_version: int = 1,
    memory_mb: int = 64,
) -> InstanceSpec:
    return InstanceSpec(
        deployment_id=deployment_id,
        resource_id="main",
        instance_name=f"instance-{number:010d}",
        plan_version=plan_version,
        image=image,
        memory_mb=memory_mb,
        host_ip="127.0.0.1",
        port=port or free_port(),
        command=HTTPD_COMMAND,
        env={"MODE": "test", "PORT": "overridden"},
    )


def http_get(instance: InstanceSpec) -> str:
    try:
        with urllib.request.urlopen(
            f"http://{instance.host_ip}:{instance.port}/", timeout=2
        ) as reply:
            return str(reply.read().decode())
    except OSError:
        return ""


def answers(instance: InstanceSpec) -> bool:
    return http_get(instance) == "ok\n"


def owned(engine: Any, runner_id: str) -> list[Any]:
    return list(engine.containers.list(all=True, filters={"label": f"{LABEL_RUNNER}={runner_id}"}))


def wait_serving(runtime: Runtime, desired: list[InstanceSpec]) -> list[InstanceState]:
    return wait_until(
        lambda: (
            (states := runtime.reconcile(desired))
            and all(state.service_running for state in states)
            and states
        ),
        timeout_s=30,
        what="every instance to accept connections",
    )


def kill(engine: Any, container_id: str) -> None:
    container = engine.containers.get(container_id)
    container.kill()
    wait_until(
        lambda: (container.reload(), container.status)[1] == "exited",
        timeout_s=30,
        what="the killed container to exit",
    )


def test_reconcile_runs_instances_with_labels_memory_limit_and_host_address(
    engine: Any, image: str, runner_id: str, make_runtime: Callable[[], Runtime]
) -> None:
    deployment = secrets.token_hex(16)
    desired = [spec(image, deployment, 0, memory_mb=64), spec(image, deployment, 1, memory_mb=96)]
    runtime = make_runtime()

    first = runtime.reconcile(desired)

    assert [s.instance_name for s in first] == ["instance-0000000000", "instance-0000000001"]
    assert all(s.container_started and s.last_error is None for s in first)
    states = wait_serving(runtime, desired)
    assert [s.container_id for s in states] == [s.container_id for s in first]
    assert [(s.memory_mb, s.plan_version, s.restarts) for s in states] == [(64, 1, 0), (96, 1, 0)]
    for instance, state in zip(desired, states, strict=True):
        assert answers(instance)
        attrs = engine.containers.get(state.container_id).attrs
        assert attrs["Name"] == f"/muster.{deployment}.main.{instance.instance_name}"
        assert attrs["HostConfig"]["Memory"] == instance.memory_mb * MB
        assert attrs["HostConfig"]["NetworkMode"] == "host"
        assert attrs["HostConfig"]["RestartPolicy"]["Name"] in ("no", "")
        assert attrs["Config"]["Labels"] == {
            LABEL_RUNNER: runner_id,
            LABEL_DEPLOYMENT: deployment,
            LABEL_RESOURCE: "main",
            LABEL_INSTANCE: instance.instance_name,
            LABEL_PLAN_VERSION: "1",
            "io.muster.memory-mb": str(instance.memory_mb),
        }
        env = attrs["Config"]["Env"]
        assert {"MODE=test", "HOST=127.0.0.1", f"PORT={instance.port}"} <= set(env)
    assert len(owned(engine, runner_id)) == 2


def test_a_new_runtime_adopts_running_instances_instead_of_starting_twins(
    engine: Any, image: str, runner_id: str, make_runtime: Callable[[], Runtime]
) -> None:
    deployment = secrets.token_hex(16)
    desired = [spec(image, deployment, 0), spec(image, deployment, 1)]
    before = wait_serving(make_runtime(), desired)

    after = make_runtime().reconcile(desired)

    assert [s.container_id for s in after] == [s.container_id for s in before]
    assert all(s.container_started and s.service_running and s.restarts == 0 for s in after)
    assert sorted(c.id for c in owned(engine, runner_id)) == sorted(
        str(s.container_id) for s in before
    )


def test_reconcile_removes_instances_no_longer_desired(
    engine: Any, image: str, runner_id: str, make_runtime: Callable[[], Runtime]
) -> None:
    deployment = secrets.token_hex(16)
    desired = [spec(image, deployment, 0), spec(image, deployment, 1)]
    runtime = make_runtime()
    states = wait_serving(runtime, desired)

    assert runtime.reconcile(desired[1:])[0].container_id == states[1].container_id
    assert [c.id for c in owned(engine, runner_id)] == [states[1].container_id]
    assert runtime.reconcile([]) == []
    assert owned(engine, runner_id) == []
    assert not answers(desired[0])
    assert not answers(desired[1])


def test_crashed_instance_restarts_after_its_backoff_and_not_before(
    engine: Any, image: str, clock: FakeClock, make_runtime: Callable[[], Runtime]
) -> None:
    instance = spec(image, secrets.token_hex(16))
    runtime = make_runtime()
    (started,) = wait_serving(runtime, [instance])

    kill(engine, started.container_id or "")
    (crashed,) = runtime.reconcile([instance])
    assert not crashed.container_started
    assert not crashed.service_running
    assert crashed.last_error == "exited with code 137; next start in 10s"
    clock.advance(9.9)
    (waiting,) = runtime.reconcile([instance])
    assert not waiting.container_started
    assert waiting.restarts == 0
    assert engine.containers.get(started.container_id).status == "exited"

    clock.advance(0.1)
    (restarted,) = runtime.reconcile([instance])
    assert restarted.container_started
    assert restarted.restarts == 1
    assert restarted.container_id == started.container_id
    assert restarted.last_error is None
    wait_until(lambda: answers(instance), timeout_s=30, what="the restarted instance to serve")

    kill(engine, started.container_id or "")
    (again,) = runtime.reconcile([instance])
    assert again.last_error == "exited with code 137; next start in 20s"
    clock.advance(19)
    assert not runtime.reconcile([instance])[0].container_started
    clock.advance(1)
    (twice,) = runtime.reconcile([instance])
    assert twice.container_started
    assert twice.restarts == 2


def test_backoff_starts_over_once_an_instance_has_run_a_while(
    engine: Any, image: str, clock: FakeClock, make_runtime: Callable[[], Runtime]
) -> None:
    instance = spec(image, secrets.token_hex(16))
    runtime = make_runtime()
    (started,) = runtime.reconcile([instance])
    kill(engine, started.container_id or "")
    runtime.reconcile([instance])
    clock.advance(10)
    assert runtime.reconcile([instance])[0].restarts == 1

    clock.advance(BACKOFF.reset_after_s)
    assert runtime.reconcile([instance])[0].container_started  # seen running a while
    kill(engine, started.container_id or "")

    (crashed,) = runtime.reconcile([instance])
    assert crashed.last_error == "exited with code 137; next start in 10s"


def test_a_new_runtime_restarts_an_instance_that_crashed_while_no_agent_ran(
    engine: Any, image: str, clock: FakeClock, make_runtime: Callable[[], Runtime]
) -> None:
    instance = spec(image, secrets.token_hex(16))
    (started,) = make_runtime().reconcile([instance])
    kill(engine, started.container_id or "")
    runtime = make_runtime()

    (crashed,) = runtime.reconcile([instance])
    clock.advance(BACKOFF.base_s)
    (restarted,) = runtime.reconcile([instance])

    assert not crashed.container_started
    assert crashed.container_id == started.container_id
    assert restarted.container_started
    assert restarted.container_id == started.container_id
    assert restarted.restarts == 1


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [BACKOFF.delay_s(n) for n in range(1, 6)] == [10, 20, 40, 40, 40]


def test_a_newer_plan_version_replaces_the_older_container_and_an_older_one_is_refused(
    engine: Any, image: str, runner_id: str, make_runtime: Callable[[], Runtime]
) -> None:
    deployment = secrets.token_hex(16)
    old = spec(image, deployment, plan_version=3)
    new = spec(image, deployment, plan_version=4, memory_mb=128)
    runtime = make_runtime()
    (before,) = wait_serving(runtime, [old])

    (after,) = wait_serving(runtime, [new])

    assert after.container_id != before.container_id
    assert (after.plan_version, after.memory_mb, after.restarts) == (4, 128, 0)
    with pytest.raises(NotFound):
        engine.containers.get(before.container_id)
    assert [c.labels[LABEL_PLAN_VERSION] for c in owned(engine, runner_id)] == ["4"]
    assert answers(new)
    assert not answers(old)

    # A host handed a stale plan keeps the newer container (the plan version fences it).
    (stale,) = make_runtime().reconcile([old])
    assert stale.container_id == after.container_id
    assert stale.plan_version == 4
    assert stale.last_error is not None
    assert "older than the running 4" in stale.last_error
    assert [c.id for c in owned(engine, runner_id)] == [after.container_id]


def test_containers_the_runner_does_not_own_are_left_alone(
    engine: Any,
    image: str,
    runner_id: str,
    make_runtime: Callable[[], Runtime],
    foreign: Callable[..., Any],
) -> None:
    deployment = secrets.token_hex(16)
    unlabelled = foreign(image)
    other_runner = foreign(
        image,
        labels={
            LABEL_RUNNER: f"{runner_id}-other",
            LABEL_DEPLOYMENT: deployment,
            LABEL_RESOURCE: "main",
            LABEL_INSTANCE: "instance-0000000005",
            LABEL_PLAN_VERSION: "1",
        },
    )
    runtime = make_runtime()

    wait_serving(runtime, [spec(image, deployment, 0)])
    runtime.reconcile([])

    for container in (unlabelled, other_runner):
        container.reload()
        assert container.status == "running"
    assert owned(engine, runner_id) == []


def test_a_name_taken_by_a_foreign_container_is_reported_not_raised(
    image: str, clock: FakeClock, make_runtime: Callable[[], Runtime], foreign: Callable[..., Any]
) -> None:
    instance = spec(image, secrets.token_hex(16))
    squatter = foreign(image, name=instance.container_name)
    runtime = make_runtime()

    (state,) = runtime.reconcile([instance])

    assert not state.container_started
    assert state.container_id is None
    assert state.last_error is not None
    assert "next start in 10s" in state.last_error
    squatter.reload()
    assert squatter.status == "running"
    clock.advance(5)
    assert runtime.reconcile([instance])[0].last_error == state.last_error  # waits its backoff


def test_an_image_that_cannot_be_pulled_is_reported_not_raised(
    engine: Any, runner_id: str, make_runtime: Callable[[], Runtime]
) -> None:
    instance = spec("registry.invalid/muster/nothing:1", secrets.token_hex(16))

    (state,) = make_runtime().reconcile([instance])

    assert not state.container_started
    assert state.last_error
    assert owned(engine, runner_id) == []


@pytest.mark.parametrize("where", ["missing socket", "nobody listening"])
def test_a_runtime_without_an_engine_is_unhealthy_and_does_not_raise(
    tmp_path: Path, where: str
) -> None:
    url = (
        f"unix://{tmp_path}/docker.sock"
        if where == "missing socket"
        else f"tcp://127.0.0.1:{free_port()}"
    )
    runtime = Runtime("runner", clock=FakeClock(), docker_url=url)
    instance = spec("muster-test/busybox:1", secrets.token_hex(16), port=8080)

    ok, message = runtime.health()
    (state,) = runtime.reconcile([instance])

    assert not ok
    assert message.startswith("docker unavailable: ")
    assert not state.container_started
    assert not state.service_running
    assert state.last_error is not None
    assert state.last_error.startswith("docker unavailable: ")
    assert (state.instance_name, state.plan_version, state.memory_mb) == (
        "instance-0000000000",
        1,
        64,
    )
    collect_failed_connections()


def test_a_runtime_with_an_engine_is_healthy(make_runtime: Callable[[], Runtime]) -> None:
    ok, message = make_runtime().health()

    assert ok
    assert message.startswith("docker ")


def test_an_instance_desired_twice_is_refused() -> None:
    instance = spec("muster-test/busybox:1", "d1", port=8080)
    runtime = Runtime("runner", clock=FakeClock(), docker_url="unix:///nonexistent/docker.sock")

    with pytest.raises(InvalidInputError):
        runtime.reconcile([instance, instance])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deployment_id", "a.b"),
        ("instance_name", ""),
        ("memory_mb", 0),
        ("port", 70000),
        ("host_ip", "localhost"),
        ("plan_version", -1),
    ],
)
def test_a_spec_that_cannot_name_or_size_a_container_is_refused(field: str, value: Any) -> None:
    fields = {
        "deployment_id": "d1",
        "resource_id": "main",
        "instance_name": "instance-0000000000",
        "plan_version": 1,
        "image": "muster-test/busybox:1",
        "memory_mb": 64,
        "host_ip": "127.0.0.1",
        "port": 8080,
    }
    with pytest.raises(InvalidInputError) as raised:
        InstanceSpec(**{**fields, field: value})
    assert raised.value.fields == [field]
