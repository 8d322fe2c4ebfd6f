"""The sampling explorer, driven the way a reader drives it: by moving its sliders."""

import pytest
import torch

import kvlab
from conftest import make_model

pytest.importorskip("ipywidgets")
from kvlab.course.widgets import SamplingExplorer  # noqa: E402

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


def _px(value):
    assert value.endswith("px"), value
    return float(value[:-2])


def test_layout_shows_every_value_and_the_whole_button_label(explorer):
    """The book's column is narrow: nothing may be squeezed until a slider's value or the button's
    label disappears (they once read "Ge…" with no values). The browser test measures the rendered
    widget; this checks the layout settings that make it fit, in any front end."""
    from kvlab.course.widgets import BUTTON_MIN_WIDTH, CONTROLS_WIDTH, DESCRIPTION_WIDTH

    sliders = [explorer.temperature, explorer.top_k, explorer.top_p, explorer.min_p, explorer.max_new_tokens]
    longest = max(len(s.description) for s in sliders)
    assert _px(DESCRIPTION_WIDTH) >= 7.5 * longest  # ~7px per character at the widgets' 13px font
    for s in sliders:
        assert s.readout, f"{s.description}: its value is not shown"
        assert s.style.description_width == DESCRIPTION_WIDTH
        assert s.layout.width == "100%"  # follows the controls column, never a fixed width wider than it
    assert explorer.temperature.readout_format == ".2f"
    b = explorer.button
    assert b.description == "Generate" and b.layout.width == "auto" and b.layout.flex == "none"
    assert _px(b.layout.min_width) >= _px(BUTTON_MIN_WIDTH) >= 9 * len(b.description)
    # The controls: at most CONTROLS_WIDTH, never wider than the column.
    row = explorer.widget.children[0]
    controls, plot = row.children
    assert controls.layout.width == CONTROLS_WIDTH and controls.layout.max_width == "100%"
    assert "wrap" in row.layout.flex_flow  # the plot goes below the controls when the column is narrow
    seed_row = next(c for c in controls.children if b in getattr(c, "children", ()))
    assert _px(explorer.seed.layout.width) + _px(BUTTON_MIN_WIDTH) <= _px(CONTROLS_WIDTH)
    assert seed_row.layout.width == "100%"
