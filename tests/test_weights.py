"""Reading weight files and loading them: checkpoints, prefixes, fine-tuning heads, errors."""
from __future__ import annotations

import logging

import pytest
import torch

from models import WeightsError, create_model
from models.weights import extract_state_dict, load_weights, read_weights_file


@pytest.fixture(scope="module")
def xception_state():
    torch.manual_seed(0)
    return create_model("xception").state_dict()


@pytest.fixture(scope="module")
def inception_state():
    torch.manual_seed(0)
    return create_model("inception_v3", init_weights=False).state_dict()


def _assert_state_equal(model, state, skip=()):
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        if not key.startswith(skip):
            assert torch.equal(own[key], value), key


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: stands in for arbitrary code in a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- round trips ----------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path, xception_state):
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "xception", "epoch": 1, "state_dict": xception_state, "best_acc1": 1.0}, path)
    model = create_model("xception", weights=path)
    _assert_state_equal(model, xception_state)


def test_modelzoo_checkpoint_with_module_prefix(tmp_path, xception_state):
    path = tmp_path / "modelzoo.pth.tar"
    checkpoint = {
        "epoch": 90,
        "arch": "xception",
        "state_dict": {f"module.{k}": v for k, v in xception_state.items()},
        "best_acc1": torch.tensor(78.9),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
    }
    torch.save(checkpoint, path)
    model = create_model("xception")
    messages = load_weights(model, path)
    assert messages == [f"loaded weights from {path}"]
    _assert_state_equal(model, xception_state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(prefix, xception_state):
    state = extract_state_dict({"model": {prefix + k: v for k, v in xception_state.items()}})
    assert list(state) == list(xception_state)


def test_state_dict_source_and_bare_file(tmp_path, xception_state):
    _assert_state_equal(create_model("xception", weights=dict(xception_state)), xception_state)
    path = tmp_path / "bare.pth"
    torch.save(xception_state, path)
    _assert_state_equal(create_model("xception", weights=str(path)), xception_state)


def test_missing_num_batches_tracked_is_tolerated(xception_state):
    old_style = {k: v for k, v in xception_state.items() if not k.endswith("num_batches_tracked")}
    model = create_model("xception")
    load_weights(model, old_style)
    assert torch.equal(model.bn1.running_var, xception_state["bn1.running_var"])


# --- classifier heads -----------------------------------------------------------------


def test_fine_tuning_reinitialises_both_inception_heads(tmp_path, inception_state, caplog):
    path = tmp_path / "imagenet.pth"
    torch.save(inception_state, path)
    torch.manual_seed(1)
    model = create_model("inception_v3", num_classes=10, init_weights=False)
    with caplog.at_level(logging.INFO, logger="models.weights"):
        messages = load_weights(model, path)
    expected = "classifier head re-initialised: file has 1000 classes, model has 10 (fine-tuning)"
    assert messages[-1] == expected
    assert expected in caplog.text

    state = model.state_dict()
    assert state["fc.weight"].shape == (10, 2048)
    assert state["AuxLogits.fc.weight"].shape == (10, 768)
    assert torch.count_nonzero(state["fc.bias"]) == 0
    # init_classifier ran: PyTorch's default nn.Linear init would give std 0.013
    assert 0.05 < state["fc.weight"].std() < 0.1
    assert state["AuxLogits.fc.weight"].std() < 0.001
    for key, value in inception_state.items():
        if not key.startswith(("fc.", "AuxLogits.fc.")):
            assert torch.equal(state[key], value), key


def test_fine_tuning_xception_head(xception_state):
    model = create_model("xception", num_classes=10)
    messages = load_weights(model, xception_state)
    assert "file has 1000 classes, model has 10" in messages[-1]
    assert torch.equal(model.conv4.pointwise.weight, xception_state["conv4.pointwise.weight"])


def test_strict_head_refuses_a_different_class_count(xception_state):
    model = create_model("xception", num_classes=10)
    with pytest.raises(WeightsError, match="classifier head has 1000 classes, model has 10"):
        load_weights(model, xception_state, strict_head=True)


def test_aux_weights_are_dropped_for_a_model_without_aux(inception_state):
    model = create_model("inception_v3", aux_logits=False, init_weights=False)
    load_weights(model, inception_state)
    assert torch.equal(model.fc.weight, inception_state["fc.weight"])


def test_model_with_aux_needs_aux_weights(inception_state):
    no_aux = {k: v for k, v in inception_state.items() if not k.startswith("AuxLogits.")}
    with pytest.raises(WeightsError, match=r"missing keys: AuxLogits\.conv0\.conv\.weight"):
        load_weights(create_model("inception_v3", init_weights=False), no_aux)


# --- key errors -----------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_named(tmp_path, xception_state):
    state = dict(xception_state)
    del state["block5.rep.1.pointwise.weight"]
    state["block99.rep.1.pointwise.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        load_weights(create_model("xception"), path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "1 missing keys: block5.rep.1.pointwise.weight" in message
    assert "1 unexpected keys: block99.rep.1.pointwise.weight" in message


def test_many_missing_keys_are_counted(xception_state):
    state = {k: v for k, v in xception_state.items() if not k.startswith("block1")}
    with pytest.raises(WeightsError, match=r"missing keys: block1\.skip\.weight, .*\(\d+ in all\)"):
        load_weights(create_model("xception"), state)


def test_shape_mismatch_outside_the_head(xception_state):
    state = dict(xception_state)
    state["conv1.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(WeightsError, match=r"shape mismatches.*conv1\.weight \(16, 3, 3, 3\) vs \(32, 3, 3, 3\)"):
        load_weights(create_model("xception"), state)


def test_other_architecture_is_rejected(inception_state):
    with pytest.raises(WeightsError, match="does not fit xception"):
        create_model("xception", weights=inception_state)


# --- unreadable and unsafe files ------------------------------------------------------


def test_missing_file():
    with pytest.raises(WeightsError, match="weights file not found: /nonexistent/w.pth"):
        read_weights_file("/nonexistent/w.pth")
    with pytest.raises(WeightsError, match="weights file not found"):
        create_model("xception", weights="/nonexistent/w.pth")


def test_corrupt_and_truncated_files(tmp_path, xception_state):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightsError, match=f"cannot read weights file {junk}"):
        read_weights_file(junk)

    whole = tmp_path / "whole.pth"
    torch.save({"conv1.weight": xception_state["conv1.weight"]}, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[:-200])
    with pytest.raises(WeightsError, match=f"cannot read weights file {truncated}"):
        read_weights_file(truncated)


def test_pickled_code_is_refused_not_run(tmp_path, xception_state):
    marker = tmp_path / "code-ran"
    path = tmp_path / "malicious.pth"
    torch.save({"state_dict": xception_state, "extra": _RunsCodeWhenUnpickled(marker)}, path)

    with pytest.raises(WeightsError) as info:
        create_model("xception", weights=path)
    message = str(info.value)
    assert message.startswith(f"refusing to load {path}: it contains Python objects other than tensors (")
    assert "unsupported global io.open" in message or "builtins.open" in message
    assert not marker.exists()

    # Control: the file really runs code when unpickled without weights_only.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_non_state_dict_contents(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match=f"{path} holds a list, not a state dict"):
        load_weights(create_model("xception"), path)
    with pytest.raises(WeightsError, match="has no state dict.*found keys epoch, arch"):
        extract_state_dict({"epoch": 3, "arch": "xception"})


def test_a_file_that_is_not_pytorch_says_so_and_a_cut_archive_says_what_it_is(tmp_path, xception_state):
    text = tmp_path / "README.md"
    text.write_text("# notes\nnot weights\n")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(7, 250)))
    for path in (text, noise):
        with pytest.raises(WeightsError) as raised:
            read_weights_file(path)
        assert str(raised.value) == (f"cannot read weights file {path}: not a PyTorch file (neither the zip "
                                     f"archive torch.save writes nor a pickle)")
    whole = tmp_path / "whole.pth"
    torch.save({"conv1.weight": xception_state["conv1.weight"]}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:64])
    with pytest.raises(WeightsError, match=f"cannot read weights file {cut}: the zip archive torch.save writes "
                                           f"is damaged or incomplete"):
        read_weights_file(cut)
