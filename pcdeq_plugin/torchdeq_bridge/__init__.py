"""``register('pcdeq')``: pcDEQ inside an existing TorchDEQ codebase.

After ``pcdeq_plugin.register()`` a TorchDEQ program selects pcDEQ by name::

    import pcdeq_plugin
    from torchdeq import get_deq, apply_norm, reset_norm

    pcdeq_plugin.register()                          # solver 'pcdeq', norm 'pc_nonneg'
    deq = get_deq(f_solver="pcdeq", b_solver="pcdeq", f_stop_mode="rel", ift=True)
    apply_norm(layer, "pc_nonneg", filter_out=["inj"])   # recurrent weights W >= 0
    reset_norm(layer)                                # at the top of every forward
    z_out, info = deq(lambda z: layer(z, x), z0)

A command-line codebase adds one parser call, :func:`add_pcdeq_args` (before or after its
``add_deq_args``): TorchDEQ's ``--b_solver`` has literal choices no registration reaches.

What is registered (TorchDEQ 0.1.0 keeps process-global dicts with silent overwrite):

* solver ``name`` (default ``"pcdeq"``): :func:`pcdeq_solver`, plain (optionally damped,
  ``tau``) fixed-point iteration, what the pcDEQ theory guarantees to converge, on
  TorchDEQ's exact solver contract. It never clamps iterates, so it also solves the
  *signed* adjoint problem TorchDEQ hands a ``b_solver``; it pads the trajectory to
  ``len(indexing)`` when it stops early, which keeps implicit differentiation alive under
  TorchDEQ's ``indexing`` core; it refuses options it would ignore.
* norm ``norm_name`` (default ``"pc_nonneg"``): :class:`PcNonnegNorm`, nonnegative
  recurrent weights through TorchDEQ's norm protocol (``apply_norm``/``reset_norm``/
  ``remove_norm``), safe for several forwards per backward, ``deepcopy``, pickling and
  ``state_dict``; custom layer types via :func:`register_pc_nonneg_module`; a warning
  (or error) when ``apply_norm`` would constrain nothing.
* core ``name`` (default ``"pcdeq"``, optional for users): TorchDEQ's default ``DEQSliced``
  core that starts every solve from the nonnegative orthant (it clamps ``z_init >= 0``, the
  precondition of pcDEQ's convergence guarantee) and warns once when the forward solver is
  an extrapolating one (``anderson``, ``broyden``) that may leave the orthant. Solver,
  core and norm names live in separate TorchDEQ dicts, so sharing ``"pcdeq"`` is fine.

:func:`register` is idempotent and thread-safe, recognises its own entries even after a
module reload, refuses to replace an entry that is not ours (and TorchDEQ's built-ins
always), and must run in *every* process: TorchDEQ's registries are not inherited by
spawned DataLoader workers, ``mp.spawn`` children or torchrun ranks. Call it at the top
level of the module that defines your model, not under ``if __name__ == "__main__":``.

TorchDEQ 0.1.0 defects handled here: early stop under the indexing core (trajectory
padding), caller's config mutated by ``get_deq``/``apply_norm`` (:func:`pcdeq_deq_kwargs`
returns a fresh dict), unknown config keys silently ignored (:func:`pcdeq_deq_kwargs`
raises), ``--b_solver`` restricted to built-ins and ``add_deq_args`` conflicting with a
second declaration (:func:`add_pcdeq_args`), exact-type norm matching that skips unknown
layers in silence (:class:`PcNonnegNorm`). Not fixable from outside: bf16 autocast with
``ift=True`` fails in TorchDEQ's ``grad.py`` whatever the solver (the README gives the
float32 workaround).
"""

from __future__ import annotations

from ._common import DEFAULT_NORM_NAME, DEFAULT_SOLVER_NAME, STOP_MODES, TORCHDEQ_BUILTINS
from .cli_args import add_pcdeq_args
from .config import PC_KEYS, pcdeq_defaults, pcdeq_deq_kwargs
from .core import pcdeq_core_class
from .norm import PARAMETRIZATIONS, PcNonnegNorm
from .norm_targets import (
    MISSING_POLICIES,
    PcNonnegNotAppliedError,
    PcNonnegNotAppliedWarning,
    register_pc_nonneg_module,
)
from .registration import TorchDEQRegistrationError, register
from .solver import SOLVER_OPTIONS, pcdeq_solver

__all__ = [
    "DEFAULT_NORM_NAME",
    "DEFAULT_SOLVER_NAME",
    "MISSING_POLICIES",
    "PARAMETRIZATIONS",
    "PC_KEYS",
    "SOLVER_OPTIONS",
    "STOP_MODES",
    "TORCHDEQ_BUILTINS",
    "PcNonnegNorm",
    "PcNonnegNotAppliedError",
    "PcNonnegNotAppliedWarning",
    "TorchDEQRegistrationError",
    "add_pcdeq_args",
    "pcdeq_core_class",
    "pcdeq_defaults",
    "pcdeq_deq_kwargs",
    "pcdeq_solver",
    "register",
    "register_pc_nonneg_module",
]
