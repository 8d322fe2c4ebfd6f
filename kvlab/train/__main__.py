"""`python -m kvlab.train`: the command line lives in `kvlab.train.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
