"""`tunelab` command line: a thin shell over the library, one module per verb.

Each verb module under `tunelab.cli` defines `add_arguments(parser)` and `run(args) -> int` and imports torch,
transformers and friends only inside `run`, so `tunelab --help` and every `tunelab VERB --help` stay instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading
from typing import Any

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota: OSErrors without a file name

# verb -> (module, one-line help). A plain dict: no registry machinery.
VERBS = {
    "prepare": ("tunelab.cli.prepare", "validate and prepare a raw dataset (Alpaca/ShareGPT/OpenAI messages)"),
    "validate": ("tunelab.cli.validate", "check a dataset without writing anything (same as prepare --check)"),
    "train": ("tunelab.cli.train", "fine-tune a model (LoRA, QLoRA, DoRA or full) from a config file"),
    "eval": ("tunelab.cli.eval", "evaluate a model or adapter: perplexity, BLEU, ROUGE, chrF, exact match"),
    "merge": ("tunelab.cli.merge", "merge a LoRA adapter into its base model and verify the result"),
    "export": ("tunelab.cli.export", "export a merged model to GGUF (llama.cpp / Ollama)"),
    "infer": ("tunelab.cli.infer", "chat with a model, answer one prompt, or generate for a file of prompts"),
    "serve": ("tunelab.cli.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "runs": ("tunelab.cli.runs", "list, show, compare, plot and report runs"),
    "reproduce": ("tunelab.cli.reproduce", "re-run a finished run from its folder and compare the loss curves"),
    "sweep": ("tunelab.cli.sweep", "run a grid of config variations as one sweep"),
    "ui": ("tunelab.cli.ui", "web dashboard over the runs: live curves, compare, new runs, chat"),
    "demo": ("tunelab.cli.demo", "write the demo datasets and run the whole pipeline on the bundled model"),
}


def _number(kind, ok, rule: str):
    """An argparse type: `kind(text)` that `ok` accepts, else argparse's usage error naming `rule`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        return value
    return parse


positive_int = _number(int, lambda v: v >= 1, "a whole number of at least 1")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number of at least 0")
port_number = _number(int, lambda v: 0 <= v <= 65535, "a port number (0-65535)")
non_negative = _number(float, lambda v: 0 <= v < float("inf"), "a number of at least 0")
positive = _number(float, lambda v: 0 < v < float("inf"), "a number above 0")
unit_fraction = _number(float, lambda v: 0 < v <= 1, "a number above 0 and at most 1")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from tunelab import __version__

    parser = argparse.ArgumentParser(prog="tunelab", description="A reproducible LLM fine-tuning lab.")
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if only is None or verb == only:  # import only the verb being run (or all, for help)
            try:
                importlib.import_module(module).add_arguments(p)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
    return parser


def main(argv: list[str] | None = None, *, command_line: bool | None = None) -> int:
    """Run one verb. `command_line` (default: argv is None) marks a real process start, where the training verbs
    may re-execute the process once with tunelab's allocator settings (tunelab.runtime)."""
    command_line = argv is None if command_line is None else command_line
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=verb if verb in VERBS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_setting_hint(args, unknown)}")
    if not args.verb:
        parser.print_help()
        return 0
    if command_line:
        from tunelab.runtime import reexec_with_allocator_settings

        reexec_with_allocator_settings(args.verb)
    import logging

    from tunelab.errors import TunelabError

    # bitsandbytes (imported for QLoRA, and by peft where tunelab does not hide it) reports at import that the
    # optional `kernels` hub package for faster 4-bit CPU matmuls is missing; not needed, and "Failed to load" misleads
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    module = importlib.import_module(VERBS[args.verb][0])
    if os.environ.get("TUNELAB_UI_JOB") and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # the dashboard's Stop is a SIGINT; started in the background (`nohup tunelab ui &`) it passed on SIGINT
        # ignored, and Python then installs no Ctrl-C handler: eval, merge or export never stopped
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = _sigterm_interrupts()
    try:
        return int(module.run(args) or 0)
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the user gave that cannot be written or read (a file where a folder must be, ...)
        if e.filename is None and e.errno not in _DISK_ERRNOS:
            raise
        names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        print(f"error: {e.strerror or type(e).__name__}{': ' + names if names else ''}", file=sys.stderr)
        if e.errno in _DISK_ERRNOS:
            print("the disk is full: free some space (older runs in outputs/, exports) and run the command again; "
                  "what was being written was not kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _setting_hint(args: argparse.Namespace, unknown: list[str]) -> str:
    """`--training.epochs=1` or `--epochs 1` (other tools' flags) to a verb that takes config overrides: the
    override it meant."""
    if not hasattr(args, "overrides"):
        return ""
    from tunelab.config import KEY_PATHS, SECTION_PATHS, key_hint

    for item in unknown:
        name, _, value = item.lstrip("-").partition("=")
        key = name.replace("-", "_")
        hint = key if key in KEY_PATHS else key_hint(key).removeprefix(" (did you mean ").removesuffix("?)")
        keys = [k for k in hint.split(" or ") if k and k not in SECTION_PATHS]  # `output=...` sets no setting
        if item.startswith("--") and keys:
            return f" (config settings go without dashes: {keys[0]}={value or '...'})"
    return ""


def _sigterm_interrupts() -> dict[int, Any]:
    """SIGTERM (`kill`, a job scheduler) stops a verb as Ctrl-C does, so its cleanup runs (a merge stopped midway
    leaves no hidden copy of the model); SIGHUP (the terminal or ssh session closed) is turned into a SIGTERM, so it
    takes whatever stop the verb has (training and the servers put their own SIGTERM handlers over this one while
    they run). Left alone outside the main thread, where a handler was set, or where ignored (`nohup`). Returns the
    handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def hang_up(signum, frame):
        signal.raise_signal(signal.SIGTERM)

    handlers = {signal.SIGTERM: interrupt}
    if hasattr(signal, "SIGHUP"):  # not on Windows
        handlers[signal.SIGHUP] = hang_up
    return {s: signal.signal(s, h) for s, h in handlers.items() if signal.getsignal(s) is signal.SIG_DFL}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
