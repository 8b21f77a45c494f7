import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.models import MODEL_ALIASES, load_model, resolve_arch
from tests.conftest import BUNDLED_CKPT


def test_aliases_resolve_to_timm_names():
    for alias, arch in MODEL_ALIASES.items():
        assert resolve_arch(alias) == arch


def test_unknown_model_is_clear():
    with pytest.raises(VitcompressError, match="unknown model"):
        resolve_arch("no_such_vit")


def test_zoo_checkpoint_carries_preprocessing(loaded):
    assert loaded.arch == "deit_tiny_patch16_224"
    assert loaded.preprocessing.input_size == (3, 32, 32)
    assert loaded.preprocessing.class_names[0] == "airplane"


def test_plain_state_dict_and_safetensors_load_with_model(tmp_path):
    from safetensors.torch import save_file

    import timm

    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=4)
    # a plain state dict needs the architecture: a mismatching size is reported, not crashed on
    torch.save(m.state_dict(), tmp_path / "sd.pth")
    with pytest.raises(VitcompressError, match="does not match"):
        load_model("deit-tiny", tmp_path / "sd.pth")
    m2 = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=7)
    save_file(m2.state_dict(), str(tmp_path / "sd.safetensors"))
    lm = load_model("deit-tiny", tmp_path / "sd.safetensors")
    assert lm.num_classes == 7  # read off the classifier's weight


def test_untrusted_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(VitcompressError, match="cannot read checkpoint"):
        load_model("deit-tiny", tmp_path / "evil.pth")


def test_garbage_and_missing_checkpoints(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage")
    with pytest.raises(VitcompressError, match="cannot read checkpoint"):
        load_model(checkpoint=tmp_path / "bad.pth")
    with pytest.raises(VitcompressError, match="not found"):
        load_model(checkpoint=tmp_path / "missing.pth")


def test_wrong_model_for_zoo_checkpoint():
    with pytest.raises(VitcompressError, match="holds a"):
        load_model("mobilevitv2", BUNDLED_CKPT)


def test_no_pretrained_builds_random_weights():
    lm = load_model("deit-tiny", pretrained=False)
    assert lm.weights == "random" and not lm.accuracy_meaningful
    assert lm.preprocessing.input_size == (3, 224, 224)


def test_uncached_pretrained_weights_fail_fast_with_a_way_out():
    with pytest.raises(VitcompressError, match="--checkpoint PATH"):
        load_model("deit-tiny", pretrained=True)


def _tiny_fastvit():
    """FastViT in a tiny configuration: MobileOne stem, RepMixer and attention stages, all trained as branches."""
    from vitcompress.models import LoadedModel, _create, _preprocessing_from_timm

    kwargs = dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), num_classes=10)
    torch.manual_seed(0)
    model = _create("fastvit_t8", None, kwargs).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so merging them is really tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return LoadedModel(model, "fastvit_t8", _preprocessing_from_timm(model), 10, kwargs={k: v for k, v in kwargs.items() if k != "num_classes"})


def test_branchy_families_load_merged_and_their_checkpoints_reload(tmp_path):
    """FastViT's training-time branches are merged on load (same function), and a checkpoint of the
    merged model records it, so it reloads into the merged layout; a training-form checkpoint merges after."""
    import copy

    from vitcompress.artifacts import save_checkpoint
    from vitcompress.models import to_inference_form

    trained = _tiny_fastvit()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = trained.model(x)
    save_checkpoint(tmp_path / "train_form.pth", trained, trained.model.state_dict())
    merged = copy.deepcopy(trained)
    assert to_inference_form(merged.model, merged.arch)
    merged.inference_form = True
    names = {n for n, _ in merged.model.named_modules()}
    assert not any(n.endswith(("rbr_conv", "rbr_scale", "large_conv")) for n in names)  # the branches are gone
    save_checkpoint(tmp_path / "merged.pth", merged, merged.model.state_dict())

    for path in ("train_form.pth", "merged.pth"):
        reloaded = load_model(checkpoint=tmp_path / path)
        assert reloaded.inference_form
        with torch.no_grad():
            assert torch.allclose(reloaded.model(x), expected, atol=1e-4), path
    assert not to_inference_form(load_model("deit_tiny_patch16_224", pretrained=False).model, "deit_tiny_patch16_224")
