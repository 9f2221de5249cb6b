from pathlib import Path

import pytest

from moex import config as C

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml"))


def test_defaults_build():
    cfg = C.from_dict({})
    assert cfg.model.moe.router == "moex" and cfg.train.max_steps > 0


def test_unknown_key_lists_valid_ones():
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({"model": {"moe": {"num_expert": 4}}})
    msg = str(e.value)
    assert "model.moe.num_expert" in msg and "num_experts" in msg and "top_k" in msg


def test_unknown_section():
    with pytest.raises(C.ConfigError, match="valid keys of the recipe: model, data"):
        C.from_dict({"modle": {}})


def test_wrong_type_and_literal():
    with pytest.raises(C.ConfigError, match=r"train.max_steps: expected int, got 'ten'"):
        C.from_dict({"train": {"max_steps": "ten"}})
    with pytest.raises(C.ConfigError, match=r"model.pos_emb: 'alibi' is not one of \['rope', 'learned'\]"):
        C.from_dict({"model": {"pos_emb": "alibi"}})
    with pytest.raises(C.ConfigError, match="expected int"):
        C.from_dict({"train": {"batch_size": True}})


def test_int_widens_to_float_and_optional():
    cfg = C.from_dict({"optim": {"lr": 1}, "model": {"moe": {"capacity_factor": 2}}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.moe.capacity_factor == 2.0


def test_dotted_overrides(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("model:\n  moe:\n    num_experts: 8\n")
    cfg = C.load(r, ["model.moe.num_experts=16", "train.max_steps=200", "data.path=null", "optim.lr=3e-4"])
    assert cfg.model.moe.num_experts == 16 and cfg.train.max_steps == 200 and cfg.optim.lr == 3e-4
    assert cfg.train.run_name == "r"
    with pytest.raises(C.ConfigError, match="model.moe.num_expertz"):
        C.load(r, ["model.moe.num_expertz=3"])
    with pytest.raises(C.ConfigError, match="must look like"):
        C.load(r, ["train.max_steps"])


def test_cross_field_checks():
    with pytest.raises(C.ConfigError, match="divisible by parallel.ep_size"):
        C.load(None, ["model.moe.num_experts=6", "parallel.ep_size=4"])
    with pytest.raises(C.ConfigError, match="top_k"):
        C.load(None, ["model.moe.top_k=9"])


def test_dump_roundtrip():
    cfg = C.load(None, ["model.moe.top_k=1"])
    import yaml

    assert C.from_dict(yaml.safe_load(C.dump(cfg))) == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_builds(recipe):
    from moex.models.info import describe

    cfg = C.load(recipe)
    assert describe(cfg)["params_total"] > 0  # the model itself, on the meta device


# A Monet run's config.yaml as moex wrote it before model.monet / model.peer existed (trimmed).
OLD_MONET = {"model": {"ffn": "monet", "d_model": 32, "moe": {
    "num_experts": 8, "top_k": 4, "d_expert": 32, "activation": "relu", "router": "moex",
    "num_sub_experts": 16, "num_heads": 2, "router_share_every": 2, "monet_mode": "vd"}}}


def test_moved_layer_keys_in_a_recipe_name_their_new_home():
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(OLD_MONET)
    msg = str(e.value)
    assert "'model.moe.num_sub_experts' moved to 'model.monet.num_sub_experts'" in msg
    assert "model.moe.top_k -> model.monet.top_k" in msg and "\n" not in msg
    with pytest.raises(C.ConfigError, match="'model.moe.num_heads' moved to 'model.peer.num_heads'"):
        C.load(None, ["model.ffn=peer", "model.moe.num_heads=2"])
    with pytest.raises(C.ConfigError, match="'model.moe.router_share_every' moved to 'model.monet.router_share_every'"):
        C.load(None, ["model.ffn=peer", "model.moe.router_share_every=2"])


def test_saved_old_configs_migrate_to_the_family_sections():
    cfg = C.from_saved(OLD_MONET)
    assert cfg.model.monet == C.MonetConfig(num_sub_experts=16, num_heads=2, top_k=4, d_expert=32, mode="vd",
                                            router_share_every=2)
    assert cfg.model.moe == C.MoEConfig(num_experts=8, activation="relu", router="moex")  # top_k, d_expert: defaults
    assert "num_sub_experts" in OLD_MONET["model"]["moe"]  # the caller's dict is left alone
    peer = {"model": {"ffn": "peer", "moe": {"top_k": 32, "activation": "gelu", "num_sub_experts": 32,
                                             "num_heads": 8, "router_share_every": 1, "monet_mode": "hd"}}}
    assert C.from_saved(peer).model.peer == C.PEERConfig(num_sub_experts=32, num_heads=8, top_k=32, activation="gelu")
    moe = {"model": {"ffn": "moe", "moe": {"top_k": 1, "num_sub_experts": 16, "num_heads": 1}}}
    got = C.from_saved(moe).model
    assert got.moe.top_k == 1 and got.monet == C.MonetConfig() and got.peer == C.PEERConfig()
    new = C.to_dict(C.load(None, ["model.ffn=monet", "model.monet.top_k=3"]))
    assert C.migrate_saved(new) is new  # today's layout passes through


def test_shipped_recipe_by_name_equals_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bare name must not depend on the working directory
    root = Path(__file__).resolve().parents[1] / "recipes"
    assert C.resolve_recipe("chess-tiny").read_text() == (root / "chess-tiny.yaml").read_text()
    assert C.resolve_recipe("experiments/chess-interp-cpu.yaml").name == "chess-interp-cpu.yaml"
    assert set(C.recipe_names()) == {p.relative_to(root).with_suffix("").as_posix() for p in RECIPES}
    assert C.load("chess-tiny").train.run_name == "chess-tiny"
    (tmp_path / "chess-tiny.yaml").write_text("train: {max_steps: 7}\n")  # an existing path wins over a name
    assert C.load("chess-tiny.yaml").train.max_steps == 7


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(C.ConfigError, match=r"recipe not found: chess-tinyy .*shipped: .*chess-tiny, chess-tiny-dense"):
        C.load("chess-tinyy")


def test_interp_interval_needs_one_expert_shard():
    cfg = C.from_dict({"model": {"ffn": "moe"}, "parallel": {"ep_size": 2}, "train": {"interp_interval": 10}})
    with pytest.raises(C.ConfigError, match="train.interp_interval"):
        C.validate(cfg)
    with pytest.raises(C.ConfigError, match="train.interp_games"):
        C.validate(C.from_dict({"train": {"interp_games": 0}}))
