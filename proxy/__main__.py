"""`python -m proxy --head tcp://HOST:PORT [...]`: parse args, set up logging and metrics, serve.

Runs in the proxy's main process (it becomes the gunicorn master). Owns no socket itself. Must set
PROMETHEUS_MULTIPROC_DIR before anything imports prometheus_client, so it imports nothing heavy at the
top. Exit codes: 2 bad arguments, unusable CURVE keys or an unreadable API keys file; otherwise
gunicorn's (see proxy/server.py).
"""
from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from proxy.config import API_KEYS_ENV, ProxyConfig, prepare_metrics_dir

    config = ProxyConfig.from_args(argv)  # exits 2 on bad arguments
    import dataclasses

    from runtime import keyring
    from runtime.curve import insecure_from_env, keys_dir

    try:
        insecure = config.insecure or insecure_from_env()
        if not insecure:  # check the keys now, not in every worker
            keys = keys_dir(config.curve_dir)
            keyring.identity(keys, "proxy")
            keyring.server_public(keys, "head")
            keyring.server_public(keys, "replica")
            config = dataclasses.replace(config, curve_dir=str(keys))
        else:
            config = dataclasses.replace(config, insecure=True, curve_dir=None)
    except ValueError as exc:  # keyring.KeyFileError, or a bad $TOKENRELAY_INSECURE
        print("python -m proxy: error: %s (or pass --insecure)" % exc, file=sys.stderr)
        return 2
    from proxy.access import load_api_keys

    try:  # a bad keys file must stop the proxy here, not fail every worker's boot
        api_keys = load_api_keys(config.api_keys_file)
    except ValueError as exc:
        print("python -m proxy: error: API keys: %s" % exc, file=sys.stderr)
        return 2
    open_to_all = not api_keys.enabled and not config.loopback_only  # anyone who reaches it may use /v1
    if open_to_all and not config.open_api:
        print("python -m proxy: error: --bind %s is reachable from other hosts and no API key is set: anyone "
              "who reaches it could use every model. Give keys (--api-keys-file FILE or $%s), bind to "
              "127.0.0.1, or pass --open-api ($TOKENRELAY_PROXY_OPEN_API=1) to serve without keys on purpose"
              % (config.bind, API_KEYS_ENV), file=sys.stderr)
        return 2
    prepare_metrics_dir()  # before prometheus_client is imported anywhere in this process tree

    from runtime.logs import proxy_role, setup_logging

    setup_logging(proxy_role(), config.log_level)
    if config.insecure:
        from runtime.curve import warn_insecure
        warn_insecure("proxy")
    if open_to_all:
        logging.getLogger("proxy").warning("[startup] --open-api: /v1 on %s takes requests from anyone who "
                                           "reaches it, with no API key", config.bind)
    for repeat in api_keys.repeats:  # where, never the key
        logging.getLogger("proxy").warning("[startup] API keys: %s; that key counts once (a copy-paste slip "
                                           "that left another key out?)", repeat)
    if api_keys.enabled:
        logging.getLogger("proxy").info("[startup] %d API key(s): every path but /openapi.json%s requires "
                                        "Authorization: Bearer", len(api_keys),
                                        "" if config.protect_health else ", /health, /ready and /metrics")
    if config.parent_pid is not None:
        from runtime import parent_guard
        parent_guard.install(config.parent_pid)  # SIGTERM (gunicorn's graceful stop) when it dies
    from proxy.server import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
