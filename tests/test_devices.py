"""model/devices.py: the one meaning of "auto" for devices and dtypes."""

import pytest
import torch

from model.devices import resolve_device, resolve_dtype


def test_auto_is_cuda_in_16_bits_when_present_else_cpu_in_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert resolve_dtype("auto", torch.device("cuda", 1)) == expected


def test_named_devices_and_dtypes_pass_through():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for name in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(name, torch.device("cpu")) == getattr(torch, name)


def test_bad_names_are_one_error_naming_the_value(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'cuda:1': no CUDA device is available; use cpu or auto$"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"^device 'gpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"^dtype 'fp16': expected one of auto, float32, bfloat16, float16$"):
        resolve_dtype("fp16", torch.device("cpu"))
