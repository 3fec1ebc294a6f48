"""Which style (source) an image looks like, judged apart from what it shows: a linear probe on an image space.

The concept scores' style hit asks that a correct image's nearest picture be in the named style. On a held-out
(style, group) pair that is a single picture (the OpenMoji pizza is the only OpenMoji pizza), so an OpenMoji-looking
pizza whose nearest picture is another source's pizza counts as a miss. The probe asks only which style an image
looks like: multinomial logistic regression (scikit-learn) on standardised vectors, classes weighted by their
inverse frequency so that no source wins by its size, fitted on training pictures only (`evaluation.Bank`
adds a jittered copy of each). The held-out pairs' own pictures, never fitted, then measure how well it carries to
unseen (style, group) pairs: `evaluate`'s real row.
"""
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


class StyleProbe:
    """Fitted on (vectors, styles); called on vectors, gives each row's style. With a single style it is that one."""

    def __init__(self, vectors: torch.Tensor, styles: list[str]):
        self.styles = sorted(set(styles))
        self.model = None
        if len(self.styles) > 1:
            self.model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000))
            self.model.fit(vectors.double().numpy(), styles)

    def __call__(self, vectors: torch.Tensor) -> list[str]:
        if self.model is None:
            return self.styles * len(vectors)
        return self.model.predict(vectors.double().numpy()).tolist()
