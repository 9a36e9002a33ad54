"""NIST StRD nonlinear regression: certified least-squares solutions with standard starts.

The data files in ``tests/data/nist`` are NIST's (public domain, Statistical Reference
Datasets, https://www.itl.nist.gov/div898/strd/nls/nls_main.shtml). Each gives data, two
starting points (start 2 is nearer the answer) and certified parameters to 11 digits. The
models below are written from the formula in each file's header. Nelson (two predictors)
is left out: a batchfit series has one x.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

DATA = os.path.join(os.path.dirname(__file__), "data", "nist")
TWO_PI = 2 * math.pi


def _exp_decays(x, b):  # Lanczos: three exponentials
    return b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-b[3] * x) + b[4] * torch.exp(-b[5] * x)


def _gauss(x, b):  # exponential baseline plus two Gaussian peaks
    return (b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-(x - b[3]) ** 2 / b[4] ** 2)
            + b[5] * torch.exp(-(x - b[6]) ** 2 / b[7] ** 2))


def _chwirut(x, b):
    return torch.exp(-b[0] * x) / (b[1] + b[2] * x)


def _rational33(x, b):  # Hahn1, Thurber: cubic over cubic
    return ((b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3)
            / (1 + b[4] * x + b[5] * x**2 + b[6] * x**3))


def _misra1a(x, b):  # also BoxBOD
    return b[0] * (1 - torch.exp(-b[1] * x))


MODELS = {
    "Misra1a": _misra1a,
    "Chwirut2": _chwirut,
    "Chwirut1": _chwirut,
    "Lanczos3": _exp_decays,
    "Gauss1": _gauss,
    "Gauss2": _gauss,
    "DanWood": lambda x, b: b[0] * x ** b[1],
    "Misra1b": lambda x, b: b[0] * (1 - (1 + b[1] * x / 2) ** (-2)),
    "Kirby2": lambda x, b: (b[0] + b[1] * x + b[2] * x**2) / (1 + b[3] * x + b[4] * x**2),
    "Hahn1": _rational33,
    "MGH17": lambda x, b: b[0] + b[1] * torch.exp(-x * b[3]) + b[2] * torch.exp(-x * b[4]),
    "Lanczos1": _exp_decays,
    "Lanczos2": _exp_decays,
    "Gauss3": _gauss,
    "Misra1c": lambda x, b: b[0] * (1 - (1 + 2 * b[1] * x) ** (-0.5)),
    "Misra1d": lambda x, b: b[0] * b[1] * x / (1 + b[1] * x),
    "Roszman1": lambda x, b: b[0] - b[1] * x - torch.atan(b[2] / (x - b[3])) / math.pi,
    "ENSO": lambda x, b: (b[0] + b[1] * torch.cos(TWO_PI * x / 12)
                          + b[2] * torch.sin(TWO_PI * x / 12)
                          + b[4] * torch.cos(TWO_PI * x / b[3])
                          + b[5] * torch.sin(TWO_PI * x / b[3])
                          + b[7] * torch.cos(TWO_PI * x / b[6])
                          + b[8] * torch.sin(TWO_PI * x / b[6])),
    "MGH09": lambda x, b: b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3]),
    "Thurber": _rational33,
    "BoxBOD": _misra1a,
    "Rat42": lambda x, b: b[0] / (1 + torch.exp(b[1] - b[2] * x)),
    "MGH10": lambda x, b: b[0] * torch.exp(b[1] / (x + b[2])),
    "Eckerle4": lambda x, b: (b[0] / b[1]) * torch.exp(-0.5 * ((x - b[2]) / b[1]) ** 2),
    "Rat43": lambda x, b: b[0] / (1 + torch.exp(b[1] - b[2] * x)) ** (1 / b[3]),
    "Bennett5": lambda x, b: b[0] * (b[1] + x) ** (-1 / b[2]),
}


@dataclass(frozen=True)
class Problem:
    name: str
    x: np.ndarray
    y: np.ndarray
    starts: tuple[np.ndarray, np.ndarray]
    certified: np.ndarray
    certified_sse: float

    def f(self, x, b):
        return MODELS[self.name](x, b)


def load(name: str) -> Problem:
    with open(os.path.join(DATA, f"{name}.dat")) as f:
        lines = f.read().splitlines()
    starts, certified, data, sse = [], [], [], None
    in_data = False
    for line in lines:
        words = line.split()
        if in_data and len(words) >= 2:
            data.append([float(v) for v in words[:2]])
        elif words[:1] and words[0].startswith("b") and len(words) >= 5 and words[1] == "=":
            starts.append([float(words[2]), float(words[3])])
            certified.append(float(words[4]))
        elif line.startswith("Residual Sum of Squares:"):
            sse = float(words[-1])
        elif line.startswith("Data:") and words[1:3] == ["y", "x"]:
            in_data = True
    table, begin = np.array(data), np.array(starts)
    return Problem(name, table[:, 1], table[:, 0], (begin[:, 0], begin[:, 1]),
                   np.array(certified), sse)


def digits(found, certified) -> float:
    """NIST's log relative error, the fewest correct digits over the parameters (max 11:
    the certified values have 11)."""
    found = np.asarray(found, dtype=np.float64)
    if not np.isfinite(found).all():
        return 0.0
    error = np.abs(found - certified) / np.abs(certified)
    return float(np.clip(-np.log10(np.maximum(error, 1e-300)), 0, 11).min())


PROBLEMS = tuple(MODELS)
