"""The `tokenrelay` command (also `python -m runtime`): its parser, the head's admin commands (status,
deploy, scale, delete), keys and models. `up` and `down` live in runtime.stack_commands.

Runs in the CLI process; talks to the head only through runtime.head_client. Exit codes: 0 ok, 1 the
operation failed (head unreachable, refused), 2 bad command line or config; `down` also 3 (no running
stack).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import msgspec
import yaml

from runtime import head_client, stack_commands
from runtime.addresses import check_zmq_endpoint
from runtime.credentials import client_token, state_dir
from runtime.head_client import HeadRefused, HeadUnreachable
from runtime.logs import setup_logging
from runtime.stack_config import check_replicas, parse_deployment

log = logging.getLogger("tokenrelay")

DEFAULT_HEAD = "tcp://127.0.0.1:7100"


def _prepare(model: str) -> bool:
    try:
        from runtime.models import ModelPrepareError, KNOWN_MODELS, prepare_model
    except ImportError as exc:
        log.error("model preparation unavailable: %s", exc)
        return False
    if model not in KNOWN_MODELS:
        return True  # a path or hub id: passed to vLLM as is
    try:
        path = prepare_model(model, progress=lambda msg: log.info("[models] %s", msg))
    except ModelPrepareError as exc:
        log.error("cannot prepare model %s: %s", model, exc)
        return False
    log.info("[models] %s is ready in %s", model, path)  # a second `models prepare` printed nothing at all
    return True


def _cmd_models_prepare(ns: argparse.Namespace) -> int:
    from runtime.models import KNOWN_MODELS
    if ns.name not in KNOWN_MODELS:  # it printed nothing and exited 0, as if the model were ready
        log.error("no packaged model named %r (known: %s); a model folder or hub id needs no preparing",
                  ns.name, ", ".join(sorted(KNOWN_MODELS)))
        return 1
    return 0 if _prepare(ns.name) else 1


def _token(ns: argparse.Namespace) -> str:
    return client_token(ns.token, ns.state_dir)


def _head(ns: argparse.Namespace) -> str:
    """--head, else the head of the one `tokenrelay up` stack running in the state directory (its
    config may put the head elsewhere than DEFAULT_HEAD: `status` then asked another stack's head, or
    none), else DEFAULT_HEAD; HeadUnreachable when several run (no guess)."""
    if ns.head:
        return str(ns.head)
    state = state_dir(ns.state_dir)
    stacks = [record for record, _ in stack_commands.running_stacks(state) if record.head]
    heads = {record.head for record in stacks}
    if len(heads) > 1:  # HeadUnreachable: the callers' "nothing was sent" path (exit 1, with --json too)
        raise HeadUnreachable("%d stacks are running in %s: say which head with --head (%s)" % (
            len(stacks), state, ", ".join("%s: %s" % (r.stack, r.head) for r in stacks)))
    return heads.pop() if heads else DEFAULT_HEAD


def _keys(ns: argparse.Namespace) -> Optional[str]:
    """The CLI's key directory: --curve-dir, else (with --state-dir) that state dir's keys/, else the
    default (runtime.curve.keys_dir)."""
    if ns.curve_dir or ns.state_dir:
        from runtime.curve import keys_dir
        return str(keys_dir(ns.curve_dir, ns.state_dir))
    return None


def _admin_call(ns: argparse.Namespace, fn, *args) -> int:
    """Run one admin command against the head; print its result (JSON with --json)."""
    try:
        data = fn(_head(ns), _token(ns), *args, timeout=ns.timeout, keys=_keys(ns))
    except (HeadUnreachable, HeadRefused) as exc:
        if ns.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        log.error("%s", exc)
        return 1
    if ns.json:
        print(json.dumps({"ok": True, **data}))
    else:
        print("%s%s" % (data.get("result", "ok"),
                        " (generation %d)" % data["generation"] if data.get("generation") else ""))
    return 0


def load_deploy_file(path: str) -> list[dict[str, Any]]:
    """The specs of a `deploy -f` file (one spec, a list, or {deployments: [...]}), each checked as the
    head checks it, so a bad file sends nothing; ValueError naming the file and the field. The head used
    to be the first to look: a file holding `null` got "protocol: bad DeployRequest payload", an empty
    list did nothing and exited 0, a YAML alias inside its own anchor raised a RecursionError."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError("cannot read %s: %s" % (path, exc.strerror)) from None
    except yaml.YAMLError as exc:
        raise ValueError("%s: not valid YAML/JSON: %s" % (path, exc)) from None
    try:
        json.dumps(raw, default=str)
    except ValueError:  # json's "Circular reference detected"
        raise ValueError("%s: a YAML alias refers to its own anchor (the spec would never end)" % path) from None
    where = "spec"
    if isinstance(raw, dict) and "deployments" in raw:
        raw, where = raw["deployments"], "deployments"
        if not isinstance(raw, list):
            raise ValueError("%s: deployments: must be a list of specs" % path)
    specs = raw if isinstance(raw, list) else [raw]
    if not specs:
        raise ValueError("%s: holds no deployment spec" % path)
    for i, spec in enumerate(specs):
        try:
            parse_deployment(spec, where if not isinstance(raw, list) else "%s[%d]" % (where, i))
        except ValueError as exc:
            raise ValueError("%s: %s" % (path, exc)) from None
    return specs


def _cmd_deploy(ns: argparse.Namespace) -> int:
    try:
        specs = load_deploy_file(ns.file)
    except ValueError as exc:
        if ns.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        log.error("%s", exc)
        return 2
    code = 0
    for spec in specs:
        code = max(code, _admin_call(ns, head_client.deploy, spec))
    return code


def _replica_count(text: str) -> int:
    """`scale`'s count, checked as the head checks it: 10**20 raised an OverflowError traceback here (msgpack
    cannot carry it) instead of a usage error."""
    try:
        return check_replicas(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if "must be" in str(exc) else "not an integer: %r" % text) from None


def _cmd_scale(ns: argparse.Namespace) -> int:
    return _admin_call(ns, head_client.scale, ns.name, ns.replicas)


def _cmd_delete(ns: argparse.Namespace) -> int:
    return _admin_call(ns, head_client.delete, ns.name)


def _copy_instructions(directory: Path, role: str, name: str, out: Optional[Path]) -> tuple[str, str]:
    """What `keys add` prints before and after the file list: which folder goes to which host, where."""
    registered = "key %s-%s registered in %s" % (role, name, directory / "registry")
    if out is None:
        before = "%s; this host's files, in %s:" % (registered, directory)
    else:
        host = {"agent": "the agent host", "proxy": "proxy host %s" % name, "operator": "operator %s's machine" % name}
        before = ("%s. Copy the folder %s/ as it is (sub-folders included) to %s, into its key directory "
                  "(--curve-dir, else $TOKENRELAY_CURVE_DIR, else $TOKENRELAY_STATE_DIR/keys; /etc/tokenrelay/keys "
                  "with the systemd units), mode 0700, then delete the folder here. It holds:"
                  % (registered, out, host[role]))
    after = {
        "agent": "Start that agent with --agent-id %s." % name,
        "proxy": "Also copy %s into registry/ in the key directory of every agent host already set up (their "
                 "replicas accept only the proxy keys listed there)." % (directory / "registry" / (
                     "proxy-%s.key" % name)),
        "operator": "The operator also needs the admin token (--token or $TOKENRELAY_ADMIN_TOKEN): the head "
                    "host's $TOKENRELAY_STATE_DIR/admin.token.",
    }[role]
    return before, after


def _cmd_keys(ns: argparse.Namespace) -> int:
    """`tokenrelay keys init|add|list|revoke` (runtime.keyring; docs/operations.md walks through it)."""
    from runtime import keyring
    from runtime.curve import keys_dir
    directory = keys_dir(ns.dir)
    after = ""
    try:
        if ns.keys_command == "init":
            paths = keyring.init_cluster(directory)
            print("cluster keys in %s (keep head.key_secret on the head's host only):" % directory)
        elif ns.keys_command == "add":
            out = Path(ns.out) if ns.out else (None if ns.here else directory / "hosts" / (
                "%s-%s" % (ns.role, ns.name)))
            paths = keyring.add(directory, ns.role, ns.name, out)
            before, after = _copy_instructions(directory, ns.role, ns.name, out)
            print(before)
        elif ns.keys_command == "revoke":
            paths = [keyring.revoke(directory, ns.role, ns.name)]
            print("revoked %s-%s: refused from its next connection (the head: its next message)%s"
                  % (ns.role, ns.name, "; also move registry/proxy-%s.key to revoked/ in the key directory of "
                     "every agent host (its replicas refuse it from the next request)" % ns.name
                     if ns.role == "proxy" else ""))
        else:
            if not directory.is_dir():  # an empty listing here read as "no keys registered"
                log.error("no key directory at %s (a typo in --dir or $TOKENRELAY_CURVE_DIR? `tokenrelay keys "
                          "init` makes one)", directory)
                return 1
            for label, state, key in keyring.Registry(directory).listing():
                print("%-40s %-8s %s" % (label, state, key))
            return 0
    except keyring.KeyFileError as exc:
        log.error("%s", exc)
        return 1
    for path in paths:
        print("  %s" % path)
    if after:
        print(after)
    return 0


def _cmd_status(ns: argparse.Namespace) -> int:
    try:
        reply = head_client.status(_head(ns), _token(ns), timeout=ns.timeout, keys=_keys(ns))
    except (HeadUnreachable, HeadRefused) as exc:
        if ns.json:  # as deploy/scale/delete do: a script reading stdout got nothing to parse
            print(json.dumps({"ok": False, "error": str(exc)}))
        log.error("%s", exc)
        return 1
    if ns.json:
        print(json.dumps({"epoch": reply.epoch, "version": reply.version,
                          "deployments": msgspec.to_builtins(reply.deployments),
                          "agents": msgspec.to_builtins(reply.agents)}, indent=2))
        return 0
    print("DEPLOYMENT        STATE     READY  ENGINE  MODEL")
    for d in reply.deployments:
        print("%-17s %-9s %2d/%-3d %-7s %s" % (d.name, d.state, d.ready_replicas, d.replicas, d.engine, d.model))
        if d.pending_reason:
            print("    pending: %s" % d.pending_reason)
        if d.rollout_note:
            print("    update: %s" % d.rollout_note)
        if d.failures:
            print("    failures: %s" % d.failures)
        if d.autoscale:
            a = d.autoscale
            print("    autoscale: desired %d (load wants %d): %s" % (a.desired, a.wanted, a.reason))
        for r in d.replica_list:
            print("    %-22s %-10s host=%-15s run=%d wait=%d kv=%.0f%% cpu=%.0f%% rss=%.0fMiB restarts=%d "
                  "age=%.0fs %s" % (
                      r.replica_id, r.state, r.host, r.running, r.waiting, 100 * r.kv_cache_usage,
                      r.cpu_percent, r.rss_bytes / 2**20, r.restarts, r.age_s, r.message))
    print("AGENTS")
    for ag in reply.agents:
        print("    %-22s host=%-15s cpus=%d gpus=%d replicas=%d cpu=%.0f%% rss=%.0fMiB last_heartbeat=%.1fs ago"
              % (ag.agent_id, ag.host, ag.cpus, len(ag.gpus), ag.replicas, ag.cpu_percent,
                 ag.rss_bytes / 2**20, ag.last_heartbeat_s))
        for g in ag.gpu_usage:  # cpu/rss: the agent and its replicas' process trees
            print("        gpu%d util=%.0f%% mem=%.0f/%.0fMiB" % (g.index, 100 * g.utilization,
                                                            g.memory_used_bytes / 2**20,
                                                            g.memory_total_bytes / 2**20))
    return 0


def _seconds(value: str) -> float:
    """--timeout as argparse checks it: a negative one waited forever, nan or inf raised a traceback."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds, got %r" % value) from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600 seconds, got %r" % value)
    return seconds


def _head_endpoint(value: str) -> str:
    """--head as argparse checks it (exit 2 with the reason; ZeroMQ's connect() raised a traceback)."""
    try:
        return check_zmq_endpoint(value, "--head")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenrelay", description="tokenrelay: distributed LLM serving.")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)
    stack_commands.add_parsers(sub, _seconds)

    def head_command(name: str, help: str, func) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help)
        cmd.add_argument("--head", default=None, type=_head_endpoint,
                         help="the head's control endpoint (default: the head of the `tokenrelay up` stack "
                              "running in the state directory; with none, %s)" % DEFAULT_HEAD)
        cmd.add_argument("--token", default=None, help="admin token (default: $TOKENRELAY_ADMIN_TOKEN or "
                                                       "the state directory's admin.token)")
        cmd.add_argument("--state-dir", default=None, help="where to look for admin.token (and keys/)")
        cmd.add_argument("--curve-dir", default=None, help="key directory holding one operator-NAME.key_secret "
                                                           "and head.key (default $TOKENRELAY_CURVE_DIR, else "
                                                           "STATE_DIR/keys)")
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        cmd.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait for the head (default 3)")
        cmd.set_defaults(func=func)
        return cmd

    head_command("status", "deployments, replicas and agents, from the head", _cmd_status)
    head_command("deploy", "create or update deployments from a spec file", _cmd_deploy).add_argument(
        "-f", "--file", required=True, help="YAML/JSON: one spec, a list, or {deployments: [...]}")
    scale = head_command("scale", "set a deployment's replica count", _cmd_scale)
    scale.add_argument("name")
    scale.add_argument("replicas", type=_replica_count)
    head_command("delete", "delete a deployment (its replicas drain, then stop)", _cmd_delete).add_argument("name")
    keys = sub.add_parser("keys", help="CURVE keys: one per head, agent, proxy, operator (runtime.keyring)")
    kdir = argparse.ArgumentParser(add_help=False)
    kdir.add_argument("--dir", default=None, help="the cluster's key directory (default $TOKENRELAY_CURVE_DIR, "
                                                  "else STATE_DIR/keys)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    ksub.add_parser("init", parents=[kdir], help="create a cluster: the head's and the replicas' keypairs"
                    ).set_defaults(func=_cmd_keys)
    add = ksub.add_parser("add", parents=[kdir], help="register a new key and write the files its host needs")
    add.add_argument("role", choices=("agent", "proxy", "operator"))
    add.add_argument("name", help="an agent's name is its --agent-id")
    add.add_argument("--out", default=None, help="where to write that host's files (default DIR/hosts/ROLE-NAME)")
    add.add_argument("--here", action="store_true", help="write the secret into DIR itself (this host)")
    add.set_defaults(func=_cmd_keys)
    ksub.add_parser("list", parents=[kdir], help="registered and revoked keys").set_defaults(func=_cmd_keys)
    rev = ksub.add_parser("revoke", parents=[kdir], help="refuse a key from its next connection on")
    rev.add_argument("role", choices=("agent", "proxy", "operator"))
    rev.add_argument("name")
    rev.set_defaults(func=_cmd_keys)
    models = sub.add_parser("models", help="model files")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert a packaged model once into the cache")
    prep.add_argument("name", help="model short name, e.g. smollm2")
    prep.set_defaults(func=_cmd_models_prepare)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging("tokenrelay", ns.log_level)
    try:
        return ns.func(ns)
    except BrokenPipeError:
        # the reader of stdout left (`tokenrelay status | head`): stop quietly. Unhandled, this printed a
        # traceback, and Python another one at exit flushing stdout, which /dev/null in its place avoids.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
