import pytest
import torch

from rsedge.trainer.models import REGISTRY, create_model, get_spec, list_models

REQUIRED = {"resnet18", "resnet34", "resnet50", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_small",
            "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b3", "convnext_tiny",
            "swin_t", "efficientnet_v2_s", "regnet_y_3_2gf"}  # the last three: seed 003's backbones


def test_registry_has_the_required_architectures():
    assert REQUIRED <= set(list_models())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_any_number_of_classes_on_64px_inputs(name):
    model = create_model(name, 7).eval()
    task = get_spec(name).task
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    if task == "detection":  # three raw maps, 3 anchors x (5 + 7) channels, strides 8 / 16 / 32
        assert [tuple(o.shape) for o in out] == [(2, 36, 8, 8), (2, 36, 4, 4), (2, 36, 2, 2)]
    else:
        assert out.shape == ((2, 7, 64, 64) if task == "segmentation" else (2, 7))


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


# -- the specs: every architecture declares its task, head, outputs and defaults --------------------

DECLARED_HEADS = {"resnet18": "fc", "resnet34": "fc", "resnet50": "fc", "vgg16_bn": "classifier.6",
                  "mobilenet_v2": "classifier.1", "mobilenet_v3_small": "classifier.3",
                  "mobilenet_v3_large": "classifier.3", "efficientnet_b0": "classifier.1",
                  "efficientnet_b3": "classifier.1", "convnext_tiny": "classifier.2", "swin_t": "head",
                  "efficientnet_v2_s": "classifier.1", "regnet_y_3_2gf": "fc"}


@pytest.mark.parametrize("name", sorted(DECLARED_HEADS))
def test_each_spec_declares_its_head_and_defaults(name):
    from rsedge.trainer.models import get_spec, head_modules, model_spec

    spec = get_spec(name)
    assert (spec.task, spec.head, spec.outputs, spec.input_size) == (
        "classification", (DECLARED_HEADS[name],), ("logits",), (224, 224))
    assert spec.normalization == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    with torch.device("meta"):
        model = create_model(name, 7)
    assert model_spec(model) is spec
    (head,) = head_modules(model)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 7
    # the head is the layer that makes the outputs: the last Linear in the forward order
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1] is head


def test_a_hidden_layer_with_num_classes_outputs_stays_prunable():
    """mobilenet_v3_small's hidden classifier.0 has 1024 outputs: with 1024 classes, a head
    guessed from `out_features == num_classes` would freeze it; the declared head does not (with
    --prune-linear: fully connected layers are kept by default)."""
    from rsedge.compress.prune import prune_network

    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", 1024).eval()
    assert model.classifier[0].out_features == model.classifier[3].out_features == 1024
    pruned, _ = prune_network(model, [32, 32], "l1", 0.5, prune_linear=True)
    assert pruned.classifier[0].out_features == 512
    assert pruned.classifier[3].out_features == 1024
    assert pruned(torch.randn(1, 3, 32, 32)).shape == (1, 1024)


def test_constructor_arguments_reach_the_architecture():
    from rsedge.trainer.models import get_spec

    narrow = create_model("mobilenet_v2", 3, width_mult=0.5)
    assert narrow.features[0][0].out_channels < create_model("mobilenet_v2", 3).features[0][0].out_channels
    assert get_spec("mobilenet_v2").args == {}
    with pytest.raises(TypeError):
        create_model("resnet18", 3, no_such_argument=1)


def test_a_new_spec_registers_with_its_declared_head():
    from torch import nn

    from rsedge.compress.prune import prune_network
    from rsedge.trainer.models import ModelSpec, register_model, unregister_model

    class TwoHeads(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.scores = nn.Linear(16, num_classes)
            self.boxes = nn.Linear(16, 4)

        def forward(self, x):
            f = torch.relu(self.bn(self.conv(x))).mean((2, 3))
            return self.scores(f) + self.boxes(f).sum(1, keepdim=True)

    with pytest.raises(ValueError, match="declares no head"):
        register_model(ModelSpec("two_heads", "classification", TwoHeads, head=()))
    register_model(ModelSpec("two_heads", "classification", TwoHeads, head=("scores", "boxes")))
    try:
        assert "two_heads" in list_models()
        with pytest.raises(ValueError, match="already registered"):
            register_model(ModelSpec("two_heads", "classification", TwoHeads, head=("scores",)))
        model = create_model("two_heads", 3).eval()
        pruned, _ = prune_network(model, [8, 8], "l1", 0.5, round_to=1, min_channels=1)
        assert pruned.conv.out_channels == 8 and (pruned.scores.out_features, pruned.boxes.out_features) == (3, 4)
    finally:
        unregister_model("two_heads")
    assert "two_heads" not in list_models()


def test_a_spec_whose_head_is_not_in_the_model_fails_when_built():
    from torch import nn

    from rsedge.trainer.models import ModelSpec, register_model, unregister_model

    register_model(ModelSpec("wrong_head", "classification", lambda n: nn.Sequential(nn.Linear(4, n)),
                             head=("fc",)))
    try:
        with pytest.raises(ValueError, match="no module fc"):
            create_model("wrong_head", 3)
    finally:
        unregister_model("wrong_head")


def test_a_module_not_made_by_create_model_must_name_its_head():
    from torch import nn

    from rsedge.compress.prune import prune_network

    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 3))
    with pytest.raises(ValueError, match="declares no head"):
        prune_network(net, [8, 8], "l1", 0.5)
    pruned, _ = prune_network(net, [8, 8], "l1", 0.5, head=["5"])
    assert pruned[0].out_channels == 8 and pruned[5].out_features == 3
