"""README.md's "Train on your shards" and "Monitoring" run as written, so that they cannot
rot: every line of the README's bash blocks and its Python block is run here, in the order
a user would, in a scratch directory that holds what the commands name (100 local shards,
a folder of images with caps.csv, an S3 bucket on a local S3 server) and `launch/` of this
checkout. The only substitutions are the machine's: `--num_gpus 8` becomes 2 CPU ranks,
port 29500 a free port, the shipped config's model and sizes a tiny model's (the config
is the user's file to edit, as the README says), and open_clip's ViT-B-32 that model.
A bash line of the README that this test does not run fails it."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import procs
from tests.rank_pool import free_port

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)
TINY = "tiny-vit-28"
# Not run here: `make test` is the suite itself (CI runs it on a fresh clone); `make demo`
# takes ~8 min of three trainer launches, each the code path tests/test_trainer.py runs.
NOT_HERE = {"make demo", "make test"}


def readme_bash_lines() -> list[str]:
    """Every command line of the README's bash blocks, comments removed, in order."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def readme_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def _on_cpu(line: str, port: int) -> str:
    return line.replace("--num_gpus 8", f"--num_gpus 2 --master_port {port}") \
        .replace("--master_port 29500", f"--master_port {port}")


def _scratch(w: Path) -> None:
    """What the README's commands name, in a directory of their own."""
    from PIL import Image

    from tests.datagen import make_dataset

    shards = make_dataset(w / "data" / "src", [2] * 100)
    (w / "data" / "shards").mkdir()
    for i, url in enumerate(shards.urls):  # data/shards/00000..00099.tar
        os.replace(url.removeprefix("file://"), w / "data" / "shards" / f"{i:05d}.tar")
    (w / "DIR").mkdir()
    Image.new("RGB", (8, 8), "red").save(w / "DIR" / "a.png")
    (w / "caps.csv").write_text("filepath,title\na.png,a red square\n")
    (w / "launch").symlink_to(REPO / "launch")


@pytest.fixture
def s3_env(tmp_path: Path):
    """A local S3 server (127.0.0.1) whose bucket holds img2dataset's per-shard stats for
    the README's S3 line, and the environment that points s3fs at it."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="bucket")
    for i in range(100):
        s3.put_object(Bucket="bucket", Key=f"shards/{i:05d}_stats.json",
                      Body=json.dumps({"successes": 7 + i % 3}).encode())
    yield env
    server.stop()


def test_the_readme_runs_as_written(tmp_path: Path, s3_env: dict[str, str]) -> None:
    w = tmp_path / "w"
    _scratch(w)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    ran: set[str] = set()  # the README lines run, as the README writes them

    def bash(line: str, cwd: Path = w, extra: dict[str, str] | None = None,
             timeout: int = 300) -> tuple[int, str]:
        """Run README line(s) `line` through bash, on CPU."""
        rc, out = procs.run(["bash", "-euo", "pipefail", "-c", _on_cpu(line, free_port())],
                            timeout, env={**env, **(extra or {})}, cwd=cwd)
        ran.update(line.splitlines())
        return rc, out

    def ok(line: str, **kw) -> str:  # type: ignore[no-untyped-def]
        rc, out = bash(line, **kw)
        assert rc == 0, (line, out[-4000:])
        return out

    lines = readme_bash_lines()
    by_start = {start: [x for x in lines if x.startswith(start)] for start in (
        "python -m dissect_dist.data manifest 'data/", "python -m dissect_dist.data manifest 's3:",
        "python -m dissect_dist.data folder", "cp launch/configs/", "deepspeed --num_gpus 8",
        "deepspeed --hostfile", "RUN=", "python -m store export", "python -m dissect_dist report")}
    assert all(len(v) >= 1 for v in by_start.values()), by_start
    one = {k: v[0] for k, v in by_start.items()}

    # 1. a manifest of local shards, of shards on S3 (from img2dataset's stats), of a folder
    ok(one["python -m dissect_dist.data manifest 'data/"])
    man = json.loads((w / "data" / "manifest.json").read_text())
    assert man["total"] == 200 and len(man["shards"]) == 100
    ok(one["python -m dissect_dist.data manifest 's3:"], extra=s3_env)
    s3_man = json.loads((w / "manifest.json").read_text())
    assert [s["samples"] for s in s3_man["shards"]] == [7 + i % 3 for i in range(100)]
    assert s3_man["shards"][99]["url"] == "s3://bucket/shards/00099.tar"
    ok(one["python -m dissect_dist.data folder"])
    assert json.loads((w / "data" / "mine" / "manifest.json").read_text())["total"] == 1

    # 2. a config from a shipped one; the user sets the manifest (and, on CPU, the size)
    cp = one["cp launch/configs/"]
    ok(cp)
    cfg = yaml.safe_load((w / "my-run.yaml").read_text())
    run_dir = cfg["train"]["run_dir"]
    cfg["data"].update(train_manifest="data/manifest.json", batch_size=8, workers=0)
    cfg["model"]["name"] = TINY
    cfg["optim"]["warmup_steps"] = 2
    cfg["train"].update(epochs=1, checkpoint_every=4, eval_every=0, log_every=1)
    (w / "my-run.yaml").write_text(yaml.safe_dump(cfg))

    # 3. one node: crashes (SIGKILL) after its first checkpoint ...
    single = one["deepspeed --num_gpus 8"]
    p = procs.start(["bash", "-c", _on_cpu(single, free_port())], env=env, cwd=w)
    ran.add(single)
    first = w / run_dir / "checkpoints" / "step-000000004" / "COMPLETE"
    deadline = time.time() + 300
    while not first.exists():
        assert p.proc.poll() is None, p.output()[-4000:]
        assert time.time() < deadline, "no checkpoint at step 4 within 300 s"
        time.sleep(0.05)
    p.kill()
    # ... and the same line again is refused rather than starting the run over
    rc, out = bash(single)
    assert rc == 2 and "already holds a run (latest checkpoint step-000000004)" in out, out[-3000:]
    assert "--resume latest" in out

    # several nodes: one launcher per node (two on this host, each with its node rank),
    # in a directory of their own, from scratch
    multi = one["deepspeed --hostfile"]
    w2 = tmp_path / "w2"
    w2.mkdir()
    for name in ("launch", "data", "my-run.yaml"):
        (w2 / name).symlink_to(w / name)
    (w2 / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = free_port()
    nodes = [procs.start(["bash", "-c", _on_cpu(multi, port)], cwd=w2, env={
        **env, "NODE_RANK": str(i), "MASTER": "127.0.0.1"}) for i in (0, 1)]
    ran.add(multi)
    done = [procs.finish(n, 400) for n in nodes]
    assert [rc for rc, _ in done] == [0, 0], "\n".join(o[-3000:] for _, o in done)
    last = w2 / run_dir / "checkpoints" / "step-000000012"
    assert json.loads((last / "run.json").read_text())["world_size"] == 2
    assert (last / "rank-00001.pt").exists()

    # resume the crashed run: it goes on from step 4 to the end of its epoch (12 steps)
    out = ok(_resume_line(lines))
    assert "resumed from step-000000004" in out
    steps = [json.loads(x)["step"] for x in (w / run_dir / "metrics.jsonl").read_text()
             .splitlines() if json.loads(x)["kind"] == "train"]
    assert steps[-1] == 12 and set(range(5, 13)) <= set(steps)

    # 4. the model in open_clip, and the scores exported
    from dissect_dist import model as modellib

    modellib.create(TINY, None)  # registers the project's tiny configs with open_clip
    code = readme_python_block().replace('"ViT-B-32"', repr(TINY)) \
        .replace("runs/vitb32-cc12m", str(w / run_dir))
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert sum(p.numel() for p in scope["model"].parameters()) > 0  # type: ignore[attr-defined]
    ok("\n".join([one["RUN="], one["python -m store export"]]))
    assert any((w / "kept").iterdir())

    # Monitoring: the run report
    ok(one["python -m dissect_dist report"])
    assert (w / run_dir / "report.png").stat().st_size > 10_000

    missed = [x for x in lines if x not in ran and x not in NOT_HERE]
    assert not missed, f"README lines this test does not run: {missed}"


def _resume_line(lines: list[str]) -> str:
    got = [x for x in lines if x.startswith("deepspeed --num_gpus 8") and "--resume latest" in x]
    assert len(got) == 1, got
    return got[0]
