"""The device path of every view policy, forced on the CPU: the CPU path's bits, no host
sync, one torch.compile graph without recompiles."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from kdcache.augment import get_policy, normalize, view_seeds
from kdcache.augment.census import OpCensus
from test_augment import IMAGES, MEAN, STD

# (policy, input size): imagenet_* policies read inputs larger than the 32 px output.
POLICIES = [("weak", 32), ("strong", 32), ("identity", 32), ("identity", 48), ("imagenet_weak", 48),
            ("imagenet_strong", 48)]


def images_of_size(size):
    if size == IMAGES.shape[-1]:
        return IMAGES
    return torch.nn.functional.interpolate(IMAGES.float(), size=size).to(torch.uint8)


@pytest.mark.parametrize("name, size", POLICIES)
def test_device_path_gives_the_cpu_path_bits(name, size):
    policy, images = get_policy(name, 32), images_of_size(size)
    for round_ in range(3):
        seeds = view_seeds(7, round_, 1, torch.arange(len(images)))
        assert torch.equal(policy(images, seeds, dense=True), policy(images, seeds, dense=False))


@pytest.mark.parametrize("name, size", POLICIES)
def test_device_path_issues_no_host_sync(name, size):
    policy, images = get_policy(name, 32), images_of_size(size)
    seeds = view_seeds(0, 0, 1, torch.arange(len(images)))
    with OpCensus() as census:
        normalize(policy(images, seeds, dense=True), MEAN, STD)
    assert census.sync_count == 0, dict(census.syncs)
    assert census.op_count > 0


def test_census_counts_host_syncs():
    x = torch.arange(6)
    with OpCensus() as census:
        torch.tensor([1, 2])  # a host constant
        x[x > 2]  # boolean mask: nonzero inside index
        x.sum().item()
        get_policy("strong", 32)(IMAGES, view_seeds(0, 0, 1, torch.arange(len(IMAGES))), dense=False)
    assert census.syncs["aten.lift_fresh.default"] == 1
    assert census.syncs["aten.index.Tensor"] == 1
    assert census.syncs["aten._local_scalar_dense.default"] == 1
    assert census.syncs["aten.nonzero.default"] > 0  # the sparse CPU path finds its rows


@pytest.mark.parametrize("name, size", POLICIES)
def test_view_call_is_one_graph_without_recompiles(name, size):
    """Seeds are computed outside the graph: the round is a Python int that would specialise it."""
    policy, images = get_policy(name, 32), images_of_size(size)

    def views(images, seeds):
        return normalize(policy(images, seeds, dense=True), MEAN, STD)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(views)(images, view_seeds(0, 0, 1, torch.arange(len(images))))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    counter = CompileCounter()
    compiled = torch.compile(views, backend=counter)
    for round_ in range(3):
        seeds = view_seeds(0, round_, 1, torch.arange(len(images)))
        assert torch.equal(compiled(images.flip(0) if round_ else images, seeds),
                           views(images.flip(0) if round_ else images, seeds))
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_inductor_compiles_the_strong_view_to_the_same_bits():
    """Inductor codegen of the whole strong view (seeds to pixels) runs, in exact int64 arithmetic."""
    policy = get_policy("strong", 32)
    images = IMAGES[:8]

    def views(images, indices):
        return policy(images, view_seeds(3, 1, 1, indices), dense=True)

    torch._dynamo.reset()
    compiled = torch.compile(views, dynamic=False)
    for start in (0, 8):
        indices = torch.arange(start, start + 8)
        assert torch.equal(compiled(images, indices), views(images, indices))
    torch._dynamo.reset()
