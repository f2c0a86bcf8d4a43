"""CURVE on the head's control socket: an authorized client gets answers, others get nothing."""
import threading

import pytest
import zmq

from head.config import HeadConfig
from head.server import Head
from head.store import StateStore
from runtime import curve, head_client
from runtime.head_client import HeadUnreachable


def test_curve_head_answers_only_authorized_clients(tmp_path, monkeypatch):
    keys_dir = tmp_path / "keys"
    curve.generate(keys_dir)
    with pytest.raises(curve.CurveConfigError, match="already holds keys"):
        curve.generate(keys_dir)
    cfg = HeadConfig(control="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", recovery_grace=0.0,
                     curve_dir=str(keys_dir))
    ctx = zmq.Context()
    head = Head(cfg, StateStore(None), "tok", ctx=ctx)
    head.bind()
    real_signal = __import__("signal").signal
    monkeypatch.setattr("signal.signal", lambda *a: None)
    thread = threading.Thread(target=head.run, daemon=True)
    thread.start()
    try:
        # no keys: the handshake never completes, so the request times out (and is never processed)
        with pytest.raises(HeadUnreachable):
            head_client.status(head.control_endpoint, "tok", timeout=0.5)
        # a stranger's keypair is refused by ZAP
        stranger = tmp_path / "stranger"
        curve.generate(stranger)
        (stranger / "server.key").write_bytes((keys_dir / "server.key").read_bytes())
        (stranger / "server.key_secret").unlink()
        monkeypatch.setenv(curve.CURVE_ENV, str(stranger))
        with pytest.raises(HeadUnreachable):
            head_client.status(head.control_endpoint, "tok", timeout=0.5)
        # the cluster's client keypair works
        monkeypatch.setenv(curve.CURVE_ENV, str(keys_dir))
        assert head_client.status(head.control_endpoint, "tok", timeout=3).deployments == []
    finally:
        head.stop()
        thread.join(5)
        monkeypatch.setattr("signal.signal", real_signal)
        ctx.term()
