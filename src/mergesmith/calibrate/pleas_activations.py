"""Activations for PLeaS (methods/pleas.py): each layer's MLP hidden units (the input of
`down_proj`) and its MLP output, of both models and of the partially merged model, on the same
tokens.

Data: a calibration file (any of calibrate/data.py's formats, `text` field), tokenized as the
other calibrated methods do; or, data-free (PLeaS-free: the paper uses a public dataset rather
than the task's data), `samples` random token sequences drawn uniformly, with `seed`, from the
tokenizer's vocabulary less its special tokens. Random tokens excite the units without saying
anything about the task; any text file (`--data`) usually does better.

Each model is run one decoder layer at a time, its residual stream kept between layers
(`Stream`), so every layer is computed once per model (twice for the merged one: before and
after its down_proj is solved).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergesmith.calibrate.collect import progress_bar
from mergesmith.calibrate.data import load_examples
from mergesmith.calibrate.forward import (Batch, CalibrationModel, folder_tokenizer, checkpoint_names,
                                          quiet_transformers)
from mergesmith.errors import CalibrationError
from mergesmith.methods.pleas import (Blocks, CorrelationSums, LeastSquaresSums, merged_rows,
                                      partial_match)
from mergesmith.recipe import Calibration

RANDOM_LENGTH = 128  # tokens per data-free sequence (cut to the model's context)


def down_proj(layer: int) -> str:
    """The module (and, with `.weight`, the tensor) that reads layer l's MLP hidden units."""
    return f"model.layers.{layer}.mlp.down_proj"


def load_module(source, device: str | torch.device = "cpu", config: dict | None = None) -> torch.nn.Module:
    """A causal LM in fp32 built from `config` (default: the source's) with the source's
    tensors (a checkpoint or a view, by checkpoint name); parameters the source lacks keep
    their random start and must be set by the caller."""
    import transformers as tf

    config = dict(source.config if config is None else config)
    with quiet_transformers():
        cfg = tf.AutoConfig.for_model(config.pop("model_type"), **config)
        module = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, ck_name in checkpoint_names(module, source).items():
            if ck_name is not None:
                module.get_parameter(name).copy_(source.read(ck_name).float())
    module.config.use_cache = False
    return module.to(device).eval().requires_grad_(False)


def token_batches(folder: Path, module: torch.nn.Module, data: str | Path | None, *, samples: int,
                  max_length: int | None, batch_size: int, seed: int) -> list[Batch]:
    """Batches of the calibration file `data` (tokenized by `folder`'s tokenizer), or of random
    tokens when `data` is None."""
    cal = Calibration(data=str(data) if data is not None else None, samples=samples,
                      max_length=max_length, batch_size=batch_size, seed=seed)
    model = CalibrationModel(folder, module, folder_tokenizer(Path(folder)), "causal", None, cal)
    if data is not None:
        return model.batches(load_examples(cal, Path.cwd()))
    return random_batches(model, samples, max_length or RANDOM_LENGTH, batch_size, seed)


def random_batches(model: CalibrationModel, samples: int, length: int, batch_size: int,
                   seed: int) -> list[Batch]:
    tokenizer = model.tokenizer
    special = set(tokenizer.all_special_ids)
    size = min(len(tokenizer), model.module.get_input_embeddings().num_embeddings)
    vocab = torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)
    if len(vocab) == 0:
        raise CalibrationError(f"{model.folder}: the tokenizer has no ordinary tokens to draw")
    length = min(length, model.context or length)
    generator = torch.Generator().manual_seed(seed)
    ids = vocab[torch.randint(len(vocab), (samples, length), generator=generator)]
    return [Batch({"input_ids": ids[s:s + batch_size].to(model.device),
                   "attention_mask": torch.ones_like(ids[s:s + batch_size]).to(model.device)},
                  None, list(range(s, min(s + batch_size, samples))))
            for s in range(0, samples, batch_size)]


class Stream:
    """A model run one decoder layer at a time over the calibration batches: `states[i]` is the
    residual stream entering the next layer for batch i, so each layer is computed once (a
    whole forward per layer would cost L²/2 layers). The decoder stack is called on
    `inputs_embeds` with only the wanted layer in place, so masks and rotary positions are the
    model's own."""

    def __init__(self, module: torch.nn.Module, batches: list[Batch]):
        self.module, self.batches = module, batches
        embed = module.get_input_embeddings()
        with torch.no_grad():
            self.states = [embed(batch.inputs["input_ids"]) for batch in batches]

    def layer(self, layer: int, advance: bool = True):
        """Per batch: (hidden units [tokens, width], MLP output [tokens, hidden]) of `layer` at
        the real tokens, in fp32; with `advance`, the states move past the layer."""
        stack = self.module.model
        block = stack.layers[layer]
        seen = {}
        hooks = [block.mlp.down_proj.register_forward_hook(
                     lambda _, inputs, output: seen.update(units=inputs[0], out=output)),
                 block.register_forward_hook(lambda _, inputs, output: seen.update(
                     next=output[0] if isinstance(output, tuple) else output))]
        layers, stack.layers = stack.layers, torch.nn.ModuleList([block])
        try:
            for i, batch in enumerate(self.batches):
                mask = batch.inputs["attention_mask"]
                with torch.no_grad():
                    stack(inputs_embeds=self.states[i], attention_mask=mask)
                if advance:
                    self.states[i] = seen["next"]
                real = mask.bool()
                yield seen["units"][real].float(), seen["out"][real].float()
        finally:
            stack.layers = layers
            for hook in hooks:
                hook.remove()


def unit_statistics(stream_a: Stream, stream_b: Stream, layer: int, on_batch=lambda count: None
                    ) -> tuple[CorrelationSums, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Correlation sums of layer l's units of A and B, and both models' MLP outputs per batch
    (the least-squares targets); both streams move past the layer."""
    sums, targets = None, []
    for batch, (units_a, out_a), (units_b, out_b) in zip(stream_a.batches, stream_a.layer(layer),
                                                          stream_b.layer(layer)):
        sums = sums or CorrelationSums(units_a.shape[1], units_a.device)
        sums.add(units_a, units_b)
        targets.append((out_a, out_b))
        on_batch(len(batch.examples))
    return sums, targets


def least_squares_statistics(merged: Stream, layer: int,
                             targets: list[tuple[torch.Tensor, torch.Tensor]],
                             on_batch=lambda count: None) -> LeastSquaresSums:
    """Normal-equation sums for layer l's down_proj: the merged model's own hidden units against
    both models' MLP outputs on the same tokens. The stream stays before the layer, whose
    down_proj is still to be set."""
    sums = None
    for batch, (units, _), (out_a, out_b) in zip(merged.batches, merged.layer(layer, advance=False), targets):
        sums = sums or LeastSquaresSums(units.shape[1], out_a.shape[1], units.device)
        sums.add(units, out_a, out_b)
        on_batch(len(batch.examples))
    return sums


MLP = ("gate_proj", "up_proj")


def mlp_tensor(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.mlp.{kind}.weight"


def merge_layers(a, b, width: int, batches_from, *, device: str | torch.device = "cpu",
                 ridge: float | None = None, progress: bool = False
                 ) -> tuple[list[Blocks], list[torch.Tensor]]:
    """PLeaS over every layer of `a` and `b` (B already weight-matched to A), bottom up: each
    layer's units are partially matched on data, the merged model's gate/up rows set, then its
    down_proj solved by least squares on the merged model's own hidden units (so layer l's solve
    sees layers below it as merged). Everything but the MLPs is the average of A and B.
    `batches_from(folder, module)` gives the calibration batches. Returns each layer's blocks
    and fp32 down_proj weights."""
    config = dict(a.config, intermediate_size=width)
    model_a, model_b = load_module(a, device), load_module(b, device)
    merged = load_module(a, device, config)
    with torch.no_grad():
        for name, ck_name in checkpoint_names(merged, a).items():
            if ck_name is not None:  # shapes agree: everything but the MLPs, averaged
                merged.get_parameter(name).copy_((a.read(ck_name).float() + b.read(ck_name).float()) / 2)
    batches = batches_from(a.path, model_a)
    tokens = sum(int(batch.inputs["attention_mask"].sum()) for batch in batches)
    if tokens < width:  # fewer equations than unknowns per output: the fit would be arbitrary
        raise CalibrationError(f"PLeaS: {tokens} calibration tokens for {width} merged MLP units; "
                               "the least-squares solve needs at least as many tokens as units",
                               hint="raise the number of samples, or give longer texts")
    streams = [Stream(model, batches) for model in (model_a, model_b, merged)]
    layers = a.config["num_hidden_layers"]
    blocks, downs = [], []
    with progress_bar(progress) as bar:
        for layer in range(layers):
            bar.start(f"PLeaS layer {layer + 1}/{layers}", 2 * sum(len(batch.examples) for batch in batches))
            sums, targets = unit_statistics(*streams[:2], layer, on_batch=bar.advance)
            found = partial_match(sums.correlation(), width)
            with torch.no_grad():
                for kind in MLP:
                    rows = merged_rows(a.read(mlp_tensor(layer, kind)).float(),
                                       b.read(mlp_tensor(layer, kind)).float(), found)
                    merged.get_submodule(f"model.layers.{layer}.mlp.{kind}").weight.copy_(rows)
            solve = least_squares_statistics(streams[2], layer, targets, on_batch=bar.advance)
            down = solve.solve() if ridge is None else solve.solve(ridge)
            with torch.no_grad():
                merged.get_submodule(down_proj(layer)).weight.copy_(down)
            for _ in streams[2].layer(layer):  # the merged stream moves past the finished layer
                pass
            blocks.append(found)
            downs.append(down.float().cpu())
    return blocks, downs
