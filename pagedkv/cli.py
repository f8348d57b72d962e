"""The ``pagedkv`` command line: one subcommand per module, imported only when used.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; ``run`` raises
``PagedKVError`` (or ``OSError``) for bad input and this module turns it into one line on
stderr and exit code 2. Keeping the imports lazy lets ``pagedkv size`` start without matplotlib
and ``pagedkv frag`` without torch.

NOTE: the CLI never prints a traceback. Bad input, in an argument or a file, is one line
``pagedkv CMD: error: ...`` naming the flag the user typed, and exit code 2. A closed stdout
(``pagedkv size | head -1``) ends quietly with 141, the code a shell reports for a process
ended by SIGPIPE. Anything else is a bug: one line with the exception, exit code 1, and
``PAGEDKV_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: name -> (module, one-line help)
COMMANDS = {
    "frag": ("pagedkv.commands.frag", "compare fragmentation of paged vs static contiguous allocation"),
    "size": ("pagedkv.commands.size", "size a KV cache for a model on a GPU"),
    "replay": ("pagedkv.commands.replay", "re-execute a recorded block-manager trace, report the first divergence"),
}

#: Exit codes.
EXIT_BAD_INPUT = 2
EXIT_BUG = 1
EXIT_BROKEN_PIPE = 141


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) naming the flag."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag_names(parser: argparse.ArgumentParser, extra: dict[str, str]) -> dict[str, str]:
    """Internal argument name -> the flag a user types (``num_requests`` -> ``--num-requests``)."""
    names = dict(extra)
    for action in parser._actions:  # NOTE: argparse has no public accessor for its actions
        longest = max(action.option_strings, key=len, default=None)
        if longest is not None and action.dest not in names:
            names[action.dest] = longest
        elif not action.option_strings:
            names.setdefault(action.dest, action.metavar or action.dest.upper())
    return names


def _rename(exc: BaseException, names: dict[str, str]) -> BaseException:
    """``exc`` with its argument name replaced by the flag, when it names an internal argument."""
    name = getattr(exc, "name", None)
    if isinstance(name, str) and name in names and hasattr(exc, "expected"):
        exc.name = names[name]
    return exc


def _version() -> str:
    from . import __version__, backend

    return f"pagedkv {__version__} (block manager backend: {backend})"


def main(argv: list[str] | None = None) -> int:
    """Run ``pagedkv ARGV``; returns the exit code (0 ok, 2 bad input, 1 a bug, 141 closed pipe)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="pagedkv", description="Paged KV-cache tools.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    try:
        if argv[:1] == ["--version"]:
            print(_version())
            return 0
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else EXIT_BAD_INPUT
        if argv[0] not in COMMANDS:
            parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        return _run_command(argv[0], argv[1:])
    except SystemExit as exc:  # argparse: --help (0) or a bad option (2)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


def _run_command(name: str, argv: list[str]) -> int:
    from .errors import PagedKVError

    module = importlib.import_module(COMMANDS[name][0])
    prog = f"pagedkv {name}"
    cmd_parser = ArgumentParser(prog=prog, description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv)
    names = _flag_names(cmd_parser, getattr(module, "ARGUMENT_FLAGS", {}))
    try:
        return int(module.run(args) or 0)
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except (PagedKVError, OSError, UnicodeError, MemoryError) as exc:
        print(f"{prog}: error: {_one_line(_rename(exc, names))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug: say so in one line, keep the traceback one variable away
        if os.environ.get("PAGEDKV_TRACEBACK"):
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)} (a bug in pagedkv: "
              "rerun with PAGEDKV_TRACEBACK=1 and report the traceback)", file=sys.stderr)
        return EXIT_BUG


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MemoryError) and not str(exc):
        return "out of host memory; ask for a smaller pool, trace or sweep"
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:397] + "..."


def _silence_stdout() -> None:
    # NOTE: the interpreter flushes stdout at exit; pointing it at /dev/null stops that flush
    # from raising a second BrokenPipeError ("Exception ignored ...") on the closed pipe.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
