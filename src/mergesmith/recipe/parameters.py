"""Parameter settings: their recipe schema, and how one resolves for a given tensor.

A setting is what a recipe writes after a parameter name, in mergekit 0.1.5's forms:

    weight: 0.5                                   # scalar
    t: [0, 0.5, 0.3, 0.7, 1]                      # gradient over the layer position t
    t: {value: 0.5, filter: mlp}                  # conditional
    t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]   # first matching conditional wins

Settings stay plain Python values (dicts, lists, scalars) so they dump and fingerprint as written.
`resolve_setting` reproduces mergekit's `evaluate_setting` exactly, so a recipe means the same here.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Union

from pydantic import ConfigDict, Discriminator, PlainValidator, Tag, with_config
from typing_extensions import NotRequired, TypedDict

_SCALARS = (bool, int, float, str)


def describe(value: Any) -> str:
    """A short, YAML-flavoured rendering of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)) and not all(isinstance(e, _SCALARS) for e in value):
        return "a list"
    text = repr(list(value)) if isinstance(value, tuple) else repr(value)
    if isinstance(value, (list, tuple)) and len(text) > 40:
        return "a list"
    return text if len(text) <= 40 else text[:37] + "..."


def _scalar(value: Any) -> Any:
    # A plain validator (not Union[bool, int, float, str]) keeps values exactly as YAML gave
    # them and yields one readable error instead of one per union member.
    if isinstance(value, _SCALARS):
        return value
    raise ValueError(f"expected a number, a string or true/false, got {describe(value)}")


Scalar = Annotated[Any, PlainValidator(_scalar)]


def _scalar_or_list(value: Any) -> str:
    return "gradient" if isinstance(value, list) else "scalar"


# Discriminators pick one branch up front, so a mistake reports one error at its own place
# rather than one error per union member.
ScalarOrGradient = Annotated[
    Union[Annotated[list[Scalar], Tag("gradient")], Annotated[Scalar, Tag("scalar")]],
    Discriminator(_scalar_or_list),
]


@with_config(ConfigDict(extra="forbid"))
class Conditional(TypedDict):
    """`{value: ..., filter: ...}`: applies to tensors whose name contains `filter`."""

    value: ScalarOrGradient
    filter: NotRequired[Union[str, None]]


def _setting_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "conditional"
    if isinstance(value, list):
        return "conditionals" if any(isinstance(e, dict) for e in value) else "gradient"
    return "scalar"


ParameterSetting = Annotated[
    Union[
        Annotated[Conditional, Tag("conditional")],
        Annotated[list[Conditional], Tag("conditionals")],
        Annotated[list[Scalar], Tag("gradient")],
        Annotated[Scalar, Tag("scalar")],
    ],
    Discriminator(_setting_kind),
]

# Location entries pydantic inserts for the union branches above; not part of the data.
UNION_TAGS = frozenset({"conditional", "conditionals", "gradient", "scalar"})


def _conditional(entry: Any) -> tuple[Any, Any] | None:
    """(value, filter) of a conditional entry, given as a dict or as an object (mergekit's)."""
    if isinstance(entry, dict):
        return entry.get("value"), entry.get("filter")
    if hasattr(entry, "value") and hasattr(entry, "filter"):
        return entry.value, entry.filter
    return None


def scalars(setting: Any, path: tuple = ()):
    """(path inside the setting, value) for every scalar a setting holds: its value, each entry
    of a gradient, each conditional's value. Interpolation never leaves the range they span."""
    cond = _conditional(setting) if not isinstance(setting, _SCALARS) else None
    if isinstance(setting, _SCALARS):
        yield path, setting
    elif cond is not None:
        yield from scalars(cond[0], (*path, "value"))
    elif isinstance(setting, (list, tuple)):
        for i, entry in enumerate(setting):
            yield from scalars(entry, (*path, i))


def resolve_setting(
    setting: Any,
    tensor_name: str,
    t: float = 0.0,
    *,
    validate: Callable[[Any], Any] | None = None,
) -> Any:
    """The value `setting` takes for `tensor_name` at layer position `t` (0..1); None if no
    conditional matches.

    Mirrors mergekit 0.1.5's `evaluate_setting`, including `validate`, which it applies to each
    scalar before interpolating (e.g. to turn a YAML string "1e-3" into a number) and to the result.
    """
    check = validate or (lambda v: v)
    if _conditional(setting) is not None and not isinstance(setting, _SCALARS):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        return check(setting)
    if not isinstance(setting, (list, tuple)):
        raise TypeError(f"not a parameter setting: {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, _SCALARS) for e in setting):
        values = [check(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            # Strings and booleans cannot be interpolated: pick the entry t falls on.
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return check((1 - frac) * values[i0] + frac * values[i1])
    for entry in setting:
        cond = _conditional(entry)
        if cond is None:
            raise TypeError(f"not a conditional setting: {entry!r}")
        value, filt = cond
        # An empty tensor name matches no filter, as in mergekit.
        if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
            return resolve_setting(value, tensor_name, t, validate=validate)
    return None


def lookup(
    name: str,
    levels: list[dict | None],
    tensor_name: str,
    t: float = 0.0,
    *,
    validate: Callable[[Any], Any] | None = None,
) -> Any:
    """Resolve parameter `name` from the first level (most specific first) that sets it to
    something matching this tensor; None when none does. A level whose filters all miss falls
    through to the next, as in mergekit's parameter resolver."""
    for level in levels:
        if level is not None and name in level:
            value = resolve_setting(level[name], tensor_name, t, validate=validate)
            if value is not None:
                return value
    return None
