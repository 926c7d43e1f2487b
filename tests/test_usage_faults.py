"""A careless or unlucky user (issue 22, items 4-7 and 10): every mistake stops with one line that
names the key or the file and the fix, a non-zero exit and no traceback, and nothing is lost:
the input model stays byte-identical and no staging folder is left beside the output.

In-process calls of ``ppllm.convert.main`` (convert_model.py), ``ppllm.train.main`` (the dry run
and the launch's own check) and ``ppllm.chat.main``; subprocesses only where a signal has to
arrive mid-conversion. No DeepSpeed launch."""
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ppllm import convert as cm
from ppllm import paths
from ppllm.tiny import make_llama
from tests.helpers import PY, REPO

pytestmark = pytest.mark.timeout(180)


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny HF llama (safetensors, max_position_embeddings 128) and its pipeline folder."""
    root = tmp_path_factory.mktemp("usage")
    make_llama(str(root / "hf"), 64, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
               max_position_embeddings=128)
    cm.hg_to_pp(str(root / "hf"), str(root / "pp"), quiet=True)
    return root / "hf", root / "pp"


def snapshot(folder) -> dict:
    """{relative path: sha256} of every file under folder (the input must stay byte-identical)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def staging_left(parent) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(paths.STAGING_PREFIX)]


def convert(*argv):
    """convert_model.py (ppllm.convert.main) in this process: (exit code, stderr lines)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cm.main([str(a) for a in argv] + ["--quiet"])
    return rc, [line for line in err.getvalue().splitlines() if line.strip()]


def one_error(rc, lines, mode, *needles):
    """Exit 2, exactly one line, `convert_model.py MODE: error: ...` holding every needle."""
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"convert_model.py {mode}: error: "), lines
    assert "Traceback" not in lines[0]
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# item 4 and 10, and item 7's config part: the dry run and the launch's own check refuse


def write_config(root, model, name="c", text=None, **extra):
    data = root / "d.jsonl"
    data.write_text('{"type": "pretrain", "text": "hello"}\n')
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(model), "save_path": str(root / f"run_{name}"), "data_path": str(data),
           "max_seq_len": 64, "max_steps": 4, "train_micro_batch_size_per_gpu": 1,
           "gradient_accumulation_steps": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1.0e-3}}}
    cfg.update(extra)
    path = root / f"{name}.yml"
    if text is None:
        path.write_text(yaml.safe_dump(cfg))
    else:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def train_main(config, sets, dry):
    from ppllm.train import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(str(config), list(sets), dry=dry)
    return rc, [line for line in out.getvalue().splitlines() if line.strip()]


def refused(config, sets, *needles):
    """The dry run and the launch (no launcher here: its config check comes first) both stop with
    the same single `error:` line naming every needle; no save_path is created."""
    lines_seen = []
    for dry in (True, False):
        rc, lines = train_main(config, sets, dry)
        assert rc == 2, lines
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert "Traceback" not in lines[0]
        for n in needles:
            assert n in lines[0], (n, lines[0])
        lines_seen.append(lines[0])
    assert lines_seen[0] == lines_seen[1]
    return lines_seen[0]


LAUNCH_ROWS = [  # (--set, what the line must say: the key and the fix)
    ("zero_optimization.stage=2", ["zero_optimization.stage: 2 is not supported with pipeline", "use stage: 1"]),
    ("zero_optimization.stage=3", ["zero_optimization.stage: 3 is not supported with pipeline", "use stage: 1"]),
    ("zero_optimization.stage=one", ["zero_optimization.stage: must be the whole number 0 or 1 (got 'one')"]),
    ("optimizer.params.lr=0", ["optimizer.params.lr: 0 is not a positive learning rate", "finite number > 0"]),
    ("optimizer.params.lr=-1e-4", ["optimizer.params.lr: -0.0001 is not a positive learning rate"]),
    ("optimizer.params.lr=.nan", ["optimizer.params.lr: nan is not a positive"]),
    ("optimizer.params.lr=nan", ["optimizer.params.lr: nan is not a positive"]),
    ("optimizer.params.lr=.inf", ["optimizer.params.lr: inf is not a positive"]),
    ("seed=18446744073709551617", ["seed: must be a whole number from 0 to 2**32 - 1"]),
    ("seed=4294967296", ["seed: must be a whole number from 0 to 2**32 - 1"]),
    ("seed=-1", ["seed: must be a whole number from 0 to 2**32 - 1", "(got -1)"]),
    ("max_seq_len=256", ["max_seq_len: 256 is above the model's max_position_embeddings 128",
                         "use max_seq_len <= 128"]),
    ("eval_interval=5", ["eval_interval: 5 but there is no eval_data_path", "set eval_data_path or remove"]),
    ("gradient_clipping=-1", ["gradient_clipping: -1 must be a finite number >= 0"]),
    ("gradient_clipping=.inf", ["gradient_clipping: inf must be a finite number >= 0"]),
    ("data_weights=[.nan]", ["data_weights: entry 1 is nan", "finite number >= 0"]),
    # item 7, config part: a malformed --set expression
    ("max_steps=[1,", ["--set 'max_steps=[1,': the value is not valid YAML", "quote it"]),
    ("=3", ["--set '=3': '' is not a key", "KEY=VALUE"]),
    ("max_steps.x=1", ["--set 'max_steps.x=1': max_steps is 4, not a mapping"]),
]


@pytest.mark.parametrize("override,needles", LAUNCH_ROWS, ids=[r[0] for r in LAUNCH_ROWS])
def test_dry_run_and_launch_refuse_what_the_launch_cannot_run(models, tmp_path, override, needles):
    _, pp = models
    config = write_config(tmp_path, pp)
    refused(config, [override], *needles)
    assert not os.path.exists(tmp_path / "run_c")


def test_train_pp_dry_run_door_prints_one_line(models, tmp_path):
    """The script itself (its own process): exit 2, one line, no traceback."""
    _, pp = models
    config = write_config(tmp_path, pp)
    p = subprocess.run([PY, "train_pp.py", "--config", str(config), "--dry-run", "--set", "zero_optimization.stage=3"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})  # as make test (else DeepSpeed logs its guess)
    out = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stdout + p.stderr
    assert out == [f"error: {config}: zero_optimization.stage: 3 is not supported with pipeline parallelism "
                   f"(DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only); use stage: 1"], out


def test_the_same_configs_pass_with_good_values(models, tmp_path):
    """The rows above fail for their value alone: the same keys with good values load."""
    from ppllm.config import load_config
    _, pp = models
    cfg = load_config(str(write_config(tmp_path, pp)),
                      ["zero_optimization.stage=1", "optimizer.params.lr=3e-4", f"seed={2 ** 32 - 1}",
                       "max_seq_len=128", "gradient_clipping=1.0", "data_weights=[0.5]"])
    assert cfg.ds["zero_optimization"]["stage"] == 1 and cfg.run.seed == 2 ** 32 - 1


def test_a_yaml_key_given_twice_names_both_lines(models, tmp_path):
    _, pp = models
    good = write_config(tmp_path, pp, name="good").read_text()
    config = write_config(tmp_path, pp, name="dup", text=good + "max_steps: 9\n")
    first = 1 + good.splitlines().index("max_steps: 4")
    last = len(good.splitlines()) + 1
    line = refused(config, [], f"key 'max_steps' is given twice, at {config}:{first} and {config}:{last}",
                   "keep one")
    assert line.startswith(f"error: {config}: ")


def test_a_config_that_is_not_utf8(models, tmp_path):
    _, pp = models
    good = write_config(tmp_path, pp, name="good").read_text().encode()
    config = write_config(tmp_path, pp, name="latin1", text=good + b"# caf\xe9\n")
    line = good.count(b"\n") + 1
    refused(config, [], f"{config}: not UTF-8 text: byte 0xe9 at line {line}",
            "save the file as UTF-8")


def test_a_file_as_model_path_and_a_folder_as_data_path_say_what_they_are(models, tmp_path):
    hf, pp = models
    config = write_config(tmp_path, pp)
    refused(config, [f"model_path={pp / 'config.json'}"], "model_path:", "is a file, not a folder")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"type": "pretrain", "text": "hi"}\n')
    line = refused(config, [f"data_path={folder}"], "data_path:", "a folder, and not one written by datasets",
                   os.path.join(str(folder), "*.jsonl"))
    assert "does not exist" not in line


# ---------------------------------------------------------------------------------------------
# item 7, converter part: damaged inputs


def _st_header(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return b, n, json.loads(b[8:8 + n])


def damage_truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def damage_header_length(path):
    b = bytearray(open(path, "rb").read())
    b[:8] = struct.pack("<Q", 2 ** 40)
    open(path, "wb").write(b)


def damage_offsets(path):
    b, n, h = _st_header(path)
    key = next(k for k in h if k != "__metadata__")
    h[key]["data_offsets"] = [o + 10 ** 9 for o in h[key]["data_offsets"]]
    blob = json.dumps(h).encode()
    blob += b" " * (-len(blob) % 8)
    open(path, "wb").write(struct.pack("<Q", len(blob)) + blob + b[8 + n:])


def damage_header_json(path):
    b = bytearray(open(path, "rb").read())
    b[8:16] = b"{{{{{{{{"
    open(path, "wb").write(b)


HF_DAMAGE = [  # (what, how, the file it names, what the line says)
    ("truncated shard", damage_truncate, "model.safetensors", "(truncated?)"),
    ("header length 2**40", damage_header_length, "model.safetensors", "its header length is 1099511627776 bytes"),
    ("offsets past the end", damage_offsets, "model.safetensors", "but the file has"),
    ("invalid header", damage_header_json, "model.safetensors", "its header is not valid JSON"),
    ("invalid index", lambda p: open(os.path.join(os.path.dirname(p), "model.safetensors.index.json"), "w")
     .write('{"weight_map": '), "model.safetensors.index.json", "not valid JSON"),
    ("invalid config", lambda p: open(os.path.join(os.path.dirname(p), "config.json"), "w")
     .write('{"model_type": "llama",'), "config.json", "not valid JSON"),
    ("unusable config", lambda p: open(os.path.join(os.path.dirname(p), "config.json"), "w")
     .write('{"model_type": "llama", "num_hidden_layers": "two"}'), "config.json", "not a usable llama config"),
]


@pytest.mark.parametrize("what,damage,name,says", HF_DAMAGE, ids=[r[0] for r in HF_DAMAGE])
def test_hg_to_pp_damaged_input_is_one_line_naming_the_file(models, tmp_path, what, damage, name, says):
    hf, _ = models
    src = copy_model(hf, tmp_path / "hf")
    damage(str(src / "model.safetensors"))
    before = snapshot(src)
    rc, lines = convert("hg_to_pp", "--input-path", src, "--save-path", tmp_path / "pp")
    one_error(rc, lines, "hg_to_pp", os.path.join(str(src), name), says)
    assert snapshot(src) == before
    assert not os.path.exists(tmp_path / "pp") and not staging_left(tmp_path)


LAYER_DAMAGE = [
    ("truncated", lambda p: os.truncate(p, os.path.getsize(p) - 100), "not a torch file"),
    ("text", lambda p: open(p, "w").write("garbage\n"), "not a torch file"),
    ("a list", lambda p: torch.save([1, 2, 3], p), "holds a list, not a {name: tensor} state dict"),
    ("non-tensor values", lambda p: torch.save({"x": 1}, p), "holds a dict, not a {name: tensor} state dict"),
]


@pytest.mark.parametrize("what,damage,says", LAYER_DAMAGE, ids=[r[0] for r in LAYER_DAMAGE])
def test_pp_to_hg_truncated_or_foreign_layer_file(models, tmp_path, what, damage, says):
    _, pp = models
    src = copy_model(pp, tmp_path / "pp")
    layer = paths.layer_file(str(src), 1)
    damage(layer)
    before = snapshot(src)
    rc, lines = convert("pp_to_hg", "--input-path", src, "--save-path", tmp_path / "out")
    one_error(rc, lines, "pp_to_hg", layer, says, "convert the model again with hg_to_pp")
    assert snapshot(src) == before
    assert not os.path.exists(tmp_path / "out") and not staging_left(tmp_path)


def test_pp_to_hg_a_file_as_input_and_a_binary_latest(models, tmp_path):
    _, pp = models
    rc, lines = convert("pp_to_hg", "--input-path", pp / "config.json", "--save-path", tmp_path / "a")
    one_error(rc, lines, "pp_to_hg", f"{pp / 'config.json'} is a file, not a folder")
    save = tmp_path / "run"
    shutil.copytree(pp, save / "global_step3")
    (save / "latest").write_bytes(b"\xff\xfe\x00")
    before = snapshot(save)
    rc, lines = convert("pp_to_hg", "--input-path", save, "--save-path", tmp_path / "b")
    one_error(rc, lines, "pp_to_hg", f"{save / 'latest'} cannot be read as a tag name",
              "name the checkpoint with --tag (tags there: global_step3)")
    assert not os.path.exists(tmp_path / "b")
    assert convert("pp_to_hg", "--input-path", save, "--save-path", tmp_path / "b", "--tag", "global_step3")[0] == 0
    assert snapshot(save) == before and not staging_left(tmp_path)


def test_pp_to_hg_damaged_adapter_settings(models, tmp_path):
    _, pp = models
    src = copy_model(pp, tmp_path / "pp")
    (src / "ppllm_lora.json").write_text('{"lora": 3')
    before = snapshot(src)
    rc, lines = convert("pp_to_hg", "--input-path", src, "--save-path", tmp_path / "out")
    one_error(rc, lines, "pp_to_hg", f"{src / 'ppllm_lora.json'}: not valid JSON", "restore it from the training run")
    assert snapshot(src) == before and not os.path.exists(tmp_path / "out") and not staging_left(tmp_path)


@pytest.mark.parametrize("force", [False, True])
def test_save_path_that_is_a_file(models, tmp_path, force):
    hf, _ = models
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    rc, lines = convert("hg_to_pp", "--input-path", hf, "--save-path", target, *(["--force"] if force else []))
    one_error(rc, lines, "hg_to_pp", f"--save-path {target} is a file", "give a new folder name")
    assert target.read_text() == "keep me\n" and not staging_left(tmp_path)


@contextlib.contextmanager
def tmpfs(where, *options):
    """A small tmpfs mounted at where (root only); skips when this machine cannot mount one."""
    os.makedirs(where, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                       capture_output=True, text=True, timeout=30)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], timeout=30, check=True)


def test_read_only_target(models, tmp_path):
    _, pp = models
    before = snapshot(pp)
    if os.geteuid() != 0:  # permissions stop everyone but root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        ctx = contextlib.nullcontext(ro)
    else:  # root writes through permissions: a read-only file system stops it
        ctx = tmpfs(tmp_path / "ro", "ro", "size=1m")
    with ctx as ro:
        rc, lines = convert("pp_to_hg", "--input-path", pp, "--save-path", ro / "hf")
        one_error(rc, lines, "pp_to_hg", f"cannot write in {ro}", "choose a --save-path in a writable folder")
        assert os.listdir(ro) == []
    assert snapshot(pp) == before


def test_disk_full_on_a_small_tmpfs(models, tmp_path):
    _, pp = models
    before = snapshot(pp)
    with tmpfs(tmp_path / "small", "size=64k") as small:
        rc, lines = convert("pp_to_hg", "--input-path", pp, "--save-path", small / "hf")
        one_error(rc, lines, "pp_to_hg", os.path.join(str(small / "hf"), "model-00001-of-00001.safetensors"),
                  "no space left on device", "nothing was written")
        assert os.listdir(small) == []  # the partial output is gone, the disk is free again
    assert snapshot(pp) == before


def test_disk_full_while_copying_tensor_bytes(models, tmp_path, monkeypatch):
    """ENOSPC from the kernel copy and from plain writes alike (any user, any machine)."""
    hf, _ = models
    before = snapshot(hf)
    budget = [20_000]

    def full(real):
        def call(*args):
            n = real(*args)
            budget[0] -= n if isinstance(n, int) else 0
            if budget[0] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return n
        return call
    monkeypatch.setattr(os, "write", full(os.write))
    monkeypatch.setattr(os, "copy_file_range", full(os.copy_file_range))
    rc, lines = convert("hg_to_pp", "--input-path", hf, "--save-path", tmp_path / "pp")
    monkeypatch.undo()
    line = one_error(rc, lines, "hg_to_pp", "no space left on device", "nothing was written")
    assert line.split(": error: ")[1].startswith(str(tmp_path / "pp" / "layer_"))  # the output file, not staging
    assert snapshot(hf) == before
    assert not os.path.exists(tmp_path / "pp") and not staging_left(tmp_path)


# ---------------------------------------------------------------------------------------------
# item 6: --force never replaces, holds or lies inside the input


def test_force_refuses_to_replace_or_overlap_the_input(models, tmp_path):
    hf, _ = models
    src = copy_model(hf, tmp_path / "models" / "hf")
    (tmp_path / "link").symlink_to(src)
    before = snapshot(tmp_path / "models")
    cases = [(src, "is the input"), (tmp_path / "link", f"(both are {src})"),
             (tmp_path / "models", "holds the input"), (tmp_path, "holds the input")]
    for out, says in cases:
        rc, lines = convert("hg_to_pp", "--input-path", src, "--save-path", out, "--force")
        one_error(rc, lines, "hg_to_pp", f"--save-path {out}", says, "--save-path")
        assert snapshot(tmp_path / "models") == before
    # an output folder inside the input: --force would delete part of it
    (src / "old_pp").mkdir()
    (src / "old_pp" / "notes").write_text("mine")
    rc, lines = convert("hg_to_pp", "--input-path", src, "--save-path", src / "old_pp", "--force")
    one_error(rc, lines, "hg_to_pp", "is inside the input", "give a --save-path outside")
    assert (src / "old_pp" / "notes").read_text() == "mine"
    # pp_to_hg with the pipeline folder as its own output
    pp = tmp_path / "pp"
    assert convert("hg_to_pp", "--input-path", src, "--save-path", pp)[0] == 0
    pp_before = snapshot(pp)
    rc, lines = convert("pp_to_hg", "--input-path", pp, "--save-path", pp, "--force")
    one_error(rc, lines, "pp_to_hg", "is the input")
    assert snapshot(pp) == pp_before
    assert not staging_left(tmp_path) and not staging_left(tmp_path / "models")


def test_force_still_replaces_an_unrelated_output(models, tmp_path):
    hf, _ = models
    out = tmp_path / "pp"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rc, lines = convert("hg_to_pp", "--input-path", hf, "--save-path", out, "--force")
    assert rc == 0, lines
    assert not (out / "stale.txt").exists() and os.path.isfile(paths.layer_file(str(out), 0))
    assert not staging_left(tmp_path)


# ---------------------------------------------------------------------------------------------
# item 5: signals remove the staging folder; a killed run's folder is removed at the next run


SLOW_CONVERT = """
import sys, time
from ppllm import tensor_io as tio
real = tio.write_torch_state
def slow(path, items):
    real(path, items)
    open({flag!r}, "w").close()  # the staging folder holds a layer file now
    time.sleep(120)
tio.write_torch_state = slow
from ppllm.convert import main
sys.exit(main(["hg_to_pp", "--input-path", {src!r}, "--save-path", {out!r}, "--quiet"]))
"""


def start_slow_conversion(src, out, flag):
    code = SLOW_CONVERT.format(flag=str(flag), src=str(src), out=str(out))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([PY, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not os.path.exists(flag):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the conversion did not start: {proc.communicate()}")
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_removes_the_staging_folder(models, tmp_path, sig, code):
    hf, _ = models
    before = snapshot(hf)
    out = tmp_path / "pp"
    proc = start_slow_conversion(hf, out, tmp_path / "started")
    staging = staging_left(tmp_path)
    prefix = paths.staging_prefix().replace(f"-{os.getpid()}-", f"-{proc.pid}-")
    assert staging and all(s.startswith(prefix) for s in staging), (staging, prefix)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"convert_model.py hg_to_pp: interrupted; nothing was written to {out}"], stderr
    assert not staging_left(tmp_path) and not out.exists()
    assert snapshot(hf) == before


def test_a_killed_conversions_staging_folder_is_removed_by_the_next_run(models, tmp_path):
    hf, _ = models
    out = tmp_path / "pp"
    proc = start_slow_conversion(hf, out, tmp_path / "started")
    proc.kill()  # SIGKILL: nothing runs, the staging folder stays
    proc.communicate(timeout=60)
    [stale] = staging_left(tmp_path)
    size = sum(os.path.getsize(tmp_path / stale / n) for n in os.listdir(tmp_path / stale))
    assert size > 0
    # a conversion of this host still running (a live pid) is not touched; one of another host, or
    # of a container with this host name but other process ids, is named
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(120)"])
    try:
        running = tmp_path / (paths.staging_prefix().replace(f"-{os.getpid()}-", f"-{sleeper.pid}-") + "abcd1234")
        other = tmp_path / ".convert-otherhost-17-4242-efgh5678"
        container = tmp_path / f".convert-{socket.gethostname()}-1-99999999-ijkl9012"
        for d in (running, other, container):
            d.mkdir()
        rc, lines = convert("hg_to_pp", "--input-path", hf, "--save-path", out)
        assert rc == 0, lines
        assert sorted(lines) == sorted([
            f"note: removed {tmp_path / stale} ({size / 2 ** 20:.1f} MiB), "
            f"the staging folder of a conversion (pid {proc.pid}) that was killed",
            f"note: {other} (0.0 MiB) is the staging folder of another conversion (host otherhost, pid 4242); "
            f"remove it if that conversion is no longer running",
            f"note: {container} (0.0 MiB) is the staging folder of another conversion (host {socket.gethostname()}, "
            f"pid 99999999 in another container); remove it if that conversion is no longer running"]), lines
        assert sorted(staging_left(tmp_path)) == sorted([running.name, other.name, container.name])
        assert os.path.isfile(paths.layer_file(str(out), 0))
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------------
# item 7, chat part


@pytest.mark.parametrize("args,says", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give the number of tokens to generate, at least 1 (e.g. 256)"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3: give the number of tokens to generate, at least 1 (e.g. 256)"),
    (["--template", "llama9"], "--template 'llama9' is not a template; use auto (the family's own, as in "
                               "training) or one of baichuan2, chatglm3, chatml, llama2, llama3, plain"),
    (["--temperature", "nan"], "--temperature nan: give a finite number >= 0 (0 = greedy)"),
], ids=["zero tokens", "negative tokens", "unknown template", "nan temperature"])
def test_chat_arguments_refused_before_the_model_loads(models, args, says):
    from ppllm import chat
    hf, _ = models
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = chat.main(["--model", str(hf), "--prompt", "hi", *args])
    assert rc == 2
    assert err.getvalue().splitlines() == [f"ppllm.chat: error: {says}"]
