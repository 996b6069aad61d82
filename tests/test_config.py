"""The run config: overrides are parsed as YAML and coerced to the field's type; a bad
key or value fails with the key's name; so do a missing file and an unknown model name,
checked by launch/train.py before DeepSpeed is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dissect_dist.config import (
    ConfigError,
    apply_overrides,
    build_config,
    load_config,
    validate_environment,
)

REPO = Path(__file__).resolve().parents[1]
BASE = {"data": {"train_manifest": "m.json"}}


def _cfg(*overrides: str):
    return build_config(apply_overrides(BASE, list(overrides)))


def test_overrides_are_coerced_to_the_fields_types():
    c = _cfg("optim.lr=5e-4", "optim.fused=false", "train.epochs=3.0", "model.name=123")
    assert c.optim.lr == 5e-4 and c.optim.fused is False and c.train.epochs == 3
    assert c.model.name == "123" and c.optim.fused is False
    assert _cfg().optim.fused is True


@pytest.mark.parametrize("override, message", [
    ("selection.ratio=1.5", "selection.ratio: 1.5: need 0 < r <= 1"),
    ("optim.fused=maybe", "optim.fused: 'maybe' is not true or false"),
    ("train.epochs=two", "train.epochs: 'two' is not an integer"),
    ("optim.lr=fast", "optim.lr: 'fast' is not a number"),
    ("optim.lrate=1", "optim.lrate: unknown key"),
    ("selection.scope=regional", "selection.scope: 'regional', choose one of"),
    ("model.mha_fastpath=fast", "model.mha_fastpath: 'fast', choose one of"),
    ("data.decode=gpu", "data.decode: 'gpu', choose one of"),
    ("ratio=0.5", "write section.key=value"),
    ("train.log_every=0", "train.log_every: 0: need >= 1"),
    ("train.log_every=-3", "train.log_every: -3: need >= 1"),
    ("data.shuffle_window=0", "data.shuffle_window: 0: need >= 1"),
    ("data.shuffle_window=-1", "data.shuffle_window: -1: need >= 1"),
    ("train.eval_every=-2", "train.eval_every: steps >= 1, 0 (end only) or -1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every: need >= 0"),
    ("train.profile_at=1", "train.profile_at: 1: 0 (off) or a step >= 2"),
    ("train.profile_steps=0", "train.profile_steps: 0: need >= 1"),
    ("train.collective_timeout_s=1", "train.collective_timeout_s: 1.0: need >= 5"),
    ("selection.score_resolution=-7", "selection.score_resolution: -7: pixels a side"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(override)


# ------------------------------------------------------------ files and the model name
def _data(root: Path) -> list[str]:
    """A fashion-mnist-shaped data dir (empty files: only their presence is checked)
    plus a retrieval manifest; overrides naming each of them."""
    for rel in ("train/manifest.json", "train/noise_ledger.npy", "classes.json",
                "test/manifest.json", "heldout/manifest.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    return [f"data.train_manifest={root}/train/manifest.json",
            f"data.noise_ledger={root}/train/noise_ledger.npy", f"data.zeroshot_dir={root}",
            f"data.retrieval_manifest={root}/heldout/manifest.json"]


# (override, or a file to delete; the key the error names; a phrase of the message)
ENV_ERRORS = [
    ("data.train_manifest={root}/nope.json", "data.train_manifest", "nope.json: no such file"),
    ("data.noise_ledger={root}/nope.npy", "data.noise_ledger", "nope.npy: no such file"),
    ("rm classes.json", "data.zeroshot_dir", "has no classes.json"),
    ("rm test/manifest.json", "data.zeroshot_dir", "has no test/manifest.json"),
    ("data.zeroshot_dir={root}/nope", "data.zeroshot_dir", "nope: no such directory"),
    ("data.retrieval_manifest={root}/nope.json", "data.retrieval_manifest",
     "nope.json: no such file"),
    ("model.name=tiny-vit-82", "model.name", "close matches: tiny-vit-32, tiny-vit-28"),
    ("selection.score_resolution=20", "selection.score_resolution",
     "use a multiple of 7 below 28: [7, 14, 21]"),
]


def _break(root: Path, change: str) -> list[str]:
    """The overrides of a complete data dir with `change` applied."""
    overrides = _data(root)
    if change.startswith("rm "):
        (root / change[3:]).unlink()
        return overrides
    return [*overrides, change.format(root=root)]


def test_decoding_on_the_device_refuses_exact_resampling():
    assert _cfg("data.decode=device").data.decode == "device"
    with pytest.raises(ConfigError, match="data.decode: device resizes on the device .* "
                                          "data.resampling=exact .* needs data.decode=workers"):
        _cfg("data.decode=device", "data.resampling=exact")


def test_a_complete_environment_passes(tmp_path):
    validate_environment(_cfg(*_data(tmp_path)))
    validate_environment(_cfg(f"data.train_manifest=file://{tmp_path}/train/manifest.json",
                              "data.noise_ledger=null", "data.zeroshot_dir=null"))


def test_remote_urls_are_left_to_the_reader(tmp_path):
    validate_environment(_cfg(*_data(tmp_path),
                              "data.retrieval_manifest=s3://bucket/heldout/manifest.json"))


@pytest.mark.parametrize("change, key, phrase", ENV_ERRORS)
def test_missing_files_and_unknown_models_name_the_key(tmp_path, change, key, phrase):
    cfg = _cfg(*_break(tmp_path, change))  # the values alone are fine: no file is read
    with pytest.raises(ConfigError, match=f"^{key}: ") as e:
        validate_environment(cfg)
    assert phrase in str(e.value)


def test_create_refuses_the_names_the_config_refuses():
    from dissect_dist.model import create

    with pytest.raises(ValueError, match="close matches: ViT-B-32"):
        create("vit-b-32")


# ------------------------------------------------------------ through launch/train.py
# Runs launch/train.py as __main__ and reports on stderr, whatever the exit, whether
# DeepSpeed was imported and a process group exists.
_PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    dist = sys.modules.get("torch.distributed")
    print("probe:", "deepspeed" in sys.modules,
          bool(dist is not None and dist.is_available() and dist.is_initialized()),
          file=sys.stderr)
"""


@pytest.mark.parametrize("change, key, phrase", [
    ("train.log_every=0", "train.log_every", "0: need >= 1"),
    ("data.shuffle_window=0", "data.shuffle_window", "0: need >= 1"),
    *ENV_ERRORS,
])
def test_launch_fails_with_one_line_before_deepspeed(tmp_path, change, key, phrase):
    args = ["--config", str(REPO / "launch" / "configs" / "tiny-cpu.yaml"),
            *_break(tmp_path, change)]
    r = subprocess.run([sys.executable, "-c", _PROBE, str(REPO / "launch" / "train.py"), *args],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert lines[-1] == "probe: False False", r.stderr[-3000:]  # no deepspeed, no group
    assert len(lines) == 2 and lines[0].startswith(f"config error: {key}: "), r.stderr
    assert phrase in lines[0]


# The reference run, from github MediaBrain-SJTU/DISSect: train_cc3m.sh's flags and, where
# it sets none, src/params.py's defaults (get_default_params gives RN models beta2 0.999,
# eps 1e-8; --wd 0.1; --precision amp).
REFERENCE_RN50_CC3M = {
    ("model", "name"): "RN50", ("data", "batch_size"): 1280,
    ("selection", "strategy"): "dissect_warmup",  # --select-strategy warmup_base_sampling
    ("selection", "warmup_epochs"): 10, ("selection", "warmup_train"): "random",
    ("selection", "ratio"): 0.2, ("selection", "scope"): "local",
    ("selection", "score_mode"): "reference",
    ("optim", "lr"): 2e-3, ("optim", "weight_decay"): 0.1, ("optim", "beta1"): 0.9,
    ("optim", "beta2"): 0.999, ("optim", "eps"): 1e-8, ("optim", "warmup_steps"): 10000,
    ("optim", "schedule"): "cosine", ("train", "epochs"): 40,
}


def test_shipped_reference_config_matches_the_reference_run():
    cfg = load_config(str(REPO / "launch" / "configs" / "rn50-cc3m.yaml"), [])
    got = {k: getattr(getattr(cfg, k[0]), k[1]) for k in REFERENCE_RN50_CC3M}
    assert got == REFERENCE_RN50_CC3M
    # amp: fp32 weights with an autocast forward (bf16 here, fp16 + a scaler there)
    assert cfg.model.precision == "amp_bf16"
    assert cfg.deepspeed_config()["bf16"]["enabled"] is False


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "launch" / "configs").glob(
    "*.yaml")))
def test_every_shipped_config_is_valid(name):
    load_config(str(REPO / "launch" / "configs" / name), [])


def test_the_configuration_reference_is_generated_from_the_code():
    """docs/configuration.md is what python -m dissect_dist.config_doc prints, and every
    key has the comment that becomes its description."""
    from pathlib import Path

    from dissect_dist import config_doc

    assert config_doc.undocumented() == [], "add a comment beside these keys in config.py"
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == config_doc.reference(), (
        "docs/configuration.md is stale: python -m dissect_dist.config_doc > "
        "docs/configuration.md")
    assert "| `optim.grad_clip` | `float` | `1.0` |" in doc.read_text()
