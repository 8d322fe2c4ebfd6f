"""Plots: the KV dashboard records what the model really attends to."""

import pytest
import torch
from PIL import Image

from conftest import make_model
from kvlab.viz import animate_kv_dashboard, attention_heatmap, kv_dashboard_frames


@pytest.mark.parametrize("kind, window", [("static", None), ("dynamic", None), ("sliding", 5)])
def test_dashboard_frames_follow_the_cache(kind, window):
    model = make_model("modern")
    idx = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(0))
    frames = kv_dashboard_frames(model, idx, 12, layer=1, head=3, kind=kind, window=window)
    assert [f["position"] for f in frames] == list(range(4, 16))
    for f in frames:
        assert torch.isclose(f["weights"].sum(), torch.tensor(1.0))
        valid = f["key_pos"] >= 0
        if window:
            valid &= f["key_pos"] > f["position"] - window
        assert (f["weights"][~valid] == 0).all() and (f["weights"][valid] > 0).all()
        assert f["k"].shape == (f["key_pos"].numel(), 8)
    assert "attend_and_project" not in vars(model.blocks[1].attn), "the recording hook was not removed"


def test_dashboard_weights_match_the_model_output():
    # The head's output rebuilt from the recorded weights and values must equal what the
    # attention layer really computed (the input of its output projection): the frames show
    # what the model used, not a re-derivation of it.
    model = make_model("modern")
    idx = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    seen = []
    model.blocks[0].attn.out.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    frames = kv_dashboard_frames(model, idx, 3, layer=0, head=3)
    D = model.config.head_dim
    for f, merged in zip(frames, seen[1:]):  # seen[0] is the prefill
        torch.testing.assert_close(f["weights"] @ f["v"], merged[0, -1, 3 * D:4 * D], atol=1e-5, rtol=1e-5)


def test_animation_writes_a_gif_with_one_frame_per_step(tmp_path):
    model = make_model("gpt2")
    frames = kv_dashboard_frames(model, torch.zeros(1, 3, dtype=torch.long), 4)
    path = tmp_path / "kv.gif"
    animate_kv_dashboard(frames, str(path))
    assert Image.open(path).n_frames == 4


def test_bad_arguments():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="shape \\(1, T\\)"):
        kv_dashboard_frames(model, torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="layer must be in"):
        kv_dashboard_frames(model, torch.zeros(1, 3, dtype=torch.long), 2, layer=5)
    with pytest.raises(ValueError, match="frames is empty"):
        animate_kv_dashboard([])
    with pytest.raises(ValueError, match="matrix"):
        attention_heatmap(torch.zeros(2, 2, 2))
