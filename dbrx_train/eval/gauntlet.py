"""LLM Foundry's eval gauntlet: ICL accuracies -> one score per category and named averages.

As llmfoundry/callbacks/eval_gauntlet_callback.py: each benchmark's accuracy minus its random
baseline (divided by 1 - baseline with rescale_accuracy), weighted within its category (equally, by
example count or by log2 of it), then named averages (default: `default_average`, over every
category) as plain means of category scores.
"""

from __future__ import annotations

import math

from dbrx_train.config.icl import EvalGauntletConfig

GAUNTLET_PREFIX = "icl/metrics/eval_gauntlet/"  # Foundry's metric keys


def gauntlet_scores(
    gauntlet: EvalGauntletConfig, accuracies: dict[str, float], sizes: dict[str, int]
) -> dict[str, float]:
    """{category or average: score} from accuracies and example counts keyed `<label>/<n>-shot`."""
    scores: dict[str, float] = {}
    for category in gauntlet.categories:
        total, weights = 0.0, 0.0
        for bench in category.benchmarks:
            key = f"{bench.name}/{bench.num_fewshot}-shot"
            score = accuracies[key]
            if gauntlet.subtract_random_baseline:
                score -= bench.random_baseline
                if gauntlet.rescale_accuracy:
                    score /= 1.0 - bench.random_baseline
            weight = {
                "EQUAL": 1.0,
                "SAMPLE_SZ": float(max(sizes[key], 1)),
                "LOG_SAMPLE_SZ": max(math.log2(max(sizes[key], 1)), 1.0),
            }[gauntlet.weighting]
            total += score * weight
            weights += weight
        scores[category.name] = total / weights
    averages = gauntlet.averages or {"default_average": [c.name for c in gauntlet.categories]}
    for name, members in averages.items():
        scores[name] = sum(scores[m] for m in members) / len(members) if members else 0.0
    return scores
