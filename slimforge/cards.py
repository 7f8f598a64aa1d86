"""Model cards: what an artifact is, where it came from, how good it is and how to load it.

Rendering only: :func:`render_card` turns plain dicts (an artifact's ``slimforge.json``,
its ancestors', facts about its files, an evaluation report) into a Hugging Face style
``README.md`` with YAML front matter. Reading those dicts from disk and writing the card
is :func:`slimforge.models.write_model_card`'s job, so everything here is testable
without a model or a file. What a stage says about itself (its key settings, the data it
read) comes from its method's schema (``card_settings``, ``card_data``), rebuilt from the
config its ``slimforge.json`` recorded: nothing here is specific to one method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from slimforge.config import stage_config_from_meta
from slimforge.quantize.bnb_cpu import PLAIN_PATH_SNIPPET

CARD_FILE = "README.md"
# Embedded model assets and the hub model each one packs, for ``base_model``.
ASSET_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
KIND_TAGS = {"prune": "pruned", "distill": "distilled", "quantize": "quantized", "student": "student"}
FORMAT_TAGS = {"gguf": ["gguf"], "bitsandbytes": ["bitsandbytes"], "compressed-tensors": ["compressed-tensors"],
               "lora": ["lora", "peft"]}
# What the card's "how to load" section needs installed beyond transformers, per format.
FORMAT_PACKAGES = {"bitsandbytes": ["bitsandbytes"], "compressed-tensors": ["compressed-tensors"],
                   "gguf": ["gguf"], "lora": ["peft"]}


@dataclass
class CardInput:
    """Everything a card shows, gathered by the caller.

    Attributes:
        meta: the artifact's ``slimforge.json``.
        location: where the artifact lives (used in the loading snippet).
        lineage: the stages that made it, oldest first, ending with this one; each is
            ``{"meta": <slimforge.json>, "data": <the run's data section or None>}``.
        base: the model at the root of the chain (the teacher): ``path``, and where known
            ``hub_id``, ``asset``, ``num_parameters``, ``disk_bytes``.
        files: facts read from the folder: ``format`` (hf, bitsandbytes, compressed-tensors,
            gguf, lora), ``disk_bytes`` (weight files), ``dtype``, ``gguf_file``,
            ``adapter_base``, ``num_parameters``.
        report: an evaluation report (``report.json``) that includes this model, or None.
        label: this model's name in ``report``.
        report_path: where that report lives.
    """

    meta: dict[str, Any]
    location: str
    lineage: list[dict[str, Any]] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    label: str | None = None
    report_path: str | None = None


# --- small formatting helpers ------------------------------------------------------------


def fmt_num(value: Any, digits: int = 4) -> str:
    """A compact number for a table cell; '–' for a missing one."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.3f}"
    return f"{value:.{digits}g}"


def fmt_bytes(value: Any) -> str:
    if not value:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def fmt_params(value: Any) -> str:
    if not value:
        return "–"
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    return f"{value / 1e3:.1f}K"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: str | None = None) -> list[str]:
    """A markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|",
            *["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]]


# --- lineage -----------------------------------------------------------------------------


def _data_source(data: dict[str, Any] | None, recorded: dict[str, Any] | None = None) -> str | None:
    """The run's data in a few words, from its recipe section (and, for generated text, what the artifact recorded)."""
    if not data:
        return None
    if data.get("format") == "teacher_generated":
        from slimforge.config import GenerateConfig

        source = GenerateConfig.from_record(data.get("generate") or {}).describe()
        generation = (recorded or {}).get("generation") or {}
        if generation.get("key"):
            source += f", {generation.get('kept')} kept, corpus {generation['key']}"
    else:
        source = data.get("path") or (f"asset {data['asset']}" if data.get("asset") else None)
    if source is None:
        return None
    return f"{source} (blocks of {data.get('block_size')} tokens)" if data.get("block_size") else str(source)


def stage_settings(meta: dict[str, Any]) -> str:
    """The settings that define a stage, in a few words (its schema's ``card_settings``); "" if unknown here."""
    config = stage_config_from_meta(meta)
    return ", ".join(str(p) for p in config.card_settings(meta)) if config is not None else ""


def stage_outcome(meta: dict[str, Any]) -> str:
    """What a stage measured about its result: sparsity, layers, parameters, held-out KL, bits.

    Read from the fields a stage recorded, whatever its kind: a method that records one gets its words.
    """
    metrics = meta.get("metrics") or {}
    parts: list[str] = []
    sparsity = meta.get("sparsity")
    if isinstance(sparsity, dict) and sparsity.get("overall") is not None:
        parts.append(f"{100 * sparsity['overall']:.1f}% of linear weights zero ({meta.get('pattern', 'unstructured')})")
    if meta.get("removed_layers") is not None:
        parts.append(f"removed layers {meta['removed_layers']}")
    if meta.get("dropped_layers") is not None:
        parts.append(f"kept layers {meta.get('kept_layers')} of {meta.get('layers_before')}")
    if meta.get("experts_before") is not None and meta.get("experts_before") != meta.get("experts_after"):
        parts.append(f"experts per layer {meta['experts_before']} → {meta.get('experts_after')}")
    if meta.get("top_k_before") is not None and meta.get("top_k_before") != meta.get("top_k_after"):
        parts.append(f"top-k {meta['top_k_before']} → {meta.get('top_k_after')}")
    if meta.get("parameters_before") and meta.get("parameters_after") and meta["parameters_before"] != meta["parameters_after"]:
        parts.append(f"{fmt_params(meta['parameters_before'])} → {fmt_params(meta['parameters_after'])} parameters")
    if meta.get("active_parameters_before") and meta.get("active_parameters_after"):
        parts.append(f"{fmt_params(meta['active_parameters_before'])} → "
                     f"{fmt_params(meta['active_parameters_after'])} active per token")
    if metrics.get("eval_kl") is not None:
        before = (meta.get("distill") or {}).get("before") or {}
        start = f"{fmt_num(before['eval_kl'])} → " if before.get("eval_kl") is not None else ""
        parts.append(f"held-out KL to teacher {start}{fmt_num(metrics['eval_kl'])}")
    if meta.get("bits_per_weight") is not None:
        parts.append(f"{meta['bits_per_weight']:.2f} bits/weight")
    return "; ".join(parts)


def stage_data(entry: dict[str, Any]) -> str | None:
    """The data a stage read, if it read any: calibration windows or training tokens (its schema's ``card_data``)."""
    meta = entry.get("meta") or {}
    config = stage_config_from_meta(meta)
    if config is None:
        return None
    return config.card_data(meta, _data_source(entry.get("data"), meta.get("data")) or "the run's data")


def stage_details(meta: dict[str, Any]) -> list[str]:
    """What the artifact's own stage adds to its card (its schema's ``card_details``), ending with a blank line."""
    config = stage_config_from_meta(meta)
    lines = config.card_details(meta) if config is not None else []
    return [*lines, ""] if lines else []


def _teacher_name(base: dict[str, Any]) -> str:
    """The teacher in a sentence: its hub id or path in code style, and the asset it came from."""
    name = f"`{base.get('hub_id') or base.get('path') or 'unknown'}`"
    return f"{name} (embedded asset {base['asset']})" if base.get("asset") else name


def lineage_section(inp: CardInput) -> list[str]:
    lines = ["## Lineage", ""]
    chain = " → ".join([_teacher_name(inp.base)]
                       + [f"{e['meta'].get('stage')} ({e['meta'].get('kind')}: {e['meta'].get('method')})"
                          for e in inp.lineage])
    lines += [chain, ""]
    rows: list[list[Any]] = [["0", "teacher", "–", f"`{inp.base.get('path')}`",
                              f"{fmt_params(inp.base.get('num_parameters'))} parameters"
                              if inp.base.get("num_parameters") else "–", "–"]]
    for i, entry in enumerate(inp.lineage, 1):
        meta = entry["meta"]
        rows.append([str(i), str(meta.get("stage")), f"{meta.get('kind')}: {meta.get('method')}",
                     stage_settings(meta) or "–", stage_outcome(meta) or "–", stage_data(entry) or "–"])
    lines += _table(["#", "stage", "kind: method", "key settings", "result", "data"], rows, "rlllll")
    teachers = {e["meta"].get("teacher", {}).get("path") for e in inp.lineage
                if e["meta"].get("kind") == "distill" and e["meta"].get("teacher")}
    teachers.discard(inp.base.get("path"))
    if teachers:
        lines += ["", "Distilled from: " + ", ".join(f"`{t}`" for t in sorted(t for t in teachers if t)) + "."]
    lines.append("")
    return lines


# --- size --------------------------------------------------------------------------------


def sparsity_note(lineage: list[dict[str, Any]]) -> str | None:
    """The sparsity this model carries, from the stage that set it and what came after."""
    for i in range(len(lineage) - 1, -1, -1):
        meta = lineage[i]["meta"]
        sparsity = meta.get("sparsity")
        if not (isinstance(sparsity, dict) and sparsity.get("overall") is not None):
            continue
        text = (f"{100 * sparsity['overall']:.1f}% of the decoder's linear weights "
                f"({meta.get('pattern', 'unstructured')})")
        if i == len(lineage) - 1:
            return text
        later = []
        for entry in lineage[i + 1:]:
            m = entry["meta"]
            if m.get("kind") == "distill":
                kept = (m.get("config") or {}).get("keep_sparsity")
                later.append(f"{m.get('stage')} kept the mask" if kept
                             else f"{m.get('stage')} trained every weight, so zeros may have filled in")
            else:
                later.append(f"{m.get('stage')} {KIND_TAGS.get(str(m.get('kind')), m.get('kind'))} them ({m.get('method')})")
        return f"{text} after stage {meta.get('stage')}; since then: {', '.join(later)}"
    return None


def size_section(inp: CardInput) -> list[str]:
    meta, files, base = inp.meta, inp.files, inp.base
    params = meta.get("num_parameters") or files.get("num_parameters")
    disk = files.get("disk_bytes")
    rows: list[list[Any]] = []

    def share(mine: Any, theirs: Any) -> str:
        return f"{100 * mine / theirs:.1f}%" if mine and theirs else "–"

    rows.append(["parameters", fmt_num(params), fmt_num(base.get("num_parameters")), share(params, base.get("num_parameters"))])
    active = meta.get("active_parameters")
    if active or base.get("active_parameters"):  # mixture of experts: what one token uses
        rows.append(["active parameters per token", fmt_num(active), fmt_num(base.get("active_parameters")),
                     share(active, base.get("active_parameters"))])
    label = "size on disk (weights" + (", with its base" if files.get("format") == "lora" else "") + ")"
    rows.append([label, fmt_bytes(disk), fmt_bytes(base.get("disk_bytes")), share(disk, base.get("disk_bytes"))])
    lines = ["## Size", ""] + _table(["", "this model", "teacher", "share"], rows) + [""]
    facts = []
    if meta.get("bits_per_weight") is not None:
        facts.append(f"- Bits per weight: {meta['bits_per_weight']:.2f} in the quantized layers"
                     + (f", {meta['bits_per_param']:.2f} over all parameters" if meta.get("bits_per_param") else "")
                     + ".")
    elif files.get("dtype"):
        facts.append(f"- Weights stored as {files['dtype']}.")
    note = sparsity_note(inp.lineage)
    if note:
        facts.append(f"- Sparsity: {note}.")
    return lines + facts + ([""] if facts else [])


# --- evaluation --------------------------------------------------------------------------


def result_rows(report: dict[str, Any], label: str) -> list[list[Any]]:
    """Metric, teacher, this model, retained (with its interval): one row per metric scored for both."""
    teacher_label = report.get("teacher", "teacher")
    models = report.get("models", {})
    teacher, mine = models.get(teacher_label, {}), models.get(label, {})
    intervals = report.get("retained_ci", {}).get(label, {})
    rows = []
    for key, kept in (report.get("retained", {}).get(label) or {}).items():
        if key == "size" or "." not in key:
            continue
        task, metric = key.split(".", 1)
        higher = report.get("higher_is_better", {}).get(task, {}).get(metric)
        arrow = "" if higher is None else (" ↑" if higher else " ↓")
        ci = intervals.get(key)
        kept_text = "–" if kept is None else f"{kept:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        rows.append([f"{key}{arrow}", fmt_num(teacher.get("tasks", {}).get(task, {}).get(metric)),
                     fmt_num(mine.get("tasks", {}).get(task, {}).get(metric)), kept_text])
    return rows


def fidelity_rows(report: dict[str, Any], label: str) -> list[list[Any]]:
    rows = []
    for task, fid in (report.get("fidelity", {}).get(label) or {}).items():
        for key, name in (("kl_mean", "mean KL(teacher ‖ model)"), ("top1_agreement", "top-1 agreement")):
            if fid.get(key) is not None:
                rows.append([f"{task}: {name}", fmt_num(fid[key])])
        flips = fid.get("flips")
        if isinstance(flips, dict) and flips.get("flip_rate") is not None:
            rows.append([f"{task}: answers flipped", fmt_num(flips["flip_rate"])])
    return rows


EFFICIENCY_KEYS = (("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s"),
                   ("latency_s", "latency (s)"), ("peak_memory_bytes", "peak memory"))


def efficiency_rows(report: dict[str, Any], label: str) -> list[list[Any]]:
    teacher = report.get("models", {}).get(report.get("teacher", "teacher"), {}).get("efficiency", {})
    mine = report.get("models", {}).get(label, {}).get("efficiency", {})
    rows = []
    for key, name in EFFICIENCY_KEYS:
        if mine.get(key) is None:
            continue
        show = fmt_bytes if key.endswith("_bytes") else fmt_num
        ratio = f"{mine[key] / teacher[key]:.3f}" if teacher.get(key) else "–"
        rows.append([name, show(teacher.get(key)), show(mine[key]), ratio])
    return rows


def results_section(inp: CardInput) -> list[str]:
    report, label = inp.report, inp.label
    if not report or not label or label not in report.get("models", {}):
        return ["## Evaluation", "",
                "Not evaluated yet. Score it against its teacher with `slimforge eval --teacher <teacher> "
                f"--students {inp.location}` (or a recipe's eval section), and this card gains a results table.",
                ""]
    settings = report.get("settings") or {}
    lines = ["## Evaluation", "",
             f"Against the teacher `{report.get('models', {}).get(report.get('teacher', 'teacher'), {}).get('path')}`, "
             f"with identical settings (device {settings.get('device')}, dtype {settings.get('dtype')}, "
             f"batch size {settings.get('batch_size')}, seed {settings.get('seed')}"
             + (f", {settings['limit']} items per benchmark" if settings.get("limit") else "") + "). "
             "Retained = this model / teacher (teacher / this model where lower is better, ↓); "
             "1.0 means nothing lost; brackets: 95% paired bootstrap interval.", ""]
    rows = result_rows(report, label)
    lines += _table(["metric", "teacher", "this model", "retained"], rows) if rows else ["No metric scored on both."]
    fidelity = fidelity_rows(report, label)
    if fidelity:
        lines += ["", "Fidelity to the teacher:", ""] + _table(["measure", "value"], fidelity)
    speed = efficiency_rows(report, label)
    if speed:
        lines += ["", "Speed and memory:", ""] + _table(["", "teacher", "this model", "this / teacher"], speed)
    gate = report.get("gate") or {}
    if gate.get("status") not in (None, "none"):
        mine = [f.split(": ", 1)[1] for f in gate.get("failures", []) if f.startswith(f"{label}: ")]
        # A refused threshold (a no-signal task) leaves the gate undecided for every model.
        verdict = "FAIL" if mine else "ERROR" if gate.get("status") == "error" else "PASS"
        why = mine + (gate.get("refused", []) if verdict == "ERROR" else [])
        lines += ["", f"CI gate: {verdict} for this model" + (" — " + "; ".join(why) if why else "") + "."]
    tasks = report.get("tasks") or {}
    if tasks:
        lines += ["", "Tasks: " + ", ".join(f"{name} ({t.get('items') or '?'} items)" for name, t in tasks.items()) + "."]
    if inp.report_path:
        lines += ["", f"Full report: `{inp.report_path}`."]
    lines.append("")
    return lines


# --- loading -----------------------------------------------------------------------------


def load_section(inp: CardInput) -> list[str]:
    fmt, where = inp.files.get("format", "hf"), inp.location
    packages = ["transformers", *FORMAT_PACKAGES.get(fmt, [])]
    if fmt == "lora" and (inp.files.get("adapter_base_format") == "bitsandbytes"):
        packages.append("bitsandbytes")
    lines = ["## How to load", "", f"Needs `pip install {' '.join(packages)}`.", ""]
    if fmt == "gguf":
        gguf = inp.files.get("gguf_file") or "model.gguf"
        lines += ["transformers reads the GGUF file and dequantizes it to full precision; the tokenizer "
                  "it was made with sits beside it:", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'path = "{where}"', "tokenizer = AutoTokenizer.from_pretrained(path)",
                  f'model = AutoModelForCausalLM.from_pretrained(path, gguf_file="{gguf}")', "```", "",
                  "llama.cpp runs the file as it is:", "", "```bash",
                  f'llama-cli -m {where}/{gguf} -p "Once upon a time"', "```", ""]
        return lines
    if fmt == "lora":
        reference = inp.files.get("adapter_base_reference") or inp.files.get("adapter_base")
        lines += [f"A LoRA adapter over the quantized base `{inp.files.get('adapter_base')}`, which "
                  "`adapter_config.json` names relative to this folder: move or copy the two together. peft's "
                  "`AutoPeftModelForCausalLM` reads that name relative to the current directory, so load the "
                  "base first (or ship a plain merged folder: the `merge_lora` distill stage):", "",
                  "```python", "import os", "", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'path = "{where}"', "tokenizer = AutoTokenizer.from_pretrained(path)",
                  f'base = AutoModelForCausalLM.from_pretrained(os.path.join(path, "{reference}"))',
                  "model = PeftModel.from_pretrained(base, path)",
                  *(PLAIN_PATH_SNIPPET if inp.files.get("adapter_base_format") == "bitsandbytes" else []), "```", ""]
        return lines
    note = {"bitsandbytes": "The bitsandbytes settings are in `config.json`; transformers applies them while loading.",
            "compressed-tensors": "Packed integer weights (compressed-tensors); transformers decompresses them "
                                  "while loading, and vLLM serves the folder as it is (`vllm serve " + where + "`)."}
    if fmt in note:
        lines += [note[fmt], ""]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'path = "{where}"', "tokenizer = AutoTokenizer.from_pretrained(path)",
              "model = AutoModelForCausalLM.from_pretrained(path)",
              *(PLAIN_PATH_SNIPPET if fmt == "bitsandbytes" else []),
              'inputs = tokenizer("Once upon a time", return_tensors="pt")',
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))", "```", ""]
    return lines


# --- the card ----------------------------------------------------------------------------


def front_matter(inp: CardInput) -> dict[str, Any]:
    """The YAML metadata block: library, base model, relation, tags."""
    fmt = inp.files.get("format", "hf")
    tags = ["slimforge"]
    for entry in inp.lineage:
        meta = entry["meta"]
        for tag in (KIND_TAGS.get(str(meta.get("kind"))), meta.get("method")):
            if tag and tag not in tags:
                tags.append(str(tag))
    for tag in FORMAT_TAGS.get(fmt, []):
        if tag not in tags:
            tags.append(tag)
    bits = (inp.meta.get("quantization") or {}).get("bits") or (inp.meta.get("config") or {}).get("bits")
    if bits and f"{bits}-bit" not in tags:
        tags.append(f"{bits}-bit")
    matter: dict[str, Any] = {"library_name": "peft" if fmt == "lora" else "transformers",
                              "base_model": inp.base.get("hub_id") or inp.base.get("path"),
                              "pipeline_tag": "text-generation", "tags": tags}
    last = inp.lineage[-1]["meta"].get("kind") if inp.lineage else None
    relation = "adapter" if fmt == "lora" else {"quantize": "quantized", "distill": "finetune"}.get(str(last))
    if relation:
        matter["base_model_relation"] = relation
    return matter


def render_card(inp: CardInput) -> str:
    """The model card as markdown with YAML front matter."""
    import yaml

    meta = inp.meta
    title = meta.get("stage") or "model"
    kinds = [e["meta"].get("kind") for e in inp.lineage]
    summary = (f"A {' → '.join(KIND_TAGS.get(str(k), str(k)) for k in kinds)} version of {_teacher_name(inp.base)}, "
               f"made by slimforge {meta.get('slimforge_version', '')}".rstrip() + "." if kinds else
               f"Made by slimforge {meta.get('slimforge_version', '')}.")
    head = "---\n" + yaml.safe_dump(front_matter(inp), sort_keys=False, allow_unicode=True) + "---\n"
    body = [f"# {title}", "", summary, ""]
    source = meta.get("source")
    if source and not inp.lineage:
        if isinstance(source, dict):
            source = ", ".join(f"{k} {v}" for k, v in source.items())
        body += [f"Source: {source}.", ""]
    if inp.lineage:
        body += lineage_section(inp)
    body += stage_details(meta)
    body += size_section(inp) + results_section(inp) + load_section(inp)
    files = ["`slimforge.json` (everything the stage recorded)"]
    if inp.files.get("has_recipe", True):
        files.append("`recipe.yaml` (the resolved recipe)")
    body += ["## Provenance", "", "Beside the weights: " + ", ".join(files)
             + (f". Fingerprint `{meta['fingerprint']}`." if meta.get("fingerprint") else "."), ""]
    return head + "\n" + "\n".join(body).rstrip() + "\n"
