"""Released-format reader, writer and validation: the official fixture, byte-exact writing, both expert dtypes,
MTP handling, and every validation problem reported at once."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from ckpt_helpers import assert_same_params, edit_config, rewrite_shard, shard_of, small_cfg

from dsv4_jax.checkpoint.layout import CheckpointError, param_table, validate
from dsv4_jax.checkpoint.native import index_tensors, load_native
from dsv4_jax.checkpoint.restore import load
from dsv4_jax.checkpoint.safetensors_io import read_header
from dsv4_jax.checkpoint.writer import write_native
from dsv4_jax.config import Config


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """A small released-format checkpoint of random bytes (no model init: fast), 3 shards."""
    return write_native(small_cfg(), tmp_path_factory.mktemp("native") / "ckpt", seed=1, shards=3, values="random")


@pytest.fixture
def ckpt_copy(random_ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(random_ckpt, dst)
    return dst


# ---- the official fixture -----------------------------------------------------------------------------------------


def test_official_fixture_loads_like_load_native(official_dir, official_state):
    ckpt = official_dir / "checkpoint"
    cfg, state = load(ckpt)
    assert cfg == Config.from_hf(ckpt) and cfg.n_mtp_layers == 1
    assert_same_params(state, official_state)
    flat = {s.key: s for s in param_table(cfg)}
    assert "mtp.0.ffn.experts.w2.scale" in flat and "mtp.0.e_proj.weight" in flat  # MTP read, experts stacked
    # spot-check raw bytes against the file for each dtype kind (I8 packed, E8M0, E4M3, BF16, F32, I64 -> int32)
    tensors = index_tensors(ckpt)
    params = {tuple(p): v for p, v in _flat(state)}
    for name, path, expert in [
        ("layers.2.ffn.experts.5.w1.weight", ("layers", 2, "ffn", "experts", "w1", "weight"), 5),
        ("layers.2.ffn.experts.5.w1.scale", ("layers", 2, "ffn", "experts", "w1", "scale"), 5),
        ("layers.3.attn.wq_b.weight", ("layers", 3, "attn", "wq_b", "weight"), None),
        ("embed.weight", ("embed", "weight"), None),
        ("mtp.0.hc_head_fn", ("mtp", 0, "hc_head_fn"), None),
    ]:
        info = tensors[name]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            raw = f.read(info.nbytes)
        got = params[path] if expert is None else params[path][expert]
        assert got.tobytes() == raw, name
    tid = tensors["layers.0.ffn.gate.tid2eid"]
    with open(tid.file, "rb") as f:
        f.seek(tid.start)
        want = np.frombuffer(f.read(tid.nbytes), np.int64).reshape(tid.shape)
    got = params[("layers", 0, "ffn", "gate", "tid2eid")]
    assert got.dtype == np.int32 and np.array_equal(got, want)


def _flat(state):
    from dsv4_jax.checkpoint.layout import per_layer

    return [(spec.path, np.asarray(v)) for spec, v in per_layer(state)]


def test_writer_reproduces_the_official_files_byte_for_byte(official_dir, official_state, tmp_path):
    src = official_dir / "checkpoint"
    out = write_native(official_state, tmp_path / "again")
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    assert files == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    for f in files + ["model.safetensors.index.json"]:
        assert (src / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    assert json.loads((src / "inference/config.json").read_text()) == json.loads(
        (tmp_path / "again/inference/config.json").read_text()
    )
    a, b = json.loads((src / "config.json").read_text()), json.loads((tmp_path / "again/config.json").read_text())
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {"transformers_version"}


# ---- writer / reader round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_dtype", ["fp4", "fp8"])
def test_write_read_write_is_exact(tmp_path, expert_dtype):
    cfg = small_cfg(expert_dtype=expert_dtype)
    out = write_native(cfg, tmp_path / "ck", seed=5, shards=4, values="random")
    names = sorted(os.listdir(out))
    assert [n for n in names if n.endswith(".safetensors")] == [
        f"model-0000{k}-of-00004.safetensors" for k in (1, 2, 3, 4)
    ]
    assert Config.from_hf(out) == cfg
    inference = Config.from_hf(os.path.join(out, "inference", "config.json"))  # has no max_seq_len, as released
    assert inference == cfg.replace(max_seq_len=inference.max_seq_len)
    tensors = index_tensors(out)
    w = tensors["layers.1.ffn.experts.3.w2.weight"]
    s = tensors["layers.1.ffn.experts.3.w2.scale"]
    if expert_dtype == "fp4":
        assert (w.dtype, w.shape, s.shape) == (
            "I8",
            (cfg.dim, cfg.moe_inter_dim // 2),
            (cfg.dim, cfg.moe_inter_dim // 32),
        )
    else:
        assert (w.dtype, w.shape, s.shape) == ("F8_E4M3", (cfg.dim, cfg.moe_inter_dim), (cfg.dim // 128, 1))
    assert s.dtype == "F8_E8M0" and tensors["layers.0.ffn.gate.tid2eid"].dtype == "I64"
    state = load_native(out)  # read (experts stacked, I8 -> uint8, I64 -> int32) ...
    again = write_native(state, tmp_path / "again", shards=4)  # ... and written back: the same bytes
    for f in names:
        if os.path.isfile(os.path.join(out, f)):
            assert open(os.path.join(out, f), "rb").read() == open(os.path.join(again, f), "rb").read(), f


def test_safetensors_files_open_with_the_safetensors_package(random_ckpt):
    from safetensors import safe_open

    fn = shard_of(random_ckpt, "hc_head_fn")
    path = os.path.join(random_ckpt, fn)
    hdr, meta = read_header(path)
    assert meta == {"format": "pt"}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert n % 8 == 0
    with safe_open(path, framework="numpy") as f:
        assert set(f.keys()) == set(hdr)
        np.testing.assert_array_equal(f.get_tensor("hc_head_fn"), np.asarray(_read(hdr["hc_head_fn"])))


def _read(info):
    from dsv4_jax.checkpoint.safetensors_io import read_tensor

    return read_tensor(info)


def test_writer_is_atomic_and_refuses_to_overwrite(random_ckpt, tmp_path):
    with pytest.raises(FileExistsError):
        write_native(small_cfg(), random_ckpt, values="random")

    class Boom(Exception):
        pass

    import dsv4_jax.checkpoint.writer as writer

    orig = writer._RandomSource.__call__
    calls = []

    def failing(self, name, spec, expert):
        calls.append(name)
        if len(calls) > 20:
            raise Boom()
        return orig(self, name, spec, expert)

    writer._RandomSource.__call__ = failing
    try:
        with pytest.raises(Boom):
            write_native(small_cfg(), tmp_path / "x", values="random")
    finally:
        writer._RandomSource.__call__ = orig
    assert os.listdir(tmp_path) == []  # neither the folder nor a temporary one is left


# ---- validation ---------------------------------------------------------------------------------------------------


def test_all_problems_are_reported_together(ckpt_copy):
    fn = shard_of(ckpt_copy, "layers.1.attn.wq_a.weight")

    def mutate(t):
        del t["layers.1.attn.wq_a.weight"]  # missing
        t["layers.1.attn.bogus"] = np.zeros(3, np.float32)  # unexpected
        t["layers.1.attn.attn_sink"] = np.zeros(5, np.float32)  # wrong shape
        t["layers.1.attn.q_norm.weight"] = t["layers.1.attn.q_norm.weight"].astype(np.float32)  # wrong dtype

    rewrite_shard(ckpt_copy, fn, mutate)
    with pytest.raises(CheckpointError) as e:
        load(ckpt_copy)
    msg = str(e.value)
    for part in [
        "missing tensors: layers.1.attn.wq_a.weight",
        "unexpected tensors: layers.1.attn.bogus",
        "shape [5], expected [8]: layers.1.attn.attn_sink",
        "dtype F32, expected BF16: layers.1.attn.q_norm",
    ]:
        assert part in msg, (part, msg)
    assert "4 problems" in msg and fn in msg


def test_config_disagreements_are_explained(ckpt_copy):
    edit_config(ckpt_copy, n_routed_experts=2, num_hash_layers=0)
    with pytest.raises(CheckpointError) as e:
        load(ckpt_copy)
    msg = str(e.value)
    assert "layers.0 has routed experts 0..3 but the config says n_routed_experts = 2" in msg
    assert "layers.0 is hash-routed (ffn.gate.tid2eid) but the config says n_hash_layers = 0" in msg
    assert "layers.0.ffn.experts.{2..3}.w1.weight" in msg  # unexpected, folded, none left out


def test_expert_dtype_disagreement(tmp_path):
    out = write_native(small_cfg(expert_dtype="fp8"), tmp_path / "fp8", values="random")
    edit_config(out, expert_dtype="fp4")
    problems = validate(index_tensors(out), Config.from_hf(out))
    assert any("routed expert weights are ['F8_E4M3'] but the config says expert_dtype = 'fp4'" in p for p in problems)


def test_missing_mtp_is_an_error_only_when_asked_for(tmp_path):
    out = write_native(small_cfg(), tmp_path / "nomtp", values="random", mtp=False)
    with pytest.raises(CheckpointError, match=r"the MTP layer is missing .*mtp=False \(CLI: --no-mtp\)"):
        load(out)
    cfg, state = load(out, mtp=False)
    assert cfg.n_mtp_layers == 0 and "mtp" not in state.params
    assert cfg.compress_ratios == small_cfg().compress_ratios[:-1]


def test_mtp_embed_and_head_copies_are_dropped(ckpt_copy):
    fn = shard_of(ckpt_copy, "mtp.0.norm.weight")

    def add(t):
        t["mtp.0.embed.weight"] = np.zeros((4, 4), np.float32)
        t["mtp.0.head.weight"] = np.zeros((4, 4), np.float32)

    rewrite_shard(ckpt_copy, fn, add)
    assert validate(index_tensors(ckpt_copy), Config.from_hf(ckpt_copy)) == []
