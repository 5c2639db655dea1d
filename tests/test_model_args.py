"""Extra timm constructor arguments: parsed plain-typed, stored, rebuilt exactly."""

import pytest
import torch

from histoclass.models.checkpoint import load_checkpoint, member_meta, save_checkpoint
from histoclass.models.factory import create_model, model_preprocess
from histoclass.models.model_args import parse_model_args


def test_parse_model_args_json_scalars():
    args = parse_model_args(["global_pool=avg", "reg_tokens=4", "init_values=1e-5",
                             "no_embed_class=true", "mlp_layer=SwiGLUPacked"])
    assert args == {"global_pool": "avg", "reg_tokens": 4, "init_values": 1e-5,
                    "no_embed_class": True, "mlp_layer": "SwiGLUPacked"}


@pytest.mark.parametrize("pair, match", [("nokey", "not KEY=VALUE"),
                                         ("act_layer=os.system", "not an allowed class"),
                                         ("x=[1]", "must be a scalar")])
def test_parse_model_args_errors(pair, match):
    with pytest.raises(ValueError, match=match):
        parse_model_args([pair])


def test_model_args_round_trip(tmp_path):
    args = parse_model_args(["global_pool=avg", "act_layer=SiLU", "reg_tokens=2"])
    model = create_model("test_vit", 3, pretrained=False, model_args=args).eval()
    assert model.num_prefix_tokens == 3 and model.global_pool == "avg"
    meta = member_meta("test_vit", "test_vit", ["a", "b", "c"],
                       model_preprocess(model),
                       model_args=args)
    save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded, meta2 = load_checkpoint(tmp_path / "m.pt")
    assert meta2["model_args"] == args
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
