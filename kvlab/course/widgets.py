"""Interactive sampling: sliders over a real model's next-token distribution.

`SamplingExplorer(model, tokenizer)` shows, for the prompt in its text box, the model's
next-token distribution before and after temperature / top-k / top-p / min-p, as bars with the
kept probability mass annotated, and a sampled continuation. Moving a slider redraws the
distribution at once (one cached forward pass per prompt; the filters are cheap); the
continuation is regenerated with the button, so dragging a slider never queues up slow
generations. Works in Jupyter, VS Code and Colab (ipywidgets 8). The rendered book shows the
first state of the widget; chapters put a static figure beside it. Built in chapter 7.
"""

from __future__ import annotations

import torch

from ..generation import generate
from ..sampling import logits_to_probs
from ..validation import check_positive_int

__all__ = ["SamplingExplorer"]

# The layout's sizes (see SamplingExplorer.__init__): labels up to "top-k (0=off)" fit in
# DESCRIPTION_WIDTH; the controls column is at most CONTROLS_WIDTH wide (a label, a track of
# about 220px and ipywidgets' readout); the button is never narrower than its label needs.
DESCRIPTION_WIDTH = "100px"
CONTROLS_WIDTH = "420px"
BUTTON_MIN_WIDTH = "110px"


class SamplingExplorer:
    """Sliders for temperature, top-k, top-p, min-p and a seed, a prompt box and a Generate button.

    The current state is readable from code (`probs_before`, `probs_after`, `text`), which is
    how the tests drive it: set `explorer.top_k.value = 1`, then `explorer.generate()`.
    Display it with `explorer.widget` (or just `explorer` as a cell's last line).
    """

    def __init__(self, model, tokenizer, prompt: str = "ROMEO:", *, max_new_tokens: int = 120,
                 bars: int = 25, device: torch.device | str | None = None):
        import ipywidgets as w

        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty str")
        check_positive_int("bars", bars)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else model.device
        self.bars = bars
        vocab = model.config.vocab_size
        # Sized for the narrowest place the widget is shown, the book's text column (and a Colab
        # cell beside its sidebar): every slider shows its label, its track and its value, and the
        # button its whole label. The controls take at most CONTROLS_WIDTH and shrink with the
        # column; the plot sits beside them when there is room and wraps below them when not.
        style = {"description_width": DESCRIPTION_WIDTH}
        layout = w.Layout(width="100%", min_width="0")
        # continuous_update=True: the distribution follows the slider while it moves.
        self.temperature = w.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.05, description="temperature",
                                         readout=True, readout_format=".2f", style=style, layout=layout,
                                         continuous_update=True)
        self.top_k = w.IntSlider(value=0, min=0, max=min(vocab, 200), description="top-k (0=off)",
                                 readout=True, style=style, layout=layout, continuous_update=True)
        self.top_p = w.FloatSlider(value=1.0, min=0.01, max=1.0, step=0.01, description="top-p (1=off)",
                                   readout=True, readout_format=".2f", style=style, layout=layout,
                                   continuous_update=True)
        self.min_p = w.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="min-p (0=off)",
                                   readout=True, readout_format=".2f", style=style, layout=layout,
                                   continuous_update=True)
        self.seed = w.IntText(value=0, description="seed", style=style,
                              layout=w.Layout(width="200px", min_width="160px", flex="0 1 auto"))
        self.max_new_tokens = w.IntSlider(value=max_new_tokens, min=1, max=1000, description="new tokens",
                                          readout=True, style=style, layout=layout, continuous_update=False)
        self.prompt = w.Textarea(value=prompt, description="prompt", style=style,
                                 layout=w.Layout(width="100%", min_width="0", height="60px"), continuous_update=False)
        # width "auto" sizes the button to its label, and flex "none" keeps a narrow row from
        # shrinking it (a squeezed button shows "Ge…").
        self.button = w.Button(description="Generate", button_style="primary", tooltip="sample a continuation",
                               layout=w.Layout(width="auto", min_width=BUTTON_MIN_WIDTH, flex="none"))
        self.plot_out = w.Output(layout=w.Layout(flex="1 1 360px", min_width="0", max_width="100%",
                                                 overflow="auto"))
        self.text_out = w.Output(layout=w.Layout(border="1px solid #ddd", padding="4px", width="100%"))
        self.status = w.HTML()
        self.probs_before: torch.Tensor | None = None
        self.probs_after: torch.Tensor | None = None
        self.text = ""
        self._prompt_logits: torch.Tensor | None = None
        for slider in (self.temperature, self.top_k, self.top_p, self.min_p):
            slider.observe(lambda change: self.redraw(), names="value")
        self.prompt.observe(lambda change: self._on_prompt(), names="value")
        self.button.on_click(lambda _: self.generate())
        buttons = w.HBox([self.seed, self.button], layout=w.Layout(width="100%", align_items="center",
                                                                    justify_content="space-between"))
        controls = w.VBox([self.prompt, self.temperature, self.top_k, self.top_p, self.min_p, buttons,
                           self.max_new_tokens, self.status],
                          layout=w.Layout(width=CONTROLS_WIDTH, max_width="100%", flex="0 1 auto"))
        # flex-wrap: side by side in a wide notebook, the plot below the controls in a narrow column.
        self.widget = w.VBox([w.Box([controls, self.plot_out],
                                    layout=w.Layout(display="flex", flex_flow="row wrap", align_items="flex-start",
                                                    width="100%")),
                              self.text_out], layout=w.Layout(width="100%", max_width="100%"))
        self._on_prompt()

    # -- state ---------------------------------------------------------------------------------

    def settings(self) -> dict:
        """The sampling keywords the sliders currently stand for."""
        return dict(temperature=float(self.temperature.value), top_k=int(self.top_k.value) or None,
                    top_p=float(self.top_p.value), min_p=float(self.min_p.value) or None)

    def _ids(self) -> torch.Tensor:
        ids = self.tokenizer.encode(self.prompt.value)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return torch.tensor([ids], device=self.device)

    def _on_prompt(self) -> None:
        try:
            with torch.inference_mode():
                self._prompt_logits = self.model(self._ids())[0, -1].float().cpu()  # (V,)
        except ValueError as err:  # unknown characters, empty prompt, too long...
            self._prompt_logits = None
            self.status.value = f"<span style='color:#b00'>{err}</span>"
            return
        self.status.value = ""
        self.redraw()

    # -- drawing -------------------------------------------------------------------------------

    def redraw(self) -> None:
        """Recompute the filtered distribution for the current sliders and redraw the bars."""
        if self._prompt_logits is None:
            return
        self.probs_before = logits_to_probs(self._prompt_logits)
        self.probs_after = logits_to_probs(self._prompt_logits, **self.settings())
        import matplotlib.pyplot as plt
        from IPython.display import display

        with self.plot_out:
            self.plot_out.clear_output(wait=True)
            fig = self.figure()
            display(fig)
            plt.close(fig)

    def figure(self):
        """The before/after bar chart of the `bars` most likely next tokens."""
        import matplotlib.pyplot as plt

        order = torch.argsort(self.probs_before, descending=True)[: self.bars]
        labels = [repr(self.tokenizer.decode([int(i)]))[1:-1] or "∅" for i in order]
        kept = self.probs_after > 0
        fig, ax = plt.subplots(figsize=(5.6, 3.0))
        x = torch.arange(len(order)).numpy()
        ax.bar(x - 0.2, self.probs_before[order].numpy(), width=0.4, color="#bbb", label="model")
        ax.bar(x + 0.2, self.probs_after[order].numpy(), width=0.4, color="tab:blue", label="after filters")
        ax.set_xticks(x, labels, rotation=90, fontsize=8)
        ax.set_ylabel("probability")
        mass = float(self.probs_before[kept].sum())
        ax.set_title(f"{int(kept.sum())} tokens kept, holding {mass:.1%} of the model's probability", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def generate(self) -> str:
        """Sample a continuation with the current settings and seed (CPU generator: same on any device)."""
        if self._prompt_logits is None:
            return self.text
        gen = torch.Generator().manual_seed(int(self.seed.value))
        ids = self._ids()
        n = int(self.max_new_tokens.value)
        if not self.model.can_slide:  # a RoPE model with a window generates past max_seq_len
            n = min(n, self.model.config.max_seq_len - ids.size(1))
        if n < 1:
            self.status.value = "<span style='color:#b00'>the prompt fills the model's context</span>"
            return self.text
        out = generate(self.model, ids, n, generator=gen, **self.settings())
        self.text = self.tokenizer.decode(out[0, ids.size(1):].tolist())
        with self.text_out:
            self.text_out.clear_output(wait=True)
            print(self.prompt.value + self.text)
        return self.text

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
