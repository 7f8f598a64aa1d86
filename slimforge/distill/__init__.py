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
