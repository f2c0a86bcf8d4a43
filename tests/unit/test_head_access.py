"""Replica -> agent bindings (head.access with head.store): a binding lives while its agent may still run
the replica, survives a head restart, and goes when the replica's placement ends for good; a stale binding
never makes a new replica unroutable (it was: a new id equal to an old bound one had the real owner's
reports refused as replica_not_owned forever). No sockets: messages are handed to `check` by hand."""
from __future__ import annotations

from unittest import mock

from head.access import ABSENT_AGENT_RETENTION, SWEEP_INTERVAL, ControlAccess
from head.cluster import DRAIN_DELAY, ClusterState
from head.store import StateStore
from runtime.keyring import Peer
from runtime.protocol import AgentHeartbeat, AgentRegister, Capacity, ReplicaReport, ReplicaStatus
from runtime.stack_config import parse_deployment


class Registry:
    def lookup(self, key: bytes):
        return Peer("agent", key.decode().lower()), ""

    def revoked(self) -> frozenset:
        return frozenset()


class Head:
    """A head's state, store and access check, restartable on the same store file."""

    def __init__(self, store: StateStore, replicas: int = 1) -> None:
        self.store = store
        self.state = ClusterState([parse_deployment({"name": "dep", "engine": "mock", "model": "m",
                                                     "replicas": replicas})])
        self.refused: list[tuple] = []
        self.access = ControlAccess(Registry(), self.state, store, lambda *a: self.refused.append(a))

    def send(self, agent: str, msg, now: float):
        checked, refusal = self.access.check("agent-%s:%s" % (agent, agent.upper()), msg, now)
        assert refusal is None
        if isinstance(checked, AgentRegister):
            self.state.register_agent(checked, now)
        else:
            self.state.heartbeat(checked, now)
        return checked

    def register(self, agent: str, now: float, replicas=()):
        return self.send(agent, AgentRegister(1, agent, agent, Capacity(8, 1 << 34), {}, list(replicas)), now)

    def report(self, agent: str, now: float, *replica_ids: str, state: str = "ready"):
        return self.send(agent, AgentHeartbeat(agent, 1, [_report(r, state) for r in replica_ids]), now)

    def routed(self) -> list[str]:
        return [r.replica_id for r in self.state.routes()[0].replicas]


def _report(replica_id: str, state: str = "ready") -> ReplicaReport:
    st = ReplicaStatus(replica_id, True, 0, 0, 0.0, 5, 0, 0, 0, 0)
    return ReplicaReport(replica_id, "dep", state, "tcp://h:1", 1, status=st, generation=1)


def _place(head: Head, now: float) -> str:
    before = set(head.state.placements)
    head.state.reconcile(now)
    (new,) = set(head.state.placements) - before
    return new


def test_a_scaled_down_replica_is_unbound_once_unassigned_in_memory_and_on_disk(tmp_path):
    head = Head(StateStore(tmp_path / "head.db"))
    head.register("a", 0.0)
    rid = _place(head, 0.0)
    head.report("a", 1.0, rid)
    assert head.store.owners() == {rid: "a"}
    head.state.put_deployment(parse_deployment({"name": "dep", "engine": "mock", "model": "m", "replicas": 0}))
    head.state.reconcile(2.0)
    assert head.store.owners() == {rid: "a"}  # draining: still assigned, still bound
    head.state.reconcile(2.0 + DRAIN_DELAY)
    assert rid not in head.state.placements and head.store.owners() == {}
    head.store.close()
    assert StateStore(tmp_path / "head.db").owners() == {}  # the deletion was committed


def test_a_failed_replicas_and_a_deleted_deployments_bindings_go():
    head = Head(StateStore(None), replicas=2)
    head.register("a", 0.0)
    head.state.reconcile(0.0)
    failed, kept = sorted(head.state.placements)
    head.report("a", 1.0, failed, kept)
    assert head.store.owners() == {failed: "a", kept: "a"}
    head.send("a", AgentHeartbeat("a", 2, [_report(failed, "failed"), _report(kept)]), 2.0)
    head.state.reconcile(2.0)  # given up on by its agent: unassigned (replaced after a backoff)
    assert head.store.owners() == {kept: "a"}
    head.state.delete_deployment("dep")
    head.state.reconcile(3.0)
    head.state.reconcile(3.0 + DRAIN_DELAY)
    assert head.store.owners() == {}


def test_an_agent_that_leaves_stops_its_replicas_and_loses_their_bindings():
    head = Head(StateStore(None))
    head.register("a", 0.0)
    rid = _place(head, 0.0)
    head.report("a", 1.0, rid)
    head.state.agent_left("a", "shutting down")
    assert head.store.owners() == {}


def test_bindings_survive_a_head_restart_while_their_replica_runs(tmp_path):
    """The restarted head adopts the replica from its agent's report; another agent key still cannot
    claim it meanwhile."""
    head = Head(StateStore(tmp_path / "head.db"))
    head.register("a", 0.0)
    rid = _place(head, 0.0)
    head.report("a", 1.0, rid)
    head.store.close()

    head = Head(StateStore(tmp_path / "head.db"))  # restarted: no placement until agent a reports
    head.register("b", 0.0, [_report(rid)])
    assert rid not in head.state.placements and head.refused[0][1] == "replica_not_owned"
    head.register("a", 0.5, [_report(rid)])
    assert head.state.placements[rid].agent_id == "a" and head.routed() == [rid]
    assert head.store.owners() == {rid: "a"}


def test_an_agent_registering_without_a_bound_replica_loses_that_binding(tmp_path):
    """Say its host was rebuilt under the same name: the replica is gone, its binding with it."""
    head = Head(StateStore(tmp_path / "head.db"))
    head.register("a", 0.0)
    rid = _place(head, 0.0)
    head.report("a", 1.0, rid)
    head.store.close()
    head = Head(StateStore(tmp_path / "head.db"))
    head.register("a", 0.0)
    assert head.store.owners() == {}


def test_a_placed_replica_its_agent_has_not_started_yet_stays_bound():
    head = Head(StateStore(None))
    head.register("a", 0.0)
    rid = _place(head, 0.0)
    head.report("a", 1.0, rid, state="starting")
    head.register("a", 2.0)  # re-registers (head unreachable for a while) before its next report
    assert head.store.owners() == {rid: "a"}


def test_the_bindings_of_an_agent_gone_for_an_hour_are_dropped():
    """Its host was replaced: its replicas were replaced long ago; until then it might come back."""
    head = Head(StateStore(None))
    head.register("a", 0.0)
    rid = _place(head, 0.0)
    head.register("b", 0.0)
    head.report("a", 1.0, rid)
    head.report("b", 4.0)
    assert head.state.expire_agents(4.5) == ["a"]  # silent: out of routing, its binding kept
    head.report("b", SWEEP_INTERVAL)  # the sweep that finds it missing
    head.report("b", SWEEP_INTERVAL + ABSENT_AGENT_RETENTION - 1)
    assert head.store.owners() == {rid: "a"}
    head.report("b", 2 * SWEEP_INTERVAL + ABSENT_AGENT_RETENTION)
    assert head.store.owners() == {}


def test_a_new_replica_id_is_never_one_still_bound_to_another_agent():
    """The reviewer's case: dep-abcdef bound to an agent that went away; the head drew that id again
    for a replica on agent b, whose reports were then refused and the replica never routed."""
    store = StateStore(None)
    store.bind_owners([("dep-abcdef", "a")])
    head = Head(store)
    head.register("b", 0.0)
    with mock.patch("head.cluster.secrets.token_hex", side_effect=["abcdef", "abcdef", "123456"]):
        rid = _place(head, 1.0)
    assert rid == "dep-123456"
    head.report("b", 2.0, rid)
    assert head.refused == [] and head.routed() == [rid]
    assert head.state.load_of("dep") == (0, 1, 0)
