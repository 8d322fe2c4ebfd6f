"""Chapter 8's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import math

import pytest
import torch

import kvlab
from kvlab.course.checks._common import ExerciseNotDone, is_not_done_line
from kvlab.course.checks.seq2seq import (
    _BUILD_CASES,
    _DECODE_CASES,
    _decode_case,
    check_cross_attention,
    check_cross_kv_for_samples,
    check_decoder_layer_step,
    check_decoder_step,
    check_greedy_by_hand,
    check_greedy_decode,
    check_padding_mask,
    check_project_memory,
    check_saved_projections,
)
from kvlab.seq2seq import greedy_decode


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def assert_not_done(capsys, name):
    """The public check printed the "not done yet" line for `name` and returned without raising."""
    lines = capsys.readouterr().out.splitlines()
    assert any(is_not_done_line(line) and name in line for line in lines), lines
    assert not any(line.startswith("✓") for line in lines), lines


# --------------------------------------------------------------------------- padding mask


def padding_mask_solution(lengths, S, left=False):
    if left:
        return torch.arange(S)[None, :] >= S - lengths[:, None]
    return torch.arange(S)[None, :] < lengths[:, None]


def padding_mask_ignores_left(lengths, S, left=False):  # right padding whatever `left` says
    return torch.arange(S)[None, :] < lengths[:, None]


def padding_mask_left_off_by_one(lengths, S, left=False):
    if left:
        return torch.arange(S)[None, :] > S - lengths[:, None]
    return torch.arange(S)[None, :] < lengths[:, None]


def padding_mask_inverted(lengths, S):
    return ~padding_mask_solution(lengths, S)


def padding_mask_off_by_one(lengths, S):  # one padding position too many counted as real
    return torch.arange(S)[None, :] <= lengths[:, None]


def padding_mask_transposed(lengths, S):
    return padding_mask_solution(lengths, S).T


def padding_mask_floats(lengths, S):
    return padding_mask_solution(lengths, S).float()


def test_padding_mask_check_passes_a_solution(capsys):
    check_padding_mask(padding_mask_solution)
    assert "my_padding_mask: all checks passed" in capsys.readouterr().out


def test_padding_mask_check_reports_the_stub_as_not_done(capsys):
    assert check_padding_mask(stub) is None
    assert_not_done(capsys, "my_padding_mask")
    with pytest.raises(ExerciseNotDone, match="not written yet"):
        check_padding_mask.__wrapped__(stub)


@pytest.mark.parametrize("wrong, hint", [
    (padding_mask_inverted, "inverted"),
    (padding_mask_off_by_one, "first and last positions"),
    (padding_mask_transposed, "one row per sequence"),
    (padding_mask_floats, "bool"),
    (padding_mask_ignores_left, "left padding the padding comes first"),
    (padding_mask_left_off_by_one, "left=True"),
])
def test_padding_mask_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_padding_mask(wrong)


# --------------------------------------------------------------------------- cross-attention


def cross_attention_solution(q, k, v, pad_mask):
    G = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    scores = scores.masked_fill(~pad_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def cross_attention_sdpa(q, k, v, pad_mask):
    G = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=pad_mask[:, None, None, :])


def cross_attention_no_gqa(q, k, v, pad_mask):  # right for H == Hkv, fails to broadcast otherwise
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return scores.masked_fill(~pad_mask[:, None, None, :], float("-inf")).softmax(dim=-1) @ v


def cross_attention_tiled_heads(q, k, v, pad_mask):  # kv heads repeated as a stack, not in groups
    G = q.size(1) // k.size(1)
    return cross_attention_no_gqa(q, k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1), pad_mask)


def cross_attention_causal(q, k, v, pad_mask):
    T, S = q.size(-2), k.size(-2)
    mask = pad_mask[:, None, None, :] & torch.ones(T, S, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def cross_attention_no_mask(q, k, v, pad_mask):
    return ((q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).softmax(dim=-1)) @ v


def cross_attention_unscaled(q, k, v, pad_mask):
    scores = (q @ k.transpose(-2, -1)).masked_fill(~pad_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def cross_attention_swapped(q, k, v, pad_mask):
    return cross_attention_solution(q, v, k, pad_mask)


def cross_attention_fills_real_tokens(q, k, v, pad_mask):  # masked_fill's polarity backwards
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return scores.masked_fill(pad_mask[:, None, None, :], float("-inf")).softmax(dim=-1) @ v


def cross_attention_with_weights(q, k, v, pad_mask):
    out = cross_attention_solution(q, k, v, pad_mask)
    return out, None


@pytest.mark.parametrize("solution", [cross_attention_solution, cross_attention_sdpa])
def test_cross_attention_check_passes_solutions(solution, capsys):
    check_cross_attention(solution)
    assert "my_cross_attention: all checks passed" in capsys.readouterr().out


def test_cross_attention_check_reports_the_stub_as_not_done(capsys):
    check_cross_attention(stub)
    assert_not_done(capsys, "my_cross_attention")


@pytest.mark.parametrize("wrong, hint", [
    (cross_attention_causal, "not causal"),
    (cross_attention_no_mask, "padded keys"),
    (cross_attention_unscaled, "too peaked"),
    (cross_attention_swapped, "which is which"),
    (cross_attention_fills_real_tokens, "NaN"),
    (cross_attention_with_weights, "not a tuple"),
    (cross_attention_no_gqa, "(?s)failed with RuntimeError.*grouped-query"),
    (cross_attention_tiled_heads, "in place, not the whole stack"),
])
def test_cross_attention_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_cross_attention(wrong)


# --------------------------------------------------------------------------- greedy decoding


def greedy_solution(model, src, max_new_tokens):
    c = model.config
    B = src.size(0)
    memory = model.encode(src)
    cache = model.new_cache(memory, src != c.pad_id, max_seq_len=max(max_new_tokens, 1))
    out = torch.full((B, max_new_tokens), c.pad_id, dtype=torch.long)
    token = torch.full((B, 1), c.bos_id, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    for n in range(max_new_tokens):
        logits = model.decode(token, cache=cache)[:, -1]  # (B, V)
        nxt = torch.where(done, c.pad_id, logits.argmax(-1))
        out[:, n] = nxt
        done |= nxt == c.eos_id
        if done.all():
            return out[:, : n + 1]
        token = nxt[:, None]
    return out


def greedy_uncached(model, src, max_new_tokens):
    """Right tokens, but re-runs the decoder (and re-projects the memory) every step."""
    c = model.config
    memory = model.encode(src)
    tgt = torch.full((src.size(0), 1), c.bos_id)
    done = torch.zeros(src.size(0), dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = model.decode(tgt, memory, src != c.pad_id)[:, -1].argmax(-1)
        nxt = torch.where(done, c.pad_id, nxt)
        done |= nxt == c.eos_id
        tgt = torch.cat([tgt, nxt[:, None]], dim=1)
        if done.all():
            break
    return tgt[:, 1:]


def greedy_no_pad_after_eos(model, src, max_new_tokens):
    c = model.config
    memory = model.encode(src)
    cache = model.new_cache(memory, src != c.pad_id)
    token, outs = torch.full((src.size(0), 1), c.bos_id), []
    done = torch.zeros(src.size(0), dtype=torch.bool)
    for _ in range(max_new_tokens):
        token = model.decode(token, cache=cache)[:, -1:].argmax(-1)
        outs.append(token)
        done |= token[:, 0] == c.eos_id
        if done.all():
            break
    return torch.cat(outs, dim=1)


def greedy_with_bos(model, src, max_new_tokens):
    out = greedy_solution(model, src, max_new_tokens)
    return torch.cat([torch.full((src.size(0), 1), model.config.bos_id), out], dim=1)


def greedy_never_stops(model, src, max_new_tokens):
    out = greedy_solution(model, src, max_new_tokens)
    full = torch.full((src.size(0), max_new_tokens), model.config.pad_id)
    full[:, : out.size(1)] = out
    return full


def greedy_ignores_padding(model, src, max_new_tokens):
    c = model.config
    memory = model.encode(src, torch.ones_like(src, dtype=torch.bool))  # padding treated as tokens
    cache = model.new_cache(memory, torch.ones_like(src, dtype=torch.bool), max_seq_len=max_new_tokens)
    token = torch.full((src.size(0), 1), c.bos_id)
    done = torch.zeros(src.size(0), dtype=torch.bool)
    out = torch.full((src.size(0), max_new_tokens), c.pad_id)
    for n in range(max_new_tokens):
        nxt = torch.where(done, c.pad_id, model.decode(token, cache=cache)[:, -1].argmax(-1))
        out[:, n] = nxt
        done |= nxt == c.eos_id
        if done.all():
            return out[:, : n + 1]
        token = nxt[:, None]
    return out


def greedy_wrong_positions(model, src, max_new_tokens):
    """Feeds every token at position 0 (the cache is rewound each step)."""
    c = model.config
    memory = model.encode(src)
    cache = model.new_cache(memory, src != c.pad_id, max_seq_len=max_new_tokens)
    token = torch.full((src.size(0), 1), c.bos_id)
    done = torch.zeros(src.size(0), dtype=torch.bool)
    out = torch.full((src.size(0), max_new_tokens), c.pad_id)
    for n in range(max_new_tokens):
        nxt = torch.where(done, c.pad_id, model.decode(token, cache=cache, input_pos=0)[:, -1].argmax(-1))
        out[:, n] = nxt
        done |= nxt == c.eos_id
        if done.all():
            return out[:, : n + 1]
        token = nxt[:, None]
    return out


def test_decode_cases_exercise_what_the_check_claims():
    ends, widths = [], []
    for _, overrides, seed, lengths, n_new in _DECODE_CASES:
        model, src = _decode_case(overrides, seed, lengths)
        out = greedy_decode(model, src, n_new)
        widths.append((out.size(1), n_new))
        ends.append([row.index(2) if 2 in row else None for row in out.tolist()])
    assert None in ends[0] and len({e for e in ends[0] if e is not None}) > 1  # some end, at different steps
    assert widths[1][0] < widths[1][1] and None not in ends[1]  # every row finishes early
    assert ends[2] == [None]


def test_greedy_check_passes_a_solution(capsys):
    check_greedy_decode(greedy_solution)
    assert "my_greedy_decode: all checks passed" in capsys.readouterr().out


def test_greedy_check_reports_the_stub_as_not_done(capsys):
    check_greedy_decode(stub)
    assert_not_done(capsys, "my_greedy_decode")


@pytest.mark.parametrize("wrong, hint", [
    (greedy_uncached, "projected"),
    (greedy_no_pad_after_eos, "right up to its EOS"),
    (greedy_with_bos, "starts with BOS"),
    (greedy_never_stops, "stop as soon as"),
    (greedy_ignores_padding, "padding must be masked"),
    (greedy_wrong_positions, "consecutive positions"),
])
def test_greedy_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_greedy_decode(wrong)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_greedy_decode(greedy_solution)
    check_cross_attention(cross_attention_solution)
    check_padding_mask(padding_mask_solution)
    check_cross_kv_for_samples(cross_kv_solution)
    check_decoder_layer_step(layer_step_solution)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- cross K/V for several samples


def cross_kv_solution(model, memory, n_samples):
    out = []
    for block in model.decoder:
        k, v = block.cross_attn.project_memory(memory)
        out.append((k.repeat_interleave(n_samples, 0), v.repeat_interleave(n_samples, 0)))
    return out


def cross_kv_expand(model, memory, n_samples):  # no copy at all: expanded views are fine
    out = []
    for block in model.decoder:
        k, v = block.cross_attn.project_memory(memory)
        B, H, S, D = k.shape
        out.append(tuple(t[:, None].expand(B, n_samples, H, S, D).reshape(B * n_samples, H, S, D) for t in (k, v)))
    return out


def cross_kv_projects_repeated_memory(model, memory, n_samples):
    return [block.cross_attn.project_memory(memory.repeat_interleave(n_samples, 0)) for block in model.decoder]


def cross_kv_tiled(model, memory, n_samples):
    return [tuple(t.repeat(n_samples, 1, 1, 1) for t in block.cross_attn.project_memory(memory))
            for block in model.decoder]


def cross_kv_per_sample(model, memory, n_samples):
    out = []
    for block in model.decoder:
        pairs = [block.cross_attn.project_memory(memory) for _ in range(n_samples)]
        k = torch.stack([p[0] for p in pairs], 1).flatten(0, 1)
        v = torch.stack([p[1] for p in pairs], 1).flatten(0, 1)
        out.append((k, v))
    return out


def cross_kv_swapped(model, memory, n_samples):
    return [(v, k) for k, v in cross_kv_solution(model, memory, n_samples)]


def cross_kv_first_layer_only(model, memory, n_samples):
    kv = cross_kv_solution(model, memory, n_samples)[0]
    return [kv for _ in model.decoder]


@pytest.mark.parametrize("solution", [cross_kv_solution, cross_kv_expand])
def test_cross_kv_check_passes_solutions(solution, capsys):
    check_cross_kv_for_samples(solution)
    assert "✓ my_cross_kv_for_samples: all checks passed" in capsys.readouterr().out


def test_cross_kv_check_reports_the_stub_as_not_done(capsys):
    check_cross_kv_for_samples(stub)
    assert_not_done(capsys, "my_cross_kv_for_samples")


@pytest.mark.parametrize("wrong, hint", [
    (cross_kv_projects_repeated_memory, "times the work"),
    (cross_kv_tiled, "wrong order"),
    (cross_kv_per_sample, "projections 8 times for 2 layers"),
    (cross_kv_swapped, "k holds the values"),
    (cross_kv_first_layer_only, "each layer's own"),
])
def test_cross_kv_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_cross_kv_for_samples(wrong)


# --------------------------------------------------------------------------- experiment: projections saved


@pytest.fixture(scope="module")
def projection_case():
    model, src = _decode_case(dict(), 14, (5, 9, 2))
    out = greedy_decode(model, src, 14)
    return model, src, out.size(1)


def test_saved_projections_passes_the_counted_answer(projection_case, capsys):
    model, src, steps = projection_case
    L = model.config.n_layers
    check_saved_projections(L * (steps - 1), model, src, 14)
    assert "✓ my_saved_projections: all checks passed" in capsys.readouterr().out


def test_saved_projections_reports_no_answer_as_not_done(projection_case, capsys):
    model, src, _ = projection_case
    check_saved_projections(None, model, src, 14)
    assert_not_done(capsys, "my_saved_projections")


def test_saved_projections_fails_wrong_answers():
    model, src = _decode_case(dict(n_layers=3, n_kv_heads=2), 14, (7, 3, 8, 1))  # every row stops early
    steps, L = greedy_decode(model, src, 16).size(1), 3
    assert steps < 16
    for answer, hint in [(L * steps, "subtract it"), (L * 15, "count the calls"), (steps - 1, "every one of the"),
                         (1, "forward hook")]:
        with pytest.raises(AssertionError, match=hint):
            check_saved_projections(answer, model, src, 16)


# --------------------------------------------------------------------------- build steps: the cached decoder by hand


def split(t, H):
    B, L, C = t.shape
    return t.view(B, L, H, C // H).transpose(1, 2)  # (B, L, C) -> (B, H, L, D)


def merge(t):
    B, H, L, D = t.shape
    return t.transpose(1, 2).reshape(B, L, H * D)


def attend(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def project_memory_solution(model, memory):
    out = []
    for block in model.decoder:
        ca = block.cross_attn
        k, v = ca.kv(memory).chunk(2, dim=-1)
        out.append((split(k, ca.n_heads), split(v, ca.n_heads)))
    return out


def project_memory_swapped(model, memory):
    return [(v, k) for k, v in project_memory_solution(model, memory)]


def project_memory_first_layer_only(model, memory):
    return [project_memory_solution(model, memory)[0]] * len(model.decoder)


def project_memory_twice_per_layer(model, memory):  # keys and values each from their own call
    out = []
    for block in model.decoder:
        ca, C = block.cross_attn, memory.size(-1)
        out.append((split(ca.kv(memory)[..., :C], ca.n_heads), split(ca.kv(memory)[..., C:], ca.n_heads)))
    return out


def project_memory_not_split(model, memory):
    return [tuple(block.cross_attn.kv(memory).chunk(2, dim=-1)) for block in model.decoder]


def layer_step_solution(block, x, input_pos, layer_cache, cross_kv, pad_mask, mistake=None):
    H = block.self_attn.n_heads
    q, k, v = (split(t, H) for t in block.self_attn.qkv(block.norm1(x)).chunk(3, dim=-1))
    if mistake == "no cache":
        mask = kvlab.attention_mask(input_pos, input_pos)
    else:
        mask = kvlab.attention_mask(input_pos, layer_cache.key_positions(input_pos))
        k, v = layer_cache.update(k, v, input_pos)
        if mistake == "no mask":
            mask = None
        elif mistake == "top-left":
            mask = torch.ones(x.size(1), k.size(2), dtype=torch.bool).tril()
    x = x + block.self_attn.out(merge(attend(q, k, v, mask)))
    q = split(block.cross_attn.q(block.norm2(x)), H)
    if mistake == "self for cross":
        y = attend(q, k, v, mask)
    else:
        y = attend(q, *cross_kv, None if mistake == "no pad mask" else pad_mask[:, None, None, :])
    x = x + block.cross_attn.out(merge(y))
    return x + block.mlp(block.norm3(x))


def decoder_step_solution(model, tgt, input_pos, self_cache, cross_kv, pad_mask, mistake=None):
    pos = torch.arange(tgt.size(1)) if mistake == "positions from 0" else input_pos
    x = model.tok_emb(tgt) + model.pos_emb(pos)
    for i, block in enumerate(model.decoder):
        x = layer_step_solution(block, x, input_pos, self_cache.layers[i], cross_kv[i], pad_mask)
    return model.lm_head(x if mistake == "no final norm" else model.dec_norm(x))


def greedy_by_hand_solution(model, src, max_new_tokens, mistake=None):
    c = model.config
    B = src.size(0)
    pad_mask = src != c.pad_id
    memory = model.encode(src, pad_mask)
    cross_kv = project_memory_solution(model, memory)
    self_cache = kvlab.KVCache.create("static", n_layers=c.n_layers, batch_size=B, n_kv_heads=c.n_kv_heads,
                                      head_dim=c.head_dim, max_seq_len=max_new_tokens)
    tgt = torch.full((B, 1), c.bos_id)
    out = torch.full((B, max_new_tokens), c.pad_id)
    done = torch.zeros(B, dtype=torch.bool)
    for n in range(max_new_tokens):
        if mistake == "re-project":
            cross_kv = project_memory_solution(model, memory)
        if mistake == "whole target":  # every step re-feeds the whole target from position 0
            logits = decoder_step_solution(model, tgt, torch.arange(n + 1), self_cache, cross_kv, pad_mask)[:, -1]
        else:
            pos = torch.tensor([0 if mistake == "position 0" else n])
            logits = decoder_step_solution(model, tgt[:, -1:], pos, self_cache, cross_kv, pad_mask)[:, -1]
        nxt = torch.where(done, c.pad_id, logits.argmax(-1))
        out[:, n] = nxt
        done |= nxt == c.eos_id
        if done.all():
            return out[:, : n + 1]
        tgt = torch.cat([tgt, nxt[:, None]], dim=1)
    return out


def greedy_by_hand_with_bos(model, src, max_new_tokens):
    out = greedy_by_hand_solution(model, src, max_new_tokens)
    return torch.cat([torch.full((src.size(0), 1), model.config.bos_id), out], dim=1)


def with_mistake(fn, mistake):
    return lambda *args: fn(*args, mistake=mistake)


def test_build_cases_exercise_what_the_greedy_check_claims():
    ends, widths = [], []
    for _, overrides, seed, lengths, n_new in _BUILD_CASES:
        model, src = _decode_case(overrides, seed, lengths)
        assert model.config.n_kv_heads == model.config.n_heads  # as in the chapter
        out = greedy_decode(model, src, n_new)
        widths.append((out.size(1), n_new))
        ends.append([row.index(2) if 2 in row else None for row in out.tolist()])
    assert None in ends[0] and len({e for e in ends[0] if e is not None}) > 1  # some end, at different steps
    assert widths[1][0] < widths[1][1] and None not in ends[1]  # every row finishes early
    assert ends[2] == [None]


BUILD_STEPS = {  # check -> (the learner's name, a right answer, [(a catalogued mistake, what its hint says)])
    "project memory": (check_project_memory, "my_project_memory", project_memory_solution, [
        (project_memory_swapped, "k holds the values"),
        (project_memory_first_layer_only, "layer 0's keys"),
        (project_memory_twice_per_layer, "ran 4 times for 2 layers"),
        (project_memory_not_split, "one slice of the channels per head"),
    ]),
    "decoder layer step": (check_decoder_layer_step, "my_decoder_layer_step", layer_step_solution, [
        (with_mistake(layer_step_solution, "no cache"), "saw only the tokens fed in the same call"),
        (with_mistake(layer_step_solution, "top-left"), "top-left"),
        (with_mistake(layer_step_solution, "no mask"), "tokens after it in the same call"),
        (with_mistake(layer_step_solution, "self for cross"), "target's own keys and values"),
        (with_mistake(layer_step_solution, "no pad mask"), "padding positions received"),
    ]),
    "decoder step": (check_decoder_step, "my_decoder_step", decoder_step_solution, [
        (with_mistake(decoder_step_solution, "positions from 0"), "tokens placed at the start"),
        (with_mistake(decoder_step_solution, "no final norm"), "between the last block and the output layer"),
    ]),
    "greedy by hand": (check_greedy_by_hand, "my_greedy_by_hand", greedy_by_hand_solution, [
        (with_mistake(greedy_by_hand_solution, "re-project"), r"projected \d+ times for \d+ steps"),
        (with_mistake(greedy_by_hand_solution, "position 0"), "fed every token at the same position"),
        (with_mistake(greedy_by_hand_solution, "whole target"), "a step needs only the newest token"),
        (greedy_by_hand_with_bos, "starts with BOS"),
    ]),
}


@pytest.mark.parametrize("step", list(BUILD_STEPS))
def test_build_step_check_passes_the_solution(step, capsys):
    check, name, solution, _ = BUILD_STEPS[step]
    check(solution)
    assert f"✓ {name}: all checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("step", list(BUILD_STEPS))
def test_build_step_check_reports_the_stub_as_not_done(step, capsys):
    check, name, _, _ = BUILD_STEPS[step]
    assert check(stub) is None
    assert_not_done(capsys, name)


@pytest.mark.parametrize("step, wrong, hint", [(step, wrong, hint) for step, (_, _, _, mistakes) in BUILD_STEPS.items()
                                               for wrong, hint in mistakes])
def test_build_step_check_fails_catalogued_mistakes(step, wrong, hint):
    check = BUILD_STEPS[step][0]
    with pytest.raises(AssertionError, match=hint):
        check(wrong)
