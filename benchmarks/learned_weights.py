"""Old against new learned weights, side by side, on the samples both sweeps finished.

    python benchmarks/learned_weights.py OLD_RESULTS NEW_RESULTS   (the sweeps in benchmarks/learned_weights.txt)
"""
import sys
import pandas as pd
from kvbench.results import read_results

old, new = read_results(sys.argv[1]), read_results(sys.argv[2])
for df in (old, new):
    df["cell"] = df["method"] + "@" + df["target_ratio"].map(lambda r: "tau=-4" if pd.isna(r) else f"{r:g}")
common = sorted(set(old["sample_id"]) & set(new["sample_id"]))
print(f"samples in both: {len(common)} ({', '.join(common)})")
rows = []
for cell in sorted(set(old["cell"]) | set(new["cell"])):
    o = old[(old["cell"] == cell) & old["sample_id"].isin(common)]
    n = new[(new["cell"] == cell) & new["sample_id"].isin(common)]
    rows.append({"cell": cell, "old_score": o["score"].mean(), "new_score": n["score"].mean(),
                 "old_token_match": o["token_match"].mean(), "new_token_match": n["token_match"].mean(),
                 "old_measured_ratio": o["measured_ratio"].mean(), "new_measured_ratio": n["measured_ratio"].mean(),
                 "rows": f"{len(o)}/{len(n)}"})
print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
