"""Shared fixtures and the one factory of tiny models and tokenizers every test builds on.

Models: `make_causal_lm(arch, seed=, sharpen=, **config)` builds a tiny random model of any architecture
in ARCHITECTURES; `make_tiny_model` and `make_word_model` are its two usual Llamas. Tokenizers:
`make_char_tokenizer` (one token per character, any special tokens and chat template), with
`make_tiny_tokenizer` its ChatML-style instance, and `make_word_tokenizer` (words w0, w1 ...).
Everything here is built in-process in milliseconds, so behaviour tests need no download and no real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_char_tokenizer(specials: list[str], *, bos: str, eos: str, chat_template: str | None = None):
    """Character-level fast tokenizer: every printable ASCII character is one token, after `specials`
    (pad, two of bos/eos, unk, then the additional special tokens, in this order of ids)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[3]))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=specials[0], unk_token=specials[3]
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_tokenizer(chat: bool = True):
    """The character-level tokenizer with ChatML-style turns (`chat`), else a base model's (eos `</s>`)."""
    return make_char_tokenizer(
        SPECIALS,
        bos="<s>",
        eos="<|im_end|>" if chat else "</s>",
        chat_template=CHAT_TEMPLATE if chat else None,
    )


# The architectures tests build: name -> (config class, model class), both in transformers.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "phi": ("PhiConfig", "PhiForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
}
# Tiny sizes, in the names every architecture above but GPT-2 (n_embd, n_layer, n_head) uses.
TINY_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def make_causal_lm(arch: str = "llama", *, seed: int | None = None, sharpen: float | None = None, **config):
    """A random model of `arch` in eval mode, built from `config` (the config class's own keywords, sizes
    included: see TINY_SIZES). `seed` seeds torch first; `sharpen` multiplies the output layer, because
    random init gives nearly uniform logits and greedy paths should be far from ties (an untied head only:
    a tied one would scale the input embeddings too)."""
    import transformers

    config_class, model_class = ARCHITECTURES[arch]
    if seed is not None:
        torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    if sharpen is not None:
        head, inputs = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        assert head.data_ptr() != inputs.data_ptr(), "sharpening a tied head would scale the embeddings too"
        with torch.no_grad():
            head.mul_(sharpen)
    return model


def make_tiny_model(vocab_size: int, seed: int = 0, max_positions: int = 512, **overrides):
    """The tiny Llama most tests use (eos 5, `make_tiny_tokenizer`'s <|im_end|>), sharpened."""
    config = dict(
        vocab_size=vocab_size,
        **TINY_SIZES,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=5,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return make_causal_lm("llama", seed=seed, sharpen=8.0, **{**config, **overrides})


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model and tokenizer as a save_pretrained folder, loadable by name like any real model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    rows = [
        {"id": f"f{i}", "prompt": f"Where is place {i}?", "answer": f"The answer is Q{i}z. \\boxed{{Q{i}z}}"}
        for i in range(12)
    ]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


def make_word_tokenizer(vocab_size: int):
    """Word-level tokenizer without a chat template (a "base model"): tokens are w0, w1, ... and a few specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "Question:": 4, "Answer:": 5}
    vocab.update({f"w{i}": 6 + i for i in range(vocab_size - 6)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_word_model(vocab_size: int, max_positions: int, seed: int = 0, **overrides):
    """A tiny random Llama matching `make_word_tokenizer` (eos 2), with its initialization left as is."""
    config = dict(
        vocab_size=vocab_size,
        **TINY_SIZES,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return make_causal_lm("llama", seed=seed, **{**config, **overrides})
