"""MoE-X upcycling: start a MoE model from a trained dense model (ReLU for MoE-X).

Shape key: D model dim, F dense hidden units (d_ff), E experts, H hidden units per expert.

Everything but the FFNs (embeddings, attention, norms) is copied unchanged.
Each sparse layer's experts come from the dense layer's fc (F x D) / proj (D x F)
(SwiGLU: also up (F x D), cut like fc); the dense activation must be the experts'
(MoE-X: ReLU). Each scheme only regroups hidden units, so the identities below hold
for every activation. Shared experts and routers start from a fresh init.

- `copy`: every expert is the dense MLP (needs H = F), plus Gaussian noise of
  `noise` x the weight's std so experts can diverge. With noise 0 and gates
  that sum to 1 (top-k renormalised, the MoE-X softmax over the selected) the
  MoE layer computes the dense layer exactly, whichever experts are chosen.
- `split`: the F dense units are partitioned, expert j gets units
  [j*H, (j+1)*H) (needs E*H = F), and its down-projection is scaled by E.
  Identity: with all E experts selected (top_k = E) and uniform gates 1/E
  (e.g. the `topk` router with zero weights) the MoE output equals the dense
  output exactly: sum_j (1/E) * E * proj_j relu(fc_j x) = proj relu(fc x). With
  top-k < E and gates summing to 1, the routed output is then an (E/k)-scaled
  sample of the dense sum — the natural scale to start training from.
- `partition`: for matched active parameters (k*H = F, as in MoE-X's top-2 of
  8): the F units are cut into r = F/H chunks, expert j gets chunk j mod r, its
  down-projection scaled by r, plus noise. When the k chosen experts hold k
  distinct chunks with equal gates (k = r) the layer equals the dense MLP.

The result is a state dict for `GPT(moe_cfg.model)`; `moex upcycle` saves it and
a recipe whose `train.init_from` points at it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moex import config as C
from moex.output import output_dir

SCHEMES = ("copy", "split", "partition")


def upcycle_state(dense_state: dict, dense_cfg: C.ModelConfig, moe_cfg: C.ModelConfig, *, scheme: str,
                  noise: float = 0.01, seed: int = 0) -> dict:
    """Map a dense GPT state dict onto the MoE GPT described by `moe_cfg` (returns a new state dict)."""
    from moex.models import GPT

    if scheme not in SCHEMES:
        raise ValueError(f"unknown upcycling scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if moe_cfg.ffn != "moe":
        raise ValueError(f"upcycling targets model.ffn=moe, got {moe_cfg.ffn!r}")
    if dense_cfg.ffn != "dense" or dense_cfg.mlp_activation != moe_cfg.moe.activation:
        raise ValueError(f"upcycling needs a dense model (model.ffn=dense) whose mlp_activation equals the experts' "
                         f"model.moe.activation; got {dense_cfg.ffn} {dense_cfg.mlp_activation!r} -> "
                         f"{moe_cfg.moe.activation!r} (MoE-X: relu)")
    if dense_cfg.bias == "all":
        raise ValueError("upcycling needs a dense MLP without biases (model.bias=none or qkv): experts have no "
                         "biases, so the dense layer could not be reproduced (e.g. an imported GPT-2)")
    for key in ("n_layer", "d_model", "n_head", "vocab_size", "pos_emb", "block_size", "tie_embeddings",
                "norm", "norm_eps", "n_kv_head", "rope_base", "qk_norm", "bias"):
        if getattr(dense_cfg, key) != getattr(moe_cfg, key):
            raise ValueError(f"model.{key} differs: dense {getattr(dense_cfg, key)} vs MoE {getattr(moe_cfg, key)}")
    E, H, F = moe_cfg.moe.num_experts, moe_cfg.moe.d_expert, dense_cfg.d_ff
    if scheme == "copy" and H != F:
        raise ValueError(f"scheme copy needs model.moe.d_expert == dense d_ff ({F}), got {H}")
    if scheme == "split" and E * H != F:
        raise ValueError(f"scheme split needs num_experts * d_expert == dense d_ff ({F}), got {E} * {H}")
    if scheme == "partition" and F % H:
        raise ValueError(f"scheme partition needs dense d_ff ({F}) divisible by model.moe.d_expert ({H})")
    r = F // H
    with torch.device("meta"):
        target = GPT(moe_cfg).state_dict()
    gen = torch.Generator().manual_seed(seed)
    out: dict = {}
    for name in target:
        if name in dense_state:
            out[name] = dense_state[name].clone()
            continue
        if ".experts." not in name:
            continue  # a router tensor: no dense counterpart, filled from a fresh init below
        prefix, _, leaf = name.rpartition(".experts.")
        fc_FD = dense_state[prefix + (".up.weight" if leaf == "w3_EDH" else ".fc.weight")]  # prefix = blocks.i.ffn
        proj_DF = dense_state[prefix + ".proj.weight"]
        chunk_E = torch.arange(E) % r if scheme == "partition" else None
        if leaf in ("w1_EDH", "w3_EDH"):  # SwiGLU's up projection (w3) is cut like its gate (w1)
            if scheme == "partition":
                w = fc_FD.T.reshape(-1, r, H).transpose(0, 1)[chunk_E]
            else:
                w = fc_FD.T.unsqueeze(0).expand(E, -1, -1) if scheme == "copy" else fc_FD.T.reshape(-1, E, H).transpose(0, 1)
        elif leaf == "w2_EHD":
            if scheme == "partition":
                w = r * proj_DF.T.reshape(r, H, -1)[chunk_E]
            else:
                w = proj_DF.T.unsqueeze(0).expand(E, -1, -1) if scheme == "copy" else E * proj_DF.T.reshape(E, H, -1)
        else:
            raise KeyError(f"{name}: unknown expert tensor")
        w = w.contiguous().clone()
        if scheme in ("copy", "partition") and noise:
            w = w + noise * w.std() * torch.randn(w.shape, generator=gen)
        out[name] = w
    return _fill_new(out, target, moe_cfg)


def _fill_new(out: dict, target: dict, moe_cfg: C.ModelConfig) -> dict:
    """Router tensors have no dense counterpart: take a freshly initialised GPT's."""
    missing = [k for k in target if k not in out]
    if missing:
        from moex.models import GPT

        fresh = GPT(moe_cfg).state_dict()
        out.update({k: fresh[k] for k in missing})
    return out


def upcycle(dense_path: str, recipe: str, overrides: list[str], *, scheme: str, out_dir: str,
            noise: float = 0.01, seed: int = 0) -> Path:
    """Write OUT/upcycled.pt and OUT/recipe.yaml (train.init_from -> the state dict); returns the recipe path."""
    from moex.checkpoint.load import load_model

    dense = load_model(dense_path)
    cfg = C.load(recipe, overrides)
    check_same_data(dense.cfg, cfg, dense.ckpt_dir, recipe)
    if cfg.model.vocab_size <= 0:
        cfg.model.vocab_size = dense.cfg.model.vocab_size
    torch.manual_seed(cfg.train.seed)
    try:
        state = upcycle_state(dense.model.state_dict(), dense.cfg.model, cfg.model, scheme=scheme, noise=noise, seed=seed)
    except ValueError as e:
        raise C.ConfigError(f"cannot upcycle {dense.ckpt_dir} into {recipe}: {e}") from None
    out = Path(out_dir)
    with output_dir(out):
        _write(out, state, dense, cfg, scheme, noise)
    return out / "recipe.yaml"


def check_same_data(dense_cfg: C.Config, cfg: C.Config, dense_ckpt: Path, recipe: str) -> None:
    """The upcycled run must read the dense run's token ids: same tokenizer and data, else refuse now
    (not at train time)."""
    keys = ("tokenizer", "source", "path", "vocab_size") if cfg.data.tokenizer == "sentencepiece" else ("tokenizer", "source", "path")
    diffs = [f"data.{k}: dense {getattr(dense_cfg.data, k)!r}, recipe {getattr(cfg.data, k)!r}"
             for k in keys if getattr(dense_cfg.data, k) != getattr(cfg.data, k)]
    if diffs:
        raise C.ConfigError(f"{recipe} does not read the data {dense_ckpt} was trained on ({'; '.join(diffs)}); "
                            f"upcycling keeps the dense run's token ids, so the recipe must match it")


def _write(out: Path, state: dict, dense, cfg: C.Config, scheme: str, noise: float) -> None:
    import yaml

    torch.save(state, out / "upcycled.pt")
    if (dense.run_dir / "tokenizer").is_dir() and not (out / "tokenizer").exists():  # same token ids as the dense run
        import shutil

        shutil.copytree(dense.run_dir / "tokenizer", out / "tokenizer")
    data = C.to_dict(cfg)
    data["train"].update(out_dir=str(out.parent), run_name=out.name, init_from=str((out / "upcycled.pt").resolve()))
    (out / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (out / "upcycle.json").write_text(json.dumps({"dense": str(dense.ckpt_dir), "scheme": scheme, "noise": noise}))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense", help="dense ReLU run or checkpoint directory")
    p.add_argument("recipe", help="MoE recipe (model.ffn=moe) to upcycle into")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--scheme", choices=SCHEMES, default="copy")
    p.add_argument("--noise", type=float, default=0.01, help="copy/partition: noise std relative to the weight std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory to create (train it with `moex train OUT/recipe.yaml`)")


def run(args) -> int:
    path = upcycle(args.dense, args.recipe, args.overrides, scheme=args.scheme, out_dir=args.out,
                   noise=args.noise, seed=args.seed)
    print(f"wrote {path.parent / 'upcycled.pt'}\ntrain it with: moex train {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moex upcycle", description=__doc__)
    add_arguments(p)
    return run(p.parse_intermixed_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
