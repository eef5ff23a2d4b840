"""Merge recipes: mergekit 0.1.5's YAML format, validated with file:line messages."""

from mergesmith.recipe.loader import load_recipe, load_stages
from mergesmith.recipe.parameters import ParameterSetting, lookup, resolve_setting
from mergesmith.recipe.schema import Calibration, InputModel, Recipe, Slice, SliceSource

__all__ = [
    "Calibration",
    "InputModel",
    "ParameterSetting",
    "Recipe",
    "Slice",
    "SliceSource",
    "load_recipe",
    "load_stages",
    "lookup",
    "resolve_setting",
]
