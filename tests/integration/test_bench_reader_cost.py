"""benchmarks/reader_cost.py, run as a script the way benchmarks/README.md says: it forks its sender, gets
every paced message through a real ReplicaConnection, prints its per-message CPU, and stops what it
started; bad arguments are a usage error."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reader_cost.py"


def test_prints_cpu_per_message_for_every_message_sent():
    cmd = [sys.executable, str(SCRIPT), "--messages", "200", "--gap-ms", "0.5", "--streams", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    m = re.search(r"reader: (\d+) messages of 4 deltas .*: ([\d.]+) us CPU per message", res.stdout)
    assert m, res.stdout
    assert int(m.group(1)) == 199  # the first message opens the window
    assert float(m.group(2)) > 0
    assert "lost connection" not in res.stderr  # the sender outlives the reader's connection


def test_bad_arguments_are_a_usage_error():
    res = subprocess.run([sys.executable, str(SCRIPT), "--messages", "1"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    assert "--messages >= 2" in res.stderr
