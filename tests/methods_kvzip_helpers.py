"""A naive KVzip: one eager forward over context + repeat, explicit attention matrices, Python loops.

Shared by the kvzip tests and the training tests (the teacher the learned methods are compared with).
"""

from __future__ import annotations

import torch

from kvbench.core.reconstruction import REPEAT_FIRST, REPEAT_NEXT


def _repeat_inputs(tokenizer, ids, chunk_size, quote=8):
    """(start, end, repeat ids) per chunk, written out from the KVzip recipe, not the method's helpers."""
    # the prefix is everything the chat template puts before the user content
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "@@"}], tokenize=False,
                                             add_generation_prompt=True)
    before, after = rendered.split("@@")
    prefix_ids = tokenizer.encode(before, add_special_tokens=False)
    common = 0
    while common < len(prefix_ids) and ids[common] == prefix_ids[common]:
        common += 1
    suffix = tokenizer.encode(after, add_special_tokens=False)
    chunks = []
    for start in range(common, len(ids), chunk_size):
        end = min(start + chunk_size, len(ids))
        if start == common:
            prompt = tokenizer.encode(REPEAT_FIRST, add_special_tokens=False)
        else:
            prompt = tokenizer.encode(REPEAT_NEXT, add_special_tokens=False) + ids[max(start - quote, common):start]
        chunks.append((start, end, prompt + suffix + ids[start:end]))
    return common, chunks


@torch.no_grad()
def naive_kvzip(eager_model, tokenizer, ids, chunk_size, plus=False):
    """Per layer ``(1, Hkv, T)``: max over repeat queries and GQA group of the attention probability,
    renormalised over the keys the chunk's softmax covers (prefix, chunk, repeat)."""
    config = eager_model.config
    layers = config.num_hidden_layers
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group = q_heads // kv_heads
    dim = config.head_dim
    total = len(ids)
    prefix, chunks = _repeat_inputs(tokenizer, ids, chunk_size)
    scores = torch.zeros(layers, kv_heads, total)
    for start, end, repeat in chunks:
        n = len(repeat)
        full = torch.tensor([ids + repeat])
        out = eager_model(full, output_attentions=True, output_hidden_states=True, use_cache=True)
        subset = list(range(prefix)) + list(range(start, end)) + list(range(total, total + n))
        for layer in range(layers):
            probs = out.attentions[layer][0]  # (Hq, T + n, T + n)
            values = out.past_key_values.layers[layer].values[0]  # (Hkv, T + n, D)
            attn = eager_model.model.layers[layer].self_attn
            x = eager_model.model.layers[layer].input_layernorm(out.hidden_states[layer])[0]  # (T + n, d)
            for kv in range(kv_heads):
                for j in list(range(prefix)) + list(range(start, end)):
                    best = 0.0
                    for h in range(kv * group, (kv + 1) * group):
                        w_o = attn.o_proj.weight[:, h * dim:(h + 1) * dim]
                        out_norm = (w_o @ values[kv, j]).norm()
                        rows = probs[h, total:]  # the repeat queries' rows
                        p = rows[:, j] / rows[:, subset].sum(-1)
                        if plus:
                            p = p * out_norm / x[total:].norm(dim=-1)
                        best = max(best, float(p.max()))
                    if j < prefix:
                        scores[layer, kv, j] = max(float(scores[layer, kv, j]), best)
                    else:
                        scores[layer, kv, j] = best
    if plus:
        scores = scores.log()
    return [scores[layer].unsqueeze(0) for layer in range(layers)]
