import math

import pytest
import torch

from ibaml.data.sine import SineTaskDistribution
from ibaml.data.tasks import TaskBatch


def test_shapes_ranges_and_targets():
    tasks = SineTaskDistribution(shots=5, query=7)
    b = tasks.sample(30, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (30, 5, 1) and b.query_y.shape == (30, 7, 1)
    assert b.support_x.min() >= -5 and b.support_x.max() <= 5
    amp, phase = b.info["amplitude"], b.info["phase"]
    assert amp.min() >= 0.1 and amp.max() <= 5 and phase.min() >= 0 and phase.max() <= math.pi
    expected = amp.view(-1, 1, 1) * torch.sin(b.query_x - phase.view(-1, 1, 1))
    assert torch.allclose(b.query_y, expected)


def test_seeded_and_out_of_range():
    tasks = SineTaskDistribution()
    a = tasks.sample(4, torch.Generator().manual_seed(1))
    b = tasks.sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    c = tasks.sample(4, torch.Generator().manual_seed(2))
    assert not torch.equal(a.support_x, c.support_x)
    far = tasks.out_of_range().sample(50, torch.Generator().manual_seed(3), dtype=torch.float64)
    assert far.query_x.min() >= 5 and far.query_x.max() <= 10 and far.support_x.max() <= 5
    assert far.query_x.dtype == torch.float64


def test_task_batch_indexing_and_to():
    b = SineTaskDistribution().sample(6, torch.Generator().manual_seed(4))
    part = b[2:4]
    assert isinstance(part, TaskBatch) and part.num_tasks == 2 and part.info["amplitude"].shape == (2,)
    assert b.to(dtype=torch.float64).support_y.dtype == torch.float64


@pytest.mark.parametrize("kwargs, message", [
    (dict(shots=0), "shots"),
    (dict(query=-1), "query"),
    (dict(amp_range=(5, 1)), "amp_range"),
    (dict(x_range=(0,)), "x_range"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SineTaskDistribution(**kwargs)
