"""Write notebooks/09_serving.ipynb from the cells below (run from the repository root).

The chapter is kept as this script so that its cells can be edited as plain Python; the
notebook it writes is stored without outputs, like every chapter.
"""

import json
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
cells = []


def md(text, **meta):
    cells.append(nbformat.v4.new_markdown_cell(text.strip("\n"), metadata=meta))


def code(text, tags=None, **meta):
    if tags:
        meta["tags"] = tags
    cells.append(nbformat.v4.new_code_cell(text.strip("\n"), metadata=meta))


colab = json.loads((ROOT / "notebooks/08_seq2seq.ipynb").read_text())
colab_cell = next(c for c in colab["cells"] if c["cell_type"] == "code")
colab_source = "".join(colab_cell["source"])

md(r"""
# Serving many requests

Until now every batch was a block of prompts of one length, started together and finished
together. A server sees something else: prompts of every length, arriving whenever users send
them, each wanting its own number of tokens and its own sampling settings. Everything an
inference server such as vLLM, TGI or SGLang does about this is, at bottom, about the
{term}`KV cache`: where each request's keys and values live, how much memory they hold, and
who may share them. This chapter builds the four ideas in turn and measures what each buys.

**What you will build**

- a {term}`ragged batch`: prompts of different lengths in one forward pass, with padding,
  per-row positions and a mask, checked token for token against each prompt run alone;
- a {term}`paged KV cache`: one pool of fixed-size blocks and a {term}`block table` per
  request, read back with a gather;
- {term}`continuous batching`: an engine whose running batch admits and retires requests at
  every step, each with its own sampling settings, equal to running every request alone;
- {term}`prefix sharing`: requests with the same long prompt store its keys and values once,
  with {term}`copy-on-write` when one of them must write into a shared block;
- measurements: throughput and KV memory against batch size, the engine against one request
  at a time, reserved against used memory, and the bytes a shared prefix saves.
""")

code(colab_source)

code(r"""
import time

import matplotlib.pyplot as plt
import torch

import kvlab
from kvlab import checks, viz
from kvlab.paged import BlockPool, gather_kv, slot_mapping
from kvlab.serving import Engine, forward_rows, generate_batch, mixed_workload
from kvlab.serving_bench import batch_sweep, engine_vs_sequential, prefix_sharing_bytes, run_workload

viz.use_style()
torch.set_num_threads(1)  # small models: one thread is fastest and times steadily
print("kvlab", kvlab.__version__)
""")

md(r"""
Everything here runs on the CPU with small random models, so the chapter gives the same
tokens everywhere. Random weights at the usual scale make almost flat next-token
distributions, and greedy decoding then repeats itself; scaling the weight matrices up (the
same trick the course's tests use) makes the choices varied and confident, so that any
mistake in positions or masks changes the tokens.
""")

code(r"""
def small_gpt(style="gpt2", seed=0, **overrides):
    modern = dict(n_kv_heads=2, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)
    shape = dict(vocab_size=61, max_seq_len=320, d_model=32, n_layers=2, n_heads=4)
    config = kvlab.GPTConfig(**shape, **(modern if style == "modern" else {}), **overrides)
    torch.manual_seed(seed)
    model = kvlab.GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


models = {"gpt2": small_gpt("gpt2"), "modern": small_gpt("modern")}
model = models["gpt2"]
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 61, (n,), generator=g) for n in (3, 7, 5)]
print([p.tolist() for p in prompts])
""")

md(r"""
## A ragged batch

`kvlab.generate` takes `idx` of shape (B, T): every row the same length. Three prompts of
different lengths can still share one forward pass if the short ones are padded to the longest.
Padding raises three questions, and the answers are the whole of ragged batching:

1. **Where does each token sit?** A token's position is its index in *its own* request, not its
   column in the padded tensor. With padding on the right the two agree for real tokens; in a
   decode step they stop agreeing, because every row's next token is at its own position. So
   positions become a (B, T) tensor, one row per request, instead of one shared range.
2. **Which keys may a query see?** Those at positions up to its own: key $j$ is visible to a
   query at position $q$ when $j \le q$. Built from positions, this mask is right for every
   row whatever its length.
3. **What do pads do?** Nothing that anyone reads. A pad is never written to the cache, and its
   output is thrown away; it only needs to see one key, so that its softmax is not 0/0.

Here are the three tensors for the three prompts above, right-padded. Pads get position 0.
""")

code(r"""
lengths = torch.tensor([len(p) for p in prompts])
T = int(lengths.max())
idx = torch.zeros(len(prompts), T, dtype=torch.long)
for b, p in enumerate(prompts):
    idx[b, : len(p)] = p
columns = torch.arange(T).expand(len(prompts), T)
valid = columns < lengths[:, None]  # (B, T): False on padding
positions = columns * valid  # (B, T): each row's own positions; pads at 0
mask = torch.arange(T)[None, None, :] <= positions[:, :, None]  # (B, T, S): key j visible when j <= q
print("idx\n", idx, "\nvalid\n", valid.int(), "\npositions\n", positions)
print("mask of row 0 (length 3): queries down, keys across\n", mask[0].int())
""")

md(r"""
Row 0's real queries (the first three) each see the real keys at or before them; its pads see
key 0 only. In row 0's mask, a real query never sees a pad key, because a pad key sits at a
column past the row's length and the mask allows only keys at or before the query's position.

`kvlab.serving.forward_rows` is the forward pass that takes these tensors. It walks the model's
own modules, the same steps as `GPT._forward` and `Block.forward` of chapters 3 and 4, with
two changes: positions are per row (the learned position table or RoPE is indexed by a (B, T)
tensor), and the keys and values go into a shared pool and come back by a gather, which the
next section explains. Its core, for one layer:

```python
q, k, v = attn.qkv(block.norm1(x)).split(...)          # (B, T, ·)
...                                                     # heads, RoPE at per-row positions
pool.write(i, k[valid], v[valid], write_slots)         # the new keys, pads skipped
k_all, v_all = pool.gather(i, read_slots)              # (B, Hkv, S, D): each row's keys 0..S-1
y = F.scaled_dot_product_attention(q, repeat_kv(k_all), repeat_kv(v_all), attn_mask=mask)
```

`generate_batch` prefills the padded prompts this way, then decodes: each unfinished row feeds
its last token at its own next position. In float32 with greedy decoding, each result must be
exactly what the prompt gives alone, for both model styles.
""")

code(r"""
for style, m in models.items():
    results = generate_batch(m, prompts, 12, temperature=0)
    for p, r in zip(prompts, results):
        alone = kvlab.generate(m, p[None], 12, temperature=0)[0]
        assert torch.equal(r, alone), style
    print(f"{style}: {len(prompts)} ragged prompts in one batch = each alone, token for token")
print("row 1:", results[1].tolist())
""")

md(r"""
What if each row's positions were its column numbers after padding on the *left* (a common
layout, because then every row's last token is in the last column)? Then a prompt's first
token would not be at position 0, the model would see a shifted text, and the tokens change.
The cell below left-pads the same prompts and runs them with column positions through
`forward_rows`, with a mask that does hide the pads; the next tokens disagree with the
prompts run alone.
""")

code(r"""
def first_tokens_left_padded(m, prompts, positions_from_columns):
    B, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, T, dtype=torch.long)
    real = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = p
        real[b, T - len(p):] = True
    cols = torch.arange(T).expand(B, T)
    positions = cols if positions_from_columns else (cols - (T - real.sum(1))[:, None]).clamp(min=0)
    c = m.config
    pool = BlockPool(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, num_blocks=B,
                     block_size=T)
    tables = torch.arange(B)[:, None]
    # Write every column (pads too) so that the pool's slots follow columns; hide pads in the mask.
    with torch.inference_mode():
        logits = forward_rows_left(m, idx, positions, cols, real, pool, tables)
    return logits.argmax(-1).tolist()


def forward_rows_left(m, idx, positions, cols, real, pool, tables):
    # forward_rows with keys stored by column and a mask that also hides pad keys.
    import torch.nn.functional as F
    from kvlab.attention import apply_rope, repeat_kv
    from kvlab.layers import rope_cos_sin

    c = m.config
    B, T = idx.shape
    H, Hkv, D = c.n_heads, c.n_kv_heads, c.head_dim
    x = m.tok_emb(idx)
    if m.pos_emb is not None:
        x = x + m.pos_emb(positions)
    rope = None
    if c.pos == "rope":
        cos, sin = rope_cos_sin(positions.reshape(-1), D, c.rope_base)
        rope = cos.view(B, 1, T, D), sin.view(B, 1, T, D)
    slots = slot_mapping(tables, cols, pool.block_size)
    mask = (cols[:, None, :] <= cols[:, :, None]) & (real[:, None, :] | ~real[:, :, None])
    for i, block in enumerate(m.blocks):
        q, k, v = block.attn.qkv(block.norm1(x)).split([c.d_model, Hkv * D, Hkv * D], dim=-1)
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        pool.write(i, k.transpose(1, 2).reshape(-1, Hkv, D), v.transpose(1, 2).reshape(-1, Hkv, D), slots.reshape(-1))
        k_all, v_all = pool.gather(i, slots)
        y = F.scaled_dot_product_attention(q, repeat_kv(k_all, H // Hkv), repeat_kv(v_all, H // Hkv),
                                           attn_mask=mask[:, None])
        x = x + block.attn.out(y.transpose(1, 2).reshape(B, T, c.d_model))
        x = x + block.mlp(block.norm2(x))
    return m.lm_head(m.norm_f(x[:, -1]))


alone = [int(kvlab.generate(model, p[None], 1, temperature=0)[0, -1]) for p in prompts]
right = first_tokens_left_padded(model, prompts, positions_from_columns=False)
wrong = first_tokens_left_padded(model, prompts, positions_from_columns=True)
print("alone:                       ", alone)
print("left-padded, own positions:  ", right)
print("left-padded, column positions:", wrong)
assert right == alone and wrong != alone
""", tags=["hide-input"])

md(r"""
Left padding works too, as long as positions count from each row's first real token and the
mask hides the pad keys; the first exercise asks you to build exactly those two tensors. In the
rest of the chapter rows are right-padded, as in `generate_batch`.

## Paged KV memory

The cache of chapter 4 gives every sequence one slab of `max_seq_len` positions. A server
cannot know how long a request will run, so a slab must be sized for the longest request it
accepts, and most of it stays empty: a request that stops after 40 tokens holds a slab for
hundreds. Memory, not arithmetic, then limits how many requests run at once.

The fix comes from operating systems' virtual memory. Cut the KV memory into **blocks** of
`block_size` positions, all in one preallocated pool. A request owns a list of block ids, its
**block table**, and gets a new block only when its last one is full. Position $p$ of a request
lives in block `table[p // block_size]`, at offset `p % block_size`, so in pool slot

$$
\text{slot}(p) = \text{table}[\lfloor p / \text{block\_size} \rfloor] \cdot \text{block\_size} + p \bmod \text{block\_size}.
$$

Blocks need not be contiguous or in order: a request's blocks are wherever the pool had free
ones. The picture below is drawn from a real engine after a few steps: three requests, blocks
of 4 positions, and two of the requests share their first blocks (their prompts begin the same
way; the last section explains).
""")

code(r"""
demo = Engine(model, max_batch_size=3, block_size=4, num_blocks=14, prefix_sharing=True, max_seq_len=40)
shared_prompt = list(range(10, 18))  # 8 tokens: two full blocks
demo.submit(shared_prompt + [1, 2, 3], 6, temperature=0)
demo.submit(list(range(30, 36)), 6, temperature=0)
demo.step()
demo.submit(shared_prompt + [4, 5], 6, temperature=0)
for _ in range(3):
    demo.step()
tables = demo.block_tables()
lengths_demo = demo.cached_lengths()
print("block tables:", tables)
print("holders per block:", demo.pool.holders)
""")

code(r"""
def draw_block_tables(tables, holders, lengths, block_size, num_blocks):
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    pool_y, cell = 0.0, 1.0
    for b in range(num_blocks):  # the pool: one box per block, its slots inside
        owners = [i for i, (rid, t) in enumerate(tables.items()) if b in t]
        face = "white" if not owners else ("#e0e0e0" if len(owners) > 1 else colors[owners[0]] + "40")
        ax.add_patch(plt.Rectangle((b * cell * 1.1, pool_y), cell, cell, facecolor=face, edgecolor="black",
                                   hatch="//" if len(owners) > 1 else None))
        ax.text(b * 1.1 + 0.5, pool_y - 0.3, f"{b}", ha="center", fontsize=9)
    ax.text(-0.4, pool_y + 0.5, "pool", ha="right", va="center", fontsize=11)
    for i, (rid, table) in enumerate(tables.items()):
        y = 2.2 + i * 1.2
        ax.text(-0.4, y + 0.35, f"request {rid}\n({lengths[rid]} cached)", ha="right", va="center", fontsize=9,
                color=colors[i])
        for j, b in enumerate(table):
            x = j * 1.1
            filled = min(block_size, max(lengths[rid] - j * block_size, 0))
            ax.add_patch(plt.Rectangle((x, y), cell, 0.7, facecolor=colors[i] + "30", edgecolor=colors[i]))
            ax.add_patch(plt.Rectangle((x, y), cell * filled / block_size, 0.12, facecolor=colors[i]))
            ax.text(x + 0.5, y + 0.38, f"{b}", ha="center", va="center", fontsize=10, color=colors[i])
            ax.annotate("", xy=(b * 1.1 + 0.5, pool_y + cell), xytext=(x + 0.5, y),
                        arrowprops=dict(arrowstyle="->", color=colors[i], lw=0.8, alpha=0.7))
    ax.text(0, 2.2 + len(tables) * 1.2, "block tables (entry j holds positions "
            f"{block_size}j .. {block_size}j+{block_size - 1}; the bar shows how full)", fontsize=9)
    ax.set_xlim(-3, num_blocks * 1.1)
    ax.set_ylim(-0.8, 2.8 + len(tables) * 1.2)
    ax.axis("off")
    ax.set_title("Paged KV memory: block tables point into one pool (hatched: a block two requests share)")
    return fig


fig = draw_block_tables(tables, demo.pool.holders, lengths_demo, demo.block_size, demo.pool.num_blocks)
plt.show()
""", tags=["hide-input"], mystnb={"image": {"alt": (
    "A row of numbered boxes, the pool of KV blocks. Above it, one row of boxes per request, its block "
    "table: each entry holds a block id and an arrow points down to that block in the pool. The blocks a "
    "request uses are scattered through the pool, not side by side. Two requests' tables start with the "
    "same block ids, whose pool boxes are hatched: one copy of the shared prompt serves both.")}})

md(r"""
Reading a request's keys back in position order is a **gather**: take its blocks in table
order, lay them end to end, and keep the first `length` positions. `kvlab.paged.gather_kv` does
this for one request and one layer, from a pool of shape (num_blocks, block_size, Hkv, D); you
write it yourself in the second exercise. The engine does the same for every row at once, with
`slot_mapping` turning (row, position) into a pool slot. Checked here against reading the pool
slot by slot with the formula above:
""")

code(r"""
L, NB, BS, Hkv, D = demo.pool.k.shape
for rid, table in tables.items():
    n = lengths_demo[rid]
    keys = gather_kv(demo.pool.k[0], torch.tensor(table), n)  # layer 0: (Hkv, n, D)
    by_formula = torch.stack([demo.pool.k[0].reshape(NB * BS, Hkv, D)[table[p // BS] * BS + p % BS]
                              for p in range(n)], dim=1)
    assert torch.equal(keys, by_formula)
    slots = slot_mapping(torch.tensor([table]), torch.arange(n)[None], BS)
    print(f"request {rid}: positions 0..{n - 1} live in slots {slots[0].tolist()}")
""")

md(r"""
## Continuous batching

A batch that starts and ends together wastes its slots: a request that finishes early leaves
its row idle until the longest one is done, and a request that arrives meanwhile waits for the
whole batch. **Continuous batching** (also called in-flight batching) schedules per step
instead of per batch. `kvlab.serving.Engine` does it with four calls:

- `submit(prompt, max_new_tokens, *, temperature, top_k, top_p, min_p, seed, eos_id)` queues a
  request and returns its id; each request has its own sampling settings, and with `seed` its
  own CPU random generator;
- `step()` admits waiting requests into free slots of the running batch (as long as free blocks
  hold their prompts), prefills the new requests' prompts and decodes one token for every other
  running request, samples each row with its own settings, retires the rows that emitted
  `eos_id` or reached `max_new_tokens`, and returns their ids. The decoding rows share one
  forward pass and the prefilling rows another: in a single pass, every one-token row would be
  padded to the longest new prompt;
- `result(id)` and `run()` (step until everything is done) return prompt + new tokens.

The trace below submits requests at random steps and records which are running at each step.
""")

code(r"""
g = torch.Generator().manual_seed(1)
engine = Engine(model, max_batch_size=4, block_size=4, max_seq_len=80)
arrivals = sorted(torch.randint(0, 30, (10,), generator=g).tolist())
requests = {}
settings = [dict(temperature=0), dict(temperature=0.8, seed=7), dict(temperature=1.0, top_k=10, seed=8)]
running_at, step_no = [], 0
while arrivals or engine.num_waiting or engine.num_running:
    while arrivals and arrivals[0] <= step_no:
        arrivals.pop(0)
        n = len(requests)
        prompt = torch.randint(0, 61, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g)
        new_tokens = int(torch.randint(4, 24, (1,), generator=g))
        rid = engine.submit(prompt, new_tokens, **settings[n % 3])
        requests[rid] = (prompt, new_tokens, settings[n % 3], step_no)
    engine.step()
    running_at.append(set(engine.block_tables()))
    step_no += 1
results = engine.run()
for rid, (prompt, n, s, _) in requests.items():
    gen = None if "seed" not in s else torch.Generator().manual_seed(s["seed"])
    sampling = {k: v for k, v in s.items() if k != "seed"}
    assert torch.equal(results[rid], kvlab.generate(model, prompt[None], n, generator=gen, **sampling)[0])
print(f"{len(requests)} requests over {step_no} steps; every result equals the request run alone")
""")

code(r"""
fig, ax = plt.subplots(figsize=(10, 3))
for rid, (_, _, s, arrived) in requests.items():
    steps = [t for t, ids in enumerate(running_at) if rid in ids]
    ax.plot([arrived, steps[0]] if steps else [arrived], [rid] * (2 if steps else 1), color="#bbbbbb", lw=2)
    if steps:
        ax.plot([steps[0], steps[-1] + 1], [rid, rid], lw=6, solid_capstyle="butt",
                color="#4c72b0" if s["temperature"] == 0 else "#dd8452")
ax.set_xlabel("engine step")
ax.set_ylabel("request id")
ax.set_title("Requests join and leave the running batch at every step (grey: waiting; blue greedy, orange sampled)")
plt.show()
""", tags=["hide-input"], mystnb={"image": {"alt": (
    "A timeline with one horizontal bar per request: a thin grey segment while it waits, then a thick bar "
    "while it runs. Bars start and end at different steps and overlap, never more than four at a time.")}})

md(r"""
Each request's text equals what it gives alone, so batching changes only *when* tokens come
out, never *which*. For a sampled request that needs its own generator: drawn from one shared
generator, its random numbers would depend on how many other rows drew before it. The cell
below runs one seeded request with different company and checks its text never changes.
""")

code(r"""
target = torch.tensor([5, 9, 14, 2, 33])
texts = []
for company in (0, 3, 7):
    e = Engine(model, max_batch_size=8, block_size=4, max_seq_len=64)
    for k in range(company):
        e.submit(torch.randint(0, 61, (3 + k,)), 10 + k, temperature=1.0)  # unseeded neighbours
    rid = e.submit(target, 20, temperature=0.9, top_p=0.9, seed=42)
    texts.append(e.run()[rid])
assert all(torch.equal(t, texts[0]) for t in texts)
print("the seeded request, with 0, 3 and 7 neighbours:", texts[0][len(target):].tolist())
""")

md(r"""
## Reserved against used memory

`Engine.kv_bytes_reserved()` counts the KV bytes allocated to requests now (the blocks handed
out, or the slabs of occupied slots); `Engine.kv_bytes_used()` counts the bytes that hold a
cached token. Their ratio, summed over all the steps of a run, is the price of the allocation
scheme. The workload is a seeded mix of requests whose prompt and output lengths are drawn
uniformly; the static engine gets slabs as long as the longest request in it, which is the best
a static cache can do, and knowing that length in advance is already a luxury a server does
not have.
""")

code(r"""
workload = mixed_workload(24, seed=0, prompt_range=(8, 48), new_range=(8, 48), vocab_size=61)
longest = max(len(p) + n for p, n in workload)
trace, ratio = {}, {}
for kv in ("static", "paged"):
    extra = dict(block_size=16) if kv == "paged" else {}
    e = Engine(model, max_batch_size=8, kv=kv, max_seq_len=longest, **extra)
    for prompt, n in workload:
        e.submit(prompt, n, temperature=0)
    trace[kv] = []
    while e.num_waiting or e.num_running:
        e.step()
        trace[kv].append((e.kv_bytes_reserved(), e.kv_bytes_used()))
    ratio[kv] = sum(r for r, _ in trace[kv]) / sum(u for _, u in trace[kv])
    print(f"{kv:6s}: reserved / used = {ratio[kv]:.2f}  (longest request {longest} tokens)")
assert ratio["paged"] < ratio["static"]
assert ratio["paged"] == checks.serving.reserved_over_used(16)  # the experiment below measures the same way

fig, ax = plt.subplots(figsize=(9, 3.2))
for kv, color in (("static", "#4c72b0"), ("paged", "#dd8452")):
    ax.plot([r / 1024 for r, _ in trace[kv]], color=color, label=f"{kv}: reserved")
ax.plot([u / 1024 for _, u in trace["paged"]], color="black", ls="--", label="used (either)")
ax.set_xlabel("engine step")
ax.set_ylabel("KV KiB")
ax.legend()
ax.set_title("KV memory held while serving the same workload")
plt.show()
""", mystnb={"image": {"alt": (
    "Three lines over engine steps: the static engine's reserved bytes stay in steps far above the used "
    "bytes, while the paged engine's reserved bytes follow the used line closely, a little above it.")}})

md(r"""
The paged engine wastes at most the unfilled part of one block per request, so its ratio falls
toward 1 as the block size shrinks; the static engine reserves the longest request's slab for
every request. Smaller blocks are not free: the block tables grow and the gather reads more,
smaller pieces, which is why servers use blocks of 16 or 32 positions rather than 1. The third
exercise asks you to measure what a larger block costs.

### Out of blocks

A pool can run dry: requests grow, and a block is only handed out when needed. The engine then
chooses between two policies. Before admitting a request it checks that free blocks hold the
prompt, and otherwise leaves it waiting. If a *running* request needs a new block and none is
free, it **preempts** the request admitted last: that request gives all its blocks back and
returns to the front of the queue, keeping the tokens it generated; when readmitted it
recomputes their keys and values in one prefill. Nothing is lost, and nothing changes in the
results, as this deliberately small pool shows:
""")

code(r"""
tight = Engine(model, max_batch_size=6, block_size=4, num_blocks=20, max_seq_len=96)
ids = [tight.submit(p, n, temperature=0) for p, n in workload[:10]]
out = tight.run()
for rid, (p, n) in zip(ids, workload[:10]):
    assert torch.equal(out[rid], kvlab.generate(model, torch.tensor([p]), n, temperature=0)[0])
assert tight.preemptions > 0
print(f"{tight.preemptions} preemptions with a pool of {tight.pool.num_blocks} blocks; every result unchanged")
""")

md(r"""
## Shared prefixes

Many requests start the same way: one system prompt, one long document with different
questions, few-shot examples. Their keys and values for that common start are identical,
because a position's keys depend only on the tokens up to it. With `prefix_sharing=True`, when a
request is admitted the engine looks up each of its full prompt blocks (by the tokens from the
start up to the end of that block) among the blocks of running requests, and takes any match
instead of computing it again. The pool counts the holders of each block and frees it when the
last one finishes.

There is one catch. If a prompt is *entirely* made of shared blocks, the engine must still run
its last token to get the logits for the first new token, and that writes a key into the last
shared block, which other requests are reading. So the engine first copies that block into a
fresh one of its own: **copy-on-write**. (A request whose prefix is still being computed in the
current step waits one step for it, instead of computing it a second time.)

Sixteen requests with the same 256-token prompt, each followed by 16 tokens of its own:
""")

code(r"""
prefix_model = small_gpt("modern")
sharing = prefix_sharing_bytes(prefix_model, n_requests=16, prefix_len=256, suffix_len=16, new_tokens=4,
                               block_size=16, progress=print)
assert sharing["tokens_equal"]  # greedy results identical with and without sharing
assert sharing["prefix_ratio"] == 1 / 16  # the prompt's blocks are stored once instead of 16 times
print(f"prompt KV bytes, shared / unshared: {sharing['prefix_ratio']:.4f} = 1/{1 / sharing['prefix_ratio']:.0f}")
""")

code(r"""
cow = Engine(model, max_batch_size=4, block_size=4, prefix_sharing=True, max_seq_len=40)
ids = [cow.submit(shared_prompt, 6, temperature=0) for _ in range(3)]  # the prompt is 2 full blocks
cow.step()  # the first computes the prefix
cow.step()  # the others share it; each copies the last block before writing its last token
print("block tables:", cow.block_tables(), "copies made:", cow.copies)
assert cow.copies == 2
results = cow.run()
assert all(torch.equal(results[i], kvlab.generate(model, torch.tensor([shared_prompt]), 6, temperature=0)[0])
           for i in ids)
""")

md(r"""
The shared prompt is stored once, so the ratio is one over the number of requests: the prompt's
bytes no longer grow with the number of requests that read it. The prefill work shrinks the
same way, because only the first request computes the prefix.

## Measured: throughput and memory against batch size

Why batch at all? A decode step of one sequence reads every weight of the model to produce one
token; B sequences read the same weights once and produce B tokens. Until the arithmetic, not
the reading, is the bottleneck, throughput grows almost in proportion to the batch, and the
price is KV memory, which grows exactly in proportion. Without a cache every step recomputes the
whole sequence for every row, so its work grows with B and the square of the length: batching
cannot save it. Measured live on a small model (so the absolute numbers depend on this machine
and its load; the shapes of the curves are the point):
""")

code(r"""
bench_model = kvlab.GPT(kvlab.GPTConfig(vocab_size=512, max_seq_len=512, d_model=128, n_layers=4, n_heads=4)).eval()
live = batch_sweep(bench_model, batch_sizes=(1, 2, 4, 8, 16, 32), prompt_len=16, new_tokens=24, uncached_budget_s=3.0)
cached = {r["batch_size"]: r for r in live if r["use_cache"]}
uncached = {r["batch_size"]: r for r in live if not r["use_cache"]}
print(f"cached: batch 32 gives {cached[32]['throughput_tok_s'] / cached[1]['throughput_tok_s']:.1f}x the tokens/s "
      f"of batch 1, for 32x the KV memory; uncached stopped after batch {max(uncached)}")
""")

code(r"""
live_engine = engine_vs_sequential(bench_model, n_requests=32, max_batch_size=16, block_size=16,
                                   prompt_range=(8, 32), new_range=(8, 32))
assert live_engine["paged"]["tokens_equal"] == 1.0
print(f"engine (16 at once) / one at a time: {live_engine['paged']['speedup']:.1f}x tokens/s; "
      f"reserved/used: paged {live_engine['paged']['reserved_over_used']:.2f}, "
      f"static {live_engine['static']['reserved_over_used']:.2f}")
""")

md(r"""
On a model this small, much of a step's time is Python and the per-operation overhead, not
the weights, so the gains here are smaller than on a real model. The course recorded the same
measurements on GPT-2's shape (124M parameters, random weights, float32) with
`python -m kvlab.bench --serving`; the record names its machine, and it was taken while other
jobs shared that machine, so only ratios within it are meaningful.
""")

code(r"""
record = kvlab.bench.load_recorded("cpu_serving")
print(f"recorded on: {record['cpu']}, {record['threads']} thread(s), {record['dtype']}; {record['note']}")
print(f"{'batch':>5s} {'cached tok/s':>13s} {'uncached tok/s':>15s} {'KV MiB (cached)':>16s}")
rows_c = {r["batch_size"]: r for r in record["batch_sweep"] if r["use_cache"]}
rows_u = {r["batch_size"]: r for r in record["batch_sweep"] if not r["use_cache"]}
for B, r in rows_c.items():
    u = f"{rows_u[B]['throughput_tok_s']:15.1f}" if B in rows_u else f"{'not run':>15s}"
    print(f"{B:5d} {r['throughput_tok_s']:13.1f} {u} {r['kv_bytes'] / 2**20:16.1f}")
t = record["targets"]
print(f"\nengine, 16 at once, vs one at a time: {t['engine_speedup']:.2f}x tokens/s (target >= 4)")
print(f"reserved / used KV bytes: paged {t['paged_reserved_over_used']:.3f} (target <= 1.15), "
      f"static {t['static_reserved_over_used']:.3f}")
print(f"16 requests sharing a 256-token prompt: {t['prefix_shared_over_unshared']:.4f} of the unshared "
      f"prompt KV bytes (target <= 1/8)")
print(f"\nfor comparison, the batch sweep: batch 16 gives {rows_c[16]['throughput_tok_s'] / rows_c[1]['throughput_tok_s']:.1f}x "
      f"the tokens/s of batch 1; uncached stopped after batch {max(rows_u)}, whose run took "
      f"{rows_u[max(rows_u)]['total_s']:.0f} s")
print("command:", record["command"])
assert t["paged_reserved_over_used"] <= 1.15 and t["prefix_shared_over_unshared"] <= 1 / 8
assert record["engine"]["paged"]["tokens_equal"] == 1.0 and record["prefix"]["tokens_equal"]
from kvlab.serving_bench import plot_serving
plot_serving(record)
plt.show()
""", mystnb={"image": {"alt": (
    "Four panels for GPT-2's shape on a CPU: throughput rising with batch size for cached generation and "
    "staying low for uncached; cached KV memory growing in proportion to the batch; bars of tokens per "
    "second for one request at a time and for the engine; bars of reserved over used bytes, static far above "
    "paged, and of shared over unshared prompt bytes, far below one.")}})

md(r"""
Uncached generation stops early in the record: each of its steps recomputes all B × (prompt +
generated) positions, so its time grows with the batch times the square of the length, and the
bench stops it after the first batch size that takes longer than its budget (the
`--serving-uncached-budget` in the command above).

Two of the three targets hold in this record: paged memory stays close to what is used, and the
shared prompt is stored once. The engine's gain over one request at a time is smaller than the
batch sweep's gain from batch 1 to batch 16, and, on this loaded CPU thread, below the fourfold
target. Two things shrink it. The prompts must be prefilled either way, and a prefill is
already a batched forward, so that part of the work gains nothing from serving requests
together. And on one CPU thread a decode step of 16 rows is limited by arithmetic, not by
reading the weights, so it costs several times a step of one row; the batch sweep shows the
same flattening. On a GPU, where one row leaves almost all of the arithmetic idle, the same
engine should gain far more (not measured here).

## Summary

- A **ragged batch** puts requests of different lengths in one forward pass. Positions are per
  row, (B, T); the mask is built from positions (key $j$ visible when $j \le q$); pads are never
  written and never read. Each result then equals the request run alone.
- **Paged KV memory** cuts the cache into blocks from one pool; a **block table** per request
  maps position $p$ to block `table[p // block_size]`, offset `p % block_size`, and attention
  gathers a request's blocks in table order. Memory held follows the tokens cached, within one
  block per request.
- **Continuous batching** admits and retires requests at every step. Each request keeps its
  own sampling settings and random generator, so batching changes when its tokens come, never
  which.
- Out of blocks, the engine makes new requests wait and **preempts** the newest running one,
  which recomputes its cache when it comes back; nothing is dropped.
- **Prefix sharing** stores a common prompt's blocks once, with holder counts and
  **copy-on-write** before a write into a shared block.

## Exercises
""")

# -- exercise 1: left padding (reason) --
md(r"""
```{exercise} Positions and mask for left padding
:label: ex-09-left-pad

Some servers pad on the *left*, so that every row's newest token is in the last column.
Write `my_left_pad(lengths, T)`: `lengths` is a (B,) tensor of prompt lengths, `T` the padded
width, and row `b`'s real tokens fill its last `lengths[b]` columns. Return `(positions, mask)`:
`positions` (B, T), an integer tensor with each real token's position in its own prompt (a
pad's position must only be a valid index, `>= 0`); `mask` (B, T, T), bool, `mask[b, i, j]`
True when the query in column `i` may attend to the key in column `j`. A real query sees exactly
the real keys at or before it; a pad query must see at least one key (any).
```
""")
code(r'''
def my_left_pad(lengths, T):
    """lengths (B,), T -> positions (B, T) long, mask (B, T, T) bool, for left-padded rows."""
    raise NotImplementedError  # your code here
''', tags=["exercise-stub"])
md("```{solution-start} ex-09-left-pad\n:class: dropdown\n```")
code(r'''
def solution_left_pad(lengths, T):
    """lengths (B,), T -> positions (B, T) long, mask (B, T, T) bool, for left-padded rows."""
    cols = torch.arange(T)
    start = (T - lengths)[:, None]  # (B, 1): each row's first real column
    real = cols[None, :] >= start  # (B, T)
    positions = (cols[None, :] - start).clamp(min=0)  # real tokens count from 0; pads sit at 0
    causal = cols[None, :] <= cols[:, None]  # (T, T): key column <= query column
    mask = real[:, None, :] & causal[None]  # (B, T, T): real keys at or before the query
    mask |= torch.eye(T, dtype=torch.bool)[None] & ~real[:, :, None]  # a pad query sees itself
    return positions, mask


checks.check_left_pad(solution_left_pad)
''', tags=["solution"])
md("```{solution-end}\n```")
code("checks.check_left_pad(my_left_pad)", tags=["exercise-check"])

# -- exercise 2: the gather (re-implement) --
md(r"""
```{exercise} The block-table gather
:label: ex-09-gather

Write `my_gather_kv(pool, block_table, length)`: `pool` is one layer's keys, (num_blocks,
block_size, Hkv, D); `block_table` a (nb,) tensor of block ids in position order; `length` the
number of cached positions (the last block may be partly filled). Return the request's keys in
position order as (Hkv, length, D), the layout attention wants, without changing `pool`.
```
""")
code(r'''
def my_gather_kv(pool, block_table, length):
    """pool (NB, BS, Hkv, D), block_table (nb,), length -> (Hkv, length, D)."""
    raise NotImplementedError  # your code here
''', tags=["exercise-stub"])
md("```{solution-start} ex-09-gather\n:class: dropdown\n```")
code(r'''
def solution_gather_kv(pool, block_table, length):
    """pool (NB, BS, Hkv, D), block_table (nb,), length -> (Hkv, length, D)."""
    blocks = pool[block_table]  # (nb, BS, Hkv, D): the request's blocks, in table order
    flat = blocks.reshape(-1, pool.size(2), pool.size(3))  # (nb·BS, Hkv, D): position order
    return flat[:length].transpose(0, 1)  # drop the unfilled tail; heads first


checks.check_gather_kv(solution_gather_kv)
''', tags=["solution"])
md("```{solution-end}\n```")
code("checks.check_gather_kv(my_gather_kv)", tags=["exercise-check"])

# -- exercise 3: block size (experiment) --
md(r"""
```{exercise} What a larger block costs
:label: ex-09-block-size

Re-run the workload of the section *Reserved against used memory* through the paged engine
with `block_size=64` instead of 16 (same `workload`, `max_batch_size=8`, `max_seq_len=longest`),
and compute reserved / used the same way: the sum of `kv_bytes_reserved()` over every step
divided by the sum of `kv_bytes_used()`. Set `my_waste_64` to that number. Is it closer to the
paged or to the static ratio printed there, and why?
```
""")
code(r'''
my_waste_64 = None  # your answer here
''', tags=["exercise-stub"])
md("```{solution-start} ex-09-block-size\n:class: dropdown\n```")
code(r'''
e64 = Engine(model, max_batch_size=8, block_size=64, max_seq_len=longest)
solution_waste_64 = run_workload(e64, workload)["reserved_over_used"]
print(f"block 64: {solution_waste_64:.2f}; block 16: {ratio['paged']:.2f}; static: {ratio['static']:.2f}")
# Most requests here are shorter than 64 + 48 tokens, so a 64-position block is a large share of
# each request: the unfilled part of the last block, up to 63 positions, is what is wasted.
checks.check_block_size_waste(solution_waste_64)
''', tags=["solution"])
md("```{solution-end}\n```")
code("checks.check_block_size_waste(my_waste_64)", tags=["exercise-check"])

nb = nbformat.v4.new_notebook(cells=cells, metadata=colab["metadata"])
nb.nbformat, nb.nbformat_minor = colab["nbformat"], colab["nbformat_minor"]
for i, cell in enumerate(nb.cells):
    cell.id = f"serving-{i:03d}"
    if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
nbformat.write(nb, ROOT / "notebooks/09_serving.ipynb")
print("wrote notebooks/09_serving.ipynb")
