"""One mechanism for per-Linear adapters: match module names, wrap the frozen Linear."""
from .inject import AdaptedLinear, inject_adapters, adapted_modules, match_linear_names

__all__ = ["AdaptedLinear", "inject_adapters", "adapted_modules", "match_linear_names"]
