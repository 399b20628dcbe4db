import dataclasses
import pickle

import pytest
import torch

import attribkit as ak


def test_defaults():
    cfg = ak.ComputeConfig()
    assert (cfg.device, cfg.dtype, cfg.batch_size, cfg.progress) == ("cpu", "float32", 64, "auto")
    assert cfg.memory_budget == 2 * 2**30
    assert cfg.torch_dtype is torch.float32 and cfg.torch_device == torch.device("cpu")


def test_frozen_hashable_picklable():
    cfg = ak.ComputeConfig(dtype=torch.float64, batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 3
    assert cfg.dtype == "float64"  # torch.dtype normalised to its name
    assert cfg == ak.ComputeConfig(dtype="float64", batch_size=8)
    assert hash(cfg) == hash(ak.ComputeConfig(dtype="float64", batch_size=8))
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_auto_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ak.ComputeConfig(device="auto").torch_device.type == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device": "tpu"}, "'device'"),
        ({"dtype": "int8"}, "'dtype'"),
        ({"dtype": torch.int32}, "'dtype'"),
        ({"batch_size": 0}, "'batch_size'"),
        ({"batch_size": 2.5}, "'batch_size'"),
        ({"progress": "yes"}, "'progress'"),
        ({"memory_budget": -1}, "'memory_budget'"),
    ],
)
def test_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ak.ComputeConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda():
    with pytest.raises(ValueError, match="not available"):
        ak.ComputeConfig(device="cuda:0")


def test_progress_flag():
    assert ak.ComputeConfig(progress=True).show_progress is True
    assert ak.ComputeConfig(progress=False).show_progress is False


@pytest.mark.parametrize("value", ["auto", True, False])
def test_distributed_field_stores_only_the_setting(value):
    cfg = ak.ComputeConfig(distributed=value)
    assert cfg.distributed is value or cfg.distributed == value
    assert ak.ComputeConfig().distributed == "auto"
    back = pickle.loads(pickle.dumps(cfg))  # no process group inside, only the setting
    assert back == cfg and back.distributed == value


@pytest.mark.parametrize("value", ["yes", 1, 0, None, "True"])
def test_bad_distributed_field(value):
    with pytest.raises(ValueError, match="'distributed' field of ComputeConfig must be True"):
        ak.ComputeConfig(distributed=value)
