"""Parameter files are validated before any work, with messages naming file and key."""
import textwrap

import pytest

from citylib.core import paths
from citylib.core.config import ConfigError
from citylib.core.paths import PARAMETERS
from citylib.run import cli, params

GOOD = """
arch: simple
seed: 1
data:
  source: world
  world: {spots_per_city: 6, views: 2, size: 64}
  image_size: 64
train: {epochs: 1, batch_size: 8}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_file_resolves_with_defaults_and_is_named_after_the_file(tmp_path):
    cfg = params.load(write(tmp_path, "simple_seed1.yaml", GOOD))
    assert (cfg.name, cfg.arch, cfg.seed) == ("simple_seed1", "simple", 1)
    assert cfg.data.world.views == 2 and cfg.train.epochs == 1
    assert cfg.train.lr == 1e-4  # the paper's default survives


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t + "colour: red\n", "colour"),
    (lambda t: t.replace("arch: simple", "arch: lenet"), "lenet"),
    (lambda t: t.replace("seed: 1", "seed: one"), "seed"),
    (lambda t: t.replace("epochs: 1", "epochs: 1.5"), "train.epochs"),
    (lambda t: t.replace("image_size: 64", "image_sise: 64"), "data.image_sise"),
    (lambda t: t.replace("source: world", "source: /no/such/folder"), "/no/such/folder"),
    (lambda t: t.replace("world: {", "world: {world: atlantis, "), "atlantis"),
    (lambda t: t + "name: other\n", "name"),
    (lambda t: "- just\n- a list\n", "mapping"),
    (lambda t: "arch: [unclosed\n", "YAML"),
    (lambda t: t + "seed: 2\n", "'seed' given twice"),                       # not "the last wins"
    (lambda t: t.replace("train: {epochs: 1,", "train: {epochs: 1, epochs: 2,"), "'epochs' given twice"),
    (lambda t: t.replace("image_size: 64", "image_size: 10"), "data.image_size"),   # before the data stage
    (lambda t: t.replace("train: {epochs: 1,", "train: {epochs: 1, device: gpu,"), "'device' = 'gpu'"),
    (lambda t: t + "reliance: {operator: paint}\n", "reliance.operator: 'paint'"),
    (lambda t: t + "reliance: {calibrate: [linear, smudge]}\n", "reliance.calibrate: 'smudge'"),
    (lambda t: t + "reliance: {min_share: 0}\n", "'min_share' = 0"),
])
def test_bad_files_stop_with_a_message_naming_file_and_key(tmp_path, edit, needle):
    path = write(tmp_path, "bad.yaml", edit(textwrap.dedent(GOOD)))
    with pytest.raises(ConfigError) as err:
        params.load(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_load_all_reports_every_bad_file_and_requires_one_data_section(tmp_path):
    good = write(tmp_path, "a.yaml", GOOD)
    bad1 = write(tmp_path, "b.yaml", GOOD.replace("arch: simple", "arch: nope"))
    bad2 = write(tmp_path, "c.yaml", GOOD + "extra: 1\n")
    with pytest.raises(ConfigError) as err:
        params.load_all([good, bad1, bad2])
    assert "b.yaml" in str(err.value) and "c.yaml" in str(err.value)
    other = write(tmp_path, "d.yaml", GOOD.replace("image_size: 64", "image_size: 72"))
    with pytest.raises(ConfigError, match="share the same 'data'"):
        params.load_all([good, other])


def test_discover_skips_private_files_and_every_shipped_file_is_valid(tmp_path):
    write(tmp_path, "_base.yaml", "x: 1\n")
    write(tmp_path, "a.yaml", GOOD)
    assert [p.name for p in params.discover(tmp_path)] == ["a.yaml"]
    main = params.load_all(params.discover(PARAMETERS))
    # the paper's four architectures, each with two seeds (its "retrained" pairs)
    assert sorted((c.arch, c.seed) for c in main) == sorted(
        (a, s) for a in ("simple", "simpler", "vgg11", "resnet18") for s in (0, 1))
    extra = params.load_all(params.discover(PARAMETERS / "extra"))
    assert {c.arch for c in extra} == {"alexnet", "vgg_s"}
    params.load_all(params.discover(PARAMETERS / "smoke"))
    assert {c.data.image_size for c in params.load_all(params.discover(PARAMETERS / "maps128"))} == {128}
    assert {c.data.image_size for c in params.load_all(params.discover(PARAMETERS / "paper"))} == {224}
    # the real-photo files find the samples beside the checkout from their own folder
    assert {c.data.source for c in params.load_all(params.discover(PARAMETERS / "streetview"))} == {
        str(paths.shared() / "samples" / "streetview")}


def test_hash_changes_with_any_setting(tmp_path):
    a = params.load(write(tmp_path, "a.yaml", GOOD))
    b = params.load(write(tmp_path, "b.yaml", GOOD.replace("batch_size: 8", "batch_size: 9")))
    assert a.hash != b.hash


def test_exponent_floats_are_floats_as_in_yaml_1_2(tmp_path):
    cfg = params.load(write(tmp_path, "a.yaml", GOOD.replace("batch_size: 8}", "batch_size: 8, lr: 1e-4, weight_decay: 5E-4}")))
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 5e-4
    # a value that only looks like a number stays what YAML says it is
    assert params.load(write(tmp_path, "b.yaml", GOOD.replace("source: world", "source: world  # 1e-4"))).data.source == "world"


def test_relative_paths_in_a_parameter_file_are_taken_from_its_folder(tmp_path, monkeypatch):
    (tmp_path / "cities" / "a").mkdir(parents=True)
    (tmp_path / "params").mkdir()
    (tmp_path / "worlds").mkdir()
    (tmp_path / "worlds" / "mine.yaml").write_text((paths.WORLDS / "default.yaml").read_text())
    f = write(tmp_path / "params", "p.yaml", GOOD.replace("source: world", "source: ../cities"))
    monkeypatch.chdir(tmp_path / "cities")                         # wherever citylib runs from
    assert params.load(f).data.source == str(tmp_path / "cities")
    w = write(tmp_path / "params", "w.yaml", GOOD.replace("world: {", "world: {world: ../worlds/mine.yaml, "))
    assert params.load(w).data.world.world == str(tmp_path / "worlds" / "mine.yaml")
    gone = write(tmp_path / "params", "g.yaml", GOOD.replace("source: world", "source: cities"))
    with pytest.raises(ConfigError, match=f"'cities': dataset not found at {tmp_path / 'params' / 'cities'}"):
        params.load(gone)


def test_command_line_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "work" / "p3").mkdir(parents=True)
    write(tmp_path / "work" / "p3", "a.yaml", GOOD.replace("arch: simple", "arch: nope"))
    monkeypatch.chdir(tmp_path / "work")
    assert cli.main(["run", "--params", "p3", "--outputs", "my_outputs"]) == 2   # a bad file: stops first
    err = capsys.readouterr().err
    assert str(tmp_path / "work" / "p3" / "a.yaml") in err and "nope" in err
    assert not (paths.ROOT / "p3").exists() and not (paths.ROOT / "my_outputs").exists()
    args = cli.get_args_parser().parse_args(["run", "--params", "p3", "--outputs", "my_outputs"])
    assert (args.params, args.outputs) == (tmp_path / "work" / "p3", tmp_path / "work" / "my_outputs")
    args = cli.get_args_parser().parse_args(["synth", "--out", "w", "--world", "mine.yaml"])
    assert (args.out, args.world) == (tmp_path / "work" / "w", str(tmp_path / "work" / "mine.yaml"))
    assert cli.get_args_parser().parse_args(["synth", "--out", "w"]).world == "default"


@pytest.mark.parametrize("world, needle", [
    ("base:\n  street: !!python/object/apply:os.system [echo]\n", "could not determine a constructor"),
    ("base: [1, 2\ncities: 3\n", "expected ',' or ']'"),
    ("cities:\n  a: {planted: [{object: unicorn}]}\n", "planted[0]"),
])
def test_a_bad_world_file_stops_citylib_run_before_any_work_in_one_line(tmp_path, capsys, world, needle):
    """A world file with a YAML error, a dangerous tag or a bad key is found with the parameter
    files: exit 2, one line naming the parameter file, the world file and the line, nothing run."""
    (tmp_path / "bad_world.yaml").write_text(world)
    write(tmp_path, "p.yaml", GOOD.replace("world: {", "world: {world: bad_world.yaml, "))
    assert cli.main(["run", "--params", str(tmp_path / "p.yaml"), "--outputs", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "bad_world.yaml" in ln)
    assert str(tmp_path / "p.yaml") in line and needle in line
    assert "line " in line or "planted" in line
    assert not (tmp_path / "out").exists()
