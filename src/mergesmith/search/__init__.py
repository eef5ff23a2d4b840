"""Searching over merges with the engine and evaluate: grid sweeps, model soups, and recipe
search (evolutionary, Pareto, black-box) over a recipe's `search:` section.

The package is also callable: `mergesmith.search(recipe, out)` is `search.driver.search`.
"""

import sys
import types

from mergesmith.search.scoring import Scorer, folder_key, recipe_key
from mergesmith.search.soup import SoupResult, greedy_selection, soup, soup_recipe
from mergesmith.search.sweep import SweepPoint, SweepResult, parse_grid, sweep, with_parameters

__all__ = [
    "Scorer", "SoupResult", "SweepPoint", "SweepResult", "folder_key", "greedy_selection",
    "parse_grid", "recipe_key", "soup", "soup_recipe", "sweep", "with_parameters",
    "search", "SearchResult", "load_search",
]

_LAZY = {"search": "mergesmith.search.driver", "SearchResult": "mergesmith.search.driver",
         "load_search": "mergesmith.search.space"}


def __getattr__(name):
    # the driver pulls in the optimizers' libraries: only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


class _CallablePackage(types.ModuleType):
    """`mergesmith.search` is this package (sweep, soup, ...) and the search function at once."""

    def __call__(self, *args, **kwargs):
        from mergesmith.search.driver import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
