"""``forgetscope outputs``: output drift from responses alone (and next-token KL for local models)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from forgetscope import load_results
from forgetscope.cli import main
from forgetscope.exceptions import UsageError
from forgetscope.outputs import (
    REFUSAL_PATTERNS,
    compare_outputs,
    is_refusal,
    normalise,
    read_records,
    resolve_embedding_model,
)

PROMPTS = ["What is the capital of France?", "How do I pick a lock?", "Write a haiku about rain.", "What is 2+2?"]
BEFORE = ["The capital of France is Paris.", "Insert a tension wrench, then rake the pins.",
          "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky", "4"]
AFTER = ["the capital of France is Paris", "I'm sorry, but I can't help with that request.",
         "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky", "4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small models: OpenMP threads only add contention on a loaded 2-core machine.
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    b = _write(tmp_path / "before.jsonl", [{"id": i, "prompt": p, "response": r}
                                            for i, (p, r) in enumerate(zip(PROMPTS, BEFORE))])
    # Shuffled order and an extra unpaired record: pairing goes by id.
    recs = [{"id": i, "prompt": p, "response": r} for i, (p, r) in enumerate(zip(PROMPTS, AFTER))][::-1]
    a = _write(tmp_path / "after.jsonl", recs + [{"id": 99, "prompt": "extra", "response": "x"}])
    return b, a


def _minilm():
    path, why = resolve_embedding_model("all-MiniLM-L6-v2")
    if path is None:
        pytest.skip(f"all-MiniLM-L6-v2 not installed ({why})")
    return path


def _metric(res, name):
    return res.metric(name)["value"]


def test_identical_files_lexical(files):
    b, _ = files
    res = compare_outputs(b, b, semantic=False)
    assert _metric(res, "change_rate_exact") == 0 and _metric(res, "change_rate_normalised") == 0
    assert _metric(res, "length_chars_mean_ratio") == 1 and _metric(res, "length_words_median_ratio") == 1
    assert _metric(res, "refusal_rate") == 0
    assert math.isnan(_metric(res, "similarity_mean"))
    assert "not computed" in res.summary()


def test_changes_lengths_and_refusals_detected(files):
    b, a = files
    res = compare_outputs(b, a, semantic=False)
    m = res.meta
    assert (m["pair_key"], m["n_pairs"], m["n_unpaired_before"], m["n_unpaired_after"]) == ("id", 4, 0, 1)
    # pair 0 differs only in case/punctuation, pair 1 is a refusal, pairs 2-3 are identical.
    assert _metric(res, "change_rate_exact") == 0.5
    assert _metric(res, "change_rate_normalised") == 0.25
    pairs = {r["id"]: r for r in res.tables["pairs"].rows()}
    assert pairs["0"]["changed_exact"] and not pairs["0"]["changed_normalised"]
    assert pairs["1"]["refusal_after"] and not pairs["1"]["refusal_before"]
    assert res.metric("refusal_rate") == {"value": 0.25, "before": 0.0, "after": 0.25}
    assert _metric(res, "refusal_started_rate") == 0.25 and _metric(res, "refusal_stopped_rate") == 0
    lb = np.array([len(x) for x in BEFORE], float)
    la = np.array([len(x) for x in AFTER], float)
    assert _metric(res, "length_chars_mean_ratio") == pytest.approx(la.mean() / lb.mean())
    assert _metric(res, "length_chars_median_ratio") == pytest.approx(np.median(la) / np.median(lb))
    wb = np.array([len(x.split()) for x in BEFORE], float)
    wa = np.array([len(x.split()) for x in AFTER], float)
    assert _metric(res, "length_words_mean_ratio") == pytest.approx(wa.mean() / wb.mean())


@pytest.mark.parametrize("text,refuses", [
    ("I'm sorry, but I can't help with that.", True),
    ("I\u2019m sorry, I cannot assist with this request.", True),
    ("As an AI language model, I don't have opinions.", True),
    ("I am unable to provide that information.", True),
    ("I won't help with that.", True),
    ("That would violate my guidelines.", True),
    ("I must decline.", True),
    ("Sure! Here is the recipe you asked for.", False),
    ("The answer is 4. I can help with more maths if you like.", False),
    ("Paris. Sorry for the short answer!", False),
    ("x" * 400 + " I'm sorry, I can't help with that.", False),  # beyond the window
])
def test_refusal_patterns(text, refuses):
    assert is_refusal(text) is refuses
    assert is_refusal(text, window=None) is (refuses or text.startswith("x"))


def test_normalise():
    assert normalise("  The  Answer:\tPARIS!! ") == normalise("the answer paris")
    assert normalise("ﬁne") == "fine"  # NFKC


def test_pairing_by_prompt_aliases_and_chat(tmp_path):
    b = _write(tmp_path / "b.jsonl", [{"question": "q1", "answer": "a"}, {"question": "q1", "answer": "b"},
                                      {"input": "q2", "output": "c"}])
    a = _write(tmp_path / "a.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z"}]},
        {"prompt": "q1", "completion": "a"}, {"prompt": "q1", "completion": "B"},
    ])
    recs = read_records(a)
    assert recs[0].prompt == "user: q" and recs[0].response == "z"
    res = compare_outputs(b, a, semantic=False)
    m = res.meta
    assert (m["pair_key"], m["n_pairs"], m["n_unpaired_before"], m["n_unpaired_after"]) == ("prompt", 2, 1, 1)
    # the k-th occurrence of a repeated prompt pairs with the k-th
    assert [r["changed_exact"] for r in res.tables["pairs"].rows()] == [False, True]
    assert _metric(res, "change_rate_normalised") == 0.0


def test_bad_input_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\nnot json\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2"):
        read_records(bad)
    nofield = _write(tmp_path / "nf.jsonl", [{"prompt": "p", "reply": "r"}])
    with pytest.raises(UsageError, match="no response field"):
        read_records(nofield)
    good = _write(tmp_path / "g.jsonl", [{"prompt": "p", "response": "r"}])
    other = _write(tmp_path / "o.jsonl", [{"prompt": "other", "response": "r"}])
    with pytest.raises(UsageError, match="no record"):
        compare_outputs(good, other, semantic=False)
    assert main(["outputs", str(bad), str(good), "--no-semantic"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["outputs", str(tmp_path / "missing.jsonl"), str(good)]) == 2


def test_missing_embedding_model_falls_back_to_lexical(files, capsys):
    b, a = files
    assert main(["outputs", str(b), str(a), "--model", "no-such-embedding-model-xyz"]) == 0
    out = capsys.readouterr().out
    assert "lexical metrics only" in out and "no-such-embedding-model-xyz" in out
    assert "change_rate_exact" in out


def test_refusal_patterns_file(files, tmp_path):
    b, a = files
    pats = tmp_path / "pats.txt"
    pats.write_text("# only this one\n\\bParis\\b\n")
    out = tmp_path / "res"
    assert main(["outputs", str(b), str(a), "--no-semantic", "--refusal-patterns", str(pats), "-o", str(out),
                 "-q"]) == 0
    meta = json.loads((out / "outputs.json").read_text())
    assert meta["refusal"]["patterns"] == ["\\bParis\\b"]
    summary = load_results(out / "summary.json")
    rate = dict(zip(summary.columns["metric"], summary.columns["before"]))["refusal_rate"]
    assert rate == pytest.approx(0.25)


# --------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------------

def test_minilm_matches_sentence_transformers_reference():
    """Reference cosines from sentence-transformers 6.2.0 encoding the same texts with the same
    model (normalize_embeddings=True)."""
    pytest.importorskip("torch")
    from forgetscope.outputs import SentenceEmbedder

    emb = SentenceEmbedder(_minilm())
    texts = ["The capital of France is Paris.", "Paris is France's capital city.",
             "I'm sorry, but I can't help with that.", "A man is eating food.", "A man is eating a piece of bread."]
    e = emb.encode(texts)
    assert e.shape == (5, 384) and emb.pooling == "mean" and emb.max_length == 256
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-12)
    sim = e @ e.T
    assert sim[0, 1] == pytest.approx(0.965887, abs=2e-5)
    assert sim[3, 4] == pytest.approx(0.755337, abs=2e-5)
    assert sim[0, 2] == pytest.approx(0.037614, abs=2e-5)


def test_minilm_end_to_end_cli(files, tmp_path, capsys):
    pytest.importorskip("torch")
    _minilm()
    b, a = files
    out = tmp_path / "res"
    assert main(["outputs", str(b), str(b), "-q", "-o", str(out)]) == 0
    same = load_results(out / "pairs.json")
    np.testing.assert_allclose(same.columns["similarity"], 1.0, atol=1e-6)
    assert main(["outputs", str(b), str(a), "-o", str(out), "--format", "json", "--format", "csv"]) == 0
    text = capsys.readouterr().out
    assert "## Output drift" in text and "all-MiniLM-L6-v2" in text and "Most changed responses" in text
    pairs = {r["id"]: r for r in load_results(out / "pairs.json").rows()}
    assert pairs["1"]["similarity"] < 0.3  # the refusal
    assert pairs["0"]["similarity"] > 0.95  # case and punctuation only
    assert pairs["2"]["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert (out / "summary.csv").is_file() and (out / "summary.md").read_text().startswith("## Output drift")


# --------------------------------------------------------------------------------------------------
# Next-token KL for local models
# --------------------------------------------------------------------------------------------------

def test_next_token_kl_zero_for_identical_and_positive_for_perturbed(family_ckpt, files, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    import transformers

    from forgetscope.outputs import next_token_kl

    path = family_ckpt("llama")
    texts = ["hello world", "a longer probe text, with punctuation!", "x"]
    same = next_token_kl(path, path, texts, tokenizer=None)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    assert same["tokens"] == sum(len(t.encode()) for t in texts)

    base = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    ft = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    with torch.no_grad():
        ft.lm_head.weight.add_(0.3 * torch.randn_like(ft.lm_head.weight, generator=torch.Generator().manual_seed(0)))
    kl = next_token_kl(base, ft, texts, tokenizer=None)
    assert kl["kl_mean"] > 1e-3
    # Oracle: per-position KL with torch in float64, averaged over all tokens.
    tot, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[b % 128 for b in t.encode()]])
            lp = torch.log_softmax(base(input_ids=ids).logits.double(), -1)
            lq = torch.log_softmax(ft(input_ids=ids).logits.double(), -1)
            tot += float((lp.exp() * (lp - lq)).sum())
            n += ids.shape[1]
    assert kl["kl_mean"] == pytest.approx(tot / n, rel=1e-6)

    # CLI: identical local models → KL 0 on the paired prompts.
    b, a = files
    out = tmp_path / "kl"
    assert main(["outputs", str(b), str(a), "--no-semantic", "--base-model", str(path), "--ft-model", str(path),
                 "-o", str(out)]) == 0
    assert "next_token_kl" in capsys.readouterr().out
    summ = dict(zip(load_results(out / "summary.json").columns["metric"],
                    load_results(out / "summary.json").columns["value"]))
    assert summ["next_token_kl"] == pytest.approx(0.0, abs=1e-12)
    assert len(load_results(out / "probe_kl.json")) == 4


def test_kl_needs_both_models(files):
    b, a = files
    with pytest.raises(UsageError, match="both"):
        compare_outputs(b, a, semantic=False, base_model="x")


def test_refusal_list_is_documented():
    import forgetscope.outputs as o

    assert len(REFUSAL_PATTERNS) >= 10 and "REFUSAL_PATTERNS" in o.__doc__


def test_docstring_examples():
    import doctest

    import forgetscope.outputs as o

    r = doctest.testmod(o, optionflags=doctest.ELLIPSIS)
    assert r.attempted > 0 and r.failed == 0
