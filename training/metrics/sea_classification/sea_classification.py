"""Accuracy and F1 of class predictions, as an `evaluate` module.

The Hub's `accuracy`/`f1` modules are used when they can be fetched; this local module stands in when the Hub
is unreachable (offline CI), with the same definitions: accuracy = share of exact matches; F1 = binary F1 of
class 1 for two classes, otherwise the unweighted mean of the per-class F1 scores.
"""

import datasets
import evaluate


class SeaClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions and references: lists of integer class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        pairs = list(zip(predictions, references))
        classes = sorted(set(predictions) | set(references))
        scored = [1] if classes and set(classes) <= {0, 1} else classes

        def f1(c):
            tp = sum(p == c and r == c for p, r in pairs)
            predicted, actual = sum(p == c for p, _ in pairs), sum(r == c for _, r in pairs)
            return 2 * tp / (predicted + actual) if predicted + actual else 0.0

        return {
            "accuracy": sum(p == r for p, r in pairs) / max(len(pairs), 1),
            "f1": sum(f1(c) for c in scored) / max(len(scored), 1),
        }
