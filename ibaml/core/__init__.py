"""The per-task problem and its meta-gradients: pure functions of parameter dicts.

- :mod:`~ibaml.core.tree`, :mod:`~ibaml.core.linalg`: parameter dicts as flat vectors; conjugate
  gradient, Neumann and dense solves on Hessian-vector products.
- :mod:`~ibaml.core.implicit_function`: the implicit-function rule ``dv*/dθ = −A⁻¹B`` for any
  inner objective ``G(v, θ)``, as a vector-Jacobian product or an autograd function.
- :mod:`~ibaml.core.optim`: the inner optimisers (SGD, Adam, Newton-CG, Hessian-free) and a backtracking safeguard for any of them.
- :mod:`~ibaml.core.nets`, :mod:`~ibaml.core.likelihoods`, :mod:`~ibaml.core.conjugate_noise`,
  :mod:`~ibaml.core.task_model`: a network, a likelihood and a prior as one task model.
- :mod:`~ibaml.core.inference`, :mod:`~ibaml.core.inner_loop`: MAP and variational task
  inference, the inner solve vmapped over tasks.
- :mod:`~ibaml.core.hypergrad`: per-task meta-gradient estimators (implicit, explicit,
  first-order, lazy).
- :mod:`~ibaml.core.meta_problem`: adapt, predict and per-task meta-gradients of a batch of
  tasks, the Monte Carlo draws passed as an argument.

Nothing here knows the trainer (:mod:`ibaml.train`) or the named recipes (:mod:`ibaml.recipes`).
"""

from ibaml.core import (conjugate_noise, hypergrad, implicit_function, inference, inner_loop, likelihoods, linalg,
                        meta_problem, nets, optim, task_model, tree)

__all__ = ["conjugate_noise", "hypergrad", "implicit_function", "inference", "inner_loop", "likelihoods", "linalg",
           "meta_problem", "nets", "optim", "task_model", "tree"]
