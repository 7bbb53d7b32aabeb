"""Expert similarity (MLAE paper, appendix A.4).

An expert's update is ``M_i = B_i A_i`` (coefficients folded into ``B``); its similarity to another is the
cosine between the flattened matrices. With the Gram matrices ``G_A = A Aᵀ`` and ``G_B = Bᵀ B`` of the
stacked factors, ``<M_i, M_j> = Σ_{p∈i, q∈j} G_A[p,q]·G_B[p,q]`` -- so no ``out × in`` matrix is ever built.
For rank-1 experts this is ``cos(a_i,a_j)·cos(b_i,b_j)``. LoRA's rank-1 components are treated the same way.
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters.base import AdapterLayer
from .errors import InputError
from .inject import adapter_layers

__all__ = ["expert_similarity", "similarity_matrix"]


@torch.no_grad()
def similarity_matrix(layer: AdapterLayer) -> torch.Tensor:
    """``[E, E]`` cosine similarities between the experts of one adapter layer (NaN where an expert is zero)."""
    if not isinstance(layer, AdapterLayer):  # a whole model is the natural mistake: expert_similarity takes one
        raise InputError(f"similarity_matrix takes one adapter layer (one of mlae.adapter_layers(model)), not a "
                        f"{type(layer).__name__}; mlae.expert_similarity(model) covers a whole model")
    a, b = (t.detach().double() for t in layer.factors())
    sizes = layer.expert_sizes()
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    onehot = torch.nn.functional.one_hot(group, len(sizes)).double()          # [R, E]
    inner = onehot.T @ ((a @ a.T) * (b.T @ b)) @ onehot                       # Frobenius <M_i, M_j>
    norm = inner.diagonal().clamp_min(0).sqrt()
    sim = inner / (norm[:, None] * norm[None, :])
    sim[(norm[:, None] == 0) | (norm[None, :] == 0)] = float("nan")
    return sim.float()


def _mean_pairwise(sim: torch.Tensor) -> float:
    e = sim.shape[0]
    if e < 2:
        return float("nan")
    off = sim[~torch.eye(e, dtype=torch.bool)]
    return float(off.nanmean())


def expert_similarity(model: nn.Module, per_layer: bool = False) -> float | dict[str, float]:
    """Mean pairwise cosine similarity of the experts, averaged over adapted layers (``per_layer=True``:
    the value of every layer by name). Zero experts (e.g. B = 0 at initialisation) are left out."""
    values = {name: _mean_pairwise(similarity_matrix(layer)) for name, layer in adapter_layers(model)}
    if not values:
        raise InputError("the model has no adapters")
    if per_layer:
        return values
    return float(torch.tensor(list(values.values())).nanmean())
