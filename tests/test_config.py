"""Typed recipes and TrainConfig: checked values, one source of defaults, the --resume rule."""

from dataclasses import fields, replace

import pytest

from fruitnet.cli import build_parser
from fruitnet.config import RECIPES, RESUMABLE, TrainConfig, resolve, resume_config
from fruitnet.errors import UsageError


def test_recipes_refuse_unknown_values():
    seed = RECIPES["original"]
    with pytest.raises(UsageError, match="optimizer must be one of sgd, adamw, lbfgs, not 'adam'"):
        replace(seed, optimizer="adam")  # must not silently become AdamW
    with pytest.raises(UsageError, match="augment must be one of"):
        replace(seed, augment="heavy")
    with pytest.raises(UsageError, match="crop_scale"):
        replace(seed, crop_scale=(0.9, 0.5))
    with pytest.raises(UsageError, match="the probe strategy, and it alone, uses the lbfgs optimizer"):
        replace(seed, optimizer="lbfgs")
    with pytest.raises(UsageError, match="mode must be one of freeze, unfreeze"):
        TrainConfig(data="x", mode="frozen")
    with pytest.raises(UsageError, match="precision must be one of auto, fp32, bf16"):
        TrainConfig(data="x", precision="fp16")


def test_the_original_recipe_is_the_original_project_and_keeps_its_first_name():
    r = RECIPES["original"]
    assert resolve(TrainConfig(data="x", recipe="seed")).recipe == "original"  # old commands and runs
    assert (r.optimizer, r.momentum, r.lr, r.weight_decay, r.batch_size, r.epochs) == ("sgd", 0.0, 0.001, 0.01, 32, 30)
    assert (r.schedule, r.augment, r.label_smoothing, r.head_warmup_epochs, r.low_res_size) == \
        ("constant", "none", 0.0, 0, None)


def test_resolve_fills_from_the_recipe_and_keeps_what_was_given():
    default = resolve(TrainConfig(data="x"))
    assert (default.recipe, default.mode, default.backbone) == ("probe", "freeze", "efficientnet_lite1")
    assert (default.epochs, default.lr, default.weight_decay, default.batch_size) == (1, 1.0, 0.001, 32)
    fast = resolve(TrainConfig(data="x", mode="unfreeze"))  # --mode unfreeze alone: the fine-tuning recipe
    assert (fast.recipe, fast.epochs, fast.lr, fast.weight_decay, fast.batch_size) == ("fast", 8, 0.001, 0.05, 32)
    assert resolve(TrainConfig(data="x", recipe="seed")).mode == "unfreeze"
    with pytest.raises(UsageError, match="needs --mode freeze"):
        resolve(TrainConfig(data="x", recipe="probe", mode="unfreeze"))
    with pytest.raises(UsageError, match="feature cache"):
        resolve(TrainConfig(data="x", feature_cache=False))
    given = resolve(TrainConfig(data="x", recipe="seed", lr=0.01, epochs=3))
    assert (given.lr, given.epochs, given.weight_decay) == (0.01, 3, 0.01)
    assert RECIPES["fast"].low_res_epochs(8) == 4 and RECIPES["original"].low_res_epochs(30) == 0


@pytest.mark.parametrize("config, distributed, message", [
    (TrainConfig(data="x", epochs=3), False, "fits once, to convergence"),
    (TrainConfig(data="x", balance="sampler"), False, "use --balance weights"),
    (TrainConfig(data="x", recipe="original", balance="sampler"), True, "not supported under torchrun"),
])
def test_options_that_cannot_go_together_are_refused_before_anything_runs(config, distributed, message):
    with pytest.raises(UsageError, match=message):
        resolve(config, distributed)


def test_a_learning_rate_of_zero_is_refused():
    with pytest.raises(UsageError, match="--lr must be more than 0, not 0"):
        TrainConfig(data="x", lr=0.0)


def test_resume_accepts_only_how_to_run_not_what_to_train():
    saved = {f.name: getattr(resolve(TrainConfig(data="photos")), f.name) for f in fields(TrainConfig)}
    config = resume_config(saved, {"epochs": 12, "workers": 0})
    assert config.epochs == 12 and config.workers == 0 and config.lr == saved["lr"]
    assert resume_config(saved, {"lr": saved["lr"]}).lr == saved["lr"]  # the same value again is harmless
    with pytest.raises(UsageError, match="--lr, --mode cannot change"):
        resume_config(saved, {"lr": 0.5, "mode": "unfreeze"})
    assert set(RESUMABLE) == {"epochs", "device", "workers", "precision"}
    older = {k: v for k, v in saved.items() if k != "balance"}  # a run saved before --balance existed
    assert resume_config(older, {}).balance == "none" and resume_config(saved, {}).balance == "auto"


def test_command_line_options_and_help_come_from_trainconfig_and_the_recipes():
    parser = build_parser()
    args = parser.parse_args(["train", "photos"])
    for f in fields(TrainConfig):
        if f.name != "data":
            assert getattr(args, f.name) is None  # not given: the recipe or TrainConfig decides
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "epochs")
    assert train.help.endswith("(default: the recipe's: " + ", ".join(f"{n} {r.epochs}" for n, r in RECIPES.items()) + ")")
    args = parser.parse_args(["train", "photos", "--no-image-cache", "--tensorboard", "--epochs", "3"])
    assert (args.image_cache, args.tensorboard, args.epochs) == (False, True, 3)


@pytest.mark.parametrize("argv, message", [
    (["train", "x", "--epochs", "2.5"], "expected a whole number, not '2.5'"),
    (["train", "x", "--val-fraction", "1.5"], "between 0 and 1"),
    (["train", "x", "--lr", "0"], "must be more than 0, not 0"),
    (["serve", "m", "--port", "99999"], "between 1 and 65535"),
])
def test_bad_numbers_get_plain_words(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err



def test_inference_options_come_from_one_dataclass_for_every_command():
    from fruitnet.cli import _inference_options
    from fruitnet.config import InferenceOptions

    parser = build_parser()
    args = parser.parse_args(["evaluate", "m.safetensors", "photos", "--unknown", "others", "--no-unknown", "--tta"])
    assert args.unknown_dir == "others"
    assert _inference_options(args) == InferenceOptions(unknown=False, tta=True)
    assert _inference_options(parser.parse_args(["predict", "m.safetensors", "p.jpg"])) == InferenceOptions()
    served = _inference_options(parser.parse_args(["serve", "m.onnx", "--runtime", "onnx", "--precision", "fp32"]))
    assert (served.runtime, served.precision, served.batch_size) == ("onnx", "fp32", 32)
    exported = parser.parse_args(["export", "m.safetensors", "--tta"])
    assert _inference_options(exported).tta and not hasattr(exported, "precision")  # export offers --tta alone
