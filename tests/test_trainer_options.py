"""Issue 24's trainer options and diagnostics on the tiny offline pipeline (CPU, one process): the
post-update log-ratio statistics and leap, exploration and advantage-quality metrics, the low-variance
group filter, globally standardized advantages, the EMA of the LoRA, periodic evaluation, β on the
MiniBench editor, and the new config fields as flags and YAML."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rcgrpo.cli import main as cli_main
from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.editors.flux_kontext.rollout import predict_velocity
from rcgrpo.testing import tiny_kontext_pipeline
from rcgrpo.train.config import RCGRPOConfig, preset
from rcgrpo.train.ema import LoraEMA
from rcgrpo.train.metrics import GroupSummary, RowLayout, exploration_sums, progress_fields, step_metrics
from rcgrpo.train.trainer import RCGRPOTrainer


def config(tmp_path, **overrides):
    values = dict(group_size=4, num_anchors=2, groups_per_step=1, num_inference_steps=2, max_steps=2, train_size=4,
                  eval_size=2, reward_funcs=["redness"], reward_weights=[1.0], w_acd=0.5, acd_backend="torch",
                  distance_backend="torch", checkpoint_every=0, sample_every=0, report_to="none",
                  output_dir=str(tmp_path / "run"), learning_rate=1e-2)
    values.update(overrides)
    return preset("tiny", **values)


def trainer(cfg, data=None, reward=redness_reward):
    data = data if data is not None else SquareDataset(cfg.train_size, size=cfg.resolution, seed=cfg.seed)
    held = SquareDataset(cfg.eval_size, size=cfg.resolution, seed=999) if cfg.eval_size else None
    return RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("redness", reward)], data, held)


def lora_vector(tr):
    return torch.cat([p.detach().reshape(-1).clone() for p in tr.lora_parameters])


def read_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- metrics from rows
def _summary(slot, task, **kw):
    g = len(task)
    return GroupSummary(slot=slot, task=torch.tensor(task, dtype=torch.float64), acd=None,
                        drift=torch.zeros(g - 1, dtype=torch.float64), advantages=torch.zeros(g, dtype=torch.float64),
                        components={"r": torch.tensor(task, dtype=torch.float64)}, **kw)


def test_advantage_quality_and_diagnostic_metrics_by_hand():
    a = _summary(0, [0.1, 0.3, 0.5, 0.7], diag={"approx_kl": 0.2, "leap_sq_edit": 8.0, "leap_n_edit": 2.0,
                                               "explore_sq_background": 1.0, "explore_n_background": 4.0})
    b = _summary(1, [0.50, 0.50, 0.51, 0.49], filtered=True,
                 diag={"approx_kl": 0.4, "leap_sq_edit": 1.0, "leap_n_edit": 3.0})
    m = step_metrics([a, b], ["r"], low_variance_threshold=0.01)
    assert m["reward_std_between_groups"] == pytest.approx(abs(0.4 - 0.5) / 2)  # population std of two means
    assert m["low_variance_fraction"] == 0.5 and m["filtered_groups"] == 1  # b's std is 0.0071
    assert m["reference_reward_gap"] == pytest.approx(((0.1 - 0.4) + (0.5 - 0.5)) / 2)
    assert m["approx_kl"] == pytest.approx(0.3)
    assert m["leap_rms_edit"] == pytest.approx(math.sqrt(9.0 / 5.0))  # pooled over groups, not a mean of RMS
    assert m["explore_rms_background"] == pytest.approx(0.5) and m["explore_rms_edit"] is None
    assert m["leap_rms_background"] is None and m["clip_frac_high"] is None and m["policy_kl"] is None
    assert step_metrics([a, b], ["r"], low_variance_threshold=0.0)["low_variance_fraction"] == 0.0
    # the rows carry the new fields through a gather
    layout = RowLayout(4, ["r"])
    back = layout.unpack(layout.pack([a, b], 3))
    assert [g.filtered for g in back] == [False, True] and back[1].diag == b.diag and back[0].diag == a.diag
    assert step_metrics(back, ["r"], low_variance_threshold=0.01) == m
    assert progress_fields(m)["approx_kl"] == "3.0e-01" and progress_fields({})["std_in"] == "-"


def test_exploration_sums_by_hand():
    final = torch.zeros(3, 2, 2)  # G = 3 candidates, 2 tokens × 2 channels
    final[1] = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    final[2] = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])  # token 0 is the edit region
    sums = exploration_sums(final, mask)
    assert sums == {"explore_sq_edit": 1 + 1 + 9, "explore_n_edit": 2 * 2, "explore_sq_background": 4,
                    "explore_n_background": 2 * 2}


# ---------------------------------------------------------------- post-update diagnostics
def _independent_diagnostics(tr, group, anchors):
    """approx_kl, clip fractions and leap sums from the SPEC formulas, in float64, one transition at a time."""
    cfg = tr.config
    mask = group.mask.double()
    dim = mask.numel()
    log_ratios, leap_in, leap_out, pairs = [], 0.0, 0.0, 0
    for j in cfg.train_timestep_indices(group.sigmas.shape[0] - 1):
        x_j = group.states[anchors, j]
        with torch.no_grad():
            v = predict_velocity(tr.transformer, group.conditioning, x_j, group.timesteps[j].repeat(len(anchors)))
        pred = (x_j + (group.sigmas[j + 1] - group.sigmas[j]) * v).double().reshape(len(anchors), dim)
        old = group.states[anchors, j + 1].double().reshape(len(anchors), dim)
        cand = group.states[:, j + 1].double().reshape(cfg.group_size, dim)

        def log_pi(anchor):
            diff = (cand[None] - anchor[:, None]).square()  # [B, G, D]
            s_in, s_out = (diff * mask).sum(-1), (diff * (1 - mask)).sum(-1)
            d2 = cfg.distance_scale * dim / 2 * (s_in / (cfg.tau_edit**2 * (mask.sum() + cfg.distance_eps))
                                                 + s_out / (cfg.tau_base**2 * (dim - mask.sum() + cfg.distance_eps)))
            return torch.log_softmax(-0.5 * d2, dim=-1)

        log_ratios.append((log_pi(pred) - log_pi(old)).clamp(-10, 10))
        leap_in += float(((pred - old).square() * mask).sum())
        leap_out += float(((pred - old).square() * (1 - mask)).sum())
        pairs += len(anchors)
    lr = torch.stack(log_ratios)
    ratio = lr.exp()
    return {"approx_kl": 0.5 * float(lr.square().mean()),
            "clip_frac_high": float((ratio > 1 + cfg.clip_eps).double().mean()),
            "clip_frac_low": float((ratio < 1 - cfg.clip_eps).double().mean()),
            "leap_sq_edit": leap_in, "leap_n_edit": pairs * float(mask.sum()),
            "leap_sq_background": leap_out, "leap_n_background": pairs * float((1 - mask).sum())}


@pytest.mark.parametrize("chunk", [1, 8])
def test_post_update_diagnostics_follow_the_formulas(tmp_path, chunk):
    # a softer distance keeps log π comparable in float32, a large step moves it, a small ε_clip clips
    cfg = config(tmp_path, w_acd=0.0, distance_scale=0.1, learning_rate=0.3, clip_eps=0.01, train_step_chunk=chunk,
                 num_inference_steps=3)
    tr = trainer(cfg)
    groups = [tr.rollout_group(0, 0, 0)]
    tr.compute_advantages(groups)
    tr._update(groups, 0, 1, [])
    anchors = tr._anchors(0, 0, 0)
    got = tr.update.diagnostics(groups[0], anchors)
    want = _independent_diagnostics(tr, groups[0], anchors)
    assert want["approx_kl"] > 1e-4 and want["clip_frac_high"] + want["clip_frac_low"] > 0.1  # it moved
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=2e-3, abs=1e-9), key
    assert 0 <= got["policy_kl"] and got["clip_frac_high"] + got["clip_frac_low"] <= 1


def test_steps_log_the_new_diagnostics_and_the_update_moves_them(tmp_path):
    still = trainer(config(tmp_path / "a", learning_rate=1e-9)).train_step()
    moved = trainer(config(tmp_path / "b", learning_rate=0.1)).train_step()
    for m in (still, moved):
        for key in ("approx_kl", "clip_frac_high", "clip_frac_low", "leap_rms_edit", "leap_rms_background",
                    "explore_rms_edit", "explore_rms_background", "reward_std_between_groups", "low_variance_fraction",
                    "reference_reward_gap", "policy_kl", "policy_entropy", "pi_old_anchor"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), key
        assert m["filtered_groups"] == 0
    assert moved["leap_rms_edit"] > 100 * still["leap_rms_edit"] and moved["approx_kl"] > still["approx_kl"]
    assert moved["explore_rms_edit"] == still["explore_rms_edit"]  # the rollout precedes the update
    off = trainer(config(tmp_path / "c", log_policy_kl=False)).train_step()
    assert off["approx_kl"] is None and off["leap_rms_edit"] is None and off["explore_rms_edit"] is not None


def test_rdp_explores_inside_the_mask_and_not_outside(tmp_path):
    rdp = trainer(config(tmp_path / "r", alpha_edit=0.3, group_size=6)).train_step()
    glob = trainer(config(tmp_path / "g", perturbation="global", global_sigma=0.3, group_size=6)).train_step()
    assert rdp["explore_rms_background"] < 0.2 * glob["explore_rms_background"]
    assert rdp["explore_rms_edit"] > 3 * rdp["explore_rms_background"]


# ---------------------------------------------------------------- low-variance filter
def _flagged_data(n, constant):
    """SquareDataset items as dicts; the reward below is constant on the examples in `constant`."""
    data = []
    for i, ex in enumerate(SquareDataset(n, size=32)):
        data.append({"image": ex.image, "mask": ex.mask, "instruction": ex.instruction, "id": ex.example_id,
                     "metadata": {"constant": i in constant}})
    return data


def constant_or_redness(edited, sources, masks, instructions, metadata):
    values = redness_reward(edited, sources, masks, instructions, metadata)
    flags = torch.tensor([m["constant"] for m in metadata])
    return torch.where(flags, torch.full_like(values, 0.5), values)


def test_filter_with_threshold_zero_changes_nothing_and_a_huge_one_stops_every_update(tmp_path):
    base = trainer(config(tmp_path / "a"))
    base.train()
    zero = trainer(config(tmp_path / "b", filter_low_variance=True, low_variance_threshold=0.0))
    zero.train()
    assert torch.equal(lora_vector(base), lora_vector(zero))
    huge = trainer(config(tmp_path / "c", filter_low_variance=True, low_variance_threshold=10.0))
    start = lora_vector(huge)
    huge.train()
    assert torch.equal(start, lora_vector(huge)) and not huge.optimizer.state  # no optimizer step at all
    rows = read_rows(tmp_path / "c" / "run")
    assert all(r["filtered_groups"] == r["groups"] == 1 and r["skipped_update"] and r["loss"] is None
               and r["low_variance_fraction"] == 1.0 and r["advantage_abs_mean"] == 0.0 for r in rows)
    assert all(r["approx_kl"] is not None for r in rows)  # diagnostics still measured on the batch


def test_a_filtered_group_leaves_the_loss_mean(tmp_path):
    # two groups per step, one of them constant: without the filter its zero advantages still count in the
    # mean over groups (half the gradient); with it the kept group alone makes the step's gradient
    grads = {}
    for name, on in (("off", False), ("on", True)):
        cfg = config(tmp_path / name, groups_per_step=2, train_size=2, max_steps=1, w_acd=0.0, max_grad_norm=0.0,
                     filter_low_variance=on, low_variance_threshold=1e-4)
        tr = trainer(cfg, data=_flagged_data(2, {1}), reward=constant_or_redness)
        real = tr._clip_and_norm

        def capture(tr=tr, real=real, name=name):
            grads[name] = torch.cat([p.grad.reshape(-1).clone() for p in tr.lora_parameters])
            return real()

        tr._clip_and_norm = capture
        metrics = tr.train_step()
        assert metrics["low_variance_fraction"] == 0.5 and metrics["filtered_groups"] == (1 if on else 0)
    assert grads["off"].abs().max() > 0
    torch.testing.assert_close(grads["on"], 2 * grads["off"], rtol=1e-5, atol=1e-10)


def test_global_advantages_in_the_trainer(tmp_path):
    cfg = config(tmp_path, groups_per_step=3, train_size=3, advantage_std="global", w_acd=0.5,
                 filter_low_variance=True, low_variance_threshold=1e-4)
    tr = trainer(cfg, data=_flagged_data(3, {2}), reward=constant_or_redness)
    groups = [tr.rollout_group(slot, slot, 0) for slot in range(3)]
    tr.compute_advantages(groups)
    task = torch.stack([g.task_reward for g in groups]).double()
    acd = torch.stack([g.acd for g in groups]).double()
    z = lambda x: (x - x.mean()) / (x.std(correction=0) + 1e-8)  # noqa: E731 - SPEC §6, over the whole step
    r = cfg.w_task * z(task) + cfg.w_acd * z(acd)
    centered = r - r.mean(dim=1, keepdim=True)
    scale = centered[:2].square().mean().sqrt()  # the filtered group stays out of S
    assert [g.filtered for g in groups] == [False, False, True]
    for i in range(2):
        torch.testing.assert_close(groups[i].advantages.double(), centered[i] / (scale + 1e-8), rtol=1e-5, atol=1e-6)
    assert torch.equal(groups[2].advantages, torch.zeros(4))


# ---------------------------------------------------------------- EMA of the LoRA
def test_lora_ema_math_and_swap():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEMA(["w"], [p], decay=0.75, start_step=1)
    with torch.no_grad():
        p.fill_(4.0)
    ema.update(1)  # up to the start step: a copy
    assert torch.equal(ema.shadow[0], torch.full((3,), 4.0))
    with torch.no_grad():
        p.fill_(8.0)
    ema.update(2)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.75 * 4 + 0.25 * 8)) and ema.updates == 1
    with ema.applied():
        assert torch.allclose(p.detach(), torch.full((3,), 5.0))
    assert torch.equal(p.detach(), torch.full((3,), 8.0))
    other = LoraEMA(["w"], [p], decay=0.75)
    other.load_state_dict(**ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.updates == 1
    with pytest.raises(ValueError, match="lacks weights"):
        other.load_state_dict({"v": torch.zeros(3)})
    with pytest.raises(ValueError, match="decay"):
        LoraEMA(["w"], [p], decay=1.0)


def test_trainer_ema_follows_the_raw_weights_and_is_what_evaluation_uses(tmp_path):
    cfg = config(tmp_path, ema_decay=0.5, ema_start_step=1, max_steps=3)
    tr = trainer(cfg)
    raw = []
    for _ in range(3):
        tr.train_step()
        tr.step += 1
        raw.append(lora_vector(tr))
    expected = raw[0]
    for vector in raw[1:]:
        expected = 0.5 * expected + 0.5 * vector
    torch.testing.assert_close(torch.cat([s.reshape(-1) for s in tr.ema.shadow]), expected, rtol=1e-6, atol=1e-8)
    assert tr.evaluate() == tr.evaluate(ema=True) != tr.evaluate(ema=False)
    assert torch.equal(lora_vector(tr), raw[-1])  # evaluation put the raw weights back
    with pytest.raises(ValueError, match="ema_decay is 0"):
        trainer(config(tmp_path / "plain")).evaluate(ema=True)


def test_ema_lora_is_saved_beside_the_raw_one_and_loads_into_a_stock_pipeline(tmp_path):
    cfg = config(tmp_path, ema_decay=0.6, max_steps=2)
    tr = trainer(cfg)
    tr.train()
    run = Path(cfg.output_dir)
    raw = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    ema = load_file(run / "lora_ema" / "pytorch_lora_weights.safetensors")
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    stock = tiny_kontext_pipeline(0)
    stock.load_lora_weights(str(run / "lora_ema"))
    kw = dict(image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), prompt="make the square red",
              height=32, width=32, num_inference_steps=3, guidance_scale=2.5, max_area=1024, _auto_resize=False,
              max_sequence_length=16, output_type="pt")
    theirs = stock(**kw, generator=torch.Generator().manual_seed(0)).images
    with tr.evaluation_weights():
        ours = tr.pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_resume_with_ema_and_periodic_evaluation_equals_an_uninterrupted_run(tmp_path):
    common = dict(ema_decay=0.7, ema_start_step=1, eval_every=1, checkpoint_every=2)
    straight = trainer(config(tmp_path / "a", max_steps=4, **common))
    straight.train()
    first = trainer(config(tmp_path / "b", max_steps=2, **common))
    first.train()
    assert (Path(first.output_dir) / "checkpoint-2" / "ema.safetensors").is_file()
    resumed = trainer(config(tmp_path / "b", max_steps=4, **common))
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    assert torch.equal(lora_vector(straight), lora_vector(resumed))
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.shadow, resumed.ema.shadow))
    files = [load_file(Path(t.output_dir) / "lora_ema" / "pytorch_lora_weights.safetensors") for t in (straight, resumed)]
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    a, b = read_rows(straight.output_dir), read_rows(resumed.output_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "eval/task_reward", "eval/task_reward_ema", "approx_kl"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_ema_switched_on_at_resume_starts_at_the_checkpoint(tmp_path):
    first = trainer(config(tmp_path, max_steps=1, checkpoint_every=1))
    first.train()
    resumed = trainer(config(tmp_path, max_steps=1, checkpoint_every=1, ema_decay=0.5))
    assert resumed.resume()
    assert torch.equal(torch.cat([s.reshape(-1) for s in resumed.ema.shadow]), lora_vector(first))


# ---------------------------------------------------------------- periodic evaluation
def test_eval_every_logs_the_evaluation_reward(tmp_path):
    cfg = config(tmp_path, max_steps=3, eval_every=2, log_every=3, ema_decay=0.5)
    tr = trainer(cfg)
    tr.train()
    rows = read_rows(cfg.output_dir)
    assert [r["step"] for r in rows] == [2, 3]  # step 2 is logged because it was evaluated
    assert "eval/task_reward" in rows[0] and "eval/task_reward_ema" in rows[0] and "eval/task_reward" not in rows[1]
    last = trainer(config(tmp_path / "one", max_steps=1, eval_every=1))
    last.train()
    assert read_rows(last.output_dir)[0]["eval/task_reward"] == pytest.approx(last.evaluate(), rel=1e-6)
    with pytest.raises(ValueError, match="eval_every = 2 needs an evaluation set"):
        trainer(config(tmp_path / "none", eval_size=0, eval_every=2))


# ---------------------------------------------------------------- β on the MiniBench editor
def test_beta_works_with_the_minibench_preset(tmp_path):
    import rcgrpo.minibench  # noqa: F401 - registers tiny-editor, the minibench dataset and reward
    from rcgrpo.editors.loading import load_editor
    from rcgrpo.minibench.reward import minibench_reward
    from rcgrpo.train.data import build_datasets

    cfg = preset("minibench", group_size=4, num_anchors=2, groups_per_step=1, num_inference_steps=2,
                 train_timesteps="2", max_steps=2, train_size=4, eval_size=0, beta=0.5, learning_rate=5e-3,
                 checkpoint_every=0, sample_every=0, report_to="none", output_dir=str(tmp_path / "run"))
    train_set, _ = build_datasets(cfg)
    tr = RCGRPOTrainer(load_editor(cfg.model, device="cpu"), cfg, [("minibench", minibench_reward)], train_set)
    first = tr.train_step()
    tr.step += 1
    second = tr.train_step()
    assert first["kl_loss"] == 0.0  # the LoRA starts at zero: θ's prediction is the base model's
    assert second["kl_loss"] > 0 and math.isfinite(second["loss"])
    assert second["loss"] == pytest.approx(second["policy_loss"] + 0.5 * second["kl_loss"], rel=1e-5, abs=1e-9)
    assert all(not m.disable_adapters for m in tr.transformer.modules() if hasattr(m, "disable_adapters")
               and isinstance(m.disable_adapters, bool))


# ---------------------------------------------------------------- config fields as flags and YAML
NEW_FIELDS = {"filter_low_variance": True, "low_variance_threshold": 0.01, "advantage_std": "global",
              "ema_decay": 0.9, "ema_start_step": 5, "eval_every": 10, "eval_split": "test"}


def test_new_fields_are_flags_and_yaml_keys(tmp_path):
    from rcgrpo.cli.train import parse_train_args

    flags = ["--filter-low-variance", "--low-variance-threshold", "0.01", "--advantage-std", "global", "--ema-decay",
             "0.9", "--ema-start-step", "5", "--eval-every", "10", "--eval-split", "test"]
    _, from_flags = parse_train_args(["--preset", "minibench", *flags])
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("filter_low_variance: true\nlow_variance_threshold: 1e-2\nadvantage_std: global\n"
                         "ema_decay: 0.9\nema_start_step: 5\neval_every: 10\neval_split: test\n")
    _, from_yaml = parse_train_args(["--preset", "minibench", "--config", str(yaml_file)])
    for name, value in NEW_FIELDS.items():
        assert getattr(from_flags, name) == value == getattr(from_yaml, name), name
    defaults = RCGRPOConfig()
    assert (defaults.filter_low_variance, defaults.advantage_std, defaults.ema_decay, defaults.eval_every,
            defaults.eval_split, defaults.low_variance_threshold) == (False, "group", 0.0, 0, "val", 0.005)
    docs = RCGRPOConfig.field_docs()
    assert all(docs[name] for name in NEW_FIELDS)


@pytest.mark.parametrize("changes, message", [
    (dict(ema_decay=1.0), "ema_decay"), (dict(ema_decay=-0.1), "ema_decay"), (dict(ema_start_step=-1), "ema_start_step"),
    (dict(low_variance_threshold=-1.0), "low_variance_threshold"), (dict(low_variance_threshold=float("nan")),
                                                                    "low_variance_threshold"),
    (dict(eval_every=-2), "eval_every"), (dict(advantage_std="batch"), "advantage_std"),
    (dict(advantage_std="global", advantage="quasi_norm"), "advantage_std"), (dict(eval_split="heldout"), "eval_split"),
])
def test_bad_values_of_the_new_fields(changes, message):
    with pytest.raises(ValueError, match=f"config {message}"):
        RCGRPOConfig(**changes)


def test_bad_new_flag_is_one_line_exit_2(tmp_path, capsys):
    assert cli_main(["train", "--preset", "tiny", "--ema-decay", "1.5", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ema-decay" in err[0]


def test_minibench_eval_split_picks_the_evaluation_examples():
    from rcgrpo.train.data import build_datasets

    _, val = build_datasets(preset("minibench", eval_size=3))
    _, test = build_datasets(preset("minibench", eval_size=3, eval_split="test"))
    assert val.split == "val" and test.split == "test" and not set(val.seeds) & set(test.seeds)
