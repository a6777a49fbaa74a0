"""The registered pyfunc's ``predict`` on what callers send it: the logged signature's DataFrame of
image bytes, and (on the unwrapped model) uint8 arrays. Both must give the answer ``bireal
predict`` gives for the same image, and anything else a one-line error, never a silent wrong answer.
The registry tests (tests/test_registry.py) load the same class through MLflow and its model server."""

import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import bireal_core as bc
from cuda_ext.packed import export_model, load_packed
from cuda_ext.predict import ImageError, load_images
from pipeline.adapters.pyfunc_model import MAX_BATCH, BirealPackedModel

# (stem, width, classes, input side, photo sizes): the CIFAR-style net on small photos, and the
# ImageNet path (7x7 stem, resize 256 + centre 224, 1000-way head) on photo-sized ones
NETS = {
    "small": ("small", 0.25, 10, 32, ((32, 32), (40, 50), (64, 48))),
    "imagenet": ("imagenet", 0.125, 1000, 224, ((32, 32), (375, 500), (333, 250))),
}


@pytest.fixture(scope="module", params=list(NETS))
def served(request, tmp_path_factory):
    """A packed Bi-Real-18 (trained BN statistics, so classes differ by image), its pyfunc, and
    three photos of different sizes as arrays, PNG files and what ``bireal predict`` says of them."""
    stem, width, classes, side, sizes = NETS[request.param]
    tmp = tmp_path_factory.mktemp(f"pyfunc-{stem}")
    torch.manual_seed(3)
    model = bc.create_model("bireal18", num_classes=classes, stem=stem, width=width).train()
    with torch.no_grad():
        model(torch.randn(16, 3, side, side))
    names = [f"c{i}" for i in range(classes)]
    artifact = export_model(model.eval(), tmp / "model.safetensors", class_names=names)
    pyfunc = BirealPackedModel()
    pyfunc.load_context(SimpleNamespace(artifacts={"packed": str(artifact)}))
    rng = np.random.default_rng(0)
    arrays = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]
    files = []
    for i, a in enumerate(arrays):
        files.append(tmp / f"photo{i}.png")
        Image.fromarray(a).save(files[-1])
    packed, header = load_packed(artifact)
    assert header["input"]["size"] == side
    with torch.inference_mode():
        expected = packed(load_images([str(f) for f in files], header["input"])).argmax(1).tolist()
    return SimpleNamespace(pyfunc=pyfunc, arrays=arrays, files=files, expected=expected)


def predict_ids(served, model_input) -> list[int]:
    return served.pyfunc.predict(None, model_input)["class_id"].tolist()


def test_bytes_and_arrays_answer_as_bireal_predict(served):
    assert len(set(served.expected)) > 1  # the photos are told apart: a shared wrong answer would show
    as_bytes = pd.DataFrame({"image": [f.read_bytes() for f in served.files]})
    out = served.pyfunc.predict(None, as_bytes)
    assert out["class_id"].tolist() == served.expected
    assert out["label"].tolist() == [f"c{i}" for i in served.expected]
    assert ((out["score"] > 0) & (out["score"] <= 1)).all()
    assert predict_ids(served, served.arrays) == served.expected  # a list: sizes may differ
    assert predict_ids(served, served.arrays[0][None]) == served.expected[:1]  # (1, H, W, 3)
    assert predict_ids(served, np.stack([served.arrays[0]] * 2)) == served.expected[:1] * 2
    # gray and RGBA arrays are read as bireal predict reads such files: converted to RGB
    gray = [a[..., 1] for a in served.arrays]
    assert predict_ids(served, gray) == predict_ids(served, [np.stack([g] * 3, -1) for g in gray])
    opaque = [np.concatenate([a, np.full_like(a[..., :1], 255)], -1) for a in served.arrays]
    assert predict_ids(served, opaque) == served.expected


@pytest.mark.parametrize(
    "make_input, message",
    [
        # one image without its batch axis was read as H one-row images, each with a class
        (
            lambda a: a[0],
            r"an array of shape \(32, 32, 3\): a batch is \(N, H, W, 3\) uint8 \(one image: image\[None\]",
        ),
        (lambda a: np.zeros(10, np.uint8), r"an array of shape \(10,\)"),
        # floats in [0, 1] were cast to uint8: all zeros, classified without a word
        (lambda a: [a[0] / 255.0], r"image 0: dtype float64, expected uint8 RGB in 0\.\.255 \(from floats in \[0, 1\]"),
        (lambda a: [a[1], a[0].astype(np.int16) * 4], r"image 1: dtype int16, expected uint8"),
        (lambda a: [a[0][..., :2]], r"image 0: shape \(32, 32, 2\), expected \(H, W, 3\) RGB"),
        (lambda a: [a[0][..., None, 0]], r"image 0: shape \(32, 32, 1\), expected \(H, W, 3\) RGB \(or"),
        (lambda a: np.zeros((0, 8, 8, 3), np.uint8), r"0 images in one call: send 1\.\.256"),
        (lambda a: np.zeros((MAX_BATCH + 1, 8, 8, 3), np.uint8), r"257 images in one call"),
        # an unwrapped model called with the wrong column raised a bare KeyError('image')
        (lambda a: pd.DataFrame({"img": [b"x"]}), r"a DataFrame with columns \['img'\]: expected an 'image' column"),
        (lambda a: pd.DataFrame({"image": ["/etc/hostname"]}), r"image 0: expected the image file's bytes .* got str"),
    ],
    ids=[
        "one-image-no-batch-axis",
        "1-d",
        "float",
        "int16",
        "two-channels",
        "one-channel",
        "empty",
        "too-many",
        "column",
        "path",
    ],
)
def test_what_it_refuses_is_named(served, make_input, message):
    with pytest.raises(ValueError, match=message):
        served.pyfunc.predict(None, make_input(served.arrays))


def test_an_image_its_resize_would_blow_up_is_refused_before_decoding(served):
    """A 100000 x 1 PNG is 100,000 pixels and a few hundred bytes, but resized to the model's
    shorter side it would be 3.2 G (ImageNet) or 102 M (small) pixels: a 20000 x 1 one took 6 GB
    in `bireal predict`, and one request could end a model server. Refused from its size."""
    buffer = io.BytesIO()
    Image.new("RGB", (100_000, 1)).save(buffer, "PNG")
    blown = r"image 0: 100000 x 1 would be \d+ x \d+ = [\d,]+ pixels with its shorter side resized to \d+, over the"
    with pytest.raises(ImageError, match=blown + r" 40,000,000 this reads \(not decoded\)"):
        served.pyfunc.predict(None, pd.DataFrame({"image": [buffer.getvalue()]}))
    with pytest.raises(ImageError, match=blown):
        served.pyfunc.predict(None, [np.zeros((1, 100_000, 3), np.uint8)])
    wide = np.zeros((8, 500, 3), np.uint8)  # 62.5:1, a panorama strip: read as any photo
    assert len(predict_ids(served, [wide])) == 1
