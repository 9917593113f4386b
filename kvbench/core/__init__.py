"""The engine core: what a method sees and what eviction does.

``method`` (the Method contract and its registry), ``task`` (the Task contract), ``cache`` (the
evictable KV cache), ``attention`` (attention over an evicted cache, attention rows for scoring),
``scoring`` (the LayerView a method scores and the recorders that fill it), ``budget`` (protected
positions, budgets, top-k), ``engine`` (forward, prefill, evict, greedy decoding),
``reconstruction`` (KVzip's repeat pass), ``weights`` (where learned weights are found),
``prompts`` (where a prompt is cut). Nothing here imports a method or a task.
"""
