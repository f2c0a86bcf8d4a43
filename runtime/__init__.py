"""Code shared by every tokenrelay process: wire protocol, configuration files, logging, process trees.

Imports no event loop and creates no socket at import time.

Module map (tests/unit/test_module_maps.py keeps it complete):
  __main__.py      `python -m runtime` is the `tokenrelay` command
  cli.py           the `tokenrelay` command: its parser, status, deploy/scale/delete, keys, models
  stack_commands.py  `tokenrelay up` and `tokenrelay down`: start a single-host stack, stop a running one
  launcher.py      `tokenrelay up`: head, agent and proxy on this host, started and stopped together
  stack_record.py  the launcher record of a running stack (pid, start time), how `down` finds its launcher
  head_client.py   blocking request/reply client for the head's control socket (CLI and tests)
  protocol.py      every wire message (msgspec structs, type byte), states on the wire
  settings.py      one definition per setting: config dataclass fields -> CLI flags, env vars, defaults
  stack_config.py  stack configuration files: process addresses and deployment specs
  addresses.py     what a ZeroMQ endpoint or HOST:PORT must look like; whether a port is taken
  capacity.py      pure: what a replica takes from a host and whether it fits (head and agent)
  models.py        models servable with no model hub (the default instruct model)
  logs.py          one logging setup, a role tag on every line
  metrics_http.py  GET /metrics on HOST:PORT in a daemon thread
  curve.py         ZeroMQ CURVE on every socket: key directories, securing a socket
  keyring.py       the cluster's CURVE keys on disk: who may connect, as which role
  zap.py           the ZAP handler: per handshake, whether a client key may connect
  authz.py         pure: role x socket and role x head message -> allowed or the reason for refusal
  credentials.py   local state directories and the admin credential
  owned_dirs.py    temporary directories removed at exit by the process that made them
  parent_guard.py  a child process must not outlive its parent (or its stack); the launcher's subreaper
  orphans.py       the replicas a crashed agent left to the `tokenrelay up` launcher: reap and stop them
  proctree.py      process trees: collect one, SIGTERM, grace, SIGKILL
  gc_policy.py     garbage collection in serving processes: start-up heap frozen, rare full collections
"""
__version__ = "0.1.0"
