"""Speculative decoding (slimforge/eval/speculative.py): the teacher's greedy output exactly, and the cost model."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build_model, save_sharp_teacher, sharpened

from slimforge.eval.speculative import (
    DraftHead,
    SpecStats,
    expected_tokens_per_round,
    greedy_decode,
    predicted_speedup,
    speculative_decode,
    token_counts,
)


def sharp(arch: str, tokenizer, layers: int, seed: int):
    return sharpened(build_model(arch, tokenizer, layers=layers, seed=seed), gain=4.0)


def prompt(tokenizer, text: str = "To be, or not to be, that is the question") -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize(("arch", "k"), [("llama", 1), ("llama", 5), ("mistral", 3), ("qwen3", 4), ("gemma2", 3)])
def test_output_is_the_teachers_greedy_output_in_float32(tokenizer, arch, k):
    """Mistral's sliding window (16) is shorter than prompt + 40 tokens: cutting its cache back must still work."""
    teacher = sharp(arch, tokenizer, layers=4, seed=1)
    draft = sharp(arch, tokenizer, layers=1, seed=2)
    ids = prompt(tokenizer)
    reference = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                 min_new_tokens=40, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    ours, _ = greedy_decode(teacher, ids, 40)
    assert ours == reference
    tokens, stats = speculative_decode(teacher, draft, ids, 40, k=k)
    assert tokens == reference
    assert stats.emitted == 40 and stats.accepted <= stats.drafted <= k * stats.rounds
    assert stats.rounds == 40 - stats.accepted  # every round emits its accepted drafts and one teacher token


def test_a_draft_that_is_the_teacher_is_always_accepted(tokenizer):
    teacher = sharp("llama", tokenizer, layers=2, seed=1)
    tokens, stats = speculative_decode(teacher, teacher, prompt(tokenizer), 30, k=4)
    assert tokens == greedy_decode(teacher, prompt(tokenizer), 30)[0]
    assert stats.acceptance_rate == 1.0
    assert stats.rounds == 6 and stats.tokens_per_round == 5.0  # 5 tokens a round: 4 drafts and the bonus


def test_an_unrelated_draft_is_rarely_accepted_and_still_changes_nothing(tokenizer):
    teacher = sharp("llama", tokenizer, layers=2, seed=1)
    stranger = sharp("llama", tokenizer, layers=1, seed=9)
    tokens, stats = speculative_decode(teacher, stranger, prompt(tokenizer), 30, k=4)
    assert tokens == greedy_decode(teacher, prompt(tokenizer), 30)[0]
    assert stats.acceptance_rate < 0.5


def test_decoding_stops_after_the_eos_token(tokenizer):
    teacher = sharp("llama", tokenizer, layers=2, seed=1)
    full, _ = greedy_decode(teacher, prompt(tokenizer), 30)
    eos = full[7]
    cut = full[: full.index(eos) + 1]
    assert greedy_decode(teacher, prompt(tokenizer), 30, eos_token_id=eos)[0] == cut
    draft = sharp("llama", tokenizer, layers=1, seed=2)
    assert speculative_decode(teacher, draft, prompt(tokenizer), 30, k=3, eos_token_id=eos)[0] == cut


def test_one_token_prompt_and_budget_edges(tokenizer):
    teacher = sharp("llama", tokenizer, layers=2, seed=1)
    draft = sharp("llama", tokenizer, layers=1, seed=2)
    one = prompt(tokenizer)[:, :1]
    for budget in (1, 2, 5):
        assert speculative_decode(teacher, draft, one, budget, k=4)[0] == greedy_decode(teacher, one, budget)[0]
    with pytest.raises(ValueError, match=r"k, the tokens drafted per round, must be >= 1, got 0"):
        speculative_decode(teacher, draft, one, 5, k=0)


def test_a_draft_head_over_frequent_tokens_is_the_argmax_of_those_logits(tokenizer):
    """Reference: the draft's full logits, restricted to the head's tokens, then argmax."""
    draft = sharp("llama", tokenizer, layers=1, seed=2)
    counts = token_counts(torch.randint(0, 50, (8, 16)), len(tokenizer))
    head = DraftHead.frequent(draft, counts, 40, always=(2,))
    assert head.token_ids.numel() in (40, 41) and 2 in head.token_ids.tolist()
    assert set(head.token_ids.tolist()) - {2} <= set(range(50))  # ids never seen are not kept
    ids = prompt(tokenizer)
    tokens, _ = greedy_decode(draft, ids, 12, head=head)
    context = ids
    for token in tokens:  # reference decode: full forward, full logits restricted to the head's ids
        logits = draft(context).logits[0, -1]
        assert token == int(head.token_ids[int(logits[head.token_ids].argmax())])
        context = torch.cat([context, torch.tensor([[token]])], dim=1)


@pytest.mark.parametrize("size", [16, 100])
def test_a_draft_head_changes_acceptance_only_never_the_output(tokenizer, size):
    teacher = sharp("llama", tokenizer, layers=4, seed=1)
    draft = sharp("llama", tokenizer, layers=1, seed=2)
    ids = prompt(tokenizer)
    reference = greedy_decode(teacher, ids, 30)[0]
    counts = token_counts(torch.tensor([reference]), len(tokenizer))
    head = DraftHead.frequent(draft, counts, size)
    tokens, stats = speculative_decode(teacher, draft, ids, 30, k=3, draft_head=head)
    assert tokens == reference
    assert stats.accepted <= stats.drafted
    # A draft that is the teacher, over the tokens the teacher emits: every draft is accepted.
    full = DraftHead.frequent(teacher, counts, len(set(reference)))
    assert speculative_decode(teacher, teacher, ids, 30, k=3, draft_head=full)[1].acceptance_rate == 1.0


def test_cost_model():
    for a in (0.0, 0.3, 0.75, 0.99):
        for k in (1, 4, 8):
            assert expected_tokens_per_round(a, k) == pytest.approx(sum(a**i for i in range(k + 1)))
    assert expected_tokens_per_round(1.0, 4) == 5.0
    # The example: a draft at a quarter of the teacher's cost, 70-80% acceptance, k = 4, v = 1.
    assert 1.35 < predicted_speedup(0.7, 4, 0.25) < 1.45 and 1.5 < predicted_speedup(0.8, 4, 0.25) < 1.7
    assert predicted_speedup(0.0, 4, 0.25) == pytest.approx(0.5)  # drafts that never land halve the speed
    with pytest.raises(ValueError, match=r"acceptance rate lies in \[0, 1\], got 1.5"):
        expected_tokens_per_round(1.5, 4)


def test_speculative_task_in_a_recipe_measures_each_student_as_a_draft(teacher_dir, corpus_dir, tmp_path):
    """teacher -> a 2-layer student of it; the ``speculative`` task times the teacher alone, then with the
    student drafting: identical outputs in fp32, and every figure the report needs."""
    import json
    from pathlib import Path

    from test_pipeline import tiny_args

    from slimforge import cli

    recipe = str(Path(__file__).resolve().parent / "assets" / "recipes" / "student.yaml")
    run_dir = tmp_path / "run"
    # float32 on every CPU: with native bf16, "auto" would verify in bf16, where near-ties may flip.
    args = tiny_args(teacher_dir, corpus_dir, run_dir, "dtype=float32", "+eval.tasks.spec.type=speculative",
                     "+eval.tasks.spec.prompts=2", "+eval.tasks.spec.prompt_tokens=8",
                     "+eval.tasks.spec.new_tokens=12", "+eval.tasks.spec.k=3", "+eval.tasks.spec.draft_vocab=64")
    assert cli.main(["run", recipe, *args]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    teacher = report["models"]["teacher"]["tasks"]["spec"]
    student = report["models"]["student"]["tasks"]["spec"]
    assert teacher["greedy_tokens_per_s"] > 0
    assert student["identical_outputs"] == 1.0
    assert 0 <= student["acceptance_rate"] <= 1 and 1 <= student["tokens_per_round"] <= 4
    assert student["speedup"] > 0 and student["predicted_speedup"] > 0
    assert 0 < student["draft_vocab_coverage"] <= 1
    # The report's efficiency section shows each draft's acceptance and speed-up, and whether to use it.
    md = (run_dir / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| spec | student |"))
    assert f"{100 * student['acceptance_rate']:.1f}%" in row and f"{student['speedup']:.2f}x" in row
    assert row.rstrip(" |").endswith("yes") == (student["speedup"] >= 1)



def test_draft_recipe_at_tiny_scale(tokenizer, tmp_path):
    """The shipped draft_speculative recipe on a tiny teacher with peaked distributions: its first and last
    layers distilled for 40 steps on the teacher's own generations, then measured against that draft
    undistilled by the speculative task."""
    import json

    from slimforge import cli

    teacher_dir = save_sharp_teacher(tmp_path / "teacher", tokenizer)
    run_dir = tmp_path / "run"
    args = ["run", "draft_speculative", f"teacher.path={teacher_dir}", "data.block_size=32", "dtype=float32",
            "data.generate.num_samples=32", "data.generate.max_new_tokens=48", "data.generate.batch_size=16",
            "stages.draft.steps=40", "stages.draft.batch_size=8", "stages.draft.lr=3e-3",
            "stages.draft.warmup_steps=0", "stages.draft.eval_every=40", "eval.tasks.perplexity.max_blocks=4",
            "eval.batch_size=4", "eval.tasks.speculative.prompts=4", "eval.tasks.speculative.prompt_tokens=8",
            "eval.tasks.speculative.new_tokens=16", f"run_dir={run_dir}"]
    assert cli.main(args) == 0
    report = json.loads((run_dir / "report.json").read_text())
    draft = report["models"]["draft"]["tasks"]["speculative"]
    undistilled = report["models"]["student"]["tasks"]["speculative"]
    assert draft["identical_outputs"] == undistilled["identical_outputs"] == 1.0
    for result in (draft, undistilled):
        assert 0 <= result["acceptance_rate"] <= 1 and result["speedup"] > 0 and result["predicted_speedup"] > 0
    # The recipe drafts one token and adds the context lookup's branch, verified as a tree.
    assert report["tasks"]["speculative"]["drafting"] == {"k": 1, "width": 1, "lookup": 3}
    record = json.loads((run_dir / "eval" / "draft.json").read_text())["tasks"]["speculative"]
    assert record["info"]["lookup"] == 3 and record["info"]["candidates_per_round"] >= 1
    assert draft["runner_up_share"] == 0 and 0 <= draft["lookup_share"] <= 1
    row = next(line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("| speculative | draft |"))
    # The position budget is measured on this machine (auto): none where the tiny teacher's pass is flat.
    assert re.search(r"\| k=1, 3-gram lookup(, up to \d+ positions)? \|", row)
    assert draft["positions_per_round"] >= 1
    # What the distillation optimises, on held-out teacher text: the draft moved toward the teacher. (On
    # random tiny teachers greedy continuations are too chaotic for a stable acceptance gain at this size;
    # the acceptance target is the benchmark's, on the real teacher.)
    meta = json.loads((run_dir / "stages" / "draft" / "slimforge.json").read_text())
    assert meta["config"]["role"] == "draft"
    assert meta["distill"]["history"][-1]["eval_kl"] < 0.9 * meta["distill"]["before"]["eval_kl"]


def test_per_position_acceptance_counts_only_the_judged_drafts():
    """Rounds of 4 drafts accepting 2, 0 and all 4: 6 accepted, 2 rejections (the 4 drafts after them never
    judged), so a = 6 / 8, where accepted over drafted is 6 / 12. With k = 1 the two agree."""
    stats = SpecStats(rounds=3, drafted=12, accepted=6, rejections=2)
    assert stats.position_acceptance == 0.75 and stats.acceptance_rate == 0.5
    assert SpecStats(rounds=5, drafted=5, accepted=3, rejections=2).position_acceptance == 0.6
    assert SpecStats().position_acceptance == 0.0


@pytest.mark.parametrize("k", [1, 3])
def test_decode_counts_one_rejection_per_cut_round(tokenizer, k):
    teacher = sharp("llama", tokenizer, layers=2, seed=1)
    draft = sharp("llama", tokenizer, layers=1, seed=9)
    _, stats = speculative_decode(teacher, draft, prompt(tokenizer), 30, k=k)
    cut = sum(a < k for a in stats.accepted_per_round[:-1])  # every round but the last drafts k (no EOS here)
    assert cut <= stats.rejections <= cut + 1 and cut > 0
    if k == 1:
        assert stats.position_acceptance == pytest.approx(stats.acceptance_rate)
    assert stats.position_acceptance >= stats.acceptance_rate


# A draft tree: the draft's runner-ups for the first position, verified with the chain in one pass.


@pytest.mark.parametrize(("arch", "k", "width"), [("llama", 1, 2), ("llama", 3, 3), ("qwen3", 1, 3), ("phi3", 2, 2),
                                                  ("gemma", 1, 4)])
def noisy(model, scale: float, seed: int):
    """A copy of ``model`` with Gaussian noise of ``scale`` times each weight's std: a draft that agrees with it
    often, and often only with its second or third choice."""
    import copy

    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.float().std().clamp_min(1e-3))
    return out


@pytest.mark.parametrize(("arch", "k", "width", "noise"), [("llama", 1, 2, 0.1), ("llama", 3, 3, 0.1), ("qwen3", 1, 3, 0.1),
                                                           ("phi3", 2, 2, 0.1), ("gemma", 1, 4, 2.0)])
def test_a_draft_tree_keeps_the_output_the_teachers_greedy_output_in_float32(tokenizer, arch, k, width, noise):
    """The draft is the teacher with noise (gemma's scaled norms shrug off less): right often, often only second."""
    teacher = sharp(arch, tokenizer, layers=4, seed=1)
    draft = noisy(teacher, noise, seed=3)
    ids = prompt(tokenizer)
    reference = greedy_decode(teacher, ids, 40)[0]
    tokens, stats = speculative_decode(teacher, draft, ids, 40, k=k, width=width)
    assert tokens == reference
    assert stats.emitted == 40 and stats.rounds == 40 - stats.accepted
    assert stats.drafted < stats.candidates <= stats.drafted + (width - 1) * stats.rounds
    assert stats.runner_up_accepts > 0  # some rounds went down a runner-up, and the output is still the teacher's
    plain = speculative_decode(teacher, draft, ids, 40, k=k)[1]
    assert plain.runner_up_accepts == 0 and plain.candidates == plain.drafted


def test_tree_verification_of_a_runner_up_equals_reading_it_alone(tokenizer):
    """The teacher's next token is the tree's sibling, not its chain: the verdict takes the sibling, the bonus
    token is the one the teacher gives after it alone, and the cut cache equals the cache of reading
    [last, sibling] alone (the chain's rows gathered out)."""
    from transformers import DynamicCache

    from slimforge.eval.speculative import DraftTree, _feed, _keep_path, _verify_tree

    teacher = sharp("llama", tokenizer, layers=3, seed=1)
    ids = prompt(tokenizer)
    greedy = greedy_decode(teacher, ids, 3)[0]
    wrong = (greedy[0] + 1) % len(tokenizer)
    with torch.no_grad():
        tree_cache, alone = DynamicCache(), DynamicCache()
        _feed(teacher, ids[:, :-1], tree_cache)
        _feed(teacher, ids[:, :-1], alone)
        tree = DraftTree(int(ids[0, -1]), [wrong, greedy[1]], [(greedy[0] + 2) % len(tokenizer), greedy[0]])
        path, choice = _verify_tree(teacher, tree, tree_cache)
        assert path == [4] and choice == greedy[1]
        _keep_path(tree_cache, len(tree.tokens), path)
        _feed(teacher, torch.tensor([[int(ids[0, -1]), greedy[0]]]), alone)
        assert tree_cache.get_seq_length() == alone.get_seq_length() == ids.shape[1] + 1
        for mine, theirs in zip(tree_cache.layers, alone.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)
        # And down the chain: the tree's greedy chain accepted to its end is a crop, as without siblings.
        chain_cache = DynamicCache()
        _feed(teacher, ids[:, :-1], chain_cache)
        tree = DraftTree(int(ids[0, -1]), greedy[:2], [wrong])
        path, choice = _verify_tree(teacher, tree, chain_cache)
        assert path == [1, 2] and choice == greedy[2]
        _keep_path(chain_cache, len(tree.tokens), path)
        assert chain_cache.get_seq_length() == ids.shape[1] + 2


def test_the_tree_mask_lets_each_node_see_the_cache_itself_and_its_ancestors():
    from slimforge.eval.speculative import DraftTree

    tree = DraftTree(7, [1, 2], [3, 4])  # nodes: 0 last; 1 -> 2 the chain; 3, 4 siblings of 1
    assert tree.parents == [-1, 0, 1, 0, 0] and tree.depths() == [0, 1, 2, 1, 1]
    assert tree.children(0) == {1: 1, 3: 3, 4: 4} and tree.children(1) == {2: 2} and tree.children(3) == {}
    allowed = tree.attention_mask(2, torch.float32, "cpu")[0, 0] == 0
    assert allowed.tolist() == [
        [True, True, True, False, False, False, False],
        [True, True, True, True, False, False, False],
        [True, True, True, True, True, False, False],
        [True, True, True, False, False, True, False],
        [True, True, True, False, False, False, True],
    ]


def test_a_draft_that_is_the_teacher_is_accepted_down_its_chain_with_a_tree_too(tokenizer):
    teacher = sharp("llama", tokenizer, layers=2, seed=1)
    tokens, stats = speculative_decode(teacher, teacher, prompt(tokenizer), 30, k=4, width=3)
    assert tokens == greedy_decode(teacher, prompt(tokenizer), 30)[0]
    assert stats.acceptance_rate == 1.0 and stats.runner_up_accepts == 0 and stats.rounds == 6


def test_a_tree_is_refused_where_a_sliding_window_is_shorter_than_the_decode_and_allowed_where_it_is_not(tokenizer):
    """gemma2 (window 16, eager attention with softcapping) reads the additive mask as given."""
    teacher = sharp("gemma2", tokenizer, layers=2, seed=1)
    draft = sharp("gemma2", tokenizer, layers=1, seed=2)
    ids = prompt(tokenizer)[:, :6]
    with pytest.raises(ValueError, match=r"sliding window \(16 tokens\) is shorter than the decode's 40 positions "
                                         r"\(prompt, new tokens, one round's drafts\); set width: 1 and lookup: 0"):
        speculative_decode(teacher, draft, ids, 30, k=2, width=2)
    tokens, _ = speculative_decode(teacher, draft, ids, 6, k=2, width=2)  # 6 + 6 + 2 + 2 positions: within 16
    assert tokens == greedy_decode(teacher, ids, 6)[0]
    with pytest.raises(ValueError, match=r"width, the draft's candidates for the first drafted position, must be >= 1"):
        speculative_decode(teacher, draft, ids, 8, k=2, width=0)


# A context lookup (prompt lookup): one more candidate a round, from the context's own n-grams.


def test_context_lookup_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix():
    from slimforge.eval.speculative import ContextLookup

    lookup = ContextLookup([5, 6, 7, 8, 5, 6, 9, 1, 6], max_n=3)
    assert lookup.propose(3) == [9, 1, 6]  # suffix (6,): latest earlier 6 is at index 5, followed by 9, 1, 6
    lookup.extend([9])  # suffix (6, 9) was seen: followed by 1, 6, 9
    assert lookup.propose(2) == [1, 6]
    assert lookup.propose(5) == [1, 6, 9, 1, 6]  # past the context's end: the pattern (1, 6, 9) continued
    assert ContextLookup([4, 2, 2, 2], max_n=3).propose(3) == [2, 2, 2]  # one token over and over
    lookup = ContextLookup([5, 6, 7, 5, 6, 8, 4, 6], max_n=2)
    assert lookup.propose(1) == [8]  # (4, 6) never seen; (6,) latest at index 4, followed by 8
    lookup.extend([3, 5, 6])
    assert lookup.propose(2) == [8, 4]  # (5, 6) latest earlier at 3-4 (not the suffix itself), followed by 8, 4
    assert ContextLookup([1, 2, 3], max_n=3).propose(2) == []  # nothing repeats
    assert ContextLookup([7], max_n=2).propose(2) == []


def test_attaching_a_continuation_follows_the_tree_then_adds_one_branch():
    from slimforge.eval.speculative import DraftTree

    tree = DraftTree(0, [1, 2], [3])
    assert tree.attach([1, 2]) == [] and tree.attach([]) == [] and tree.is_chain is False  # already in the tree
    assert tree.attach([1, 4, 5]) == [4, 5]  # agrees on 1, then branches: 4 under 1, 5 under 4
    assert tree.parents == [-1, 0, 1, 0, 1, 4] and tree.depths() == [0, 1, 2, 1, 2, 3]
    assert tree.children(1) == {2: 2, 4: 4} and tree.children(4) == {5: 5}
    chain = DraftTree(0, [1])
    assert chain.is_chain and chain.attach([1, 9]) == [2] and chain.depths() == [0, 1, 2]  # past the draft's chain


def test_tree_verification_down_a_lookup_branch_equals_reading_it_alone(tokenizer):
    """Chain [greedy0, wrong], lookup node greedy1 under greedy0 (node 3): the path 1 -> 3 skips node 2, so the
    cache gathers rows; they equal reading [last, greedy0, greedy1] alone."""
    from transformers import DynamicCache

    from slimforge.eval.speculative import DraftTree, _feed, _keep_path, _verify_tree

    teacher = sharp("qwen3", tokenizer, layers=3, seed=1)
    ids = prompt(tokenizer)
    greedy = greedy_decode(teacher, ids, 3)[0]
    wrong = (greedy[1] + 1) % len(tokenizer)
    with torch.no_grad():
        tree_cache, alone = DynamicCache(), DynamicCache()
        _feed(teacher, ids[:, :-1], tree_cache)
        _feed(teacher, ids[:, :-1], alone)
        tree = DraftTree(int(ids[0, -1]), [greedy[0], wrong])
        assert tree.attach(greedy[:2]) == [3]
        path, choice = _verify_tree(teacher, tree, tree_cache)
        assert path == [1, 3] and choice == greedy[2]
        _keep_path(tree_cache, len(tree.tokens), path)
        _feed(teacher, torch.tensor([[int(ids[0, -1]), *greedy[:2]]]), alone)
        for mine, theirs in zip(tree_cache.layers, alone.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "k", "width"), [("llama", 1, 1), ("llama", 3, 2), ("qwen3", 2, 1), ("phi3", 1, 2)])
def test_a_context_lookup_keeps_the_output_the_teachers_and_is_taken_where_the_output_repeats(tokenizer, arch, k, width):
    """An unrelated draft is never right, so every accepted token here is the lookup's: the tiny teacher's greedy
    output falls into loops, which the lookup follows."""
    teacher = sharp(arch, tokenizer, layers=4, seed=1)
    stranger = sharp(arch, tokenizer, layers=1, seed=9)
    ids = prompt(tokenizer)
    reference = greedy_decode(teacher, ids, 60)[0]
    tokens, stats = speculative_decode(teacher, stranger, ids, 60, k=k, width=width, lookup=3)
    assert tokens == reference
    plain = speculative_decode(teacher, stranger, ids, 60, k=k, width=width)[1]
    assert stats.lookup_accepts > 0 and plain.lookup_accepts == 0
    assert stats.lookup_tokens >= stats.lookup_accepts and stats.lookup_tokens <= stats.accepted
    assert stats.accepted > plain.accepted and stats.rounds < plain.rounds
    assert stats.rounds == 60 - stats.accepted


def test_a_perfect_draft_keeps_its_whole_chain_with_a_lookup_branch_beside_it(tokenizer):
    """The draft is the teacher: every round accepts its whole chain (so the draft's cache was kept right after
    rounds that went one deeper down the lookup's branch)."""
    teacher = sharp("llama", tokenizer, layers=4, seed=1)
    tokens, stats = speculative_decode(teacher, teacher, prompt(tokenizer), 60, k=3, lookup=3)
    assert tokens == greedy_decode(teacher, prompt(tokenizer), 60)[0]
    full = [a for a in stats.accepted_per_round[:-1]]
    assert all(a >= 3 for a in full) and stats.lookup_accepts > 0  # some rounds took a 4th token from the lookup
    with pytest.raises(ValueError, match=r"lookup, the longest n-gram a context lookup matches, must be >= 0"):
        speculative_decode(teacher, teacher, prompt(tokenizer), 4, lookup=-1)


# A position budget: the lookup's branch cut to the positions the teacher's pass reads cheaply.


def test_position_budget_is_the_knee_of_the_teachers_pass_cost():
    from slimforge.eval.speculative import position_budget

    # SmolLM2-135M on 2 CPU cores, ms for 1..8 positions: the pass jumps at 4.
    assert position_budget([27.3, 29.8, 32.7, 38.9, 41.2, 42.7, 44.6, 44.9]) == 3
    assert position_budget([10.0, 10.1, 10.3, 10.2, 10.4, 10.6]) is None  # nearly free throughout (a GPU): no cap
    assert position_budget([10.0, 10.0, 12.0, 12.0]) == 2  # the third position already costs 20% more
    assert position_budget([10.0, 10.0, 11.4, 11.45], tolerance=0.15) is None
    assert position_budget([10.0, 10.0, 11.4, 11.45], tolerance=0.1) == 2
    with pytest.raises(ValueError, match="at 1 and 2 positions"):
        position_budget([10.0])


def test_pass_costs_times_each_size_and_leaves_no_trace(tokenizer):
    from slimforge.eval.speculative import pass_costs

    teacher = sharp("llama", tokenizer, layers=2, seed=1)
    ids = prompt(tokenizer)
    before = greedy_decode(teacher, ids, 8)[0]
    costs = pass_costs(teacher, ids, max_positions=5, repeats=2)
    assert len(costs) == 5 and all(c > 0 for c in costs)
    assert greedy_decode(teacher, ids, 8)[0] == before


@pytest.mark.parametrize("k", [1, 2])
def test_a_budget_of_the_chain_alone_is_decoding_without_the_lookup(tokenizer, k):
    """With room for node 0 and the chain only, the lookup's branch is cut whole every round, so no streak
    ever starts and the decode is round for round the one without a lookup."""
    teacher = sharp("llama", tokenizer, layers=4, seed=1)
    stranger = sharp("llama", tokenizer, layers=1, seed=9)
    ids = prompt(tokenizer)
    tokens, stats = speculative_decode(teacher, stranger, ids, 60, k=k, lookup=3, budget=k + 1)
    plain_tokens, plain = speculative_decode(teacher, stranger, ids, 60, k=k)
    assert tokens == plain_tokens == greedy_decode(teacher, ids, 60)[0]
    assert stats.lookup_accepts == 0 and stats.accepted_per_round == plain.accepted_per_round
    assert max(stats.positions_per_round) == k + 1
    with pytest.raises(ValueError, match=r"budget, the most positions a round's verification may hold, must be >= 2"):
        speculative_decode(teacher, stranger, ids, 4, lookup=3, budget=1)


def test_a_budget_caps_rounds_outside_a_streak_and_keeps_the_output(tokenizer):
    """Budget 3 with k = 1: a round reads at most 3 positions unless the round before it took the lookup's
    branch to its end (a streak), which this repeating output does; the output stays the teacher's."""
    teacher = sharp("llama", tokenizer, layers=4, seed=1)
    stranger = sharp("llama", tokenizer, layers=1, seed=9)
    ids = prompt(tokenizer)
    reference = greedy_decode(teacher, ids, 60)[0]
    tokens, stats = speculative_decode(teacher, stranger, ids, 60, k=1, lookup=3, budget=3)
    free = speculative_decode(teacher, stranger, ids, 60, k=1, lookup=3)[1]
    assert tokens == reference
    assert stats.lookup_accepts > 0
    # Over 3 positions only right after a round whose path ended at the end of the lookup's branch (a streak),
    # which took at least one token.
    for before, positions in zip(stats.accepted_per_round, stats.positions_per_round[1:]):
        if positions > 3:
            assert before >= 1
    assert max(stats.positions_per_round) > 3  # streaks happen here, and the budget lets them run
    assert any(b <= 3 < f for b, f in zip(stats.positions_per_round, free.positions_per_round))  # and cut elsewhere
    assert sum(stats.positions_per_round) < sum(free.positions_per_round)



def test_the_report_table_names_the_budget_each_draft_ran_with():
    from slimforge.eval.config import SpeculativeTaskConfig
    from slimforge.eval.tables import speculative_table

    assert SpeculativeTaskConfig(budget="3").position_budget() == 3
    assert SpeculativeTaskConfig().position_budget() == "auto" and SpeculativeTaskConfig(budget=None).position_budget() is None
    result = {"acceptance_rate": 0.5, "position_acceptance": 0.6, "tokens_per_round": 1.8, "teacher_tokens_per_s": 30.0,
              "speculative_tokens_per_s": 39.0, "speedup": 1.3, "predicted_speedup": 1.28, "identical_outputs": 1.0}
    report = {"tasks": {"spec": {"type": "speculative", "drafting": {"k": 1, "width": 1, "lookup": 3}}},
              "models": {"capped": {"tasks": {"spec": {**result, "position_budget": 3.0}}},
                         "free": {"tasks": {"spec": result}}}}
    rows = {row[1]: row for row in speculative_table(report)[1]}
    assert rows["capped"][2] == "k=1, 3-gram lookup, up to 3 positions"
    assert rows["free"][2] == "k=1, 3-gram lookup"
