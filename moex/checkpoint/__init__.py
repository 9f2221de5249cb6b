"""The checkpoint format, in one home: what training writes and eval, interp and export read.

- `format`: atomic save, the `meta.json` side file (step, config, config hash, file sizes;
  read without loading weights), ordering by step, `latest` with fallback to the newest
  complete checkpoint, pruning, reading weights without DeepSpeed;
- `reshard`: expert shards and layout-independent Adam state, so a run resumes under
  another (ep_size, world size, ZeRO stage);
- `load`: a model on one process from a run or checkpoint directory (`moex eval` & co).

Training, parallel and eval import this package; it imports none of them (only
models/parallel for building and sharding experts).
"""

from moex.checkpoint.format import (
    LATEST,
    META,
    is_weights_only,
    latest,
    latest_tag,
    list_checkpoints,
    load_client_state,
    load_model_state,
    prune,
    read_meta,
    resolve,
    rng_state,
    save,
    save_weights,
    set_rng_state,
    step_of,
    tag_for,
)

__all__ = ["LATEST", "META", "is_weights_only", "latest", "latest_tag", "list_checkpoints", "load_client_state",
           "load_model_state", "prune", "read_meta", "resolve", "rng_state", "save", "save_weights",
           "set_rng_state", "step_of", "tag_for"]
