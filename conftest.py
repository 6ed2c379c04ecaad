"""Names shared by the docstring examples of ``ibaml`` and ``priors`` (run by the test command
with ``--doctest-modules``): a small sine MLP ``net``, a task family ``tasks`` with its
``generator``, a test batch ``test``, a ``model`` with its meta-parameters ``meta`` and one
``task``, and a small ridge problem ``A``, ``b``, ``lam``, ``I``; for the examples of
``ibaml.data``, small synthetic datasets on disk in the real file layouts: ``miniimagenet_root``
(the folder layout, 6 / 3 / 3 classes of 5 images) and ``omniglot_root`` (two alphabets, 12
characters), written once per test process."""

import pytest
import torch


@pytest.fixture(scope="session")
def _doctest_datasets(tmp_path_factory):
    from ibaml.data import write_fixture

    root = tmp_path_factory.mktemp("doctest_data")
    return dict(miniimagenet_root=write_fixture(root / "miniimagenet", "miniimagenet", ways=3, shots=1, query=2,
                                                format="folder"),
                omniglot_root=write_fixture(root / "omniglot", "omniglot", ways=3, shots=1, query=2))


@pytest.fixture(autouse=True)
def _doctest_names(request):
    if type(request.node).__name__ != "DoctestItem":
        return
    import ibaml
    import priors
    from ibaml.data import SineTaskDistribution
    from ibaml.core.nets import MLP

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
    names.update(SGD=ibaml.core.optim.SGD, Adam=ibaml.core.optim.Adam, DiagonalGaussian=priors.DiagonalGaussian,
                 IsotropicGaussian=priors.IsotropicGaussian)
    if request.node.name.startswith("ibaml.data."):
        names.update(request.getfixturevalue("_doctest_datasets"))
    request.getfixturevalue("doctest_namespace").update(names)
