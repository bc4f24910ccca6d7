"""The computed weight a TorchDEQ norm leaves on a layer, made copyable and picklable.

TorchDEQ's norm protocol stores the constrained weight as a plain attribute that carries
autograd history (``reset_norm`` recomputes it once per forward, every use in the solver
shares it). A tensor with history cannot be deep-copied (``copy.deepcopy(model)``, as EMA
code does) and is refused by ``torch.multiprocessing``'s pickler (spawned DataLoader
workers, ``mp.spawn`` arguments, queues). :class:`NormedWeight` is that same tensor, still
in the graph, with a copy rule: a deep copy recomputes the weight from the *copied* raw
parameters (so the copy's weight trains the copy's parameters), and pickling stores the
detached values (the next ``reset_norm`` recomputes the weight after unpickling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["NormedWeight", "nonnegative"]


def nonnegative(p: torch.Tensor) -> torch.Tensor:
    """``max(p, 0)`` in value, identity in gradient, without saving ``p`` for backward.

    The gradient is that of projected gradient descent: an entry clamped to zero is
    evaluated at zero and receives the gradient there, so it can become positive again.
    Because no autograd node saves ``p`` itself (only the new tensor this returns), the
    raw parameter may later be projected in place without invalidating graphs built
    from it, which is what lets several forwards share one backward.
    """
    detached = p.detach()
    return p + (detached.clamp(min=0.0) - detached)


class NormedWeight(torch.Tensor):
    """A norm's computed weight: an ordinary tensor in the graph that survives copying.

    Arithmetic on it returns plain tensors (``__torch_function__`` is disabled, as for
    ``nn.Parameter``), so it never spreads through a model.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def wrap(
        value: torch.Tensor,
        recompute: Callable[..., torch.Tensor],
        sources: Sequence[torch.Tensor],
    ) -> NormedWeight:
        """Tag ``value`` (kept in the graph) with how to rebuild it from ``sources``."""
        weight = value.as_subclass(NormedWeight)
        weight._pc_recompute = recompute
        weight._pc_sources = tuple(sources)
        return weight

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:
        if id(self) in memo:
            return memo[id(self)]
        # nn.Module copies ``_parameters`` before plain attributes, so the copied raw
        # parameters are normally in ``memo`` already: rebuild the weight from them.
        copies = [memo.get(id(p)) for p in getattr(self, "_pc_sources", ())]
        if copies and all(c is not None for c in copies):
            with torch.set_grad_enabled(self.requires_grad):
                result: torch.Tensor = self._pc_recompute(*copies)
        else:  # copied on its own: a detached snapshot of the values
            result = torch.Tensor.detach(self).as_subclass(torch.Tensor).clone()
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, protocol: Any) -> Any:
        # values only: autograd history cannot cross a process boundary or a file
        return torch.Tensor.detach(self).as_subclass(torch.Tensor).__reduce_ex__(protocol)
