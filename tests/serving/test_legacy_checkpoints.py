"""Checkpoints written before a setting existed load with what they ran with."""

from engine.config.schema import DataConfig

PATTERN = DataConfig().patient_pattern


def test_checkpoints_from_before_anti_aliasing_predict_without_it():
    from engine.serving.inference import checkpoint_preprocessing

    saved = {"preprocessing": {"orientation": "RAS", "spacing": None, "hu_window": [-1000.0, 1000.0],
                               "scale_range": [-1.0, 1.0], "spatial_size": [32, 32, 32], "resize": "resize",
                               "dtype": "float16"}}
    assert checkpoint_preprocessing(saved).anti_aliasing is False
