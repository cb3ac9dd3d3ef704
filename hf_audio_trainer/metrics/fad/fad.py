"""Frechet Audio Distance as a Hugging Face `evaluate` module.

Load it with `evaluate.load("<path to hf_audio_trainer/metrics/fad>")`. The computation is the package's own
`hf_audio_trainer.metrics.fad.fad`, imported here: there is one implementation. This folder has no
`__init__.py`, so `import hf_audio_trainer.metrics.fad` still finds the module file `metrics/fad.py`.
"""

import datasets
import evaluate
import numpy as np

from hf_audio_trainer.metrics.fad import fad

_DESCRIPTION = """
Frechet Audio Distance (Kilgour et al., 2019): fit a Gaussian to each set of clip embeddings and return the Frechet
distance between them, ||mu_p - mu_r||^2 + tr(S_p) + tr(S_r) - 2 tr((S_p S_r)^(1/2)). Lower is better; 0 means
the two sets have the same mean and covariance. Embed the clips first, e.g. with
`hf_audio_trainer.metrics.embedders.load_embedder("clap", "laion/clap-htsat-unfused").embed(waves, sample_rate)`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: embeddings of the generated clips, one vector of length dim per clip (at least 2 clips).
    references: embeddings of the reference clips, one vector of the same length dim per clip.
    `evaluate` stores inputs row by row (prediction i next to reference i), so here both sets must have the same
    number of clips. Call `hf_audio_trainer.metrics.fad.fad` directly for sets of different sizes.
Returns:
    fad: the Frechet Audio Distance, a float >= 0.
Examples:
    >>> fad = evaluate.load("hf_audio_trainer/metrics/fad")
    >>> fad.compute(predictions=generated_embeddings, references=reference_embeddings)
    {'fad': ...}
"""

_CITATION = """
@inproceedings{kilgour2019fad,
  title={Fr{\\'e}chet Audio Distance: A Reference-Free Metric for Evaluating Music Enhancement Algorithms},
  author={Kilgour, Kevin and Zuluaga, Mauricio and Roblek, Dominik and Sharifi, Matthew},
  booktitle={Interspeech},
  year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FAD(evaluate.Metric):
    """Frechet Audio Distance between two sets of embedding vectors."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("float64")),
                    "references": datasets.List(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, predictions: list, references: list) -> dict[str, float]:
        return {"fad": fad(np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64))}
