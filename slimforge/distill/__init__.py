"""Knowledge distillation, and the ways a student is initialised.

This module only declares registry entries; implementations load on first use.
"""

from slimforge.registry import register

register(
    "student", "drop_layers",
    "slimforge.distill.students:drop_layers_stage", "slimforge.distill.config:DropLayersConfig",
    "student = the teacher with decoder layers dropped (evenly spaced, or an explicit list)",
)
register(
    "student", "checkpoint",
    "slimforge.distill.students:checkpoint_stage", "slimforge.distill.config:CheckpointStudentConfig",
    "student = an existing checkpoint that shares the teacher's tokenizer",
)
register(
    "student", "from_config",
    "slimforge.distill.students:from_config_stage", "slimforge.distill.config:FromConfigStudentConfig",
    "student = a fresh model from the teacher's config with smaller sizes (random init)",
)
register(
    "distill", "kd",
    "slimforge.distill.stages:distill_stage", "slimforge.distill.config:DistillConfig",
    "logit (+ hidden-state) distillation from the live teacher or its top-k cache; LoRA/QLoRA; on-policy",
)
register(
    "distill", "merge_lora",
    "slimforge.distill.merge:merge_lora_stage", "slimforge.distill.config:MergeLoraConfig",
    "merge a LoRA adapter (a QLoRA distillation) into its dequantized base: a plain folder, or re-quantized "
    "as the base",
)
register(
    "distill", "qat",
    "slimforge.distill.qat:qat_stage", "slimforge.distill.config:QatConfig",
    "quantization-aware distillation: fake-quantized linears with learned (LSQ) scales, initialised from a "
    "GPTQ/AWQ/RTN parent, trained by KD and exported onto the same integer grid",
)
