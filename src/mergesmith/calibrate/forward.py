"""A model loaded for calibration: tokenized batches in, logits of the real positions out.

Three objectives, chosen from the settings and the folder:
- `head` given: the encoder (`AutoModel`) and a frozen linear head on the masked mean of its last
  hidden states; one row of logits per example;
- a `*ForSequenceClassification` architecture: the model's own logits, one row per example;
- otherwise a causal LM: next-token logits at every real position that has a next token.

Parameters are named as in the checkpoint (model.safetensors), not as in the loaded module: an
encoder loaded with `AutoModel` from a masked-LM folder drops the `bert.` prefix that its files
carry, and a tied output head has no tensor of its own. `logits(batch, params)` runs the module
with `params` substituted, so a merge can be differentiated through its tensors.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mergesmith.calibrate.data import Example, head_path
from mergesmith.errors import CalibrationError, MergesmithError
from mergesmith.io.checkpoint import Checkpoint
from mergesmith.recipe import Calibration

OBJECTIVES = ("head", "sequence", "causal", "features")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states over real (unpadded) tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


@contextmanager
def quiet_transformers():
    """No load report or progress bar: an encoder loaded from a masked-LM folder is expected to
    leave the LM head unused, and the report would bury the scores."""
    from transformers.utils import logging

    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def read_head(path: Path, hidden_size: int | None, num_labels: int | None = None, *,
              error: type[MergesmithError] = CalibrationError) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen linear head (weight [C, hidden], bias [C]) as fp32, checked against the model's
    hidden size and, when known, the number of labels; `error` is the class its failures raise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise error(f"{path}: not a readable safetensors file ({exc})") from None
    for name in ("weight", "bias"):
        if name not in tensors:
            raise error(f"{path}: no tensor {name!r}",
                        hint="a head holds weight [num_labels, hidden] and bias [num_labels]")
    weight, bias = tensors["weight"].float(), tensors["bias"].float()
    rows = num_labels if num_labels is not None else (weight.shape[0] if weight.ndim == 2 else -1)
    if weight.ndim != 2 or weight.shape[0] != rows or tuple(bias.shape) != (rows,):
        against = f"{num_labels} labels" if num_labels is not None else "each other"
        raise error(f"{path}: weight {list(weight.shape)} and bias {list(bias.shape)} do not match {against}",
                    hint="expected weight [num_labels, hidden] and bias [num_labels]")
    if hidden_size is not None and weight.shape[1] != hidden_size:
        raise error(f"{path}: weight has {weight.shape[1]} columns, the model's hidden size is {hidden_size}")
    return weight, bias


def context_length(config) -> int | None:
    """The longest input the model's positions allow (None when the config does not say)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def objective_of(folder: Path, cal: Calibration) -> str:
    """"head" when a head file is given, else what the folder's architecture is for."""
    if cal.head is not None:
        return "head"
    architectures = _config(folder).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence"
    if architectures and not any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        # transformers would load a masked LM as a "causal" one and score next tokens with an
        # encoder that sees them
        raise CalibrationError(f"{folder}: {', '.join(architectures)} has no causal-LM or "
                               "sequence-classification head to calibrate with",
                               hint="give `head: <file.safetensors>` (weight [labels, hidden], "
                                    "bias [labels])")
    return "causal"


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask: [B, T] on the model's device
    targets: torch.Tensor | None     # class ids aligned with the rows of `logits` (None: unlabelled)
    examples: list[int]              # positions of the batch's rows in the examples list


class CalibrationModel:
    """A module, its tokenizer, the objective and (for `head`) the frozen head."""

    def __init__(self, folder: Path, module: torch.nn.Module, tokenizer, objective: str,
                 head: tuple[torch.Tensor, torch.Tensor] | None, cal: Calibration):
        self.folder, self.module, self.tokenizer = Path(folder), module, tokenizer
        self.objective, self.head, self.cal = objective, head, cal
        self.context = context_length(module.config)
        self._checkpoint_names = checkpoint_names(module, Checkpoint(folder))
        self._module_names = {ck: name for name, ck in self._checkpoint_names.items() if ck is not None}
        self._check_settings()

    @classmethod
    def load(cls, folder: str | Path, cal: Calibration, root: Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, objective: str | None = None) -> "CalibrationModel":
        """`objective` "features": the bare encoder or decoder stack, for hidden states only."""
        folder = Path(folder)
        objective = objective or objective_of(folder, cal)
        with loading(folder, objective) as auto:
            module = auto.from_pretrained(folder, dtype=dtype)
        module.to(device).eval().requires_grad_(False)
        module.config.use_cache = False  # no key/value cache: every pass is one whole forward
        head = _load_head(cal, root, module) if objective == "head" else None
        return cls(folder, module, folder_tokenizer(folder), objective, head, cal)

    def view(self, folder: str | Path, cal: Calibration, root: Path) -> "CalibrationModel":
        """This module read as another checkpoint of the same architecture: that folder's tensor
        names, tokenizer, settings and head. The weights stay as they are (see `load_weights`)."""
        head = _load_head(cal, root, self.module) if cal.head is not None else self.head
        return CalibrationModel(folder, self.module, folder_tokenizer(Path(folder)), self.objective, head, cal)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors (by checkpoint name) into the module, cast to its dtype."""
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.module.get_parameter(self.module_name(name)).copy_(tensor)

    # ---- names -------------------------------------------------------------------------------

    def checkpoint_name(self, module_param_name: str) -> str | None:
        """The checkpoint tensor a module parameter is read from (None: tied or not in the files)."""
        return self._checkpoint_names.get(module_param_name)

    def module_name(self, checkpoint_name: str) -> str:
        if checkpoint_name not in self._module_names:
            raise KeyError(f"{self.folder}: no module parameter is read from tensor {checkpoint_name!r}")
        return self._module_names[checkpoint_name]

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The module's parameters that come from the checkpoint, by checkpoint name, each once."""
        return {ck: self.module.get_parameter(name) for ck, name in self._module_names.items()}

    @property
    def num_classes(self) -> int:
        if self.objective == "head":
            return self.head[0].shape[0]
        if self.objective == "sequence":
            return self.module.config.num_labels
        return self.module.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ---- data --------------------------------------------------------------------------------

    def encode(self, examples: list[Example]) -> list[list[int]]:
        """Token ids per example, cut to `max_length`; without it, a text the model's positions
        cannot hold is an error rather than a silent cut."""
        limit = self.cal.max_length
        ids = self.tokenizer([e.text for e in examples], truncation=limit is not None,
                             max_length=limit)["input_ids"]
        for example, tokens in zip(examples, ids):
            if not tokens:
                raise CalibrationError(f"{example.where}: the text tokenizes to nothing")
            if limit is None and self.context is not None and len(tokens) > self.context:
                raise CalibrationError(f"{example.where}: the text is {len(tokens)} tokens long, "
                                       f"{self.folder} takes at most {self.context}",
                                       hint=f"set max_length (<= {self.context}) to cut longer texts")
            if self.objective in ("head", "sequence") and example.label is not None \
                    and example.label >= self.num_classes:
                raise CalibrationError(f"{example.where}: label {example.label} is out of range: "
                                       f"the model has {self.num_classes} classes")
        return ids

    def batches(self, examples: list[Example], batch_size: int | None = None) -> list[Batch]:
        """Examples in length order (little padding), right-padded, `batch_size` at a time."""
        size = batch_size or self.cal.batch_size
        sequences = self.encode(examples)
        order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
        out = []
        for start in range(0, len(order), size):
            chosen = order[start:start + size]
            ids, mask = padded([sequences[i] for i in chosen], pad_id(self.tokenizer))
            out.append(Batch({"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)},
                             self._targets(ids, mask, [examples[i] for i in chosen]), chosen))
        return out

    def _targets(self, ids: torch.Tensor, mask: torch.Tensor, examples: list[Example]) -> torch.Tensor | None:
        if self.objective == "causal":
            return ids[:, 1:][mask[:, 1:].bool()].to(self.device)
        if self.objective == "features" or any(e.label is None for e in examples):
            return None
        return torch.tensor([e.label for e in examples], device=self.device)

    # ---- forward -----------------------------------------------------------------------------

    def logits(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """fp32 logits [n, C]: one row per example, or per real position with a next token (LMs).
        `params` (checkpoint names) replace the module's own tensors for this call."""
        return self._logits(batch, self._call(batch.inputs, params))

    def logits_and_hidden(self, batch: Batch, params: dict[str, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`logits`, and each block's output hidden states at the real positions ([n, d] per
        block): what Expert Merging aligns besides the outputs. They are activations the
        backward pass keeps anyway, so returning them costs no memory."""
        out = self._call(batch.inputs, params, output_hidden_states=True)
        real = batch.inputs["attention_mask"].bool()
        return self._logits(batch, out), [h[real].float() for h in out.hidden_states[1:]]

    def _logits(self, batch: Batch, out) -> torch.Tensor:
        mask = batch.inputs["attention_mask"]
        if self.objective == "head":
            weight, bias = self.head
            return mean_pool(out.last_hidden_state.float(), mask) @ weight.T + bias
        if self.objective == "sequence":
            return out.logits.float()
        return out.logits[:, :-1][mask[:, 1:].bool()].float()

    def log_likelihood(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Σ log p(y | x) over the batch's rows, y the targets, or the model's own argmax class
        where the batch is unlabelled."""
        logits = self.logits(batch, params)
        targets = batch.targets if batch.targets is not None else logits.detach().argmax(-1)
        return -F.cross_entropy(logits, targets, reduction="sum")

    def _call(self, inputs: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None,
              **options):
        if params is None:
            return self.module(**inputs, **options)
        renamed = {self.module_name(name): tensor for name, tensor in params.items()}
        return torch.func.functional_call(self.module, renamed, args=(), kwargs={**inputs, **options})

    def _check_settings(self) -> None:
        cal = self.cal
        if cal.max_length is not None and self.context is not None and cal.max_length > self.context:
            raise CalibrationError(f"calibration: max_length: {cal.max_length} is beyond {self.folder}'s "
                                   f"context of {self.context} tokens",
                                   hint=f"use max_length <= {self.context}")
        if self.objective in ("head", "sequence") and cal.labels is not None \
                and len(cal.labels) != self.num_classes:
            raise CalibrationError(f"calibration: labels: {len(cal.labels)} names, but {self.folder} has "
                                   f"{self.num_classes} classes")


@contextmanager
def loading(folder: Path, objective: str):
    """The transformers Auto class for the objective; a failure to load is one CalibrationError."""
    import transformers as tf

    auto = {"head": tf.AutoModel, "sequence": tf.AutoModelForSequenceClassification,
            "causal": tf.AutoModelForCausalLM, "features": tf.AutoModel}[objective]
    try:
        with quiet_transformers():
            yield auto
    except (OSError, ValueError) as exc:
        hint = ("a model without a causal-LM or sequence-classification head needs "
                "`head: <file.safetensors>` in its calibration" if objective == "causal" else None)
        raise CalibrationError(f"{folder}: cannot load as {auto.__name__}: {str(exc).splitlines()[0]}",
                               hint=hint) from None


def empty_module(folder: str | Path, cal: Calibration) -> torch.nn.Module:
    """The module `CalibrationModel.load` would build, on the meta device: its structure and
    parameter shapes from config.json alone, no weight read (what `check` needs, in ms)."""
    import transformers as tf

    folder = Path(folder)
    with loading(folder, objective_of(folder, cal)) as auto:
        config = tf.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return auto.from_config(config)


def checkpoint_names(module: torch.nn.Module, checkpoint: Checkpoint) -> dict[str, str | None]:
    """Module parameter name -> checkpoint tensor name, trying the name as is, with the base
    model's prefix added, and with it removed; shapes must agree. A parameter shared by several
    names (tied embeddings) is read from one tensor: its other names map to None."""
    prefix = getattr(module, "base_model_prefix", "") or ""
    aliases: dict[int, list[str]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
        shapes[id(param)] = tuple(param.shape)
    names: dict[str, str | None] = {}
    for key, group in aliases.items():
        found = [(name, tensor) for name in group for tensor in _candidates(name, prefix)
                 if tensor in checkpoint.tensors and tuple(checkpoint.tensors[tensor].shape) == shapes[key]]
        names.update(dict.fromkeys(group))
        if found:
            names[found[0][0]] = found[0][1]
    return names


def _candidates(name: str, prefix: str) -> list[str]:
    return [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")] if prefix else [name]


def _load_head(cal: Calibration, root: Path, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = read_head(head_path(cal, root), getattr(module.config, "hidden_size", None),
                             len(cal.labels) if cal.labels is not None else None)
    device = next(module.parameters()).device
    return weight.to(device), bias.to(device)


def _config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CalibrationError(f"{folder}: not a model folder (no config.json)")
    return json.loads(path.read_text())


def folder_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{folder}: no usable tokenizer: {str(exc).splitlines()[0]}") from None


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


def padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, mask
