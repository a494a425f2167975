"""Config faults of issue 13 (item 2): a misspelt JSON key is refused with "did you mean", the
other undeclared keys are kept and reach the run's ``log/log.txt`` as a WARNING, a required key
that is missing or null stops the real script with one message naming it and the config file,
and no key of a released config is taken for a typo.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from helpers_train import ROOT, write_config

import pretrain
import train_tvc
import train_vcmr
import train_videoQA
import train_violin
import train_vr
from config.config import (
    UPSTREAM_INERT_KEYS,
    ConfigError,
    SharedConfigs,
    check_required_keys,
    config_origin,
    config_warnings,
)

# released/demo script configs -> the script that reads them (hero_*.json are model configs)
SCRIPT_OF = {"pretrain": pretrain, "train-tvr": train_vcmr, "train-didemo": train_vcmr,
             "train-msrvtt": train_vr, "train-tvqa": train_videoQA,
             "train-violin": train_violin, "train-tvc": train_tvc}
DEMO_OF = {pretrain: "pretrain-demo.json", train_vcmr: "train-tvr-demo.json",
           train_vr: "train-msrvtt_video_sub-demo.json", train_videoQA: "train-tvqa-demo.json",
           train_violin: "train-violin-demo.json", train_tvc: "train-tvc-demo.json"}
SCRIPT_CONFIGS = sorted(p.name for p in (ROOT / "config").glob("*.json")
                        if not p.name.startswith("hero_"))


def script_for(name: str):
    prefix = next((p for p in SCRIPT_OF if name.startswith(p)), None)
    assert prefix, f"config/{name}: no script known for it; add it to SCRIPT_OF"
    return SCRIPT_OF[prefix]


def write(tmp_path, cfg: dict, name: str = "c.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.parametrize("key, meant", [("learnig_rate", "learning_rate"),
                                        ("Learning_Rate", "learning_rate"),
                                        ("num_train_step", "num_train_steps"),
                                        ("tsak", "task"), ("vfeat_dbs", "vfeat_db")])
def test_misspelt_key_is_refused_with_the_option_meant(tmp_path, key, meant):
    cfg = write(tmp_path, {key: 1e-3})
    with pytest.raises(ConfigError) as err:
        SharedConfigs().get_vcmr_args(["--config", cfg])
    assert str(err.value).startswith(f"{cfg}: key '{key}' is not an option of this script; "
                                     f"did you mean '{meant}'?")


def test_far_undeclared_keys_are_kept_and_warned(tmp_path):
    cfg = write(tmp_path, {"my_note": "x", "rank": 0, "learning_rate": 1e-3})
    opts = SharedConfigs().get_violin_args(["--config", cfg])
    assert opts.my_note == "x" and opts.rank == 0 and opts.learning_rate == 1e-3
    [warning] = config_warnings(opts)
    assert warning.startswith(f"{cfg}: key(s) not declared by this script") and \
        "my_note, rank" in warning
    assert "_origin" not in vars(opts) and config_origin(opts).path == cfg
    pre = SharedConfigs().get_pretrain_args(["--config", str(ROOT / "config/pretrain-demo.json")])
    assert config_warnings(pre) == []  # 'targets' is read by pretrain.py: no warning


@pytest.mark.parametrize("name", SCRIPT_CONFIGS)
def test_no_released_key_is_taken_for_a_typo(name):
    opts = script_for(name).parse_args(["--config", str(ROOT / "config" / name)])
    assert set(config_origin(opts).undeclared) <= set(UPSTREAM_INERT_KEYS), name


@pytest.mark.parametrize("script", list(DEMO_OF))
def test_other_scripts_options_are_not_typos(tmp_path, script):
    """A config copied from another task keeps its foreign options (warned), never refused."""
    own = vars(script.parse_args(["--config", str(ROOT / "config" / DEMO_OF[script])]))
    foreign = set()
    for other, demo in DEMO_OF.items():
        foreign |= set(vars(other.parse_args(["--config", str(ROOT / "config" / demo)])))
    cfg = json.loads((ROOT / "config" / DEMO_OF[script]).read_text())
    cfg.update({key: None for key in foreign - set(own)})
    opts = script.parse_args(["--config", write(tmp_path, cfg)])
    assert set(config_origin(opts).undeclared) == foreign - set(own)


def test_flags_must_be_spelt_in_full(tmp_path, capsys):
    cfg = write(tmp_path, {"learning_rate": 1e-3})
    with pytest.raises(SystemExit) as err:
        SharedConfigs().get_vcmr_args(["--config", cfg, "--learning", "1"])
    assert err.value.code == 2
    assert "--learning: did you mean --learning_rate?" in capsys.readouterr().err
    opts = SharedConfigs().get_vcmr_args(["--config", cfg, "--learning_rate=1"])
    assert opts.learning_rate == 1.0


def test_missing_required_key_stops_the_real_script(tmp_path, toy_dbs):
    cfg = json.loads(write_config(tmp_path, "train-tvr-demo.json", toy_dbs).read_text())
    del cfg["vfeat_db"]
    path = write(tmp_path, cfg, "no_vfeat.json")
    proc = subprocess.run([sys.executable, "train_vcmr.py", "--config", path, "--output_dir",
                           str(tmp_path / "run")], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"{path}: required key 'vfeat_db' is missing; set it in {path} or pass "
                     "--vfeat_db VALUE"], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_null_or_missing_required_keys_are_named(tmp_path, toy_dbs):
    cfg = write_config(tmp_path, "train-tvqa-demo.json", toy_dbs, val_query_txt_db=None,
                       model_config=None)
    with pytest.raises(ConfigError, match=f"^{cfg}: required keys not set \\(null: "
                       f"'model_config', 'val_query_txt_db'\\); set them in {cfg} or pass "
                       "--model_config VALUE --val_query_txt_db VALUE$"):
        train_videoQA.main(["--config", str(cfg), "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match="^no --config given: required keys not set "
                       "\\(missing: 'model_config', 'sub_txt_db', "):
        train_videoQA.main(["--output_dir", str(tmp_path / "run")])
    only_targets = write(tmp_path, {"targets": [{"name": "tv"}]}, "p.json")
    with pytest.raises(ConfigError, match="required keys not set \\(missing: 'model_config', "
                       "'txt_db', 'img_db'\\)"):
        pretrain.main(["--config", only_targets, "--output_dir", str(tmp_path / "run")])
    no_targets = write(tmp_path, {"txt_db": "t"}, "q.json")
    with pytest.raises(ConfigError, match=f"^{no_targets}: required key 'targets' is missing; "
                       f"set it in {no_targets}$"):  # JSON only: no flag to suggest
        pretrain.parse_args(["--config", no_targets])
    assert not (tmp_path / "run").exists()


def test_missing_path_names_the_config_key(tmp_path, toy_dbs):
    cfg = write_config(tmp_path, "train-didemo_video_only-demo.json", toy_dbs,
                       vfeat_db=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=f"--vfeat_db {tmp_path / 'nowhere'} \\(from key "
                       f"'vfeat_db' of {cfg}\\); correct them"):
        train_vcmr.main(["--config", str(cfg), "--output_dir", str(tmp_path / "run")])


def test_kept_key_is_a_warning_in_the_run_log(tmp_path):
    """A real (toy) training process: the warning reaches the console and log/log.txt, and
    hps.json keeps the key (upstream) but not the config bookkeeping."""
    cfg = write(tmp_path, {"my_note": "x", "num_train_steps": 1, "valid_steps": 1,
                           "save_steps": 1, "n_workers": 0, "train_batch_size": 2,
                           "gradient_accumulation_steps": 1})
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "tests/test_engine.py", "--config", cfg,
                           "--output_dir", str(out)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = f"WARNING - utils.engine -   {cfg}: key(s) not declared by this script, kept " \
               "but not read by it: my_note;"
    assert expected in proc.stderr
    assert expected in (out / "log" / "log.txt").read_text()
    hps = json.loads((out / "log" / "hps.json").read_text())
    assert hps["my_note"] == "x" and "_origin" not in hps and "config" not in hps


def test_unparsed_options_have_an_empty_origin():
    """Options built by hand (tests, tools) still get messages, just without a file."""
    opts = argparse.Namespace(output_dir=None)
    assert config_origin(opts).path is None and config_warnings(opts) == []
    with pytest.raises(ConfigError, match="^no --config given: required key 'output_dir' is "
                       "missing; pass a --config JSON file that sets it$"):
        check_required_keys(opts, ("output_dir",))
