"""Connecting to Ray, the one way every jasper_ray front-end does it.

No address (and no ``RAY_ADDRESS``): a new local Ray on this machine (``address="local"``; a bare
``ray.init()`` would attach to whatever cluster ``ray start`` left running here), with Ray's token
authentication and without Ray's notice about it (NOTE [token authentication of the local Ray]). An
address: that cluster, after a quick TCP check, because ``ray.init`` waits minutes on an address where
nothing listens, with this machine's token when the cluster is on this machine (NOTE [the token of a cluster on
this machine]).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from .errors import RayUnreachableError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


def require_ray(purpose: str) -> ModuleType:
    """``ray``, or an ImportError that says what needed it and how to install it."""
    try:
        import ray  # lazy: Ray is optional below the Ray front-ends; this is where they ask for it
    except ImportError as exc:
        raise ImportError(f"{purpose} needs Ray: pip install 'ray[data,train]' (or pip install jasper-ray).") from exc
    return ray


def _host_port(address: str) -> tuple[str, str] | None:
    """``(host, port)`` of a ``host:port`` address; None for those Ray resolves itself (``auto``, ``ray://``)."""
    if address in ("auto", "local") or address.startswith("ray://") or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    return host, port


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when no process listens at ``host:port`` (``auto`` is Ray's to resolve)."""
    host_port = _host_port(address)
    if host_port is None:
        return
    host, port = host_port
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise RayUnreachableError(
            f"Ray is not reachable at {address} ({exc}). Start the cluster there (`ray start --head`, or "
            f"scripts/local_cluster.sh up), fix --address / RAY_ADDRESS, or leave both out for a local Ray."
        ) from exc


# NOTE [token authentication of the local Ray]
# With RAY_AUTH_MODE unset, a new local Ray (ray.init without an address) turns token authentication on
# (RAY_AUTH_MODE=token for this process and those it starts, a token in ~/.ray/auth_token) and warns
# "Token authentication is enabled for this Ray cluster" at every start. That Ray is not loopback-only:
# its GCS and raylet listen on every interface (Ray resolves 127.0.0.1 to the machine's address), so
# the token is what keeps other machines out, and jasper_ray keeps it. Only the notice goes: a filter
# drops that one record while connect starts a local Ray. (Setting RAY_AUTH_MODE=token ourselves would
# not do: the driver reads its mode when ray is imported, before connect runs.) A RAY_AUTH_MODE the user
# set is Ray's to apply (the tests and scripts/local_cluster.sh set "disabled"); a cluster's
# authentication is the cluster's.
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"  # where Ray logs it


def _not_the_token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(TOKEN_NOTICE)


@contextlib.contextmanager
def _without_token_notice() -> Iterator[None]:
    logger = logging.getLogger(TOKEN_NOTICE_LOGGER)
    logger.addFilter(_not_the_token_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_the_token_notice)


# NOTE [the token of a cluster on this machine]: Ray turns token authentication on for a driver only when it finds
# the cluster itself (address None or "auto") and a token exists (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]); an
# explicit address never does. But ``ray start --head`` with RAY_AUTH_MODE unset turns token auth on whenever a token
# exists, and every local Ray (every jasper-ray command without --address) leaves one in ~/.ray/auth_token. So
# `ray start --head` then `jasper-ray convert --address 127.0.0.1:6379` failed after ~20 s (measured: "Failed to
# connect to Ray cluster"). For an address on this machine, with the mode unset, connect does what Ray does for
# "auto": the same cluster, the same token. A token is not sent to other machines unasked: there a failure says how
# to give it. A driver with a token connects to a cluster without authentication as well.
AUTH_HINT = (
    "If the cluster uses Ray's token authentication, set RAY_AUTH_MODE=token and give the cluster's token "
    "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); without it, RAY_AUTH_MODE=disabled on every node."
)


def _on_this_machine(host: str) -> bool:
    """Whether ``host`` is one of this machine's addresses (a socket can be bound to it)."""
    try:
        with socket.socket() as probe:
            probe.bind((socket.gethostbyname(host), 0))
    except OSError:
        return False
    return True


def _token_auth_for_this_machine(address: str) -> None:
    host_port = _host_port(address)
    if "RAY_AUTH_MODE" in os.environ or host_port is None or not _on_this_machine(host_port[0]):
        return  # the user's mode, an address Ray resolves itself, or another machine (NOTE above)
    try:  # Ray's own step for "auto", private: where it is missing, Ray's behaviour is left as it is
        from ray._private.authentication.authentication_token_setup import (  # lazy: Ray is optional below here
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect(address: str | None = None, *, num_cpus: int | None = None, **init_kwargs: Any) -> bool:
    """Make sure Ray is up; return True when this call started it (the caller then shuts it down)."""
    ray = require_ray("Connecting to Ray")

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    init_kwargs.setdefault("log_to_driver", False)
    if address:
        check_reachable(address)
        with _without_token_notice():
            _token_auth_for_this_machine(address)  # NOTE [the token of a cluster on this machine]
        try:
            ray.init(address=address, **init_kwargs)
        except ConnectionError as exc:
            raise RayUnreachableError(f"{exc}. {AUTH_HINT}") from exc
    else:
        with _without_token_notice():  # NOTE [token authentication of the local Ray]
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **init_kwargs)
    return True


# NOTE [the monitor's second]: ray.shutdown stops a local Ray's processes one at a time, each with SIGTERM and up
# to 1 s to exit before SIGKILL. The autoscaler's monitor is stopped after the GCS, and its SIGTERM handler reports
# its own end to that GCS, which is gone: it never exits in time, so every shutdown waited the whole second
# (1.02 s of 1.37 s on 2 cores; scripts/diag_ray_costs.py measures it) and then killed it. A local Ray has no
# autoscaler to stop, so ``shutdown`` kills the monitor at once, as Ray itself would a second later, and leaves
# the rest to ``ray.shutdown``. Ray's node object is private: where it is not what this expects, Ray's own way.
def shutdown() -> None:
    """``ray.shutdown()`` without the second it waits on the autoscaler's monitor of a Ray this process started."""
    ray = require_ray("Stopping Ray")
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    kill_monitor = getattr(node, "kill_monitor", None)
    if getattr(node, "head", False) and callable(kill_monitor):
        try:
            kill_monitor(check_alive=False)
        except Exception as exc:  # noqa: BLE001 - ray.shutdown below stops it Ray's way
            log.debug("could not kill Ray's monitor first (%s); ray.shutdown stops it", exc)
    ray.shutdown()
