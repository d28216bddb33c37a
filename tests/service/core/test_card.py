import json

import pytest

from service.core.card import METADATA_KEY, ModelCard, Parity, Source, Tune
from service.core.errors import CardError
from tests.conftest import tiny_card


def test_round_trip_json_preserves_every_field() -> None:
    card = tiny_card(
        version=3,
        onnx_sha256="ab" * 32,
        opset=17,
        test_resolution=40,
        policy="object",
        source=Source(kind="timm", architecture="resnet10t", weights_sha256="cd" * 32),
        parity=Parity(max_abs_diff=2e-6, top1_agreement=1.0, images=("coffee",), resolutions=(32, 40)),
    )
    again = ModelCard.from_json(card.to_json())
    assert again == card
    assert again.parity is not None and again.parity.images == ("coffee",)
    assert isinstance(again.labels, tuple)


def test_embedded_json_has_no_repository_fields() -> None:
    card = tiny_card(version=2, onnx_sha256="ef" * 32)
    data = json.loads(card.to_json(embedded=True))
    assert "version" not in data and "onnx_sha256" not in data
    assert ModelCard.from_dict(data).version is None
    assert METADATA_KEY == "steady.card"


def test_test_resolution_defaults_to_train() -> None:
    assert tiny_card().test_resolution == 32
    assert tiny_card(test_resolution=48).resolution == 48


def test_card_is_frozen() -> None:
    card = tiny_card()
    with pytest.raises(AttributeError):
        card.name = "other"  # type: ignore[misc]
    assert card.replace(name="other").name == "other"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"labels": ()}, "labels"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
        ({"mean": (1.0, 2.0)}, "mean"),
        ({"train_resolution": 4}, "train_resolution"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"interpolation": "area"}, "interpolation"),
        ({"policy": "random"}, "policy"),
        ({"value_scale": "0..1"}, "value_scale"),
        ({"schema_version": 99}, "schema_version"),
    ],
)
def test_invalid_cards_are_refused_with_the_field_named(overrides: dict, message: str) -> None:
    with pytest.raises(CardError, match=message):
        tiny_card(**overrides)


def test_unknown_fields_and_bad_json_are_refused() -> None:
    data = json.loads(tiny_card().to_json())
    data["surprise"] = 1
    with pytest.raises(CardError, match="surprise"):
        ModelCard.from_dict(data)
    with pytest.raises(CardError, match="JSON"):
        ModelCard.from_json("{not json")
    with pytest.raises(CardError, match="object"):
        ModelCard.from_json("[1, 2]")


def test_preprocessing_is_never_defaulted() -> None:
    from service.core.card import ModelCard
    from service.core.errors import CardError

    with pytest.raises(TypeError):
        ModelCard(name="m", labels=("a",), train_resolution=32)  # type: ignore[call-arg]
    data = tiny_card().to_dict()
    del data["mean"]
    with pytest.raises(CardError, match="mean"):
        ModelCard.from_dict(data)


def test_an_int8_card_carries_its_quantization_record() -> None:
    from service.core.card import Quantization
    from service.core.errors import CardError

    base = dict(name="m", labels=("a", "b"), train_resolution=32, mean=(127.0,) * 3, std=(128.0,) * 3)
    q = Quantization(method="minmax", calibration_count=2, calibration_fingerprint="f" * 64,
                     calibration_sha256=("a" * 64, "b" * 64), seed=0, source_sha256="c" * 64,
                     float_nodes=("n1",), options=(("ActivationSymmetric", "False"),))
    card = ModelCard(**base, precision="int8", quantization=q)  # type: ignore[arg-type]
    assert ModelCard.from_json(card.to_json()) == card
    with pytest.raises(CardError, match="quantization"):
        ModelCard(**base, precision="int8")  # type: ignore[arg-type]
    with pytest.raises(CardError, match="quantization"):
        ModelCard(**base, quantization=q)  # type: ignore[arg-type]


def _tune(**overrides: object) -> Tune:
    fields: dict[str, object] = dict(
        method="consistency", source_version=1, source_sha256="ab" * 32, data_fingerprint="cd" * 32, split_seed=0,
        tune_fingerprint="ef" * 32, tune_images=95, holdout_images=105, labelled=False, resolution=224, steps=300,
        batch_size=16, learning_rate=1e-5, loss_start=0.12, loss_end=0.05, wall_seconds=300.5, seed=0,
        device="cpu", source_weights_sha256="12" * 32, recipe={"loss": "ensemble", "ensemble_offsets": [[0, 0], [2, 1]]})
    fields.update(overrides)
    return Tune(**fields)  # type: ignore[arg-type]


def test_a_tune_record_round_trips_and_is_embedded() -> None:
    card = tiny_card(version=2, onnx_sha256="ab" * 32, tune=_tune())
    again = ModelCard.from_json(card.to_json())
    assert again == card and again.tune is not None
    assert again.tune.recipe["ensemble_offsets"] == [[0, 0], [2, 1]]
    assert json.loads(card.to_json(embedded=True))["tune"]["source_version"] == 1


def test_cards_written_before_the_tune_record_still_load() -> None:
    data = json.loads(tiny_card(version=1, onnx_sha256="ab" * 32).to_json())
    del data["tune"]
    card = ModelCard.from_dict(data)
    assert card.tune is None and card.version == 1


def test_a_tune_record_with_an_unknown_method_or_field_is_refused() -> None:
    with pytest.raises(CardError, match="tune method"):
        _tune(method="magic")
    data = json.loads(tiny_card(tune=_tune()).to_json())
    data["tune"]["colour"] = "blue"
    with pytest.raises(CardError, match="invalid card"):
        ModelCard.from_dict(data)
