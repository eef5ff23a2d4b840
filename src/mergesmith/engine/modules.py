"""The parts of a multimodal checkpoint that a recipe's `modules:` names (mergekit 0.1.5's form).

A module is the set of tensors under one name prefix (`language_model.`, `vision_tower.`), merged
with its own models or slices and parameters; layers are counted within it. The names are
mergekit's (its architecture files under mergekit/_data/architectures); a name that is itself a
prefix of the checkpoint's tensors (`vision_tower` for `vision_tower.*`) works for any model.
"""

from __future__ import annotations

from mergesmith.errors import PlanError
from mergesmith.io import Checkpoint

_VL = {"text_decoder": ("language_model.", "text_config.num_hidden_layers"),
       "multi_modal_projector": ("multi_modal_projector.", None)}
# architecture -> module -> (tensor prefix, config key of the module's layer count)
KNOWN = {
    "Mistral3ForConditionalGeneration": {
        **_VL, "vision_tower": ("vision_tower.", "vision_config.num_hidden_layers")},
    "Gemma3ForConditionalGeneration": {
        **_VL, "vision_tower": ("vision_tower.vision_model.", "vision_config.num_hidden_layers")},
    "Llama4ForConditionalGeneration": {
        **_VL, "vision_model": ("vision_model.", "vision_config.num_hidden_layers")},
}


def module_prefix(ck: Checkpoint, module: str, where: str) -> tuple[str, str | None]:
    """(tensor prefix, config key of its layer count or None) of `module` in `ck`."""
    for arch in ck.config.get("architectures") or []:
        if module in KNOWN.get(arch, {}):
            prefix, key = KNOWN[arch][module]
            if any(name.startswith(prefix) for name in ck.tensors):
                return prefix, key
    if any(name.startswith(f"{module}.") for name in ck.tensors):
        return f"{module}.", None
    known = sorted({m for arch in ck.config.get("architectures") or [] for m in KNOWN.get(arch, {})})
    raise PlanError(f"{where}: {ck.label} has no module {module!r} (no tensor starts with "
                    f"'{module}.')", hint=f"its modules are: {', '.join(known)}" if known else
                    "name a module by the prefix of its tensors, e.g. vision_tower")


def set_config_value(config: dict, key: str, value: int) -> None:
    """config["text_config"]["num_hidden_layers"] = value for key "text_config.num_hidden_layers"."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[last] = value
