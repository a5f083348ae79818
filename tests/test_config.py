"""Config presets, config.json parsing and errors."""

from __future__ import annotations

import json

import pytest

from dsv4_jax import Config, ConfigError


def test_presets_match_the_spec():
    f, p = Config.flash(), Config.pro()
    assert (f.dim, f.n_layers, f.n_heads, f.q_lora_rank, f.o_groups, f.index_topk) == (4096, 43, 64, 1024, 8, 512)
    assert (p.dim, p.n_layers, p.n_heads, p.q_lora_rank, p.o_groups, p.index_topk) == (7168, 61, 128, 1536, 16, 1024)
    assert (f.n_routed_experts, f.moe_inter_dim, f.route_scale) == (256, 2048, 1.5)
    assert (p.n_routed_experts, p.moe_inter_dim, p.route_scale) == (384, 3072, 2.5)
    assert f.compress_ratios[:4] == (0, 0, 4, 128) and f.compress_ratios[-2:] == (4, 0) and len(f.compress_ratios) == 44
    assert (
        p.compress_ratios[:4] == (128, 128, 4, 128)
        and p.compress_ratios[-2:] == (4, 0)
        and len(p.compress_ratios) == 62
    )
    assert sum(r == 4 for r in f.compress_ratios) == 21 and sum(r == 128 for r in f.compress_ratios) == 20
    assert sum(r == 4 for r in p.compress_ratios) == 30 and sum(r == 128 for r in p.compress_ratios) == 31
    assert f.n_hash_layers == p.n_hash_layers == 3 and f.swiglu_limit == 10.0 and f.hc_sinkhorn_iters == 20


def test_tiny_keeps_every_structural_feature():
    t = Config.tiny()
    assert {0, 4, 128} <= set(t.compress_ratios[: t.n_layers])
    assert 0 < t.n_hash_layers < t.n_layers and t.n_mtp_layers == 1
    assert t.index_topk < 160 // 4  # selection drops entries on the fixture's prompt


def test_hashable_and_frozen():
    assert hash(Config.tiny()) == hash(Config.tiny()) and Config.tiny() == Config.tiny()
    with pytest.raises(AttributeError):
        Config.tiny().dim = 3


@pytest.mark.parametrize("name", ["config.json", "inference/config.json"])
def test_from_hf_reads_both_name_styles(official_dir, name):
    cfg = Config.from_hf(official_dir / "checkpoint" / name)
    assert cfg.compress_ratios == (0, 0, 4, 128, 4, 128, 0)
    assert (cfg.dim, cfg.n_layers, cfg.index_n_heads, cfg.index_topk, cfg.n_activated_experts) == (256, 6, 16, 8, 2)
    assert cfg.rope_factor == 16 and cfg.original_seq_len == 65536


def test_round_trip_through_both_dicts():
    for cfg in (Config.flash(), Config.pro(), Config.tiny()):
        assert Config.from_hf(cfg.to_hf()).replace(max_seq_len=cfg.max_seq_len) == cfg
        assert Config.from_hf(cfg.to_inference()).replace(max_seq_len=cfg.max_seq_len) == cfg


def test_errors_name_every_problem(tmp_path):
    raw = Config.tiny().to_hf() | {"model_type": "deepseek_v3", "bogus_key": 1, "num_key_value_heads": 8}
    with pytest.raises(ConfigError) as e:
        Config.from_hf(raw)
    msg = str(e.value)
    assert "deepseek_v3" in msg and "bogus_key" in msg and "num_key_value_heads" in msg
    with pytest.raises(ConfigError, match="compress_ratios"):
        Config.tiny(compress_ratios=(0, 4))
    with pytest.raises(ConfigError, match="'dim'=512 contradicts another name for 'dim'"):
        Config.from_hf({"hidden_size": 256, "dim": 512})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=str(bad)):
        Config.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="no such config"):
        Config.from_hf(tmp_path / "missing")
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        Config.from_hf(bad)
