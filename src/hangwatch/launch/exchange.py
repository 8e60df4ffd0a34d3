"""The nodes of a job share their ranks' stacks through the job's own rendezvous store.

When a timer expires on one node, its launcher takes the stacks of its ranks (before any is
signalled) and asks the other nodes, through the job's rendezvous store (torch's c10d
``TCPStore``, the one ``--rdzv-endpoint`` or ``--master-addr``/``--master-port`` names),
to take theirs. Every node publishes what it took, so the report of each node shows where
every rank of the job was stuck, and names the culprit even when it ran on another node.
No service beyond the store the job already runs is needed.

Keys live under ``hangwatch/<rdzv id>/<round>/`` (a round is one start of the worker
groups: its ``MASTER_ADDR:MASTER_PORT``, which every node's workers share):

- ``ask``: the first node whose timer expired, and what expired (JSON);
- ``node/<n>``: node n's snapshot (:meth:`~hangwatch._evidence.GroupSnapshot.to_dict`) and
  its ranks' fates once its group ended (JSON).

And, for the whole job, under ``hangwatch/<rdzv id>/figures/``: ``count``, the number of
launchers that joined, and ``<slot>``, each launcher's per-scope figures (JSON), so that every
node learns its deadlines from every rank of the job.

The store is reached with a short timeout, from one thread per client; a store that cannot
be reached (its host node is gone) leaves each node with its own report, which says so.
"""

from __future__ import annotations

import datetime
import importlib
import json
import logging
import time
from typing import Any, Dict, Optional, Tuple

__all__ = ["StoreExchange", "store_address"]

logger = logging.getLogger("hangwatch.launch")

_TIMEOUT = 5.0  # seconds: connecting, and each store call
_RETRY = 5.0  # seconds between attempts to reach a store that could not be reached


def store_address(
    backend: str, endpoint: str, master_addr: str, master_port: Optional[int]
) -> Optional[Tuple[str, int]]:
    """Where the job's rendezvous store listens, or None where it is not a TCPStore (etcd) or not known.

    ``c10d``: the rendezvous endpoint (port 29400 when left out, as torch); ``static``: the
    endpoint if given, else ``master_addr:master_port``.
    """
    if backend == "c10d" or (backend == "static" and endpoint):
        host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, ":", "")
        host = host.strip("[]") or "localhost"
        if not port:
            return (host, 29400) if backend == "c10d" else None
        return (host, int(port)) if port.isdigit() and int(port) > 0 else None
    if backend == "static" and master_port:
        return master_addr or "127.0.0.1", master_port
    return None


class StoreExchange:
    """One client of the job's rendezvous store, for one thread.

    Args:
        address: the store's host and port.
        job: the job's rendezvous id (keys of different jobs on one store never meet).
    """

    def __init__(self, address: Tuple[str, int], job: str) -> None:
        self.address = address
        self.job = job
        self._prefix = f"hangwatch/{job}"
        self._store: Any = None
        self._failed_at = -_RETRY
        self.error: Optional[str] = None

    def another(self) -> StoreExchange:
        """A client of the same store for another thread."""
        return StoreExchange(self.address, self.job)

    def _client(self) -> Any:
        if self._store is not None:
            return self._store
        if time.monotonic() - self._failed_at < _RETRY:
            return None
        host, port = self.address
        try:
            store_type: Any = importlib.import_module("torch.distributed").TCPStore
            self._store = store_type(
                host, port, is_master=False, timeout=datetime.timedelta(seconds=_TIMEOUT), wait_for_workers=False
            )
        except Exception as exc:  # RuntimeError, DistNetworkError, TimeoutError: the store's host is gone
            self._failed_at = time.monotonic()
            self.error = f"the rendezvous store at {host}:{port} cannot be reached ({type(exc).__name__}: {exc})"
            logger.warning("hangwatch: %s", self.error)
            return None
        return self._store

    def _call(self, what: str, *args: Any) -> Any:
        store = self._client()
        if store is None:
            return None
        try:
            return getattr(store, what)(*args)
        except Exception as exc:  # the store went away: reconnect later
            self._store = None
            self._failed_at = time.monotonic()
            self.error = f"the rendezvous store stopped answering ({type(exc).__name__}: {exc})"
            return None

    def _key(self, round_key: str, name: str) -> str:
        return f"{self._prefix}/{round_key}/{name}"

    def ask(self, round_key: str, node: int, trigger: str) -> None:
        """Ask every node to take its ranks' stacks now (the first node whose timer expired asks)."""
        payload = json.dumps({"node": node, "trigger": trigger, "at": time.time()})
        self._call("compare_set", self._key(round_key, "ask"), "", payload)  # the first asker stays

    def asked(self, round_key: str, since: float) -> Optional[Dict[str, Any]]:
        """Who asked for the stacks of this round since ``since`` (``time.time()``), and why; None if nobody has."""
        value = self._load(self._key(round_key, "ask"))
        if value is None or not isinstance(value.get("at"), (int, float)) or value["at"] < since:
            return None  # an earlier round's, on the same port
        return value

    def publish(self, round_key: str, node: int, value: Dict[str, Any]) -> None:
        """Publish this node's snapshot (and, once its group ended, its ranks' fates)."""
        self._call("set", self._key(round_key, f"node/{node}"), json.dumps(value))

    def gather(
        self, round_key: str, nodes: int, me: int, until: float, since: float, *, final: bool = True
    ) -> Dict[int, Dict[str, Any]]:
        """The other nodes' publications of this round, waiting for them until ``until`` (``time.monotonic()``).

        With ``final``, it waits for each node's last publication (made once its group ended,
        with its ranks' fates), else for any.

        A publication whose stacks were taken before ``since`` (``time.time()``) is an earlier
        round's, on the same port, and is left out.
        """
        found: Dict[int, Dict[str, Any]] = {}
        wanted = [n for n in range(nodes) if n != me]
        while True:
            for node in wanted:
                if node in found:
                    continue
                key = self._key(round_key, f"node/{node}")
                value = self._read(key, since)
                if value is not None and (value.get("final") or not final):
                    found[node] = value
            if len(found) == len(wanted) or time.monotonic() >= until:
                break
            time.sleep(0.005 if not final else 0.05)
        for node in wanted:  # a node whose group has not ended yet: its snapshot as it stands
            if node not in found:
                value = self._read(self._key(round_key, f"node/{node}"), since)
                if value is not None:
                    found[node] = value
        return found

    def join_figures(self) -> Optional[int]:
        """This launcher's slot for sharing its figures (one per launcher, for the whole job); None if unreachable."""
        count = self._call("add", f"{self._prefix}/figures/count", 1)
        return None if not isinstance(count, int) else count - 1

    def share_figures(self, slot: int, figures: Dict[str, Any]) -> None:
        """Publish this launcher's per-scope figures (its own blocks only) in its slot."""
        self._call("set", f"{self._prefix}/figures/{slot}", json.dumps(figures))

    def others_figures(self, slot: int) -> Dict[int, Dict[str, Any]]:
        """The figures the other launchers of the job published, by slot."""
        count = self._call("add", f"{self._prefix}/figures/count", 0)
        found: Dict[int, Dict[str, Any]] = {}
        for other in range(count if isinstance(count, int) else 0):
            if other != slot:
                value = self._load(f"{self._prefix}/figures/{other}")
                if value is not None:
                    found[other] = value
        return found

    def _load(self, key: str) -> Optional[Dict[str, Any]]:
        """The JSON object at ``key``, if it is there and readable."""
        if not self._call("check", [key]):
            return None
        raw = self._call("get", key)
        try:
            value = json.loads(bytes(raw).decode()) if raw else None
        except (TypeError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _read(self, key: str, since: float) -> Optional[Dict[str, Any]]:
        """A node's publication, if it is there, readable, and of this round."""
        value = self._load(key)
        if value is None or not isinstance(value.get("snapshot"), dict):
            return None
        taken = value["snapshot"].get("taken_at")
        return value if isinstance(taken, (int, float)) and taken >= since else None
