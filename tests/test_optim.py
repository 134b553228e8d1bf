import math

import torch

from gpt_train.config import load_config
from gpt_train.model import GPT
from gpt_train.optim import build_optimizer, lr_at


def test_schedule_warmup_cosine_floor():
    cfg = load_config("default", ["optim.lr=1.0", "schedule.min_lr=0.1", "schedule.warmup_steps=10", "max_steps=110"])
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert math.isclose(lr_at(60, cfg), 0.55)  # halfway through the cosine
    assert math.isclose(lr_at(110, cfg), 0.1) and lr_at(500, cfg) == 0.1
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_only_on_matrices():
    cfg = load_config("default", ["vocab_size=100"])
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}  # tied matrix counted once, nothing left out
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
