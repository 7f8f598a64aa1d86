"""Bad distillation inputs: data with nothing to learn, layer maps and LoRA targets that do not fit.

The layer-map and LoRA cases fail while planning, so no stage runs: ``after`` checks that.
"""

from __future__ import annotations

import json

from bad_inputs.harness import TINY_DISTILL, BadInput, Env


def distill_run(env: Env, *extra: str, student: str = "stages.student.num_layers=2") -> list[str]:
    """argv for ``slimforge run`` of the tiny student + distill recipe, two steps, no evaluation."""
    return ["run", TINY_DISTILL, f"teacher.path={env.teacher_dir}", f"data.path={env.corpus_dir}", student,
            f"run_dir={env.tmp / 'run'}", "stages.heal.steps=2", "~eval.tasks.perplexity", *extra]


def nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the error"


def no_heal_artifact(env: Env) -> None:
    assert not (env.tmp / "run" / "stages" / "heal").exists()


def no_merged_artifact(env: Env) -> None:
    assert not (env.tmp / "run" / "stages" / "merged").exists()


def questions_only(env: Env) -> list[str]:
    """Chat data whose conversations have no assistant turn: every loss-mask entry is 0."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: who wrote the sonnets, and when?"}]}
            for i in range(60)]
    path = env.tmp / "questions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return [a if not a.startswith("data.path=") else f"data.path={path}" for a in distill_run(env)]


CASES = [
    # A draft as large as its teacher (the teacher's own config, all four layers kept): refused while planning.
    BadInput("draft-not-smaller-than-its-teacher",
             lambda env: distill_run(env, "stages.heal.role=draft", student="stages.student.num_layers=4"),
             r"invalid value stages\.heal\.role='draft': the draft has [\d,]+ parameters and its teacher [\d,]+; a "
             r"draft must be much smaller than its teacher to speed it up: give the student stage smaller sizes$",
             after=nothing_ran),
    BadInput("unknown-role", lambda env: distill_run(env, "stages.heal.role=helper"),
             r"invalid value stages\.heal\.role='helper': must be one of student, draft$", after=nothing_ran),
    BadInput("chat-without-assistant-turns", questions_only,
             r"none of the \d+ training blocks has a token the loss counts .*add assistant turns",
             after=no_heal_artifact),
    BadInput("layer-map-beyond-teacher",
             lambda env: distill_run(env, "stages.heal.hidden_weight=1", "stages.heal.layer_map=[0,9]"),
             r"invalid value stages\.heal\.layer_map=\[0, 9\]: it names teacher layers \[9\], but the teacher "
             r"has 4 \(valid indices: 0\.\.3\)", after=nothing_ran),
    BadInput("layer-map-length",
             lambda env: distill_run(env, "stages.heal.hidden_weight=1", "stages.heal.layer_map=[0,1,3]"),
             r"invalid value stages\.heal\.layer_map=\[0, 1, 3\]: it needs one teacher layer per student layer: "
             r"the student has 2 layers, the map lists 3", after=nothing_ran),
    BadInput("lora-unknown-target",
             lambda env: distill_run(env, "stages.heal.lora.enabled=true", "stages.heal.lora.target_modules=[q_proj,q_prj]"),
             r"invalid value stages\.heal\.lora\.target_modules=\['q_proj', 'q_prj'\]: 'q_prj' names no linear or "
             r"embedding layer of the student \(llama\); valid names: down_proj, embed_tokens, gate_proj, k_proj, "
             r"lm_head, o_proj, q_proj, up_proj, v_proj", after=nothing_ran),
    BadInput("lora-target-not-a-layer",
             lambda env: distill_run(env, "stages.heal.lora.enabled=true", "stages.heal.lora.target_modules=[self_attn]"),
             r"stages\.heal\.lora\.target_modules=\['self_attn'\]: 'self_attn' names no linear or embedding layer",
             after=nothing_ran),
    BadInput("lora-target-of-a-fresh-student",
             lambda env: distill_run(env, "stages.heal.lora.enabled=true", "stages.heal.lora.target_modules=[qkv_proj]",
                                     "stages.student.hidden_size=16", student="student@stages.student=from_config"),
             r"stages\.heal\.lora\.target_modules=\['qkv_proj'\]: 'qkv_proj' names no linear or embedding layer "
             r"of the student \(llama\)", after=nothing_ran),
    # accelerate's FSDP plugin (accelerate launch --use_fsdp) cannot drive the trainer: it says what can.
    BadInput("accelerate-fsdp-plugin", lambda env: distill_run(env),
             r"the distillation trainer shards with FSDP itself, not through accelerate's FSDP plugin: launch with "
             r"accelerate launch --multi_gpu \(or torchrun\), without --use_fsdp, and set stages\.<name>\.sharding=fsdp$",
             after=no_heal_artifact, env={"ACCELERATE_USE_FSDP": "true"}),
    # FSDP in a single process: refused while planning, before any stage (the student's included) runs.
    BadInput("fsdp-in-one-process", lambda env: distill_run(env, "stages.heal.sharding=fsdp"),
             r"invalid value stages\.heal\.sharding='fsdp': FSDP splits the student and the teacher over several "
             r"processes, but this run has 1; launch it with torchrun --nproc_per_node N or accelerate launch "
             r"--multi_gpu --num_processes N \(N >= 2\), or set sharding=none$", after=nothing_ran),
    BadInput("fsdp-unknown-sharding", lambda env: distill_run(env, "stages.heal.sharding=zero3"),
             r"invalid value stages\.heal\.sharding='zero3': must be one of none, fsdp$", after=nothing_ran),
    BadInput("fsdp-with-on-policy",
             lambda env: distill_run(env, "stages.heal.sharding=fsdp", "stages.heal.on_policy.fraction=0.5"),
             r"invalid value stages\.heal\.on_policy\.fraction=0\.5: not supported with sharding=fsdp: ranks generate "
             r"continuations of different lengths", after=nothing_ran),
    BadInput("fsdp-with-8bit-adamw",
             lambda env: distill_run(env, "stages.heal.sharding=fsdp", "stages.heal.optimizer=adamw_8bit"),
             r"invalid value stages\.heal\.optimizer='adamw_8bit': not supported with sharding=fsdp: bitsandbytes' "
             r"8-bit AdamW does not step sharded \(DTensor\) parameters; use optimizer=adamw$", after=nothing_ran),
    BadInput("fsdp-across-tokenizers",
             lambda env: distill_run(env, "stages.heal.sharding=fsdp", "stages.heal.cross_tokenizer.loss=uld"),
             r"invalid value stages\.heal\.cross_tokenizer\.loss='uld': not supported with sharding=fsdp: distillation "
             r"across tokenizers is not wired for sharded models yet; use sharding=none \(DDP\)$", after=nothing_ran),
    BadInput("fsdp-with-qat",
             lambda env: distill_run(env, "distill@stages.heal=qat", "stages.heal.sharding=fsdp"),
             r"invalid value stages\.heal\.sharding='fsdp': qat's fake-quantized layers are not sharded; set "
             r"sharding=none \(DDP\)$", after=nothing_ran),
    BadInput("unknown-tracker", lambda env: distill_run(env, "stages.heal.trackers=[tensorboard,neptune]"),
             r"invalid value stages\.heal\.trackers=\['tensorboard', 'neptune'\]: each must be one of tensorboard, "
             r"mlflow, wandb$", after=nothing_ran),
    BadInput("seqkd-on-policy",
             lambda env: distill_run(env, "stages.heal.ce_weight=1.0", "stages.heal.on_policy.fraction=0.5"),
             r"invalid value stages\.heal\.on_policy\.fraction=0\.5: at ce_weight 1 \(sequence-level KD\) the student "
             r"would learn its own samples back; lower ce_weight below 1 or set on_policy\.fraction=0$", after=nothing_ran),
    BadInput("seqkd-teacher-cache",
             lambda env: distill_run(env, "stages.heal.ce_weight=1.0", "stages.heal.teacher_cache=true"),
             r"invalid value stages\.heal\.teacher_cache=True: at ce_weight 1 \(sequence-level KD\) training never "
             r"reads the teacher's distribution, so there is nothing to cache; set teacher_cache=false$",
             after=nothing_ran),
    BadInput("merge-without-adapter",
             lambda env: distill_run(env, "+distill@stages.merged=merge_lora", "pipeline=[student,merged]"),
             r"stages\.merged \(merge_lora\) merges a LoRA adapter into its base, but its input student \(.*\) is "
             r"not an adapter folder \(no adapter_config\.json\); put it right after a distill stage with "
             r"lora\.enabled=true", after=no_merged_artifact),
    BadInput("cross-tokenizer-unknown-loss", lambda env: distill_run(env, "stages.heal.cross_tokenizer.loss=kl"),
             r"invalid value stages\.heal\.cross_tokenizer\.loss='kl': must be one of none, uld, hybrid$",
             after=nothing_ran),
    BadInput("cross-tokenizer-with-hidden-states",
             lambda env: distill_run(env, "stages.heal.cross_tokenizer.loss=uld", "stages.heal.hidden_weight=1"),
             r"invalid value stages\.heal\.cross_tokenizer\.loss='uld': hidden-state distillation pairs positions "
             r"of one tokenization; set hidden_weight=0$", after=nothing_ran),
    BadInput("cross-tokenizer-nothing-to-train",
             lambda env: distill_run(env, "stages.heal.cross_tokenizer.loss=uld", "stages.heal.cross_tokenizer.weight=0",
                                     "stages.heal.cross_tokenizer.ce_weight=0"),
             r"invalid value stages\.heal\.cross_tokenizer\.weight=0\.0: with ce_weight 0 too, nothing would train; "
             r"set one of them > 0$",
             after=nothing_ran),
    BadInput("domain-tokenizer-too-small",
             lambda env: distill_run(env, "stages.student.tokenizer=domain_bpe", "stages.student.vocab_size=100",
                                     student="student@stages.student=from_config"),
             r"invalid value stages\.student\.vocab_size=100: must be >= 300$", after=nothing_ran),
    # A student with a tokenizer of its own, distilled without cross_tokenizer: refused before training, saying what to set.
    BadInput("own-tokenizer-without-cross-tokenizer-loss",
             lambda env: distill_run(env, "stages.student.tokenizer=domain_bpe", "stages.student.vocab_size=320",
                                     "stages.student.hidden_size=16", student="student@stages.student=from_config"),
             r"teacher and student vocabularies differ \(.*\); distillation compares per-token distributions, so "
             r"the student needs the teacher's tokenizer, or distil across tokenizers with cross_tokenizer\.loss=uld "
             r"or hybrid$", after=no_heal_artifact),
    BadInput("cache-teacher-across-tokenizers",
             lambda env: ["distill", "cache-teacher", TINY_DISTILL, f"teacher.path={env.teacher_dir}",
                          f"data.path={env.corpus_dir}", "stages.student.num_layers=2", "stages.heal.cross_tokenizer.loss=uld"],
             r"stage heal distils across tokenizers \(cross_tokenizer\.loss=uld\): its cache needs the student's own "
             r"tokenizer, so the stage builds it on first use; run the recipe with stages\.heal\.teacher_cache=true "
             r"instead$"),
    BadInput("merge-dtype",
             lambda env: distill_run(env, "+distill@stages.merged=merge_lora", "pipeline=[student,merged]",
                                     "stages.merged.dtype=int8"),
             r"invalid value stages\.merged\.dtype='int8': must be one of auto, float32, bfloat16, float16$",
             after=nothing_ran),
]
