"""fleet.yaml loading: defaults, interpolation, and errors with file:line:col."""

from __future__ import annotations

from pathlib import Path

import pytest
from spec_test_helpers import error_for, only_error

from fleet.errors import SpecError, SpecErrors
from fleet.spec.loader import load_fleet_spec
from fleet.spec.models import DEFAULT_SSHFS_OPTIONS, FleetSpec

MINIMAL = """
name: demo
provider: local
workers: {count: 3}
"""


def load_errors(path: Path, env: dict[str, str] | None = None) -> SpecErrors:
    with pytest.raises(SpecErrors) as caught:
        load_fleet_spec(path, env=env or {})
    return caught.value


def test_minimal_spec_loads_with_defaults(spec_file) -> None:
    spec = load_fleet_spec(spec_file(MINIMAL), env={})
    assert isinstance(spec, FleetSpec)
    assert (spec.name, spec.provider, spec.workers.count) == ("demo", "local", 3)
    assert spec.workers.spot is True and spec.head.spot is False
    assert spec.ssh.parallelism == 32
    assert spec.shared.options == DEFAULT_SSHFS_OPTIONS
    assert spec.setup == [] and spec.gcp is None and spec.aws is None


def test_env_defaults_to_process_environment(spec_file, monkeypatch) -> None:
    monkeypatch.setenv("FLEET_TEST_COUNT", "5")
    spec = load_fleet_spec(
        spec_file("name: demo\nprovider: local\nworkers: {count: '${FLEET_TEST_COUNT}'}\n")
    )
    assert spec.workers.count == 5


def test_interpolation_resolves_types_defaults_and_escapes(spec_file) -> None:
    path = spec_file(
        """
        name: ${NAME}
        provider: local
        workers:
          count: ${N}
          spot: ${SPOT:-false}
        ssh:
          connect_timeout: ${TIMEOUT:-2.5}
          user: "${WHO}"
        setup:
          - echo $${HOME} and $$HOME stays
          - echo ${GREETING:-hello} > $HOME/x
          - echo rank ${FLEET_NODE_RANK}
        """
    )
    spec = load_fleet_spec(path, env={"NAME": "demo", "N": "7", "WHO": "12", "SPOT": ""})
    assert spec.name == "demo"
    assert spec.workers.count == 7
    assert spec.workers.spot is False  # empty SPOT: the default applies
    assert spec.ssh.connect_timeout == 2.5
    assert spec.ssh.user == "12"  # quoted: stays a string
    assert spec.setup == [
        "echo ${HOME} and $$HOME stays",
        "echo hello > $HOME/x",
        "echo rank ${FLEET_NODE_RANK}",  # a node-side variable: left for the node's shell
    ]


def test_unknown_key_points_at_key_and_suggests(spec_file) -> None:
    path = spec_file(
        """
        name: demo
        provider: local
        workers:
          cont: 3
        """
    )
    errors = load_errors(path)
    error = error_for(errors, "workers.cont")
    assert (error.file, error.line, error.column) == (str(path), 4, 3)
    assert error.message == "unknown key 'cont'"
    assert error.hint == "did you mean 'count'?"
    # The typo is not reported a second time as a missing `count`.
    assert [e.field for e in errors.errors] == ["workers.cont"]
    assert str(error) == f"{path}:4:3: workers.cont: unknown key 'cont' (did you mean 'count'?)"


def test_unknown_key_without_close_match_lists_allowed_keys(spec_file) -> None:
    error = only_error(load_errors(spec_file(MINIMAL + "zzz_unrelated: 1\n")))
    assert (error.line, error.column, error.field) == (4, 1, "zzz_unrelated")
    assert error.hint is not None and "allowed keys: name, provider, head, workers" in error.hint


def test_wrong_type_names_expectation_and_value(spec_file) -> None:
    path = spec_file(
        """
        name: demo
        provider: local
        workers: {count: three}
        ssh:
          connect_timeout: soon
          parallelism: true
        """
    )
    errors = load_errors(path)
    count = error_for(errors, "workers.count")
    assert (count.line, count.column) == (3, 18)
    assert count.message == "expected an integer >= 0 and <= 10000, got 'three'"
    timeout = error_for(errors, "ssh.connect_timeout")
    assert (timeout.line, timeout.column) == (5, 20)
    assert timeout.message == "expected a number > 0 and <= 600, got 'soon'"
    parallelism = error_for(errors, "ssh.parallelism")
    assert parallelism.message == "expected an integer >= 1 and <= 1024, got true"


def test_negative_count(spec_file) -> None:
    error = only_error(load_errors(spec_file("name: demo\nprovider: local\nworkers:\n  count: -1\n")))
    assert (error.line, error.column, error.field) == (4, 10, "workers.count")
    assert error.message == "expected an integer >= 0 and <= 10000, got -1"


def test_wrong_literal_suggests_nearest(spec_file) -> None:
    error = only_error(load_errors(spec_file("name: demo\nprovider: gpc\nworkers: {count: 1}\n")))
    assert (error.line, error.column, error.field) == (2, 11, "provider")
    assert error.message == "expected one of 'local', 'gcp', 'aws', got 'gpc'"
    assert error.hint == "did you mean 'gcp'?"


def test_bad_name_is_explained_in_words(spec_file) -> None:
    error = only_error(load_errors(spec_file("name: My_Fleet\nprovider: local\nworkers: {count: 1}\n")))
    assert error.field == "name" and "lowercase letters, digits and '-'" in error.message
    assert error.message.endswith("got 'My_Fleet'")


def test_missing_variable_names_it_at_its_line(spec_file) -> None:
    path = spec_file(
        """
        name: demo
        provider: local
        workers:
          count: ${WORKERS}
        """
    )
    errors = load_errors(path, env={"OTHER": "1"})
    error = only_error(errors)  # no second "expected an integer" error for the same value
    assert (error.line, error.column, error.field) == (4, 10, "workers.count")
    assert error.message == "environment variable WORKERS is not set"
    assert "${WORKERS:-value}" in (error.hint or "")


def test_malformed_reference(spec_file) -> None:
    errors = load_errors(spec_file(MINIMAL + "setup: ['echo ${1abc}', 'echo ${open']\n"))
    messages = sorted(e.message for e in errors.errors)
    assert messages[0] == "invalid variable reference '${1abc}'"
    assert messages[1].startswith("unterminated '${'")
    assert {e.field for e in errors.errors} == {"setup[0]", "setup[1]"}


def test_missing_required_key_points_at_parent_mapping(spec_file) -> None:
    path = spec_file(
        """
        name: demo
        provider: local
        workers:
          spot: false
        """
    )
    error = only_error(load_errors(path))
    assert (error.line, error.column, error.field) == (4, 3, "workers.count")
    assert error.message == "missing required key 'count'"


def test_missing_top_level_keys(spec_file) -> None:
    errors = load_errors(spec_file("name: demo\n"))
    assert {e.field for e in errors.errors} == {"provider", "workers"}
    assert all((e.line, e.column) == (1, 1) for e in errors.errors)


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ("name: demo\nprovider: local\nworkers: {count: 3\n", 4, 1, "expected ',' or '}'"),
        ("name: demo\nworkers:\n  count: 3\n bad: indent\n", 4, 2, "expected <block end>"),
        ("name: demo\nprovider: local\nworkers:\n\tcount: 3\n", 4, 1, "cannot start any token"),
        ("name: [demo\n", 2, 1, "expected ',' or ']'"),
        ("name: 'demo\n", 2, 1, "unexpected end of stream"),
    ],
)
def test_bad_yaml_gives_line_and_column(spec_file, text, line, column, words) -> None:
    error = only_error(load_errors(spec_file(text)))
    assert (error.line, error.column) == (line, column), str(error)
    assert error.message.startswith("invalid YAML: ") and words in error.message


def test_tab_indentation_hint(spec_file) -> None:
    error = only_error(load_errors(spec_file("name: demo\nworkers:\n\tcount: 3\n")))
    assert "tabs" in (error.hint or "")


def test_control_character_is_a_spec_error(spec_file) -> None:
    error = only_error(load_errors(spec_file("name: demo\x07\n")))
    assert (error.line, error.column) == (1, 11) and "invalid YAML" in error.message


def test_duplicate_key(spec_file) -> None:
    path = spec_file(
        """
        name: demo
        provider: local
        workers:
          count: 3
          spot: true
          count: 4
        """
    )
    error = only_error(load_errors(path))
    assert (error.line, error.column, error.field) == (6, 3, "workers.count")
    assert error.message == "duplicate key 'count'"
    assert error.hint == "first given at line 4; keep one of them"


def test_gcp_provider_without_gcp_block(spec_file) -> None:
    error = only_error(load_errors(spec_file("name: demo\nprovider: gcp\nworkers: {count: 2}\n")))
    assert (error.line, error.column, error.field) == (2, 11, "gcp")
    assert error.message == "provider 'gcp' needs a `gcp:` block"


def test_gcp_block_problem_reported_with_other_errors(spec_file) -> None:
    errors = load_errors(spec_file("name: demo\nprovider: aws\nworkers: {count: -2}\n"))
    assert [e.field for e in errors.errors] == ["aws", "workers.count"]


def test_gcp_block_is_validated(spec_file) -> None:
    path = spec_file(
        """
        name: demo
        provider: gcp
        workers: {count: 2}
        gcp:
          project: p
          zones: []
        """
    )
    error = only_error(load_errors(path))
    assert (error.line, error.field) == (6, "gcp.zones")
    assert error.message == "expected at least 1 item, got 0"


def test_all_problems_reported_in_one_pass_sorted_by_line(spec_file) -> None:
    path = spec_file(
        """
        name: Demo
        provider: local
        workers:
          count: -1
          disk_gb: 5
        ssh: {parallelism: 0}
        setup: echo hi
        monitor: {interval: "${INTERVAL}"}
        shared:
        """
    )
    errors = load_errors(path)
    assert [e.line for e in errors.errors] == [1, 4, 5, 6, 7, 8, 9]
    assert str(errors).count(str(path)) == 7
    setup = error_for(errors, "setup")
    assert setup.message == "expected a list of strings, got 'echo hi'"
    shared = error_for(errors, "shared")
    assert shared.message == "expected a mapping, got null"


def test_missing_file(tmp_path) -> None:
    error = only_error(load_errors(tmp_path / "nope.yaml"))
    assert error.message == "file not found" and error.file == str(tmp_path / "nope.yaml")


def test_directory_instead_of_file(tmp_path) -> None:
    error = only_error(load_errors(tmp_path))
    assert "directory" in error.message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- name: demo\n", "got a list"),
        ("just a string\n", "got 'just a string'"),
        ("a: 1\n---\nb: 2\n", "expected a single document"),
    ],
)
def test_top_level_not_a_mapping(spec_file, text, words) -> None:
    error = only_error(load_errors(spec_file(text)))
    assert words in error.message and error.line is not None


def test_anchors_and_merge_keys(spec_file) -> None:
    path = spec_file(
        """
        name: demo
        provider: local
        head: &node {disk_gb: 50}
        workers:
          <<: *node
          count: 2
        """
    )
    spec = load_fleet_spec(path, env={})
    assert spec.head.disk_gb == 50 and spec.workers.disk_gb == 50 and spec.workers.count == 2


def test_error_inside_merged_mapping_is_reported(spec_file) -> None:
    path = spec_file(
        """
        name: demo
        provider: local
        base: &b {disk_gb: 1}
        workers:
          <<: *b
          count: 2
        """
    )
    errors = load_errors(path)
    assert {e.field for e in errors.errors} == {"base", "workers.disk_gb"}


def test_unsupported_tag_and_bad_timestamp(spec_file) -> None:
    errors = load_errors(spec_file(MINIMAL + "ssh: {user: !python/name:os.system x}\nsetup: [2024-13-45]\n"))
    assert {e.field for e in errors.errors} == {"ssh.user", "setup[0]"}
    assert all(isinstance(e, SpecError) and e.line is not None for e in errors.errors)


def test_numbers_accepted_where_strings_are_expected(spec_file) -> None:
    path = spec_file("name: demo\nprovider: local\nworkers: {count: 1, aws: {max_price: 0.5}}\nsetup: [1]\n")
    spec = load_fleet_spec(path, env={})
    assert spec.workers.aws.max_price == "0.5" and spec.setup == ["1"]


def test_bool_for_string_suggests_quoting(spec_file) -> None:
    error = only_error(load_errors(spec_file(MINIMAL + "ssh: {user: yes}\n")))
    assert error.message == "expected a string (or null), got true"
    assert "quote it" in (error.hint or "")


def test_unquoted_reference_in_flow_mapping_gets_a_hint(spec_file) -> None:
    error = only_error(load_errors(spec_file("name: demo\nprovider: local\nworkers: {count: ${N}}\n")))
    assert error.line == 3 and "quote ${VAR} references" in (error.hint or "")


def test_unknown_runtime_extra_is_caught_at_load_with_its_line(spec_file) -> None:
    path = spec_file("name: demo\nprovider: local\nworkers: {count: 1}\nruntime:\n  extras:\n    - worker\n    - wrker\n")
    error = only_error(load_errors(path))
    assert (error.line, error.field) == (7, "runtime.extras[1]"), error
    assert "fleet has no extra 'wrker'" in error.message and "worker" in (error.hint or ""), error
    assert load_fleet_spec(spec_file(MINIMAL + "runtime: {extras: [worker, report]}\n"), env={}).runtime.extras == [
        "worker", "report"]
