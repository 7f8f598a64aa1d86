"""Shared fixtures: a tiny tokenizer, tiny random models of each family, tiny corpora.

Nothing here touches the network or the user's cache: ``SLIMFORGE_CACHE`` points
at a per-session temporary folder for every test except the ``slow`` ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP's
# barriers make them many times slower; slow tests (real teacher) take the cores back.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The fast tier downloads nothing: a missing asset is an error that says how to fetch it.
# Slow tests (real teacher and data) opt back in with user_cache().
os.environ.setdefault("SLIMFORGE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The user's own cache, remembered before the tests isolate it: slow tests reuse downloads.
USER_CACHE = os.environ.get("SLIMFORGE_CACHE")

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).resolve().parent.parent

# Families the foundation must handle; each builds in well under a second.
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus_text() -> str:
    return "".join(p.read_text() for p in sorted((ASSETS / "corpus").iterdir()))


def build_tokenizer(vocab_size: int = 384, extra_text: str = ""):
    """A byte-level BPE trained on the test corpus, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([corpus_text() + extra_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, layers: int = 4):
    """A random-init config of ``arch``: hidden 32, 4 heads over 2 KV heads, ``layers`` blocks."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=arch.startswith("gemma"),
    )
    if arch in ("gemma", "gemma2", "gemma3_text", "qwen3"):
        common["head_dim"] = 8
    if arch in ("gemma2", "gemma3_text", "mistral", "qwen2"):
        common["sliding_window"] = 16
    if arch == "gemma3_text":
        common["sliding_window_pattern"] = 2
    return AutoConfig.for_model(arch, **common)


# Mixture-of-experts families (slimforge/moe.py); each builds in well under a second.
MOE_ARCHS = ("mixtral", "phimoe", "qwen2_moe", "qwen3_moe")


def tiny_moe_config(arch: str, vocab_size: int, layers: int = 4, experts: int = 4, top_k: int = 2):
    """A random-init MoE config of ``arch``: hidden 32, 4 heads over 2 KV heads, ``experts`` experts of width 48
    per layer with ``top_k`` routed per token; Qwen2-MoE adds a shared expert (width 40)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, num_experts_per_tok=top_k,
    )
    if arch in ("mixtral", "phimoe"):
        common["num_local_experts"] = experts
    else:
        common.update(num_experts=experts, moe_intermediate_size=48, norm_topk_prob=arch == "qwen3_moe")
    if arch == "qwen2_moe":
        common["shared_expert_intermediate_size"] = 40
    if arch == "qwen3_moe":
        common["head_dim"] = 8
    return AutoConfig.for_model(arch, **common)


def build_moe_model(arch: str, tokenizer, layers: int = 4, experts: int = 4, top_k: int = 2, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_moe_config(arch, len(tokenizer), layers, experts, top_k)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def build_model(arch: str, tokenizer, layers: int = 4, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), layers)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def sharpened(model, gain: float = 6.0):
    """``model`` with every weight matrix scaled by ``gain``: peaked next-token distributions, so
    distillation has signal to learn (a plain tiny random model is nearly uniform)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(gain if p.dim() > 1 else 1.0)
    return model


def save_sharp_teacher(folder, tokenizer, layers: int = 4, seed: int = 3):
    """A :func:`sharpened` tiny Llama and the tokenizer, saved in ``folder``."""
    sharpened(build_model("llama", tokenizer, layers=layers, seed=seed)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sharp_teacher(tmp_path_factory, tokenizer):
    """A 4-layer tiny Llama with peaked next-token distributions: the distillation tests' teacher."""
    return save_sharp_teacher(tmp_path_factory.mktemp("sharp-teacher"), tokenizer)


@pytest.fixture(autouse=True)
def _threads_for_real_models(request):
    """Real-teacher tests use every core; the tiny-model tier runs single-threaded."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(previous)


def _expose_installed_runtimes() -> None:
    """Point the runtime variables at the user's cached vLLM and llama.cpp builds, if any.

    The tests run on an empty cache of their own; the runtimes are a one-time install
    (``slimforge runtime install``) that tests may use where it exists, like the slow tier's teacher.
    """
    from slimforge.runtimes.install import find_llamacpp, find_vllm

    for variable, find in (("SLIMFORGE_LLAMACPP_BIN", find_llamacpp), ("SLIMFORGE_VLLM_PYTHON", find_vllm)):
        if not os.environ.get(variable) and (found := find()) is not None:
            os.environ[variable] = str(found.path)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory, request):
    """Keep tests out of the user's cache (slow tests opt back in to reuse downloads)."""
    _expose_installed_runtimes()
    cache = tmp_path_factory.mktemp("slimforge-cache")
    previous = os.environ.get("SLIMFORGE_CACHE")
    os.environ["SLIMFORGE_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("SLIMFORGE_CACHE", None)
    else:
        os.environ["SLIMFORGE_CACHE"] = previous


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """arch -> folder holding a saved tiny model of that family plus the tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for arch in ARCHS:
        folder = root / arch
        build_model(arch, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[arch] = folder
    return out


@pytest.fixture(scope="session")
def teacher_dir(model_dirs):
    """The default tiny teacher: a 4-layer Llama."""
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def corpus_dir():
    return ASSETS / "corpus"


@pytest.fixture()
def chat_file(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Who wrote the sonnets?"},
                      {"role": "assistant", "content": "William Shakespeare wrote them."}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Name a king."},
                      {"role": "assistant", "content": "Lear."},
                      {"role": "user", "content": "And his daughters?"},
                      {"role": "assistant", "content": "Goneril, Regan and Cordelia."}]},
    ] * 40
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@contextlib.contextmanager
def user_cache():
    """Point SLIMFORGE_CACHE back at the user's cache, so tests of the real assets reuse downloads."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SLIMFORGE_OFFLINE", "0")
    if USER_CACHE:
        mp.setenv("SLIMFORGE_CACHE", USER_CACHE)
    else:
        mp.delenv("SLIMFORGE_CACHE", raising=False)
    try:
        yield
    finally:
        mp.undo()


def cli_env() -> dict[str, str]:
    """Environment for a ``slimforge`` subprocess: same cache, offline hub, repo importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600):
    """Run the real ``slimforge`` entry point in a subprocess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "slimforge", *args], capture_output=True, text=True,
                          env=cli_env(), cwd=cwd, timeout=timeout)
