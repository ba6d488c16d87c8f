"""Ridge regression in numpy: standardised inputs, closed-form fit, JSON-ready weights.

Both learned stages use it (the task classifier one-vs-rest, the difficulty scorer as a
regression), so the service needs numpy only at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class RidgeModel:
    """``y = ((x - mean) / scale) @ coef + intercept``; ``coef`` has one column per output."""

    mean: Matrix
    scale: Matrix
    coef: Matrix
    intercept: Matrix

    @classmethod
    def fit(
        cls,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        alpha: float = 10.0,
        sample_weight: npt.ArrayLike | None = None,
    ) -> RidgeModel:
        """Fit on rows ``x`` and targets ``y`` (one column or several) with L2 penalty ``alpha``."""
        xs = np.asarray(x, dtype=np.float64)
        ys = np.asarray(y, dtype=np.float64)
        if ys.ndim == 1:
            ys = ys[:, None]
        w = np.ones(len(xs)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        w = w / w.sum()
        mean = w @ xs
        scale = np.sqrt(w @ (xs - mean) ** 2)
        scale[scale < 1e-9] = 1.0
        z = (xs - mean) / scale
        y_mean = w @ ys
        zw = z * w[:, None]
        gram = zw.T @ z + (alpha / len(xs)) * np.eye(z.shape[1])
        coef = np.linalg.solve(gram, zw.T @ (ys - y_mean))
        return cls(mean=mean, scale=scale, coef=coef, intercept=y_mean)

    def predict(self, x: npt.ArrayLike) -> Matrix:
        """Predictions, shape (rows, outputs)."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return np.asarray(z @ self.coef + self.intercept, dtype=np.float64)

    def to_dict(self) -> dict[str, list[float] | list[list[float]]]:
        """The weights as plain lists (for JSON artifacts)."""
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, list[float] | list[list[float]]]) -> RidgeModel:
        """The inverse of ``to_dict``."""
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float64),
            scale=np.asarray(data["scale"], dtype=np.float64),
            coef=np.asarray(data["coef"], dtype=np.float64),
            intercept=np.asarray(data["intercept"], dtype=np.float64),
        )
