"""`python -m proxy --head tcp://HOST:PORT [...]`: parse args, set up logging and metrics, serve.

Runs in the proxy's main process (it becomes the gunicorn master). Owns no socket itself. Must set
PROMETHEUS_MULTIPROC_DIR before anything imports prometheus_client, so it imports nothing heavy at the
top. Exit codes: 2 bad arguments; otherwise gunicorn's (see proxy/server.py).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from proxy.config import ProxyConfig, prepare_metrics_dir

    config = ProxyConfig.from_args(argv)  # exits 2 on bad arguments
    prepare_metrics_dir()  # before prometheus_client is imported anywhere in this process tree

    from proxy.logs import setup_logging

    setup_logging(config.log_level)
    from proxy.server import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
