"""The proxy worker's ZeroMQ identity cannot be derived from what clients see (no sockets).

Replicas set ROUTER_HANDOVER, so whoever connects with a worker's identity (any registered proxy key)
takes over that worker's token streams. The identity was proxy-HOST-PID-RAND with the same 2-byte RAND
and PID that every response id carries (cmpl-wPID-RAND-N)."""
import socket

import pytest

from proxy.config import ProxyConfig
from proxy.gateway import Gateway

pytestmark = pytest.mark.unit


def test_the_zeromq_identity_is_not_in_response_ids_and_not_guessable():
    gateway = Gateway(ProxyConfig.from_args(["--head", "tcp://127.0.0.1:1", "--insecure"]))
    request_id = gateway.next_request_id()  # what clients see, as cmpl-<id> / chatcmpl-<id>
    pid, rand, _ = request_id[1:].split("-")
    assert gateway.identity.decode() != "proxy-%s-%s-%s" % (socket.gethostname(), pid, rand)
    secret = gateway.identity.decode().rsplit("-", 1)[1]
    assert len(secret) >= 32 and secret not in request_id  # 128 bits nobody else sees
