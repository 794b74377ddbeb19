"""The bytes a checkpoint stores, read from its headers: exact for every format they describe.

A config gives shapes, not what a checkpoint holds: a GPTQ or AWQ checkpoint stores packed int32
weights with group scales and zero-points, an FP8 one float8 weights with scales, a bitsandbytes
4-bit one packed uint8 with absmax and quantization-state tensors, and each may leave layers
(embeddings, the LM head, norms) in bf16. Dividing a config's parameter count by 8 gets none of
that right. The headers do: a safetensors file starts with an 8-byte little-endian length and a
JSON table of every tensor's dtype, shape and byte range, and a GGUF file lists every tensor's
type and size. :func:`stored_weights` sums the stored bytes of every tensor, by dtype, and names
the quantization the config declares (``quantization_config``).

Sources: a local ``.safetensors`` file, a ``model.safetensors.index.json``, a folder holding
either (and its ``config.json``), a ``.gguf`` file (the optional ``gguf`` package reads its
header), or a Hugging Face Hub id ``org/model[@revision]``. For the Hub only the headers travel:
``huggingface_hub``'s ``get_safetensors_metadata`` fetches the first 100 kB of each file with an
HTTP range request (more only for a longer header), and ``config.json`` is downloaded into the
Hub cache. The Hub's conventions hold: ``HF_ENDPOINT`` (read at each call, so a mirror or a local
server works), ``HF_TOKEN`` for gated repos, ``HF_HUB_OFFLINE`` and the cache directory. Every
failure (a missing or gated repo, a wrong revision, a timeout, a truncated header) is one
``ValueError`` sentence.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .units import format_bytes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
MAX_HEADER = 100 * 2**20  # safetensors refuses headers past 100 MB


@dataclass(frozen=True)
class StoredWeights:
    """What a checkpoint stores. Sizes in bytes (of the tensor data; headers not counted)."""

    source: str
    format: str  # "safetensors" or "gguf"
    total_bytes: int
    by_dtype: dict[str, int]  # stored dtype name (safetensors' "BF16", "I32", GGUF's "Q4_K") -> bytes
    tensors: int
    quantization: str | None = None  # what the config (or the GGUF file type) declares, in words
    config: dict[str, Any] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; the config itself is left out."""
        return {
            "source": self.source,
            "format": self.format,
            "total_bytes": self.total_bytes,
            "by_dtype": dict(self.by_dtype),
            "tensors": self.tensors,
            "quantization": self.quantization,
        }

    def __str__(self) -> str:
        lines = [
            f"{self.source}: {self.tensors:,} tensors in {self.format}, {format_bytes(self.total_bytes)} "
            f"({self.total_bytes:,} bytes) stored",
            f"  quantization: {self.quantization or 'none declared'}",
        ]
        for dtype, nbytes in sorted(self.by_dtype.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {dtype:<10}{format_bytes(nbytes):>14}  ({nbytes / self.total_bytes:.1%})")
        return "\n".join(lines)


def stored_weights(source: str | os.PathLike[str], timeout: float = 10.0) -> StoredWeights:
    """The stored bytes of the checkpoint at ``source`` (see the module); ``timeout`` in seconds
    for each Hub request."""
    path = Path(source)
    if path.exists():
        return _local(path)
    text = str(source)
    match = HUB_ID.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is neither a file or folder here nor a Hub id: give a .safetensors, .gguf or "
            f"{INDEX} file, a folder with one, or org/model[@revision]"
        )
    return _hub(match["repo"], match["revision"], timeout)


# -- safetensors headers --------------------------------------------------------------------


def parse_header(blob: bytes, where: str) -> dict[str, Any]:
    """The JSON table of a safetensors file from its first bytes (the 8-byte length, then the
    table); raises a one-line ValueError for a truncated or malformed header."""
    if len(blob) < 8:
        raise ValueError(f"{where}: not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > MAX_HEADER:
        raise ValueError(f"{where}: not a safetensors file (a header of {length:,} bytes is past the format's limit)")
    if len(blob) < 8 + length:
        raise ValueError(
            f"{where}: truncated safetensors header ({len(blob) - 8:,} of its {length:,} bytes); download it again"
        )
    try:
        table = json.loads(blob[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{where}: the safetensors header is not valid JSON; the file is damaged") from None
    if not isinstance(table, dict):
        raise ValueError(f"{where}: the safetensors header is not a table of tensors")
    return table


def _read_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (length,) = struct.unpack("<Q", head)
            head += f.read(min(length, MAX_HEADER + 1))
    return parse_header(head, str(path))


def header_bytes(table: dict[str, Any], where: str) -> Iterable[tuple[str, int]]:
    """(dtype, stored bytes) of each tensor of a safetensors header table."""
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: tensor {name!r} has no dtype and data_offsets; the header is damaged") from None
        if not 0 <= start <= end:
            raise ValueError(f"{where}: tensor {name!r} has byte range {start}..{end}; the header is damaged")
        yield dtype, end - start


# -- local sources --------------------------------------------------------------------------


def _local(path: Path) -> StoredWeights:
    if path.is_dir():
        config = _read_config(path / "config.json")
        if (path / INDEX).exists():
            return _from_index(path / INDEX, config)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return _from_files(str(path), files, config)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf(ggufs[0])
        raise ValueError(f"{path}: no {INDEX}, .safetensors or single .gguf file in this folder")
    if path.name.endswith(".gguf"):
        return _gguf(path)
    config = _read_config(path.parent / "config.json")
    if path.name.endswith(".safetensors"):
        return _from_files(str(path), [path], config)
    if path.name.endswith(".json"):
        return _from_index(path, config)
    raise ValueError(f"{path}: not a .safetensors, .gguf or {INDEX} file")


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not valid JSON") from None


def _from_index(index: Path, config: dict[str, Any] | None) -> StoredWeights:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{index}: not a safetensors index (no weight_map)") from None
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ValueError(f"{index}: its shard {missing[0]} is not in {index.parent}")
    return _from_files(str(index), files, config)


def _from_files(source: str, files: list[Path], config: dict[str, Any] | None) -> StoredWeights:
    return _summed(
        source, "safetensors", (pair for f in files for pair in header_bytes(_read_header(f), str(f))), config
    )


def _summed(source: str, fmt: str, pairs: Iterable[tuple[str, int]], config: dict[str, Any] | None) -> StoredWeights:
    by_dtype: dict[str, int] = {}
    count = 0
    for dtype, nbytes in pairs:
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
        count += 1
    return StoredWeights(source, fmt, sum(by_dtype.values()), by_dtype, count, quantization_of(config), config)


def _gguf(path: Path) -> StoredWeights:
    try:
        import gguf
    except ImportError:
        raise ValueError("reading a .gguf file needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, struct.error) as err:
        raise ValueError(
            f"{path}: not a readable GGUF file ({str(err).splitlines()[0] if str(err) else 'damaged'})"
        ) from None
    pairs = [(t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors]
    kind = reader.fields.get("general.file_type")
    quant = None
    if kind is not None:
        value = int(kind.parts[kind.data[0]][0])
        try:
            quant = f"GGUF {gguf.LlamaFileType(value).name.removeprefix('MOSTLY_')}"
        except ValueError:
            quant = f"GGUF file type {value}"
    result = _summed(str(path), "gguf", pairs, None)
    return StoredWeights(result.source, "gguf", result.total_bytes, result.by_dtype, result.tensors, quant)


def quantization_of(config: dict[str, Any] | None) -> str | None:
    """The quantization a transformers ``config.json`` declares, in words (None if none)."""
    q = (config or {}).get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method", "unknown"))
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            return f"bitsandbytes 4-bit ({q.get('bnb_4bit_quant_type', 'fp4')})"
        return "bitsandbytes 8-bit" if q.get("load_in_8bit") else "bitsandbytes"
    if method in ("gptq", "awq"):
        return f"{method} {q.get('bits', '?')}-bit, group size {q.get('group_size', '?')}"
    if method == "fp8":
        block = q.get("weight_block_size")
        return "fp8" + (f", weight blocks {block[0]}x{block[1]}" if isinstance(block, list) and len(block) == 2 else "")
    return method


# -- the Hub ------------------------------------------------------------------------------


def _hub_settings() -> dict[str, Any]:
    """The Hub's environment variables, read now (huggingface_hub reads some once, at import)."""
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else None)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "cache": cache, "offline": offline}


def _hub(repo: str, revision: str | None, timeout: float) -> StoredWeights:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    env = _hub_settings()
    where = f"{repo}@{revision}" if revision else repo
    if env["offline"]:  # HF_HUB_OFFLINE: the checkpoint's files in the cache, or one line
        with _hub_errors(where, timeout):
            folder = snapshot_download(repo, revision=revision, cache_dir=env["cache"], local_files_only=True)
        local = _local(Path(folder))
        return StoredWeights(
            where, local.format, local.total_bytes, local.by_dtype, local.tensors, local.quantization, local.config
        )
    api = HfApi(endpoint=env["endpoint"], token=os.environ.get("HF_TOKEN") or None)
    with _hub_errors(where, timeout):  # config.json first: it tells a missing repo or revision apart
        config_file = hf_hub_download(
            repo,
            "config.json",
            revision=revision,
            endpoint=env["endpoint"],
            cache_dir=env["cache"],
            token=os.environ.get("HF_TOKEN") or None,
            etag_timeout=timeout,
        )
        meta = api.get_safetensors_metadata(repo, revision=revision, timeout=timeout)
    config = _read_config(Path(config_file))
    pairs = (
        (info.dtype, int(info.data_offsets[1] - info.data_offsets[0]))
        for file in meta.files_metadata.values()
        for info in file.tensors.values()
    )
    return _summed(where, "safetensors", pairs, config)


class _hub_errors:
    """Turn huggingface_hub's and the HTTP client's errors into one ValueError sentence."""

    def __init__(self, where: str, timeout: float) -> None:
        self.where, self.timeout = where, timeout

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> bool:
        if err is None:
            return False
        from huggingface_hub import errors

        name = type(err).__name__
        where = self.where
        if isinstance(err, errors.GatedRepoError):
            message = f"{where} is gated: accept its terms on the Hub and set HF_TOKEN to a token that may read it"
        elif isinstance(err, errors.RevisionNotFoundError):
            message = f"{where}: no such revision (a branch, tag or commit of the repo)"
        elif isinstance(err, errors.RepositoryNotFoundError):
            message = f"{where}: no such repo on the Hub, or a private one HF_TOKEN may not read"
        elif isinstance(err, errors.NotASafetensorsRepoError):
            message = (
                f"{where} has no model.safetensors or {INDEX}: only safetensors checkpoints are sized from the Hub"
            )
        elif isinstance(err, errors.SafetensorsParsingError):
            message = f"{where}: a safetensors header could not be read ({str(err).splitlines()[0]})"
        elif (
            isinstance(err, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError))
            and _hub_settings()["offline"]
        ):
            message = (
                f"{where}: HF_HUB_OFFLINE is set and its headers are not in the cache; unset it, or give a local folder"
            )
        elif isinstance(err, errors.LocalEntryNotFoundError):  # the Hub could not be reached, nothing cached
            message = f"{where}: the Hub could not be reached and nothing of it is in the cache ({name})"
        elif isinstance(err, TimeoutError) or "Timeout" in name:
            message = f"{where}: the Hub did not answer within {self.timeout:g} s; try again or raise the timeout"
        elif isinstance(err, errors.EntryNotFoundError):
            message = f"{where} has no config.json: a transformers checkpoint keeps one beside its weights"
        elif isinstance(err, (errors.HfHubHTTPError, OSError)) or "Connect" in name:
            first = str(err).strip().splitlines()[0] if str(err).strip() else name
            message = f"{where}: the Hub request failed ({first})"
        else:
            return False
        raise ValueError(message) from None


# -- sizing the model a checkpoint holds ----------------------------------------------------

DEQUANTIZES = {"bitsandbytes 4-bit"}  # bitsandbytes' 4-bit matmul dequantizes the whole weight (prefill)


def checkpoint_estimate(stored: StoredWeights, setup: Any) -> Any:
    """:func:`vramlab.estimate` of the model ``stored`` holds, with its stored bytes.

    Unquantized: the usual estimate of the config's architecture under ``setup`` (the recipe
    says how it is loaded), with the stored bytes in ``details``. Quantized (the config declares
    ``quantization_config``): inference only; the weights are the stored bytes, and the
    activations and KV cache are the formula's in 16-bit compute (fp16 and bf16 have the same
    sizes). For bitsandbytes 4-bit, add the bf16 copy of the largest weight that its matmul
    dequantizes during a prefill. Not counted: workspaces of the GPTQ, AWQ and FP8 kernels.
    """
    from .estimate import estimate, linear_shapes
    from .models import from_hf_config

    if stored.config is None:
        raise ValueError(f"{stored.source}: no config.json beside the weights, so its shapes are unknown")
    arch = from_hf_config(stored.config, name=stored.source)
    details = {"stored_bytes": stored.total_bytes, "quantization": stored.quantization or "none"}
    if stored.quantization is None:
        est = estimate(arch, setup)
        est.details.update(details)
        return est
    if not setup.inference:
        raise ValueError(
            f"{stored.source} is quantized ({stored.quantization}): it is sized for inference (--inference); "
            "fine-tuning a quantized base is QLoRA (`vramlab estimate MODEL --qlora RANK --checkpointing`)"
        )
    if setup.recipe not in ("fp32", "bf16"):  # fp32 is the default: no recipe was given
        raise ValueError(f"{stored.source} is quantized: its compute dtype is fixed (16-bit); drop --recipe")
    est = estimate(arch, setup.__class__(**{**setup.to_json(), "recipe": "bf16"}))
    extra = stored.total_bytes - est.breakdown["parameters"]
    if stored.quantization.startswith(tuple(DEQUANTIZES)):
        copy = 2 * max(o * i for o, i in linear_shapes(arch).values())
        details["dequantized_copy_bytes"] = copy
        extra_other = copy
    else:
        extra_other = 0
    est.breakdown["parameters"] = stored.total_bytes
    est.breakdown["other"] += extra_other
    est.peak_bytes += extra + extra_other
    est.moments = {name: total + extra + extra_other for name, total in est.moments.items()}
    est.details.update(details)
    return est
