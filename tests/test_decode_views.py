"""Views of images of their own sizes, cut at decode time (kdcache.data.decode, CropLoader):
the boxes are the policy's, the pixels the policy's up to resize interpolation, and both
stages replay the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from jpeg_data import synthetic_jpeg_dataset

from kdcache.augment import get_policy, view_seeds
from kdcache.data import DatasetMeta, load_split, make_loader
from kdcache.data.beton import BetonFile
from kdcache.errors import KdcacheError
from kdcache.replay import ViewReplayer, eval_replayer, eval_views, replayer_for

pytest.importorskip("ffcv")

SIZE = 48
# (H, W): ordinary, smaller than the view, tiny, and aspect ratios far outside 3/4..4/3 (the fallback box)
SIZES = [(120, 90), (90, 160), (200, 150), (37, 41), (30, 20), (8, 8), (12, 300), (300, 14), (64, 64), (150, 199),
         (61, 250), (250, 70), (101, 103), (45, 180), (180, 45), (17, 16)] * 3
VIEWS = {"weak": "imagenet_weak", "strong": "imagenet_strong"}


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    return synthetic_jpeg_dataset(tmp_path_factory.mktemp("jpeg") / "data", SIZES, num_classes=4, test=12)


def replayer(views=VIEWS, seed=3):
    meta_free = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    return ViewReplayer.from_policy_names(views, seed, SIZE, meta_free["mean"], meta_free["std"])


def full_decode(beton: BetonFile, i: int) -> torch.Tensor:
    """Image i decoded whole by ffcv's imdecode (the decoder the loader calls), uint8 [3, H, W]."""
    from ffcv.libffcv import imdecode

    ptr = beton.image_meta["data_ptr"][i:i + 1].astype(np.int64)
    size = int(beton._allocation_sizes(ptr)[0])
    data = np.fromfile(beton.path, dtype=np.uint8, count=size, offset=int(ptr[0]))
    h, w = int(beton.heights[i]), int(beton.widths[i])
    out = np.zeros((h, w, 3), dtype=np.uint8)
    imdecode(data, out, h, w, h, w, 0, 0, 1, 1, False, False)
    return torch.from_numpy(out).permute(2, 0, 1)


def test_per_image_sizes_draw_the_one_size_boxes_bit_for_bit():
    policy = get_policy("imagenet_strong", 224)
    seeds = view_seeds(0, 3, 1, torch.arange(4000))
    for h, w in [(375, 500), (10, 400), (400, 10), (32, 32), (1, 1)]:
        ints = policy.sample(seeds, (h, w))
        tensors = policy.sample(seeds, (torch.full((4000,), h), torch.full((4000,), w)))
        assert all(torch.equal(ints[k], tensors[k]) for k in ints)
        boxes = policy.crop_boxes(seeds, torch.full((4000,), h), torch.full((4000,), w))
        assert torch.equal(boxes, torch.stack([ints[k] for k in ("crop_top", "crop_left", "crop_height", "crop_width")], 1))


@pytest.mark.parametrize("views", [{"weak": "imagenet_weak"}, {"eval": "identity"}])
def test_decode_time_crop_is_the_policys_crop_up_to_interpolation(jpeg_dir, views):
    """The loader's view of each image against the policy run on the whole decoded image."""
    rep = eval_replayer(SIZE, [0.5] * 3, [0.25] * 3) if "eval" in views else replayer(views)
    slot = next(iter(views))
    loader = make_loader(jpeg_dir, "train", 7, shuffle=True, seed=1, replayer=rep)
    loader.set_views(2, (slot,))
    beton = BetonFile(jpeg_dir / "train.beton")
    policy = rep.policies[slot]
    down, up = [], []  # mean |diff| of views from boxes shrunk to S, and from boxes enlarged
    for crops, _, indices in loader:
        seeds = rep.seeds(2, slot, indices)
        boxes = policy.crop_boxes(seeds, torch.from_numpy(beton.heights)[indices], torch.from_numpy(beton.widths)[indices])
        for view, i, seed, box in zip(policy.finish(crops[slot], seeds), indices.tolist(), seeds, boxes):
            whole = policy(full_decode(beton, i)[None], seed[None])[0]
            (down if box[2:].min() >= SIZE else up).append((view.float() - whole.float()).abs().mean().item())
    # The decoder resizes like ffcv's own crop decoders (OpenCV INTER_AREA), the policy like PIL
    # (antialiased bilinear): close when shrinking, apart when enlarging small boxes, where
    # INTER_AREA is blocky. Measured (these images): shrunk <= 0.65 levels, enlarged <= 14.4.
    assert len(down) + len(up) == len(SIZES) and down and up
    print(f"{slot}: mean |diff| shrunk max {max(down):.2f} mean {np.mean(down):.2f}; enlarged max {max(up):.2f} "
          f"mean {np.mean(up):.2f}")
    assert max(down) < 1.0 and max(up) < 20.0


def test_a_views_pixels_do_not_depend_on_the_views_decoded_with_it(jpeg_dir):
    """Precompute cuts one slot per pass, distill both at once (one decoded region): same bits."""
    rep = replayer()
    both = make_loader(jpeg_dir, "train", 8, shuffle=False, replayer=rep)
    both.set_views(1, ("weak", "strong"))
    alone = make_loader(jpeg_dir, "train", 8, shuffle=False, replayer=rep)
    for slot in ("strong", "weak"):
        alone.set_views(1, (slot,))
        got = torch.cat([crops[slot] for crops, _, _ in alone])
        assert torch.equal(got, torch.cat([crops[slot] for crops, _, _ in both]))


def test_both_stages_replay_the_same_views(jpeg_dir, tmp_path):
    """Precompute and distill run on the data; distill's loader and replay (shuffled, another
    batch size, both slots per batch) give precompute's views bit for bit, and the stored
    logits are the teacher's on them."""
    from kdcache.distill import DistillConfig, distill
    from kdcache.engine import replay_views
    from kdcache.models import create_model, save_checkpoint
    from kdcache.precompute import PrecomputeConfig, precompute, verify
    from kdcache.recipes import make_recipe

    torch.manual_seed(0)
    teacher = create_model("resnet8", 4)
    save_checkpoint(tmp_path / "teacher.pth", teacher)
    store = precompute(PrecomputeConfig(teacher="resnet8", ckpt=tmp_path / "teacher.pth", data_dir=jpeg_dir,
                                        views=VIEWS, rounds=2, out=tmp_path / "store", device="cpu",
                                        image_size=SIZE, batch_size=10), progress=False)
    assert store.identity["image_size"] == SIZE
    assert {spec["image_size"] for spec in store.identity["policies"].values()} == {SIZE}

    rep = replayer_for(store)
    stage1 = make_loader(jpeg_dir, "train", 10, shuffle=False, replayer=rep)
    stage2 = make_loader(jpeg_dir, "train", 16, shuffle=True, seed=5, drop_last=True, replayer=rep)
    teacher.eval()
    for round_ in (0, 1):
        stage2.set_epoch(round_)
        stage2.set_views(round_, ("weak", "strong"))
        batches = list(stage2)
        for slot in VIEWS:
            stage1.set_views(round_, (slot,))
            first = {}
            for crops, _, indices in stage1:
                for view, i in zip(rep(round_, slot, crops, indices), indices.tolist()):
                    first[i] = view
            for crops, _, indices in batches:
                views = replay_views(rep, slot, rep.key_prefix(round_, slot, torch.device("cpu")), crops, indices)
                assert all(torch.equal(v, first[i]) for v, i in zip(views, indices.tolist()))
                with torch.no_grad():
                    logits = teacher(views)
                stored = store.slab(round_, slot)[indices]
                assert (logits - stored).abs().max() < 1e-2  # float16 storage

    metrics = distill(DistillConfig(student="resnet8", loss="crld", data_dir=jpeg_dir, out=tmp_path / "run",
                                    recipe=make_recipe("resnet8", epochs=1, batch_size=16), store=store.path,
                                    device="cpu", show_progress=False))
    assert metrics[0]["train_samples"] == 48 and 0 <= metrics[0]["test_top1"] <= 100

    # verify recomputes every stored view (cut at decode time for the rows it picks) and agrees
    report = verify(store.path, tmp_path / "teacher.pth", jpeg_dir, samples=10_000, batch_size=7, device="cpu")
    assert report["samples"] == 2 * len(VIEWS) * 48 and report["seeds_match"] == 1.0
    assert report["ok"] and report["max_abs_diff"] < 1e-2


def test_eval_view_is_the_centre_crop(jpeg_dir):
    """evaluate's view of images of their own sizes: 0.875 of the shorter side, centred."""
    rep = eval_replayer(SIZE, [0.5] * 3, [0.25] * 3)
    beton = BetonFile(jpeg_dir / "test.beton")
    boxes = rep.policies["eval"].crop_boxes(torch.zeros(beton.num_samples, dtype=torch.int64),
                                            torch.from_numpy(beton.heights), torch.from_numpy(beton.widths))
    side = np.round(np.minimum(beton.heights, beton.widths) * 0.875)
    assert np.array_equal(boxes[:, 2].numpy(), side) and np.array_equal(boxes[:, 3].numpy(), side)
    assert np.array_equal(boxes[:, 0].numpy(), (beton.heights - side) // 2)
    loader = make_loader(jpeg_dir, "test", 5, shuffle=False, replayer=rep)
    images, _, _ = next(iter(loader))
    assert eval_views(images, [0.5] * 3, [0.25] * 3).shape == (5, 3, SIZE, SIZE)


def test_own_size_data_refusals(jpeg_dir):
    meta = DatasetMeta.load(jpeg_dir)
    assert meta.own_size
    with pytest.raises(KdcacheError, match="only the ffcv backend"):
        make_loader(jpeg_dir, "train", 8, shuffle=False, backend="memory", replayer=replayer())
    with pytest.raises(KdcacheError, match="pass the views' replayer"):
        make_loader(jpeg_dir, "train", 8, shuffle=False)
    with pytest.raises(KdcacheError, match="crops images of one size"):
        make_loader(jpeg_dir, "train", 8, shuffle=False, replayer=replayer({"weak": "weak"}))
    with pytest.raises(KdcacheError, match="do not stack into one tensor"):
        load_split(jpeg_dir, "train")
