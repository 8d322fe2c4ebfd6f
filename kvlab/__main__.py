"""`python -m kvlab`: the list of kvlab's commands; `python -m kvlab COMMAND [flags]` runs one.

    python -m kvlab                      # the commands
    python -m kvlab train --preset quick # the same as python -m kvlab.train --preset quick
"""

from __future__ import annotations

import importlib
import sys

from ._cli import CLI_MODULES, COMMANDS, commands_text, nearest_command

USAGE = "usage: python -m kvlab COMMAND [flags]   (or python -m kvlab.COMMAND [flags])"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n{commands_text()}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        nearest = nearest_command(name, rest)
        hint = f"; did you mean {nearest}?" if nearest else ""
        print(f"{USAGE}\npython -m kvlab: {name!r} is not a command{hint}\n{commands_text()}", file=sys.stderr)
        return 2
    module = importlib.import_module(CLI_MODULES.get(name, f"kvlab.{name}"))
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
