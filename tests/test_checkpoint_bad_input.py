"""Bad checkpoints: each gives a clear error naming the file and tensor, exit status 3 (bad input data) from the CLI,
and leaves no output behind. Only safetensors and JSON are read: pickles and code in the folder are ignored."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from ckpt_helpers import edit_config, rewrite_shard, shard_of, small_cfg

from dsv4_jax.checkpoint.layout import CheckpointError, param_table, read_param
from dsv4_jax.checkpoint.native import index_tensors
from dsv4_jax.checkpoint.restore import load
from dsv4_jax.checkpoint.writer import write_native
from dsv4_jax.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_native(small_cfg(), tmp_path_factory.mktemp("good") / "ckpt", seed=2, shards=3, values="random")


@pytest.fixture
def bad(good, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(good, dst)
    return dst


def _tensor_offset(folder, name):
    info = index_tensors(folder)[name]
    return info.file, info.start, info.nbytes


def truncate(folder):
    fn = os.path.join(folder, "model-00003-of-00003.safetensors")
    size = os.path.getsize(fn)
    with open(fn, "r+b") as f:
        f.truncate(size - 1000)
    return ["model-00003-of-00003.safetensors", "truncated"]


def corrupt_header(folder):
    fn = os.path.join(folder, "model-00002-of-00003.safetensors")
    with open(fn, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{{")
    return ["model-00002-of-00003.safetensors", "corrupted header"]


def missing_file(folder):
    os.remove(os.path.join(folder, "model-00002-of-00003.safetensors"))
    return ["model-00002-of-00003.safetensors", "does not exist"]


def wrong_dtype(folder):
    name = "layers.1.attn.attn_sink"
    rewrite_shard(folder, shard_of(folder, name), lambda t: t.__setitem__(name, t[name].astype(np.float64)))
    return [name, "dtype F64, expected F32", shard_of(folder, name)]


def nan_scale(folder):
    name = "layers.2.ffn.experts.1.w3.scale"
    fn, start, _ = _tensor_offset(folder, name)
    with open(fn, "r+b") as f:
        f.seek(start + 5)
        f.write(b"\xff")
    return [name, "0xFF", os.path.basename(fn)]


def other_model_config(folder):
    edit_config(folder, model_type="llama", architectures=["LlamaForCausalLM"])
    return ["config.json", "model_type is 'llama'"]


def other_model_tensors(folder):
    fn = shard_of(folder, "embed.weight")
    rewrite_shard(
        folder, fn, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight", np.zeros(4, np.float32))
    )
    return ["model.layers.0.self_attn.q_proj.weight", "another model type"]


def bad_index(folder):
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": {"embed.weight": "../../etc/passwd"}}')
    return ["model.safetensors.index.json", "outside the folder"]


CASES = [truncate, corrupt_header, missing_file, wrong_dtype, nan_scale, other_model_config, other_model_tensors,
         bad_index]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input(bad, tmp_path, capsys, case):
    expect = case(bad)
    dst = tmp_path / "out"
    assert main(["convert", str(bad), str(dst), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("dsv4-jax convert: error:")
    for part in expect:
        assert part in err, (part, err)
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # nothing written: no out, no out.partial
    with pytest.raises(ValueError) as e:  # the library raises the same (CheckpointError / ConfigError: ValueErrors)
        load(bad)
    assert expect[0] in str(e.value)


def test_truncated_after_the_header_was_read(bad):
    """A file that shrinks between the header check and the read: the read names the file and tensor."""
    tensors = index_tensors(bad)
    spec = next(s for s in param_table(small_cfg()) if s.key == "mtp.0.ffn.experts.w2.weight")
    fn = tensors[spec.names[-1]].file
    with open(fn, "r+b") as f:
        f.truncate(tensors[spec.names[-1]].start + 3)
    with pytest.raises(
        CheckpointError, match=rf"{os.path.basename(fn)}: tensor 'mtp.0.ffn.experts.3.w2.weight'.*truncated"
    ):
        read_param(tensors, spec)


def test_no_pickle_no_code_is_ever_used(bad, tmp_path):
    marker = tmp_path / "executed"
    for name in ("modeling_deepseek.py", "__init__.py", "configuration_deepseek.py"):
        (bad / name).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV4ForCausalLM"}
    (bad / "config.json").write_text(json.dumps(cfg))
    load(bad)
    assert main(["convert", str(bad), str(tmp_path / "o"), "--quiet"]) == 0
    assert not marker.exists()
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="neither a converted checkpoint"):
        load(only_bin)
