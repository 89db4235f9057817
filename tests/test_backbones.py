"""Teacher weights: the offline mapping is right, and missing weights fail with a useful message."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stfpm_edge import backbones
from stfpm_edge.errors import ModelFileError, StfpmError


@pytest.mark.parametrize("name,expected", [("chelsea", 285), ("coffee", 967)])  # Egyptian cat, espresso
def test_lite0_imagenet_weights_classify_known_images(name, expected):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image comes with the [dev] extra")
    model = backbones.imagenet_classifier("tf_efficientnet_lite0")
    img = getattr(skimage_data, name)()  # RGB uint8
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        assert model(x).argmax(1).item() == expected


def test_teacher_is_frozen_and_matches_classifier_weights():
    teacher = backbones.create_teacher("tf_efficientnet_lite0")
    full = backbones.imagenet_classifier("tf_efficientnet_lite0")
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.state_dict()["conv_stem.weight"], full.state_dict()["conv_stem.weight"])
    feats = teacher(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [24, 40, 112]
    assert [64 // f.shape[-1] for f in feats] == [4, 8, 16]


def test_resnet18_offline_without_file_says_what_to_do(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(StfpmError, match="--teacher-weights"):
        backbones.create_teacher("resnet18")


def test_resnet18_from_local_file(tmp_path):
    import timm

    state = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    teacher = backbones.create_teacher("resnet18", tmp_path / "r18.pth")
    assert torch.equal(teacher.state_dict()["conv1.weight"], state["conv1.weight"])
    assert [f.shape[1] for f in teacher(torch.zeros(1, 3, 64, 64))] == [64, 128, 256]


def test_weights_file_with_code_or_garbage_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="bad.pth"):
        backbones.create_teacher("resnet18", bad)
    with pytest.raises(StfpmError, match="unknown backbone"):
        backbones.create_features("vgg99")
