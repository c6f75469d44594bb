"""Task families of the toy suite (sens_peft.testing.families): splits, solvers, regimes (no training)."""

from __future__ import annotations

import pytest

from sens_peft.testing import families, toy

NEW_TASKS = [t for name in ("recall", "conflict", "perm", "scan") for t in families.get_family(name).tasks]


@pytest.mark.parametrize("task", NEW_TASKS)
def test_splits_deterministic_disjoint_and_solved(task):
    a = toy.task_splits(task)
    toy._SPLIT_CACHE.clear()  # regenerate from the seed rather than reading the memo
    assert toy.task_splits(task) == a
    inputs = {split: {x for x, _ in pairs} for split, pairs in a.items()}
    assert {s: len(p) for s, p in a.items()} == toy.SPLIT_SIZES
    assert all(len(inputs[s]) == len(a[s]) for s in a)
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["validation"]
    assert not inputs["validation"] & inputs["test"]
    spec = toy.get_task(task)
    assert all(spec.solve(x) == y for pairs in a.values() for x, y in pairs)
    assert toy.MAX_ANSWER_TOKENS >= max(len(y) for _, y in a["test"]) + 1


def test_conflict_solvers_by_hand():
    x = "0719"
    expected = {"conflict_add3": "3042", "conflict_neg": "9280", "conflict_mul3": "0137", "conflict_mul7": "0973"}
    for task, y in expected.items():
        assert toy.get_task(task).solve(x) == y
    # same inputs for every conflict task: the test inputs of one task are valid inputs of all
    tasks = families.get_family("conflict").tasks
    first = [x for x, _ in toy.task_splits(tasks[0])["test"]]
    assert all(len(x) == 4 and x.isdigit() for x in first)
    prompts = {toy.get_task(t).prompt("0719") for t in tasks}
    assert len(prompts) == len(tasks)  # only the tag tells the tasks apart


def test_perm_solvers_by_hand():
    expected = {"perm_rev": "dcba", "perm_rotl": "bcda", "perm_swap": "badc", "perm_outer": "dbca"}
    for task, y in expected.items():
        assert toy.get_task(task).solve("abcd") == y
    skills = {k.name: k.solve("abcd") for k in families.PERM_SKILLS}
    assert skills == {"perm_skill_rotr": "dabc", "perm_skill_rot2": "cdab", "perm_skill_mid": "acbd"}
    x, y = toy.task_splits("perm_rev")["test"][0]
    assert set(x) <= set(families.PERM_ALPHABET) and y == x[::-1]
    # the same input distribution for every task: only the tag tells them apart
    assert len({toy.get_task(t).prompt("abcd") for t in families.PERM_OPS}) == len(families.PERM_OPS)


def test_scan_solvers_by_hand():
    x = "0719"  # running max 0,7,7,9; running min 0; digits >= 5 so far 0,1,1,2; larger neighbour 7,7,9,9 (wraps)
    expected = {"scan_max": "0779", "scan_min": "0000", "scan_high": "0112", "scan_nmax": "7799"}
    assert {t: toy.get_task(t).solve(x) for t in families.SCAN_OPS} == expected
    assert toy.get_task("scan_min").solve("9562") == "9552" and toy.get_task("scan_high").solve("9542") == "1222"
    skills = {k.name: k.solve(x) for k in families.SCAN_SKILLS}
    assert skills == {"scan_skill_odd": "0123", "scan_skill_nmin": "0110", "scan_skill_smax": "9999"}
    # the same inputs as every other scan task: only the tag tells them apart
    assert len({toy.get_task(t).prompt(x) for t in families.SCAN_OPS}) == len(families.SCAN_OPS)
    assert not {t.tag for t in families.SCAN_SKILLS} & set(families.SCAN_TAGS.values())


def test_recall_tables_and_solver_by_hand():
    tables = families.RECALL_TABLES
    keys = [set(t) for t in tables.values()]
    assert all(len(k) == families.RECALL_KEYS for k in keys)
    assert len(set().union(*keys)) == sum(len(k) for k in keys)  # disjoint keys: facts only one expert learns
    # pinned draws (a change of the generator must be deliberate: bump FAMILY_VERSION)
    assert (tables["recall_a"]["at"], tables["recall_a"]["bq"], tables["recall_d"]["as"]) == ("2", "3", "7")
    assert toy.get_task("recall_a").solve("atbqat") == "232"
    x, y = toy.task_splits("recall_a")["test"][0]
    assert y == "".join(tables["recall_a"][x[i : i + 2]] for i in (0, 2, 4))


@pytest.mark.parametrize("name", ["recall", "conflict", "maps", "perm", "scan"])
def test_regime_b_knows_part_of_every_task(name):
    fam = families.get_family(name)
    for task in fam.tasks:
        train = toy.task_splits(task)["train"]
        known = families.known_train(task, fam)
        assert 0.1 < len(known) / len(train) < 0.5, (task, len(known))
        assert set(known) <= set(train)
    if name == "maps":  # the same inputs as the original toy base's restricted pre-training
        assert families.known_train("inc", fam) == toy.restricted_train("inc", toy.ToySettings().known["inc"])


def test_pretraining_rows_per_regime():
    tok = toy.build_tokenizer()
    tag_ids = {t: tok.encode(toy.get_task(t).tag, add_special_tokens=False) for t in families.RECALL_TASKS}
    copy_ids = tok.encode(families.COPY_TAG, add_special_tokens=False)

    def starts(row, ids):
        return row[1 : 1 + len(ids)] == ids

    a = families.pretraining_rows(tok, families.FamilyBaseSettings("recall", "A"), 300)
    b = families.pretraining_rows(tok, families.FamilyBaseSettings("recall", "B"), 300)
    assert a == families.pretraining_rows(tok, families.FamilyBaseSettings("recall", "A"), 300)  # deterministic
    assert not any(starts(r, ids) for r in a for ids in tag_ids.values())  # A: no task at all
    skill_ids = tok.encode(families.get_family("recall").skills[0].tag, add_special_tokens=False)
    assert sum(starts(r, copy_ids) for r in a) > 60 and sum(starts(r, skill_ids) for r in a) > 60
    skill_keys = set(families.RECALL_SKILL_TABLE)
    assert not skill_keys & set().union(*map(set, families.RECALL_TABLES.values()))  # the skill's facts are others
    task_rows = [r for r in b if any(starts(r, ids) for ids in tag_ids.values())]
    assert len(task_rows) > 150 and not any(starts(r, copy_ids) for r in b)
    known = {tuple(toy.encode_example(tok, t, x, y)["input_ids"]) for t in families.RECALL_TASKS
             for x, y in families.known_train(t, families.get_family("recall"))}
    assert all(tuple(r) in known for r in task_rows)  # B: only what the base is meant to know
    s = families.FamilyBaseSettings("recall", "A")
    assert s.digest() != families.FamilyBaseSettings("recall", "B").digest()
    assert families.base_path(s, "/c").name.startswith("recall-A-")
    with pytest.raises(KeyError):
        families.get_family("nope")
    with pytest.raises(ValueError):
        toy.register_task(toy.Task("recall_a", "x:", lambda r: ("", ""), lambda x: x))


def test_regime_a_skills_are_of_the_kind_but_not_the_tasks():
    """Regime A's base learns each family's kind of skill with other rules: no skill solves any task's inputs
    the task's way, and no skill shares a tag with a task or the copy task."""
    tok = toy.build_tokenizer()
    for name in ("maps", "recall", "conflict", "perm", "scan"):
        fam = families.get_family(name)
        assert fam.skills, name
        tags = {toy.get_task(t).tag for t in fam.tasks} | {families.COPY_TAG}
        for skill in fam.skills:
            assert skill.tag not in tags
            assert tok.decode(tok.encode(skill.tag, add_special_tokens=False)) == skill.tag  # in the vocabulary
            for task in fam.tasks:
                xs = [x for x, _ in toy.task_splits(task)["train"][:200]]
                try:
                    same = [skill.solve(x) == toy.get_task(task).solve(x) for x in xs]
                except KeyError:  # the skill's alphabet or keys differ from the task's: not the same task
                    continue
                assert not all(same), (skill.name, task)
    assert families.CONFLICT_SKILLS[0].solve("0379") == "1480"  # d + 1 by hand
    assert families.CONFLICT_SKILLS[2].solve("0379") == "0731"  # 9 d mod 10 by hand


def test_regime_b_bases_keep_their_cached_digests():
    """Regime A's definition must never change regime B's bases (their cached experts and benchmark cells)."""
    assert families.FamilyBaseSettings("recall", "B").digest() == "1750334c6c6d"
    assert families.FamilyBaseSettings("conflict", "B").digest() == "a956896ba8ef"
    assert families.FamilyBaseSettings("recall", "A").digest() != families.FamilyBaseSettings("recall", "B").digest()
