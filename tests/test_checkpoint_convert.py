"""native -> Orbax -> load: bit-identical to loading the native folder, resumable, atomic, the source untouched;
the CLI (`convert`, `info`) and the embedded default checkpoint."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from ckpt_helpers import assert_same_params, small_cfg

import dsv4_jax
from dsv4_jax.checkpoint.convert import META, convert, plan_items
from dsv4_jax.checkpoint.default import ensure_default_checkpoint
from dsv4_jax.checkpoint.native import load_native
from dsv4_jax.checkpoint.restore import load
from dsv4_jax.checkpoint.writer import write_native
from dsv4_jax.cli import main


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A small model of random bytes in the released format (valid formats, finite logits)."""
    return write_native(small_cfg(), tmp_path_factory.mktemp("src") / "native", seed=0, shards=2, values="random")


@pytest.fixture(scope="module")
def converted(native, tmp_path_factory):
    return convert(native, tmp_path_factory.mktemp("dst") / "orbax", progress=False)


def _digest(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), st.st_mtime_ns)
    return out


def test_round_trip_gives_bit_identical_logits(native, converted):
    cfg_n, direct = load(native)
    cfg_o, restored = load(converted)
    assert cfg_o == cfg_n == small_cfg()
    assert_same_params(restored, direct)
    assert_same_params(direct, load_native(native))
    tokens = (np.arange(130) * 7 % cfg_n.vocab_size)[None]  # >= 128 tokens: the ratio-128 layer pools one entry
    a = np.asarray(dsv4_jax.forward(direct, tokens))
    b = np.asarray(dsv4_jax.forward(restored, tokens))
    assert np.isfinite(a).all() and a.tobytes() == b.tobytes()


def test_layout_and_metadata(converted):
    meta = json.loads(open(os.path.join(converted, META)).read())
    assert meta["format"] == "dsv4_jax.orbax" and meta["format_version"] == 1
    assert dsv4_jax.Config.from_hf(meta["config"]) == small_cfg()
    assert dsv4_jax.Config.from_hf(os.path.join(converted, "config.json")) == small_cfg()
    assert meta["items"] == [name for name, _ in plan_items(small_cfg())]
    assert {m["dtype"] for m in meta["params"].values()} == {
        "bfloat16", "float32", "float8_e4m3fn", "float8_e8m0fnu", "uint8", "int32"}  # fmt: skip
    assert meta["params"]["layers.1.ffn.experts.w1.scale"]["item"] == "layer_1/part_0"
    for item in meta["items"]:
        assert os.path.isfile(os.path.join(converted, item, "_CHECKPOINT_METADATA"))
    assert not os.path.exists(str(converted) + ".partial")


def test_parts_bound_item_size():
    cfg = dsv4_jax.Config.flash(n_layers=2, n_hash_layers=1, compress_ratios=(4, 128, 0))
    items = plan_items(cfg, 1 << 30)
    sizes = {name: sum(s.nbytes for s in specs) for name, specs in items}
    assert max(sizes.values()) <= 1 << 30
    assert sum(1 for n in sizes if n.startswith("layer_0/")) >= 4  # a 3.3 GiB layer is split
    specs = [s.key for _, sp in items for s in sp]
    assert len(specs) == len(set(specs))


def test_interrupted_conversion_resumes(native, converted, tmp_path):
    dst = tmp_path / "out"
    before = _digest(native)
    with pytest.raises(KeyboardInterrupt):
        convert(native, dst, progress=False, _stop_after=3)
    assert not dst.exists()  # nothing that looks complete
    partial = tmp_path / "out.partial"
    assert partial.exists() and not (partial / META).exists()
    first = os.stat(partial / "globals" / "part_0" / "_CHECKPOINT_METADATA").st_mtime_ns
    convert(native, dst, progress=False)
    assert os.stat(dst / "globals" / "part_0" / "_CHECKPOINT_METADATA").st_mtime_ns == first  # resumed, not redone
    assert not partial.exists()
    assert_same_params(load(dst)[1], load(converted)[1])
    assert _digest(native) == before  # the source is never modified


def test_changed_source_restarts_the_partial_conversion(native, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(native, src)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, progress=False, _stop_after=2)
    cfg_path = src / "config.json"
    cfg_path.write_text(cfg_path.read_text() + "\n")  # the source changed: the partial output is stale
    convert(src, dst, progress=False)
    assert_same_params(load(dst)[1], load(native)[1])


def test_convert_without_mtp(native, tmp_path):
    dst = convert(native, tmp_path / "nomtp", mtp=False, progress=False)
    cfg, state = load(dst)
    assert cfg.n_mtp_layers == 0 and "mtp" not in state.params
    with pytest.raises(ValueError, match="converted without the MTP layer"):
        load(dst, mtp=True)


def test_cli_convert_and_info(native, tmp_path, capsys):
    dst = tmp_path / "cli"
    assert main(["convert", str(native), str(dst), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "converted" in out and "GB/s" in out and "peak RSS" in out
    assert main(["convert", str(native), str(dst), "--quiet"]) == 2  # exists: a usage error (--overwrite)
    assert "already exists (add --overwrite to replace it)" in capsys.readouterr().err
    for path in (native, dst):
        assert main(["info", str(path)]) == 0
        out = capsys.readouterr().out
        assert "parameters:" in out and "activated per token" in out and "bytes per dtype" in out
    assert main(["info", "--preset", "flash", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert 284e9 < s["params"]["main"] < 285e9 and 13e9 < s["params"]["activated_per_token_no_embed"] < 14e9
    assert abs(s["bytes_total"] / 1e9 - 159.6) < 0.1  # the released Flash checkpoint is 159.6 GB


def test_default_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_JAX_CACHE", str(tmp_path / "cache"))
    path = ensure_default_checkpoint()
    assert path == str(tmp_path / "cache" / "orbax") and os.path.isfile(os.path.join(path, META))
    t = os.stat(os.path.join(path, META)).st_mtime_ns
    assert ensure_default_checkpoint() == path and os.stat(os.path.join(path, META)).st_mtime_ns == t  # cached
    cfg, state = load(path)
    assert cfg == dsv4_jax.Config.tiny()
    native = tmp_path / "cache" / "native"  # written from init_random(Config.tiny(), 0), kept beside
    assert_same_params(state, load_native(native))
    hf = json.loads((native / "config.json").read_text())
    assert hf["vocab_size"] == 512 and hf["num_hidden_layers"] == 6
