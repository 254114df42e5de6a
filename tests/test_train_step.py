"""The training step as a GPU runs it, checked on the CPU: no host sync (counted at the
dispatcher on the device code path), no graph break, several students in one pass equal
to each alone, teacher rounds in any order, a non-finite loss still caught."""

import pytest
import torch

from kdcache.bench import count_step_syncs
from kdcache.data import make_loader
from kdcache.distill import DistillConfig, build_job, build_jobs
from kdcache.engine import Trainee, fit, fit_jobs, forward_loss, replay_views, train_batch
from kdcache.errors import KdcacheError
from kdcache.models import read_checkpoint
from kdcache.recipes import make_recipe
from kdcache.runtime import DistContext
from kdcache.storage import LogitStore
from kdcache.teachers import CachedTeacher
from test_hostile import run_main

# (loss, teacher mode): every loss from the cache, CRLD also from a live teacher, CE alone.
STEPS = [("ce", "cached"), ("kd", "cached"), ("dkd", "cached"), ("dist", "cached"), ("crld", "cached"),
         ("cmkd", "cached"), ("crld", "online")]


def config(digits_dir, teacher_ckpt, store, out, loss="crld", mode="cached", student="resnet8", epochs=1,
           batch_size=64):
    return DistillConfig(student=student, loss=loss, data_dir=digits_dir, out=out,
                         recipe=make_recipe(student, epochs=epochs, batch_size=batch_size), store=store.path,
                         teacher_mode=mode, teacher="resnet8", ckpt=teacher_ckpt, device="cpu", show_progress=False)


def first_step(job):
    """A trainee ready at epoch 0, the round, and one batch (already stepped on once)."""
    trainee = Trainee(job, DistContext())
    round_ = job.teacher.begin_epoch(0) if job.teacher is not None else 0
    trainee.begin_epoch(0)
    batch = next(iter(make_loader(job.data_dir, "train", 64, shuffle=True, drop_last=True, device=job.device)))
    train_batch([trainee], round_, *batch, 0)
    return trainee, round_, batch


@pytest.mark.parametrize("loss, mode", STEPS)
def test_a_training_step_makes_no_host_sync(digits_dir, teacher_ckpt, crld_store, tmp_path, loss, mode):
    job = build_job(config(digits_dir, teacher_ckpt, crld_store, tmp_path, loss, mode))
    trainee, round_, batch = first_step(job)
    assert count_step_syncs(trainee, round_, batch) == 0
    assert trainee.sums.shape == (len(trainee.part_names) + 3,)
    if job.teacher is not None:
        job.teacher.close()


def test_the_sync_count_sees_the_sparse_cpu_path(digits_dir, teacher_ckpt, crld_store, tmp_path):
    """The count can fail: the CPU path of the strong view does wait on the host."""
    job = build_job(config(digits_dir, teacher_ckpt, crld_store, tmp_path))
    trainee, round_, batch = first_step(job)
    job.replayer.dense = False
    from kdcache.augment.census import OpCensus

    with OpCensus() as census:
        train_batch([trainee], round_, *batch, 0)
    assert census.sync_count > 0
    job.teacher.close()


@pytest.mark.parametrize("loss", ["ce", "kd", "dkd", "dist", "crld", "cmkd"])
def test_student_forward_and_loss_are_one_graph(digits_dir, teacher_ckpt, crld_store, tmp_path, loss):
    job = build_job(config(digits_dir, teacher_ckpt, crld_store, tmp_path, loss))
    job.replayer.dense = True
    images, labels, indices = next(iter(make_loader(digits_dir, "train", 16, shuffle=False)))
    round_ = job.teacher.begin_epoch(0) if job.teacher is not None else 0
    views = [job.replayer(round_, s, images, indices) for s in job.loss.views]
    teacher_logits = [job.teacher.logits(round_, s, None, indices) for s in job.loss.views] if job.teacher else None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward_loss)(job.student, job.loss, views, teacher_logits, labels, 0)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    prefix = job.replayer.key_prefix(round_, "strong" if "strong" in job.loss.views else "weak", images.device)
    explained = torch._dynamo.explain(replay_views)(job.replayer, job.loss.views[-1], prefix, images, indices)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    if job.teacher is not None:
        job.teacher.close()


def test_students_in_one_pass_end_with_the_weights_they_get_alone(digits_dir, teacher_ckpt, crld_store, tmp_path):
    pairs = [("resnet8", "kd"), ("resnet8", "crld")]
    together = fit_jobs(build_jobs([config(digits_dir, teacher_ckpt, crld_store, tmp_path / f"{s}-{loss}", loss,
                                           student=s, epochs=2, batch_size=256) for s, loss in pairs]))
    alone = fit(build_job(config(digits_dir, teacher_ckpt, crld_store, tmp_path / "alone", "crld", epochs=2,
                                 batch_size=256)))
    assert [len(h) for h in together] == [2, 2]
    for name in ("train_loss", "test_top1"):
        assert together[1][-1][name] == alone[-1][name]
    mine, theirs = (read_checkpoint(tmp_path / d / "last.pth")["model"] for d in ("resnet8-crld", "alone"))
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    other = read_checkpoint(tmp_path / "resnet8-kd" / "last.pth")["model"]
    assert not all(torch.equal(other[k], theirs[k]) for k in theirs)  # kd trained its own student


def test_distill_cli_trains_every_student_loss_pair_in_its_own_run_dir(digits_dir, crld_store, tmp_path):
    code, out, err = run_main("distill", "--student", "resnet8", "--loss", "kd,crld", "--store", str(crld_store.path),
                               "--data", str(digits_dir), "--epochs", "1", "--batch-size", "128", "--device", "cpu",
                               "--out", str(tmp_path / "runs"), "--quiet")
    assert code == 0, err
    for loss in ("kd", "crld"):
        run_dir = tmp_path / "runs" / f"resnet8-{loss}"
        assert read_checkpoint(run_dir / "last.pth")["loss"] == loss
        assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2  # header + epoch 1
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert out.count("done: 1 epochs") == 2
    code, _, err = run_main("distill", "--student", "resnet8", "--loss", "kd,kd", "--store", str(crld_store.path),
                             "--data", str(digits_dir), "--out", str(tmp_path / "twice"))
    assert code == 1 and "each once" in err


def fabricated_store(path, rounds=3, n=40, classes=5):
    store = LogitStore.create(path, identity={"teacher": "fabricated"}, num_samples=n, num_classes=classes,
                              rounds=rounds, views=["weak"])
    for r in range(rounds):
        store.write_slab(r, "weak", torch.randn(n, classes, generator=torch.Generator().manual_seed(r)),
                         torch.arange(n))
    return store


def test_cached_teacher_serves_rounds_in_any_order(tmp_path):
    store = fabricated_store(tmp_path / "store")
    teacher = CachedTeacher(store, ["weak"], epochs=3)
    indices = torch.tensor([3, 0, 39, 7])
    for epoch in (2, 0, 2, 1, 0, 1, 2):
        round_ = teacher.begin_epoch(epoch)
        assert round_ == epoch
        assert torch.equal(teacher.logits(round_, "weak", None, indices), store.slab(round_, "weak")[indices])
    with pytest.raises(RuntimeError, match="round 0 is not loaded"):
        teacher.logits(0, "weak", None, indices)
    teacher.close()


def test_a_non_finite_loss_stops_the_run_naming_its_epoch(digits_dir, teacher_ckpt, crld_store, tmp_path, monkeypatch):
    job = build_job(config(digits_dir, teacher_ckpt, crld_store, tmp_path / "run", "kd", epochs=3))
    compute = job.loss.compute

    def nan_from_epoch_2(zs, zt, labels, epoch):
        loss, parts = compute(zs, zt, labels, epoch)
        return (loss * float("nan") if epoch >= 2 else loss), parts

    monkeypatch.setattr(job.loss, "compute", nan_from_epoch_2)
    with pytest.raises(KdcacheError, match="resnet8/kd: the loss became nan or inf at epoch 2"):
        fit(job)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 was saved


@pytest.mark.cuda
@pytest.mark.parametrize("compile_mode", ["off", "on", "cudagraphs"])
def test_cuda_step_never_waits_on_the_host(digits_dir, teacher_ckpt, crld_store, tmp_path, compile_mode):
    """On a GPU, torch's own sync detector: any synchronising call in a step raises."""
    cfg = config(digits_dir, teacher_ckpt, crld_store, tmp_path)
    cfg.device, cfg.compile = "cuda", compile_mode
    job = build_job(cfg)
    trainee, round_, batch = first_step(job)  # the first step compiles
    train_batch([trainee], round_, *batch, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_batch([trainee], round_, *batch, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = trainee.read(0)
    assert values["correct"] >= 0 and values["nonfinite"] == 0
    job.teacher.close()


@pytest.mark.cuda
def test_cuda_compiled_step_computes_the_eager_loss_and_gradients(digits_dir, teacher_ckpt, crld_store, tmp_path,
                                                                   monkeypatch):
    """One fp32 CRLD step from the same weights on the same batch, convolutions in full fp32.
    Not whole runs, nor cuDNN's default TF32 convolutions: those round differently in the two
    graphs (gradients 1.1% apart, two epochs' losses 0.15% apart on an H100)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = config(digits_dir, teacher_ckpt, crld_store, tmp_path)
    cfg.device = "cuda"
    job = build_job(cfg)
    trainee, round_, (images, labels, indices) = first_step(job)
    slots = job.loss.views
    views = [replay_views(job.replayer, s, job.replayer.key_prefix(round_, s, job.device), images, indices)
             for s in slots]
    teacher_logits = [job.teacher.logits(round_, s, v, indices) for s, v in zip(slots, views)]
    results = {}
    for mode in ("off", "on"):
        job.student.zero_grad(set_to_none=True)
        step = forward_loss if mode == "off" else torch.compile(forward_loss)
        value, stats, _ = step(job.student, job.loss, views, teacher_logits, labels, 0)
        value.backward()
        results[mode] = (stats, torch.cat([p.grad.flatten() for p in job.student.parameters()]))
    (eager_stats, eager_grad), (compiled_stats, compiled_grad) = results["off"], results["on"]
    torch.testing.assert_close(compiled_stats, eager_stats, rtol=1e-4, atol=1e-4)
    assert (compiled_grad - eager_grad).norm() / eager_grad.norm() < 1e-4
    job.teacher.close()


def test_the_stages_meet_only_in_the_store():
    """Stage 2 never imports stage 1, nor stage 1 the training loop: both build on kdcache.runtime."""
    import subprocess
    import sys

    code = ("import sys, kdcache.{0}; bad = [m for m in {1} if m in sys.modules]; "
            "assert not bad, bad")
    for stage, forbidden in (("distill", ["kdcache.precompute"]), ("precompute", ["kdcache.engine", "kdcache.distill"])):
        subprocess.run([sys.executable, "-c", code.format(stage, forbidden)], check=True)


def test_distill_warns_when_a_softened_loss_gets_a_top_k_store(digits_dir, teacher_ckpt, tmp_path, capsys, monkeypatch):
    from kdcache.precompute import PrecomputeConfig, precompute

    store = precompute(PrecomputeConfig(teacher="resnet8", ckpt=teacher_ckpt, data_dir=digits_dir,
                                        views={"weak": "weak"}, rounds=1, out=tmp_path / "topk", encoding="topk:3",
                                        device="cpu"), progress=False)
    monkeypatch.setattr("kdcache.errors._warned", set())  # a warning earlier in this process would hide it
    build_job(config(digits_dir, teacher_ckpt, store, tmp_path / "kd", "kd"))
    assert "softens the teacher (T=4)" in capsys.readouterr().err


def test_compile_auto_is_off_on_the_cpu_and_modes_are_checked(digits_dir, teacher_ckpt, crld_store, tmp_path):
    cfg = config(digits_dir, teacher_ckpt, crld_store, tmp_path)
    assert cfg.compile == "auto" and build_job(cfg).compile == "off"  # "on" when the device is CUDA
    cfg.compile = "cudagraphs"
    assert build_job(cfg).compile == "cudagraphs"
    cfg.compile = "fast"
    with pytest.raises(KdcacheError, match="--compile must be auto or one of off, on, cudagraphs, got 'fast'"):
        build_job(cfg)


def test_an_online_teacher_is_compiled_with_the_step(digits_dir, teacher_ckpt, crld_store, tmp_path):
    """The online baseline runs at its best: compiled whenever the student's step is."""
    from torch._dynamo.eval_frame import OptimizedModule

    cfg = config(digits_dir, teacher_ckpt, crld_store, tmp_path, mode="online")
    assert not isinstance(build_job(cfg).teacher.model, OptimizedModule)  # auto on the CPU: off
    cfg.compile = "on"
    assert isinstance(build_job(cfg).teacher.model, OptimizedModule)
