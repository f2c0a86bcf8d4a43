"""The key registry on disk and `tokenrelay keys` (runtime.keyring, runtime.cli): files, modes, roles,
what each host gets, revocation. Files only, no sockets."""
import stat

import pytest

from runtime import cli, keyring

pytestmark = pytest.mark.unit


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_cli_init_add_list_revoke(tmp_path, capsys):
    d = tmp_path / "keys"
    assert cli.main(["keys", "init", "--dir", str(d)]) == 0
    assert mode(d) == 0o700 and mode(d / "head.key_secret") == 0o600 and mode(d / "replica.key_secret") == 0o600
    assert cli.main(["keys", "init", "--dir", str(d)]) == 1  # never over an existing cluster
    assert cli.main(["keys", "add", "proxy", "edge1", "--dir", str(d)]) == 0
    assert cli.main(["keys", "add", "agent", "gpu1", "--dir", str(d)]) == 0
    assert cli.main(["keys", "add", "operator", "alice", "--dir", str(d)]) == 0
    assert cli.main(["keys", "add", "agent", "gpu1", "--dir", str(d)]) == 1  # the name is taken
    hosts = d / "hosts"
    assert sorted(p.name for p in (hosts / "proxy-edge1").iterdir()) == ["head.key", "proxy-edge1.key_secret",
                                                                        "replica.key"]
    assert sorted(str(p.relative_to(hosts / "agent-gpu1")) for p in (hosts / "agent-gpu1").rglob("*")) == [
        "agent-gpu1.key_secret", "head.key", "registry", "registry/proxy-edge1.key", "replica.key",
        "replica.key_secret"]
    assert sorted(p.name for p in (hosts / "operator-alice").iterdir()) == ["head.key", "operator-alice.key_secret"]
    assert all(mode(p) == 0o600 for p in hosts.rglob("*.key_secret"))
    capsys.readouterr()
    assert cli.main(["keys", "revoke", "proxy", "edge1", "--dir", str(d)]) == 0
    assert cli.main(["keys", "revoke", "proxy", "edge1", "--dir", str(d)]) == 1  # nothing left to revoke
    capsys.readouterr()
    assert cli.main(["keys", "list", "--dir", str(d)]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert rows == [["agent-gpu1", "active"], ["operator-alice", "active"], ["proxy-edge1", "revoked"]]


def test_registry_says_who_a_key_is_and_sees_revocations_at_once(tmp_path):
    d = tmp_path / "keys"
    keyring.ensure_single_host(d, "vm")
    reg = keyring.Registry(d)
    agent = keyring.identity(d, "agent", "vm")
    assert reg.lookup(agent.public) == (keyring.Peer("agent", "vm"), "")
    assert reg.lookup(b"x" * 40) == (None, "unknown_key")
    keyring.revoke(d, "agent", "vm")
    assert reg.lookup(agent.public) == (keyring.Peer("agent", "vm"), "revoked")
    assert reg.revoked() == {keyring.Peer("agent", "vm")}
    assert keyring.ensure_single_host(d, "vm") is False  # a revoked key is not quietly recreated


def test_identity_needs_exactly_one_key_of_its_role(tmp_path):
    d = tmp_path / "keys"
    keyring.init_cluster(d)
    with pytest.raises(keyring.KeyFileError, match="holds 0 proxy keys.*tokenrelay keys add proxy"):
        keyring.identity(d, "proxy")
    keyring.add(d, "proxy", "a")
    keyring.add(d, "proxy", "b")
    with pytest.raises(keyring.KeyFileError, match="holds 2 proxy keys"):
        keyring.identity(d, "proxy")
    assert keyring.identity(d, "proxy", "b").name == "b"
    with pytest.raises(keyring.KeyFileError, match="key name"):
        keyring.add(d, "agent", "../etc")
    with pytest.raises(keyring.KeyFileError, match="role must be one of"):
        keyring.add(d, "head", "x")
