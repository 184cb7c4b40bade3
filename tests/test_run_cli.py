from pathlib import Path

from fusion.run.cli import unknown_choice_errors

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_unknown_names_in_group_lists_are_reported_with_the_options():
    errors = unknown_choice_errors(["+experiment=shapes", "encoder=[clip_tiny,nope]"], CONF)
    assert len(errors) == 1
    assert "'nope'" in errors[0] and "clip, clip_tiny, dino, dino_tiny, vit, vit_tiny" in errors[0]


def test_sweeps_of_lists_are_checked_element_by_element():
    errors = unknown_choice_errors(["-m", "encoder=[clip_tiny],[dino_tiny,clop]"], CONF)
    assert len(errors) == 1 and "'clop'" in errors[0]


def test_valid_choices_and_plain_values_pass():
    args = ["encoder=[clip_tiny,dino_tiny]", "training.drop_encoders=[dino_tiny]", "trainer.max_epochs=1",
            "task=shapes"]
    assert unknown_choice_errors(args, CONF) == []
    assert unknown_choice_errors(["encoder=[unclosed"], CONF) == []  # left to Hydra's own parser error


def test_an_override_of_the_renamed_model_group_names_its_new_name():
    from fusion.run.cli import renamed_group_errors

    assert renamed_group_errors(["training.lr=1e-3", "fusion.width=32", "hydra.run.dir=x"]) == []
    [error] = renamed_group_errors(["model.lr=1e-3"])
    assert "'model' is now 'training'" in error and "training.lr=" in error
    [error] = renamed_group_errors(["+model.extra=1"])
    assert "training.extra=" in error
