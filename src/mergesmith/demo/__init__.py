"""The embedded demo: a real pretrained model from a wheel, real tasks shipped with mergesmith,
one expert fine-tuned per task and cached on first use. Nothing is downloaded.

    from mergesmith.demo import prepare_demo
    setup = prepare_demo()          # setup.base, setup.experts[task], setup.tasks[task] (task.yaml)
"""

from mergesmith.demo.run import TASKS, DemoSetup, prepare_demo

__all__ = ["TASKS", "DemoSetup", "prepare_demo"]
