"""KVzip's context reconstruction: the repeat pass that scores every context KV entry.

Used by the ``kvzip`` method and by the training targets of the learned methods that imitate it
(``gated``, ``kvzap``). After the context is prefilled, the model is asked to repeat it: a "repeat
the previous context" prompt, then the context itself, teacher-forced, in chunks of about 2,000
tokens (each later chunk's prompt quotes the last 8 tokens of the previous chunk, as the reference
does). An entry's score is the largest attention probability any repeat query of any query head in
its GQA group gives it. The repeat's own KV is discarded afterwards, so the cache is left exactly as
prefilled.

Following the reference code, each chunk's probabilities are a softmax over the template prefix
(the system prompt and user header, which KVzip treats as sinks), the chunk of context being
repeated and the repeat itself; for a context of one chunk that is the whole cache.

KVzip+ (Jegou et al., 2026, KVzap's target) weighs each probability by how much the entry can move
the output, ``||W_o^h v_j||``, relative to the size of the query token's attention input ``||x_i||``,
then takes the log.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvbench.core.attention import attention_rows, project_queries, reduce_group
from kvbench.core.cache import cache_argument
from kvbench.core.engine import attention_modules
from kvbench.core.prompts import split_prompt, template_prefix_length
from kvbench.core.scoring import HiddenRecorder

REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with "


@dataclass
class RepeatChunk:
    start: int  # first cache index of the context slice this chunk reconstructs
    end: int
    ids: torch.Tensor  # (1, n): repeat prompt, template suffix, then the slice's own tokens


def template_parts(tokenizer, context_ids: list[int]) -> tuple[int, list[int]]:
    """Length of the chat-template prefix the context starts with (0 if none) and the turn's suffix ids.

    The prefix (system prompt, user header) is not reconstructed: KVzip keeps it as sinks. The suffix
    (end of the user turn, assistant header) follows the repeat prompt, so the model answers it.
    """
    prefix = template_prefix_length(tokenizer, context_ids)
    if prefix:
        suffix = split_prompt(tokenizer, "", chat_template=True).suffix
        return prefix, tokenizer.encode(suffix, add_special_tokens=False)
    return 0, tokenizer.encode("\n", add_special_tokens=False)


def repeat_chunks(tokenizer, context_ids: list[int], prefix: int, suffix_ids: list[int], chunk_size: int,
                  quote_tokens: int) -> list[RepeatChunk]:
    chunks = []
    for start in range(prefix, len(context_ids), chunk_size):
        end = min(start + chunk_size, len(context_ids))
        if start == prefix:
            prompt = tokenizer.encode(REPEAT_FIRST, add_special_tokens=False)
        else:
            quote = context_ids[max(start - quote_tokens, prefix):start]
            prompt = tokenizer.encode(REPEAT_NEXT, add_special_tokens=False) + quote
        ids = prompt + suffix_ids + context_ids[start:end]
        chunks.append(RepeatChunk(start, end, torch.tensor([ids])))
    return chunks


def output_norms(attn: nn.Module, values: torch.Tensor, q_heads: int) -> torch.Tensor:
    """``||W_o^h v_j||`` for every query head h and entry j: ``(B, Hq, n)``, via the Gram of W_o's slice."""
    batch, kv_heads, n, dim = values.shape
    w = attn.o_proj.weight.float().view(-1, q_heads, dim)  # (d_model, Hq, D)
    gram = torch.einsum("mhi,mhj->hij", w, w)  # (Hq, D, D)
    v = values.float().repeat_interleave(q_heads // kv_heads, dim=1)  # (B, Hq, n, D)
    return torch.einsum("bhni,hij,bhnj->bhn", v, gram, v).clamp_min(0).sqrt()


@torch.inference_mode()
def reconstruction_scores(
    model,
    cache,
    context_ids: torch.Tensor,
    tokenizer,
    chunk_size: int = 2000,
    quote_tokens: int = 8,
    query_block: int = 256,
    plus: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """KVzip scores ``(B, Hkv, T)`` per layer for a cache holding exactly ``context_ids``, and, with
    ``plus``, the log KVzip+ scores too (one repeat pass serves both). The cache is left as found."""
    ids = context_ids[0].tolist()
    total = len(ids)
    lengths = cache.lengths()
    if any(layer.length != total for layer in cache.layers if layer.compressible):
        raise ValueError(f"kvzip scores a freshly prefilled cache of {total} entries, not {lengths}")
    modules = attention_modules(model)
    device = context_ids.device
    kv_heads = cache.layers[0].keys.shape[1]
    batch = context_ids.shape[0]
    # sliding-window layers (never cut) get zeros over the window they hold
    scores = [torch.zeros(batch, kv_heads, layer.length, device=device) for layer in cache.layers]
    plus_scores = [torch.zeros(batch, kv_heads, layer.length, device=device) for layer in cache.layers] if plus \
        else None
    prefix, suffix = template_parts(tokenizer, ids)

    for chunk in repeat_chunks(tokenizer, ids, prefix, suffix, chunk_size, quote_tokens):
        repeat = chunk.ids.to(device)
        n = repeat.shape[1]
        positions = torch.arange(total, total + n, device=device).unsqueeze(0)
        with HiddenRecorder(modules, keep=None) as recorder:
            model.model(input_ids=repeat, **cache_argument(model.model, cache), position_ids=positions, use_cache=True)
        # the keys one chunk's softmax runs over: prefix (sinks), the chunk being repeated, the repeat
        subset = torch.cat([
            torch.arange(0, prefix), torch.arange(chunk.start, chunk.end), torch.arange(total, total + n)
        ]).to(device)
        n_context = subset.shape[0] - n
        for layer_idx, (attn, layer) in enumerate(zip(modules, cache.layers)):
            if not layer.compressible:
                continue  # a sliding-window layer holds its window only, and eviction never cuts it
            keys = layer.keys.index_select(2, subset)
            hidden = recorder.hidden[layer_idx]
            cos, sin = recorder.rotary_tables(layer_idx)
            queries = project_queries(attn, hidden, cos, sin)
            q_heads = queries.shape[1]
            best = torch.zeros(batch, q_heads, subset.shape[0], device=device)
            best_plus = torch.zeros_like(best) if plus else None
            if plus:
                wov = output_norms(attn, layer.values.index_select(2, subset), q_heads)  # (B, Hq, S)
                x_norm = hidden.float().norm(dim=-1)  # (B, n)
            for b0 in range(0, n, query_block):
                b1 = min(b0 + query_block, n)
                probs = attention_rows(queries[:, :, b0:b1], keys, attn.scaling, first_query_index=n_context + b0)
                best = torch.maximum(best, probs.amax(dim=2))
                if plus:
                    weighted = probs * wov.unsqueeze(2) / x_norm[:, None, b0:b1, None]
                    best_plus = torch.maximum(best_plus, weighted.amax(dim=2))
            _scatter_chunk(scores[layer_idx], reduce_group(best[..., :n_context], kv_heads, "max"), prefix, chunk)
            if plus:
                kept = reduce_group(best_plus[..., :n_context], kv_heads, "max")
                _scatter_chunk(plus_scores[layer_idx], kept, prefix, chunk)
        cache.rollback(lengths)  # the repeat's KV is discarded before the next chunk
    if plus:
        plus_scores = [s.clamp_min(torch.finfo(torch.float32).tiny).log() for s in plus_scores]
    return scores, plus_scores


def _scatter_chunk(target: torch.Tensor, chunk_scores: torch.Tensor, prefix: int, chunk: RepeatChunk) -> None:
    """Prefix entries take their best score over all chunks; chunk entries are scored by their chunk."""
    target[..., :prefix] = torch.maximum(target[..., :prefix], chunk_scores[..., :prefix])
    target[..., chunk.start:chunk.end] = chunk_scores[..., prefix:]
