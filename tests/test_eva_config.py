"""configs/eva-breakhis.yaml: kaiko eva's BreakHis task (40X, TA/MC/F/DC, fixed patients)."""

from pathlib import Path

import yaml

from conftest import breakhis_name, write_image
from histoclass.data import SUBTYPES
from histoclass.data.manifest import read_manifest, select
from histoclass.data.splits import audit
from histoclass.models import read_checkpoint
from histoclass.models.presets import PRESETS
from histoclass.pipeline import RunConfig, make_manifest, member_specs
from histoclass.train import TrainConfig, train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eva-breakhis.yaml"
# kaiko-ai/eva src/eva/vision/data/datasets/classification/breakhis.py: BreaKHis.classes and
# _val_patient_ids (BreakHis slide ids, the third "-" field of a file name), 40X default.
EVA_CLASSES = ["TA", "MC", "F", "DC"]
EVA_VAL_IDS = {"18842D", "19979", "15275", "15792", "16875", "3909", "5287", "16716", "2773",
               "5695", "16184CD", "23060CD", "21998CD", "21998EF"}
CLS = {"TA": "B", "F": "B", "MC": "M", "DC": "M"}
DIRS = {"TA": ("benign", "tubular_adenoma"), "F": ("benign", "fibroadenoma"),
        "MC": ("malignant", "mucinous_carcinoma"), "DC": ("malignant", "ductal_carcinoma")}


def raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_config_matches_eva():
    cfg = raw()
    assert cfg["task"] == "subtype"
    assert cfg["split"]["magnification"] == "40X"
    assert cfg["split"]["classes"] == EVA_CLASSES
    assert set(cfg["split"]["test_patients"]) == EVA_VAL_IDS
    assert len(cfg["split"]["test_patients"]) == len(EVA_VAL_IDS)  # no id twice
    assert cfg["split"]["protocol"] == "patient"  # fixed ids work with this protocol only
    assert [m["model"] for m in cfg["members"]] == ["uni2-h"] and "uni2-h" in PRESETS


def test_config_loads_with_the_linear_head():
    cfg = RunConfig.from_yaml(CONFIG)
    assert cfg.train["head"] == "linear"


def eva_config(tmp_path: Path, data: Path) -> RunConfig:
    """The config, pointed at ``data`` and a run folder under ``tmp_path``."""
    spec = raw()
    spec.update(data=str(data), out=str(tmp_path / "run"))
    cfg = RunConfig(**spec)
    cfg.validate()
    return cfg


def eva_shaped_tree(root: Path) -> Path:
    """A BreakHis layout: every eva validation slide (synthetic subtypes, cycling the four),
    four training patients per class, a slide 16184 (same patient as eva's 16184CD), an
    adenosis patient (a class eva drops) and 100X copies (a magnification eva drops)."""
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    slides = [(EVA_CLASSES[i % 4], s) for i, s in enumerate(sorted(EVA_VAL_IDS))]
    slides += [(c, f"{700 + 10 * i + j}") for i, c in enumerate(EVA_CLASSES) for j in range(4)]
    slides.append((slides[[s for _, s in slides].index("16184CD")][0], "16184"))
    seed = 0
    for code, slide in [*slides, ("A", "22549AB")]:
        label, sub = DIRS.get(code, ("benign", "adenosis"))
        cls = CLS.get(code, "B")
        for mag in ("40", "100"):
            for seq in (1, 2):
                seed += 1
                name = breakhis_name(cls, code, "14", slide, mag, seq)
                write_image(base / label / "SOB" / sub / f"SOB_{cls}_{code}_14-{slide}" /
                            f"{mag}X" / name, seed, size=(32, 32))
    return root


def test_split_shape_on_an_eva_shaped_tree(tmp_path):
    cfg = eva_config(tmp_path, eva_shaped_tree(tmp_path / "data"))
    frame = read_manifest(make_manifest(cfg))
    assert set(frame["magnification"]) == {"40X"}
    assert set(frame["subtype"]) == {"tubular_adenoma", "mucinous_carcinoma", "fibroadenoma",
                                     "ductal_carcinoma"}
    test = select(frame, "test")
    # every eva slide, plus slide 16184 of the patient of eva's 16184CD: whole patients
    assert set(test["slide_id"]) == EVA_VAL_IDS | {"16184"}
    assert len(test) == 2 * (len(EVA_VAL_IDS) + 1)
    assert len(select(frame, "val")) > 0 and len(select(frame, "train")) > 0
    assert audit(frame).clean


def test_the_config_trains_with_a_stand_in_backbone(tmp_path):
    cfg = eva_config(tmp_path, eva_shaped_tree(tmp_path / "data"))
    manifest = make_manifest(cfg)
    ((name, settings),) = member_specs(cfg)
    assert settings["head"] == "linear"
    settings.update(model="test_vit", pretrained=False, batch_size=8, image_size=None,
                    workers=0, device="cpu", cache_dir=None,
                    feature_cache=str(tmp_path / "features"))
    run = tmp_path / "run" / "members" / name
    train(TrainConfig(manifest=str(manifest), out=str(run), task=cfg.task, **settings))
    meta = read_checkpoint(run / "best.pt")["meta"]
    assert meta["head"] == "linear" and meta["classes"] == list(SUBTYPES)
