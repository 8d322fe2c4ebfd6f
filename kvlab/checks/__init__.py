"""Exercise checks: one function per exercise, called from the notebooks with the learner's code.

A check runs the learner's function against kvlab's reference on several random shapes and
edge cases. It returns quietly (printing a short "passed" line) when the answer is right, and
raises `AssertionError` with a hint that points at the mistake without giving the answer away
when it is not. An exercise not attempted yet (a stub that raises `NotImplementedError`, or an
answer still `None`) prints one "✗ ... not done yet" line and does not raise, so a chapter run
top to bottom goes on past it; `python -m kvlab.student grade` counts that line as a fail.
Every public check is wrapped in `learner_check` (see `_common`).

Each chapter's checks live in their own module and are re-exported here, so a notebook writes
`from kvlab import checks` and calls `checks.check_causal_mask(my_causal_mask)`.
"""

from ._common import ExerciseNotDone, is_not_done_line, learner_check, passed, require_answer  # noqa: F401
from .attention import check_attention, check_causal_mask, check_multi_head_attention, check_repeat_kv  # noqa: F401
from .gpt import (check_apply_rope, check_gpt2_param_count, check_hf_conv1d_to_linear, check_layer_norm,  # noqa: F401
                  check_rms_norm)
from .kv_cache import (check_chunked_prefill, check_concat_cache, check_kv_cache_bytes,  # noqa: F401
                       check_sliding_window_mask)
from .tokens import (check_bpe_encode, check_char_tokenizer, check_get_batch, check_merge,  # noqa: F401
                     check_most_frequent_pair)
from .seq2seq import check_cross_attention, check_greedy_decode, check_padding_mask  # noqa: F401
from .bugzoo import (CacheCheckFailed, check_cache, check_chunked_prefill_mask, check_decode_positions,  # noqa: F401
                     check_keys_values, check_reset_between_prompts, check_window_eviction)
from .training import check_clip_grad_norm, check_cross_entropy, check_lr_at, check_param_groups  # noqa: F401
from .measuring import check_decode_bytes, check_kl_divergence, check_time_steps  # noqa: F401
from .sampling import check_min_p_filter, check_top_p_filter, check_top_prob_at_temperature  # noqa: F401
from .beyond import check_acceptance_rate, check_int8_bytes_per_token, check_reorder_cache  # noqa: F401
