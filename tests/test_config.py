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


# ---------------------------------------------------------------------------------------------
# job configs: typed model sections, per-job defaults, the round trip to a Ray worker


@pytest.mark.parametrize("override, key", [
    ("model.n_layer=abc", "model.n_layer"),  # typed: a bad value fails at load, not in a worker
    ("model.n_laye=4", "model.n_laye"),  # unknown key named
    ("model.n_head=3", "model.n_head"),  # the model's own rule, at load
    ("model.vocab_size=100", "model.vocab_size"),  # comes from the chunk store
    ("model_type=gpt", "model_type"),
    ("train.run_name=a/b", "train.run_name"),  # a run is a plain folder of the workdir
])
def test_retro_job_config_checks_its_model_section_when_loaded(override, key):
    from ratray.retro.config import RetroJobConfig

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RetroJobConfig, None, [override])


def test_each_method_has_its_own_defaults_and_they_survive_yaml_sections():
    from ratray.realm.config import RealmJobConfig
    from ratray.retro.config import RetroJobConfig

    retro, realm = RetroJobConfig(), RealmJobConfig()
    assert retro.train.run_name == "retro-demo" and realm.train.run_name == "realm-demo"
    assert (retro.chunks.tokenizer, retro.index.metric) == ("bpe", "l2")
    assert (realm.chunks.tokenizer, realm.chunks.chunk_tokens, realm.index.metric) == ("wordpiece", 288, "ip")
    # a YAML `train:` section that sets other keys keeps the method's run name
    loaded = load_config(RealmJobConfig, None, ["train.steps=30", "index.shards=1"])
    assert (loaded.train.run_name, loaded.train.steps, loaded.index.metric) == ("realm-demo", 30, "ip")
    assert load_config(RetroJobConfig, None, ["model_type=baseline"]).model.model == "baseline"


def test_a_job_config_round_trips_through_a_plain_dict():
    from ratray.config import from_dict
    from ratray.retro.config import RetroJobConfig

    job = load_config(RetroJobConfig, None, ["model.cca_layers=[2,4]", "model.n_layer=4",
                                             "train.steps=70", "service.resources={index_node: 1}"])
    again = from_dict(RetroJobConfig, to_dict(job))  # what a Ray Train worker rebuilds
    assert again == job and again.model.cca_layers == (2, 4)
