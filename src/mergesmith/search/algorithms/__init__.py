"""The seed search algorithms no library has; importing this package registers them.

m2n2 (natural niches), map (quadratic-surrogate Pareto fronts), cycleqd (quality diversity with
cycling objectives), genome (GENOME / GENOME+ population evolution). Each is an Optimizer
(ask / tell / done / best) over the unit cube of a SearchSpace; see search/optimizers.py.
"""

from mergesmith.search.algorithms import cycleqd, genome, m2n2, map_pareto  # noqa: F401  (registers)
