"""Tests for YAML loading: tags, env values, includes and profiles."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from duct_messaging.system import (
    Config,
    ConfigError,
    Ref,
    RefSet,
    load_config,
    read_config,
)

Write = Callable[[str, str], Path]


class TestTags:
    def test_ref_and_refset_become_marker_objects(self) -> None:
        """!ref and !refset load as Ref/RefSet holding the normalised key."""
        config = read_config("a/b: {one: !ref x/y, all: !refset 'x/t   name'}")

        assert config["a/b"] == {"one": Ref("x/y"), "all": RefSet("x/t name")}

    def test_python_object_tags_are_refused(self) -> None:
        """The loader never builds Python objects from YAML tags."""
        with pytest.raises(ConfigError, match="invalid YAML"):
            read_config("a/b: !!python/object/apply:os.system ['true']")

    def test_top_level_must_be_a_mapping(self) -> None:
        """A config whose top level is a list is rejected."""
        with pytest.raises(ConfigError, match="top level must be a mapping"):
            read_config("- a\n- b\n")

    def test_empty_document_is_an_empty_config(self) -> None:
        """An empty file gives an empty config without problems."""
        config = read_config("")

        assert dict(config) == {}
        assert config.problems == ()

    def test_ref_without_a_name_is_a_problem(self) -> None:
        """A !ref on a mapping is reported with its path, not raised."""
        config = read_config("a/b:\n  x: !ref {k: v}\n")

        assert config.problems == ("a/b.x: !ref expects a key name [<string>:2]",)

    def test_locations_point_at_keys(self, write: Write) -> None:
        """Config paths map to the file and line where they were written."""
        path = write("c.yaml", "a/b:\n  port: 1\n  hosts:\n    - h\n")

        config = load_config(path)

        assert config.locate(("a/b", "port")) == f"{path}:2"
        assert config.locate(("a/b", "hosts", 0)) == f"{path}:3"


class TestEnv:
    def test_scalar_form_reads_a_string(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """!env NAME gives the variable's text."""
        monkeypatch.setenv("DM_T_HOST", "h1")

        config = read_config("a/b: {host: !env DM_T_HOST}")

        assert config["a/b"] == {"host": "h1"}

    @pytest.mark.parametrize(
        ("type_name", "raw", "expected"),
        [
            ("int", "8080", 8080),
            ("float", "0.5", 0.5),
            ("bool", "yes", True),
            ("bool", "0", False),
            ("str", "007", "007"),
        ],
    )
    def test_sequence_form_coerces(
        self,
        monkeypatch: pytest.MonkeyPatch,
        type_name: str,
        raw: str,
        expected: object,
    ) -> None:
        """!env [NAME, TYPE] converts the text to TYPE."""
        monkeypatch.setenv("DM_T_VALUE", raw)

        config = read_config(f"a/b: !env [DM_T_VALUE, {type_name}]")

        assert config["a/b"] == expected
        assert type(config["a/b"]) is type(expected)

    def test_default_applies_when_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The third element is used when the variable is missing, null included."""
        monkeypatch.delenv("DM_T_UNSET", raising=False)

        config = read_config(
            "a/b: {port: !env [DM_T_UNSET, int, 8080], "
            "opt: !env [DM_T_UNSET, str, null], text: !env [DM_T_UNSET, int, '9']}"
        )

        assert config["a/b"] == {"port": 8080, "opt": None, "text": 9}
        assert config.problems == ()

    def test_errors_are_collected_with_their_paths(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every bad env value is a problem naming the config path; none raises."""
        monkeypatch.delenv("DM_T_MISSING", raising=False)
        monkeypatch.setenv("DM_T_PORT", "eighty")
        monkeypatch.setenv("DM_T_FLAG", "maybe")
        text = """\
        duct.kafka/clients:
          kafka-primary:
            bootstrap_servers: !env DM_T_MISSING
            port: !env [DM_T_PORT, int]
            tls: !env [DM_T_FLAG, bool]
            ratio: !env [DM_T_MISSING, float, abc]
            other: !env [DM_T_PORT, decimal]
        """

        config = read_config(text.replace("        ", ""))

        assert config.problem_keys == ("duct.kafka/clients",) * 5
        assert list(config.problems) == [
            "duct.kafka/clients.kafka-primary.bootstrap_servers: environment "
            "variable DM_T_MISSING is not set and has no default [<string>:3]",
            "duct.kafka/clients.kafka-primary.port: environment variable "
            "DM_T_PORT='eighty' is not a valid int [<string>:4]",
            "duct.kafka/clients.kafka-primary.tls: environment variable "
            "DM_T_FLAG='maybe' is not a valid bool [<string>:5]",
            "duct.kafka/clients.kafka-primary.ratio: !env DM_T_MISSING: default "
            "'abc' (the variable is not set) is not a valid float [<string>:6]",
            "duct.kafka/clients.kafka-primary.other: !env DM_T_PORT: unknown type "
            "'decimal'; use str, int, float or bool [<string>:7]",
        ]


class TestInclude:
    def test_include_is_relative_to_the_including_file(self, write: Write) -> None:
        """Nested includes resolve against the file that contains the tag."""
        write("sub/kafka.yaml", "servers: !include more/hosts.yaml\n")
        write("sub/more/hosts.yaml", "[h1, h2]\n")
        main = write("main.yaml", "a/b: !include sub/kafka.yaml\n")

        config = load_config(main)

        assert config["a/b"] == {"servers": ["h1", "h2"]}
        assert config.problems == ()

    def test_included_content_keeps_its_own_locations(self, write: Write) -> None:
        """Paths inside an included file point at that file."""
        part = write("part.yaml", "x: 1\ny: !env DM_T_NEVER_SET\n")
        main = write("main.yaml", "a/b: !include part.yaml\n")

        config = load_config(main)

        assert config.locate(("a/b", "x")) == f"{part.resolve()}:1"
        assert config.problems == (
            "a/b.y: environment variable DM_T_NEVER_SET is not set and has no "
            f"default [{part.resolve()}:2]",
        )

    def test_missing_file_names_the_including_file(self, write: Write) -> None:
        """A missing include is a problem naming the file that includes it."""
        write("mid.yaml", "deep: !include nowhere.yaml\n")
        main = write("main.yaml", "a/b: !include mid.yaml\n")

        config = load_config(main)

        (problem,) = config.problems
        assert problem.startswith("a/b.deep: !include 'nowhere.yaml' in ")
        assert "mid.yaml: file not found" in problem

    def test_include_cycle_is_reported(self, write: Write) -> None:
        """Files including each other are a problem listing the chain."""
        one = write("one.yaml", "next: !include two.yaml\n").resolve()
        two = write("two.yaml", "back: !include one.yaml\n").resolve()
        main = write("main.yaml", "a/b: !include one.yaml\n").resolve()

        config = load_config(main)

        (problem,) = config.problems
        assert problem.startswith(f"a/b.next.back: !include cycle from {two}: ")
        assert f"{main} -> {one} -> {two} -> {one} [{two}:1]" in problem

    def test_self_include_of_the_main_file_is_a_cycle(self, write: Write) -> None:
        """The loaded file including itself is caught on the first step."""
        main = write("main.yaml", "a/b: !include main.yaml\n")

        config = load_config(main)

        assert "!include cycle" in config.problems[0]

    def test_include_in_text_uses_base_dir(self, write: Write, tmp_path: Path) -> None:
        """read_config resolves includes against base_dir."""
        write("x.yaml", "42\n")

        config = read_config("a/b: !include x.yaml", base_dir=tmp_path)

        assert config["a/b"] == 42


class TestProfile:
    TEXT = "a/b: {level: !profile {dev: debug, prod: warning, default: info}}"

    def test_argument_selects_the_profile(self) -> None:
        """profile= picks the matching entry."""
        assert read_config(self.TEXT, profile="prod")["a/b"] == {"level": "warning"}

    def test_env_var_selects_the_profile(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """DUCT_PROFILE is used when no argument is given."""
        monkeypatch.setenv("DUCT_PROFILE", "dev")

        config = read_config(self.TEXT)

        assert config["a/b"] == {"level": "debug"}
        assert config.profile == "dev"

    def test_default_entry_is_the_fallback(self) -> None:
        """An unknown profile falls back to `default`."""
        assert read_config(self.TEXT, profile="test")["a/b"] == {"level": "info"}

    def test_no_match_and_no_default_is_a_problem(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a matching entry or default, the path is reported."""
        monkeypatch.delenv("DUCT_PROFILE", raising=False)

        config = read_config("a/b: {level: !profile {dev: 1, prod: 2}}")

        assert config.problems == (
            "a/b.level: !profile: no profile selected (pass profile= or set "
            "DUCT_PROFILE); choices: dev, prod [<string>:1]",
        )

    def test_only_the_selected_branch_is_evaluated(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An !env in an unselected branch does not produce a problem."""
        monkeypatch.delenv("DM_T_PROD_ONLY", raising=False)

        config = read_config(
            "a/b: !profile {dev: local, prod: !env DM_T_PROD_ONLY}", profile="dev"
        )

        assert config["a/b"] == "local"
        assert config.problems == ()

    def test_config_is_a_read_only_mapping(self) -> None:
        """Config behaves like a mapping and keeps the key order of the file."""
        config = read_config("z/a: 1\na/z: 2\n")

        assert isinstance(config, Config)
        assert list(config) == ["z/a", "a/z"]
        assert not hasattr(config, "__setitem__")
