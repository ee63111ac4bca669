import pytest
import torch

from rsedge.trainer.models import REGISTRY, create_model, list_models

REQUIRED = {"resnet18", "resnet34", "resnet50", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_small",
            "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b3", "convnext_tiny"}


def test_registry_has_the_required_architectures():
    assert REQUIRED <= set(list_models())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_any_number_of_classes_on_64px_inputs(name):
    model = create_model(name, 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(KeyError, match="resnet18"):
        create_model("resnet19", 3)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        create_model("resnet18", 3, weights=tmp_path / "nope.pth")


def test_initial_weights_load_except_the_resized_head(tmp_path):
    from safetensors.torch import save_file

    src = create_model("resnet18", 10)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        dst = create_model("resnet18", 4, weights=tmp_path / f)
        assert torch.equal(dst.conv1.weight, src.conv1.weight)
        assert dst.fc.weight.shape == (4, 512)
