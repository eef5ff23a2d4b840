"""mergesmith: merge fine-tuned Hugging Face models with any method, streaming tensor by tensor."""

__version__ = "0.1.0"

from mergesmith.errors import MergesmithError  # noqa: E402

__all__ = ["MergesmithError", "__version__", "merge", "plan", "search", "build_moe", "compress_moe",
           "align"]
# name -> (module, attribute): the model-building commands' Python entry points
_BUILDERS = {"build_moe": ("mergesmith.moe.assemble", "build_moe"),
             "compress_moe": ("mergesmith.moe.compress", "compress_moe"),
             "align": ("mergesmith.alignment", "align")}


def __getattr__(name):
    # The engine imports torch; keep `import mergesmith` cheap for the CLI's --help.
    if name in ("merge", "plan"):
        from mergesmith import pipeline

        return getattr(pipeline, name)
    if name in _BUILDERS:
        import importlib

        module, attribute = _BUILDERS[name]
        return getattr(importlib.import_module(module), attribute)
    if name == "search":  # the package mergesmith.search, callable as the search driver
        import importlib

        return importlib.import_module("mergesmith.search")
    raise AttributeError(name)
