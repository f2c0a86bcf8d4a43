"""benchmarks.meters.ReplicaCounters against real HTTP /metrics endpoints listed in a Prometheus SD file."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.meters import ReplicaCounters


class _Metrics:
    """A /metrics endpoint whose counters the test sets."""

    def __init__(self, batches: float, tokens: float) -> None:
        self.batches, self.tokens = batches, tokens
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body = ("# HELP tokenrelay_replica_token_batches_total x\n"
                        "# TYPE tokenrelay_replica_token_batches_total counter\n"
                        'tokenrelay_replica_token_batches_total{replica="r"} %s\n'
                        "tokenrelay_replica_generated_tokens_total %s\n"
                        "tokenrelay_replica_token_batches_created 1.7e9\n"
                        % (metrics.batches, metrics.tokens)).encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = "127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def endpoints():
    eps = [_Metrics(10, 200), _Metrics(5, 100)]
    yield eps
    for ep in eps:
        ep.server.shutdown()
        ep.server.server_close()


def test_counts_batches_and_tokens_of_every_replica_in_the_window(tmp_path, endpoints):
    sd = tmp_path / "targets.json"
    sd.write_text(json.dumps([{"targets": [ep.address], "labels": {"role": "replica"}} for ep in endpoints]
                             + [{"targets": ["127.0.0.1:1"], "labels": {"role": "proxy"}}]))  # not scraped
    counters = ReplicaCounters(sd)
    counters.start()
    endpoints[0].batches, endpoints[0].tokens = 40, 900
    endpoints[1].batches, endpoints[1].tokens = 25, 700
    counters.stop()
    assert counters.delta == {"token_batches": 50.0, "generated_tokens": 1300.0}


def test_no_numbers_rather_than_wrong_ones(tmp_path, endpoints, caplog):
    counters = ReplicaCounters(tmp_path / "missing.json")
    counters.start()
    counters.stop()
    assert counters.delta is None and "could not read" in caplog.text
    sd = tmp_path / "targets.json"
    targets = [endpoints[0].address, "127.0.0.1:1"]
    sd.write_text(json.dumps([{"targets": targets, "labels": {"role": "replica"}}]))
    counters = ReplicaCounters(sd)
    counters.start()  # one replica cannot be reached: a sum over the others would be too small
    counters.stop()
    assert counters.delta is None
