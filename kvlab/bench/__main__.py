"""`python -m kvlab.bench`: the command line lives in `kvlab.bench.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
