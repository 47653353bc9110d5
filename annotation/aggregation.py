"""Dawid-Skene aggregation: EM over one confusion matrix per labeler (Dawid & Skene, 1979).

Pure numpy. Input is the votes as parallel arrays of dense indices; output is, per item, the
posterior over classes, and per labeler a trust score (their estimated accuracy).
"""

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from annotation.agreement import value_counts


@dataclass(frozen=True)
class DawidSkene:
    posterior: npt.NDArray[np.float64]  # items x classes
    confusion: npt.NDArray[np.float64]  # labelers x true class x given class
    prior: npt.NDArray[np.float64]
    iterations: int

    @property
    def label(self) -> npt.NDArray[np.int64]:
        return self.posterior.argmax(axis=1)

    @property
    def confidence(self) -> npt.NDArray[np.float64]:
        return self.posterior.max(axis=1)

    @property
    def trust(self) -> npt.NDArray[np.float64]:
        """Each labeler's probability of giving the true class, weighted by how common classes are."""
        diagonal = np.diagonal(self.confusion, axis1=1, axis2=2)
        return diagonal @ self.prior


def dawid_skene(
    items: npt.NDArray[np.int64],
    labelers: npt.NDArray[np.int64],
    labels: npt.NDArray[np.int64],
    *,
    classes: int,
    max_iterations: int = 50,
    tolerance: float = 1e-6,
    smoothing: float = 0.01,
) -> DawidSkene:
    n_items = int(items.max()) + 1
    n_labelers = int(labelers.max()) + 1
    # Start from the vote shares (soft majority), as Dawid and Skene do.
    counts = value_counts(items, labels, classes).astype(np.float64)
    posterior = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    posterior[counts.sum(axis=1) == 0] = 1 / classes
    given = labelers * classes + labels  # (labeler, given class) as one index, for bincount
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        # M-step: class prior and each labeler's confusion matrix from the current posteriors.
        prior = (posterior.sum(axis=0) + smoothing) / (n_items + classes * smoothing)
        confusion = np.full((n_labelers, classes, classes), smoothing)
        weights = posterior[items]
        for true in range(classes):
            confusion[:, true, :] += np.bincount(
                given, weights=weights[:, true], minlength=n_labelers * classes
            ).reshape(n_labelers, classes)
        confusion /= confusion.sum(axis=2, keepdims=True)
        # E-step: posterior over the true class of each item given all its votes.
        log_likelihood = np.tile(np.log(prior), (n_items, 1))
        log_confusion = np.log(confusion[labelers, :, labels])
        for true in range(classes):
            log_likelihood[:, true] += np.bincount(items, weights=log_confusion[:, true], minlength=n_items)
        log_likelihood -= log_likelihood.max(axis=1, keepdims=True)
        updated = np.exp(log_likelihood)
        updated /= updated.sum(axis=1, keepdims=True)
        change = float(np.abs(updated - posterior).max())
        posterior = updated
        if change < tolerance:
            break
    return DawidSkene(posterior=posterior, confusion=confusion, prior=prior, iterations=iterations)
