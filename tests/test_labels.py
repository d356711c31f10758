import pytest

from photos.labels import Label, LabelError, label_from_manifest, parse_fgnet, parse_utkface
from photos.splits import assign_split, parse_fractions, split_key


@pytest.mark.parametrize("name, expected", [
    ("25_0_1_20170116174525125.jpg.chip.jpg", Label(25, 0, 1)),
    ("s3a://bucket/utk/100_1_4_20170112213500903.jpg", Label(100, 1, 4)),
    ("1_1_2_20161219140623097.jpg.chip.jpg", Label(1, 1, 2)),
    # real malformed UTKFace names: a field is missing, the leading age still counts
    ("39_1_20170116174525125.jpg.chip.jpg", Label(39, None, None)),
    ("61_1_20170109150557335.jpg.chip.jpg", Label(61, None, None)),
    ("53__0_20170116184028385.jpg.chip.jpg", Label(53, None, 0)),
    ("53_7_9_20170116184028385.jpg.chip.jpg", Label(53, None, None)),
])
def test_utkface_names(name, expected):
    assert parse_utkface(name) == expected


@pytest.mark.parametrize("name, fragment", [
    ("130_0_0_20170116174525125.jpg", "outside 0..120"),
    ("abc_0_0_20170116174525125.jpg", "start with the age"),
    ("_0_0_2017.jpg", "start with the age"),
    ("notes.jpg", "start with the age"),
])
def test_utkface_bad_names_say_why(name, fragment):
    with pytest.raises(LabelError, match=fragment):
        parse_utkface(name)


@pytest.mark.parametrize("name, age, subject", [
    ("001A02.JPG", 2, "fgnet:001"),
    ("/data/fgnet/images/001A43a.JPG", 43, "fgnet:001"),
    ("078A11.jpg", 11, "fgnet:078"),
])
def test_fgnet_names(name, age, subject):
    label = parse_fgnet(name)
    assert (label.age, label.subject_id) == (age, subject)


@pytest.mark.parametrize("name", ["01A02.JPG", "001B02.JPG", "001A.JPG", "photo.jpg"])
def test_fgnet_bad_names(name):
    with pytest.raises(LabelError, match="FG-NET names"):
        parse_fgnet(name)


def test_manifest_rows():
    assert label_from_manifest("a.jpg", 31.0, 1.0, float("nan"), "p7") == Label(31, 1, None, "p7")
    with pytest.raises(LabelError, match="no row in the label manifest"):
        label_from_manifest("a.jpg", None)
    with pytest.raises(LabelError, match="not a whole number"):
        label_from_manifest("a.jpg", 31.5)
    with pytest.raises(LabelError, match="gender 7"):
        label_from_manifest("a.jpg", 31, 7)
    with pytest.raises(LabelError, match="outside"):
        label_from_manifest("a.jpg", -1)


def test_splits_are_deterministic_and_follow_fractions():
    fractions = parse_fractions("0.8,0.1,0.1")
    keys = [split_key(None, f"{i:064x}") for i in range(20000)]
    first = [assign_split(k, fractions) for k in keys]
    assert first == [assign_split(k, fractions) for k in keys]
    share = {s: first.count(s) / len(first) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.015 and abs(share["val"] - 0.1) < 0.01
    assert [assign_split(k, fractions, salt="other") for k in keys] != first


def test_one_subject_one_split():
    fractions = (0.5, 0.25, 0.25)
    # different photos (content hashes) of one person share the subject key, hence the split
    splits = {assign_split(split_key("fgnet:001", f"{i:064x}"), fractions) for i in range(50)}
    assert len(splits) == 1


@pytest.mark.parametrize("text", ["0.8,0.1", "0.8,0.3,0.1", "a,b,c", "-0.2,0.6,0.6"])
def test_bad_split_fractions(text):
    with pytest.raises(ValueError, match="--splits"):
        parse_fractions(text)
