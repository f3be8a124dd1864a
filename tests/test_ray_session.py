"""``ray_session.connect``: the local Ray it starts keeps Ray's token authentication but not Ray's notice
about it at every start; a cluster address gets ``ray.init`` (with this machine's token when the cluster is on
this machine, and a hint about tokens when Ray refuses). ``ray_session.shutdown`` stops that Ray
whole, the autoscaler's monitor first and at once (NOTE [the monitor's second])."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from _support import REPO, subprocess_env

from jasper_ray import ray_session
from jasper_ray.errors import RayUnreachableError
from jasper_ray.ray_session import AUTH_HINT, TOKEN_NOTICE, TOKEN_NOTICE_LOGGER, connect

NOTICE = f"{TOKEN_NOTICE}. Set RAY_AUTH_MODE=disabled to opt out."
OTHER = "Token authentication is disabled for this Ray cluster."


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """What Ray's authentication logger emits (Ray's loggers do not propagate to pytest's capture)."""
    handler, logger = Messages(), logging.getLogger(TOKEN_NOTICE_LOGGER)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.fixture
def fake_init(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``ray.init`` replaced by one that logs Ray's notice and another warning, as Ray's would."""
    calls: list[str] = []

    def init(**kwargs: object) -> None:
        calls.append(str(kwargs.get("address")))
        for message in (NOTICE, OTHER):
            logging.getLogger(TOKEN_NOTICE_LOGGER).warning(message)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray_session, "check_reachable", lambda address: None)
    return calls


def test_the_local_ray_starts_without_the_token_notice(fake_init: list[str], logged: list[str]) -> None:
    assert connect() is True
    assert fake_init == ["local"]
    assert logged == [OTHER]  # only that notice goes
    assert not logging.getLogger(TOKEN_NOTICE_LOGGER).filters  # and only while Ray starts


def test_a_cluster_address_gets_plain_ray_init(fake_init: list[str], logged: list[str]) -> None:
    assert connect("10.0.0.1:6379") is True
    assert fake_init == ["10.0.0.1:6379"]
    assert logged == [NOTICE, OTHER]


def test_a_refused_connection_says_how_to_give_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(**kwargs: object) -> None:
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(ray_session, "check_reachable", lambda address: None)
    with pytest.raises(RayUnreachableError) as raised:
        connect("10.0.0.1:6379")
    assert str(raised.value) == f"Failed to connect to Ray cluster at 10.0.0.1:6379. {AUTH_HINT}"


def test_this_machine_is_told_from_others() -> None:
    assert ray_session._on_this_machine("127.0.0.1")
    assert ray_session._on_this_machine("localhost")
    assert ray_session._on_this_machine(socket.gethostname())
    assert not ray_session._on_this_machine("192.0.2.254")  # TEST-NET-1: documentation only, never this machine
    assert not ray_session._on_this_machine("no-such-host.invalid")


def test_an_address_on_this_machine_connects_with_its_token(tmp_path: Path) -> None:
    """NOTE [the token of a cluster on this machine]: once a token exists (every local Ray leaves one), ``ray start
    --head`` with the mode unset has token authentication on. ``connect`` to its address, mode unset, gets in: Ray's
    plain ``ray.init`` failed here after ~20 s ("Failed to connect to Ray cluster")."""
    home = tmp_path / "home"
    state = Path(tempfile.mkdtemp(prefix="jrt-", dir="/tmp"))  # short: Ray's socket paths must fit AF_UNIX
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in subprocess_env().items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(HOME=str(home), JASPER_CLUSTER_DIR=str(state), JASPER_CLUSTER_PORT=str(port))
    script = str(REPO / "scripts" / "local_cluster.sh")
    generated = subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, timeout=120)
    assert generated.returncode == 0 and (home / ".ray" / "auth_token").is_file(), generated.stderr[-2000:]
    # The head as `ray start --head` with the mode unset and that token makes it (local_cluster.sh would disable it).
    up = subprocess.run([script, "up", "0"], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        code = f"""if True:
            import os, ray
            from jasper_ray.ray_session import connect
            assert connect("127.0.0.1:{port}")
            assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42
            print("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE"))
            """
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert "RAY_AUTH_MODE token" in run.stdout
        assert TOKEN_NOTICE not in run.stdout + run.stderr
    finally:
        down = subprocess.run([script, "down"], env=env, capture_output=True, text=True, timeout=300)
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0, down.stderr


def test_a_real_local_ray_keeps_token_auth_says_nothing_of_it_and_stops_whole() -> None:
    code = """if True:
        import os, ray
        import ray._private.node as node
        from jasper_ray.ray_session import connect, shutdown

        kills, kill = [], node.Node._kill_process_impl
        def recorded(self, process_type, *args, **kwargs):
            kills.append((process_type, kwargs.get("allow_graceful", False)))
            return kill(self, process_type, *args, **kwargs)
        node.Node._kill_process_impl = recorded

        assert connect(num_cpus=1)
        assert ray.get(ray.remote(lambda: 1 + 1).remote()) == 2
        print("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE"))
        started = ray._private.worker._global_node.all_processes
        processes = {kind: [info.process for info in infos] for kind, infos in started.items()}
        shutdown()
        assert not ray.is_initialized()
        assert kills[0] == ("monitor", False), kills  # killed first, without the graceful second
        assert {kind for kind, _ in kills} == set(processes), (kills, list(processes))
        alive = [kind for kind, procs in processes.items() for p in procs if p.poll() is None]
        assert not alive, alive
        print("stopped", sorted(processes))
        """
    env = {k: v for k, v in subprocess_env().items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "RAY_AUTH_MODE token" in run.stdout  # Ray's default, kept: the local Ray listens beyond loopback
    assert "Token authentication is enabled" not in run.stdout + run.stderr
    assert "'monitor'" in run.stdout and "'raylet'" in run.stdout  # a local head node's processes, all stopped
