"""Strict loading in the public layout: single file, shards + index, variants, .bin, and errors that name keys."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tinybooth.checkpoint import (CheckpointError, find_weight_files, load_pretrained, read_state_dict,
                                  save_pretrained)


class Tiny(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.config = {"width": width}
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    @classmethod
    def from_config(cls, config):
        return cls(config["width"])


def write_sharded(path, state, stem="model", variant=None):
    v = f".{variant}" if variant else ""
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, shard_keys in enumerate(shards):
        name = f"{stem}{v}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in shard_keys}, str(path / name))
        weight_map.update({k: name for k in shard_keys})
    (path / f"{stem}.safetensors.index{v}.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_save_then_load_round_trip(tmp_path):
    model = Tiny(4)
    save_pretrained(model, tmp_path, model.config, "model")
    loaded = load_pretrained(Tiny, tmp_path, "model")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), f"tensor {k} changed in a save/load round trip"


def test_sharded_index_and_fp16_variant(tmp_path):
    model = Tiny(4)
    (tmp_path / "config.json").write_text(json.dumps(model.config))
    state = {k: v.half() for k, v in model.state_dict().items()}
    write_sharded(tmp_path, state, variant="fp16")
    files = find_weight_files(tmp_path, "model", variant="fp16")
    assert [f.name for f in files] == ["model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors"]
    loaded = load_pretrained(Tiny, tmp_path, "model", variant="fp16", dtype=torch.float32)
    assert loaded.proj.weight.dtype == torch.float32
    assert torch.allclose(loaded.proj.weight, model.proj.weight, atol=1e-3)
    with pytest.raises(CheckpointError, match="no weights"):
        find_weight_files(tmp_path, "model")  # only the fp16 variant exists


def test_missing_shard_is_named(tmp_path):
    write_sharded(tmp_path, Tiny(4).state_dict())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        find_weight_files(tmp_path, "model")


def test_bin_file_is_read_without_unpickling_code(tmp_path):
    torch.save(Tiny(3).state_dict(), tmp_path / "pytorch_model.bin")
    assert set(read_state_dict(find_weight_files(tmp_path, "model"))) == {"proj.weight", "proj.bias", "norm.weight",
                                                                          "norm.bias"}
    torch.save({"evil": object()}, tmp_path / "pytorch_model.bin")  # arbitrary pickled objects are refused
    with pytest.raises(CheckpointError, match="pytorch_model.bin' holds pickled Python objects, which tinybooth "
                                              "refuses to load"):
        read_state_dict(find_weight_files(tmp_path, "model"))


def test_errors_name_missing_unexpected_and_mis_shaped_keys(tmp_path):
    state = Tiny(4).state_dict()
    state.pop("norm.bias")
    state["extra.weight"] = torch.zeros(1)
    state["proj.weight"] = torch.zeros(4, 5)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"width": 4}))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(Tiny, tmp_path, "model")
    message = str(err.value)
    assert "missing (1): norm.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "proj.weight: checkpoint (4, 5) vs model (4, 4)" in message


def test_missing_directory_of_a_known_model_says_how_to_download(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist; download it with:  python weights_download.py "
                                              r"IF-II-M-v1\.0 --dir"):
        load_pretrained(Tiny, tmp_path / "IF-II-M-v1.0" / "unet", "model")
    with pytest.raises(CheckpointError, match=r"'.*nope' does not exist; check the path"):
        load_pretrained(Tiny, tmp_path / "nope", "model")


def test_local_folder_without_weights_says_what_is_missing_without_a_download_command(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"width": 4}))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(Tiny, tmp_path, "model")
    assert "no weights in" in str(err.value) and "model.safetensors" in str(err.value)
    assert "weights_download" not in str(err.value), "a user's own folder needs no download command"


def test_truncated_safetensors_names_the_file_and_says_to_download_again(tmp_path):
    model = Tiny(4)
    save_pretrained(model, tmp_path, model.config, "model")
    raw = (tmp_path / "model.safetensors").read_bytes()
    for keep in (7, len(raw) // 2):  # the header cut, then the tensors cut
        (tmp_path / "model.safetensors").write_bytes(raw[:keep])
        with pytest.raises(CheckpointError, match=r"weights file '.*model\.safetensors' is truncated or corrupt "
                                                  r"\(.*\); download it again"):
            load_pretrained(Tiny, tmp_path, "model")


def test_invalid_config_json_names_the_file_and_line(tmp_path):
    model = Tiny(4)
    save_pretrained(model, tmp_path, model.config, "model")
    (tmp_path / "config.json").write_text('{\n  "width": 4,\n}\n')
    with pytest.raises(CheckpointError, match=r"config\.json' is not valid JSON \(line 3, column 1"):
        load_pretrained(Tiny, tmp_path, "model")


def test_config_the_network_cannot_be_built_from_names_the_file(tmp_path):
    model = Tiny(4)
    save_pretrained(model, tmp_path, model.config, "model")
    (tmp_path / "config.json").write_text('{"hidden": 4}')  # Tiny.from_config needs "width": a KeyError
    with pytest.raises(CheckpointError, match=r"config\.json' does not describe a Tiny tinybooth can build "
                                              r"\(KeyError: 'width'\)"):
        load_pretrained(Tiny, tmp_path, "model")


def test_index_without_weight_map_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"width": 4}')
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"index\.json' has no \"weight_map\""):
        find_weight_files(tmp_path, "model")


def test_mismatch_is_one_line_naming_the_weight_file(tmp_path):
    state = Tiny(4).state_dict()
    state.pop("norm.bias")
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"width": 4}))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(Tiny, tmp_path, "model")
    assert "\n" not in str(err.value), "a command prints the message as one line"
    assert "(model.safetensors) built from its config.json: missing (1): norm.bias" in str(err.value)


def test_checkpoint_error_is_a_user_error():
    from tinybooth.errors import UserError
    assert issubclass(CheckpointError, UserError), "commands print UserErrors as one 'error:' line"


def test_corrupt_bin_file_is_named(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin' is truncated or corrupt \(not a file written by "
                                              r"torch\.save\); download it again"):
        read_state_dict(find_weight_files(tmp_path, "model"))
