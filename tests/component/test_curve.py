"""CURVE on the head's control socket: a registered key gets answers for its role, others get nothing."""
import threading

import pytest
import zmq

from head.config import HeadConfig
from head.server import Head
from head.store import StateStore
from runtime import head_client, keyring
from runtime.head_client import HeadRefused, HeadUnreachable


def test_curve_head_answers_only_registered_keys_by_role(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keyring.ensure_single_host(keys, "a")
    with pytest.raises(keyring.KeyFileError, match="already holds"):
        keyring.init_cluster(keys)
    cfg = HeadConfig(control="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", recovery_grace=0.0,
                     curve_dir=str(keys))
    ctx = zmq.Context()
    head = Head(cfg, StateStore(None), "tok", ctx=ctx)
    head.bind()
    monkeypatch.setattr("signal.signal", lambda *a: None)
    thread = threading.Thread(target=head.run, daemon=True)
    thread.start()
    try:
        # no keys: the handshake never completes, so the request times out (and is never processed)
        monkeypatch.setenv("TOKENRELAY_INSECURE", "1")
        with pytest.raises(HeadUnreachable):
            head_client.status(head.control_endpoint, "tok", timeout=0.5)
        monkeypatch.delenv("TOKENRELAY_INSECURE")
        # a stranger's key (its own cluster) is refused by ZAP
        other = tmp_path / "other"
        keyring.ensure_single_host(other, None)
        (other / "head.key").write_bytes((keys / "head.key").read_bytes())
        with pytest.raises(HeadUnreachable):
            head_client.status(head.control_endpoint, "tok", timeout=0.5, keys=other)
        # the operator key works; a proxy key may not deploy
        assert head_client.status(head.control_endpoint, "tok", timeout=3, keys=keys).deployments == []
        proxy_only = tmp_path / "proxy-only"
        keyring.add(keys, "proxy", "p2", out=proxy_only)
        (proxy_only / "operator-p2.key_secret").write_bytes((proxy_only / "proxy-p2.key_secret").read_bytes())
        with pytest.raises(HeadRefused, match="forbidden.*proxy-p2 may not send DeployRequest"):
            head_client.deploy(head.control_endpoint, "tok", {"name": "x"}, timeout=3, keys=proxy_only)
        refused = {tuple(s.labels.values()): s.value for m in head.metrics.registry.collect()
                   if m.name == "tokenrelay_head_auth_refused" for s in m.samples if s.name.endswith("_total")}
        assert refused[("unknown", "unknown_key")] >= 1 and refused[("proxy", "role")] == 1
    finally:
        head.stop()
        thread.join(5)
        ctx.term()
