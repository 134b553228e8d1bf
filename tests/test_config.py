import pytest

from gpt_train.config import Config, dump, from_dict, load_config, resolve_config_path, to_dict, warnings
from gpt_train.errors import ConfigError


def test_presets_load_and_old_tool_paths_resolve():
    for name in ("default", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        load_config(name)
    large = load_config("configs/gpt2-large.yaml")
    assert (large.model.n_layer, large.model.n_head, large.model.n_embd) == (36, 20, 1280)
    assert resolve_config_path("config/gpt2-large.yaml") == resolve_config_path("gpt2-large")
    # extends: gpt2-large inherits the data and schedule of gpt2
    assert large.data.dir == load_config("gpt2").data.dir


def test_overrides_dotted_unique_leaf_and_alias():
    cfg = load_config("gpt2", ["optim.lr=3e-4", "compile=false", "max_iters=10", "batch_size=8"])
    assert cfg.optim.lr == 3e-4 and cfg.train.compile is False
    assert cfg.train.max_steps == 10 and cfg.train.micro_batch == 8
    cfg = load_config("gpt2", ["wandb_project=owt", "wandb_run_name=gpt2-124M", "min_lr=6e-4", "warmup_iters=0"])
    assert (cfg.logging.project, cfg.logging.name) == ("owt", "gpt2-124M")
    assert cfg.schedule.min_lr == cfg.optim.lr and cfg.schedule.warmup_steps == 0  # decay_lr=False, translated


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("learnig_rate=1", "did you mean 'learning_rate'?"),
    ("n_layers=3", "did you mean 'n_layer'?"),
    ("micro_batch=eight", "config key 'train.micro_batch' expects int, got 'eight'"),
    ("compile=maybe", "config key 'train.compile' expects bool"),
    ("precision=fp8", "config key 'train.precision' must be one of auto, fp32, bf16, fp16"),
    ("train.seq_len=4096", "config key 'train.seq_len' (4096) is above model.block_size (1024)"),
    ("batch_tokens=1000", "config key 'train.batch_tokens' (1000) must be a multiple of seq_len x ranks"),
    ("optim.lr=inf", "config key 'optim.lr' must be a finite number, got inf"),
    ("schedule.min_lr=nan", "config key 'schedule.min_lr' must be a finite number"),
    ("optim.lr=0", "config key 'optim.lr' must be positive"),
    ("checkpoint.resume=runs/other", "use checkpoint.init_from=runs/other"),
    ("preemption.signals=TERM,NOPE", "'NOPE' is not a signal of this system"),
    ("deterministic=maybe", "config key 'train.deterministic' expects bool"),
    ("n_head=7", "must be divisible by model.n_head"),
    ("lr", "must look like key=value"),
    # nanoGPT's keys that name no one key here: their translation, not a guess
    ("gradient_accumulation_steps=40", "train.batch_tokens = gradient_accumulation_steps x batch_size x block_size"),
    ("init_from=resume", "init_from=resume is checkpoint.resume=auto"),
    ("wandb_log=True", "use logging.wandb=online"),
    ("decay_lr=False", "schedule.min_lr equal to optim.lr"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("gpt2", [override])
    assert message in str(e.value)


def test_batch_must_divide_over_ranks():
    from gpt_train.config import validate
    cfg = load_config("default")
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="x 3 ="):
        validate(cfg, world_size=3)


def test_micro_batch_is_a_bound_that_divides_the_batch():
    from gpt_train.config import micro_batch_for
    cfg = load_config("default")  # 32 sequences of 128 tokens, micro_batch 32
    assert micro_batch_for(cfg, 1) == 32
    assert micro_batch_for(cfg, 2) == 16  # 16 sequences per rank: one micro-batch of 16, not an error
    cfg = load_config("gpt2", ["micro_batch=7"])  # 480 sequences: 7 does not divide them, 6 does
    assert micro_batch_for(cfg, 1) == 6
    assert micro_batch_for(load_config("gpt2", ["micro_batch=1"]), 8) == 1


def test_typed_tristate_and_list_values(tmp_path):
    assert load_config("default").train.deterministic is None  # auto
    assert load_config("default", ["deterministic=true"]).train.deterministic is True
    assert load_config("default", ["deterministic=auto"]).train.deterministic is None
    assert load_config("default", ["preemption.signals=TERM,usr1"]).preemption.signals == ["TERM", "usr1"]
    (tmp_path / "c.yaml").write_text("extends: default\npreemption:\n  signals: [USR2]\ntrain:\n  deterministic: false\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert cfg.preemption.signals == ["USR2"] and cfg.train.deterministic is False
    assert from_dict(to_dict(cfg)) == cfg


def test_vocab_comes_from_the_data_before_validation():
    from gpt_train.config import resolve_vocab
    cfg = load_config("default")
    gpt2 = {"name": "gpt2", "n_vocab": 50257}
    assert resolve_vocab(cfg, gpt2, "d").model.vocab_size == 50257 and cfg.model.vocab_size == 0  # a copy
    with pytest.raises(ConfigError, match="'model.vocab_size' is 300 but the data in 'd' was tokenized with gpt2"):
        resolve_vocab(load_config("default", ["vocab_size=300"]), gpt2, "d")


def test_extends_chain_and_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: gpt2\ntrain:\n  max_steps: 5\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.train.max_steps == 5 and cfg.optim.lr == 1e-4 and cfg.model.n_layer == 12
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "a.yaml"))


def test_unknown_key_in_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  max_step: 5\n")
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(str(tmp_path / "c.yaml"))


def test_missing_config_suggests_preset():
    with pytest.raises(ConfigError, match="did you mean preset 'gpt2-large'"):
        load_config("gpt2-lrage")


def test_round_trip_through_dict():
    cfg = load_config("gpt2-xl", ["lr=1e-4"])
    assert from_dict(to_dict(cfg)) == cfg
    assert "n_layer: 48" in dump(cfg)
    assert Config().seq_len == 1024


def test_suspicious_but_legal_settings_are_warnings_naming_the_keys():
    from gpt_train.config import preset_names
    assert [n for n in preset_names() if warnings(load_config(n))] == []
    (long_warmup,) = warnings(load_config("default", ["max_steps=100", "warmup_steps=500"]))
    assert "'schedule.warmup_steps' (500)" in long_warmup and "train.max_steps (100)" in long_warmup
    (short_decay,) = warnings(load_config("default", ["warmup_steps=100", "decay_steps=50"]))
    assert "'schedule.decay_steps' (50)" in short_decay and "schedule.warmup_steps (100)" in short_decay
    assert len(warnings(load_config("default", ["max_steps=10", "warmup_steps=100", "decay_steps=50"]))) == 2
    assert len(warnings(load_config("default", ["warmup_steps=100", "decay_steps=100"]))) == 1  # drops just the same
    assert warnings(load_config("default", ["max_steps=100", "warmup_steps=100", "decay_steps=0"])) == []


def test_the_data_formats_a_config_accepts_are_those_the_reader_knows():
    from gpt_train import config, formats

    assert config.DATA_FORMATS == formats.CHOICES  # config.py names them without importing numpy
