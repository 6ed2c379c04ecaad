"""Names shared by the docstring examples of ``ibaml`` and ``priors`` (run by the test command
with ``--doctest-modules``): a small sine MLP ``net``, a task family ``tasks`` with its
``generator``, a test batch ``test``, a ``model`` with its meta-parameters ``meta`` and one
``task``, and a small ridge problem ``A``, ``b``, ``lam``, ``I``."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_names(request):
    if type(request.node).__name__ != "DoctestItem":
        return
    import ibaml
    import priors
    from ibaml.data import SineTaskDistribution
    from ibaml.nets import MLP

    torch.manual_seed(0)
    net = MLP(1, (40, 40), 1)
    tasks, generator = SineTaskDistribution(shots=5, query=5), torch.Generator().manual_seed(0)
    test = tasks.sample(4, torch.Generator().manual_seed(1))
    model = ibaml.TaskModel(net, priors.DiagonalGaussian.from_module(net), ibaml.GaussianLikelihood(0.5))
    names = dict(torch=torch, ibaml=ibaml, priors=priors, MLP=MLP, net=net, tasks=tasks, generator=generator,
                 test=test, model=model, meta=model.meta_parameters(),
                 task={k: v[0] for k, v in test.as_dict().items()},
                 A=torch.randn(6, 3), b=torch.randn(6), lam=0.1, I=torch.eye(3))
    for name in ("MetaLearner", "GaussianLikelihood", "TaskModel", "MAP", "InnerLoop", "Variational"):
        names[name] = getattr(ibaml, name)
    names.update(SGD=ibaml.optim.SGD, Adam=ibaml.optim.Adam, DiagonalGaussian=priors.DiagonalGaussian,
                 IsotropicGaussian=priors.IsotropicGaussian)
    request.getfixturevalue("doctest_namespace").update(names)
