"""Chapter 10's measurements: speculative decoding against plain greedy, the int8 cache against
the float one, and beam search against greedy on chapter 8's toy tasks; `beyond` runs them all
(`python -m kvlab.bench --beyond`). Measurement lives here, not in the modules that build the
pieces (`kvlab.speculative`, `kvlab.quantized`, `kvlab.beam`). Built in chapter 10.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F
from torch import Tensor

from ..beam import beam_search
from ..cache import kv_cache_bytes
from ..data import Seq2SeqVocab, load_shakespeare_text, toy_pairs, train_val_split
from ..device import cpu_model_name, describe_device
from ..generation import generate
from ..gpt import GPT
from ..pretrained import load_shakespeare
from ..seq2seq import Seq2SeqConfig, Seq2SeqTransformer, toy_accuracy, train_toy
from ..speculative import NGramDraft, load_shakespeare_draft, speculative_generate

__all__ = ["BEYOND_PROMPTS", "beyond", "cache_quality", "speculative_speedup", "toy_beam_accuracy"]


# -- chapter 10: beam search, speculative decoding, the int8 cache ------------------------------------

BEYOND_PROMPTS = ("ROMEO:\n", "KING HENRY:\nNow, ", "First Citizen:\n", "LADY CAPULET:\nWhat, ")


def beyond(*, ks=(1, 2, 4, 8), new_tokens: int = 256, windows: int = 200, repeats: int = 3,
           prompts=BEYOND_PROMPTS, toy_steps: int = 90, toy_test: int = 500) -> dict:
    """Chapter 10's measurements on the shipped Shakespeare model, in one run: speculative greedy
    decoding against plain greedy (n-gram draft fitted on the training text, and the shipped draft
    model), the int8 cache against float32 (`cache_quality`), and exact match of
    greedy and beam search on chapter 8's toy tasks (models trained for `toy_steps` steps).
    Built in chapter 10."""
    model, tok = load_shakespeare()
    draft = load_shakespeare_draft()
    train_text, val_text = train_val_split(load_shakespeare_text())
    ngram = NGramDraft(4, torch.tensor(tok.encode(train_text)), vocab_size=model.config.vocab_size)
    ids = [torch.tensor([tok.encode(p)]) for p in prompts]
    result: dict = {"device": describe_device(torch.device("cpu")), "cpu": cpu_model_name(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "prompts": list(prompts)}
    result["speculative"] = speculative_speedup(model, {"ngram (order 4, training text)": ngram, "draft model (1 layer)": draft},
                                    ids, new_tokens=new_tokens, ks=tuple(ks), repeats=repeats)
    result["int8_cache"] = cache_quality(model, torch.tensor(tok.encode(val_text)), ids, windows=windows,
                                         new_tokens=new_tokens)
    vocab = Seq2SeqVocab()
    toy = {}
    for task in ("reverse", "sort"):
        test = toy_pairs(toy_test, task=task, seed=1)
        train_pairs = toy_pairs(20_000, task=task, seed=0, exclude={s for s, _ in test})
        torch.manual_seed(0)
        toy_model = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=len(vocab), max_seq_len=12, d_model=64, n_layers=2,
                                                     n_heads=4, d_ff=128))
        train_toy(toy_model, train_pairs, vocab, steps=toy_steps, seed=0)
        toy[task] = {f"beams_{k}": toy_beam_accuracy(toy_model, test, vocab, num_beams=k) for k in (1, 2, 4)}
    result["beam_toy_exact_match"] = {"train_steps": toy_steps, "test_pairs": toy_test, **toy}
    return result


@torch.no_grad()
def cache_quality(model, val_ids: Tensor, prompts: list[Tensor], *, quantize: str = "int8", windows: int = 64,
                  block_size: int | None = None, new_tokens: int = 256, batch_size: int = 16) -> dict:
    """How much a quantized cache changes a model, against the float cache of its own dtype.

    Teacher-forced, over `windows` consecutive windows of `val_ids` (each run through a fresh
    static cache, so every key is read back from the cache): mean KL(p_float || p_quantized)
    per position, top-1 agreement, and the validation loss with each cache. Free-running, for
    each prompt (1, T): `new_tokens` greedy tokens with each sliding/static cache, the fraction
    of positions that agree and the first position that differs (with the float model's top-2
    logit gap there and the largest change the quantized cache made to a logit), plus the
    agreement of the quantized cache's greedy choice along the float text (teacher-forced). Also the bytes of
    each cache for one `new_tokens`-token sequence, float32 and bfloat16 by the formula.
    Built in chapter 10.
    """
    c = model.config
    block = block_size or c.max_seq_len
    n = min(windows, (val_ids.numel() - 1) // block)
    if n < 1:
        raise ValueError(f"val_ids has {val_ids.numel()} tokens; it needs more than block_size={block}")
    ids = val_ids[: n * block + 1].to(model.device)
    x_all, y_all = ids[:-1].view(n, block), ids[1:].view(n, block)
    kl = agree = loss_f = loss_q = 0.0
    for i in range(0, n, batch_size):
        x, y = x_all[i: i + batch_size], y_all[i: i + batch_size]
        B = x.size(0)
        lf = model(x, model.new_cache(B, max_seq_len=block)).float().log_softmax(-1)  # (B, T, V)
        lq = model(x, model.new_cache(B, max_seq_len=block, quantize=quantize)).float().log_softmax(-1)
        kl += float(F.kl_div(lq, lf, log_target=True, reduction="sum"))
        agree += float((lf.argmax(-1) == lq.argmax(-1)).sum())
        loss_f += float(F.nll_loss(lf.flatten(0, 1), y.flatten(), reduction="sum"))
        loss_q += float(F.nll_loss(lq.flatten(0, 1), y.flatten(), reduction="sum"))
    positions = n * block
    slides = c.pos == "rope" and c.window is not None
    kind = dict(kind="sliding") if slides else {}
    greedy = []
    for idx in prompts:
        T = idx.size(1)
        size = {} if slides else dict(max_seq_len=T + new_tokens)
        a = generate(model, idx, new_tokens, temperature=0, cache=model.new_cache(1, **kind, **size))
        b = generate(model, idx, new_tokens, temperature=0,
                     cache=model.new_cache(1, **kind, **size, quantize=quantize))
        same = (a[0, T:] == b[0, T:]).cpu()
        differs = (~same).nonzero()
        # Teacher-forced along the float text: does the quantized cache choose the same next token?
        cache = model.new_cache(1, **kind, **size, quantize=quantize)
        logits = model(a[:, :-1], cache)[0, T - 1:]  # (new_tokens, V)
        first = int(differs[0]) if differs.numel() else None
        entry = dict(agreement=float(same.float().mean()), first_difference=first,
                     agreement_along_float_text=float((logits.argmax(-1) == a[0, T:]).float().mean()))
        if first is not None:  # how close a call it was: the float model's top-2 logit gap there
            float_logits = model(a[:, :T + first], model.new_cache(1, **kind, **size))[0, -1]  # predicts new token `first`
            top2 = float_logits.float().topk(2).values
            entry["top2_gap_at_first_difference"] = float(top2[0] - top2[1])
            entry["logit_change_at_first_difference"] = float((logits[first] - float_logits).abs().max())
        greedy.append(entry)
    per_token = dict(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, seq_len=new_tokens)
    q_bytes = model.new_cache(1, max_seq_len=new_tokens, quantize=quantize).nbytes
    fp32 = kv_cache_bytes(**per_token, dtype=torch.float32)
    bf16 = kv_cache_bytes(**per_token, dtype=torch.bfloat16)
    return {
        "quantize": quantize, "windows": n, "positions": positions,
        "kl_nats": kl / positions, "top1_agreement": agree / positions,
        "val_loss_float": loss_f / positions, "val_loss_quantized": loss_q / positions,
        "val_loss_change": (loss_q - loss_f) / positions,
        "greedy": greedy,
        "greedy_agreement": sum(g["agreement"] for g in greedy) / max(len(greedy), 1),
        "greedy_agreement_along_float_text": sum(g["agreement_along_float_text"] for g in greedy) / max(len(greedy), 1),
        "bytes": {"float32": fp32, "bfloat16": bf16, quantize: q_bytes},
        "ratio_to_float32": q_bytes / fp32, "ratio_to_bfloat16": q_bytes / bf16,
    }


def speculative_speedup(target: GPT, drafts: dict, prompts: list[Tensor], *, new_tokens: int = 256,
            ks: tuple[int, ...] = (4,), repeats: int = 3) -> dict:
    """Greedy speculative decoding against plain greedy `kvlab.generate`, in one interleaved run.

    For each prompt, each repeat runs plain greedy and then every (draft, k) once, so a machine
    that slows down or speeds up affects all of them alike; tokens/s are the median over repeats
    and prompts together. Reports, per draft and k: tokens/s, the speed-up over plain greedy,
    acceptance rate, tokens per target forward, and whether every run's tokens were identical to
    plain greedy's. Built in chapter 10.
    """
    plain_rates: list[float] = []
    runs: dict[tuple[str, int], list[dict]] = {(name, k): [] for name in drafts for k in ks}
    identical = {key: True for key in runs}
    for idx in prompts:
        expected = None
        for _ in range(repeats):
            stats: dict = {}
            out = generate(target, idx, new_tokens, temperature=0, stats=stats)
            expected = out if expected is None else expected
            plain_rates.append(new_tokens / stats["total_s"])
            for (name, k) in runs:
                s: dict = {}
                got = speculative_generate(target, drafts[name], idx, new_tokens, k=k, temperature=0, stats=s)
                identical[(name, k)] &= bool(torch.equal(got, expected))
                runs[(name, k)].append(s)
    plain = statistics.median(plain_rates)
    table = []
    for (name, k), stats_list in runs.items():
        rate = statistics.median(s["tokens_per_s"] for s in stats_list)
        proposed = sum(s["proposed"] for s in stats_list)
        table.append({
            "draft": name, "k": k, "tokens_per_s": rate, "speedup": rate / plain,
            "acceptance_rate": sum(s["accepted"] for s in stats_list) / proposed if proposed else math.nan,
            "tokens_per_target_forward": statistics.mean(s["tokens_per_target_forward"] for s in stats_list),
            "draft_forwards_per_token": statistics.mean(s["draft_forwards"] / s["new_tokens"] for s in stats_list),
            "identical_tokens": identical[(name, k)],
        })
    return {"plain_greedy_tokens_per_s": plain, "new_tokens": new_tokens, "prompts": len(prompts),
            "repeats": repeats, "runs": table}


@torch.no_grad()
def toy_beam_accuracy(model: "Seq2SeqTransformer", pairs: list[tuple[str, str]], vocab: "Seq2SeqVocab", *,
                      num_beams: int,
                      batch_size: int = 250) -> float:
    """Exact-match accuracy of beam search on (source, target) string pairs of chapter 8's toy
    tasks; num_beams=1 is `kvlab.seq2seq.toy_accuracy`'s greedy decoding. Built in chapter 10."""
    def decode(m, src, max_len):
        return beam_search(m, src, max_len, num_beams=num_beams)

    return toy_accuracy(model, pairs, vocab, batch_size=batch_size, decode=decode)
