"""`tokenrelay deploy -f FILE`: a bad file is refused here, naming the file and the field, and nothing is
sent to the head."""
from __future__ import annotations

import pytest

from runtime import cli, head_client

SPEC = "{name: a, engine: mock, model: m}"


@pytest.mark.parametrize("text, message", [
    ("null\n", "spec: must be a mapping, got NoneType"),
    ('"hello"\n', "spec: must be a mapping, got str"),
    ("[]\n", "holds no deployment spec"),
    ("deployments: []\n", "holds no deployment spec"),
    ("deployments: {a: 1}\n", "deployments: must be a list of specs"),
    ("- %s\n- {name: b, engine: mock, model: m, replicas: -1}\n" % SPEC, "spec[1].replicas: must be an integer"),
    ("deployments:\n- %s\n- 5\n" % SPEC, "deployments[1]: must be a mapping, got int"),
    ("name: a\nengine: mock\nmodel: m\nengine_args: &e {x: *e}\n", "a YAML alias refers to its own anchor"),
    ("name: [\n", "not valid YAML/JSON"),
])
def test_a_bad_spec_file_is_refused_before_anything_is_sent(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.setattr(head_client, "deploy", lambda *a, **k: pytest.fail("sent to the head"))
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert cli.main(["deploy", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "%s: " % path in err and message in err
    assert cli.main(["deploy", "-f", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read %s: No such file or directory" % (tmp_path / "nope.yaml") in capsys.readouterr().err


def test_every_spec_of_a_good_file_is_sent(tmp_path, monkeypatch, capsys):
    sent = []
    monkeypatch.setattr(head_client, "deploy", lambda endpoint, token, spec, **k: sent.append(spec) or {
        "result": "created", "generation": 1})
    monkeypatch.setattr(cli, "_token", lambda ns: "t")
    path = tmp_path / "spec.yaml"
    path.write_text("deployments:\n- %s\n- {name: b, engine: mock, model: m}\n" % SPEC)
    assert cli.main(["deploy", "-f", str(path)]) == 0
    assert [s["name"] for s in sent] == ["a", "b"]
    assert capsys.readouterr().out == "created (generation 1)\ncreated (generation 1)\n"


def test_a_bad_file_with_json_says_why_on_stdout(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("null\n")
    assert cli.main(["deploy", "-f", str(path), "--json"]) == 2
    import json
    assert json.loads(capsys.readouterr().out) == {
        "ok": False, "error": "%s: spec: must be a mapping, got NoneType" % path}


@pytest.mark.parametrize("count, message", [
    ("100000000000000000000000", "replicas: must be at most 1024"),  # was an OverflowError traceback
    ("-1", "replicas: must be an integer >= 0"),
    ("two", "not an integer: 'two'"),
])
def test_scale_checks_its_count_before_anything_is_sent(monkeypatch, capsys, count, message):
    monkeypatch.setattr(head_client, "scale", lambda *a, **k: pytest.fail("sent to the head"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["scale", "a", count])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_closed_stdout_ends_the_cli_quietly(tmp_path, monkeypatch, capsys) -> None:
    """`tokenrelay keys list | head -1` (or `status | head`): the reader left, and the CLI ended with a
    BrokenPipeError traceback."""
    import io

    from runtime import keyring

    keyring.init_cluster(tmp_path)
    for name in ("a", "b"):
        keyring.add(tmp_path, "operator", name, tmp_path / ("out-%s" % name))

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise io.UnsupportedOperation("fileno")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert cli.main(["keys", "list", "--dir", str(tmp_path)]) == 1
