"""Architectures and registry: reference parity, sizes, options, channels_last, compile, ONNX."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models import InceptionOutputs, create_model, list_models, model_spec, preprocess_config, resolve_arch
from models.preprocess import PreprocessConfig

SMALL = {"inception_v3": 80, "xception": 32}  # small inputs that still exercise every layer


def _build(arch: str, **options) -> nn.Module:
    """A seeded model; Inception skips its init unless a test is about it.

    Its reference init (std 0.1 everywhere) gives eval logits near 1e6 with fresh BN
    statistics, where float rounding alone exceeds absolute tolerances; PyTorch's default
    init keeps outputs small. It is also faster.
    """
    torch.manual_seed(0)
    if arch == "inception_v3":
        options.setdefault("init_weights", False)
    return create_model(arch, **options)


# --- registry -------------------------------------------------------------------------


def test_list_models():
    assert list_models() == ["inception_v3", "xception"]


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("inception_v3", "inception_v3"),
        ("inceptionv3", "inception_v3"),
        ("Inception-V3", "inception_v3"),
        ("INCEPTION_V3", "inception_v3"),
        ("xception", "xception"),
        ("legacy_xception", "xception"),
        ("Xception", "xception"),
    ],
)
def test_resolve_arch_aliases(alias, canonical):
    assert resolve_arch(alias) == canonical


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError) as info:
        resolve_arch("foo")
    assert str(info.value) == "unknown architecture 'foo'; choose one of: inception_v3, xception"
    with pytest.raises(ValueError, match="choose one of"):
        create_model("resnet50")


def test_preprocess_configs():
    inc, xc = preprocess_config("inceptionv3"), preprocess_config("legacy_xception")
    assert isinstance(inc, PreprocessConfig)
    assert (inc.input_size, inc.crop_pct, inc.interpolation) == (299, 0.875, "bilinear")
    assert inc.mean == (0.485, 0.456, 0.406) and inc.std == (0.229, 0.224, 0.225)
    assert xc.mean == xc.std == (0.5, 0.5, 0.5)
    assert inc.eval_resize() == 342 and xc.eval_resize() == 342
    assert inc.eval_resize(224) == 256
    assert PreprocessConfig(**inc.as_dict()) == inc
    with pytest.raises(AttributeError):
        inc.input_size = 1  # frozen


def test_specs_declare_what_each_model_has():
    inception, xception = model_spec("inceptionv3"), model_spec("legacy_xception")
    assert (inception.name, inception.aux_head, inception.min_input_size) == ("inception_v3", True, 75)
    assert (xception.name, xception.aux_head, xception.min_input_size) == ("xception", False, 7)
    assert inception.preprocess is preprocess_config("inception_v3")
    assert "aux_logits" in inception.options and "aux_logits" not in xception.options
    assert inception.published.model_options == {"transform_input": True}
    model = create_model("Xception", num_classes=7)
    assert model.arch == "xception" and model.fc.out_features == 7
    assert not hasattr(model, "preprocess")  # the registry holds it, once


@pytest.mark.parametrize("arch", ["inception_v3", "xception"])
def test_unknown_option_is_a_type_error(arch):
    with pytest.raises(TypeError, match=f"{arch} does not accept option.*bogus.*accepted: .*dropout"):
        create_model(arch, bogus=1)


def test_options_change_behaviour():
    plain = _build("inception_v3", aux_logits=False).eval()
    remap = _build("inception_v3", aux_logits=False, transform_input=True, dropout=0.2).eval()
    assert plain.AuxLogits is None and "AuxLogits.fc.weight" not in plain.state_dict()
    assert (plain.dropout.p, remap.dropout.p) == (0.5, 0.2)
    assert create_model("xception", dropout=0.3).dropout.p == 0.3

    # transform_input == feeding the re-mapped input to the same weights
    remap.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 80, 80)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = plain((x * std + mean - 0.5) / 0.5)
        got = remap(x)
        assert not torch.allclose(got, plain(x))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_init_weights_option():
    def conv_std(init_weights):
        torch.manual_seed(0)
        model = create_model("inception_v3", init_weights=init_weights)
        return model.Mixed_7c.branch3x3dbl_2.conv.weight.std().item()

    assert conv_std(True) == pytest.approx(0.1 * 0.88, rel=0.02)  # std 0.1, truncated at 2 std
    assert conv_std(False) < 0.01  # PyTorch's default: scaled by fan-in


# --- sizes ----------------------------------------------------------------------------


def test_param_counts():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(_build("inception_v3")) == 27_161_264
    assert count(_build("inception_v3", aux_logits=False)) == 23_834_568
    assert count(create_model("xception")) == 22_855_952


@pytest.mark.parametrize(
    "arch, shape, message",
    [
        ("inception_v3", (64, 64), "inception_v3 needs inputs of at least 75x75 pixels, got 64x64"),
        ("inception_v3", (80, 74), "inception_v3 needs inputs of at least 75x75 pixels, got 80x74"),
        ("xception", (6, 6), "xception needs inputs of at least 7x7 pixels, got 6x6"),
    ],
)
def test_too_small_input_is_rejected(arch, shape, message):
    model = _build(arch).eval()
    with pytest.raises(ValueError) as info:
        model(torch.randn(1, 3, *shape))
    assert str(info.value) == message


@pytest.mark.parametrize("arch", ["inception_v3", "xception"])
def test_min_input_size_runs(arch):
    model = _build(arch, num_classes=5).eval()
    size = model_spec(arch).min_input_size
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 5)


def test_aux_head_at_small_size():
    model = _build("inception_v3", num_classes=10).train()
    out = model(torch.randn(2, 3, 96, 96))  # 17x17 grid becomes 4x4: adaptive pooling path
    assert isinstance(out, InceptionOutputs)
    assert out.logits.shape == out.aux_logits.shape == (2, 10)
    (out.logits.sum() + out.aux_logits.sum()).backward()
    assert model.AuxLogits.conv1.conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert isinstance(model(torch.randn(1, 3, 80, 80)), torch.Tensor)
    no_aux = _build("inception_v3", num_classes=10, aux_logits=False).train()
    with torch.no_grad():
        assert isinstance(no_aux(torch.randn(2, 3, 80, 80)), torch.Tensor)


# --- parity with the reference implementations ----------------------------------------


def test_inception_v3_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    # init_weights=False only for speed (torch's trunc_normal_ takes seconds): weights are copied.
    ref = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    ours = _build("inception_v3")
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())  # buffers included, same order

    x = torch.randn(2, 3, 299, 299)  # 299: the aux head's fixed 5x5/3 pooling path
    ref.train()
    ours.train()
    torch.manual_seed(1)
    ref_out = ref(x)
    torch.manual_seed(1)  # same dropout mask
    our_out = ours(x)
    assert isinstance(our_out, InceptionOutputs)
    torch.testing.assert_close(our_out.logits, ref_out.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(our_out.aux_logits, ref_out.aux_logits, rtol=0, atol=1e-4)

    ref.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x[:1]), ref(x[:1]), rtol=0, atol=1e-4)


def test_xception_matches_timm_legacy_xception():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("legacy_xception", pretrained=False)
    ours = create_model("xception")
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())

    ref.eval()
    ours.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 299, 299)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-4)
    ref.train()
    ours.train()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-4)


# --- memory format, compile, export ---------------------------------------------------


@pytest.mark.parametrize("arch", ["inception_v3", "xception"])
def test_channels_last_forward_backward(arch):
    model = _build(arch, num_classes=10).to(memory_format=torch.channels_last).train()
    size = {"inception_v3": 80, "xception": 64}[arch]
    x = torch.randn(2, 3, size, size).to(memory_format=torch.channels_last)
    out = model(x)
    loss = sum(o.float().pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    # same numbers as the default memory format
    model.eval()
    x = x[:1]
    with torch.no_grad():
        expected = model.to(memory_format=torch.contiguous_format)(x.contiguous())
        got = model.to(memory_format=torch.channels_last)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_xception_compiles_as_one_graph():
    model = _build("xception", num_classes=10).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(1, 3, SMALL["xception"], SMALL["xception"])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.parametrize("arch, opset", [("inception_v3", 11), ("xception", 17)])
def test_onnx_export(arch, opset, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _build(arch, num_classes=10).eval()
    size = SMALL[arch]
    batch = torch.randn(2, 3, size, size)
    x = batch[:1]
    path = tmp_path / f"{arch}.onnx"
    # The TorchScript exporter honours opset 11 and 17; the dynamo one only emits opset >= 18.
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == opset

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": batch.numpy()})  # batch 2: the batch axis is dynamic
    with torch.no_grad():
        expected = model(batch)
    assert got.shape == (2, 10)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-3)


def test_models_package_exports():
    assert issubclass(models.WeightsError, models.UserError) and not issubclass(models.WeightsError, ValueError)
    assert InceptionOutputs._fields == ("logits", "aux_logits")
