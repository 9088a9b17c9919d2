"""The `mixsd` command: one entry, subcommands that map straight onto library functions.

Each subcommand is a config dataclass (whose field help *is* the CLI help, parsed by transformers'
HfArgumentParser) and a function that takes it. Modules are imported only when their command runs, so
`mixsd --help` is instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import importlib
import os
import sys
from dataclasses import dataclass

from mixsd import __version__
from mixsd.core.files import InputError


@dataclass(frozen=True)
class Command:
    module: str
    config: str
    function: str
    summary: str
    positional: tuple[str, ...] = ()  # fields also accepted as bare words, in this order


COMMANDS: dict[str, Command] = {
    "mix": Command(
        "mixsd.method.targets",
        "MixConfig",
        "mix_command",
        "Build MixSD targets (mixed expert/naive self-distillation) for a corpus file.",
    ),
    "sft-targets": Command(
        "mixsd.method.sft_targets",
        "SFTTargetsConfig",
        "sft_targets_command",
        "Write ground-truth (SFT baseline) targets in the same format as `mix`.",
    ),
    "rewrite": Command(
        "mixsd.method.rewrite",
        "RewriteConfig",
        "rewrite_command",
        "Self-rewrite baseline (SDFT) targets: the model rewrites each answer in its own words, verified.",
    ),
    "train": Command(
        "mixsd.training.train",
        "TrainConfig",
        "train_command",
        "Fine-tune on a target file (SFT / MixSD), or run the OPSD baseline (--method opsd).",
    ),
    "eval": Command(
        "mixsd.evaluation.evaluate",
        "EvalConfig",
        "eval_command",
        "Evaluate a model: memorization, generalization, retention probes.",
    ),
    "edit": Command(
        "mixsd.editing.edit",
        "EditConfig",
        "edit_command",
        "Write facts into the weights with a locate-and-edit method (MEMIT), the editing baseline.",
    ),
    "analyze nll": Command(
        "mixsd.evaluation.analyze",
        "NLLConfig",
        "nll_command",
        "NLL of target tokens under the base model, overall and per branch.",
    ),
    "analyze fisher": Command(
        "mixsd.evaluation.analyze",
        "FisherConfig",
        "fisher_command",
        "Fisher-weighted parameter displacement of a tuned model from its base.",
    ),
    "corpus kgfact": Command(
        "mixsd.corpora.kgfact",
        "KGFactConfig",
        "kgfact_command",
        "Generate the KGFact corpus: facts about invented entities.",
    ),
    "corpus kgfunc": Command(
        "mixsd.corpora.kgfunc",
        "KGFuncConfig",
        "kgfunc_command",
        "Generate the KGFunc corpus: novel digit operations.",
    ),
    "corpus import": Command(
        "mixsd.corpora.importers",
        "ImportConfig",
        "import_command",
        "Import your own facts (qa-jsonl, csv, simpleqa, mquake) into a corpus folder.",
        positional=("file",),
    ),
    "corpus documents": Command(
        "mixsd.corpora.documents",
        "DocumentsConfig",
        "documents_command",
        "Documents in: passages, model-written question/answer pairs, a corpus folder (--squad N: SQuAD).",
        positional=("inputs",),
    ),
    "corpus counterfact": Command(
        "mixsd.corpora.counterfact",
        "CounterfactConfig",
        "counterfact_command",
        "Build a counterfactual-edit corpus from real facts the base model knows (needs --model).",
    ),
    "probes fetch": Command(
        "mixsd.corpora.probes",
        "ProbesFetchConfig",
        "fetch_command",
        "Fetch held-out probe sets (BIG-bench tasks, SQuAD paragraphs) for retention.",
    ),
    "probes build-capability": Command(
        "mixsd.corpora.capability",
        "CapabilityConfig",
        "capability_command",
        "Build generative capability probes (in-context facts, instructions, known facts with --model).",
    ),
    "probes export-lm-eval": Command(
        "mixsd.evaluation.lmeval_export",
        "LmEvalExportConfig",
        "export_command",
        "Write the probes as lm-evaluation-harness tasks (YAML + local data) for `lm_eval --include_path`.",
        positional=("out",),
    ),
    "export trl": Command(
        "mixsd.method.export",
        "ExportTRLConfig",
        "export_trl_command",
        "Targets (or a corpus) as the datasets TRL's SFTTrainer (or self-distillation trainers) read.",
    ),
    "experiment": Command(
        "mixsd.experiments.experiment",
        "ExperimentConfig",
        "experiment_command",
        "Run a declared grid (corpus x methods x seeds) end to end, with its report.",
        positional=("config",),
    ),
    "demo": Command(
        "mixsd.experiments.experiment",
        "DemoConfig",
        "demo_command",
        "The main job on the embedded model: base vs SFT vs MixSD on KGFact-small.",
    ),
}


def _usage(prefix: str = "") -> str:
    names = [name for name in COMMANDS if name.startswith(prefix)]
    width = max(len(name) for name in names)
    lines = [
        f"usage: mixsd {prefix or ''}<command> [options]   (mixsd <command> --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {COMMANDS[name].summary}" for name in names]
    return "\n".join(lines)


def _find_command(argv: list[str]) -> tuple[str | None, list[str]]:
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, argv[words:]
    return None, argv


def _positional_to_options(command: Command, args: list[str]) -> list[str]:
    """Let `mixsd experiment grid.yaml` mean `mixsd experiment --config grid.yaml`."""
    out, names = [], list(command.positional)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            out.append(arg)
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-"):
                out.append(args[i + 1])
                i += 1
        elif names:
            out += [f"--{names.pop(0)}", arg]
        else:
            out.append(arg)
        i += 1
    return out


# Old spellings of options, still accepted with a warning: old -> the words that replace it. Each applies
# to the commands whose config has the new option's field.
RENAMED_OPTIONS: dict[str, tuple[str, ...]] = {
    "--no-progress": ("--progress", "false"),  # mixsd train before `progress` took true/false
    "--no_progress": ("--progress", "false"),
}


def _renamed_options(name: str, config_cls: type, args: list[str]) -> list[str]:
    """`args` with every old spelling of an option of this command replaced by the new one (a warning
    on stderr says which)."""
    fields = {field.name for field in dataclasses.fields(config_cls)}
    out = []
    for arg in args:
        new = RENAMED_OPTIONS.get(arg)
        if new is not None and new[0].lstrip("-").replace("-", "_") in fields:
            print(f"mixsd {name}: warning: {arg} is deprecated; use {' '.join(new)}", file=sys.stderr)
            out += new
        else:
            out.append(arg)
    return out


def run_command(name: str, args: list[str]):
    from transformers import (
        HfArgumentParser,  # here: `mixsd --help` and the command list load no transformers
    )

    class Parser(HfArgumentParser):
        def error(self, message: str):
            # argparse prints the whole usage first: a page for `train`, above the one line that matters
            self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")

    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    config_cls = getattr(module, command.config)
    parser = Parser(config_cls, prog=f"mixsd {name}", description=command.summary)
    config, unknown = parser.parse_args_into_dataclasses(
        _positional_to_options(command, _renamed_options(name, config_cls, args)),
        look_for_args_file=False,
        return_remaining_strings=True,
    )
    if unknown:  # argparse's own message and status 2, not HfArgumentParser's traceback
        options = [option for action in parser._actions for option in action.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return getattr(module, command.function)(config)


def describe_error(err: BaseException) -> str:
    """One line for a user-facing error: the file an OSError concerns, what went wrong, what to do."""
    if isinstance(err, UnicodeDecodeError):
        text = f"a file is not UTF-8 text ({err})"
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            text += " (nothing was replaced: an existing output is left as it was; free space and rerun)"
        elif err.errno in (errno.EACCES, errno.EPERM) and _unreadable_file(err.filename):
            text += " (an input you may not read: check its permissions)"
        elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            text += " (choose an output location you can write to)"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())  # some library messages span lines; the report is one line


def _unreadable_file(filename: str | bytes | int) -> bool:
    """An existing file this process may not read: a refused input, never an output (outputs are
    written beside their name and renamed, so a refused write names a folder or a new file)."""
    return os.path.isfile(filename) and not os.access(filename, os.R_OK)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"mixsd {__version__}")
        return 0
    name, rest = _find_command(argv)
    if name is None:
        group = argv[0] + " "
        if any(n.startswith(group) for n in COMMANDS):
            if argv[1:] in ([], ["--help"], ["-h"]):
                print(_usage(group))
                return 0
            print(f"mixsd: unknown command '{' '.join(argv[:2])}'\n\n{_usage(group)}", file=sys.stderr)
            return 2
        print(f"mixsd: unknown command '{argv[0]}'\n\n{_usage()}", file=sys.stderr)
        return 2

    from transformers.utils import logging as hf_logging  # here: only a command that runs loads transformers

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    try:
        run_command(name, rest)
    except (InputError, OSError, ModuleNotFoundError, UnicodeDecodeError) as err:
        # A user's mistake or the environment (a bad option or file, a missing model or package, a
        # read-only or full disk): one line, status 2. Anything else is a bug and keeps its traceback;
        # MIXSD_TRACEBACK=1 shows it for these too.
        if os.environ.get("MIXSD_TRACEBACK"):
            raise
        print(f"mixsd {name}: error: {describe_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixsd {name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
