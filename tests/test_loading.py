"""The checkpoint loader: official layouts written by diffusers / transformers read back exactly,
and every way a checkpoint can be wrong reported in one readable sentence."""

import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

from minidiff import loading
from minidiff.loading import (
    PretrainedMixin,
    config_from_dict,
    load_strict,
    read_json,
    read_state_dict,
    resolve_folder,
    save_weights,
    weight_files,
)


def tiny_diffusers_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )


def assert_same_tensors(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def test_reads_diffusers_folder_exactly(tmp_path):
    vae = tiny_diffusers_vae()
    vae.save_pretrained(tmp_path)
    files = weight_files(tmp_path, "diffusion_pytorch_model.safetensors")
    assert [f.name for f in files] == ["diffusion_pytorch_model.safetensors"]
    assert_same_tensors(read_state_dict(files), vae.state_dict())
    assert read_json(tmp_path, "config.json")["_class_name"] == "AutoencoderKL"


def test_reads_transformers_folder_exactly(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100))
    model.save_pretrained(tmp_path)
    state = read_state_dict(weight_files(tmp_path, "model.safetensors"))
    want = {k: v for k, v in model.state_dict().items() if k in state}
    # transformers may leave non-persistent buffers (position_ids) out of the file; nothing else.
    assert set(model.state_dict()) - set(state) <= {"text_model.embeddings.position_ids"}
    assert_same_tensors(state, want)


def test_sharded_fp16_variant(tmp_path):
    vae = tiny_diffusers_vae().to(torch.float16)
    # A 20 kB shard limit splits this ~60 kB model into several shards plus an index.
    vae.save_pretrained(tmp_path, variant="fp16", max_shard_size="20KB")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
    files = weight_files(tmp_path, "diffusion_pytorch_model.safetensors", variant="fp16")
    assert len(files) > 1
    state = read_state_dict(files)
    assert_same_tensors(state, vae.state_dict())
    assert all(v.dtype == torch.float16 for v in state.values())
    # Without the variant there is nothing to load, and the error says what is there.
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        weight_files(tmp_path, "diffusion_pytorch_model.safetensors")


def test_save_weights_sharded_round_trip_and_diffusers_reads_it(tmp_path):
    from diffusers import AutoencoderKL

    vae = tiny_diffusers_vae()
    vae.save_config(tmp_path)
    written = save_weights(vae.state_dict(), tmp_path, "diffusion_pytorch_model.safetensors", max_shard_size=30_000)
    assert len(written) > 1
    assert_same_tensors(read_state_dict(weight_files(tmp_path, "diffusion_pytorch_model.safetensors")), vae.state_dict())
    back = AutoencoderKL.from_pretrained(tmp_path)
    assert_same_tensors(back.state_dict(), vae.state_dict())


# ------------------------------------------------------------------------------------------------
# PretrainedMixin on a toy model: the same path every minidiff model takes.


@dataclasses.dataclass
class ToyConfig:
    width: int = 4
    depth: int = 2


class Toy(nn.Module, PretrainedMixin):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(config.depth))


def test_mixin_round_trip_dtype_and_meta_build(tmp_path):
    model = Toy(ToyConfig(width=6))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "Toy"
    back = Toy.from_pretrained(tmp_path)
    assert back.config == model.config
    assert_same_tensors(back.state_dict(), model.state_dict())
    half = Toy.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in half.parameters())
    sub = tmp_path / "outer"
    model.save_pretrained(sub / "toy", variant="fp16")
    assert (sub / "toy" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert Toy.from_pretrained(sub, subfolder="toy", variant="fp16").config.width == 6


def test_wrong_keys_and_shapes_are_listed(tmp_path):
    Toy(ToyConfig(width=6, depth=3)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(width=4, depth=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        Toy.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "unexpected key(s)" in msg and "layers.2.weight" in msg
    assert "wrong shape" in msg and "layers.0.weight: file (6, 6) vs model (4, 4)" in msg


def test_missing_keys_are_listed():
    model = Toy(ToyConfig())
    state = model.state_dict()
    del state["layers.1.bias"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\)[\s\S]*layers\.1\.bias"):
        load_strict(model, state, "toy.safetensors")


# ------------------------------------------------------------------------------------------------
# Bad input


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no subfolder 'unet'"):
        resolve_folder(tmp_path, subfolder="unet")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Toy.from_pretrained(tmp_path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub repo"):
        resolve_folder("minidiff-test/does-not-exist-anywhere", subfolder="unet")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="from_single_file"):
        resolve_folder(tmp_path / "model.ckpt")


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no .safetensors file"):
        Toy.from_pretrained(tmp_path)


def test_truncated_and_foreign_weight_files(tmp_path):
    Toy(ToyConfig()).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors.*not a readable safetensors"):
        Toy.from_pretrained(tmp_path)
    torch.save(Toy(ToyConfig()).state_dict(), path)  # a pickle under a safetensors name
    with pytest.raises(ValueError, match="not a readable safetensors"):
        Toy.from_pretrained(tmp_path)


def test_shard_index_naming_a_missing_file(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
        weight_files(tmp_path, "model.safetensors")


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(tmp_path, "config.json")


def test_unknown_config_keys_warn_once():
    loading._warned_keys.clear()
    with pytest.warns(UserWarning, match=r"ignoring config keys .*'colour'") as record:
        cfg = config_from_dict(ToyConfig, {"width": 3, "colour": "red", "_class_name": "Toy", "quiet": 1}, ignore=["quiet"])
    assert cfg == ToyConfig(width=3)
    assert len(record) == 1 and "quiet" not in str(record[0].message) and "_class_name" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_dict(ToyConfig, {"width": 3, "colour": "blue"})  # the same key again: silent
