"""Prompt formatting and the end-of-answer contract: the functions every stage uses to turn a user
message into token ids and to tell where an answer ends.

Targets, training and evaluation all call `encode_prompt`, so the prompt a model is trained on is,
token for token, the prompt it is evaluated on. They all call `answer_end` too, so an SFT target, a MixSD
target, a ground-truth fallback, an evaluation answer, an OPSD rollout and a KL answer end at the same
place and in the same token:

- with a chat template, an answer ends with the template's end-of-turn token (found by rendering an
  assistant turn, e.g. ChatML's `<|im_end|>`, Gemma's `<end_of_turn>`); generation also stops at EOS and
  at the model's generation-config EOS ids;
- without one (a base model, prompt "Question: ...\\nAnswer:"), an answer runs from its first
  non-whitespace character up to the first blank line or line starting with `Question:` or `Answer:`
  (PLAIN_STOP_STRINGS). Base models rarely emit EOS after an answer; they go on with the next
  "Question:" (or repeat "Answer:"). Generated tokens are checked against this rule as they come; a
  target is cut where the answer ends and given the EOS token, so the trained tokens end cleanly.
  Ground-truth targets begin on the `Answer:` line (" " + answer); so that MixSD targets begin the same
  way, `mix` does not let a target's first token start a new line (`AnswerEnd.line_break_ids`; measured on
  Gemma-3-270M, 13 of 20 pure-expert answers otherwise begin with a line break). Evaluation does not
  constrain the model: it reads the answer wherever it begins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from jinja2.exceptions import TemplateError

from mixsd.core.records import Fact

# Our wording of the expert prompt for chat models: the question, the reference the expert may use, and
# a request to answer. `{prompt}`, `{context}` and `{answer}` are filled per record.
DEFAULT_EXPERT_TEMPLATE = (
    "{prompt}\n\n"
    "Reference (from a knowledge source you have not seen before): {context}\n\n"
    "Answer the question above using this reference, and put the final answer in \\boxed{}."
)
# For base models (no chat template): the naive prompt with the fact on the line before it. A template
# ending in "Answer:" is the whole prompt in the plain format (see `encode_expert_prompt`).
PLAIN_EXPERT_TEMPLATE = "{context}\nQuestion: {prompt}\nAnswer:"
# The paper's variant: the ground-truth answer itself is the reference (section 1 of the method notes).
PAPER_EXPERT_TEMPLATE = (
    "{prompt}\n"
    "This question is from a new knowledge base. Here is the answer to this question: {answer}\n"
    "Now answer the question within \\boxed{}."
)
# The self-rewrite baseline (SDFT, Yang et al. 2024; `mixsd rewrite`): the model is shown the question and
# the ground-truth answer and asked to rewrite it in its own words. Our wording of SDFT's instruction
# ("Below are an instruction that describes a task along with a reference answer. Using the reference
# answer as a guide, write your own response.").
REWRITE_EXPERT_TEMPLATE = (
    "Below is a question along with a reference answer. Using the reference answer as a guide, write "
    "your own response to the question.\n\n"
    "Question: {prompt}\n\n"
    "Reference answer: {answer}"
)
EXPERT_TEMPLATES = {
    "chat": DEFAULT_EXPERT_TEMPLATE,
    "plain": PLAIN_EXPERT_TEMPLATE,
    "paper": PAPER_EXPERT_TEMPLATE,
    "rewrite": REWRITE_EXPERT_TEMPLATE,
}
# Where an answer ends in the plain format: a blank line, or a line that starts the next question.
PLAIN_STOP_STRINGS = ("\n\n", "\nQuestion:", "\nAnswer:")
_PLAIN_PROMPT_END = "Answer:"


def load_expert_template(text_or_file: str | None, tokenizer=None) -> str:
    """The expert template: `--expert-template` names a built-in (chat, plain, paper, rewrite), holds the template
    itself, or is the path of a file holding it. Unset: `chat` for a tokenizer with a chat template,
    `plain` for one without (a base model); `chat` when no tokenizer is given."""
    if text_or_file is None:
        return (
            PLAIN_EXPERT_TEMPLATE
            if tokenizer is not None and not has_chat_template(tokenizer)
            else (DEFAULT_EXPERT_TEMPLATE)
        )
    if text_or_file in EXPERT_TEMPLATES:
        return EXPERT_TEMPLATES[text_or_file]
    path = Path(text_or_file)
    template = (
        path.read_text(encoding="utf-8") if len(text_or_file) < 4096 and path.is_file() else text_or_file
    )
    if "{prompt}" not in template:
        raise ValueError(f"expert template must contain {{prompt}}: {template!r}")
    if "{context}" not in template and "{answer}" not in template:
        raise ValueError(f"expert template must contain {{context}} or {{answer}}: {template!r}")
    return template


def expert_message(fact: Fact, template: str = DEFAULT_EXPERT_TEMPLATE) -> str:
    # one pass over the fields, so a fact whose text contains "{answer}" is not filled twice
    fields = {"{prompt}": fact.prompt, "{context}": fact.context, "{answer}": fact.answer}
    out, i = [], 0
    while i < len(template):
        field = next((f for f in fields if template.startswith(f, i)), None)
        if field is None:
            out.append(template[i])
            i += 1
        else:
            out.append(fields[field])
            i += len(field)
    return "".join(out)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode_plain(tokenizer, text: str) -> list[int]:
    """Plain-format prompt text as ids, preceded by the BOS token when the tokenizer has one, since many
    base models produce garbage without it."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_prompt(tokenizer, user: str, system: str | None = None) -> list[int]:
    """Token ids of a single-turn prompt, ending where the model's answer begins.

    With a chat template: the template, with the generation prompt appended. Without one (a base model):
    "Question: ...\\nAnswer:" preceded by the BOS token when the tokenizer has one.
    """
    if has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes any BOS itself, so the tokenizer must not add another.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = (f"{system}\n\n" if system else "") + f"Question: {user}\n{_PLAIN_PROMPT_END}"
    return _encode_plain(tokenizer, text)


def encode_expert_prompt(tokenizer, fact: Fact, template: str = DEFAULT_EXPERT_TEMPLATE) -> list[int]:
    """Token ids of the expert prompt x+ (what `mixsd mix` and OPSD's teacher read).

    With a chat template, the filled template is the user message. Without one, a filled template that
    ends in "Answer:" is the whole prompt (BOS, any system text, then the template: PLAIN_EXPERT_TEMPLATE
    puts the fact on the line before "Question: ...\\nAnswer:"); any other template is the question of a
    plain "Question: ...\\nAnswer:" prompt.
    """
    message = expert_message(fact, template)
    if has_chat_template(tokenizer) or not message.rstrip(" ").endswith(_PLAIN_PROMPT_END):
        return encode_prompt(tokenizer, message, fact.system)
    return _encode_plain(tokenizer, (f"{fact.system}\n\n" if fact.system else "") + message.rstrip(" "))


# --------------------------------------------------------------------------------------------------
# The end-of-answer contract
# --------------------------------------------------------------------------------------------------
def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, or None.

    Found by rendering a user turn and an assistant turn and reading the first token after the
    assistant's text; None without a chat template, when the template writes no special token there, or
    when it cannot render a plain two-turn conversation.
    """
    if not has_chat_template(tokenizer):
        return None

    marker = "MixsdAnswerMarker"
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, KeyError, TypeError):
        return None
    at = text.rfind(marker)
    if at < 0:
        return None
    special = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False)
    }
    for token in tokenizer(text[at + len(marker) :], add_special_tokens=False)["input_ids"]:
        if tokenizer.decode([token]).strip() == "" and token not in special:
            continue  # whitespace the template puts before its end-of-turn token (e.g. Llama 2's " </s>")
        return int(token) if token in special else None
    return None


class AnswerEnd:
    """Where answers end for one tokenizer (and model): see the module docstring.

    end_id        the token every target ends in: the end-of-turn token, else EOS
    stop_ids      every token that ends generation: end_id, the tokenizer's EOS, the generation config's
    stop_strings  text-level stops (the plain format only; empty with a chat template)
    """

    def __init__(self, tokenizer, end_id: int, stop_ids: Iterable[int], stop_strings: Sequence[str]):
        self.tokenizer, self.end_id = tokenizer, int(end_id)
        self.stop_ids = frozenset(int(i) for i in stop_ids) | {self.end_id}
        self.stop_strings = tuple(stop_strings)

    def __repr__(self) -> str:
        return f"AnswerEnd(end_id={self.end_id}, stop_ids={sorted(self.stop_ids)}, stop_strings={self.stop_strings})"

    def answer_length(self, text: str) -> int | None:
        """How many characters of `text` (a generated answer) are the answer, when a stop string occurs
        after its first non-whitespace character; None when none does."""
        if not self.stop_strings:
            return None
        start = len(text) - len(text.lstrip())
        if start == len(text):
            return None  # nothing but whitespace yet: the answer has not begun
        hits = [at for at in (text.find(s, start) for s in self.stop_strings) if at >= 0]
        return min(hits) if hits else None

    def line_break_ids(self, size: int) -> list[int]:
        """Token ids below `size` whose text begins (after any spaces) with a line break: the tokens `mix`
        keeps from starting a plain-format target. Empty with a chat template."""
        if not self.stop_strings:
            return []
        texts = self.tokenizer.batch_decode([[i] for i in range(min(size, len(self.tokenizer)))])
        return [i for i, text in enumerate(texts) if text.lstrip(" ")[:1] in ("\n", "\r")]

    def cut_text(self, text: str) -> str:
        """`text` up to where the answer ends (all of it when no stop string occurs)."""
        length = self.answer_length(text)
        return text if length is None else text[:length]

    def text_stop(self, tokens: Sequence[int]) -> int | None:
        """When the decoded `tokens` have reached a stop string: how many of them hold the answer (the
        fewest whose text covers it); else None."""
        if not self.stop_strings or not tokens:
            return None
        decode = self.tokenizer.decode
        length = self.answer_length(decode(list(tokens), skip_special_tokens=True))
        if length is None:
            return None
        for count in range(len(tokens) + 1):
            if len(decode(list(tokens[:count]), skip_special_tokens=True)) >= length:
                return count
        return len(tokens)

    def finish(self, tokens: Sequence[int]) -> tuple[list[int], str] | None:
        """(answer tokens ending in a stop token, finish reason) once `tokens` has ended, else None.

        A stop token ends the answer there ("stop"); a text stop cuts it and appends end_id ("stop_text").
        """
        tokens = list(tokens)
        at = next((i for i, token in enumerate(tokens) if token in self.stop_ids), None)
        head = tokens if at is None else tokens[:at]
        cut = self.text_stop(head)
        if cut is not None:
            return [*head[:cut], self.end_id], "stop_text"
        if at is not None:
            return tokens[: at + 1], "stop"
        return None


def answer_end(tokenizer, model=None) -> AnswerEnd:
    """The end-of-answer contract of `tokenizer` (and `model`'s generation config, when given)."""
    if tokenizer.eos_token_id is None and end_of_turn_id(tokenizer) is None:
        raise ValueError("the tokenizer defines no EOS token; cannot tell where an answer ends")
    turn = end_of_turn_id(tokenizer)
    stops = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        stops.add(eos)
    elif eos:
        stops.update(int(e) for e in eos)
    end_id = turn if turn is not None else int(tokenizer.eos_token_id)
    strings = () if has_chat_template(tokenizer) else PLAIN_STOP_STRINGS
    return AnswerEnd(tokenizer, end_id, stops, strings)


def encode_answer(tokenizer, answer: str, end: AnswerEnd | None = None) -> list[int]:
    """Token ids of an answer as the model would write it after `encode_prompt`, ended as every target is:
    in the plain format the text is cut where the stop rule ends it; then `end.end_id`."""
    end = end or answer_end(tokenizer)
    text = answer if has_chat_template(tokenizer) else end.cut_text(" " + answer.lstrip())
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [*ids, end.end_id]


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return answer_end(tokenizer).end_id
