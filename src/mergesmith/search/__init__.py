"""Searching over merges with the engine and evaluate: grid sweeps and model soups."""

from mergesmith.search.scoring import Scorer, folder_key, recipe_key
from mergesmith.search.soup import SoupResult, greedy_selection, soup, soup_recipe
from mergesmith.search.sweep import SweepPoint, SweepResult, parse_grid, sweep, with_parameters

__all__ = [
    "Scorer", "SoupResult", "SweepPoint", "SweepResult", "folder_key", "greedy_selection",
    "parse_grid", "recipe_key", "soup", "soup_recipe", "sweep", "with_parameters",
]
