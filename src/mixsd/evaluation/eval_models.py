"""The models `mixsd eval` scores: loaded once each, when a suite first needs them, in the run's dtype and
on its device; and its progress bars.
"""

from __future__ import annotations

from tqdm.auto import tqdm

# models by attribute (models.load_model): a test patching that module sees every load
from mixsd.core import models
from mixsd.core.models import ModelHandle, default_device
from mixsd.evaluation.eval_config import EvalConfig
from mixsd.method.generation import autocast


class ProgressBar:
    """A progress bar counting items (silent when progress is off)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, unit="item", disable=not enabled)

    def __call__(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class EvalModels:
    """The models of one evaluation: the model, its tokenizer and its base, each loaded when first needed.

    Models are loaded through `mixsd.core.models` by attribute (`models.load_model`), so that a test patching
    that module sees every load; a handle is None for a model passed in, or one that did not resolve
    (loading it by name then raises the error)."""

    def __init__(
        self,
        config: EvalConfig,
        model,
        tokenizer,
        base_model,
        progress: bool,
        handles: tuple[ModelHandle | None, ModelHandle | None] = (None, None),
    ):
        self.config, self.progress = config, progress
        self._model, self._tokenizer, self._base = model, tokenizer, base_model
        self._model_handle, self._base_handle = handles
        self.device = config.device
        # models loaded here are stored in --dtype (bf16: half the memory traffic per decode step);
        # models passed in keep their dtype and run under autocast to it
        self.dtype = config.dtype

    def model(self):
        if self._model is None:
            self.device = self.device or default_device()
            self._model = models.load_model(
                self._model_handle or self.config.model,
                device=self.device,
                dtype=self.dtype,
                trust_remote_code=self.config.trust_remote_code,
            )
        return self._model

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(
                self._model_handle or self.config.model, trust_remote_code=self.config.trust_remote_code
            )
        return self._tokenizer

    def base(self):
        if self._base is None:
            if self.config.base is None:
                raise ValueError("no base model")
            if self.config.base == self.config.model:
                self._base = self.model()
            else:
                self._base = models.load_model(
                    self._base_handle or self.config.base,
                    device=next(self.model().parameters()).device,
                    dtype=self.dtype,
                    trust_remote_code=self.config.trust_remote_code,
                )
        return self._base

    @property
    def has_base(self) -> bool:
        """Is there a base to compare with (named, or passed in)?"""
        return self.config.base is not None or self._base is not None

    @property
    def base_is_model(self) -> bool:
        """Is the base the evaluated model itself (then its scores are the model's)?"""
        if self._base is not None:
            return self._base is self._model
        return self.config.base == self.config.model

    def autocast(self, model):
        return autocast(next(model.parameters()).device, self.dtype == "bfloat16")

    def bar(self, total: int, desc: str) -> ProgressBar:
        return ProgressBar(total, desc, self.progress)
