"""The stored TextWorld tables against a live TextWorld engine (needs textworld==1.7.0: make test-textworld).

The tables in worlds/textworld/ are what training reads; these tests hold them to the engine that made
them: a stored table regenerates exactly from its tw-make command, random episodes and every admitted
command at every state agree with a fresh engine, a table with one wrong move fails the check, and the
builder takes a fresh game and refuses one too large.
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
    table = stored("train-11")
    assert tables.build_table(games["train-11"], also=table["also"], made_by=table["made_by"]) == table


def foreign_to(table: dict) -> list[str]:
    family = tw_env.load_tables(tw_env.TABLES, "train") + tw_env.load_tables(tw_env.TABLES, "heldout")
    return sorted({c for t in family for c in t["commands"]} - set(table["commands"]))


@pytest.mark.parametrize("name", ["train-3", "heldout-101"])
def test_random_episodes_every_command_at_every_state_and_every_other_games_command_agree_with_the_engine(
        games, name):
    """Every command of the table at every state (its own and the other games' that may act here), every
    other game's command at the start (the env answers them by leaving the state and reading nothing), and
    TextWorld's own next step at every state is one the oracle calls good."""
    table = stored(name)
    assert tables.live_check(games[name], table, episodes=30, seed=1, every_state=True, foreign=foreign_to(table)) == []


@pytest.mark.parametrize("field", ["next", "feedback", "admissible", "task"])
def test_a_table_with_one_wrong_entry_fails_the_check(games, field):
    """A wrong next state, a wrong reply, a wrong admitted set or a wrong task: each is reported."""
    table = stored("train-3")
    s = next(s for s in table["states"] if s["admissible"])
    c = s["admissible"][0]
    if field == "next":
        s["next"][c] = next(j for j, t in enumerate(table["states"]) if t["key"] != table["states"][s["next"][c]]["key"])
    elif field == "feedback":
        s["feedback"][c] = next(f for f in range(len(table["feedbacks"])) if f != s["feedback"][c])
    elif field == "admissible":
        s["admissible"] = s["admissible"][1:]
    else:
        table["task"] = "take nothing"
    assert tables.live_check(games["train-3"], table, episodes=0, every_state=True) != []


def test_the_builder_takes_a_fresh_game_and_its_table_passes_the_check(tmp_path):
    """A game no stored table comes from (two rooms, four objects, a quest of three steps), with the family's
    commands that may act in it."""
    game = tables.generate(tables.make_command(4242, 2, 4, 3, str(tmp_path / "fresh.z8")))
    own = tables.build_table(game)
    family = sorted({c for t in tw_env.load_tables(tw_env.TABLES, "train") for c in t["commands"]})
    table = tables.build_table(game, also=tables.family_extras(game, own, family))
    assert 1 < len(table["states"]) <= tables.MAX_STATES and any(s["won"] for s in table["states"])
    assert tables.live_check(game, table, episodes=30, seed=2, foreign=foreign_to(table)) == []


def test_the_builder_refuses_a_game_whose_state_graph_is_too_large_in_one_line(games):
    with pytest.raises(ValueError, match=r"more than 10 reachable states; a table is for small games") as e:
        tables.build_table(games["train-3"], max_states=10)
    assert "\n" not in str(e.value)
