"""What the client does when a shard's actor is down: the one failover path of both transports.

Floor: serve (a Ray front-end). ``Failover`` watches the actors (a process on this node that is
gone is noticed at once, by pid, without waiting for Ray to report the death; a restarted actor is
back once it answers where it runs) and holds the one decision for a batch part whose actor cannot
serve it now (``stand_in``): build its rows here in the client, with the same reader and assembly
(``serve_while_restarting``); or wait for the restart, up to ``restart_timeout_s``; or give up
with ``ShardUnavailableError`` naming the shard. ``Patience`` is what one part has spent waiting.
Which requests were lost, and how they are made again, is the transports' business.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import ray
from ray import ObjectRef

from ..errors import ShardUnavailableError
from .placement import Fleet
from .server import ShardServer
from .settings import ServeSettings

log = logging.getLogger(__name__)

DEATH_POLL_S = 0.05  # how often a slow request checks that its actor's process still exists
# Errors by which Ray says an actor lost a call: it died (maybe restarting), cannot be reached now, or
# its answer was lost with its node (ObjectLostError: the call ran, its result lived on the lost node).
ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False


@dataclass
class Patience:
    """What one batch part has spent on its actor: the restart deadline, and retries of failed requests."""

    deadline: float | None = None  # when waiting for a restart ends (set by the first wait)
    waits: int = 0  # restart waits so far
    retries: int = 0  # failed requests retried so far


class Failover:
    """The client's view of its actors' health, and the one decision for a part whose actor is down.
    Per client (rank views have their own); copies in other processes start without a local server."""

    def __init__(self, fleet: Fleet, settings: ServeSettings):
        self.fleet, self.settings = fleet, settings
        self.node_id: str = ray.get_runtime_context().get_node_id()
        known: list[tuple[int, str]] = ray.get([actor.whereabouts.remote() for actor in fleet.actors])
        self.whereabouts: list[tuple[int, str] | None] = list(known)  # per actor: (pid, node); None: restarting
        self.homes = [node for _, node in known]  # the node each actor last ran on
        self._asked: dict[int, ObjectRef] = {}  # per restarting shard: its pending ``whereabouts`` call
        self._deaths = [0] * len(fleet.actors)
        self._local: ShardServer | None = None  # builds rows here; opened on first use, per process

    @property
    def watching(self) -> bool:
        """Whether a transport looks for dead processes itself (it builds their rows meanwhile), rather
        than waiting for Ray to report the death."""
        return self.settings.serve_while_restarting

    def all_here(self) -> bool:
        """Every actor last ran on this node (the paced transport needs that)."""
        return all(home == self.node_id for home in self.homes)

    def is_down_here(self, shard: int) -> bool:
        """Whether the shard's actor, on this node, has exited or not come back yet (checked by pid and a
        pending ``whereabouts`` call). A death past ``max_restarts`` raises ``ShardUnavailableError``."""
        known = self.whereabouts[shard]
        if known is None:  # restarting: down until it answers where it runs now
            ref = self._asked[shard]
            if not ray.wait([ref], timeout=0)[0]:
                return True
            try:
                self.whereabouts[shard] = known = ray.get(ref)
                self.homes[shard] = known[1]
            except Exception:  # noqa: BLE001 - not back: ask again
                self._asked[shard] = self.fleet.actors[shard].whereabouts.remote()
                return True
        pid, node = known
        if node != self.node_id or _running(pid):
            return False
        self._deaths[shard] += 1
        if self._deaths[shard] > self.settings.max_restarts:
            raise ShardUnavailableError(
                f"{self.fleet.names[shard]} died {self._deaths[shard]} times and cannot restart "
                f"(max_restarts={self.settings.max_restarts}); its rows cannot be served"
            )
        self.whereabouts[shard] = None
        self._asked[shard] = self.fleet.actors[shard].whereabouts.remote()
        return True

    def is_up_here(self, shard: int) -> bool:
        """The shard's actor runs, on this node."""
        if self.is_down_here(shard):
            return False
        known = self.whereabouts[shard]
        return known is not None and known[1] == self.node_id

    def is_restarting(self, shard: int) -> bool:
        """Known to be restarting while the client stands in for it: no request is made (cheap: no /proc read)."""
        return self.watching and self.whereabouts[shard] is None and self.is_down_here(shard)

    def stand_in(self, shard: int, patience: Patience, error: BaseException | None = None) -> bool:
        """The one decision for a batch part whose actor is down (restarting, or its request or call lost):
        True: build its rows here now (``serve_while_restarting``). False: waited a little for the
        restart; ask the actor again. Past ``restart_timeout_s`` of waiting: ``ShardUnavailableError``."""
        if self.settings.serve_while_restarting:
            return True
        now = time.monotonic()
        patience.deadline = patience.deadline or now + self.settings.restart_timeout_s
        if now >= patience.deadline:
            why = f"after waiting {self.settings.restart_timeout_s:g} s for its actor to restart"
            raise self.unavailable(shard, why, error)
        patience.waits += 1
        time.sleep(min(0.5, 0.05 * 2 ** min(patience.waits, 4)))  # backoff: 0.1 s up to 0.5 s
        return False

    def retry(self, shard: int, patience: Patience, error: BaseException) -> None:
        """A request failed (not a restart): wait before making it again, or after ``max_retries``
        raise ``ShardUnavailableError``."""
        if patience.retries >= self.settings.max_retries:
            raise self.unavailable(shard, f"after {self.settings.max_retries} retries", error)
        patience.retries += 1
        level = logging.WARNING if patience.retries == 1 else logging.DEBUG
        log.log(level, "%s lost a request (%s); retrying", self.fleet.names[shard], type(error).__name__)
        time.sleep(min(2.0, 0.05 * 2**patience.retries))  # backoff: 0.1 s up to 2 s

    def unavailable(self, shard: int, why: str, error: BaseException | None = None) -> ShardUnavailableError:
        """The error that ends an epoch: which shard, and why it could not be served."""
        detail = f": {error}" if error is not None else ""
        return ShardUnavailableError(f"{self.fleet.names[shard]} could not be served {why}{detail}")

    def build_here(
        self, ids: np.ndarray, epoch: int, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """A batch part built in this process, as an actor would build it (new arrays, or into ``out``)."""
        if self._local is None:
            fleet = self.fleet
            self._local = ShardServer(
                fleet.path, fleet.storage_format, 0, 1 << 62, fleet.seed, "client", fleet.cache, fleet.precision
            )
        return self._local.get_batch(ids, epoch, out)

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_local"] = None  # its mappings are per process
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.node_id = ray.get_runtime_context().get_node_id()  # where the copy runs
