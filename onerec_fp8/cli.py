"""`onerec-fp8`: one entry point over the library (onerec), the ops tooling (ops) and the pipeline (tasks).

It sits above all three layers (docs/architecture.md). Each sub-command lives in its own module,
imported only when that sub-command runs (so `onerec-fp8 stack status` never pays for importing
torch), and a library-only install can run the library's commands. A command module defines:

    add_arguments(parser: argparse.ArgumentParser) -> None
    main(args: argparse.Namespace) -> dict | None

`main` returns the result, printed here as one JSON object on stdout; logs and progress go
to stderr. A command raises `onerec.errors.UserError` for input the user can fix: it is
printed as one line and the exit code is 1. A gate that ran exits with its verdict's code
(onerec.gate_verdict: 3 failed, 4 inconclusive), so scripts never mistake either
for success; a command module may also define `exit_code(args, result)`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from onerec.errors import UserError
from onerec.gate_verdict import GATES, GateVerdict

# name -> (module, one-line help) or a nested table of sub-commands.
COMMANDS: dict = {
    "data": {
        "synth": ("onerec.synth", "write a synthetic interaction data set"),
        "calibration": ("onerec.calibration_table", "draw a calibration request table from a data folder"),
    },
    "train": ("onerec.train", "train a OneRec-V2 checkpoint on a data folder"),
    "eval": ("onerec.evaluate", "offline recall/NDCG of a checkpoint or quantized model"),
    "quantize": ("onerec.quant.quantize_command", "FP8 post-training quantization of a checkpoint"),
    "analyze": ("onerec.quant.analysis", "per-layer weight/activation distribution analysis"),
    "gate": {
        "quality": ("onerec.quant.quality_gate", "FP8 vs bf16 quality gate"),
        "latency": ("onerec.engine.latency_gate", "FP8 vs bf16 latency gate on the current GPU"),
    },
    "publish": ("tasks.publish", "upload a checkpoint (manifest last) and calibration data to S3"),
    "stack": ("ops.stack", "start/stop/inspect the embedded local stack (S3, MLflow, Airflow)"),
    "serve": ("onerec.serve.server", "HTTP inference server for a model version or folder"),
    "pipeline": ("tasks.cli", "run pipeline steps (the same functions the DAGs call)"),
}

log = logging.getLogger("onerec")



def _add_commands(subparsers, table: dict, prefix: str) -> None:
    for name, entry in table.items():
        if isinstance(entry, dict):
            group = subparsers.add_parser(name, help=f"{name} sub-commands")
            inner = group.add_subparsers(dest=f"{prefix}{name}_command", metavar="COMMAND", required=True)
            _add_commands(inner, entry, f"{prefix}{name}_")
            continue
        module_name, help_text = entry
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        parser.set_defaults(_command=(f"{prefix}{name}".replace("_", " "), module_name))
        # Only the chosen command's module is imported: see _selected().
        parser.set_defaults(_needs_arguments=module_name)


def _selected(argv: list[str]) -> tuple[str, str] | None:
    """The (command, module) that argv names, found without importing any command module."""
    table = COMMANDS
    words = []
    for word in argv:
        if word.startswith("-"):
            break
        entry = table.get(word) if isinstance(table, dict) else None
        if entry is None:
            return None
        words.append(word)
        if isinstance(entry, dict):
            table = entry
            continue
        return " ".join(words), entry[0]
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onerec-fp8",
        description="FP8 post-training quantization, gates, registry and rollout for OneRec-V2.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_commands(subparsers, COMMANDS, "")
    selected = _selected([a for a in argv if a not in ("-v", "--verbose")])
    if selected is not None:
        # Re-create the selected parser with the module's own arguments.
        command, module_name = selected
        module = importlib.import_module(module_name)
        target = subparsers
        words = command.split()
        for i, word in enumerate(words):
            sub = target.choices[word]
            if i == len(words) - 1:
                module.add_arguments(sub)
            else:
                target = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    command, module_name = args._command
    module = importlib.import_module(module_name)
    try:
        result = module.main(args)
    except UserError as exc:
        print(f"onerec-fp8 {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"onerec-fp8 {command}: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        sys.stdout.write(json.dumps(result, indent=None, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()
        # a command module may decide its own exit code (None: the rule below)
        code = module.exit_code(args, result) if hasattr(module, "exit_code") else None
        if code is not None:
            return code
        if isinstance(result, dict) and result.get("gate") in GATES:  # a gate's report: its verdict decides
            return GateVerdict.of_report(result).exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
