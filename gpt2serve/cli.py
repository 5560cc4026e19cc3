"""The `gpt2serve` command: one subcommand per concern, each owned by its package.

Each subcommand module exposes `main(argv: list[str]) -> int` with its own argparse parser; it is
imported only when run, so `gpt2serve keys list` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gpt2serve.api.cli", "run the OpenAI-compatible HTTP server"),
    "generate": ("gpt2serve.model.generate", "generate text from a prompt (streams to stdout)"),
    "keys": ("gpt2serve.accounts.cli", "create, list, revoke and credit API keys"),
    "eval": ("gpt2serve.eval.cli", "zero-shot evaluation (LAMBADA, WikiText, PTB, ...)"),
    "bench": ("gpt2serve.bench.cli", "speed benchmark: offline engine or a live server"),
}


def usage() -> str:
    lines = ["usage: gpt2serve COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `gpt2serve COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from gpt2serve import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gpt2serve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
