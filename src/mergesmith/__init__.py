"""mergesmith: merge fine-tuned Hugging Face models with any method, streaming tensor by tensor."""

__version__ = "0.1.0"

from mergesmith.errors import MergesmithError  # noqa: E402

__all__ = ["MergesmithError", "__version__", "merge", "plan", "search"]


def __getattr__(name):
    # The engine imports torch; keep `import mergesmith` cheap for the CLI's --help.
    if name in ("merge", "plan"):
        from mergesmith import pipeline

        return getattr(pipeline, name)
    if name == "search":  # the package mergesmith.search, callable as the search driver
        import importlib

        return importlib.import_module("mergesmith.search")
    raise AttributeError(name)
