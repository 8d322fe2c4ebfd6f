"""The sampling explorer, driven the way a reader drives it: by moving its sliders."""

import pytest
import torch

import kvlab
from conftest import make_model

pytest.importorskip("ipywidgets")
from kvlab.widgets import SamplingExplorer  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?'\n-0123456789()[]{}<>/\\|@#$%^&*+=~`\"_"


@pytest.fixture
def explorer():
    tok = kvlab.CharTokenizer.from_text(ALPHABET)
    assert tok.vocab_size <= 97
    model = make_model("gpt2", vocab_size=tok.vocab_size)
    return SamplingExplorer(model, tok, prompt="ROMEO: hello", max_new_tokens=30)


def test_top_k_slider_sets_the_number_of_bars(explorer):
    for k in (1, 5, 12):
        explorer.top_k.value = k
        assert int((explorer.probs_after > 0).sum()) == k
    explorer.top_k.value = 0
    assert torch.equal(explorer.probs_after > 0, explorer.probs_before > 0)


def test_top_k_one_generates_the_greedy_text(explorer):
    explorer.top_k.value = 1
    sampled = explorer.generate()
    explorer.top_k.value = 0
    explorer.temperature.value = 0.0
    greedy = explorer.generate()
    assert sampled == greedy and len(greedy) == 30


def test_temperature_and_top_p_change_the_distribution_and_the_text(explorer):
    explorer.seed.value = 3
    hot = (explorer.generate(), explorer.probs_after.clone())
    explorer.temperature.value = 0.3
    explorer.top_p.value = 0.5
    cold = (explorer.generate(), explorer.probs_after.clone())
    assert hot[0] != cold[0]
    assert cold[1].max() > hot[1].max()  # sharper
    tempered = kvlab.logits_to_probs(explorer._prompt_logits, temperature=0.3)
    kept = cold[1] > 0
    assert float(tempered[kept].sum()) >= 0.5  # top-p keeps at least p of the (tempered) mass
    assert float(tempered[kept].sum() - tempered[kept].min()) < 0.5  # ... and no more tokens than needed


def test_same_seed_same_text(explorer):
    explorer.seed.value = 11
    assert explorer.generate() == explorer.generate()


def test_min_p_threshold(explorer):
    explorer.min_p.value = 0.5
    p = explorer.probs_before
    assert torch.equal(explorer.probs_after > 0, p >= 0.5 * p.max())


def test_prompt_box_recomputes_and_reports_bad_text(explorer):
    before = explorer.probs_before.clone()
    explorer.prompt.value = "JULIET: good night"
    assert not torch.equal(before, explorer.probs_before)
    explorer.prompt.value = "snow ☃"  # a character the tokenizer does not know
    assert "☃" in explorer.status.value or "unknown" in explorer.status.value.lower()


def test_bad_arguments():
    tok = kvlab.CharTokenizer.from_text(ALPHABET)
    model = make_model("gpt2", vocab_size=tok.vocab_size)
    with pytest.raises(ValueError, match="prompt"):
        SamplingExplorer(model, tok, prompt="")
    with pytest.raises(ValueError, match="bars"):
        SamplingExplorer(model, tok, bars=0)
