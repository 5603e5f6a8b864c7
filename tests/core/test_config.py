import pytest
from pydantic import Field, ValidationError

from smearsight.config import StrictConfig, read_yaml
from smearsight.errors import InputError


class Inner(StrictConfig):
    rate: float = Field(0.1, gt=0)


class Outer(StrictConfig):
    name: str = "x"
    epochs: int = 3
    inner: Inner = Field(default_factory=Inner)


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_loads_valid_yaml(tmp_path):
    cfg = Outer.from_yaml(write(tmp_path, "epochs: 7\ninner:\n  rate: 0.5\n"))
    assert cfg.epochs == 7 and cfg.inner.rate == 0.5


def test_section(tmp_path):
    cfg = Outer.from_yaml(write(tmp_path, "model:\n  epochs: 2\n"), section="model")
    assert cfg.epochs == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("epoch: 7\n", "unknown field 'epoch'"),
        ("epochs: seven\n", "field 'epochs'"),
        ("inner:\n  rate: -1\n", "field 'inner.rate'"),
        ("inner:\n  rte: 1\n", "unknown field 'inner.rte'"),
    ],
)
def test_errors_name_the_field_on_one_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        Outer.from_yaml(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="not valid YAML"):
        read_yaml(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(InputError, match="not found"):
        read_yaml(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="mapping"):
        read_yaml(write(tmp_path, "- 1\n- 2\n"))


def test_assignment_is_validated():
    cfg = Outer()
    with pytest.raises(ValidationError):
        cfg.epochs = "many"


def test_atomic_write_permissions_follow_umask(tmp_path):
    import os
    import stat

    from smearsight.fileio import atomic_write_bytes, atomic_write_json

    old = os.umask(0o022)
    try:
        import importlib

        import smearsight.fileio as fileio

        importlib.reload(fileio)
        path = fileio.atomic_write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        secret = atomic_write_bytes(tmp_path / "s.bin", b"k", mode=0o600)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert atomic_write_json(tmp_path / "b.json", [1]).read_text().strip().startswith("[")
    finally:
        os.umask(old)


def test_config_that_is_not_utf8_or_unreadable_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("epochs: 3  # r\xe9glage\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.yaml: cannot read the config file \(not UTF-8"):
        read_yaml(path)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfepochs: 3\n")  # Windows editors write a byte-order mark
    assert read_yaml(bom) == {"epochs": 3}
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(InputError, match="dir.yaml: config file not found"):
        read_yaml(folder)


def test_error_path_through_a_union_names_only_the_users_keys(tmp_path):
    from typing import Literal

    from pydantic import model_validator

    class Shape(StrictConfig):
        levels: list[int] = [3]

        @model_validator(mode="after")
        def _check(self):
            return self

    class Recipe(StrictConfig):
        anchors: Shape | Literal["auto"] = "auto"

    path = write(tmp_path, "anchors:\n  levls: [3, 4]\n")
    with pytest.raises(InputError) as info:
        Recipe.from_yaml(path)
    # was: unknown field 'anchors.function-after[_check(), Shape].levls'
    assert str(info.value).startswith(f"{path}: unknown field 'anchors.levls'")


@pytest.mark.parametrize("value", [".inf", "-.inf", "1e400", ".nan"])
def test_infinite_or_nan_float_is_refused_naming_the_field(tmp_path, value):
    # ``gt=0`` alone lets +inf through: an infinite rate must be refused when the file is read, not after training
    path = write(tmp_path, f"inner:\n  rate: {value}\n")
    with pytest.raises(InputError) as info:
        Outer.from_yaml(path)
    message = str(info.value)
    assert "field 'inner.rate'" in message and str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "section",
    ["lr: .inf", "grad_clip: .inf", "augment:\n  scale_max: .inf", "loss:\n  focal_gamma: .inf", "warmup_epochs: .inf"],
)
def test_detector_recipe_refuses_infinity(tmp_path, section):
    from smearsight.train.detector.config import TrainConfig

    path = write(tmp_path, section + "\n")
    field = section.replace(":\n  ", ".").split(":")[0]
    with pytest.raises(InputError, match=f"field '{field}'.*finite"):
        TrainConfig.from_yaml(path)


def test_a_value_fitting_no_branch_of_a_union_lists_every_accepted_form(tmp_path):
    """``anchors: atuo`` used to say only 'Input should be a valid dictionary or instance of AnchorConfig
    (+1 more)', never that 'auto' and 'default' are what a plain word may be."""
    from smearsight.train.detector.config import TrainConfig

    path = write(tmp_path, "anchors: atuo\n")
    with pytest.raises(InputError) as info:
        TrainConfig.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field 'anchors': ")
    assert "'auto' or 'default'" in message and "AnchorConfig" in message and "(got 'atuo')" in message
    assert "more)" not in message and "\n" not in message


@pytest.mark.parametrize(
    "text, line", [("epochs: 5\nname: y\nepochs: 50\n", 3), ("inner:\n  rate: 0.5\n  rate: 2\n", 3)]
)
def test_a_key_given_twice_is_an_error_not_a_silent_override(tmp_path, text, line):
    # YAML loaders keep the last of two equal keys: "epochs: 5" near the top was silently ignored
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        Outer.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line {line}:") and "given twice" in message and "\n" not in message


def test_a_merge_key_may_still_override_what_it_merges(tmp_path):
    path = write(tmp_path, "base: &b {rate: 0.5}\ninner:\n  <<: *b\n  rate: 2\n")
    assert read_yaml(path)["inner"] == {"rate": 2}
