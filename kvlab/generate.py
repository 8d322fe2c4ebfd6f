"""`python -m kvlab.generate`: the generation command line (it lives in `kvlab.generation.cli`).

`kvlab.generate` is two things by name: this command, and the function `kvlab.generate(model, idx,
n)` from `kvlab.generation`. The library itself is the package `kvlab.generation` (prefill,
decode_step, generate, ...), so the two never share a module. `python -m kvlab.generate` runs
this file without importing it as `kvlab.generate`, and `kvlab.generate` stays the function. If
someone does import this module by name (`import kvlab.generate`), Python puts the module where
the function was; so the module is made callable as that very function, and `kvlab.generate(...)`
means the same call either way.
"""

import sys
import types

from .generation import generate
from .generation.cli import main

__all__ = ["generate", "main"]


class _CallableModule(types.ModuleType):
    """This module, callable as `kvlab.generation.generate`."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
sys.modules[__name__].__class__ = _CallableModule
