"""kvlab: transformers and the KV cache, built from scratch and run for real.

The library behind the course's chapters; each module names the chapter that builds it.
"""

from . import attention, cache, data, device, gpt, layers, pretrained, sampling, tokenizers, train, viz
from .attention import CrossAttention, SelfAttention, attention_mask, attention_reference, causal_mask
from .cache import KVCache, kv_cache_bytes
from .device import describe_device, pick_device, seed_everything, synchronize
from .generate import decode_step, generate, generate_naive, next_token, prefill
from .gpt import GPT, GPTConfig
from .pretrained import from_hf_gpt2, load_gpt2, to_hf_gpt2_state_dict
from .sampling import logits_to_probs
from .tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer, gpt2_tokenizer

# Last: the exercise checks use the names above.
from . import checks  # noqa: E402

__version__ = "0.1.0"
