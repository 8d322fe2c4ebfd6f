"""Exercise checks: one function per exercise, called from the notebooks with the learner's code.

A check runs the learner's function against kvlab's reference on several random shapes and
edge cases. It returns quietly (printing a short "passed" line) when the answer is right, and
raises `AssertionError` with a hint that points at the mistake without giving the answer away
when it is not. An exercise not attempted yet (a stub that raises `NotImplementedError`, or an
answer still `None`) prints one "✗ ... not done yet" line and does not raise, so a chapter run
top to bottom goes on past it; `python -m kvlab.student grade` counts that line as a fail.
Every public check is wrapped in `learner_check` (see `_common`).

Each chapter's checks live in their own module and are re-exported here, so a notebook writes
`from kvlab import checks` and calls `checks.check_alibi_bias(my_alibi_bias)`.
"""

from ._common import ExerciseNotDone, is_not_done_line, learner_check, passed, require_answer  # noqa: F401
from .attention import check_alibi_bias, check_entropy_ratio, check_multi_head_attention, check_pool_kv  # noqa: F401
from .gpt import check_apply_rope, check_gqa_cost, check_modern_param_count, check_rope_values  # noqa: F401
from .kv_cache import (check_chunked_prefill, check_concat_cache, check_kv_cache_bytes,  # noqa: F401
                       check_modern_forward, check_sliding_window_mask, check_window_divergence)
from .tokens import check_bpe_encode, check_domain_ratio, check_nats_per_char, check_stream_decode  # noqa: F401
from .seq2seq import (check_cross_attention, check_cross_kv_for_samples, check_decoder_layer_step,  # noqa: F401
                      check_decoder_step, check_greedy_by_hand, check_greedy_decode, check_padding_mask,
                      check_project_memory, check_saved_projections)
from .bugzoo import (CacheCheckFailed, check_cache, check_chunked_prefill_mask, check_decode_positions,  # noqa: F401
                     check_keys_values, check_reset_between_prompts, check_window_eviction)
from .training import check_accum_weights, check_dropout_gap, check_init_loss_per_char, check_lr_at  # noqa: F401
from .measuring import (check_bf16_step_times, check_compute_bound_batch, check_decode_bytes,  # noqa: F401
                        check_time_steps)
from .sampling import (check_equivalent_min_p, check_penalty_distinct_2, check_repetition_penalty,  # noqa: F401
                       check_temperature_for_half, check_top_p_filter)
from .serving import (check_block_manager, check_block_size_waste, check_left_pad, check_paged_attention,  # noqa: F401
                      check_paged_write, check_prefilled_tokens, check_prefix_cache, check_schedule)
from .beyond import (check_accept_sampled, check_acceptance_rate, check_greedy_round, check_int8_bytes_per_token,  # noqa: F401
                     check_int8_parting, check_int8_quantizer, check_reorder_cache, check_tokens_per_round)
from .smaller import (check_h2o_evictions, check_key_quantizer, check_mla_absorbed, check_sink_rotation,  # noqa: F401
                      check_v2_bytes_per_token, check_window_budget)
