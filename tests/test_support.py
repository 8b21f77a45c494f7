"""The family × method support table: decisions as data, refused in one line before any work."""
import fnmatch

import pytest
from typer.testing import CliRunner

from vitcompress.cli import app
from vitcompress.errors import VitcompressError
from vitcompress.models import FAMILIES, family_of
from vitcompress.prune_api import METHODS as PRUNE_METHODS
from vitcompress.quant.registry import METHODS as QUANT_METHODS
from vitcompress.support import UNSUPPORTED, Unsupported, check_supported, unsupported_reason
from tests.conftest import CALIB

runner = CliRunner()


def test_every_row_names_a_real_method_and_known_families():
    known = set(FAMILIES.values())
    for row in UNSUPPORTED:
        assert row.method in {*QUANT_METHODS, *PRUNE_METHODS}, row
        for pattern in row.families:
            assert any(fnmatch.fnmatch(f, pattern) for f in known), (row.method, pattern)
        assert row.reason and "\n" not in row.reason


def test_first_matching_row_decides_and_other_pairs_pass(monkeypatch):
    rows = (Unsupported("qhyvit", ("Swin*",), "window attention"), Unsupported("qhyvit", ("*",), "everything else"))
    monkeypatch.setattr("vitcompress.support.UNSUPPORTED", rows)
    assert unsupported_reason("Swin Transformer v2", "qhyvit") == "window attention"
    assert unsupported_reason("DeiT", "qhyvit") == "everything else"
    assert unsupported_reason("DeiT", "mptq") is None
    with pytest.raises(VitcompressError, match=r"^qhyvit does not support swin_tiny_patch4_window7_224 \(Swin Transformer\): window attention$"):
        check_supported("swin_tiny_patch4_window7_224", "Swin Transformer", "qhyvit")


def test_family_names_cover_the_conformance_models():
    assert family_of("efficientvit_b0") == "EfficientViT (MIT)" and family_of("efficientvit_m0") == "EfficientViT (MSRA)"
    assert family_of("mobilevitv2_050") == "MobileViT v2" and family_of("mobilevit_xxs") == "MobileViT v1"
    assert family_of("swinv2_tiny_window8_256") == "Swin Transformer v2" and family_of("resnet18") == "other timm model"


def test_unsupported_pair_is_refused_in_one_line_before_any_output(tmp_path):
    row = next(r for r in UNSUPPORTED if r.method == "ofb" and any(fnmatch.fnmatch("Swin Transformer", p) for p in r.families))
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", "--method", "ofb", "--model", "swin_tiny_patch4_window7_224", "--no-pretrained",
                                 "--target-flops", "1.5", "--calib", str(CALIB), "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and row.reason in " ".join(result.output.split())
    assert not out.exists() or not any(out.iterdir())


def test_recipe_naming_an_unsupported_pair_fails_at_load_with_its_line(tmp_path):
    from vitcompress.pipeline.recipe import SCHEMA, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"schema: {SCHEMA}\nmodel: {{name: swin_tiny_patch4_window7_224}}\ndata: {{calib: {CALIB}}}\n"
                      "steps:\n  - prune: {method: ofb, target_flops: 1.5}\n")
    with pytest.raises(VitcompressError, match=r"r\.yaml:5: .*ofb does not support swin_tiny"):
        load_recipe(recipe)


def test_models_command_lists_the_refusals():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for row in UNSUPPORTED:
        assert f"not supported: {row.method} on {', '.join(row.families)}" in text
    assert "benchmarks/CONFORMANCE.md" in text
