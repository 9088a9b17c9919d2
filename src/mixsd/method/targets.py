"""`mixsd mix`: MixSD targets for a corpus file, written by the frozen base model itself.

The method core, the mixed decoder, lives in `mixsd.method.decoder`; this module is the command around it: the
expert prompts, verification against the corpus's scorer, retries and the failure policy, the crash-safe
journal and resume (`mixsd.core.stages`), multi-process sharding and the summary. Its options are
`mixsd.method.mix_config.MixConfig`; the SFT baseline's targets in the same format (`mixsd sft-targets`) are
`mixsd.method.sft_targets`. Both are importable from here as well, as the README documents them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

# models by attribute (models.load_model): a test patching that module sees every resolution and load
from mixsd import __version__
from mixsd.core import models
from mixsd.core.answers import matches, resolve_match_mode
from mixsd.core.files import (
    InputError,
    JournalWriter,
    atomic_write_json,
    atomic_write_jsonl,
    output_lock,
    read_journal,
    sha256_file,
    sha256_text,
)
from mixsd.core.records import Fact, load_corpus
from mixsd.core.stages import Stage
from mixsd.method.decoder import Draw, Job, MixedDecoder
from mixsd.method.fidelity import passes, summarize_fidelity, target_fidelity
from mixsd.method.mix_config import MixConfig, reject_phrase_list
from mixsd.method.prompts import (
    answer_end,
    encode_answer,
    encode_expert_prompt,
    encode_prompt,
    load_expert_template,
)


# --------------------------------------------------------------------------------------------------
# `mixsd mix`: corpus file in, target file out; resumable
# --------------------------------------------------------------------------------------------------
def _settings(config: MixConfig, template: str, input_sha: str) -> dict[str, Any]:
    """What determines the targets (batch size, device and failure policy do not)."""
    return {
        "model": config.model,
        "input_sha256": input_sha,
        "lam": config.lam,
        "temperature": config.temperature,
        "top_k": config.top_k,
        "seed": config.seed,
        "retries": config.retries,
        "verify": config.verify,
        "max_new_tokens": config.max_new_tokens,
        "keep_length_capped": config.keep_length_capped,
        "num_generations": config.num_generations,
        "expert_template_sha256": sha256_text(template)[:16],
        "dtype": config.dtype,
        # Extensions enter the fingerprint only when used, so outputs written before they existed (or
        # without them) keep their fingerprint and are not redone.
        **(
            {"min_expert_logprob": config.min_expert_logprob} if config.min_expert_logprob is not None else {}
        ),
        **({"guard_top_p": config.guard_top_p} if config.guard_top_p is not None else {}),
        **({"reject_phrases": reject_phrase_list(config.reject_phrases)} if config.reject_phrases else {}),
    }


def journal_path(output: str | os.PathLike, rank: int = 0, world: int = 1) -> Path:
    """Where finished records are journaled while a run is under way (one journal per process)."""
    output = Path(output)
    suffix = ".journal" if world == 1 else f".journal.{rank}-of-{world}"
    return output.with_name(output.name + suffix)


def _all_journals(output: Path) -> list[Path]:
    return sorted(output.parent.glob(output.name + ".journal*"))


def summary_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".summary.json")


def draws_path(output: str | os.PathLike) -> Path:
    """Every record's last draw, verified or not, left beside a finished target file (the journals, joined):
    another run with the same settings but another failure policy takes them with --draws-from."""
    output = Path(output)
    return output.with_name(output.stem + ".draws.jsonl")


def _earlier_draws(path: Path, header: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """The draws of `path` (a `draws_path` file) when its run had this run's settings; none otherwise, with
    a notice (the run then decodes them itself: the same draws, only slower)."""
    if not path.is_file():
        print(f"note: {path} does not exist (yet); decoding every record", file=sys.stderr)
        return {}
    rows = _read_rows(path)
    if not rows or rows[0] != header:
        print(f"note: {path} was drawn with other settings; decoding every record", file=sys.stderr)
        return {}
    return {(row["id"], row["generation"]): row for row in rows[1:]}


def _draw_record(
    fact: Fact, draw: Draw, verified: bool, text: str, settings: dict[str, Any]
) -> dict[str, Any]:
    job = draw.job
    naive_count = draw.branch.count("N")
    fidelity = target_fidelity(draw.branch, draw.logprob_expert)
    return {
        "id": fact.id,
        "generation": job.generation,
        "prompt": fact.prompt,
        "answer": fact.answer,
        "check": fact.check,
        "prompt_ids": job.naive_ids,
        "expert_prompt_ids": job.expert_ids,
        "target_ids": draw.tokens,
        "branch": "".join(draw.branch),
        "correct": verified,
        "attempts": job.attempt + 1,
        "finish": draw.finish,
        "text": text,
        "logprob_expert": [None if x is None else round(x, 5) for x in draw.logprob_expert],
        "logprob_naive": [None if x is None else round(x, 5) for x in draw.logprob_naive],
        "naive_fraction": round(naive_count / len(draw.tokens), 5) if draw.tokens else None,
        # fidelity (mixsd.method.fidelity): computed from the unrounded log-probs, as verification saw them
        "min_expert_logprob": (
            None if fidelity.min_expert_logprob is None else round(fidelity.min_expert_logprob, 5)
        ),
        "low_expert_tokens": fidelity.low_expert_tokens,
        "naive_expert_nll": round(fidelity.naive_expert_nll, 5),
        "source": "mixsd",
        "settings": settings,
    }


def _apply_failure_policy(row: dict[str, Any], policy: str, tokenizer) -> dict[str, Any] | None:
    if row["correct"]:
        return row
    if policy == "drop":
        return None
    if policy == "keep":  # a prompt too long for the model has no target at all: nothing to keep
        return row if row["target_ids"] else None
    # policy == "answer": train on y* instead, ended exactly as an SFT target is
    fallback = encode_answer(tokenizer, row["answer"])
    return {
        **row,
        "target_ids": fallback,
        "branch": "G" * len(fallback),
        "text": row["answer"],
        "logprob_expert": None,
        "logprob_naive": None,
        "naive_fraction": None,
        "min_expert_logprob": None,
        "low_expert_tokens": None,
        "naive_expert_nll": None,
        "source": "answer_fallback",
    }


def attempts_allowed(config: MixConfig) -> int:
    """Attempts per record: --retries + 1, or 1 where every attempt would draw the same target. Greedy decoding
    (temperature 0) with a coin that always names the same conditional (λ 0 or 1) uses no random number, so a
    retry repeats the failed draw token for token: at λ = 0, retries 30 spent most of a mix on records that
    could never verify."""
    repeats_itself = config.temperature == 0 and config.lam in (0.0, 1.0)
    return 1 if repeats_itself else config.retries + 1


def build_jobs(
    facts: list[Fact], tokenizer, template: str, num_generations: int = 1
) -> list[tuple[Fact, Job]]:
    jobs = []
    for fact in facts:
        naive = encode_prompt(tokenizer, fact.prompt, fact.system)
        expert = encode_expert_prompt(tokenizer, fact, template)
        jobs.extend((fact, Job(fact.id, g, naive, expert)) for g in range(num_generations))
    return jobs


def mix(config: MixConfig, *, model=None, tokenizer=None, progress: bool = True) -> dict[str, Any]:
    """Build MixSD targets for a corpus file (see `_mix_locked`) under the output's lock."""
    with output_lock(config.output):  # one run per output: a second one refuses before any work
        return _mix_locked(config, model=model, tokenizer=tokenizer, progress=progress)


def _mix_locked(config: MixConfig, *, model=None, tokenizer=None, progress: bool = True) -> dict[str, Any]:
    """Build MixSD targets for a corpus file; return the run's summary (also written beside the output).

    Under `accelerate launch` / `torchrun` every process takes every N-th record and journals its own
    results; the main process assembles the final file once all are done. Records never depend on the
    process that drew them, so any number of processes, and any resume, writes the same tokens, branches
    and verification; stored log-probs agree within 1e-4 (batch composition moves their last digit).
    """
    from accelerate import PartialState  # only a run that decodes pays for accelerate's import

    if config.retries < 0 or config.num_generations < 1:
        raise ValueError("--retries must be >= 0 and --num-generations >= 1")
    facts = load_corpus(config.input)  # validates every line before any work
    # the corpus names its scorer; the resolved mode goes into settings and summary
    config = replace(config, verify=resolve_match_mode(config.verify, config.input))
    handle = None  # the model resolved once, when this run loads it
    if tokenizer is None:  # needed first: the default expert template depends on the chat template
        handle = models.resolve_model(config.model)
        tokenizer = models.load_tokenizer(handle, trust_remote_code=config.trust_remote_code)
    template = load_expert_template(config.expert_template, tokenizer)
    settings = _settings(config, template, sha256_file(config.input))
    output, summary_file = Path(config.output), summary_path(config.output)
    # The finished file also depends on the failure policy (the journal, which holds every draw, does not).
    stage = Stage("mix", [output, summary_file], {**settings, "on_failure": config.on_failure})
    # accelerate joins torchrun's process group on the CPU only when told the run is on the CPU: on a machine
    # without an accelerator, PartialState() under torchrun has every process believe it is alone, and each
    # would mix the whole corpus (and race the others to assemble it)
    on_cpu = config.device == "cpu" or (config.device is None and not torch.accelerator.is_available())
    state = PartialState(cpu=on_cpu)
    rank, world = state.process_index, state.num_processes

    if config.overwrite:
        if state.is_main_process:
            for old in _all_journals(output):
                old.unlink()
        state.wait_for_everyone()
    elif stage.is_current():
        if state.is_main_process:
            print(f"{output} is complete for these settings; nothing to do (--overwrite to redo).")
        return json.loads(summary_file.read_text())
    if state.is_main_process:
        stage.begin()
    header = {"journal_of": "mixsd mix", "settings": settings}
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for old in _all_journals(output):  # any earlier run's journals, whatever its number of processes
        rows = read_journal(old) if old == journal_path(output, rank, world) else _read_rows(old)
        if rows and rows[0] != header:
            raise InputError(
                "an unfinished run with different settings exists; rerun with the same "
                "arguments or pass --overwrite",
                old,
            )
        done.update(((row["id"], row["generation"]), row) for row in rows[1:])
    if config.draws_from:
        done.update(_earlier_draws(Path(config.draws_from), header))

    all_jobs = build_jobs(facts, tokenizer, template, config.num_generations)
    fact_by_id = {fact.id: fact for fact in facts}
    mine = [job for i, (_, job) in enumerate(all_jobs) if i % world == rank]
    todo = [job for job in mine if (job.key, job.generation) not in done]
    stats = dict.fromkeys(("generated_tokens", "naive_tokens", "fidelity_rejections", "phrase_rejections"), 0)
    started = time.perf_counter()
    if todo:  # a run whose every draw is journaled or reused (--draws-from) loads no model
        if model is None:
            model = models.load_model(
                handle or config.model,
                dtype=config.dtype,
                trust_remote_code=config.trust_remote_code,
                device=config.device or state.device,
            )
        stats = _decode(
            config, model, tokenizer, todo, len(mine), fact_by_id, settings, output, header, state, progress
        )
    elapsed = time.perf_counter() - started
    if world > 1:  # every process's counts go into the summary
        gathered = [None] * world

        dist.all_gather_object(gathered, stats)
        stats = {key: sum(g[key] for g in gathered) for key in stats}
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}

    for journal in _all_journals(output):
        done.update(((row["id"], row["generation"]), row) for row in _read_rows(journal)[1:])
    rows = [done[(job.key, job.generation)] for _, job in all_jobs]
    final = [
        r for r in (_apply_failure_policy(row, config.on_failure, tokenizer) for row in rows) if r is not None
    ]
    atomic_write_jsonl(output, final)
    summary = summarize(rows, config, settings, stats, elapsed, len(final), world)
    atomic_write_json(summary_file, summary)
    atomic_write_jsonl(draws_path(output), [header, *rows])
    for journal in _all_journals(output):
        journal.unlink()
    stage.finish()  # last: a crash before it leaves the run unfinished, never an old record on new files
    return summary


def _decode(
    config: MixConfig,
    model,
    tokenizer,
    todo: list[Job],
    mine: int,
    fact_by_id: dict[str, Fact],
    settings: dict[str, Any],
    output: Path,
    header: dict[str, Any],
    state,
    progress: bool,
) -> dict[str, int]:
    """Draw, verify and journal the targets of `todo` (this process's records not yet done, of `mine`) on
    `state`'s process; return the counts the summary reports for this run."""
    rank, world = state.process_index, state.num_processes
    end = answer_end(tokenizer, model)
    decoder = MixedDecoder(
        model,
        end,
        lam=config.lam,
        temperature=config.temperature,
        top_k=config.top_k,
        seed=config.seed,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        max_attempts=attempts_allowed(config),
        pad_id=tokenizer.pad_token_id or 0,
        context_limit=models.context_length(model),
        guard_top_p=config.guard_top_p,
    )

    def decode(draw: Draw) -> str:
        return tokenizer.decode(draw.tokens, skip_special_tokens=True)

    fidelity_rejections = [0]  # attempts refused by --min-expert-logprob alone (a list: set in a closure)
    rejected_phrases = reject_phrase_list(config.reject_phrases)
    phrase_rejections = [0]  # attempts whose answer matched but whose text held a --reject-phrases phrase

    def accept(draw: Draw) -> bool:
        if draw.finish == "prompt_too_long":
            return False
        if draw.finish == "length" and config.verify != "none" and not config.keep_length_capped:
            return False  # no end of answer: training on it would teach the model not to stop
        text = decode(draw)
        if not matches(text, fact_by_id[draw.job.key].check, config.verify):
            return False
        if any(phrase in text.lower() for phrase in rejected_phrases):
            phrase_rejections[0] += 1
            return False
        if not passes(target_fidelity(draw.branch, draw.logprob_expert), config.min_expert_logprob):
            fidelity_rejections[0] += 1  # the answer matched: only the fidelity check refused it
            return False
        return True

    started = time.perf_counter()
    bar = tqdm(
        total=mine,
        initial=mine - len(todo),
        desc="mix",
        unit="rec",
        disable=not progress or not state.is_local_main_process,
    )
    verified_count, finished_count = 0, 0
    with JournalWriter(journal_path(output, rank, world), header=header) as writer:

        def on_done(draw: Draw, verified: bool) -> None:
            nonlocal verified_count, finished_count
            row = _draw_record(fact_by_id[draw.job.key], draw, verified, decode(draw), settings)
            writer.write([row])
            verified_count, finished_count = verified_count + verified, finished_count + 1
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(
                verified=f"{verified_count / finished_count:.0%}",
                tok_s=f"{decoder.generated_tokens / elapsed:.0f}",
            )

        decoder.run(todo, accept, on_done)
    bar.close()
    return {
        "generated_tokens": decoder.generated_tokens,
        "naive_tokens": decoder.naive_tokens,
        "fidelity_rejections": fidelity_rejections[0],
        "phrase_rejections": phrase_rejections[0],
    }


def _read_rows(journal: Path) -> list[dict[str, Any]]:
    """Another process's journal: read it without repairing it (its owner may still be writing)."""
    rows = []
    for line in journal.read_text(encoding="utf-8").split("\n")[:-1]:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def summarize(
    rows: list[dict[str, Any]],
    config: MixConfig,
    settings: dict[str, Any],
    stats: dict[str, int],
    seconds: float,
    written: int,
    processes: int = 1,
) -> dict[str, Any]:
    verified = [r for r in rows if r["correct"]]
    target_tokens = sum(len(r["target_ids"]) for r in verified)
    naive_tokens = sum(r["branch"].count("N") for r in verified)
    verified_rate = len(verified) / len(rows) if rows else 0.0
    # targets whose last attempt ran into --max-new-tokens, and how many of them the output file holds
    capped = [r for r in rows if r["finish"] == "length"]
    capped_written = sum(r["correct"] or config.on_failure == "keep" for r in capped)
    return {
        "mixsd_version": __version__,
        "settings": settings,
        "config": asdict(config),
        "records": len(rows),
        "written": written,
        "verified": len(verified),
        "verified_rate": verified_rate,
        "attempts_allowed": attempts_allowed(config),  # 1 where retries would repeat the same draw
        "mean_attempts": sum(r["attempts"] for r in rows) / len(rows) if rows else 0.0,
        "first_try_rate": sum(r["correct"] and r["attempts"] == 1 for r in rows) / len(rows) if rows else 0.0,
        # over the kept targets (verification favours expert tokens) and over every token drawn this run
        "naive_fraction": naive_tokens / target_tokens if target_tokens else None,
        # --guard-top-p: the share of kept target tokens whose naive coin the guard overruled (letter V)
        "guard_vetoed_fraction": (
            sum(r["branch"].count("V") for r in verified) / target_tokens
            if config.guard_top_p is not None and target_tokens
            else None
        ),
        "naive_fraction_drawn": (
            stats["naive_tokens"] / stats["generated_tokens"] if stats["generated_tokens"] else None
        ),
        "prompt_too_long": sum(r["finish"] == "prompt_too_long" for r in rows),
        # how each record's last attempt ended: stop (a stop token), stop_text (the plain format's text
        # stop), length (the cap), prompt_too_long
        "finish": {f: sum(r["finish"] == f for r in rows) for f in sorted({r["finish"] for r in rows})},
        "length_capped": len(capped),
        "length_capped_written": capped_written,
        "keep_length_capped": config.keep_length_capped,
        "warnings": _warnings(rows, config.lam, config.verify, verified_rate, len(capped)),
        # over the verified targets (the ones written unless a failure policy adds others); the rejection
        # count is this run's attempts refused by --min-expert-logprob although their answer matched
        "fidelity": {
            **summarize_fidelity(
                [r.get("min_expert_logprob") for r in verified],
                [r.get("low_expert_tokens") or 0 for r in verified],
                config.min_expert_logprob,
            ),
            "rejected_attempts_this_run": stats.get("fidelity_rejections", 0),
        },
        "verify_mode": config.verify,
        "on_failure": config.on_failure,
        # records written with the ground-truth answer instead of a target of their own (--on-failure answer)
        "fallback": len(rows) - len(verified) if config.on_failure == "answer" else 0,
        # this run's attempts refused by --reject-phrases alone (their answer matched)
        "phrase_rejections_this_run": stats.get("phrase_rejections", 0),
        "generated_tokens_this_run": stats["generated_tokens"],
        "seconds_this_run": round(seconds, 3),
        "processes": processes,
        "tokens_per_second": stats["generated_tokens"] / seconds if seconds > 0 else None,
    }


def _warnings(
    rows: list[dict[str, Any]], lam: float, verify: str, verified_rate: float, capped: int
) -> list[str]:
    """What a user must know before training on these targets (printed by `mixsd mix`, kept in the summary)."""
    if not rows or verify == "none":
        return []
    out = []
    if verified_rate < 0.5 and lam == 0:
        out.append(
            f"the pure expert (lam 0) fails verification on {1 - verified_rate:.0%} of records: the expert "
            "prompt does not make this model answer, so no lam can help; try another --expert-template "
            "(see docs/formats.md)"
        )
    elif verified_rate < 0.5:
        out.append(
            f"verification failed on {1 - verified_rate:.0%} of records; check the pure expert first "
            "(rerun with --lam 0): if it fails too, no lam can help and the expert prompt is the problem"
        )
    if capped > len(rows) / 2:
        out.append(
            f"{capped} of {len(rows)} targets ran into --max-new-tokens without ending; raise it, or check "
            "that the model stops (chat template / plain-format stop rule, see docs/formats.md)"
        )
    return out


def format_summary(summary: dict[str, Any]) -> str:
    naive = summary["naive_fraction"]
    tps = summary["tokens_per_second"]
    return (
        f"records {summary['records']}  written {summary['written']}  "
        f"verified {summary['verified_rate']:.1%} ({summary['verify_mode']})  "
        f"first try {summary['first_try_rate']:.1%}  mean attempts {summary['mean_attempts']:.2f}  "
        f"naive tokens {'-' if naive is None else f'{naive:.1%}'} (lam {summary['settings']['lam']})  "
        f"{'-' if tps is None else f'{tps:.0f}'} tok/s" + _format_fidelity(summary.get("fidelity"))
    )


def _format_fidelity(fidelity: dict[str, Any] | None) -> str:
    """The summary line's fidelity part (absent from summaries written before the fidelity score)."""
    if not fidelity or not fidelity["targets"]:
        return ""
    text = (
        f"  naive tokens the expert rejects (logprob < {fidelity['low_expert_logprob']:g}) in "
        f"{fidelity['with_low_expert_tokens']}/{fidelity['targets']} targets"
    )
    if fidelity["min_expert_logprob_threshold"] is not None:
        text += f"  fidelity redraws {fidelity['rejected_attempts_this_run']}"
    return text


def mix_command(config: MixConfig) -> dict[str, Any]:
    config.set_threads()
    summary = mix(config)
    if not summary:  # a non-main process of a multi-process run: the main process reports
        return summary
    print(format_summary(summary))
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {config.output}")
    return summary


__all__ = [
    "build_jobs",
    "format_summary",
    "journal_path",
    "mix",
    "mix_command",
    "summarize",
    "summary_path",
]
