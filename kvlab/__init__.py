"""kvlab: transformers and the KV cache, built from scratch and run for real.

The library behind the course's chapters; each module names the chapter that builds it. The
course's own code (exercise checks, bug zoo, widgets, student tools) is `kvlab.course`, loaded
only when a chapter asks for it (`from kvlab import checks`).
"""

from ._cli import refuse_non_command

# `python -m kvlab.<a module that is not a command>`: list the commands and exit with status 2,
# before importing anything else.
refuse_non_command()

from . import attention, cache, data, device, generation, gpt, layers, pretrained, sampling, seq2seq, tokenizers, viz
from .attention import CrossAttention, SelfAttention, attention_mask, attention_reference, causal_mask
from .cache import KVCache, kv_cache_bytes
from .device import describe_device, pick_device, seed_everything, synchronize
from .generation import decode_step, generate, generate_naive, next_token, prefill
from .gpt import GPT, GPTConfig
from .pretrained import (from_hf_gpt2, load_cache_family, load_cache_family_record, load_gpt2, load_shakespeare,
                         to_hf_gpt2_state_dict)
from .sampling import SamplingConfig, logits_to_probs
from .serving import generate_batch
from .seq2seq import (CrossAttentionCache, EncoderDecoderCache, Seq2SeqConfig, Seq2SeqTransformer,
                      greedy_decode)
from .tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer, gpt2_tokenizer
from . import cpu_kernels  # chapter 5
from . import beam, quantized, speculative  # chapter 10
from . import latent  # chapter 11
from .latent import MultiHeadLatentAttention, kv_bytes_per_token
from .beam import beam_search
from .speculative import speculative_generate


__version__ = "0.1.0"

__all__ = [
    # modules
    "attention", "beam", "bench", "cache", "cpu_kernels", "data", "device", "generation", "gpt", "layers",
    "latent", "pretrained", "quantized", "sampling", "seq2seq", "speculative", "tokenizers", "train", "viz",
    # the course's code (kvlab.course), by the names the chapters use
    "checks", "bugzoo", "widgets",
    # chapter 2
    "CrossAttention", "SelfAttention", "attention_mask", "attention_reference", "causal_mask",
    # chapter 3
    "GPT", "GPTConfig", "from_hf_gpt2", "load_gpt2", "load_shakespeare", "to_hf_gpt2_state_dict",
    # chapter 4
    "KVCache", "kv_cache_bytes", "decode_step", "generate", "generate_naive", "next_token", "prefill",
    # the device
    "describe_device", "pick_device", "seed_everything", "synchronize",
    # chapters 1, 7, 8, 9, 10
    "BPETokenizer", "CharTokenizer", "GPT2Tokenizer", "gpt2_tokenizer", "SamplingConfig", "logits_to_probs",
    "CrossAttentionCache", "EncoderDecoderCache", "Seq2SeqConfig", "Seq2SeqTransformer", "greedy_decode",
    "generate_batch", "beam_search", "speculative_generate",
    # chapter 11
    "MultiHeadLatentAttention", "kv_bytes_per_token", "load_cache_family", "load_cache_family_record",
]

# Load on first use (`kvlab.bench`, `from kvlab import checks`): the measurement wing is not part of
# the library a script imports; a module that is also a command (`python -m kvlab.train`) must not
# be imported before `python -m` runs it; and the course's own code lives in `kvlab.course`
# (exercise checks, bug zoo, widgets, student tools), which the chapters reach by its short names.
_LAZY = {"bench": ".bench", "course": ".course", "student": ".student", "train": ".train",
         "bugzoo": ".course.bugzoo", "checks": ".course.checks", "widgets": ".course.widgets"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(_LAZY[name], __name__)
    raise AttributeError(f"module 'kvlab' has no attribute {name!r}")
