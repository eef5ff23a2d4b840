"""The embedded default world, with nothing to download: a real pretrained model from a wheel
(all-MiniLM-L6-v2), real tasks shipped with mergesmith (tasks/), and one expert fine-tuned per
task, made on first use in the cache (assets.py, finetune.py, world.py). It sits above
evaluate/ (it fits the tasks' heads) and below search/ (whose fitness may name its tasks) and
the demo (demo/, which merges its experts onto a leaderboard).

    from mergesmith.embedded import prepare_demo
    setup = prepare_demo()          # setup.base, setup.experts[task], setup.tasks[task] (task.yaml)
"""

from mergesmith.embedded.world import TASKS, DemoSetup, prepare_demo

__all__ = ["TASKS", "DemoSetup", "prepare_demo"]
