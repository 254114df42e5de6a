"""kdcache.api: the pieces of a hand-written training loop and the Dataset adapter.

The adapter must give the pixels precompute gave the teacher: its views equal the
replayer's for the same keys, its logits the store's rows, and the teacher run on its
views reproduces the stored logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

import kdcache.api
from kdcache.api import StoreDataset, TeacherLogits, eval_views, open_store, replayer_for
from kdcache.augment import get_policy
from kdcache.data import DatasetMeta, load_split, make_loader
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss
from kdcache.models import load_teacher
from kdcache.storage import LogitStore

from conftest import REPO

ROUNDS = 3


@pytest.fixture(scope="module")
def three_round_store(weak_store, tmp_path_factory):
    """weak_store's data with weak and strong slots, 3 rounds of random logits (fast to build)."""
    weak = LogitStore.open(weak_store)
    identity = weak.identity
    identity["policies"]["strong"] = get_policy("strong", 16).spec()
    store = LogitStore.create(tmp_path_factory.mktemp("stores") / "three", identity=identity,
                              num_samples=weak.num_samples, num_classes=weak.num_classes, rounds=ROUNDS,
                              views=["weak", "strong"], encoding=weak.encoding)
    replay = replayer_for(store)
    all_indices = torch.arange(weak.num_samples)
    generator = torch.Generator().manual_seed(0)
    for round_ in range(ROUNDS):
        for slot in store.views:
            logits = torch.randn(weak.num_samples, weak.num_classes, generator=generator)
            store.write_slab(round_, slot, logits, replay.seeds(round_, slot, all_indices))
    return store.path


def test_dataset_views_and_logits_are_the_replayers_and_the_stores(digits_dir, weak_store):
    dataset = StoreDataset(digits_dir, weak_store)
    loader = DataLoader(dataset, batch_size=48, shuffle=True, generator=torch.Generator().manual_seed(0))
    views, teacher_logits, labels, indices = next(iter(loader))

    store = LogitStore.open(weak_store)
    images, all_labels = load_split(digits_dir, "train")
    assert sorted(indices.tolist()) != list(range(48))  # a shuffled batch, not the first samples
    assert torch.equal(views[0], replayer_for(store)(0, "weak", images[indices], indices))
    assert torch.equal(teacher_logits[0], store.slab(0, "weak")[indices])
    assert torch.equal(labels, all_labels[indices])


def test_one_item_equals_its_row_in_a_batch(digits_dir, weak_store):
    dataset = StoreDataset(digits_dir, weak_store)
    batch = dataset.__getitems__([5, 700, 1437])
    single = dataset[700]
    assert torch.equal(single.views[0], batch[1].views[0])
    assert torch.equal(single.teacher_logits[0], batch[1].teacher_logits[0])
    assert (int(single.label), int(single.index)) == (int(batch[1].label), 700)


def test_teacher_on_the_datasets_views_reproduces_the_stored_logits(digits_dir, weak_store, teacher_ckpt):
    dataset = StoreDataset(digits_dir, weak_store)
    views, teacher_logits, _, _ = next(iter(DataLoader(dataset, batch_size=64, shuffle=True)))
    teacher = load_teacher("resnet8", teacher_ckpt, 10)
    with torch.no_grad():
        live = teacher(views[0])
    # float16 storage: about 2e-3 on digits. Views of other rounds or samples differ by whole units.
    assert torch.allclose(live, teacher_logits[0], atol=2e-2, rtol=1e-2)


def test_teacher_logits_visit_rounds_in_any_order(three_round_store, digits_dir):
    store = open_store(three_round_store, digits_dir, ["weak", "strong"])
    teacher = TeacherLogits(store)
    indices = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    for round_, slot in ((2, "strong"), (0, "weak"), (1, "weak"), (0, "strong"), (0, "weak"), (2, "weak")):
        assert torch.equal(teacher(round_, slot, indices), store.slab(round_, slot)[indices])
    assert not torch.equal(store.slab(0, "weak"), store.slab(1, "weak"))


def test_two_slots_feed_a_two_view_loss(three_round_store, digits_dir):
    store = LogitStore.open(three_round_store)
    images, _ = load_split(digits_dir, "train")
    crld = get_loss("crld")
    dataset = StoreDataset(digits_dir, three_round_store, list(crld.views), round=2)
    views, teacher_logits, labels, indices = next(iter(DataLoader(dataset, batch_size=16, shuffle=True)))
    for slot, view, logits in zip(crld.views, views, teacher_logits):
        assert torch.equal(view, replayer_for(store)(2, slot, images[indices], indices))
        assert torch.equal(logits, store.slab(2, slot)[indices])
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    loss, _ = crld([student(v) for v in views], teacher_logits, labels, epoch=0)
    loss.backward()
    assert torch.isfinite(loss)


def test_dataset_rounds_in_any_order_reach_the_workers(three_round_store, digits_dir):
    store = LogitStore.open(three_round_store)
    replay = replayer_for(store)
    images, _ = load_split(digits_dir, "train")
    dataset = StoreDataset(digits_dir, three_round_store, ["weak"], round=1)
    seen_views = []
    for round_ in (2, 0):
        dataset.set_round(round_)
        views, teacher_logits, _, indices = next(iter(DataLoader(dataset, batch_size=32, num_workers=2)))
        assert torch.equal(views[0], replay(round_, "weak", images[indices], indices))
        assert torch.equal(teacher_logits[0], store.slab(round_, "weak")[indices])
        seen_views.append(views[0])
    assert not torch.equal(*seen_views)  # other rounds, other views


def test_eval_views_are_the_normalised_unaugmented_images(digits_dir, teacher_ckpt):
    meta = DatasetMeta.load(digits_dir)
    images, labels, _ = next(iter(make_loader(digits_dir, "test", 359, shuffle=False)))
    views = eval_views(images, meta.mean, meta.std)
    mean, std = torch.tensor(meta.mean)[:, None, None], torch.tensor(meta.std)[:, None, None]
    assert torch.allclose(views, (images.float() / 255 - mean) / std, atol=1e-6)
    # What the teacher was evaluated on during training: it classifies these well.
    with torch.no_grad():
        top1 = (load_teacher("resnet8", teacher_ckpt, 10)(views).argmax(1) == labels).float().mean()
    assert top1 > 0.8


def test_open_store_refuses_other_data_and_missing_slots(digits_dir, weak_store, tmp_path):
    with pytest.raises(KdcacheError, match="views"):
        open_store(weak_store, digits_dir, ["weak", "strong"])
    other = tmp_path / "other"
    shutil.copytree(digits_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["fingerprint"] = "0" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KdcacheError, match="other data"):
        StoreDataset(other, weak_store)


def test_bad_rounds_slots_and_indices_are_refused(digits_dir, weak_store):
    dataset = StoreDataset(digits_dir, weak_store)
    with pytest.raises(KdcacheError, match="round 1 is out of range"):
        dataset.set_round(1)
    with pytest.raises(IndexError, match="0..1437"):
        dataset[1438]
    with pytest.raises(KdcacheError, match="not in the store"):
        TeacherLogits(dataset.store)(0, "strong", torch.tensor([0]))
    assert len(dataset[0].views) == 1  # the dataset still serves round 0 after the refusals


def test_every_public_name_is_documented():
    headings = [line for line in (REPO / "docs" / "api.md").read_text().splitlines() if line.startswith("### ")]
    for name in kdcache.api.__all__:
        assert any(f"`{name}" in heading for heading in headings), f"docs/api.md has no section for {name}"
        assert getattr(kdcache.api, name).__doc__, name
