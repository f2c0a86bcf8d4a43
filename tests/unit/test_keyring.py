"""The key registry on disk and `tokenrelay keys` (runtime.keyring, runtime.cli): files, modes, roles,
what each host gets, revocation. Files only, no sockets."""
import os
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
    # a mistyped --dir printed nothing and exited 0, as if the cluster had no keys
    assert cli.main(["keys", "list", "--dir", str(tmp_path / "kyes")]) == 1
    assert capsys.readouterr().out == ""


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


def test_add_never_writes_a_secret_through_a_planted_link_or_into_a_shared_directory(tmp_path):
    d = tmp_path / "keys"
    keyring.init_cluster(d)
    out = tmp_path / "out"
    out.mkdir()
    stolen = tmp_path / "attacker" / "stolen"  # where a link planted in --out would send the secret
    stolen.parent.mkdir()
    (out / "proxy-edge.key_secret").symlink_to(stolen)
    with pytest.raises(keyring.KeyFileError, match="exists already"):
        keyring.add(d, "proxy", "edge", out=out)
    assert not stolen.exists()
    shared = tmp_path / "shared"  # like /tmp: anyone may create names in it
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(keyring.KeyFileError, match="shared"):
        keyring.add(d, "proxy", "edge2", out=shared)
    assert mode(shared) == 0o1777 and not list(shared.iterdir())  # left as it was, nothing written


def test_secret_files_are_0600_whatever_the_umask_and_names_cannot_climb(tmp_path):
    old = os.umask(0)
    try:
        d = tmp_path / "keys"
        keyring.init_cluster(d)
        keyring.add(d, "agent", "gpu1", out=tmp_path / "gpu1")
    finally:
        os.umask(old)
    assert {p.name: mode(p) for p in (tmp_path / "gpu1").iterdir() if p.is_file()} == {
        "agent-gpu1.key_secret": 0o600, "head.key": 0o644, "replica.key": 0o644, "replica.key_secret": 0o600}
    assert keyring.identity(tmp_path / "gpu1", "agent").name == "gpu1"  # the files load
    for bad in ("..", ".hidden", "../x", "a/b", "-x", "", "gpu1\n"):  # "$" matched before a final newline
        with pytest.raises(keyring.KeyFileError, match="key name"):
            keyring.check_name("agent", bad)


def test_registry_sees_a_revocation_that_left_the_directory_mtime_unchanged(tmp_path):
    """Two changes within one tick of the kernel's coarse clock leave registry/'s mtime as the first set
    it: the second (here a revocation, its mtimes put back) is seen within Registry.RESCAN seconds."""
    d = tmp_path / "keys"
    keyring.ensure_single_host(d, "vm")
    now = [100.0]
    reg = keyring.Registry(d, clock=lambda: now[0])
    agent = keyring.identity(d, "agent", "vm")
    assert reg.lookup(agent.public) == (keyring.Peer("agent", "vm"), "")
    stamps = {sub: (d / sub).stat() for sub in (keyring.REGISTRY, keyring.REVOKED)}
    keyring.revoke(d, "agent", "vm")
    for sub, st in stamps.items():
        os.utime(d / sub, ns=(st.st_atime_ns, st.st_mtime_ns))
    now[0] += 0.5
    reg.lookup(agent.public)  # may still say registered: nothing it can see changed
    now[0] += keyring.Registry.RESCAN
    assert reg.lookup(agent.public) == (keyring.Peer("agent", "vm"), "revoked")


def test_keys_add_says_which_folder_goes_to_which_host_and_where(tmp_path, capsys):
    d = tmp_path / "keys"
    assert cli.main(["keys", "init", "--dir", str(d)]) == 0
    capsys.readouterr()
    assert cli.main(["keys", "add", "proxy", "edge1", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "Copy the folder %s/ as it is" % (d / "hosts" / "proxy-edge1") in out and "to proxy host edge1" in out
    assert "$TOKENRELAY_CURVE_DIR" in out and "/etc/tokenrelay/keys" in out
    assert "Also copy %s into registry/ in the key directory of every agent host" % (
        d / "registry" / "proxy-edge1.key") in out
    assert cli.main(["keys", "add", "agent", "gpu1", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "hosts/agent-gpu1/ as it is (sub-folders included)" in out and "--agent-id gpu1" in out
    assert "  %s" % (d / "hosts" / "agent-gpu1" / "registry" / "proxy-edge1.key") in out.splitlines()
    assert cli.main(["keys", "add", "operator", "alice", "--dir", str(d)]) == 0
    assert "admin token" in capsys.readouterr().out


def test_the_heads_state_directory_and_database_are_private(tmp_path):
    """head.db (deployments, replica owners) was 0644 in a 0755 state directory beside the admin token."""
    from head.store import StateStore
    from runtime.credentials import load_or_create_token

    old = os.umask(0o022)
    try:
        state = tmp_path / "state"
        store = StateStore(state / "head.db")
        store.bind_owners([("r1", "vm")])
        load_or_create_token(state)
    finally:
        os.umask(old)
    assert mode(state) == 0o700
    assert {p.name: mode(p) for p in state.iterdir()} == {
        "head.db": 0o600, "head.db-wal": 0o600, "head.db-shm": 0o600, "admin.token": 0o600}
    store.close()
    os.umask(0o022)
    try:
        keyring.ensure_single_host(tmp_path / "up-state" / "keys", "vm")  # `tokenrelay up` makes keys/ first
    finally:
        os.umask(old)
    assert mode(tmp_path / "up-state") == 0o700


def test_a_key_directory_that_cannot_be_made_is_a_key_file_error(tmp_path):
    """$TOKENRELAY_STATE_DIR naming a file: `tokenrelay up` printed a FileExistsError traceback."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(keyring.KeyFileError, match="cannot make the key directory .*/file/keys: .*/file: "):
        keyring.ensure_single_host(tmp_path / "file" / "keys", "vm")


def test_a_missing_identity_names_a_complete_command(tmp_path):
    """It said `tokenrelay keys add proxy`, which the CLI refuses: the name is required."""
    with pytest.raises(keyring.KeyFileError, match=r"`tokenrelay keys add proxy NAME`"):
        keyring.identity(tmp_path, "proxy")
