"""Prompt formatting: the one function every stage uses to turn a user message into token ids.

Targets, training and evaluation all call `encode_prompt`, so the prompt a model is trained on is,
token for token, the prompt it is evaluated on.
"""

from __future__ import annotations

from pathlib import Path

from mixsd.records import Fact

# Our wording of the expert prompt: the question, the reference the expert may use, and a request to
# answer. `{prompt}` and `{context}` are filled per record. Override with --expert-template.
DEFAULT_EXPERT_TEMPLATE = (
    "{prompt}\n\n"
    "Reference (from a knowledge source you have not seen before): {context}\n\n"
    "Answer the question above using this reference, and put the final answer in \\boxed{}."
)


def load_expert_template(text_or_file: str | None) -> str:
    """`--expert-template` takes either the template itself or the path of a file holding it."""
    if text_or_file is None:
        return DEFAULT_EXPERT_TEMPLATE
    path = Path(text_or_file)
    template = (
        path.read_text(encoding="utf-8") if len(text_or_file) < 4096 and path.is_file() else text_or_file
    )
    for field in ("{prompt}", "{context}"):
        if field not in template:
            raise ValueError(f"expert template must contain {field}: {template!r}")
    return template


def expert_message(fact: Fact, template: str = DEFAULT_EXPERT_TEMPLATE) -> str:
    return template.replace("{prompt}", fact.prompt).replace("{context}", fact.context)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, user: str, system: str | None = None) -> list[int]:
    """Token ids of a single-turn prompt, ending where the model's answer begins.

    With a chat template: the template, with the generation prompt appended. Without one (a base model):
    "Question: ...\\nAnswer:" preceded by the BOS token when the tokenizer has one, since many base models
    produce garbage without it.
    """
    if has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes any BOS itself, so the tokenizer must not add another.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = (f"{system}\n\n" if system else "") + f"Question: {user}\nAnswer:"
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer as the model would write it after `encode_prompt`, stop token included."""
    text = answer if has_chat_template(tokenizer) else " " + answer.lstrip()
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [*ids, end_of_answer_id(tokenizer)]


def end_of_answer_id(tokenizer) -> int:
    """The token that ends an answer: the chat template's end of turn when it has one, else EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer defines no EOS token; cannot tell where an answer ends")
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Every token that ends generation: the tokenizer's EOS and the model's generation-config EOS ids."""
    stops = {end_of_answer_id(tokenizer)}
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        stops.add(eos)
    elif eos:
        stops.update(int(e) for e in eos)
    return stops


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return end_of_answer_id(tokenizer)
