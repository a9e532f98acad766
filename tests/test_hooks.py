"""Specification of feature capture by module path (crcd_plugin.hooks)."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin.hooks import FeatureCapture, pool_feature, resolve_module, select_tensor, unwrap_model


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3, padding=1), act=nn.ReLU()))
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = self.body(x)
        return self.fc(feature_map.mean(dim=(2, 3)))


class TupleBlock(nn.Module):
    def forward(self, x: torch.Tensor):
        return x + 1, {"double": x * 2, "neg": -x}


class ModelOutputLike:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class WrapsOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> ModelOutputLike:
        return ModelOutputLike(self.inner(x))


def test_input_and_output_capture_equal_what_the_model_computes():
    torch.manual_seed(0)
    model, x = TinyConvNet(), torch.randn(2, 3, 6, 6)
    with FeatureCapture(model) as capture:
        capture.add("fc", io="input", name="feature").add("fc", name="logits").add("body.conv")
        logits = model(x)
        captured = capture.pop()
    expected_map = model.body.conv(x)
    assert torch.equal(captured["body.conv"], expected_map)
    assert torch.equal(captured["feature"], F.relu(expected_map).mean(dim=(2, 3)))
    assert torch.equal(captured["logits"], logits)


def test_captured_tensor_stays_in_the_graph_unless_detach_is_asked():
    model = TinyConvNet()
    with FeatureCapture(model) as capture:
        capture.add("fc", io="input", name="attached").add("body.conv", detach=True, name="detached")
        model(torch.randn(1, 3, 4, 4))
        captured = capture.pop()
    assert captured["attached"].requires_grad
    assert not captured["detached"].requires_grad


def test_select_picks_tuple_index_dict_key_attribute_and_callable():
    model = nn.Sequential(OrderedDict(block=TupleBlock()))
    x = torch.randn(2, 3)
    with FeatureCapture(model) as capture:
        capture.add("block", select=0, name="first")
        capture.add("block", select=lambda out: out[1]["neg"], name="neg")
        model(x)
        captured = capture.pop()
    assert torch.equal(captured["first"], x + 1)
    assert torch.equal(captured["neg"], -x)
    assert torch.equal(select_tensor({"a": x, "b": x * 2}, "b"), x * 2)
    assert torch.equal(select_tensor({"a": x, "b": x * 2}, 1), x * 2)
    assert torch.equal(select_tensor(ModelOutputLike(x), "logits"), x)


def test_output_without_a_tensor_selection_raises_type_error_naming_select():
    model = nn.Sequential(OrderedDict(block=TupleBlock()))
    with FeatureCapture(model) as capture, pytest.raises(TypeError, match="select"):
        capture.add("block")
        model(torch.randn(2, 3))


@pytest.mark.parametrize(
    "pool, shape, expected",
    [
        ("avg", (2, 4, 3, 3), lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1)),
        ("max", (2, 4, 3, 3), lambda x: F.adaptive_max_pool2d(x, 1).flatten(1)),
        ("flatten", (2, 4, 3, 3), lambda x: x.reshape(2, -1)),
        ("mean_tokens", (2, 5, 4), lambda x: x.mean(dim=1)),
        ("cls", (2, 5, 4), lambda x: x[:, 0]),
        (None, (2, 5, 4), lambda x: x),
    ],
)
def test_pool_reduces_feature_maps_and_tokens(pool, shape, expected):
    x = torch.randn(*shape)
    assert torch.allclose(pool_feature(x, pool), expected(x))


def test_pool_avg_in_a_hook_equals_adaptive_avg_pool_of_the_feature_map():
    model, x = TinyConvNet(), torch.randn(2, 3, 5, 5)
    with FeatureCapture(model) as capture:
        capture.add("body.conv", pool="avg")
        model(x)
        pooled = capture.pop()["body.conv"]
    assert torch.allclose(pooled, F.adaptive_avg_pool2d(model.body.conv(x), 1).flatten(1))


def test_token_pool_on_a_feature_map_raises_value_error():
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        pool_feature(torch.randn(2, 3, 4, 4), "cls")
    with pytest.raises(ValueError, match="pool"):
        pool_feature(torch.randn(2, 3), "median")


def test_paths_resolve_through_data_parallel_and_its_module_prefix():
    model = TinyConvNet()
    wrapped = nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    assert resolve_module(wrapped, "fc") is model.fc
    assert resolve_module(wrapped, "module.fc") is model.fc
    x = torch.randn(2, 3, 4, 4)
    with FeatureCapture(wrapped) as capture:
        capture.add("fc", io="input")
        wrapped(x)
        captured = capture.pop()["fc"]
    assert torch.equal(captured, F.relu(model.body.conv(x)).mean(dim=(2, 3)))


def test_paths_resolve_through_torch_compile_wrapper():
    model = TinyConvNet()
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until called
    assert unwrap_model(compiled) is model
    assert resolve_module(compiled, "body.conv") is model.body.conv
    assert resolve_module(nn.DataParallel(compiled), "fc") is model.fc


def test_unknown_path_raises_value_error_listing_close_names():
    with pytest.raises(ValueError, match=r"body\.conv"):
        FeatureCapture(TinyConvNet()).add("body.cnv")
    with pytest.raises(ValueError, match="available"):
        resolve_module(TinyConvNet(), "zzzzzz")


def test_bad_arguments_raise_clear_errors():
    capture = FeatureCapture(TinyConvNet())
    with pytest.raises(ValueError, match="io"):
        capture.add("fc", io="grad")
    with pytest.raises(TypeError, match="path"):
        capture.add(3)
    capture.add("fc")
    with pytest.raises(ValueError, match="name="):
        capture.add("fc")
    with pytest.raises(TypeError, match="nn.Module"):
        FeatureCapture("resnet18")


def _num_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_on_leaving_the_context():
    model = TinyConvNet()
    with FeatureCapture(model) as capture:
        capture.add("fc", io="input").add("body.conv")
        assert _num_hooks(model) == 2
    assert _num_hooks(model) == 0
    assert capture.pop() == {}


def test_hooks_are_removed_when_the_forward_raises_inside_the_context():
    model = TinyConvNet()
    with pytest.raises(RuntimeError):
        with FeatureCapture(model) as capture:
            capture.add("fc", io="input")
            model(torch.randn(2, 7, 4, 4))  # wrong channel count
    assert _num_hooks(model) == 0


def test_explicit_remove_detaches_hooks_and_is_idempotent():
    model = TinyConvNet()
    capture = FeatureCapture(model).add("fc")
    model(torch.randn(1, 3, 4, 4))
    capture.remove()
    capture.remove()
    assert _num_hooks(model) == 0 and len(capture) == 0
    model(torch.randn(1, 3, 4, 4))
    assert capture.pop() == {}


def test_pop_forgets_captured_tensors():
    model = TinyConvNet()
    with FeatureCapture(model) as capture:
        capture.add("fc")
        model(torch.randn(1, 3, 4, 4))
        assert set(capture.pop()) == {"fc"}
        assert capture.pop() == {}


def test_keyword_only_input_is_captured():
    class KwHead(nn.Module):
        def forward(self, *, features: torch.Tensor) -> torch.Tensor:
            return features * 3

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = KwHead()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(features=x + 1)

    x = torch.randn(2, 3)
    model = Net()
    with FeatureCapture(model) as capture:
        capture.add("head", io="input")
        model(x)
        assert torch.equal(capture.pop()["head"], x + 1)


def test_model_output_like_object_is_selected_by_attribute():
    model, x = WrapsOutput(), torch.randn(2, 3)
    with FeatureCapture(model) as capture:
        capture.add("", select="logits", name="out")
        out = model(x)
        assert torch.equal(capture.pop()["out"], out.logits)
