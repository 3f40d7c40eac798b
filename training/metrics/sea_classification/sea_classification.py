"""Accuracy and F1 of class predictions, as an `evaluate` module over scikit-learn's metrics (which the Hub's
`accuracy` and `f1` modules wrap too), shipped with the project so that the numbers never depend on reaching the
Hub: accuracy = share of exact matches; F1 = binary F1 of class 1 for two classes, otherwise the unweighted mean of
the per-class F1 scores (the Hub's `f1` module would need `average=` for more than two classes).
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score


class SeaClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions and references: lists of integer class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        binary = set(predictions) | set(references) <= {0, 1}
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1_score(references, predictions, average="binary" if binary else "macro")),
        }
