"""The demo: the embedded world's experts (embedded/) merged by every method onto a leaderboard
scored on held-out data (leaderboard.py), with a search row (search_row.py) and an adapters
variant (adapters.py). Nothing is downloaded.

    from mergesmith.demo import prepare_demo
    setup = prepare_demo()          # setup.base, setup.experts[task], setup.tasks[task] (task.yaml)
"""

from mergesmith.embedded.world import TASKS, DemoSetup, prepare_demo

__all__ = ["TASKS", "DemoSetup", "prepare_demo"]
