"""Export -> load -> run of the packed model; exactness against both references."""

import re

import pytest
import torch
import torch.nn.functional as F
from imagegen import rewrite_artifact_header

import bireal_core as bc
from cuda_ext import ops
from cuda_ext.packed import (
    ArtifactError,
    PackedBinaryConv,
    PackedBiReal,
    artifact_size,
    compare_with_float,
    export_checkpoint,
    export_model,
    ieee_float32,
    load_packed,
    read_artifact,
    reference_ops,
    stem_pool_args,
)
from cuda_ext.reference import pack_signs_ref


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as normalised 3x32x32 images: a real test set that ships offline."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.25, torch.tensor(d.target)


@pytest.fixture(scope="module")
def fitted_bireal18():
    """A Bi-Real-18 (width 0.25) fitted for a few hundred steps on digits, so that logit margins
    are those of a trained net. (A short fit for the test, not the pipeline's training loop.)"""
    torch.manual_seed(0)
    x, y = digits_images()
    model = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _step in range(150):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y


def randomized(name: str, **kwargs):
    """Random weights with BN statistics moved off their defaults."""
    model = bc.create_model(name, num_classes=10, stem="small", width=0.25, **kwargs).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("bireal18", {}),
        ("bireal34", {"pad_value": -1.0}),
        ("bireal50", {"weight_gradient": "plain"}),
        ("bireal18", {"pad_value": 1.0, "weight_gradient": "official"}),
    ],
)
def test_packed_equals_reference_of_folded_computation(tmp_path, name, kwargs):
    packed, _ = load_packed(export_model(randomized(name, **kwargs), tmp_path / "m.safetensors"))
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        ours = packed(x)
        with reference_ops():
            ref = packed(x)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", ["bireal18", "bireal50"])
def test_bfloat16_activations_exact_against_reference_and_close_to_float(tmp_path, fitted_bireal18, name):
    """set_activation_dtype(bfloat16): the binary convs still equal the reference ops bit for bit (same
    bf16 stem and shortcuts), and the logits stay close to the float32 model's."""
    model = fitted_bireal18[0] if name == "bireal18" else randomized(name)
    packed, _ = load_packed(export_model(model, tmp_path / "m.safetensors"))
    x = fitted_bireal18[1][:64]
    with torch.inference_mode():
        f32 = packed(x)
        packed.set_activation_dtype(torch.bfloat16)
        ours = packed(x)
        with reference_ops():
            ref = packed(x)
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)
    if name == "bireal18":  # a trained net: bf16 rounding flips few top-1 decisions
        assert (ours.argmax(1) == f32.argmax(1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="activation dtype"):
        packed.set_activation_dtype(torch.float16)


def test_agreement_with_training_graph(fitted_bireal18, tmp_path):
    model, x, y = fitted_bireal18
    packed, _ = load_packed(export_model(model, tmp_path / "m.safetensors"))
    report = compare_with_float(model, packed, x)
    print(
        f"\npacked vs float on {report['images']} digits: top-1 agreement "
        f"{report['top1_agreement']:.4%}, {report['disagreements']} flips, max |logit diff| "
        f"{report['max_logit_diff']:.2e}"
    )
    with torch.inference_mode():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5  # the fit is a real classifier, with real margins
    assert report["top1_agreement"] >= 0.999


def test_checkpoint_export_load_logits(fitted_bireal18, tmp_path):
    model, x, _ = fitted_bireal18
    ckpt = bc.save_checkpoint(
        tmp_path / "c.safetensors", model, stage="finetune", config={"class_names": [f"digit{i}" for i in range(10)]}
    )
    art = export_checkpoint(ckpt, tmp_path / "a.safetensors")
    packed, header = load_packed(art)
    assert header["class_names"][3] == "digit3"
    assert header["conventions"]["sign_of_zero"] == "+1" and header["conventions"]["pad_value"] == 0.0
    assert header["input"]["size"] == 32 and header["source"]["stage"] == "finetune"
    again, _ = load_packed(art)
    with torch.inference_mode():
        assert torch.equal(packed(x[:64]), again(x[:64]))


@pytest.mark.parametrize("name", ["bireal18", "bireal50"])
def test_imagenet_stem_pools_and_packs_in_one_op(tmp_path, name):
    """The ImageNet stem's max-pool runs as max_pool_signs, which adds the stem conv's bias and packs
    the first block's input in the same pass: the logits equal the reference ops', and the stem's
    output equals the unfused stem's (conv, + bias, pool; then the first block packs) bit for bit in
    float32 and bfloat16 activations, and the conv-with-bias stem to float rounding."""
    model = bc.create_model(name, num_classes=10, width=0.25).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # BN statistics off their defaults
    packed, _ = load_packed(export_model(model.eval(), tmp_path / "m.safetensors"))
    assert stem_pool_args(packed.stem[-1]) == (3, 2, 1)
    x = torch.randn(3, 3, 64, 64)
    for dtype in (torch.float32, torch.bfloat16):
        packed.set_activation_dtype(dtype)
        with torch.inference_mode():
            ours = packed(x)
            with reference_ops():
                ref = packed(x)
            stem_out, stem_signs = packed.run_stem(x.contiguous(memory_format=torch.channels_last))
            conv = packed.stem[0]
            x_in = x.to(dtype).contiguous(memory_format=torch.channels_last)
            unfused = F.max_pool2d(F.conv2d(x_in, conv.weight, None, 2, 3) + conv.bias.view(1, -1, 1, 1), 3, 2, 1)
            with_bias = packed.stem(x_in)  # the conv adding its own bias
        assert torch.equal(ours, ref), dtype
        assert torch.equal(stem_out, unfused) and torch.equal(stem_signs, pack_signs_ref(unfused))
        close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(stem_out, with_bias, **close)


def test_a_stem_padded_to_8_input_channels_computes_the_same(tmp_path):
    """pad_stem_input(8): zero weights for 5 zero channels appended to every input, the same
    convolution: the stem's output and the logits equal to float rounding."""
    torch.manual_seed(0)
    model = bc.create_model("bireal18", num_classes=10, width=0.25).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # BN statistics off their defaults
    packed, _ = load_packed(export_model(model.eval(), tmp_path / "m.safetensors"))
    padded, _ = load_packed(tmp_path / "m.safetensors")
    assert padded.pad_stem_input(8) is padded and padded.stem[0].weight.shape[1] == 8
    assert torch.equal(padded.stem[0].weight[:, :3], packed.stem[0].weight) and not padded.stem[0].weight[:, 3:].any()
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(padded.run_stem(x)[0], packed.run_stem(x)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded(x), packed(x), rtol=1e-5, atol=1e-5)
    assert padded.pad_stem_input(8) is padded  # already 8: nothing to do
    with pytest.raises(ValueError, match="already takes 8 channels"):
        padded.pad_stem_input(4)


def test_what_the_stem_would_take_silently_is_refused(tmp_path):
    """The stem casts its input and a padded stem zero-pads it: uint8 pixels (0..255, not
    normalized) used to run as floats, and a 1-channel batch through a stem padded to 8 as if it
    were an RGB one with two black channels, each to confident logits. Now: one error naming it."""
    packed, _ = load_packed(export_model(randomized("bireal18"), tmp_path / "m.safetensors"))
    packed.pad_stem_input(8)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x.double()), packed(x))  # any float dtype: the stem casts it once
        with pytest.raises(TypeError, match=r"expected normalized float images .* got torch.uint8"):
            packed((x * 50 + 128).clamp(0, 255).to(torch.uint8))
        for shape in ((2, 1, 64, 64), (2, 64, 64, 3), (3, 64, 64), (2, 8, 64, 64)):
            with pytest.raises(ValueError, match=r"expected images \(N, 3, H, W\), got shape " + re.escape(str(shape))):
                packed(torch.randn(shape))


def test_bfloat16_weights_cast_once_compute_what_autocast_did(tmp_path):
    """set_activation_dtype(bfloat16) casts the real-valued convs' weights (stem, shortcuts) to
    bfloat16 once: the features equal the same net's run the earlier way, float32 weights cast by
    torch.autocast in every forward, and so do the logits of the float32 head on them;
    set_activation_dtype(float32) puts the float32 weights back bit for bit; a stem is padded and
    shortcuts fused only while float32."""
    torch.manual_seed(0)
    model = bc.create_model("bireal18", num_classes=10, width=0.25).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # BN statistics off their defaults
    path = export_model(model.eval(), tmp_path / "m.safetensors")
    packed, _ = load_packed(path)
    x = torch.randn(3, 3, 64, 64)
    float_weights = [p.clone() for p in packed.parameters()]
    with torch.inference_mode():
        f32 = packed(x)
        packed.set_activation_dtype(torch.bfloat16)
        assert {m.weight.dtype for m in packed.real_layers()} == {torch.bfloat16} and len(packed.real_layers()) == 4
        assert packed.fc.weight.dtype == torch.float32  # the head stays float32
        ours, ours_features = packed(x), packed.features(x)
        autocast_net, _ = load_packed(path)  # float32 weights, the binary convs' outputs in bfloat16
        for m in autocast_net.modules():
            if isinstance(m, PackedBinaryConv):
                m.out_dtype = torch.bfloat16
        with torch.autocast("cpu", torch.bfloat16):
            theirs_features = autocast_net.features(x)
        theirs = autocast_net.head(theirs_features)
    assert ours_features.dtype == torch.bfloat16 and torch.equal(ours_features, theirs_features)
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="while the activations are float32"):
        packed.pad_stem_input(8)
    with pytest.raises(ValueError, match="while the activations are float32"):
        packed.fuse_shortcuts()
    packed.set_activation_dtype(torch.float32)
    assert all(torch.equal(p, kept) and p.dtype == torch.float32 for p, kept in zip(packed.parameters(), float_weights))
    with torch.inference_mode():
        assert torch.equal(packed(x), f32)


def test_the_border_classes_are_made_once_at_load(tmp_path):
    """load_packed makes each zero-padded binary conv's border-class table from its weights (the
    CUDA kernel then skips making it per call); it is not part of the artifact."""
    packed, _ = load_packed(export_model(randomized("bireal18"), tmp_path / "m.safetensors"))
    convs = [m for m in packed.modules() if isinstance(m, PackedBinaryConv)]
    assert len(convs) == 16
    for conv in convs:
        assert torch.equal(conv.border_classes, ops.border_classes(conv.packed, conv.in_channels, conv.padding))
        assert conv.border_classes.shape == ((conv.padding + 1) ** 4, conv.packed.shape[0])
    assert not any("border_classes" in k for k in packed.state_dict())
    with pytest.raises(ValueError, match="border_classes: packed_w must be int64"):
        ops.border_classes(convs[0].packed, 65, 1)


def test_compile_fullgraph(tmp_path):
    packed, _ = load_packed(export_model(randomized("bireal18"), tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(packed, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), packed(x), rtol=1e-5, atol=1e-5)


def test_bireal18_imagenet_artifact_size(tmp_path):
    path = export_model(bc.create_model("bireal18").eval(), tmp_path / "b18.safetensors")
    size = artifact_size(path)
    print(f"\npacked Bi-Real-18 (1000 classes): {size['bytes']:,} bytes = {size['mbit']:.2f} Mbit")
    assert size["mbit"] == pytest.approx(33.6, rel=0.03)
    packed, _ = load_packed(path)
    with torch.inference_mode():
        assert packed(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_corrupt_artifacts_rejected(tmp_path):
    path = export_model(randomized("bireal18"), tmp_path / "m.safetensors")
    raw = bytearray(path.read_bytes())
    tampered = tmp_path / "tampered.safetensors"
    raw[-5] ^= 0xFF  # one flipped byte in the tensor data
    tampered.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_packed(tampered)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: len(raw) // 2])
    with pytest.raises(ArtifactError, match="truncated.safetensors"):
        read_artifact(truncated)
    with pytest.raises(ArtifactError, match="not found"):
        read_artifact(tmp_path / "absent.safetensors")
    ckpt = bc.save_checkpoint(tmp_path / "ckpt.safetensors", randomized("bireal18"))
    with pytest.raises(ArtifactError, match="not a packed bireal artifact"):
        read_artifact(ckpt)


def edit(part: str, key: str | None, value):
    def apply(header):
        if key is None:
            header[part] = value
        else:
            header[part][key] = value
        return header

    return apply


@pytest.mark.parametrize(
    "change, message",
    [
        (edit("input", "mean", [0.5]), "input.mean=[0.5]: 3 finite numbers (one per image channel)"),
        (edit("input", "mean", [0.5, "0.5", 0.5]), "input.mean=[0.5, '0.5', 0.5]: 3 finite numbers"),
        (edit("input", "std", [0.25, 0.0, 0.25]), "input.std=[0.25, 0.0, 0.25]: 3 numbers > 0"),
        (edit("input", "std", None), "input.std=None: 3 numbers > 0"),
        (edit("input", "size", 0), "input.size=0: an integer side in 1..4096"),
        (edit("input", "resize", "32"), "input.resize='32': an integer side in 1..4096"),
        (edit("input", "size", 64), "input.size=64 is larger than input.resize=32: the center crop would pad"),
        (edit("input", "augment", "cifar"), "input.augment='cifar': one of imagenet, caffe, small"),
        (edit("input", None, [32, 32]), "input=[32, 32]: a mapping with size, resize, mean and std"),
        (edit("conventions", "word_bits", 32), "conventions.word_bits=32: this code packs and reads 64"),
        (edit("conventions", "sign_of_zero", "-1"), "conventions.sign_of_zero='-1': this code packs and reads '+1'"),
        (edit("conventions", "pad_value", -1.0), "conventions.pad_value=-1.0: this code packs and reads 0.0"),
        (edit("conventions", None, None), "conventions.sign_of_zero=None"),
        (edit("conventions", "activation_order", "NCHW"), "conventions.activation_order: not a convention this code"),
        (edit("class_names", None, ["a", "b"]), "2 class names for 10 outputs"),
        (edit("class_names", None, [*"abcdefghi", "a"]), "class_names[9]='a' repeats class_names[0]: each output"),
        (edit("class_names", None, list(range(10))), "class_names[0]=0: each output's name is a non-empty string"),
        (edit("class_names", None, [*"abcdefghi", ""]), "class_names[9]='': each output's name is a non-empty"),
        (lambda header: "{not json", "the bireal_packed header is not valid JSON (Expecting property name"),
        (lambda header: [header], "the bireal_packed header is a JSON list, not an object"),
    ],
    ids=lambda case: case.split(":")[0] if isinstance(case, str) else "",
)
def test_a_header_that_breaks_the_format_is_refused_naming_the_key(tmp_path, change, message):
    """The header is not covered by the tensors' sha256, and a mean of one number (broadcast over
    the channels), a zero std or another bit order would silently change every prediction: each is
    an ArtifactError naming the file and the key, on load (predict, evaluate, serving)."""
    good = export_model(randomized("bireal18"), tmp_path / "good.safetensors")
    bad = tmp_path / "edited.safetensors"
    rewrite_artifact_header(good, bad, change)
    with pytest.raises(ArtifactError) as refused:
        load_packed(bad)
    assert str(refused.value).startswith(f"{bad}: ") and message in str(refused.value)
    load_packed(good)  # the unedited header loads


def test_export_refuses_an_input_config_it_could_not_load(tmp_path):
    """export_model and export_checkpoint check the input config before writing (the checkpoint's
    copy is named by its key), so no artifact that load_packed would refuse is written."""
    model = randomized("bireal18")
    input_config = {**bc.default_input_config("small"), "std": [0.25, 0.25, 0.0]}
    out = tmp_path / "m.safetensors"
    with pytest.raises(ArtifactError, match=r"m.safetensors: not written: the model's input.std=\[0.25, 0.25, 0.0\]"):
        export_model(model, out, input_config=input_config)
    with pytest.raises(ValueError, match=r"class_names\[3\]='a' repeats class_names\[0\]"):
        export_model(model, out, class_names=["a", "b", "c", "a", *"efghij"])
    ckpt = bc.save_checkpoint(tmp_path / "ckpt.safetensors", model, config={"input": {**input_config, "size": 0}})
    with pytest.raises(ArtifactError, match=r"ckpt.safetensors: config.input.size=0: an integer .* nothing exported"):
        export_checkpoint(ckpt, out)
    assert not out.exists()


def test_only_binary_models_export(tmp_path):
    with pytest.raises(ValueError, match="only Bi-Real"):
        export_model(bc.create_model("resnet18", num_classes=10), tmp_path / "x.safetensors")
    twin = bc.create_twin("bireal18", num_classes=10, stem="small", width=0.25)
    with pytest.raises(ValueError, match="binary_weights=True"):
        export_model(twin, tmp_path / "x.safetensors")


def test_packed_model_built_without_float_weights():
    spec = {"name": "bireal18", "kwargs": {"num_classes": 10, "stem": "small", "width": 0.25}}
    packed = PackedBiReal(spec)
    assert not any(
        p.dtype == torch.float32 and p.dim() == 4 and p.shape[-1] == 3 and "conv" in n
        for n, p in packed.named_buffers()
    )  # binary 3x3s are int64 bits only


def test_ieee_float32_turns_tf32_off_inside_and_restores_the_flags():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with ieee_float32():
                assert not cudnn.allow_tf32 and not matmul.allow_tf32
                raise RuntimeError("inside")
        assert cudnn.allow_tf32 and matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


@pytest.mark.parametrize("name", ["bireal18", "bireal50"])
def test_fused_shortcuts_compute_the_same_as_pool_then_1x1(tmp_path, name):
    """fuse_shortcuts: each stage entry's AvgPool 2x2/2 + 1x1 conv + bias becomes one 2x2 stride-2 conv
    without bias, its bias added by the block's binary conv: each shortcut's output + bias equals the
    two-step shortcut's to float rounding, the logits too in float32; the reference ops still agree
    bit for bit with the fused net, in float32 and bfloat16 activations."""
    torch.manual_seed(0)
    model = bc.create_model(name, num_classes=10, width=0.25).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # BN statistics off their defaults
    path = export_model(model.eval(), tmp_path / "m.safetensors")
    plain, _ = load_packed(path)
    fused, _ = load_packed(path)
    before = [b.downsample for b in plain.blocks if b.downsample is not None]
    biases = {id(b): (b.conv3 if fused.bottleneck else b.conv).bias.clone() for b in fused.blocks}
    assert fused.fuse_shortcuts() is fused
    after = [b.downsample for b in fused.blocks if b.downsample is not None]
    pooled = [d for d in before if isinstance(d[0], torch.nn.AvgPool2d)]
    assert len(after) == len(before) and len(pooled) == 3  # three stage entries pool
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        for two_step, one in zip(before, after):
            if not isinstance(two_step[0], torch.nn.AvgPool2d):  # a 1x1 without a pool stays as it was
                assert isinstance(one[0], torch.nn.Identity) and one[1].kernel_size == (1, 1)
                assert one[1].bias is not None
                continue
            assert one[1].kernel_size == (2, 2) and one[1].stride == (2, 2) and one[1].bias is None
            c = two_step[1].in_channels
            y = torch.randn(2, c, 16, 16).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(one(y) + two_step[1].bias.view(1, -1, 1, 1), two_step(y), rtol=1e-5, atol=1e-5)
        for block, plain_block in zip(fused.blocks, plain.blocks):
            receiver = block.conv3 if fused.bottleneck else block.conv
            shortcut = plain_block.downsample
            pooled_here = shortcut is not None and isinstance(shortcut[0], torch.nn.AvgPool2d)
            moved = shortcut[1].bias if pooled_here else 0
            assert torch.equal(receiver.bias, biases[id(block)] + moved)
        ours = fused(x)
        torch.testing.assert_close(ours, plain(x), rtol=1e-4, atol=1e-4)
        with reference_ops():
            assert torch.equal(fused(x), ours)
        fused.set_activation_dtype(torch.bfloat16)
        ours = fused(x)
        with reference_ops():
            assert torch.equal(fused(x), ours)


class LaunchedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The operators a forward dispatches that run a kernel (not the views): on a GPU each is at
    least one kernel, one node of a CUDA graph."""

    VIEWS = {
        "aten.view.default",
        "aten.t.default",
        "aten._unsafe_view.default",
        "aten.permute.default",
        "aten.as_strided_.default",
        "aten.as_strided.default",
        "aten.detach.default",
        "aten.expand.default",
        "aten.alias.default",
        "aten.unsqueeze.default",
        "aten.squeeze.dim",
        "aten.reshape.default",
    }

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in self.VIEWS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_batch_1_forward_fits_issue_25s_graph_budget():
    """Issue 25's batch-1 budget is at most ~25 nodes in the forward's CUDA graph. The packed
    Bi-Real-18 at 224 with bfloat16 activations and fused shortcuts dispatches 24 kernel-running
    operators: 16 binary blocks, the stem conv (its bias added by the pool), the pool + pack, 3
    shortcut convs, the input's one cast to bfloat16 channels_last, the float32 mean and the head's
    addmm. (cuDNN's convs add a bias in a kernel of their own: the fused shortcuts and the stem have
    none to add.)"""
    packed = PackedBiReal({"name": "bireal18", "kwargs": {"num_classes": 1000}}).eval()
    packed.fuse_shortcuts().set_activation_dtype(torch.bfloat16)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), LaunchedOps() as launched:  # (under inference_mode, conv2d and linear arrive whole)
        logits = packed(x)
    assert logits.shape == (1, 1000) and logits.dtype == torch.float32
    counts = {op: launched.ops.count(op) for op in set(launched.ops)}
    assert counts == {
        "bireal.binary_block.default": 16,
        "aten.convolution.default": 4,
        "bireal.max_pool_signs.default": 1,
        "aten._to_copy.default": 1,
        "aten.mean.dim": 1,
        "aten.addmm.default": 1,
    }, counts
    assert all(conv.bias is None for conv in packed.real_layers() if conv is not packed.stem[0])


def test_a_space_to_depth_stem_computes_the_same(tmp_path):
    """space_to_depth_stem: the 7x7/2 stem conv on 3 channels as a 4x4/1 conv on 16 channels of 2x2
    input blocks. The blocks hold the input where the index arithmetic says (channel (c, r, r') of
    block (j, l) is x[c, 2(j - 2) + r, 2(l - 2) + r']); the stem's output and the logits equal the
    plain stem's to float rounding, from NCHW and channels_last inputs, in float32 and bfloat16; an
    odd input size and a stem padded the other way are refused."""
    from cuda_ext.float_parts import space_to_depth_input

    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 14)
    z = space_to_depth_input(x, torch.float32)
    assert z.shape == (2, 16, 8, 10) and z.is_contiguous(memory_format=torch.channels_last)
    for c, r, r2, j, col in [(0, 0, 0, 2, 2), (2, 1, 1, 6, 8), (1, 0, 1, 4, 3)]:
        assert z[1, c * 4 + r * 2 + r2, j, col] == x[1, c, 2 * (j - 2) + r, 2 * (col - 2) + r2]
    assert not z[:, 12:].any() and not z[:, :, :2].any() and not z[:, :, -1].any() and not z[:, :, :, :2].any()

    model = bc.create_model("bireal18", num_classes=10, width=0.25).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # BN statistics off their defaults
    path = export_model(model.eval(), tmp_path / "m.safetensors")
    plain, _ = load_packed(path)
    s2d, _ = load_packed(path)
    assert s2d.space_to_depth_stem() is s2d and s2d.space_to_depth_stem() is s2d  # twice: once
    assert s2d.stem[0].weight.shape == (16, 16, 4, 4) and s2d.stem[0].stride == (1, 1)
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        for x in (images, images.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(s2d.run_stem(x)[0], plain.run_stem(x)[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s2d(x), plain(x), rtol=1e-4, atol=1e-4)
        s2d.set_activation_dtype(torch.bfloat16)
        plain.set_activation_dtype(torch.bfloat16)
        torch.testing.assert_close(s2d.run_stem(images)[0], plain.run_stem(images)[0], rtol=0.02, atol=0.05)
        ours = s2d(images)
        with reference_ops():
            assert torch.equal(s2d(images), ours)
        with pytest.raises(ValueError, match="height and width must be even"):
            s2d(torch.randn(1, 3, 63, 64))
    with pytest.raises(ValueError, match="while the activations are float32"):
        s2d.space_to_depth_stem()
    padded, _ = load_packed(path)
    with pytest.raises(ValueError, match="use one or the other"):
        padded.pad_stem_input(8).space_to_depth_stem()
    with pytest.raises(ValueError, match="use one or the other"):
        plain.set_activation_dtype(torch.float32).space_to_depth_stem().pad_stem_input(8)


def test_tune_kernel_paths_gives_each_binary_conv_its_fastest_path(tmp_path):
    """tune_kernel_paths times every binary conv on each of the device's paths (here the CPU's) and
    sets its ``kernel_path``: the logits stay the same bit for bit (every path computes the same
    bits), each conv then runs on its own path (a path that does not exist is refused by name), and
    the recording hooks are gone."""
    torch.manual_seed(0)
    model = bc.create_model("bireal18", num_classes=10, width=0.25).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # BN statistics off their defaults
    packed, _ = load_packed(export_model(model.eval(), tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = packed(x)
    chosen = packed.tune_kernel_paths(x, repeats=2)
    convs = packed.binary_convs()
    assert set(chosen) == set(convs) and len(chosen) == 16 and set(chosen.values()) <= set(ops.cpu_paths())
    assert all(conv.kernel_path == chosen[name] for name, conv in convs.items())
    assert all(not conv._forward_pre_hooks for conv in convs.values())
    with torch.inference_mode():
        assert torch.equal(packed(x), before)
        convs["blocks.5.conv"].kernel_path = "no-such-path"
        with pytest.raises(RuntimeError, match="no-such-path"):
            packed(x)
