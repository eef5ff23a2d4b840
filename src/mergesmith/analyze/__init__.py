"""Why a merge works or fails: task-vector statistics of a recipe's models, without merging."""

from mergesmith.analyze.run import analyze

__all__ = ["analyze"]
