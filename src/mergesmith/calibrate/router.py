"""Twin-Merging's router: which expert an input is for, and the model that input then runs on.

Training (after the merge, on the complete folder): every expert's calibration examples go
through the shared model θ*; the masked mean of its last hidden states is the input's feature,
and the expert it came from is its label. The router is the authors' classifier (two hidden
layers of twice the feature width, batch norm, leaky ReLU, dropout 0.5), trained with cross
entropy by full-batch Adam. Its weights go to twin/router.safetensors and its settings and
training record into twin/twin.json.

Inference: `TwinModel` routes each input, w = softmax(router(feature)), and runs it on
θ* + Σ_t w_t v_t, the low-rank parts of matrices applied to each layer's input (never a dense
routed matrix). `routed_module` wraps a loaded transformers module so that evaluation scores
it like any model, one input at a time (each input has its own weights).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mergesmith.calibrate.data import load_examples
from mergesmith.calibrate.forward import CalibrationModel, checkpoint_names, mean_pool, quiet_transformers
from mergesmith.engine.side_outputs.twin import INDEX, SIDE_FOLDER, Parts, read_index
from mergesmith.errors import CalibrationError, MergesmithError
from mergesmith.io import Checkpoint
from mergesmith.io.output import write_json
from mergesmith.methods.twin import expand
from mergesmith.recipe import Calibration

ROUTER_FILE = "router.safetensors"
FEATURES = "masked mean of the shared model's last hidden states"


class Router(nn.Module):
    """features -> one logit per expert (Twin-Merging's router.py: SimpleMLP)."""

    def __init__(self, features: int, tasks: int):
        super().__init__()
        hidden = 2 * features
        self.fc1, self.bn1 = nn.Linear(features, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, tasks)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.leaky_relu(self.bn1(self.fc1(x.float()))))
        x = self.dropout(F.leaky_relu(self.bn2(self.fc2(x))))
        return self.out(x)


def features(base_model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The router's input for each row: the masked mean of the last hidden states."""
    hidden = base_model(**inputs).last_hidden_state
    return mean_pool(hidden.float(), inputs["attention_mask"])


def fit_router(x: torch.Tensor, labels: torch.Tensor, tasks: int, *, steps: int, lr: float,
               seed: int) -> tuple[Router, dict]:
    """A router trained by full-batch Adam on features `x` [N, d] and expert ids `labels`."""
    torch.manual_seed(seed)
    router = Router(x.shape[1], tasks)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(router(x), labels)
            loss.backward()
            optimizer.step()
    router.eval()
    with torch.no_grad():
        logits = router(x)
    record = {"final_loss": float(F.cross_entropy(logits, labels)),
              "train_accuracy": float((logits.argmax(-1) == labels).float().mean())}
    return router, record


def train_router(folder: Path, cals: list[Calibration], root: Path, *, steps: int, lr: float,
                 seed: int = 0, device: str = "cpu") -> dict:
    """Train the router of the twin merge in `folder` on each expert's calibration examples
    (expert t's examples are labelled t), and record it in twin/twin.json."""
    started = time.perf_counter()
    index = read_index(folder)
    tasks = index["tasks"]
    if len(cals) != len(tasks):
        raise CalibrationError(f"{len(cals)} calibration sections for {len(tasks)} experts")
    shared = CalibrationModel.load(folder, cals[0], root, device=device, objective="features")
    xs, labels, counts = [], [], []
    with torch.no_grad():
        for t, cal in enumerate(cals):
            view = shared.view(folder, cal, root)
            examples = load_examples(cal, root)
            counts.append(len(examples))
            for batch in view.batches(examples):
                xs.append(features(view.module.base_model, batch.inputs).cpu())
                labels += [t] * len(batch.examples)
    if len(tasks) > 1 and min(counts) == 0:
        raise CalibrationError(f"{tasks[counts.index(0)]}: no calibration examples to route by")
    router, record = fit_router(torch.cat(xs), torch.tensor(labels), len(tasks),
                                steps=steps, lr=lr, seed=seed)
    save_router(folder, router)
    index["router"] = {"file": f"{SIDE_FOLDER}/{ROUTER_FILE}", "features": FEATURES,
                       "feature_size": router.fc1.in_features, "steps": steps, "lr": lr,
                       "seed": seed, "examples": dict(zip(tasks, counts)), **record,
                       "seconds": time.perf_counter() - started}
    write_json(folder / SIDE_FOLDER / INDEX, index)
    return index["router"]


def save_router(folder: Path, router: Router) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in router.state_dict().items()}
    path = folder / SIDE_FOLDER / ROUTER_FILE
    save_file(state, str(path))
    path.chmod(0o644)  # as the weights beside it


def load_router(folder: Path, index: dict) -> Router:
    from safetensors.torch import load_file

    entry = index.get("router")
    if entry is None:
        raise MergesmithError(f"{folder}: this twin merge has no router",
                              hint="merge it with `mergesmith merge` (a calibration: section per "
                                   "expert), or use `mergesmith twin apply --task`")
    path = Path(folder) / entry["file"]
    if not path.is_file():
        raise MergesmithError(f"{path}: missing; it holds the router")
    router = Router(entry["feature_size"], len(index["tasks"]))
    router.load_state_dict(load_file(str(path)))
    return router.eval()


class LowRankDelta:
    """Σ_t w_t A_t B_t applied to a layer's input instead of added to its weight: the routed
    weight W* + Σ_t w_t A_t B_t is never built. For a Linear (y = x Wᵀ) the extra output is
    ((x B_catᵀ) ⊙ w_rep) A_catᵀ, with A_cat = [A_1 … A_T] and B_cat = [B_1; …; B_T]; for an
    Embedding, rows of A_cat ⊙ w_rep times B_cat; for GPT-2's Conv1D (y = x W, W [in, out]),
    ((x A_cat) ⊙ w_rep) B_cat. 2·T·r·(m + n) numbers instead of T·m·n."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        tasks, rows, rank = a.shape
        self.tasks, self.rank = tasks, rank
        self.a = a.permute(1, 0, 2).reshape(rows, tasks * rank)  # [m, T·r]
        self.b = b.reshape(tasks * rank, -1)  # [T·r, n]

    def scale(self, weights: torch.Tensor) -> torch.Tensor:
        """w_t repeated over each task's r columns."""
        return weights.to(self.a.dtype).repeat_interleave(self.rank)

    def linear(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.b.dtype) @ self.b.T) * self.scale(weights)) @ self.a.T

    def embedding(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (F.embedding(ids, self.a) * self.scale(weights)) @ self.b

    def conv1d(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.a.dtype) @ self.a) * self.scale(weights)) @ self.b


def low_rank_use(module: nn.Module) -> str | None:
    """How a module uses its `weight`, where LowRankDelta can follow it; None elsewhere,
    including subclasses with a forward of their own (Gemma's embedding scales its output)."""
    forward = type(module).forward
    if forward is nn.Linear.forward:
        return "linear"
    if forward is nn.Embedding.forward and module.max_norm is None:
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer
        return "conv1d"
    return None


class TwinModel:
    """A twin merge loaded for inference: the shared model's module, each expert's exclusive
    part, and the router. An input with routing weights w runs on θ* + Σ_t w_t v_t: the
    low-rank parts of Linear, Embedding and Conv1D weights through forward hooks on those
    layers (LowRankDelta), every other part (vectors: biases, norms) as a dense routed tensor.

    Memory: the module plus the parts as stored, in fp32 (low rank: the rank ratio's share of
    each matrix per expert), where dense parts would take T times the model."""

    def __init__(self, folder: str | Path, module: nn.Module):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.tasks: list[str] = self.index["tasks"]
        self.module = module
        self.router = load_router(self.folder, self.index)
        device = next(module.parameters()).device
        self.router.to(device)
        names = checkpoint_names(module, Checkpoint(self.folder))
        by_checkpoint = {ck: name for name, ck in names.items() if ck is not None}
        parts = Parts(self.folder, self.index)
        self.shared: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}  # dense parts: module name -> [T, *shape]
        self.low_rank: dict[str, LowRankDelta] = {}  # parameter name -> its low-rank parts
        self.current: torch.Tensor | None = None  # routing weights [T] of the input running now
        owners: dict[int, list[tuple[str, nn.Module]]] = {}
        for owner_name, owner in module.named_modules():  # a tied weight has several owners
            weight = owner._parameters.get("weight")
            if weight is not None:
                owners.setdefault(id(weight), []).append((owner_name, owner))
        for ck_name in parts.names():
            name = by_checkpoint.get(ck_name)
            if name is None:
                continue  # a tensor this module class does not load (an unused head)
            param = module.get_parameter(name)
            part = parts.of(ck_name)
            users = owners.get(id(param), [])
            uses = [low_rank_use(owner) for _, owner in users]
            if len(part[0]) == 2 and users and None not in uses:  # every layer that reads it
                delta = LowRankDelta(torch.stack([p[0] for p in part]).to(device),
                                     torch.stack([p[1] for p in part]).to(device))
                self.low_rank[name] = delta
                for (_, owner), use in zip(users, uses):
                    owner.register_forward_hook(self._hook(delta, use))
            else:
                self.shared[name] = param.detach().float()
                self.deltas[name] = torch.stack([expand(p, param.shape) for p in part]).to(device)

    def _hook(self, delta: LowRankDelta, use: str):
        def add_routed_part(layer: nn.Module, args: tuple, output: torch.Tensor):
            if self.current is None:
                return output  # the shared model alone (routing features)
            extra = getattr(delta, use)(args[0], self.current)
            return output + extra.to(output.dtype)

        return add_routed_part

    def route(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Routing weights [B, T] of a batch (input_ids, attention_mask)."""
        self.current = None
        with torch.no_grad():
            return F.softmax(self.router(features(self.module.base_model, inputs)), dim=-1)

    def parameters_for(self, weights: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
        """θ* + Σ_t w_t v_t of the dense parts for one input's weights [T], by module parameter
        name (names under `prefix`, with it removed, for a submodule); the low-rank parts
        follow `self.current`, which this sets to `weights`."""
        self.current = weights
        out = {}
        for name, shared in self.shared.items():
            if name.startswith(prefix):
                mixed = torch.tensordot(weights.to(shared.dtype), self.deltas[name], dims=1)
                out[name[len(prefix):]] = mixed.add_(shared).to(self.module.get_parameter(name).dtype)
        return out


class RoutedModule(nn.Module):
    """A transformers module (or its `base_model`) whose every input runs on its own routed
    weights; the outputs of the batch's rows are concatenated back."""

    def __init__(self, twin: TwinModel, target: nn.Module | None = None, prefix: str = ""):
        super().__init__()
        self.twin, self.prefix = twin, prefix
        self.target = target if target is not None else twin.module

    @property
    def config(self):
        return self.twin.module.config

    @property
    def base_model(self) -> "RoutedModule":
        root = self.twin.module
        if root.base_model is root:
            return self
        prefix = f"{root.base_model_prefix}."
        return RoutedModule(self.twin, root.base_model, prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        weights = self.twin.route({"input_ids": input_ids, "attention_mask": attention_mask})
        outputs = []
        try:
            for row in range(input_ids.shape[0]):
                params = self.twin.parameters_for(weights[row], self.prefix)
                inputs = {"input_ids": input_ids[row:row + 1],
                          "attention_mask": attention_mask[row:row + 1],
                          **{k: v[row:row + 1] if torch.is_tensor(v) else v
                             for k, v in kwargs.items()}}
                outputs.append(torch.func.functional_call(self.target, params, args=(),
                                                          kwargs=inputs))
        finally:
            self.twin.current = None
        first = outputs[0]
        return type(first)(**{key: torch.cat([o[key] for o in outputs])
                              for key, value in first.items() if torch.is_tensor(value)})


def routed_module(folder: str | Path, module: nn.Module) -> RoutedModule:
    """`module` (loaded from the twin merge in `folder`) with per-input routing."""
    return RoutedModule(TwinModel(folder, module))


def route_texts(folder: str | Path, texts: list[str], *, device: str = "cpu") -> torch.Tensor:
    """Routing weights [len(texts), T] for texts, with the merge's own tokenizer."""
    import transformers as tf

    folder = Path(folder)
    index = read_index(folder)
    router = load_router(folder, index).to(device)
    with quiet_transformers():
        module = tf.AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
    with torch.no_grad():
        x = features(module, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        return F.softmax(router(x), dim=-1).cpu()
