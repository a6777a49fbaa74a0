"""The training stages: the plain loop, DDP equivalence, the ImageNet path (no Ray here)."""

import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bireal_core as bc
from cuda_ext.training import use_kernels
from pipeline.segments import constrain_for_finetune
from pipeline.train import TrainConfig, train_loop


def smoke_config(shards, out, **kw) -> TrainConfig:
    base = dict(
        shards=str(shards),
        out=str(out),
        arch="bireal18",
        stem="small",
        width=0.25,
        batch_size=32,
        loader_workers=1,
        lr=3e-3,
        phase_epochs=[2, 1, 1],
        epochs=3,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def three_stages(demo_shards, tmp_path_factory):
    """pretrain -> binarize -> finetune on the demo digits, in one process (no Ray)."""
    out = tmp_path_factory.mktemp("stages")
    results = {}
    for stage in ("pretrain", "binarize", "finetune"):
        extra = {"epochs": 1, "lr": 1e-3} if stage == "finetune" else {"relu_control": stage == "pretrain"}
        cfg = smoke_config(demo_shards, out, stage=stage, **extra)
        results[stage] = train_loop(cfg)
    return out, results


def test_pretrain_phases_and_checkpoints(three_stages):
    out, results = three_stages
    segments = [h["segment"] for h in results["pretrain"]["history"]]
    chain = ["pretrain-relu", "pretrain-relu", "pretrain-leaky_clip", "pretrain-clip"]
    assert segments == chain + ["pretrain-relu_control-0", "pretrain-relu_control-1"]
    for phase in ("relu", "leaky_clip", "clip", "relu_control"):
        model, header = bc.load_checkpoint(out / f"pretrain-{phase}.safetensors")
        assert header["model"]["kwargs"]["activation"] == phase.removesuffix("_control")
        assert not any(m.is_binary for m in model.modules() if isinstance(m, bc.BinaryConv2d))
    assert [h["epoch"] for h in results["pretrain"]["history"]] == [0, 1, 2, 3, 4, 5]
    # each phase has its own schedule (Adam: linear decay to 0 over the phase), and the two
    # fine-tuning phases start at 0.1 x lr (phase_lr_scale), not at the full lr again
    lrs = [h["lr"] for h in results["pretrain"]["history"]]
    assert lrs[0] == pytest.approx(3e-3) and lrs[1] == pytest.approx(1.5e-3)  # relu, epochs 0 and 1 of 2
    assert lrs[2] == pytest.approx(3e-4) and lrs[3] == pytest.approx(3e-4)  # leaky_clip, clip: fresh, lower
    # the equal-compute ReLU control: the later phases' epochs and lrs, still ReLU; the stage's
    # result stays the clip twin (the control is a side branch)
    assert lrs[4:] == pytest.approx(lrs[2:4])
    stage_result, _ = bc.load_checkpoint(out / "pretrain.safetensors")
    clip_twin, _ = bc.load_checkpoint(out / "pretrain-clip.safetensors")
    control, _ = bc.load_checkpoint(out / "pretrain-relu_control.safetensors")
    clip_state, control_state = clip_twin.state_dict(), control.state_dict()
    assert all(torch.equal(t, clip_state[k]) for k, t in stage_result.state_dict().items())
    assert any(not torch.equal(t, clip_state[k]) for k, t in control_state.items())


def test_lr_schedules():
    from pipeline.train import lr_schedule

    adam = lr_schedule(TrainConfig(lr=1e-3), total_steps=100, base_lr=1e-4)
    assert [adam(s) for s in (0, 50, 100)] == pytest.approx([1e-4, 5e-5, 0.0])
    sgd = lr_schedule(TrainConfig(optimizer="sgd", lr=0.01, lr_milestones=[0.5, 0.75]), total_steps=20)
    assert [sgd(s) for s in (0, 9, 10, 14, 15, 19)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    # the schedule named for either optimizer: cosine to 0, linear for SGD, step for Adam
    cosine = lr_schedule(TrainConfig(optimizer="sgd", lr=0.1, schedule="cosine"), total_steps=100)
    assert [cosine(s) for s in (0, 50, 100, 120)] == pytest.approx([0.1, 0.05, 0.0, 0.0])
    assert cosine(25) == pytest.approx(0.05 * (1 + 2**-0.5))
    linear = lr_schedule(TrainConfig(optimizer="sgd", lr=0.1, schedule="linear"), total_steps=10)
    assert [linear(s) for s in (0, 5, 10)] == pytest.approx([0.1, 0.05, 0.0])
    step = lr_schedule(TrainConfig(lr=1e-3, schedule="step", lr_milestones=[0.5]), total_steps=10)
    assert [step(s) for s in (4, 5)] == pytest.approx([1e-3, 1e-4])
    with pytest.raises(ValueError, match="phase_lr_scale"):
        TrainConfig(phase_lr_scale=[1.0, 0.1])
    with pytest.raises(ValueError, match="relu_control"):
        TrainConfig(relu_control=True, phases=["leaky_clip", "clip"], phase_epochs=[1, 1], phase_lr_scale=[1, 1])


def test_binarize_learns_above_chance(three_stages):
    out, results = three_stages
    history = results["binarize"]["history"]
    print(
        "\n"
        + "\n".join(
            f"binarize epoch {h['epoch']}: val_top1 {h['val_top1']:.3f} flip {h['flip_ratio']:.4f}" for h in history
        )
    )
    assert history[-1]["val_top1"] > 0.5  # 10 classes: chance is 0.1
    assert all(0 < h["flip_ratio"] < 0.5 for h in history)
    assert history[0]["val_images"] == 360  # the whole test split, once
    model, _ = bc.load_checkpoint(out / "binarize.safetensors")
    assert all(m.is_binary for m in model.modules() if isinstance(m, bc.BinaryConv2d))
    kept = sorted(p.name for p in (out / ".train_state").glob("binarize-epoch*"))
    assert kept == ["binarize-epoch001", "binarize-epoch002"]  # older train states pruned


def test_packed_kernels_train_like_the_float_path(three_stages, demo_shards, tmp_path):
    """The fixture's binarize ran with ``kernels: auto`` (the default: packed convs); the same run on
    the float path must end where it ends, within seed noise. Measured on this data (seeds 0, 1, 2,
    3 epochs, both paths, 2026-12-05): val top-1 after the last epoch 0.917-0.944, packed against
    float at one seed at most 0.013 apart; the earlier epochs swing too much to compare (epoch 1:
    0.60-0.91 across seeds on the float path), so they are printed, not asserted."""
    out, results = three_stages
    packed = results["binarize"]["history"]
    cfg = smoke_config(demo_shards, tmp_path, stage="binarize", kernels="float", init_from=str(out))
    float_path = train_loop(cfg)["history"]
    assert len(packed) == len(float_path) == 3
    for p, f in zip(packed, float_path):
        print(f"epoch {p['epoch']}: val top-1 packed {p['val_top1']:.3f} float {f['val_top1']:.3f}")
    assert abs(packed[-1]["val_top1"] - float_path[-1]["val_top1"]) <= 0.03
    assert abs(packed[-1]["train_loss"] - float_path[-1]["train_loss"]) < 0.1


def test_compile_trains_as_the_eager_steps(demo_shards, tmp_path):
    """``compile: true``: the binarize stage's steps run as one torch.compile graph (fullgraph, the
    packed convs through the ops' fake kernels) and train as the eager steps do, on the same
    batches: the same epoch's mean loss within the spread float rounding alone gives, and the graph
    was compiled. That spread is wide in a binary net: a rounding difference flips the sign of an
    activation near 0, and the flips cascade through 16 binary convs. Measured on this data (first
    step's loss, 2026-12-06, AMD EPYC): eager on 1 thread against 2 threads 1.6% apart, kernels
    auto against float 2.8%, compiled against eager 2.8% (2.0% over the 3 steps)."""
    from torch._dynamo.utils import counters

    cfg = smoke_config(
        demo_shards, tmp_path / "eager", stage="binarize", init="scratch", epochs=1, max_steps_per_epoch=3
    )
    eager = train_loop(cfg)["history"][0]
    torch._dynamo.reset()
    counters.clear()
    compiled = train_loop(replace(cfg, out=str(tmp_path / "compiled"), compile=True))["history"][0]
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert compiled["packed_convs"] == eager["packed_convs"] > 0
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=0.05)


def test_finetune_constrains_weights_and_keeps_accuracy(three_stages):
    out, results = three_stages
    model, header = bc.load_checkpoint(out / "finetune.safetensors")
    for m in model.modules():
        if isinstance(m, bc.BinaryConv2d):
            assert torch.equal(m.weight.abs(), torch.ones_like(m.weight))  # +-1, alpha = 1
    assert header["config"]["class_names"][:3] == ["0", "1", "2"]
    assert results["finetune"]["final"]["val_top1"] > 0.5
    assert results["finetune"]["history"][0]["flip_ratio"] == 0.0  # convs frozen


def test_finetune_without_binarizes_checkpoint_says_what_to_train(tmp_path):
    """Before: `checkpoints/binarize.safetensors: bireal checkpoint not found`, which named no stage."""
    from pipeline.segments import segments

    (start,) = segments(smoke_config(tmp_path, tmp_path / "ckpt", stage="finetune"), num_classes=10)
    with pytest.raises(
        FileNotFoundError,
        match=r"binarize.safetensors: finetune starts from the binarize stage's checkpoint \(train binarize first\)",
    ):
        start.prepare(None)


def test_finetune_refuses_a_binarize_net_its_settings_do_not_describe(tmp_path):
    """Before: a finetune section of another width trained binarize's width silently, and shards of
    other classes failed mid-epoch on a target out of range. Now the differences are named first."""
    from pipeline.segments import segments

    net = bc.create_model("bireal18", num_classes=10, stem="small", width=0.5)
    bc.save_checkpoint(tmp_path / "binarize.safetensors", net, stage="binarize")
    (start,) = segments(smoke_config(tmp_path, tmp_path, stage="finetune", width=0.5), num_classes=10)
    start.prepare(None)  # the net its settings describe
    (start,) = segments(smoke_config(tmp_path, tmp_path, stage="finetune", width=0.25), num_classes=100)
    with pytest.raises(ValueError, match=r"width 0.5 \(finetune: 0.25\), num_classes 10 \(finetune: 100\): finetune"):
        start.prepare(None)
    # the same net trained on other classes (its checkpoint names them): CIFAR-10's for the digits
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    bc.save_checkpoint(tmp_path / "binarize.safetensors", net, stage="binarize", config={"class_names": cifar})
    digits = [str(i) for i in range(10)]
    (start,) = segments(smoke_config(tmp_path, tmp_path, stage="finetune", width=0.5), 10, digits)
    with pytest.raises(ValueError, match=r"trained on other classes or another order than these shards' \(class 0: "):
        start.prepare(None)
    (start,) = segments(smoke_config(tmp_path, tmp_path, stage="finetune", width=0.5), 10, cifar)
    start.prepare(None)  # its own classes


def test_finetune_freezes_all_but_batchnorm():
    model = constrain_for_finetune(bc.create_model("bireal18", num_classes=10, stem="small", width=0.25))
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in bn for p in trainable)


def test_two_step_and_init_options(demo_shards, tmp_path, three_stages):
    out, _ = three_stages
    cfg = smoke_config(
        demo_shards,
        out,
        stage="binarize",
        two_step=True,
        step1_epochs=1,
        epochs=2,
        init="relu_control",
        weight_gradient="official",
        max_steps_per_epoch=3,
    )
    cfg = replace(cfg, out=str(out))
    result = train_loop(cfg)
    # 2 epochs in all, step 1's included: the same compute as a one-step run of 2 epochs
    assert [h["segment"] for h in result["history"]] == ["binarize-step1-activations", "binarize-step2-weights"]
    with pytest.raises(ValueError, match="step1_epochs"):
        replace(cfg, epochs=1)
    with pytest.raises(FileNotFoundError, match="relu_control"):  # a pretrain without the control
        train_loop(replace(cfg, init_from=str(tmp_path)))
    # step 2 starts from step 1's trained weights: it only switches the weight binarizers on
    from pipeline.segments import segments

    step1, step2 = segments(cfg, num_classes=10)
    model = step1.prepare(None)
    convs = [m for m in model.modules() if isinstance(m, bc.BinaryConv2d) and m.input_binarizer is not None]
    assert convs and all(m.weight_binarizer is None for m in convs)  # step 1: real weights
    with torch.no_grad():
        for m in convs:
            m.weight.mul_(0.5).add_(0.01)  # "trained" in step 1
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = step2.prepare(model)
    assert all(torch.equal(p, trained[n]) for n, p in after.named_parameters())
    assert all(m.is_binary for m in after.modules() if isinstance(m, bc.BinaryConv2d) and m.input_binarizer is not None)


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="init"):
        TrainConfig(init="imagenet")
    with pytest.raises(ValueError, match="phase_epochs"):
        TrainConfig(phases=["relu"], phase_epochs=[1, 2])


def test_imagenet_path_all_stages(tmp_path):
    """ImageNet stem, 224 crops, 1000-way head, on 1,000 tiny generated classes."""
    from imagegen import colored_image

    from pipeline.shard import ShardParams, shard_dataset

    src = tmp_path / "src"
    for c in range(1000):
        for split, n in (("train", 1), ("val", 1 if c < 8 else 0)):
            if n:
                d = src / split / f"n{c:08d}"
                d.mkdir(parents=True, exist_ok=True)
                colored_image(c % 4, (36, 30), seed=c).save(d / "a.jpg")
    shards = tmp_path / "shards"
    shard_dataset(str(src), str(shards), ShardParams(samples_per_shard=250, processes=2), progress_bar=False)
    out = tmp_path / "ckpt"
    for stage in ("pretrain", "binarize", "finetune"):
        cfg = TrainConfig(
            stage=stage,
            shards=str(shards),
            out=str(out),
            stem="imagenet",
            width=0.125,
            batch_size=4,
            loader_workers=1,
            max_steps_per_epoch=2,
            phase_epochs=[1, 0, 1],
            epochs=1,
        )
        result = train_loop(cfg)
        assert result["final"]["val_images"] == 8
    model, header = bc.load_checkpoint(out / "finetune.safetensors")
    assert header["config"]["input"]["size"] == 224 and model.fc.out_features == 1000
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


# ---------------------------------------------------------------------------- DDP equivalence


def _ddp_worker(rank, world, init_file, inputs, labels, result_file, kernels):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25).eval()  # BN eval
    use_kernels(model, kernels)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    share = len(inputs) // world
    x, y = inputs[rank * share : (rank + 1) * share], labels[rank * share : (rank + 1) * share]
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, result_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("kernels", ["float", "auto"])
def test_ddp_two_workers_match_one_on_same_global_batch(tmp_path, kernels):
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.manual_seed(0)
    single = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25).eval()
    use_kernels(single, kernels)
    torch.nn.functional.cross_entropy(single(x), y).backward()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), x, y, str(tmp_path / "g.pt"), kernels), nprocs=2)
    grads = torch.load(tmp_path / "g.pt", weights_only=True)
    for name, p in single.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["bireal18", "bireal50"])
def test_alpha_absorbed_exactly_before_bn_retraining(name):
    model = bc.create_model(name, num_classes=10, stem="small", width=0.25).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        before = model.eval()(x)
        after = constrain_for_finetune(model).eval()(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("profile", ["imagenet_bireal18_official", "imagenet_bireal18_paper"])
def test_imagenet_params_file_drives_every_stage(tmp_path, profile):
    """The shipped ImageNet recipes validate, and their stages run on tiny 224-px data."""
    from pathlib import Path

    import yaml
    from imagegen import ilsvrc_tars

    from pipeline.params import load_params
    from pipeline.shard import ShardParams, shard_dataset

    shipped = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / f"{profile}.yaml"
    loaded = load_params(shipped)
    assert loaded.train("binarize").stem == "imagenet" and loaded.train("binarize").width == 1.0
    ilsvrc_tars(tmp_path / "ilsvrc", train_per_class=3, val_per_class=1)
    params = yaml.safe_load(shipped.read_text())
    shard_dataset(
        str(tmp_path / "ilsvrc"),
        str(tmp_path / "shards"),
        ShardParams(**{**params["shard"], "processes": 1, "samples_per_shard": 4}),
        progress_bar=False,
    )
    smoke = {
        "shards": str(tmp_path / "shards"),
        "out": str(tmp_path / "ckpt"),
        "width": 0.125,
        "batch_size": 2,
        "loader_workers": 1,
        "shuffle_buffer": 4,
        "max_steps_per_epoch": 1,
        "phase_epochs": [1, 0, 1],
        "epochs": 1,
    }
    for stage in ("pretrain", "binarize", "finetune"):
        config = loaded.train(stage, smoke)
        assert config.stem == "imagenet"
        result = train_loop(config)
        if config.epochs or stage == "pretrain":
            assert result["final"]["val_images"] == 4
    model, header = bc.load_checkpoint(tmp_path / "ckpt" / "finetune.safetensors")
    assert header["config"]["input"]["size"] == 224
    if profile.endswith("official"):  # its finetune has 0 epochs: the exact fold alone, no training
        result = train_loop(loaded.train("finetune", {**smoke, "epochs": 0}))
        assert result["history"] == []
        model, _ = bc.load_checkpoint(result["checkpoint"])
        convs = [m for m in model.modules() if isinstance(m, bc.BinaryConv2d) and m.is_binary]
        assert convs and all(torch.equal(m.weight.abs(), torch.ones_like(m.weight)) for m in convs)


def test_weight_decay_reaches_every_real_weight():
    """Only binarized latent weights are exempt from weight decay: the real-valued twin's 3x3 convs
    (BinaryConv2d without binarizers, 94% of its weights) and two-step step 1's real weights get
    the configured decay."""
    from pipeline.train import make_optimizer

    config = TrainConfig(weight_decay=1e-4)

    def decayed(model):
        by_id = {id(p): g["weight_decay"] for g in make_optimizer(model, config).param_groups for p in g["params"]}
        convs = [m for m in model.modules() if isinstance(m, bc.BinaryConv2d)]
        return convs, by_id

    twin = bc.create_twin("bireal18", "relu", num_classes=10, stem="small", width=0.25)
    convs, by_id = decayed(twin)
    assert convs and all(by_id[id(m.weight)] == 1e-4 for m in convs)
    decayed_numel = sum(p.numel() for p in twin.parameters() if by_id[id(p)] == 1e-4)
    assert decayed_numel == sum(p.numel() for p in twin.parameters())

    binary = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25)
    convs, by_id = decayed(binary)
    assert all(by_id[id(m.weight)] == 0.0 for m in convs if m.weight_binarizer is not None)
    assert all(
        by_id[id(p)] == 1e-4 for m in binary.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()
    )

    step1 = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25, binary_weights=False)
    convs, by_id = decayed(step1)
    assert all(m.weight_binarizer is None for m in convs)  # step 1: real weights
    assert all(by_id[id(m.weight)] == 1e-4 for m in convs)  # ... and decayed


def test_weight_clip_and_precision_settings(demo_shards, tmp_path, three_stages):
    """weight_clip clamps the binarized latent weights after every step (and only those);
    precision is fp32 unless bf16 is asked for; bad values are rejected."""
    from pipeline.train import weight_clipper

    out, _ = three_stages
    cfg = smoke_config(demo_shards, out, stage="binarize", epochs=1, max_steps_per_epoch=2, weight_clip=0.05)
    model = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    weight_clipper(model, cfg)()
    binary = [m.weight for m in model.modules() if isinstance(m, bc.BinaryConv2d) and m.weight_binarizer is not None]
    assert all(w.abs().max() <= 0.05 for w in binary)
    assert model.fc.weight.abs().max() > 0.05  # real weights untouched
    assert weight_clipper(model, replace(cfg, weight_clip=0.0)) is None
    # runs with the clip on, its JPEGs decoded by the training device's path (decode: device), in
    # channels_last as on a GPU
    result = train_loop(
        replace(cfg, out=str(tmp_path), init_from=str(out), decode="device", memory_format="channels_last")
    )
    assert result["history"] and cfg.precision == "fp32"
    assert result["history"][0]["steps"] == 2 and 0 < result["history"][0]["data_wait_fraction"] <= 1
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="weight_clip"):
        TrainConfig(weight_clip=-1.0)


def test_recipe_settings_reach_the_optimizer_and_are_checked():
    from pipeline.segments import segments
    from pipeline.train import make_optimizer

    model = bc.create_twin("bireal18", "relu", num_classes=10, stem="small", width=0.25)
    sgd = make_optimizer(model, TrainConfig(optimizer="sgd", nesterov=True, weight_decay=5e-4))
    assert all(g["nesterov"] and g["weight_decay"] == 5e-4 for g in sgd.param_groups)
    assert all(g["weight_decay"] == 1e-5 for g in make_optimizer(model, TrainConfig(), weight_decay=1e-5).param_groups)
    # two-step: step 1's real weights get step1_weight_decay, step 2 the stage's weight_decay
    config = TrainConfig(two_step=True, epochs=2, step1_epochs=1, step1_weight_decay=1e-5, init="scratch")
    step1, step2 = segments(config, num_classes=10)
    assert (step1.weight_decay, step2.weight_decay) == (1e-5, None)
    for bad, match in (
        ({"nesterov": True}, "nesterov needs optimizer: sgd"),
        ({"holdout": -1}, "holdout=-1"),
        ({"distill_weight": 1.5}, "distill_weight=1.5"),
        ({"distill_temperature": 0.0}, "distill_temperature=0.0"),
        ({"step1_weight_decay": -1.0}, "step1_weight_decay=-1.0"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)


def test_distillation_loss_is_the_kl_to_the_teachers_soft_targets():
    import torch.nn.functional as F

    from pipeline.train import Criterion

    torch.manual_seed(0)
    images, labels = torch.randn(6, 5), torch.randint(0, 4, (6,))
    teacher = torch.nn.Linear(5, 4)
    student = torch.randn(6, 4)
    with torch.no_grad():
        t_logits = teacher(images)
    assert Criterion(0.1)(student, images, labels) == pytest.approx(
        float(F.cross_entropy(student, labels, label_smoothing=0.1))
    )
    for weight, temperature in ((1.0, 1.0), (0.5, 4.0)):
        p_t = F.softmax(t_logits / temperature, dim=1)
        kl = (p_t * (p_t.log() - F.log_softmax(student / temperature, dim=1))).sum(1).mean()
        expected = (1 - weight) * F.cross_entropy(student, labels) + weight * temperature**2 * kl
        got = Criterion(0.0, teacher, weight, temperature)(student, images, labels)
        assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # a student that matches its teacher has nothing left to learn from it
    assert float(Criterion(0.0, teacher, 1.0, 2.0)(t_logits, images, labels)) == pytest.approx(0.0, abs=1e-6)


def test_a_cifar_style_recipe_with_holdout_and_distillation(demo_shards, tmp_path, three_stages):
    """SGD + nesterov + cosine, distilled from the ReLU twin, picking on a held-out part of the train
    split, the images resident on the device: one run, the settings the CIFAR-10 accuracy recipes
    use."""
    out, _ = three_stages
    cfg = smoke_config(
        demo_shards,
        tmp_path,
        stage="binarize",
        init="clip",
        init_from=str(out),
        optimizer="sgd",
        nesterov=True,
        schedule="cosine",
        lr=0.05,
        epochs=2,
        holdout=250,
        distill_from="pretrain-relu",
        distill_weight=1.0,
        loader="resident",
    )
    from pipeline.data import read_manifest

    history = train_loop(cfg)["history"]
    total = read_manifest(str(demo_shards))["splits"]["train"]["count"]
    for h in history:
        assert h["val_images"] == 250 and h["test_images"] == 360  # the pick's split, and the test split
        assert h["train_images"] == (total - 250) // 32 * 32  # the held-out samples never train
    assert history[0]["lr"] == pytest.approx(0.05) and history[1]["lr"] == pytest.approx(0.025)  # cosine
    assert history[-1]["val_top1"] > 0.3 and history[-1]["test_top1"] > 0.3
    with pytest.raises(FileNotFoundError, match="distill_from='pretrain-nothing'"):
        train_loop(replace(cfg, distill_from="pretrain-nothing"))
    other = bc.create_model("resnet18", num_classes=100, stem="small")  # a teacher of other classes
    bc.save_checkpoint(tmp_path / "teacher100.safetensors", other, stage="pretrain")
    with pytest.raises(ValueError, match="is a 100-way net with the small stem; this stage trains a 10-way net"):
        train_loop(replace(cfg, distill_from=str(tmp_path / "teacher100.safetensors")))
    with pytest.raises(ValueError, match="holdout=100000"):
        train_loop(replace(cfg, holdout=100000))
    with pytest.raises(ValueError, match="loader: resident runs the small recipe"):
        train_loop(replace(cfg, augment="imagenet"))


def test_a_teacher_of_other_classes_is_refused_naming_the_first_that_differs(tmp_path):
    """Ten classes, but another data set's (CIFAR-10's names for the digits' shards) or another
    order: its i-th soft target would teach the student's i-th class another class's score."""
    from pipeline.train import load_teacher

    digits = [str(i) for i in range(10)]
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    model = bc.create_model("resnet18", num_classes=10, stem="small")
    for names, first in ((cifar, "class 0: 'airplane' there, '0' here"), (digits[::-1], "class 0: '9' there")):
        path = tmp_path / f"{names[0]}.safetensors"
        bc.save_checkpoint(path, model, stage="pretrain", config={"class_names": names})
        config = TrainConfig(distill_from=str(path), stem="small")
        with pytest.raises(ValueError, match=rf"trained on other classes or another order .*\({first}"):
            load_teacher(config, torch.device("cpu"), digits)
    same = bc.save_checkpoint(tmp_path / "same.safetensors", model, stage="pretrain", config={"class_names": digits})
    assert load_teacher(TrainConfig(distill_from=str(same), stem="small"), torch.device("cpu"), digits) is not None
    unnamed = bc.save_checkpoint(tmp_path / "phase.safetensors", model, stage="pretrain")  # a phase's checkpoint
    assert load_teacher(TrainConfig(distill_from=str(unnamed), stem="small"), torch.device("cpu"), digits) is not None


def _nan_at(steps: set[int]):
    """A Criterion whose loss is NaN at these calls (counted from 0): the gradient is NaN too."""
    from pipeline.train import Criterion

    calls = iter(range(10**9))

    class Poisoned(Criterion):
        def __call__(self, logits, images, labels):
            loss = super().__call__(logits, images, labels)
            return loss * float("nan") if next(calls) in steps else loss

    return Poisoned()


def test_a_nan_loss_stops_the_stage_before_any_checkpoint_of_it(demo_shards, tmp_path, monkeypatch):
    """NaN at global step 8 (epoch 1 of 3, 6 steps each): the stage stops in that epoch naming
    stage, epoch and step; epoch 0's train state stays the latest, nothing non-finite is on disk
    (the stage checkpoint is not written), and no loader worker is left running."""
    import pipeline.train as train_module

    poisoned = _nan_at({8})
    monkeypatch.setattr(train_module, "Criterion", lambda *a, **k: poisoned)
    cfg = smoke_config(
        demo_shards, tmp_path, stage="binarize", init="scratch", epochs=3, max_steps_per_epoch=6, finite_check_steps=2
    )
    before = {p.pid for p in mp.active_children()}
    with pytest.raises(
        train_module.NonFiniteLossError, match="binarize stage, segment binarize, epoch 1, step 8"
    ) as stop:
        train_loop(cfg)
    # the loader's persistent workers ended with the stage, though its traceback (in ``stop``) is kept
    assert stop.value.__traceback__ is not None and {p.pid for p in mp.active_children()} <= before
    states = sorted(p.name for p in (tmp_path / ".train_state").iterdir())
    assert states == ["binarize-epoch000"]  # the last good state is the latest
    model, _ = bc.load_checkpoint(tmp_path / ".train_state" / "binarize-epoch000" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert not (tmp_path / "binarize.safetensors").exists()


def test_a_model_with_nan_weights_is_never_written(tmp_path):
    model = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(bc.NonFiniteError, match="not written: 1 tensors hold NaN or inf \\(fc.weight\\)"):
        bc.save_checkpoint(tmp_path / "m.safetensors", model)
    assert not list(tmp_path.iterdir())


def _nan_rank_worker(rank, world, init_file, out):
    from pipeline.train import NonFiniteLossError, train_one_epoch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(8)]
    criterion = _nan_at({3} if rank == 1 else set())  # only rank 1's loss goes bad, at its 4th step
    try:
        train_one_epoch(model, batches, optimizer, lambda s: 0.1, 0, torch.device("cpu"), criterion,
                        world_size=world, check_every=2)  # fmt: skip
        message = "finished"
    except NonFiniteLossError as e:
        message = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)
    dist.destroy_process_group()


def test_every_rank_stops_at_the_first_bad_step_of_any_rank(tmp_path):
    """The flag is all-reduced: rank 0, whose own loss turns NaN a step later (NaN gradients arrive
    through the all-reduce), names rank 1's step 3 too, and both stop together."""
    mp.spawn(_nan_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    messages = [(tmp_path / f"out.{rank}").read_text() for rank in range(2)]
    assert all(m.startswith("step 3: the loss is not finite") for m in messages), messages


def test_the_clip_gate_lengthens_the_clip_phase_then_names_the_gap(demo_shards, tmp_path):
    """A clip phase at a ruinous lr (Adam at 100 x lr) leaves the clip twin far below the ReLU twin:
    the gate runs the clip phase again up to its cap (2 more epochs), then stops the stage naming
    the gap. A gate it meets adds no epoch."""
    from pipeline.segments import ClipGateError

    gate = dict(phase_epochs=[2, 1, 1], clip_gate_max_epochs=2)
    # 20 steps an epoch: the ReLU twin reaches ~0.7 here, the ruined clip twin ~0.16
    ruined = smoke_config(demo_shards, tmp_path / "ruined", stage="pretrain", phase_lr_scale=[1.0, 0.1, 100.0],
                          clip_gate=0.05, max_steps_per_epoch=20, **gate)  # fmt: skip
    with pytest.raises(ClipGateError, match=r"clip twin ends 0\.\d+ top-1 below .* after 2 extra clip epochs"):
        train_loop(ruined)
    states = sorted(p.name for p in (tmp_path / "ruined" / ".train_state").iterdir())
    assert states[-1] == "pretrain-epoch005"  # 2 relu + 1 leaky_clip + 1 clip + 2 more clip epochs
    _, header = bc.load_checkpoint(tmp_path / "ruined" / "pretrain-clip.safetensors")
    assert header["metrics"]["segment"] == "pretrain-clip-more2"  # the latest clip twin, saved

    met = train_loop(
        smoke_config(demo_shards, tmp_path / "met", stage="pretrain", clip_gate=0.9, max_steps_per_epoch=6, **gate)
    )
    assert [h["segment"] for h in met["history"]][-1] == "pretrain-clip" and len(met["history"]) == 4
    assert [h["epoch"] for h in met["history"]] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="clip_gate compares the clip twin"):
        TrainConfig(clip_gate=0.02, phases=["relu", "leaky_clip"], phase_epochs=[1, 1], phase_lr_scale=[1, 0.1])


def test_an_under_trained_relu_twin_stops_the_stage_naming_it(demo_shards, tmp_path):
    """relu_floor: a ReLU twin under the floor stops pretrain right after its phase (its checkpoint
    kept, no leaky-clip epoch spent); one over it goes on."""
    from pipeline.segments import ReluFloorError

    low = smoke_config(demo_shards, tmp_path / "low", stage="pretrain", relu_floor=0.99, max_steps_per_epoch=2)
    with pytest.raises(ReluFloorError, match=r"ReLU twin ends its 2 epochs at top-1 0\.\d{4}, under relu_floor=0\.99"):
        train_loop(low)
    assert (tmp_path / "low" / "pretrain-relu.safetensors").is_file()
    assert not (tmp_path / "low" / "pretrain-leaky_clip.safetensors").exists()
    ok = train_loop(
        smoke_config(demo_shards, tmp_path / "ok", stage="pretrain", relu_floor=0.01, max_steps_per_epoch=2)
    )
    assert [h["segment"] for h in ok["history"]][-1] == "pretrain-clip"
    with pytest.raises(ValueError, match="relu_floor=0.9: a top-1 that the first phase, relu, must reach"):
        TrainConfig(relu_floor=0.9, phases=["clip"], phase_epochs=[1], phase_lr_scale=[1.0])
    with pytest.raises(ValueError, match=r"relu_floor=1.0: must be in \[0, 1\)"):
        TrainConfig(relu_floor=1.0)


def test_a_fresh_pretrain_removes_the_twins_it_does_not_write_again(demo_shards, tmp_path):
    """A clip phase now at 0 epochs: the earlier run's pretrain-clip is removed, so binarize's
    init: clip fails naming the missing twin instead of starting from the earlier run's."""
    first = smoke_config(demo_shards, tmp_path, stage="pretrain", relu_control=True, max_steps_per_epoch=2)
    train_loop(first)
    names = {p.name for p in tmp_path.glob("pretrain*.safetensors")}
    assert {"pretrain-clip.safetensors", "pretrain-relu_control.safetensors"} <= names
    again = smoke_config(demo_shards, tmp_path, stage="pretrain", phase_epochs=[1, 1, 0], max_steps_per_epoch=2)
    train_loop(again)
    names = {p.name for p in tmp_path.glob("pretrain*.safetensors")}
    assert names == {"pretrain-relu.safetensors", "pretrain-leaky_clip.safetensors", "pretrain.safetensors"}
    binarize = smoke_config(demo_shards, tmp_path, stage="binarize", init="clip", max_steps_per_epoch=2)
    with pytest.raises(FileNotFoundError, match=r"pretrain-clip.safetensors.*init 'clip' needs this pretrain"):
        train_loop(binarize)


def test_the_data_wait_fraction_is_the_time_the_step_waited_for_batches():
    """A loader that sleeps before each batch shows as waited time (at least its sleeps) and most of
    the epoch; batches already in memory cost almost none. ``max_steps`` stops drawing batches."""
    from pipeline.train import train_one_epoch

    model, drawn = torch.nn.Linear(4, 3), []
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(5)]

    def slow_loader(pause_s: float):
        for batch in batches:
            time.sleep(pause_s)
            drawn.append(1)
            yield batch

    def epoch(source, max_steps=0) -> dict:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return train_one_epoch(model, source, optimizer, lambda s: 0.1, 0, torch.device("cpu"), max_steps=max_steps)

    starved = epoch(slow_loader(0.2))
    assert starved["steps"] == 5 and starved["data_wait_s"] >= 5 * 0.2
    assert 0.5 < starved["data_wait_fraction"] <= 1.0
    fed = epoch(batches)
    assert fed["steps"] == 5 and fed["data_wait_fraction"] < 0.5
    drawn.clear()
    assert epoch(slow_loader(0.0), max_steps=3)["steps"] == 3 and len(drawn) == 3


def test_batches_take_the_models_memory_format_channels_last_on_a_gpu():
    """memory_format: auto is channels_last on a GPU (bf16 tensor-core convs and the packed ops
    take it without a copy) and NCHW on a CPU; the step hands the model its batches in that layout."""
    from pipeline.train import memory_format, train_one_epoch

    assert memory_format(TrainConfig(), torch.device("cuda")) == torch.channels_last
    assert memory_format(TrainConfig(), torch.device("cpu")) == torch.contiguous_format
    assert memory_format(TrainConfig(memory_format="channels_last"), torch.device("cpu")) == torch.channels_last
    assert memory_format(TrainConfig(memory_format="contiguous"), torch.device("cuda")) == torch.contiguous_format
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    model = model.to(memory_format=torch.channels_last)
    seen = []
    channels_last = torch.channels_last
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=channels_last)))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, batches, optimizer, lambda s: 0.1, 0, torch.device("cpu"), layout=torch.channels_last)
    assert seen == [True] * 3


def test_a_plan_with_no_full_batch_stops_before_training(tmp_path, demo_shards):
    """Each loader worker batches the shards it reads; when no worker of a rank has a full batch, an
    epoch has no step. The driver says so before it starts a worker (check_full_batches), naming the
    images, ranks, workers and batch; a rank's own check stops a stage before it writes anything."""
    from pipeline.train import EmptyEpochError, check_full_batches

    config = smoke_config(demo_shards, tmp_path / "out", stage="binarize", init="scratch", batch_size=1000)
    check_full_batches(config, 1)  # 1,437 training images, one reader: a batch of 1,000
    with pytest.raises(EmptyEpochError, match=r"1437 training images for 2 rank\(s\) x 1 loader worker"):
        check_full_batches(config, 2)
    two_workers = replace(config, loader_workers=2)
    with pytest.raises(
        EmptyEpochError, match=r"no full batch of batch_size=1000 .* lower batch_size or loader_workers"
    ):
        train_loop(two_workers)
    assert not (tmp_path / "out").exists()  # no checkpoint of an untrained stage
