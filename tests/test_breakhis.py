"""BreakHis file-name parsing and the patient-id definition."""

import pytest

from histoclass.data.breakhis import label_from_folder, parse_name


def test_parses_every_field():
    n = parse_name("SOB_B_A-14-22549AB-40-001.png")
    assert (n.procedure, n.label, n.subtype, n.subtype_code) == ("SOB", "benign", "adenosis", "A")
    assert (n.year, n.slide_id, n.patient_id) == ("14", "22549AB", "14-22549")
    assert (n.magnification, n.sequence) == ("40X", 1)


def test_suffixed_slides_are_one_patient():
    ids = {parse_name(f"SOB_B_A-14-{s}-100-003.png").patient_id for s in ("22549AB", "22549CD",
                                                                           "22549G")}
    assert ids == {"14-22549"}


def test_patient_under_two_subtypes_is_one_patient():
    dc = parse_name("SOB_M_DC-14-13412-200-001.png")
    lc = parse_name("SOB_M_LC-14-13412-200-001.png")
    assert dc.subtype != lc.subtype
    assert dc.patient_id == lc.patient_id == "14-13412"


def test_path_and_case_are_accepted():
    n = parse_name("/data/x/sob_m_pc-15-190ef-400-010.PNG")
    assert (n.label, n.subtype, n.slide_id, n.patient_id, n.magnification) == (
        "malignant", "papillary_carcinoma", "190EF", "15-190", "400X")


@pytest.mark.parametrize("name", ["image_001.png", "SOB_B_A-14-22549AB-50-001.png",
                                  "SOB_B_XX-14-22549AB-40-001.png", "SOB_B_A-14-22549AB-40.png"])
def test_other_names_are_not_breakhis(name):
    assert parse_name(name) is None


def test_class_letter_contradicting_subtype_is_an_error():
    with pytest.raises(ValueError, match=r"SOB_B_DC.*contradicts subtype 'DC'"):
        parse_name("SOB_B_DC-14-13412-40-001.png")


@pytest.mark.parametrize(("folder", "expected"), [
    ("benign", ("benign", "")), ("Malignant", ("malignant", "")),
    ("ductal_carcinoma", ("malignant", "ductal_carcinoma")),
    ("Phyllodes Tumor", ("benign", "phyllodes_tumor")), ("TA", ("benign", "tubular_adenoma")),
    ("images", None),
])
def test_folder_names(folder, expected):
    assert label_from_folder(folder) == expected
