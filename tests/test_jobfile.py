"""Job files: paths, templates, CLI overrides, matrices, validation, secrets, job_outputs."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batcher.config import config_keys, make_config
from batcher.errors import ConfigError
from batcher.io.readers import ReaderOptions, iter_batches
from batcher.jobfile import JOB_ONLY_KEYS, JobRun, is_job_file, job_outputs, load_job
from batcher.runner import Runner
from batcher.simulate import SimulatorThread

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 22, 21, 5, 3, tzinfo=UTC)


def write_job(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    folder = tmp_path / "jobs"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, **cli: Any) -> list[JobRun]:
    return load_job(path, cli, now=NOW)


def only(path: Path, **cli: Any) -> dict[str, Any]:
    runs = load(path, **cli)
    assert len(runs) == 1
    return runs[0].values


def config_of(run: JobRun) -> Any:
    return make_config({k: v for k, v in run.values.items()
                        if k not in ("log_format", "no_progress")})


BASIC = 'input = "../data/in.jsonl"\noutput = "../out/{job}.parquet"\nmodel = "m"\n'


# --- paths and templates ----------------------------------------------------------------


def test_paths_are_relative_to_the_job_files_folder(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_job(tmp_path, BASIC)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    values = only(Path(os.path.relpath(path, elsewhere)))
    assert values["input"] == (tmp_path / "data" / "in.jsonl").resolve()
    assert values["output"] == (tmp_path / "out" / "x.parquet").resolve()
    assert values["input"].is_absolute() and values["output"].is_absolute()


def test_absolute_and_home_paths_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_job(tmp_path, f'input = "{tmp_path / "abs.jsonl"}"\noutput = "~/o.parquet"\n')
    values = only(path)
    assert values["input"] == tmp_path / "abs.jsonl"
    assert values["output"] == tmp_path / "home" / "o.parquet"


def test_output_template_is_filled(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "in.jsonl"\nmodel = "org/model:v1"\n'
                     'output = "{job}/{date}/{datetime}-{model}.parquet"\n', name="nightly.toml")
    values = only(path)
    assert values["output"] == (tmp_path / "jobs" / "nightly" / "2026-11-22"
                                / "2026-11-22T21-05-03-org_model_v1.parquet")
    assert values["job"] == "nightly"
    assert values["model"] == "org/model:v1"  # only the file name is made safe


def test_now_is_taken_in_utc(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "i.jsonl"\noutput = "{datetime}.parquet"\n')
    tokyo = datetime(2026, 11, 23, 6, 5, 3, tzinfo=timezone(timedelta(hours=9)))
    values = load_job(path, {}, now=tokyo)[0].values
    assert values["output"].name == "2026-11-22T21-05-03.parquet"


def test_name_key_overrides_the_file_stem(tmp_path: Path) -> None:
    path = write_job(tmp_path, BASIC + 'name = "evals"\n')
    values = only(path)
    assert values["job"] == "evals"
    assert values["output"].name == "evals.parquet"


def test_unknown_placeholder_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "i.jsonl"\noutput = "{jobb}.parquet"\n')
    with pytest.raises(ConfigError, match=r"x\.toml.*\{jobb\}.*\{job\}"):
        load(path)


def test_model_placeholder_without_a_model_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "i.jsonl"\noutput = "{model}.parquet"\n')
    with pytest.raises(ConfigError, match=r"\{model\}"):
        load(path)


def test_missing_input_or_output_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x\.toml: missing 'input'"):
        load(write_job(tmp_path, 'output = "o.parquet"\n'))
    with pytest.raises(ConfigError, match=r"x\.toml: missing 'output'"):
        load(write_job(tmp_path, 'input = "i.jsonl"\n'))


def test_output_given_on_the_command_line_is_enough(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_job(tmp_path, 'input = "i.jsonl"\n')
    values = only(path, output=Path("cli/{job}-{date}.parquet"))
    assert values["output"] == (tmp_path / "cli" / "x-2026-11-22.parquet").resolve()


def test_is_job_file() -> None:
    assert is_job_file(Path("jobs/a.toml")) and is_job_file(Path("A.TOML"))
    assert not is_job_file(Path("a.jsonl")) and not is_job_file(Path("toml"))


# --- command line over the file ---------------------------------------------------------


def test_cli_values_override_the_file(tmp_path: Path) -> None:
    path = write_job(tmp_path, BASIC + 'concurrency = 4\nrpm = 60\nsystem = "be brief"\n'
                     'log_format = "json"\n')
    values = only(path, concurrency=32, rpm=None, model="other", log_format=None,
                  strict=None, no_progress=True)
    assert values["concurrency"] == 32
    assert values["rpm"] == 60  # None = not given: the file's value stays
    assert values["model"] == "other"
    assert values["system"] == "be brief"
    assert values["log_format"] == "json"
    assert values["no_progress"] is True
    assert "strict" not in values


def test_false_flags_do_not_switch_a_file_flag_off(tmp_path: Path) -> None:
    values = only(write_job(tmp_path, BASIC + "keep_raw = true\n"), keep_raw=False)
    assert values["keep_raw"] is True


def test_params_and_headers_merge_cli_on_top(tmp_path: Path) -> None:
    path = write_job(tmp_path, BASIC + '[params]\ntemperature = 0\nmax_tokens = 32\n'
                     'response_format = {type = "json_object"}\n'
                     '[headers]\nX-Team = "evals"\nX-Env = "prod"\n')
    values = only(path, params={"max_tokens": 64, "seed": 7}, headers={"X-Env": "staging"})
    assert values["params"] == {"temperature": 0, "max_tokens": 64, "seed": 7,
                                "response_format": {"type": "json_object"}}
    assert values["headers"] == {"X-Team": "evals", "X-Env": "staging"}
    config = config_of(load(path)[0])
    assert config.params["max_tokens"] == 32


def test_values_build_a_run_config(tmp_path: Path) -> None:
    path = write_job(tmp_path, BASIC + 'max-attempts = 3\ntimeout = 30\nendpoint = "completions"\n'
                     'price_input = 0.5\n')
    config = config_of(load(path, base_url="http://127.0.0.1:9/v1")[0])
    assert (config.max_attempts, config.timeout, config.endpoint) == (3, 30, "completions")
    assert config.job == "x" and config.base_url == "http://127.0.0.1:9/v1"
    assert config.price_input == 0.5


# --- model matrices ---------------------------------------------------------------------


MATRIX = 'input = "i.jsonl"\noutput = "out/{model}.parquet"\nmodels = ["gpt-4o-mini", "org/m:1"]\n'


def test_matrix_gives_one_run_per_model(tmp_path: Path) -> None:
    runs = load(write_job(tmp_path, MATRIX + "[params]\ntemperature = 0\n"))
    assert [r.model for r in runs] == ["gpt-4o-mini", "org/m:1"]
    assert [r.values["model"] for r in runs] == ["gpt-4o-mini", "org/m:1"]
    outputs = [r.values["output"].name for r in runs]
    assert outputs == ["gpt-4o-mini.parquet", "org_m_1.parquet"]
    assert all(r.values["params"] == {"temperature": 0} for r in runs)
    assert "models" not in runs[0].values
    assert len({config_of(r).output for r in runs}) == 2


def test_matrix_output_must_contain_model(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "i.jsonl"\noutput = "o.parquet"\nmodels = ["a", "b"]\n')
    with pytest.raises(ConfigError, match=r"x\.toml: 'output' must contain \{model\}"):
        load(path)


def test_matrix_with_cli_output_lacking_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\{model\}"):
        load(write_job(tmp_path, MATRIX), output=tmp_path / "one.parquet")


def test_model_and_models_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'model' or 'models'"):
        load(write_job(tmp_path, MATRIX + 'model = "a"\n'))


def test_cli_model_narrows_a_matrix(tmp_path: Path) -> None:
    runs = load(write_job(tmp_path, MATRIX), model="org/m:1")
    assert [r.model for r in runs] == ["org/m:1"]
    assert runs[0].values["output"].name == "org_m_1.parquet"


@pytest.mark.parametrize("models", ['[]', '"a"', '["a", 3]', '["a", "a"]'])
def test_bad_models_are_refused(tmp_path: Path, models: str) -> None:
    path = write_job(tmp_path, f'input = "i.jsonl"\noutput = "{{model}}.parquet"\nmodels = {models}\n')
    with pytest.raises(ConfigError, match=r"x\.toml: 'models"):
        load(path)


def test_models_colliding_after_sanitising_are_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "i.jsonl"\noutput = "{model}.parquet"\n'
                     'models = ["a/b", "a:b"]\n')
    with pytest.raises(ConfigError, match="would both write"):
        load(path)


# --- validation -------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write_job(tmp_path, BASIC + "concurency = 8\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (f"{path}: unknown key 'concurency' (did you mean 'concurrency'?)")


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'$"):
        load(write_job(tmp_path, BASIC + "zzz = 1\n"))


def test_job_key_points_to_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'job' \(did you mean 'name'\?\)"):
        load(write_job(tmp_path, BASIC + 'job = "j"\n'))


def test_every_run_option_is_accepted(tmp_path: Path) -> None:
    """A key for every RunConfig field (but job) plus the job-only ones is not 'unknown'."""
    allowed = {k for k in config_keys() if k != "job"} | set(JOB_ONLY_KEYS)
    assert {"concurrency", "max_attempts", "price_output", "server_down_after"} <= allowed
    path = write_job(tmp_path, BASIC + "server_down_after = 5\ngrace = 1\nno_progress = true\n")
    values = only(path)
    assert (values["server_down_after"], values["grace"], values["no_progress"]) == (5, 1, True)


def test_dashes_are_read_as_underscores(tmp_path: Path) -> None:
    path = write_job(tmp_path, BASIC + 'max-attempts = 3\nid-column = "key_id"\n'
                     'retry-failed = true\n')
    values = only(path)
    assert (values["max_attempts"], values["id_column"], values["retry_failed"]) == (
        3, "key_id", True)


def test_the_same_key_with_dash_and_underscore_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'max_attempts' is given twice"):
        load(write_job(tmp_path, BASIC + "max-attempts = 3\nmax_attempts = 4\n"))


@pytest.mark.parametrize(("line", "key", "kind"), [
    ('concurrency = "8"', "concurrency", "an integer"),
    ("concurrency = 8.5", "concurrency", "an integer"),
    ("max-attempts = true", "max-attempts", "an integer"),
    ('rpm = "fast"', "rpm", "a number"),
    ("timeout = false", "timeout", "a number"),
    ('strict = "yes"', "strict", "true or false"),
    ("system = 3", "system", "a string"),
    ("params = 3", "params", "a table"),
    ("headers = { X-Team = 1 }", "headers.X-Team", "a string"),
])
def test_wrong_type_names_key_and_expected_type(tmp_path: Path, line: str, key: str,
                                                kind: str) -> None:
    with pytest.raises(ConfigError, match=f"x\\.toml: '{key}' must be {kind}, got"):
        load(write_job(tmp_path, BASIC + line + "\n"))


@pytest.mark.parametrize(("line", "key"), [
    ("concurrency = 0", "concurrency"),
    ("rpm = -1", "rpm"),
    ("timeout = inf", "timeout"),
    ('endpoint = "grpc"', "endpoint"),
    ('base_url = "ftp://x"', "base_url"),
    ('log_format = "xml"', "log_format"),
    ('api_key_env = "MY KEY"', "api_key_env"),
    ('name = " "', "name"),
])
def test_bad_values_name_the_key_and_file(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"x\\.toml: '?{key}"):
        load(write_job(tmp_path, BASIC + line + "\n"))


def test_a_bad_cli_value_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    runs = load(write_job(tmp_path, BASIC), concurrency=0)
    assert runs[0].values["concurrency"] == 0
    with pytest.raises(ConfigError, match=r"^concurrency"):
        config_of(runs[0])


def test_toml_dates_in_params_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'params\.since'.*date"):
        load(write_job(tmp_path, BASIC + "[params]\nsince = 2026-01-01\n"))


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "i.jsonl"\noutput = "o.parquet"\nconcurrency = = 3\n')
    with pytest.raises(ConfigError, match=r"x\.toml: not valid TOML: .*line 3"):
        load(path)


def test_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such job file"):
        load(tmp_path / "nope.toml")


def test_a_job_file_as_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'input' is a job file"):
        load(write_job(tmp_path, 'input = "other.toml"\noutput = "o.parquet"\n'))


# --- prices -----------------------------------------------------------------------------


def test_prices_table(tmp_path: Path) -> None:
    path = write_job(tmp_path, BASIC + '[prices."my-gateway-model"]\ninput = 0.5\noutput = 1\n'
                     "cached-input = 0.25\n[prices.free]\ninput = 0\n")
    runs = load(path)
    assert runs[0].prices == {"my-gateway-model": {"input": 0.5, "output": 1.0,
                                                   "cached_input": 0.25},
                              "free": {"input": 0.0}}
    assert isinstance(runs[0].prices["my-gateway-model"]["output"], float)
    assert "prices" not in runs[0].values


@pytest.mark.parametrize(("table", "message"), [
    ('[prices.m]\ninput = -1\n', r"'prices\.m\.input' must be a price >= 0"),
    ('[prices.m]\ninput = "cheap"\n', r"'prices\.m\.input' must be a number"),
    ('[prices.m]\ninputt = 1\n', r"unknown key 'prices\.m\.inputt' \(did you mean 'input'\?\)"),
    ('[prices]\nm = 1\n', r"'prices\.m' must be a table"),
])
def test_bad_prices_are_refused(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write_job(tmp_path, BASIC + table))


# --- secrets ----------------------------------------------------------------------------


SECRET = "sk-proj-Abc123SECRETvalue987"


@pytest.mark.parametrize(("text", "where"), [
    (f'api_key = "{SECRET}"\n', "api_key"),
    ('api-key = "hunter2hunter2"\n', "api-key"),
    ('openai_api_key = "x"\n', "openai_api_key"),
    (f'[headers]\nX-Gateway = "{SECRET}"\n', "headers.X-Gateway"),
    ('[headers]\nAuthorization = "Bearer abcdefgh12345678"\n', "headers.Authorization"),
    ('[headers]\nx-api-key = "plainvalue"\n', "headers.x-api-key"),
    (f'[params]\nextra = {{ token = "{SECRET}" }}\n', "params.extra.token"),
    (f'[params]\nlist = ["a", "{SECRET}"]\n', "params.list[1]"),
    (f'api_key_env = "{SECRET}"\n', "api_key_env"),
    ('system = "AIzaSyD-1234567890abcdef"\n', "system"),
    ('system = "sk-ant-api03-XYZ"\n', "system"),
])
def test_literal_keys_are_refused_without_repeating_them(tmp_path: Path, text: str,
                                                         where: str) -> None:
    path = write_job(tmp_path, BASIC + text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: holds a literal API key in {where!r}")
    assert 'api_key_env = "..."' in message
    for secret in (SECRET, "hunter2", "abcdefgh12345678", "plainvalue", "AIzaSyD", "XYZ"):
        assert secret not in message


def test_secret_check_comes_before_type_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(write_job(tmp_path, BASIC + f'concurrency = "{SECRET}"\n'))
    assert "literal API key in 'concurrency'" in str(info.value)
    assert SECRET not in str(info.value)


def test_ordinary_text_is_not_taken_for_a_key(tmp_path: Path) -> None:
    path = write_job(tmp_path, BASIC + 'system = "Bearer of news: ask-me anything, sk"\n'
                     '[params.response_format.json_schema.schema.properties.key]\n'
                     'type = "string"\n')
    values = only(path)
    assert values["system"].startswith("Bearer of news")
    assert "key" in values["params"]["response_format"]["json_schema"]["schema"]["properties"]


# --- job_outputs ------------------------------------------------------------------------


def test_job_outputs_fill_todays_date(tmp_path: Path) -> None:
    path = write_job(tmp_path, MATRIX.replace("out/{model}", "out/{date}/{model}"))
    outputs = job_outputs(path, now=NOW)
    folder = tmp_path / "jobs" / "out" / "2026-11-22"
    assert outputs == [folder / "gpt-4o-mini.parquet", folder / "org_m_1.parquet"]


def test_job_outputs_find_the_newest_datetime_run(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "i.jsonl"\noutput = "../out/{job}-{datetime}.parquet"\n')
    out = tmp_path / "out"
    # Nothing on disk yet: the path filled with now.
    assert job_outputs(path, now=NOW) == [out / "x-2026-11-22T21-05-03.parquet"]
    out.mkdir()
    (out / "x-2026-11-20T01-00-00.parquet").write_bytes(b"")
    (out / "x-2026-11-21T23-59-59.parquet").write_bytes(b"")
    (out / "x-2026-11-21T00-00-00.summary.json").write_bytes(b"")
    (out / "x-notadate.parquet").write_bytes(b"")
    (out / "y-2026-11-22T00-00-00.parquet").write_bytes(b"")
    assert job_outputs(path, now=NOW) == [out / "x-2026-11-21T23-59-59.parquet"]
    # A run still in progress has only its state folder so far.
    (out / "x-2026-11-22T03-00-00.parquet.state").mkdir()
    assert job_outputs(path, now=NOW) == [out / "x-2026-11-22T03-00-00.parquet"]


# --- the repository's own job files -----------------------------------------------------


@pytest.mark.parametrize("name", ["nightly_eval.toml", "classify_reviews.toml"])
def test_repo_job_files_load_and_their_inputs_read(name: str) -> None:
    path = ROOT / "jobs" / name
    # base_url is left to --base-url / $BATCHER_BASE_URL so tests can aim at the simulator.
    assert "base_url" not in load_job(path, {}, now=NOW)[0].values
    runs = load_job(path, {"base_url": "http://127.0.0.1:9/v1"}, now=NOW)
    for run in runs:
        config = config_of(run)
        assert config.input.is_file()
        assert config.output.is_relative_to(ROOT / "out")
        assert "2026-11-22" in str(config.output)
        assert config.job == path.stem
        options = ReaderOptions(id_column=config.id_column, template=config.template)
        batches = list(iter_batches(config.input, options))
        rows = [row for batch in batches for row in batch.rows]
        assert not [p for batch in batches for p in batch.problems]
        assert len(rows) >= 20 and all(row.prompt for row in rows)
    assert job_outputs(path, now=NOW) == [r.values["output"] for r in runs]


def test_nightly_eval_is_a_two_model_matrix() -> None:
    runs = load_job(ROOT / "jobs" / "nightly_eval.toml", {}, now=NOW)
    assert [r.model for r in runs] == ["gpt-4o-mini", "gpt-4.1-nano"]
    assert [r.values["output"] for r in runs] == [
        ROOT / "out" / "nightly_eval" / "2026-11-22" / "gpt-4o-mini.parquet",
        ROOT / "out" / "nightly_eval" / "2026-11-22" / "gpt-4.1-nano.parquet"]
    values = runs[0].values
    assert values["params"] == {"temperature": 0, "max_tokens": 32}
    assert values["log_format"] == "json" and values["system"]


def test_classify_reviews_has_a_template_and_prices() -> None:
    (run,) = load_job(ROOT / "jobs" / "classify_reviews.toml", {}, now=NOW)
    config = config_of(run)
    assert config.id_column == "review_id" and config.model == "gpt-4o-mini"
    assert config.template is not None and "{product}" in config.template
    assert config.output == ROOT / "out" / "classify_reviews-2026-11-22.parquet"
    assert run.prices and all(set(rates) <= {"input", "output", "cached_input"}
                              for rates in run.prices.values())
    rows = [r for b in iter_batches(config.input, ReaderOptions(
        id_column=config.id_column, template=config.template)) for r in b.rows]
    assert len(rows) == 30 and rows[0].id == "1"
    assert rows[0].prompt is not None and rows[0].prompt.endswith(
        "\n\nBoils a full litre in under three minutes and switches off reliably.")


@pytest.mark.parametrize("name", ["nightly_eval.toml", "classify_reviews.toml"])
def test_repo_job_files_run_against_the_simulator(name: str, tmp_path: Path,
                                                  sim: SimulatorThread) -> None:
    cli = {"base_url": sim.base_url, "output": tmp_path / "{job}-{model}.parquet",
           "rpm": 60_000.0}
    runs = load_job(ROOT / "jobs" / name, cli, now=NOW)
    for run in runs:
        config = config_of(run)
        summary = asyncio.run(Runner(config).run())
        assert summary.exit_code == 0, summary
        rows = pq.read_table(config.output).to_pylist()
        expected = 20 if name == "nightly_eval.toml" else 30
        assert len(rows) == expected
        assert {row["status"] for row in rows} == {"ok"}
        assert {row["model"] for row in rows} == {run.model}
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == sorted(
        f"{Path(name).stem}-{r.model}.parquet" for r in runs)
