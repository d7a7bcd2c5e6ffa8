"""Config loading: YAML + --set overrides, validation that names the key."""
import pytest

from ratray.config import BuildConfig, ConfigError, flatten, load_config, to_dict


def test_defaults_are_retro_sized():
    cfg = load_config(BuildConfig)
    assert cfg.chunks.chunk_tokens == 64
    assert cfg.service.num_cpus < 1
    assert cfg.index.metric == "l2"


def test_yaml_then_extra_then_overrides_win_in_that_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("workdir: from_yaml\nindex:\n  shards: 3\n  factory: Flat\ncorpus:\n  max_docs: 10\n")
    cfg = load_config(BuildConfig, y, ["index.shards=5", "corpus.title_field=null"],
                      extra={"workdir": "from_flag", "index.factory": None})
    assert cfg.workdir == "from_flag"
    assert cfg.index.shards == 5
    assert cfg.index.factory == "Flat"  # a flag left unset (None) does not override the file
    assert cfg.corpus.max_docs == 10
    assert cfg.corpus.title_field is None


@pytest.mark.parametrize("override, key", [
    ("index.shardz=2", "index.shardz"),
    ("index.shards=0", "index.shards"),
    ("index.shards=two", "index.shards"),
    ("chunks.chunk_tokens=1", "chunks.chunk_tokens"),
    ("service.num_cpus=1", "service.num_cpus"),
    ("corpus.format=xml", "corpus.format"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(BuildConfig, None, [override])


def test_missing_or_malformed_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(BuildConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("index: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(BuildConfig, bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(BuildConfig, None, ["index.shards"])


def test_flatten_gives_dotted_keys_for_every_field():
    flat = flatten(to_dict(BuildConfig()))
    assert flat["index.shards"] == 2 and flat["chunks.chunk_tokens"] == 64
    assert all(not isinstance(v, dict) for v in flat.values())
