"""Configuration: keyword-only dataclasses per component, YAML recipes, dotted overrides.

A recipe is a YAML mapping whose top-level keys are the fields of `Config`
(`model`, `data`, `optim`, `train`, `deepspeed`, `parallel`). Overrides on the
command line use dotted paths: `model.moe.num_experts=16 train.max_steps=200`.
Unknown keys and values of the wrong type raise `ConfigError` naming the key
and listing what is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from moex.errors import ConfigError

__all__ = ["Config", "MoEConfig", "MonetConfig", "PEERConfig", "ConfigError", "load", "from_dict", "from_saved", "migrate_saved", "to_dict", "dump", "validate", "apply_overrides"]


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise `ConfigError("key=value rule")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} {rule}")


def _positive(obj: Any, section: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _need(v > 0, f"{section}.{n}", v, "must be > 0")


def _non_negative(obj: Any, section: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _need(v >= 0, f"{section}.{n}", v, "must be >= 0")


# --------------------------------------------------------------------------- model


@dataclass(kw_only=True)
class MoEConfig:
    """Routed experts (model.ffn=moe): router -> dispatch -> experts -> weighted combine."""

    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 256  # hidden units per expert
    # relu | gelu | relu2 (squared ReLU) | swiglu (three matrices: silu(x w1) * (x w3), then w2)
    activation: Literal["relu", "gelu", "relu2", "swiglu"] = "relu"
    # Shared experts (DeepSeek-MoE, Qwen2-MoE): dense experts every token passes through,
    # added to the routed output; each has d_shared_expert hidden units (0 = d_expert).
    num_shared_experts: int = 0
    d_shared_expert: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: scale the shared output by sigmoid(x . w_gate)
    router: str = "moex"  # a name in moex.routers.REGISTRY
    # top-k with k > 1: renormalise the chosen probabilities to sum to 1 (Mixtral); False keeps
    # the raw softmax probabilities (Qwen2-MoE and OLMoE's norm_topk_prob=False)
    normalize_gates: bool = True
    # None = dropless (default). A float c caps each expert at ceil(c * T * k / E) tokens.
    capacity_factor: Optional[float] = None
    # Which assignments a capped expert keeps (moex.routers.capacity): gshard = all first
    # choices before any second choice, surviving gates renormalised; token_order = as listed.
    capacity_policy: Literal["gshard", "token_order"] = "gshard"
    capacity_per_sequence: bool = False  # T above = one sequence's tokens (HF Switch's expert_capacity)
    aux_loss_coef: float = 1e-2  # Switch load-balancing loss alpha
    z_loss_coef: float = 1e-3  # router z-loss
    # auto: the fused expert MLP on CPU (moex.ops.expert_mlp), grouped GEMMs on CUDA;
    # fused: always the fused op; else a moex.ops.grouped_gemm backend for the unfused path.
    gemm_backend: Literal["auto", "fused", "loop", "torch", "triton", "grouped_gemm", "megablocks"] = "auto"
    # expert-choice: tokens per expert = capacity_factor * T * k / E (k from top_k)
    # aux-loss-free balancing (sigmoid gates): bias step per update
    bias_update_rate: float = 1e-3

    def validate(self, section: str = "model.moe", *, ffn: str = "moe") -> None:
        _positive(self, section, "num_experts", "top_k", "d_expert")
        _non_negative(self, section, "aux_loss_coef", "z_loss_coef", "bias_update_rate")
        if self.capacity_factor is not None:
            _need(self.capacity_factor > 0, f"{section}.capacity_factor", self.capacity_factor,
                  "must be > 0 (or null for dropless routing)")
        _non_negative(self, section, "num_shared_experts", "d_shared_expert")
        _need(not self.shared_expert_gate or self.num_shared_experts >= 1, f"{section}.shared_expert_gate",
              self.shared_expert_gate, f"needs {section}.num_shared_experts >= 1")
        if ffn == "moe":
            _need(self.top_k <= self.num_experts, f"{section}.top_k", self.top_k,
                  f"must be in [1, num_experts={self.num_experts}]")
            from moex.routers.registry import known_routers

            valid = known_routers()
            _need(self.router in valid, f"{section}.router", self.router, f"is not a router; valid: {', '.join(valid)}")


@dataclass(kw_only=True)
class MonetConfig:
    """Monet (model.ffn=monet): N*N experts built from two sets of N sub-experts, H router heads."""

    num_sub_experts: int = 16  # N sub-experts per key set (N*N experts)
    num_heads: int = 1  # routing heads; expert (i, j) weighs sum_h g1_hi g2_hj
    top_k: int = 2  # sub-experts kept per key set and head (threshold Phi^-1(1 - k/N); < N)
    d_expert: int = 256  # hidden units per sub-expert (even for vd)
    mode: Literal["hd", "vd"] = "hd"  # horizontal or vertical expert decomposition
    router_share_every: int = 1  # one router shared by groups of this many sparse layers
    uniformity_coef: float = 1e-3  # aux loss: N * sum_i (mean_t g_i - 1/N)^2
    ambiguity_coef: float = 1e-3  # aux loss: mean(1 - max_i g_i)

    def validate(self, section: str = "model.monet") -> None:
        _positive(self, section, "num_sub_experts", "num_heads", "top_k", "d_expert", "router_share_every")
        _non_negative(self, section, "uniformity_coef", "ambiguity_coef")
        _need(self.top_k < self.num_sub_experts, f"{section}.top_k", self.top_k,
              f"must be < {section}.num_sub_experts={self.num_sub_experts}")
        if self.mode == "vd":
            _need(self.d_expert % 2 == 0, f"{section}.d_expert", self.d_expert, f"must be even with {section}.mode=vd")


@dataclass(kw_only=True)
class PEERConfig:
    """PEER (model.ffn=peer): product-key retrieval over N*N single-neuron experts, H query heads."""

    num_sub_experts: int = 16  # N sub-keys per query half (N*N experts)
    num_heads: int = 1  # query heads; they share the experts
    top_k: int = 2  # experts retrieved per head (<= N)
    activation: Literal["relu", "gelu", "gelu_tanh", "relu2"] = "relu"
    query_norm: bool = True  # BatchNorm (no affine) on each head's query

    def validate(self, section: str = "model.peer") -> None:
        _positive(self, section, "num_sub_experts", "num_heads", "top_k")
        _need(self.top_k <= self.num_sub_experts, f"{section}.top_k", self.top_k,
              f"must be <= {section}.num_sub_experts={self.num_sub_experts}")


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 0  # 0 = take it from the tokenizer
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    block_size: int = 256  # context length
    dropout: float = 0.0
    pos_emb: Literal["rope", "learned"] = "rope"
    attn_backend: Literal["sdpa", "flash"] = "sdpa"
    tie_embeddings: bool = True
    # FFN per layer: "dense" or one of the sparse layers ("moe", "monet", "peer").
    ffn: Literal["dense", "moe", "monet", "peer"] = "moe"
    moe_every: int = 1  # layer i is sparse when i % moe_every == moe_every - 1
    d_ff: int = 512  # dense MLP hidden size
    mlp_activation: Literal["relu", "gelu", "gelu_tanh", "relu2", "swiglu"] = "gelu"  # gelu_tanh: GPT-2's
    moe: MoEConfig = field(default_factory=MoEConfig)  # ffn=moe: routed experts
    monet: MonetConfig = field(default_factory=MonetConfig)  # ffn=monet
    peer: PEERConfig = field(default_factory=PEERConfig)  # ffn=peer
    init_std: float = 0.02
    # Decoder options of the published families (docs/interop.md). The defaults are
    # moex's original decoder, with its state-dict keys.
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    n_kv_head: int = 0  # grouped-query attention: key/value heads (0 = n_head)
    rope_base: float = 10000.0
    qk_norm: bool = False  # OLMoE: RMSNorm over the whole q and k projections, before RoPE
    # Linear-layer (and LayerNorm) biases: none; qkv = attention input only (Qwen2); all (GPT-2)
    bias: Literal["none", "qkv", "all"] = "none"

    def validate(self, section: str = "model") -> None:
        _non_negative(self, section, "vocab_size")
        _positive(self, section, "n_layer", "n_head", "d_model", "block_size", "moe_every", "d_ff", "init_std")
        _need(0 <= self.dropout < 1, f"{section}.dropout", self.dropout, "must be in [0, 1)")
        _need(self.d_model % self.n_head == 0, f"{section}.d_model", self.d_model,
              f"must be divisible by {section}.n_head={self.n_head}")
        if self.pos_emb == "rope":
            hd = self.d_model // self.n_head
            _need(hd % 2 == 0, f"{section}.pos_emb", self.pos_emb,
                  f"needs an even head dim, got d_model/n_head = {hd}")
        _positive(self, section, "rope_base", "norm_eps")
        _need(self.n_kv_head >= 0 and (self.n_kv_head == 0 or self.n_head % self.n_kv_head == 0),
              f"{section}.n_kv_head", self.n_kv_head, f"must divide {section}.n_head={self.n_head} (0 = n_head)")
        self.moe.validate(f"{section}.moe", ffn=self.ffn)
        self.monet.validate(f"{section}.monet")
        self.peer.validate(f"{section}.peer")
        if self.ffn == "monet" and self.monet.mode == "vd":
            _need(self.d_model % 2 == 0, f"{section}.d_model", self.d_model, "must be even for Monet VD")
        if self.ffn == "peer":
            _need(self.d_model % 2 == 0, f"{section}.d_model", self.d_model, "must be even for PEER (split query)")


# --------------------------------------------------------------------------- data


@dataclass(kw_only=True)
class DataConfig:
    # chess_random: games generated with python-chess (no download needed)
    # pgn: a PGN file; text: local text file(s) or a Hugging Face dataset name
    source: Literal["chess_random", "pgn", "text"] = "chess_random"
    root: str = "../shared/data"  # relative paths below resolve against this (env MOEX_DATA_ROOT wins)
    path: Optional[str] = None  # file, directory or hub dataset name
    val_path: Optional[str] = None  # optional separate validation file
    hf_config: Optional[str] = None
    text_field: str = "text"
    tokenizer: Literal["chess", "byte", "char", "sentencepiece", "hf"] = "chess"  # hf: an imported model's
    vocab_size: int = 8000  # sentencepiece only
    num_games: int = 2000  # chess_random: games to generate; pgn: max games to read (0 = all)
    max_game_chars: int = 1023
    val_fraction: float = 0.05
    seed: int = 1234
    cache_dir: str = ".moex_cache"
    num_workers: int = 0  # processes/threads for tokenizing, tokenizer training, game generation (0 = os.cpu_count())
    shard_tokens: int = 100_000_000  # prepared data: a token file closes after the chunk that reaches this size

    def validate(self, section: str = "data") -> None:
        _non_negative(self, section, "num_games")
        _non_negative(self, section, "num_workers")
        _positive(self, section, "max_game_chars", "vocab_size", "shard_tokens")
        _need(0 < self.val_fraction < 1, f"{section}.val_fraction", self.val_fraction, "must be in (0, 1)")
        if self.source in ("pgn", "text"):
            _need(bool(self.path), f"{section}.path", self.path, f"is needed with {section}.source={self.source!r}")
        if self.source == "chess_random":
            _need(self.num_games >= 2, f"{section}.num_games", self.num_games,
                  "must be >= 2 with source chess_random (a train and a val split)")


# --------------------------------------------------------------------------- optim / train


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0  # 0 = no clipping

    def validate(self, section: str = "optim") -> None:
        _positive(self, section, "lr", "eps")
        _non_negative(self, section, "min_lr", "weight_decay", "warmup_steps", "grad_clip")
        _need(self.min_lr <= self.lr, f"{section}.min_lr", self.min_lr, f"must be <= {section}.lr={self.lr}")
        for n in ("beta1", "beta2"):
            v = getattr(self, n)
            _need(0 <= v < 1, f"{section}.{n}", v, "must be in [0, 1)")


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 16  # micro-batch per rank
    grad_accum: int = 1
    seed: int = 1337
    precision: Literal["fp32", "bf16"] = "fp32"
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 100
    keep_checkpoints: int = 2
    out_dir: str = "runs"
    run_name: Optional[str] = None  # default: recipe stem
    resume: Literal["never", "auto"] = "auto"
    # Initial weights for a fresh run: a state-dict .pt file (e.g. written by
    # `moex upcycle`) or a run/checkpoint directory. Ignored when resuming.
    init_from: Optional[str] = None
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    progress: bool = True
    # Every interp_interval steps (0 = never), rank 0 scores the live model with the
    # chess suite (chess tokenizer) or the text suite into RUN/interp/ (moex.interp.curve).
    interp_interval: int = 0
    interp_games: int = 100  # chess: evaluation games (half labelling, half held out); text: UD sentences

    def validate(self, section: str = "train") -> None:
        _positive(self, section, "max_steps", "batch_size", "grad_accum", "log_interval", "eval_interval",
                  "ckpt_interval")
        _non_negative(self, section, "eval_batches", "keep_checkpoints", "threads", "interp_interval")
        _positive(self, section, "interp_games")
        _need(bool(self.out_dir), f"{section}.out_dir", self.out_dir, "must not be empty")
        if self.run_name is not None:
            _need(bool(self.run_name) and "/" not in self.run_name and self.run_name not in (".", ".."),
                  f"{section}.run_name", self.run_name, "must be a plain directory name")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2] = 0
    skip_shm_comm: bool = True  # skip the ~65 s JIT build of the CPU shm comm op

    def validate(self, section: str = "deepspeed") -> None:
        pass


@dataclass(kw_only=True)
class ParallelConfig:
    ep_size: int = 1  # expert-parallel degree

    def validate(self, section: str = "parallel") -> None:
        _positive(self, section, "ep_size")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys of {where or 'the recipe'}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


# Keys that lived in model.moe before each sparse layer family had its own section -> their new name.
_MOVED = {"num_sub_experts": "num_sub_experts", "num_heads": "num_heads", "router_share_every": "router_share_every",
          "monet_mode": "mode"}
_SHARED = {"monet": ("top_k", "d_expert"), "peer": ("top_k", "activation")}  # model.moe keys these families read


def _model_moe(data: dict) -> tuple[str, dict]:
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("moe"), dict):
        return "moe", {}
    return model.get("ffn", "moe"), model["moe"]


def _refuse_moved(data: dict) -> None:
    """A recipe or override that still sets a moved model.moe key: one error naming the new key."""
    ffn, moe = _model_moe(data)
    for key in moe:
        if key not in _MOVED:
            continue
        fams = ["monet"] if key in ("router_share_every", "monet_mode") else (
            [ffn] if ffn in _SHARED else list(_SHARED))
        new = " or ".join(f"model.{f}.{_MOVED[key]}" for f in fams)
        also = [f"model.moe.{k} -> model.{ffn}.{k}" for k in _SHARED.get(ffn, ()) if k in moe]
        hint = f"; move {', '.join(also)} too" if also else ""
        raise ConfigError(f"config key 'model.moe.{key}' moved to '{new}' (model.moe holds routed experts only; "
                          f"Monet and PEER have model.monet and model.peer){hint}")


def from_dict(data: dict) -> Config:
    """Build a validated Config from a nested mapping (a recipe with overrides applied)."""
    _refuse_moved(data or {})
    return _build(Config, data or {})


def migrate_saved(data: dict) -> dict:
    """A config saved by an older moex (Monet/PEER knobs in model.moe) in today's layout; a copy.

    For configs moex wrote itself (a run's config.yaml, checkpoint metadata, an export), so
    existing runs keep loading; a user's recipe with old keys gets `_refuse_moved`'s error instead.
    """
    ffn, moe = _model_moe(data)
    if not any(k in moe for k in _MOVED):
        return data
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    model = data["model"]
    moe = model["moe"]
    old = {_MOVED[k]: moe.pop(k) for k in list(_MOVED) if k in moe}
    if ffn in _SHARED:
        keep = ("num_sub_experts", "num_heads", "mode", "router_share_every") if ffn == "monet" else (
            "num_sub_experts", "num_heads")
        section = {k: v for k, v in old.items() if k in keep}
        for k in _SHARED[ffn]:  # the routed-expert section keeps its defaults for what it never used
            if k in moe:
                section[k] = moe.pop(k) if k != "activation" else moe[k]
        model[ffn] = {**section, **(model.get(ffn) or {})}
    return data


def from_saved(data: dict) -> Config:
    """`from_dict` for a config moex saved, migrated first (see `migrate_saved`)."""
    return from_dict(migrate_saved(data or {}))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars) to a nested dict."""
    data = yaml.safe_load(yaml.safe_dump(data or {}))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return data


# The recipes ship inside the package (moex/recipes; `recipes/` at the repo root is the same directory).
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def recipe_names() -> list[str]:
    """Bare names of the shipped recipes (`chess-tiny`, `experiments/chess-interp-cpu`)."""
    return sorted(p.relative_to(RECIPE_DIR).with_suffix("").as_posix() for p in RECIPE_DIR.rglob("*.yaml"))


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe path as given, else a shipped recipe's bare name (`chess-tiny`), else a ConfigError."""
    path = Path(recipe)
    if path.exists():
        return path
    shipped = RECIPE_DIR / (path.as_posix().removesuffix(".yaml") + ".yaml")
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise ConfigError(f"recipe not found: {recipe} (neither a file nor a shipped recipe; "
                      f"shipped: {', '.join(recipe_names())})")


def read_recipe(recipe: str | Path) -> dict:
    """A recipe's mapping; errors name the file (missing, malformed YAML, empty, not a mapping)."""
    path = resolve_recipe(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe {path} is not a file")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not a text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    if data is None:
        raise ConfigError(f"recipe {path} is empty; a recipe must set at least one section "
                          f"(valid sections: {', '.join(f.name for f in dataclasses.fields(Config))})")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def load(recipe: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (a path or a shipped recipe's name; defaults when None), apply overrides, validate."""
    data = read_recipe(recipe) if recipe is not None else {}
    cfg = from_dict(apply_overrides(data, overrides or []))
    if cfg.train.run_name is None and recipe is not None:
        cfg.train.run_name = Path(recipe).stem
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks per section (each dataclass's validate()), then checks across sections."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if hasattr(section, "validate"):
            section.validate(f.name)
    m, ep = cfg.model, cfg.parallel.ep_size
    if ep > 1:
        _need(m.ffn == "moe", "parallel.ep_size", ep, f"needs model.ffn=moe (expert parallelism), got {m.ffn!r}")
        _need(m.moe.num_experts % ep == 0, "model.moe.num_experts", m.moe.num_experts,
              f"must be divisible by parallel.ep_size={ep}")
        _need(cfg.train.interp_interval == 0, "train.interp_interval", cfg.train.interp_interval,
              "needs parallel.ep_size=1 (rank 0 holds only its own experts); score checkpoints with "
              "`moex interpret RUN --all-checkpoints` instead")


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
