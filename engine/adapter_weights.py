"""An adapter's weight file decoded into named tensors: safetensors, or PEFT's older PyTorch `.bin`.

PEFT writes `adapter_model.safetensors` (the default since PEFT 0.6) or, with
`safe_serialization=False` and in older versions, `adapter_model.bin` (a `torch.save` zip
archive). When a directory has both, PEFT reads the safetensors file and so does the engine.

A `.bin` is a pickle, and a pickle can name any function to call while it is read. It is decoded
with `torch.load(weights_only=True)`, whose unpickler builds only tensors and plain containers
and refuses every other global before calling anything: a file that would run code is refused
and nothing in it runs. Before that, the zip archive's directory is checked without unpickling:
only the format `torch.save` writes (zip, entries stored uncompressed) is read, so what is
decoded is never larger than the file, which the caller has already bounded (a compressed entry
could expand far past it; the pre-1.6 legacy format, which PEFT never wrote, declares its
storage sizes in the pickle itself). The result must be a flat dict of names to dense CPU
tensors; anything else is refused. Every refusal is a ValueError naming the file.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile

import torch
from safetensors.torch import load as load_safetensors

SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, BIN_FILE)  # PEFT's order of preference
# torch's weights-only unpickler names what it refused as "GLOBAL module.name".
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _first_line(text: object, limit: int = 120) -> str:
    first = str(text).strip().splitlines()[0] if str(text).strip() else type(text).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def decode_weights(name: str, data: bytes) -> dict[str, torch.Tensor]:
    """The tensors in weight file `name` (one of WEIGHT_FILES), read from its bytes."""
    if name == BIN_FILE:
        return _decode_torch_bin(data)
    try:
        return load_safetensors(data)
    except Exception as exc:  # safetensors' own errors differ across versions; the file is untrusted input
        raise ValueError(f"{name} is not a readable safetensors file (corrupt header?): {_first_line(exc)}") from exc


def _check_archive(data: bytes) -> None:
    """Only what torch.save writes: a zip archive whose entries are stored, never compressed."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ValueError(f"{BIN_FILE} is not a PyTorch checkpoint (the zip archive torch.save writes; the legacy "
                         f"pre-1.6 format and bare pickles are not read)") from exc
    with archive:
        entries = archive.infolist()
    if not any(entry.filename.endswith("data.pkl") for entry in entries):
        raise ValueError(f"{BIN_FILE} is a zip archive but not a PyTorch checkpoint (it has no data.pkl)")
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{BIN_FILE}: entry {_first_line(entry.filename, 80)!r} is compressed; torch.save stores "
                             f"every entry uncompressed (a compressed one could expand past the size limit)")
    if sum(entry.file_size for entry in entries) > len(data):
        raise ValueError(f"{BIN_FILE}: its zip directory declares more bytes than the file holds (corrupt archive)")


def _decode_torch_bin(data: bytes) -> dict[str, torch.Tensor]:
    _check_archive(data)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        what = f"refers to {refused.group(1)}, which is" if refused else "holds something that is"
        raise ValueError(f"{BIN_FILE} is refused: its pickle {what} neither a tensor nor a plain container "
                         f"(the file is read as weights only; nothing in it was run)") from exc
    except Exception as exc:  # torch's reader raises RuntimeError, EOFError, ...; the file is untrusted input
        raise ValueError(f"{BIN_FILE} is not a readable PyTorch checkpoint: {_first_line(exc)}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"{BIN_FILE} must hold a dict of tensor names to tensors (a state dict), "
                         f"got {type(loaded).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise ValueError(f"{BIN_FILE}: key {_first_line(repr(key), 80)} is not a string (the keys of a state dict "
                             f"are tensor names)")
        where = f"{BIN_FILE}: {_first_line(repr(key), 100)}"
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where} holds a value of type {type(value).__name__}, not a tensor")
        # An nn.Parameter comes back as one (requires_grad set): keep the plain tensor only.
        value = value.detach()
        if type(value) is not torch.Tensor or value.layout != torch.strided or value.device.type != "cpu":
            raise ValueError(f"{where} is not a dense tensor ({type(value).__name__}, layout "
                             f"{str(value.layout).removeprefix('torch.')}, device {value.device.type})")
        tensors[key] = value
    return tensors
