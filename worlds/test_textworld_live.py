"""The stored TextWorld tables against a live TextWorld engine (needs textworld==1.7.0: make test-textworld).

The tables in worlds/textworld/ are what training reads; these tests hold them to the engine that made
them: a stored table regenerates exactly from its tw-make command, random episodes and every admitted
command at every state agree with a fresh engine, a table with one wrong move fails the check, and the
builder takes a fresh game of the stated size and refuses one too large.
"""

import json
import os

import pytest

from worlds import textworld as tw_env
from worlds import textworld_tables as tables

pytest.importorskip("textworld", reason="pip install textworld==1.7.0 (make test-textworld)")


def stored(name: str) -> dict:
    with open(os.path.join(tw_env.TABLES, name + ".json")) as f:
        return json.load(f)


def regenerate(name: str, folder) -> str:
    """The stored table's game, generated again by the tw-make command the table names."""
    made = stored(name)["made_by"]
    return tables.generate(made[:-1] + [str(folder / made[-1]), "-f"])


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    folder = tmp_path_factory.mktemp("games")
    return {name: regenerate(name, folder) for name in ("train-11", "train-3", "heldout-101")}


def test_a_stored_table_is_rebuilt_exactly_from_the_tw_make_command_it_names(games):
    assert tables.build_table(games["train-11"], made_by=stored("train-11")["made_by"]) == stored("train-11")


@pytest.mark.parametrize("name", ["train-3", "heldout-101"])
def test_random_episodes_and_every_admitted_command_at_every_state_agree_with_a_fresh_engine(games, name):
    """Commands the state admits, commands it does not, and other games' commands (which the env answers by
    leaving the state as it is and reading nothing)."""
    table = stored(name)
    family = tw_env.load_tables(tw_env.TABLES, "train") + tw_env.load_tables(tw_env.TABLES, "heldout")
    foreign = sorted({c for t in family for c in t["commands"]} - set(table["commands"]))
    assert tables.live_check(games[name], table, episodes=40, seed=1, every_state=True, foreign=foreign) == []


def test_a_table_with_one_wrong_move_fails_the_check(games):
    table = stored("train-3")
    s = next(s for s in table["states"] if s["admissible"])
    c = s["admissible"][0]
    s["next"][c] = next(j for j, t in enumerate(table["states"]) if t["key"] != table["states"][s["next"][c]]["key"])
    bad = tables.live_check(games["train-3"], table, episodes=0, every_state=True)
    assert bad and all(line.startswith(f"state {table['states'].index(s)}, ") for line in bad)


def test_the_builder_takes_a_fresh_game_of_the_stated_size_and_its_table_passes_the_check(tmp_path):
    game = tables.generate(tables.make_command(4242, 2, 4, 3, str(tmp_path / "fresh.z8")))
    table = tables.build_table(game)
    assert 1 < len(table["states"]) <= tables.MAX_STATES and any(s["won"] for s in table["states"])
    assert tables.live_check(game, table, episodes=30, seed=2) == []


def test_the_builder_refuses_a_game_whose_state_graph_is_too_large_in_one_line(games):
    with pytest.raises(ValueError, match=r"more than 10 reachable states; a table is for small games") as e:
        tables.build_table(games["train-3"], max_states=10)
    assert "\n" not in str(e.value)
